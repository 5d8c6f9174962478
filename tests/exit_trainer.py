"""A training script that ends on gradtel's checkpoint agreement and exits; start it with
torchrun (gloo, CPU).

Usage: torchrun --nproc_per_node N exit_trainer.py AGREEMENTS

Each rank trains one update of a plain model and asks AGREEMENTS times whether every
rank may save a checkpoint (``allow_checkpoint(all_ranks=True)``, a collective), the
last time right before it returns, holding the process group as a DDP or FSDP model
does, so that gloo's worker threads are still alive while the interpreter finalizes.
A worker thread lets go of a collective's tensor only once it holds the GIL; one that
still holds it then aborts the process (``terminate called without an active
exception``). A long GIL switch interval stands for a busy training thread, which
lets the GIL go only when it waits. Each rank prints how many agreements returned
while gloo still held gradtel's tensor, and the process must exit 0.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel

reduced: list[torch.Tensor] = []
_all_reduce = dist.all_reduce


def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """torch's, keeping the tensor in sight."""
    reduced.append(tensor)
    return _all_reduce(tensor, *args, **kwargs)


def main() -> None:
    agreements = int(sys.argv[1])
    sys.setswitchinterval(30)
    dist.init_process_group("gloo")
    group = dist.group.WORLD  # kept, as a DDP or FSDP model keeps it
    dist.all_reduce = all_reduce
    model = nn.Linear(4, 1)
    monitor = gradtel.GradMonitor(
        model, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry())
    )
    model(torch.randn(4, 4)).sum().backward()
    monitor.collect()
    held = 0
    for _ in range(agreements - 1):
        monitor.allow_checkpoint(all_ranks=True)
        held += reduced.pop()._use_count() > 1  # type: ignore[attr-defined]  # one is its Python object's
    said = {
        "rank": dist.get_rank(),
        "ranks": dist.get_world_size(group),
        "held": held,
        "agreements": agreements - 1,
    }
    sys.stdout.write(json.dumps(said) + "\n")
    sys.stdout.flush()
    monitor.allow_checkpoint(all_ranks=True)  # the last thing before the exit


if __name__ == "__main__":
    main()
