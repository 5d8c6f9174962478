"""Each rank's own gradient norm before the reduction against a plain reference, for the
distributed tests; start it with torchrun.

Usage: torchrun --nproc_per_node N local_norm_trainer.py

Each rank trains a DDP model (small buckets: several reductions per update) on a batch
of its own, and a plain copy of the same weights on the same batch: the copy's gradients
are this rank's own, never reduced. Each rank prints one JSON line per scenario with
gradtel's local norm and the copy's norm, per update:

- ``plain``: one backward pass per update;
- ``no_sync``: two backward passes per update, the first in ``no_sync()``.
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


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def norm_of(model: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))


def scenario(name: str, passes: int, rank: int) -> None:
    ddp, copy = DistributedDataParallel(net(), bucket_cap_mb=1e-4), net()
    provider = gradtel.prometheus_meter_provider(CollectorRegistry())
    monitor = gradtel.GradMonitor(ddp, meter_provider=provider)
    torch.manual_seed(100 + rank)
    updates = []
    for _ in range(3):
        ddp.zero_grad()
        copy.zero_grad()
        for i in range(passes):
            x = torch.randn(16, 4) * (rank + 1)  # the ranks' norms differ
            copy(x).sum().backward()
            if i < passes - 1:
                with ddp.no_sync():
                    ddp(x).sum().backward()
            else:
                ddp(x).sum().backward()
        updates.append({"local": monitor.collect().local_grad_norm, "own": norm_of(copy)})
    # One write below PIPE_BUF is atomic: the ranks share the launcher's stdout.
    sys.stdout.write(json.dumps({"scenario": name, "rank": rank, "updates": updates}) + "\n")
    sys.stdout.flush()
    monitor.close()


def main() -> None:
    dist.init_process_group("gloo")
    for name, passes in (("plain", 1), ("no_sync", 2)):
        scenario(name, passes, dist.get_rank())
    dist.barrier()  # no rank leaves while another still reduces
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
