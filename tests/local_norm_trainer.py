"""Each rank's own gradient norm before the reduction against a plain reference, for the
distributed tests; start it with torchrun.

Usage: torchrun --nproc_per_node N local_norm_trainer.py

Each rank trains a DDP model (small buckets: several reductions per update) on a batch
of its own, and a plain copy of the same weights on the same batch: the copy's gradients
are this rank's own, never reduced. Each rank prints one JSON line per scenario with
gradtel's local norm and the copy's norm, per update:

- ``plain``: one backward pass per update;
- ``no_sync``: two backward passes per update, the first in ``no_sync()``;
- ``each``: two backward passes per update, each reduced: the second's buckets hold every
  rank's reduced values, so the own norm is the first pass's;
- ``subgroup``: DDP over a group of this rank alone (as one data-parallel group among
  model-parallel ones): the reduced gradients must stay this rank's own, and the line
  says how far they are from the copy's.
"""

from __future__ import annotations

import json
import math
import sys

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradtel
from gradtel.pipeline.fingerprint import replica_check


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def norm_of(model: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))


def scenario(
    name: str, passes: int, rank: int, *, each: bool = False, group: object = None
) -> None:
    ddp = DistributedDataParallel(net(), bucket_cap_mb=1e-4, process_group=group)
    copy = net()
    provider = gradtel.prometheus_meter_provider(CollectorRegistry())
    monitor = gradtel.GradMonitor(ddp, meter_provider=provider)
    torch.manual_seed(100 + rank)
    updates = []
    for _ in range(3):
        ddp.zero_grad()
        copy.zero_grad()
        own = 0.0
        for i in range(passes):
            x = torch.randn(16, 4) * (rank + 1)  # the ranks' norms differ
            copy(x).sum().backward()
            if i < passes - 1 and not each:
                with ddp.no_sync():
                    ddp(x).sum().backward()
            else:
                ddp(x).sum().backward()
            if i == 0 or not each:
                own = norm_of(copy)
        apart = max(
            float((a.grad - b.grad).abs().max())
            for a, b in zip(ddp.parameters(), copy.parameters())
        )
        health = monitor.collect()
        updates.append({"local": health.local_grad_norm, "own": own, "apart": apart})
    # One write below PIPE_BUF is atomic: the ranks share the launcher's stdout.
    # The replica check compares every rank of a run: off for DDP over a sub-group.
    checks = replica_check(ddp, 250)
    line = {"scenario": name, "rank": rank, "updates": updates, "replica_check": checks}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    monitor.close()


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name, passes in (("plain", 1), ("no_sync", 2)):
        scenario(name, passes, rank)
    scenario("each", 2, rank, each=True)
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank makes each
    scenario("subgroup", 1, rank, group=alone[rank])
    dist.barrier()  # no rank leaves while another still reduces
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
