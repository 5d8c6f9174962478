"""An fp16 training process with a real ``GradScaler`` and autocast on the CPU, for the
loss-scale tests.

Usage: amp_trainer.py PORT [--diverge UPDATE]

One update every 0.05 s, until killed. From update UPDATE on, the weights have diverged
and every loss is NaN: each update overflows, the scaler skips its step and halves its
scale, down to 0. It prints ``serving``, then ``diverged UNIX_TIME`` at that update.
"""

from __future__ import annotations

import argparse
import time

import torch

import gradtel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--diverge", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    monitor = gradtel.GradMonitor(model)
    gradtel.serve(port=args.port)
    print("serving", flush=True)
    inputs, targets = torch.randn(64, 16), torch.randn(64, 1)
    update = 0
    while True:
        update += 1
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(inputs).float(), targets)
        if update == args.diverge:
            print(f"diverged {time.time()}", flush=True)
        if args.diverge and update >= args.diverge:
            loss = loss * float("nan")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        monitor.collect(scaler=scaler, loss=loss)
        scaler.step(optimizer)
        scaler.update()
        time.sleep(0.05)


if __name__ == "__main__":
    main()
