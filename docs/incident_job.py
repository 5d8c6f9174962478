"""A small 2-rank DDP training on the CPU (gloo) whose incident record draws
docs/incidents.png; docs/make_pictures.py starts it with torchrun and
``GRADTEL_INCIDENT_LOG`` set, so each rank writes its own file.

Rank 0 gets a NaN in its input at step 112 (critical), rank 1 puts 3 Inf into the
head's gradient at step 125 (warning), rank 0 a NaN again at step 133; gradtel skips
each of those updates (``"skip"``), so training goes on with healthy weights.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradtel

NAN_INPUT = {112: 0, 133: 0}
"""Step: the rank whose input batch holds a NaN."""
INF_GRADIENT = {125: 1}
"""Step: the rank that puts Inf into its own gradient of the head."""


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(
            embed=nn.Linear(16, 32),
            act1=nn.ReLU(),
            hidden=nn.Linear(32, 32),
            act2=nn.ReLU(),
            head=nn.Linear(32, 1),
        )
    )
    model = DistributedDataParallel(net)
    poison = torch.zeros(())
    first_three = torch.arange(32) < 3
    net.head.weight.register_hook(lambda grad: torch.where(first_three, grad + poison, grad))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    target = torch.randn(16, 1)
    monitor = gradtel.GradMonitor(
        model,
        meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()),
        on_warning="skip",
        on_critical="skip",
        grad_norm=True,
    )
    torch.manual_seed(1 + rank)
    for step in range(101, 141):
        optimizer.zero_grad()
        x = torch.randn(8, 16)
        if NAN_INPUT.get(step) == rank:
            x[0, :4] = float("nan")
        poison.fill_(float("inf") if INF_GRADIENT.get(step) == rank else 0.0)
        loss = (model(x) - x @ target).pow(2).mean()
        loss.backward()
        monitor.collect(step=step, loss=loss)
        optimizer.step()
    monitor.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
