"""Origin-rank detection in the ways training scripts use it, on the CPU (gloo), for the
distributed tests; start it with torchrun on 2 ranks.

Usage: torchrun --nproc_per_node 2 origin_trainer.py

Every update is a fresh set of gradients of an unchanged model (no optimizer step, or
one after the last update), so a NaN stays in the update it was put in. Each rank prints one JSON line per scenario:
``{"scenario": ..., "rank": ..., ...}`` with, per update, this rank's own (pre-reduction)
NaN and Inf counts, and its ``gradtel_origin_updates_total``.

- ``accumulation/<flavour>``: two backward passes per update, every one reduced (no
  ``no_sync()``); rank 1 alone has a NaN in the input of the first one.
- ``attached``: ``accumulation`` with DDP, collected by ``monitor.attach(optimizer)``;
  ``attached/last`` with the NaN in the last backward pass of the update instead,
  ``attached/backward`` that with ``scan="backward"``, ``attached/bucket_view`` with
  ``gradient_as_bucket_view=True``.
- ``buckets``: DDP with one bucket per parameter, two backward passes per update: rank 1
  alone puts NaN into its own gradient of ``2.weight`` in the first, rank 0 alone Inf into
  its own gradient of ``0.weight`` in the second.
- ``again/<flavour>``: ``monitor.close()``, then a new monitor on the same model (the
  README's recipe), then a NaN on rank 1.
- ``custom_reduce_scatter/<when>``: ``fully_shard`` with the application's own
  reduce-scatter, set before or after ``GradMonitor(model)``.
- ``flat/kept``, ``flat/flattened``: FSDP with ``use_orig_params=True`` and ``False``, the
  same updates (rank 1 alone has a NaN in the second).
- ``sampled``: DDP with ``sample_every=2``; rank 1 alone has a NaN in update 2 (sampled
  out), then in update 5 (scanned).
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch import nn
from torch.distributed.fsdp import (
    FSDPModule,
    FullyShardedDataParallel,
    ShardingStrategy,
    fully_shard,
)
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
from torch.nn.parallel import DistributedDataParallel

import gradtel

BAD_RANK = 1
NAN = float("nan")


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def fully_sharded() -> nn.Module:
    model = net()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


FLAVOURS: dict[str, Callable[[], nn.Module]] = {
    "DistributedDataParallel": lambda: DistributedDataParallel(net()),
    "FullyShardedDataParallel": lambda: FullyShardedDataParallel(
        net(), use_orig_params=True, device_id=torch.device("cpu")
    ),
    "FullyShardedDataParallel/NO_SHARD": lambda: FullyShardedDataParallel(
        net(),
        use_orig_params=True,
        device_id=torch.device("cpu"),
        sharding_strategy=ShardingStrategy.NO_SHARD,
    ),
    "fully_shard": fully_sharded,
}


class Watched:
    """A monitor with a registry of its own, and what it says about each update."""

    def __init__(self, model: nn.Module, **options: Any) -> None:
        self.registry = CollectorRegistry()
        provider = gradtel.prometheus_meter_provider(self.registry)
        self.monitor = gradtel.GradMonitor(
            model, meter_provider=provider, on_warning="ignore", on_critical="ignore", **options
        )
        self.updates: list[dict[str, Any]] = []

    def collect(self) -> None:
        health = self.monitor.collect()
        self.updates.append(
            {"local": [health.local_nan_total, health.local_inf_total], "nan": health.nan_total}
        )

    def origins(self) -> list[float | None]:
        rank = str(dist.get_rank())
        return [
            self.registry.get_sample_value(
                "gradtel_origin_updates_total", {"kind": kind, "rank": rank}
            )
            for kind in ("nan", "inf")
        ]


def update(
    model: nn.Module,
    bad: tuple[int, ...] = (),
    passes: int = 1,
    after_pass: Callable[[], object] = lambda: None,
) -> None:
    """One update of ``passes`` backward passes; on BAD_RANK, a NaN in the input of the passes in ``bad``."""
    model.zero_grad()
    for index in range(passes):
        x = torch.randn(4, 4)
        if index in bad and dist.get_rank() == BAD_RANK:
            x[1, 2] = NAN
        model(x).sum().backward()
        after_pass()


def say(scenario: str, **said: Any) -> None:
    # One write below PIPE_BUF is atomic: the ranks share the launcher's stdout.
    sys.stdout.write(json.dumps({"scenario": scenario, "rank": dist.get_rank(), **said}) + "\n")
    sys.stdout.flush()


def accumulation(flavour: str) -> None:
    model = FLAVOURS[flavour]()
    watched = Watched(model)
    for bad in ((), (0,), ()):
        update(model, bad, passes=2)
        watched.collect()
    say(f"accumulation/{flavour}", updates=watched.updates, origins=watched.origins())
    watched.monitor.close()


def attached(scenario: str, scan: str, bad_pass: int, **ddp: Any) -> None:
    model = DistributedDataParallel(net(), **ddp)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    watched = Watched(model)
    counted: list[int] = []
    watched.monitor.subscribe(lambda health: counted.append(health.nan_total))
    watched.monitor.attach(optimizer, scan=scan)  # counts at the end of each backward pass
    # The NaN in the gradients after each backward pass, on this rank, counted here.
    reference: list[int] = []
    for bad in ((), (bad_pass,)):  # the NaN update last: the step takes it into the weights
        update(model, bad, passes=2, after_pass=lambda: reference.append(nan_in_gradients(model)))
        optimizer.step()
    say(scenario, origins=watched.origins(), counted=counted, reference=reference)
    watched.monitor.close()


def flat(scenario: str, use_orig_params: bool) -> None:
    """FSDP with its parameters flattened into one per unit, or kept: the same updates."""
    model = FullyShardedDataParallel(
        net(), use_orig_params=use_orig_params, device_id=torch.device("cpu")
    )
    watched = Watched(model)
    torch.manual_seed(1 + dist.get_rank())  # the same inputs for both
    by_layer = []
    for bad in ((), (0,)):
        update(model, bad)
        by_layer.append(dict(watched.monitor.collect().nan_by_layer))
    say(scenario, by_layer=by_layer, layers=list(watched.monitor.layers))
    watched.monitor.close()


def nan_in_gradients(model: nn.Module) -> int:
    return sum(int(torch.isnan(p.grad).sum()) for p in model.parameters() if p.grad is not None)


def buckets() -> None:
    model = DistributedDataParallel(net(), bucket_cap_mb=1e-6)  # one bucket per parameter
    watched = Watched(model)
    poison = {"0.weight": torch.zeros(()), "2.weight": torch.zeros(())}
    for name, parameter in model.module.named_parameters():
        if name in poison:
            parameter.register_hook(lambda grad, name=name: grad + poison[name])
    own = {1: ("2.weight", 0, NAN), 0: ("0.weight", 1, float("inf"))}[dist.get_rank()]
    for bad in (False, True, False):
        model.zero_grad()
        for index in range(2):
            name, when, value = own
            poison[name].fill_(value if bad and index == when else 0.0)
            model(torch.randn(4, 4)).sum().backward()
        watched.collect()
    say("buckets", updates=watched.updates, origins=watched.origins())
    watched.monitor.close()


def again(flavour: str) -> None:
    model = FLAVOURS[flavour]()
    first = Watched(model)
    update(model)
    first.collect()
    first.monitor.close()
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("gradtel").addHandler(handler)
    try:
        second = Watched(model)
    finally:
        logging.getLogger("gradtel").removeHandler(handler)
    first.monitor.origin.take()
    for bad in ((), (0,)):
        update(model, bad)
        second.collect()
    say(
        f"again/{flavour}",
        updates=second.updates,
        origins=second.origins(),
        log=log.getvalue(),
        closed_fed=first.monitor.origin.take() is not None,
    )
    second.monitor.close()


class CallCounting(DefaultReduceScatter):
    """The application's own reduce-scatter: torch's, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super().__call__(*args, **kwargs)


