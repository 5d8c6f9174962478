"""Costs that depend on gradient layout and on which gradients exist, in one run.

Run from a checkout (after `bash scripts/setup.sh`):

    .venv/bin/python benchmarks/bench_layouts.py [--quick]

Prints, with methods interleaved round-robin in one process:
- healthy collect() on channels-last convolutions / their contiguous twins;
- collect() of an all-NaN transposed 2048x2048 gradient / its contiguous twin;
- collect() when the set of gradients changes every update (mixture of experts)
  / the same number of gradients always present;
- the first collect() (planning) and a later one for 16,384 gradient tensors;
- host reads (aten::_local_scalar_dense) in one healthy collect().
Only public API is used, so the script also measures older gradtel versions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from torch import nn
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import measure_all
from models import many_linears

import gradtel

NAN = float("nan")


def monitor(model: nn.Module | list[tuple[str, nn.Parameter]]) -> gradtel.GradMonitor:
    provider = gradtel.prometheus_meter_provider(CollectorRegistry())
    return gradtel.GradMonitor(
        model, meter_provider=provider, on_warning="ignore", on_critical="ignore"
    )


def convs(channels: int, channels_last: bool) -> gradtel.GradMonitor:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(channels, channels, 3, padding=1) for _ in range(6)])
    x = torch.randn(2, channels, 16, 16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert model[0].weight.grad is not None
    assert model[0].weight.grad.is_contiguous() != channels_last
    return monitor(model)


def all_nan(transposed: bool) -> gradtel.GradMonitor:
    weight = torch.zeros(2048, 2048)
    param = nn.Parameter(weight.t() if transposed else weight)
    param.grad = torch.full_like(param, NAN)
    return monitor([("big.weight", param)])


EXPERTS, ACTIVE = 256, 32


def experts(changing: bool) -> Callable[[], object]:
    """Mixture-of-experts gradients: ACTIVE of EXPERTS Linear(64, 64) have one per update."""
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(64, 64) for _ in range(EXPERTS)])
    params = [list(layer.parameters()) for layer in layers]
    grads = [[torch.randn_like(p) for p in ps] for ps in params]
    watched = monitor(layers)
    step = [0]

    def update() -> object:
        step[0] += 1
        chosen = {(step[0] * 7 + 3 * k) % EXPERTS if changing else k for k in range(ACTIVE)}
        for i, ps in enumerate(params):
            for p, g in zip(ps, grads[i]):
                p.grad = g if i in chosen else None
        return watched.collect()

    return update


def planning(tensors: int) -> tuple[float, float]:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(tensors // 2)])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    watched = monitor(model)
    started = time.perf_counter()
    watched.collect()
    first = time.perf_counter() - started
    later = []
    for _ in range(5):
        started = time.perf_counter()
        watched.collect()
        later.append(time.perf_counter() - started)
    return first, statistics.median(later)


def host_reads() -> int:
    model = many_linears()
    model(torch.randn(4, 128)).sum().backward()
    watched = monitor(model)
    watched.collect()
    with profile() as prof:
        watched.collect()
    return sum(event.name == "aten::_local_scalar_dense" for event in prof.events())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats = 5 if args.quick else 40
    print(
        f"gradtel {gradtel.__version__} from {Path(gradtel.__file__).parent}, torch {torch.__version__}"
    )
    rows: list[tuple[str, float]] = []
    for channels in (64, 128):
        t = measure_all(
            {
                "contiguous": convs(channels, False).collect,
                "channels_last": convs(channels, True).collect,
            },
            repeats,
        )
        rows.append(
            (
                f"6 x Conv2d({channels}) healthy: channels_last / contiguous",
                t["channels_last"].median / t["contiguous"].median,
            )
        )
    t = measure_all(
        {"contiguous": all_nan(False).collect, "transposed": all_nan(True).collect},
        max(3, repeats // 4),
    )
    rows.append(
        (
            "all-NaN 2048x2048: transposed / contiguous",
            t["transposed"].median / t["contiguous"].median,
        )
    )
    t = measure_all({"fixed": experts(False), "changing": experts(True)}, repeats)
    rows.append(
        (
            f"{EXPERTS} experts, {ACTIVE} with gradients: changing set / fixed set",
            t["changing"].median / t["fixed"].median,
        )
    )
    first, later = planning(16384)
    rows.append(("16,384 tensors: first collect() (plans), ms", first * 1e3))
    rows.append(("16,384 tensors: later collect(), ms", later * 1e3))
    rows.append(
        ("host reads (aten::_local_scalar_dense) in a healthy collect()", float(host_reads()))
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
