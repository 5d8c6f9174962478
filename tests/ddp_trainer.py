"""A 2-rank DDP training run for the distributed tests; start it with torchrun.

Usage: torchrun --nproc_per_node 2 ddp_trainer.py BASE_PORT

Each rank trains a DDP-wrapped model on the CPU (gloo) and serves gradtel on
BASE_PORT + LOCAL_RANK. From update 30 on, rank 1 alone finds 4 NaN in
`head`'s gradient after the all-reduce (as a rank-local fault would look).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gradtel
from gradtel.demo import DemoNet


def main() -> None:
    base_port = int(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(DemoNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradtel.GradMonitor(model.module, on_warning="skip", on_critical="skip")
    server = gradtel.serve(port=base_port, exit_grace=0)
    # One write below PIPE_BUF is atomic: the two ranks share the launcher's stdout.
    sys.stdout.write(f"rank {rank} serving {server.url}\n")
    sys.stdout.flush()
    inputs, targets = torch.randn(32, 16), torch.randn(32, 1)
    for update in range(1, 100_000):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        if rank == 1 and update % 30 == 0:
            model.module.head.weight.grad.view(-1)[:4] = float("nan")
        monitor.collect()
        optimizer.step()
        time.sleep(0.1)


if __name__ == "__main__":
    main()
