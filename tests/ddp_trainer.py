"""A DDP training run for the distributed tests; start it with torchrun.

Usage: torchrun --nproc_per_node N ddp_trainer.py BASE_PORT BAD_RANK GO_FILE

Each rank trains a DDP-wrapped model on the CPU (gloo), watched as users write
it, ``GradMonitor(ddp_model)``, and serves gradtel on BASE_PORT + LOCAL_RANK.
Once GO_FILE exists (the test creates it when every rank has been scraped),
rank BAD_RANK alone gets one NaN in the input batch of its next update and
prints ``injected UPDATE TIME``; the all-reduce spreads it to every rank.
BAD_RANK raises on it (the run dies there, and torchrun stops the other ranks
with SIGTERM); the others skip the update and train on.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gradtel
from gradtel.tools.demo import DemoNet


def main() -> None:
    base_port, bad_rank, go_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(DemoNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    policy = "raise" if rank == bad_rank else "skip"
    monitor = gradtel.GradMonitor(model, on_warning=policy, on_critical=policy)
    server = gradtel.serve(port=base_port)
    # One write below PIPE_BUF is atomic: the ranks share the launcher's stdout.
    sys.stdout.write(f"rank {rank} serving {server.url}\n")
    sys.stdout.flush()
    torch.manual_seed(rank)
    for update in range(1, 100_000):
        inputs, targets = torch.randn(32, 16), torch.randn(32, 1)
        if rank == bad_rank and os.path.exists(go_file):
            inputs[3, 5] = float("nan")  # one bad sample in this rank's batch
            sys.stdout.write(f"injected {update} {time.time()}\n")
            sys.stdout.flush()
            go_file = ""  # once
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        monitor.collect(loss=loss)
        optimizer.step()
        time.sleep(0.1)


if __name__ == "__main__":
    main()
