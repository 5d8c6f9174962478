"""Which torch kernel flags NaN/Inf in all gradients fastest: the floor under
``collect()``'s first pass, next to ``collect()`` itself, in one interleaved run.

Run from a checkout (after `bash scripts/setup.sh bench`):

    .venv/bin/python benchmarks/bench_flags.py [--repeats 40] [--device cuda]

Each method finds the gradients, flags them with one torch kernel family and reads
the flag to the host, on the workloads of ``bench_peers.py``. GradScaler's fused
check is that benchmark's "least a check can cost": a kernel that flags faster would
let ``collect()`` cost less than it; none does on a CPU, where the fused check is one
call that reads and writes each value, and every read-only alternative either runs a
call per tensor or falls back to one. The memory floor, one ``.sum()`` over a buffer of
as many values, is ``bench_peers.py``'s other reference: reading the same values from
many tensors costs more than from one, whatever the kernel.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_peers import provider, synced, workloads
from bench_scan import measure_all

import gradtel

FLOOR = "one `.sum()` over one buffer of as many values (the memory floor)"


def flags(params: list[torch.nn.Parameter]) -> dict[str, Callable[[], object]]:
    device = params[0].device
    found_inf, inv_scale = torch.zeros(1, device=device), torch.ones(1, device=device)

    def grads() -> list[torch.Tensor]:
        return [p.grad for p in params if p.grad is not None]

    def scaler() -> bool:
        torch._amp_foreach_non_finite_check_and_unscale_(grads(), found_inf, inv_scale)
        return bool(found_inf.item())

    def finite(per_tensor: list[torch.Tensor]) -> bool:
        return bool(torch.stack(per_tensor).sum().isfinite().item())

    # The memory floor: one read of as many values, laid out as one tensor.
    buffer = torch.randn(sum(p.numel() for p in params), device=device)

    return {
        "GradScaler's fused check (reads and writes each value)": scaler,
        FLOOR: lambda: bool(buffer.sum().isfinite().item()),
        "`.sum()` per tensor": lambda: finite([g.sum() for g in grads()]),
        "`_foreach_max`": lambda: finite(list(torch._foreach_max(grads()))),
        "`_foreach_norm`, ord 1": lambda: finite(list(torch._foreach_norm(grads(), 1))),
        "`_foreach_norm`, ord 2": lambda: finite(list(torch._foreach_norm(grads(), 2))),
        "`_foreach_norm`, ord inf": lambda: finite(
            list(torch._foreach_norm(grads(), float("inf")))
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    print(
        f"median of {args.repeats}, interleaved; ratios to GradScaler's fused check and to the memory floor\n"
    )
    for name, (model, loss) in workloads(False, device).items():
        loss(model).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        methods = flags(params)
        monitor = gradtel.GradMonitor(model, meter_provider=provider())
        methods["gradtel `collect()`"] = monitor.collect
        timing = measure_all(synced(methods, device), args.repeats)
        check = timing["GradScaler's fused check (reads and writes each value)"].median
        floor = timing[FLOOR].median
        print(f"### {name}\n\n| method | median (us) | / fused check | / memory floor |")
        print("|---|---:|---:|---:|")
        for method, measured in timing.items():
            m = measured.median
            print(f"| {method} | {m * 1e6:.1f} | {m / check:.2f}x | {m / floor:.2f}x |")
        print()
        monitor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
