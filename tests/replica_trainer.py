"""A DDP training run whose rank 3 drifts, for the replica-check test; start it with torchrun.

Usage: torchrun --nproc_per_node 4 replica_trainer.py BASE_PORT CHECK_EVERY GO_FILE

Each rank trains a DDP-wrapped model on the CPU (gloo), watched with
``GradMonitor(ddp_model, replica_check_every=CHECK_EVERY)``, and serves gradtel on
BASE_PORT + LOCAL_RANK. Once GO_FILE exists (the test creates it when every rank's
fingerprint has been scraped), rank 3 alone adds 1e-3 to one element of its parameters
right after an ``optimizer.step()``, as silent data corruption would, and prints
``corrupted UPDATE TIME``. Nothing turns NaN: DDP keeps averaging the same gradients into
every replica, and rank 3's parameters stay apart from the others'.
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

BAD_RANK = 3


def main() -> None:
    base_port, check_every, go_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(DemoNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradtel.GradMonitor(model, replica_check_every=check_every)
    server = gradtel.serve(port=base_port)
    # One write below PIPE_BUF is atomic: the ranks share the launcher's stdout.
    sys.stdout.write(f"rank {rank} serving {server.url}\n")
    sys.stdout.flush()
    torch.manual_seed(rank)
    for update in range(1, 100_000):
        inputs, targets = torch.randn(32, 16), torch.randn(32, 1)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        monitor.collect()
        optimizer.step()
        if rank == BAD_RANK and go_file and os.path.exists(go_file):
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] += 1e-3
            sys.stdout.write(f"corrupted {update} {time.time()}\n")
            sys.stdout.flush()
            go_file = ""  # once
        time.sleep(0.05)


if __name__ == "__main__":
    main()
