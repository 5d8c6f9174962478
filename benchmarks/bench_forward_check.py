"""What a forward check would cost: the first module, in forward order, whose output was
non-finite, against gradtel's own healthy collect(), in one run.

Run from a checkout (after `bash scripts/setup.sh`):

    .venv/bin/python benchmarks/bench_forward_check.py [--repeats 7]

The check as it would have to be built to name a module: a forward hook on every
module that owns parameters flags its output on the device (no host sync per
module), and the flags are read once per update. Methods interleaved round-robin;
prints the extra milliseconds per training step (forward + backward) of the
forward check and of a healthy ``collect()``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import measure_all
from models import GPT2Small, many_linears

import gradtel


class ForwardCheck:
    """One device-side flag per watched module's output, read once per update."""

    def __init__(self, model: nn.Module) -> None:
        self.flags: list[torch.Tensor] = []
        owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        self.handles = [m.register_forward_hook(self._flag) for m in owners]

    def _flag(self, module: nn.Module, args: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            self.flags.append(torch.isfinite(output).all().logical_not())

    def read(self) -> int:
        """Index of the first module (in forward order) with a non-finite output, or -1."""
        bad = torch.stack(self.flags)
        self.flags.clear()
        first = int(torch.where(bad.any(), bad.int().argmax(), torch.tensor(-1)).item())
        return first

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def steps(model: nn.Module, batch: torch.Tensor) -> dict[str, Callable[[], object]]:
    monitor = gradtel.GradMonitor(
        model, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry())
    )

    def train() -> None:
        model.zero_grad()
        model(batch).float().pow(2).mean().backward()

    def with_collect() -> None:
        train()
        monitor.collect()

    def with_forward_check() -> None:
        check = ForwardCheck(model)
        train()
        check.read()
        check.remove()

    return {
        "step": train,
        "step + collect()": with_collect,
        "step + forward check": with_forward_check,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    workloads = {
        "300 x Linear(128), batch 64": (many_linears(), torch.randn(64, 128)),
        "GPT-2-small shape, batch 2 x 128 tokens": (GPT2Small(), torch.randint(0, 50257, (2, 128))),
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}, interleaved"
    )
    print(
        "| workload | step (ms) | collect(): extra ms | forward check: extra ms | forward check / collect() |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, (model, batch) in workloads.items():
        timing = measure_all(steps(model, batch), args.repeats)
        base = timing["step"].median
        collect = timing["step + collect()"].median - base
        forward = timing["step + forward check"].median - base
        print(
            f"| {name} | {base * 1e3:.1f} | {collect * 1e3:.1f} | {forward * 1e3:.1f} | {forward / collect:.1f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
