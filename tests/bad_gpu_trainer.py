"""A DDP training run whose rank BAD_RANK's own gradients are bent, no NaN anywhere, as a
GPU with silent data corruption bends them; start it with torchrun.

Usage: torchrun --nproc_per_node N bad_gpu_trainer.py BASE_PORT BAD_RANK AFTER

Each rank trains a DDP-wrapped model on the CPU (gloo) on random batches of its own,
watched with ``GradMonitor(ddp_model)``, and serves gradtel on BASE_PORT + LOCAL_RANK.
AFTER seconds after it starts serving, rank BAD_RANK (-1: none) multiplies its loss,
and so its own gradients before the reduction, by 50 at every update, and prints
``corrupted UPDATE TIME``. The learning rate is small enough that the bent mean
gradient never makes a NaN.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gradtel
from gradtel.tools.demo import DemoNet

FACTOR = 50.0


def main() -> None:
    base_port, bad_rank, after = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(DemoNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    monitor = gradtel.GradMonitor(model)
    server = gradtel.serve(port=base_port)
    # One write below PIPE_BUF is atomic: the ranks share the launcher's stdout.
    sys.stdout.write(f"rank {rank} serving {server.url}\n")
    sys.stdout.flush()
    torch.manual_seed(rank)
    corrupt_at = time.monotonic() + after if rank == bad_rank else float("inf")
    for update in range(1, 1_000_000):
        inputs, targets = torch.randn(32, 16), torch.randn(32, 1)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        if time.monotonic() >= corrupt_at:
            if corrupt_at > 0:
                sys.stdout.write(f"corrupted {update} {time.time()}\n")
                sys.stdout.flush()
                corrupt_at = 0.0
            loss = loss * FACTOR
        loss.backward()
        monitor.collect(loss=loss)
        optimizer.step()
        time.sleep(0.1)


if __name__ == "__main__":
    main()
