"""A small DDP job on the CPU (gloo) for the incident record's test; start it with torchrun
on 2 ranks, with ``$GRADTEL_INCIDENT_LOG`` set: each rank writes its own file.

Usage: GRADTEL_INCIDENT_LOG=incidents.jsonl torchrun --nproc_per_node 2 incident_trainer.py

Steps are numbered from 101 as the script's own logs would; rank 0 alone has a NaN in its
input at step 103, rank 1 alone at step 105. After the all-reduce both ranks hold the NaN,
so both write each incident, and the record's ``origin`` says which rank it came from.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradtel

BAD = {103: 0, 105: 1}
"""Step: the rank whose input holds a NaN."""


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    monitor = gradtel.GradMonitor(
        model,
        meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()),
        on_warning="ignore",
        on_critical="ignore",
        grad_norm=True,
    )
    for step in range(101, 107):
        model.zero_grad()
        x = torch.randn(4, 4)
        if BAD.get(step) == dist.get_rank():
            x[0, 0] = float("nan")
        loss = model(x).pow(2).mean()
        loss.backward()
        monitor.collect(step=step, loss=loss)
    monitor.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
