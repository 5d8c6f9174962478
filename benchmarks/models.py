"""Benchmark workloads: many small layers (A) and a GPT-2-small-shaped transformer (B)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def many_linears(layers: int = 300, width: int = 128) -> nn.Sequential:
    """Workload A: ``layers`` Linear(width, width), i.e. 2 × ``layers`` parameter tensors."""
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d)})
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.attn["c_attn"](self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn["c_proj"](y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class GPT2Small(nn.Module):
    """Workload B: 12 blocks, d_model 768, MLP 3072, vocabulary 50257, tied output head."""

    def __init__(
        self, vocab: int = 50257, context: int = 1024, d: int = 768, layers: int = 12
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.h = nn.ModuleList([Block(d, heads=12) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied with the embedding
