"""What the local gradient norm (``gradtel_local_grad_norm``) costs in the DDP hook, against
a healthy ``collect()`` of the same model, in one run.

Run from a checkout (after `bash scripts/setup.sh`):

    .venv/bin/python benchmarks/bench_local_norm.py [--repeats 25]

A one-rank gloo group gives DDP's own buckets of each model (one backward pass,
default ``bucket_cap_mb``); gradtel's origin count then runs over them as the
communication hook runs it each update: as shipped on the CPU (the sum of squares by
``torch.dot``, and the NaN/Inf counts only when it is not finite), counting every
bucket as it does on an accelerator (where reading the sum first would wait for the
device), and the healthy path with ``vector_norm`` in place of ``torch.dot``. Methods
interleaved round-robin; medians in milliseconds; the ratios are per update, as shares
of ``collect()``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_grad_norm import convolutions, with_gradients
from bench_scan import measure_all
from models import GPT2Small, many_linears

import gradtel
from gradtel.attach.origin import OriginCounter, sum_of_squares
from gradtel.pipeline.scan import nan_and_inf
from gradtel.tools.stack import free_port


def ddp_buckets(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """The buckets DDP hands its communication hook for ``model``, from one backward pass."""
    buckets: list[torch.Tensor] = []

    def keep(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buckets.append(bucket.buffer().clone())
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    # DDP checks a hook's annotations as objects, which this module's are not (PEP 563).
    keep.__annotations__ = {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(None, keep)
    ddp(inputs).float().sum().backward()
    return buckets


@torch.no_grad()
def counting_always(counter: OriginCounter, grads: torch.Tensor) -> None:
    """The hook as it runs on an accelerator: the sum of squares, and the counts of every bucket."""
    values = torch.cat((nan_and_inf(grads).double(), sum_of_squares(grads).reshape(1)))
    counter._values = values if counter._values is None else counter._values + values


def hook(
    add: Callable[[OriginCounter, torch.Tensor], None], buckets: list[torch.Tensor]
) -> Callable[[], object]:
    """One update of the communication hook's count over ``buckets``, read to the host."""
    counter = OriginCounter()

    def update() -> object:
        for bucket in buckets:
            add(counter, bucket)
        values = counter.take()
        assert values is not None
        return values.tolist()  # the update's read-out

    return update


def with_vector_norm(counter: OriginCounter, grads: torch.Tensor) -> None:
    """The hook's healthy path with ``vector_norm`` in place of ``torch.dot``."""
    norm = torch.linalg.vector_norm(grads, dtype=torch.promote_types(grads.dtype, torch.float32))
    square = norm.double().square().reshape(1)
    counter._values = square if counter._values is None else counter._values + square


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    workloads = {
        "300 x Linear(128)": (many_linears, torch.randn(8, 128)),
        "GPT-2-small shape, fp32": (GPT2Small, torch.randint(0, 50257, (1, 64))),
        "6 x Conv2d(64), channels_last": (
            convolutions,
            torch.randn(2, 64, 32, 32).to(memory_format=torch.channels_last),
        ),
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}, interleaved"
    )
    print(
        "| workload | buckets | `collect()` (ms) | hook as shipped (ms) | counting every bucket (ms) "
        "| with `vector_norm` (ms) | hook / `collect()` | counting every bucket / `collect()` "
        "| with `vector_norm` / `collect()` |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (make, inputs) in workloads.items():
        buckets = ddp_buckets(make(), inputs)
        model = with_gradients(make())
        provider = gradtel.prometheus_meter_provider(CollectorRegistry())
        monitor = gradtel.GradMonitor(model, meter_provider=provider)
        timing = measure_all(
            {
                "collect": monitor.collect,
                "shipped": hook(OriginCounter.add, buckets),
                "always": hook(counting_always, buckets),
                "alone": hook(with_vector_norm, buckets),
            },
            args.repeats,
        )
        collect, shipped, always, alone = (
            timing[k].median * 1e3 for k in ("collect", "shipped", "always", "alone")
        )
        print(
            f"| {name} | {len(buckets)} | {collect:.2f} | {shipped:.2f} | {always:.2f} "
            f"| {alone:.2f} | {shipped / collect:.2f}x | {always / collect:.2f}x "
            f"| {alone / collect:.2f}x |"
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
