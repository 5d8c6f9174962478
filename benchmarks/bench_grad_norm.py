"""What the gradient norms cost when gradtel computes them (``GradMonitor(grad_norm=True)``,
``GradMonitor(layer_norms=True)``) against a healthy ``collect()`` without them, in one run.

Run from a checkout (after `bash scripts/setup.sh`):

    .venv/bin/python benchmarks/bench_grad_norm.py [--repeats 25]

Methods interleaved round-robin; medians in milliseconds. With
``gradtel.clip_grad_norm_`` the norm comes from clipping and costs nothing more.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import measure_all
from models import GPT2Small, many_linears

import gradtel


def with_gradients(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def convolutions() -> nn.Module:
    return nn.Sequential(*[nn.Conv2d(64, 64, 3, padding=1) for _ in range(6)]).to(
        memory_format=torch.channels_last
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    workloads = {
        "300 x Linear(128)": many_linears(),
        "GPT-2-small shape, fp32": GPT2Small(),
        "6 x Conv2d(64), channels_last": convolutions(),
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}, interleaved"
    )
    print(
        "| workload | `collect()` (ms) | `grad_norm=True` (ms) | ratio | `layer_norms=True` (ms) | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, model in workloads.items():
        with_gradients(model)

        def monitor(model: torch.nn.Module = model, **options: bool) -> gradtel.GradMonitor:
            provider = gradtel.prometheus_meter_provider(CollectorRegistry())
            return gradtel.GradMonitor(model, meter_provider=provider, **options)

        monitors = {
            "plain": monitor(),
            "norm": monitor(grad_norm=True),
            "layers": monitor(layer_norms=True),
        }
        timing = measure_all({key: m.collect for key, m in monitors.items()}, args.repeats)
        plain, norm, layers = (timing[key].median * 1e3 for key in monitors)
        print(
            f"| {name} | {plain:.2f} | {norm:.2f} | {norm / plain:.2f}x | {layers:.2f} | {layers / plain:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