def custom_reduce_scatter(when: str) -> None:
    model = fully_sharded()
    comm = CallCounting()
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if when == "before":
        for module in sharded:
            module.set_custom_reduce_scatter(comm)
    watched = Watched(model)
    if when == "after":
        for module in sharded:
            module.set_custom_reduce_scatter(comm)
    for bad in ((), (0,)):
        update(model, bad)
        watched.collect()
    say(
        f"custom_reduce_scatter/{when}",
        updates=watched.updates,
        origins=watched.origins(),
        calls=comm.calls,
    )
    watched.monitor.close()


def sampled() -> None:
    model = DistributedDataParallel(net())
    watched = Watched(model, sample_every=2)  # updates 1, 3, 5 are scanned
    origins = []
    for number in range(1, 6):
        update(model, (0,) if number in (2, 5) else ())
        watched.collect()
        origins.append(watched.origins()[0])
    say("sampled", updates=watched.updates, origins=origins)
    watched.monitor.close()


def main() -> None:
    dist.init_process_group("gloo")
    for flavour in FLAVOURS:
        accumulation(flavour)
    attached("attached", "step", bad_pass=0)
    attached("attached/last", "step", bad_pass=1)
    attached("attached/backward", "backward", bad_pass=1)
    attached("attached/bucket_view", "step", bad_pass=1, gradient_as_bucket_view=True)
    buckets()
    for flavour in ("DistributedDataParallel", "FullyShardedDataParallel", "fully_shard"):
        again(flavour)
    for when in ("before", "after"):
        custom_reduce_scatter(when)
    flat("flat/kept", use_orig_params=True)
    flat("flat/flattened", use_orig_params=False)
    sampled()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
