"""Both FSDP flavours on the CPU (gloo) for the distributed tests; start it with torchrun.

Usage: torchrun --nproc_per_node 2 fsdp_trainer.py BAD_RANK

For ``fully_shard`` and for the older ``FullyShardedDataParallel`` wrapper, each
rank trains one healthy update and then one in which BAD_RANK alone has a NaN in
its input batch, watched as users write it, ``GradMonitor(fsdp_model)``. Each
rank prints one JSON line per flavour: its layers and, per update, its own
(pre-reduction) NaN count, the NaN count of its shard after the
reduction, and whether the NaN originated on it. Then, with ``fully_shard``,
BAD_RANK alone finds a NaN in its shard after the reduction, and every rank
asks whether it may save a checkpoint (``all_ranks=True``): one more line per
rank with its own health and the answer.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

import gradtel


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def fully_sharded() -> nn.Module:
    model = net()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def wrapped() -> nn.Module:
    return FullyShardedDataParallel(net(), use_orig_params=True, device_id=torch.device("cpu"))


def main() -> None:
    bad_rank = int(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for flavour, build in (("fully_shard", fully_sharded), ("FullyShardedDataParallel", wrapped)):
        model = build()
        registry = CollectorRegistry()
        monitor = gradtel.GradMonitor(
            model, meter_provider=gradtel.prometheus_meter_provider(registry), on_critical="ignore"
        )
        updates = []
        for bad in (False, True):
            x = torch.randn(4, 4)
            if bad and rank == bad_rank:
                x[1, 2] = float("nan")
            model.zero_grad()
            model(x).sum().backward()
            health = monitor.collect()
            updates.append(
                {
                    "nan": health.nan_total,
                    "local_nan": health.local_nan_total,
                    "originated": health.originated_here,
                }
            )
        origin = registry.get_sample_value(
            "gradtel_origin_updates_total", {"kind": "nan", "rank": str(rank)}
        )
        said = {
            "rank": rank,
            "flavour": flavour,
            "layers": monitor.layers,
            "updates": updates,
            "origin_nan": origin,
        }
        # One write below PIPE_BUF is atomic: the ranks share the launcher's stdout.
        sys.stdout.write(json.dumps(said) + "\n")
        sys.stdout.flush()
        monitor.close()
    checkpoint_agreement(rank, bad_rank)
    dist.destroy_process_group()


def checkpoint_agreement(rank: int, bad_rank: int) -> None:
    model = fully_sharded()
    monitor = gradtel.GradMonitor(
        model, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry())
    )
    model(torch.randn(4, 4)).sum().backward()
    if rank == bad_rank:
        model[0].weight.grad.to_local().view(-1)[0] = float("nan")
    monitor.collect()
    said = {
        "rank": rank,
        "healthy": monitor.healthy,
        "allowed": monitor.allow_checkpoint(all_ranks=True),
    }
    sys.stdout.write(json.dumps(said) + "\n")
    sys.stdout.flush()
    monitor.close()


if __name__ == "__main__":
    main()
