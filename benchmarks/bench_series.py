"""Prometheus series and bytes per scrape that one rank exports, by model structure.

Run from a checkout (after `bash scripts/setup.sh`):

    .venv/bin/python benchmarks/bench_series.py

The count depends on the structure (modules with parameters), not on widths:
the models are built with 2-wide layers. For each structure it prints the
gradtel series of a healthy rank with the default ``layer_series="on_demand"``
and with ``"all"``, the bytes of one scrape, and the total at 1,024 and 10,000
ranks.
"""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradtel


def tiny() -> nn.Linear:
    return nn.Linear(2, 2, bias=False)


def norm() -> nn.LayerNorm:
    return nn.LayerNorm(2)


def gpt2_small() -> nn.Module:
    block = lambda: nn.ModuleDict(  # noqa: E731
        {"ln_1": norm(), "attn": nn.ModuleDict({"c_attn": tiny(), "c_proj": tiny()}), "ln_2": norm(),
         "mlp": nn.ModuleDict({"c_fc": tiny(), "c_proj": tiny()})}
    )  # fmt: skip
    return nn.ModuleDict(
        {
            "wte": tiny(),
            "wpe": tiny(),
            "h": nn.ModuleList([block() for _ in range(12)]),
            "ln_f": norm(),
        }
    )


def llama(layers: int, experts: int = 0) -> nn.Module:
    def mlp() -> nn.Module:
        if not experts:
            return nn.ModuleDict({"gate_proj": tiny(), "up_proj": tiny(), "down_proj": tiny()})
        return nn.ModuleDict(
            {"gate": tiny(), "experts": nn.ModuleList(
                [nn.ModuleDict({"w1": tiny(), "w2": tiny(), "w3": tiny()}) for _ in range(experts)])}
        )  # fmt: skip

    block = lambda: nn.ModuleDict(  # noqa: E731
        {"self_attn": nn.ModuleDict({name: tiny() for name in ("q_proj", "k_proj", "v_proj", "o_proj")}),
         "mlp": mlp(), "input_layernorm": norm(), "post_attention_layernorm": norm()}
    )  # fmt: skip
    return nn.ModuleDict(
        {"embed_tokens": tiny(), "layers": nn.ModuleList([block() for _ in range(layers)]),
         "norm": norm(), "lm_head": tiny()}
    )  # fmt: skip


STRUCTURES = {
    "GPT-2 small": gpt2_small,
    "Llama-2-7B": lambda: llama(32),
    "Llama-2-70B": lambda: llama(80),
    "Mixtral-8x7B": lambda: llama(32, experts=8),
}


def exported(model: nn.Module, layer_series: str) -> tuple[int, int, int]:
    """(layers, gradtel series, bytes of one scrape) of a healthy rank after one update."""
    registry = CollectorRegistry()
    provider = gradtel.prometheus_meter_provider(registry)
    monitor = gradtel.GradMonitor(model, meter_provider=provider, layer_series=layer_series)  # type: ignore[arg-type]
    for p in model.parameters():
        p.grad = p.detach() * 0
    monitor.collect()
    body = generate_latest(registry)
    series = sum(
        1
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name.startswith("gradtel_")
    )
    monitor.close()
    provider.shutdown()
    return len(monitor.layers), series, len(body)


def main() -> int:
    print(f"{'structure':<14} {'layers':>6} {'series on_demand':>17} {'bytes':>7} {'series all':>11} {'bytes':>8}"
          f" {'1,024 ranks':>12} {'10,000 ranks':>13}")  # fmt: skip
    for name, build in STRUCTURES.items():
        layers, lean, lean_bytes = exported(build(), "on_demand")
        _, full, full_bytes = exported(build(), "all")
        print(
            f"{name:<14} {layers:>6} {lean:>17} {lean_bytes:>7} {full:>11} {full_bytes:>8} "
            f"{lean * 1024:>12,} {lean * 10_000:>13,}"
        )
    print(
        "(the last two columns: series of healthy ranks under the default; with \"all\" multiply the 'series all' column)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
