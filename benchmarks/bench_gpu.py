"""What a healthy update costs on a GPU, against one read of gradient memory, with the
kernel launches and host syncs it makes, for sync and deferred read-out.

Run on a CUDA machine, with torch built for CUDA:

    .venv/bin/python benchmarks/bench_gpu.py            # GPT-2-small and a 1B-parameter shape
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick   # a smoke run anywhere

then ``benchmarks/bench_peers.py --device cuda`` for the peer table. Gradients are
random, of the models' shapes and dtypes (the scan's cost does not depend on how
they were made). "One read" is the gradient bytes over the bandwidth of a copy of
as many bytes measured in the same run (a copy moves each byte twice).
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
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import GPT2Small

import gradtel
from gradtel.export.device import device_labels
from gradtel.pipeline.scan import CHUNK

NAN, INF = float("nan"), float("inf")


def shapes(quick: bool) -> dict[str, Callable[[], nn.Module]]:
    if quick:
        return {"GPT-2-small shape, 2 blocks": lambda: GPT2Small(layers=2)}
    return {
        "GPT-2-small shape (124M)": GPT2Small,
        "1B-parameter shape (d 2048, 20 blocks)": lambda: GPT2Small(d=2048, layers=20),
    }


def wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(
    work: Callable[[], object], device: torch.device, repeats: int, *, until_done: bool = True
) -> float:
    """Median wall time of ``work``; with ``until_done``, until its device work is done."""
    for _ in range(3):
        work()
    wait(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        if until_done:
            wait(device)
        times.append(time.perf_counter() - started)
        wait(device)
    return statistics.median(times) * 1e3


def copy_ms(size: int, device: torch.device, repeats: int) -> float:
    """Median time of copying ``size`` bytes on ``device``."""
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return median_ms(lambda: target.copy_(source), device, repeats)


def kernels(work: Callable[[], object], device: torch.device) -> int:
    """Device kernels one call launches (on a CPU: the aten operators it runs)."""
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        work()
        wait(device)
    if device.type == "cuda":
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def host_syncs(work: Callable[[], object], device: torch.device) -> str:
    """Whether one call blocks on the device: CUDA's sync debug mode set to raise."""
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        work()
        return "none"
    except RuntimeError as exc:
        return f"at least one ({str(exc).splitlines()[0][:60]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def one_launch_flaggers(
    model: nn.Module, device: torch.device, repeats: int
) -> tuple[float, float]:
    """Milliseconds of torch's multi-tensor L1 norm (reads only, one value per tensor) and of
    GradScaler's check, each over every gradient in one launch."""
    grads = [p.grad for p in model.parameters()]
    found, one = torch.zeros(1, device=device), torch.ones(1, device=device)
    return (
        median_ms(lambda: torch._foreach_norm(grads, 1), device, repeats),
        median_ms(
            lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one),
            device,
            repeats,
        ),
    )


def counts_exact(model: nn.Module, monitors: list[gradtel.GradMonitor]) -> str:
    """Whether each monitor counts an unhealthy update exactly: NaN and Inf planted in the
    smallest, a middle and the largest gradient (past its first chunk), against torch's count."""
    grads = sorted((p.grad for p in model.parameters()), key=lambda g: g.numel())
    for grad, index, value in (
        (grads[0], 0, NAN),
        (grads[len(grads) // 2], -1, INF),
        (grads[-1], CHUNK + 5, NAN),
        (grads[-1], -1, -INF),
    ):
        grad.view(-1)[index] = value
    expected = (
        sum(int(torch.isnan(g).sum()) for g in grads),
        sum(int(torch.isinf(g).sum()) for g in grads),
    )
    said = []
    for monitor in monitors:
        health = monitor.collect()
        if monitor.readout == "deferred":  # published by the next collect()
            monitor.flush()
            health = monitor.collect()
        said.append(
            "yes"
            if (health.nan_total, health.inf_total) == expected
            else f"NO: {health.describe()}"
        )
        monitor.flush()  # before the gradients are cleaned in place
    for grad in grads:
        grad.nan_to_num_(0.0, 0.0, 0.0)
    return " / ".join(said)


def device_labels_checked(device: torch.device) -> dict[str, str]:
    """The device info labels of a process on ``device``, checked against torch's own
    properties of that GPU (as dcgm-exporter prints them)."""
    labels = device_labels(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        assert labels["device"] == f"cuda:{device.index or 0}", labels
        assert labels["gpu_uuid"] == f"GPU-{props.uuid}", (labels, props.uuid)
        bus = f":{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"  # type: ignore[attr-defined]
        assert labels["pci_bus_id"].endswith(bus), (labels, bus)
    return labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a small model and few repetitions")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = 5 if args.quick else 30
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}; medians of {repeats}\n")
    print(f"gradtel_device_info labels: {device_labels_checked(device)}\n")
    # Two one-launch flaggers of every gradient, to choose the kernels on this device.
    print(
        "| model | dtype | gradient bytes | one read (ms) | multi-tensor L1 norm, all (ms) "
        "| GradScaler's check, all (ms) | sync `collect()` (ms) | deferred, until done (ms) "
        "| deferred, on the calling thread (ms) | kernels, sync / deferred | host syncs in a deferred healthy update "
        "| unhealthy counts exact, sync / deferred |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for label, build in shapes(args.quick).items():
        for dtype in (torch.float32, torch.bfloat16):
            with device:  # initialised where it runs: a 1B-parameter init on the host takes long
                model = build().to(dtype=dtype)
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            size = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
            one_read = copy_ms(size, device, repeats) / 2  # a copy reads and writes every byte
            sync = gradtel.GradMonitor(
                model, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry())
            )
            deferred = gradtel.GradMonitor(
                model,
                meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()),
                readout="deferred",
            )
            row = [
                label,
                str(dtype).removeprefix("torch."),
                f"{size / 1e9:.2f} GB",
                f"{one_read:.2f}",
                *(f"{ms:.2f}" for ms in one_launch_flaggers(model, device, repeats)),
                f"{median_ms(sync.collect, device, repeats):.2f}",
                f"{median_ms(deferred.collect, device, repeats):.2f}",
                f"{median_ms(deferred.collect, device, repeats, until_done=False):.3f}",
                f"{kernels(sync.collect, device)} / {kernels(deferred.collect, device)}",
                host_syncs(deferred.collect, device),
                counts_exact(model, [sync, deferred]),
            ]
            print("| " + " | ".join(row) + " |")
            deferred.close()
            sync.close()
            del model, sync, deferred
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
