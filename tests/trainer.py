"""A training process instrumented with gradtel, for the end-to-end tests.

Usage: trainer.py PORT [--inject UPDATE:KIND:COUNT:LAYER ...] [--on-critical ACTION]
                  [--grad-norm] [--spike UPDATE:FACTOR] [--readout deferred]

Trains a small MLP with real backward passes, one update every 0.1 s, until
killed; ``--inject`` writes COUNT NaN or Inf values into LAYER's weight
gradient on update UPDATE and prints ``injected UPDATE UNIX_TIME``.
``--grad-norm`` exports the gradient norm; ``--spike`` multiplies update
UPDATE's loss, and so its gradients, by FACTOR (and prints ``injected``);
``--readout deferred`` reads each update out without blocking (its actions: warn).
"""

from __future__ import annotations

import argparse
import time

import torch

import gradtel
from gradtel.tools.demo import DemoNet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--inject", action="append", default=[])
    parser.add_argument("--on-critical", default="skip")
    parser.add_argument("--grad-norm", action="store_true")
    parser.add_argument("--spike", default="0:1")
    parser.add_argument("--readout", default="sync")
    args = parser.parse_args()
    injections = {}
    for spec in args.inject:
        update, kind, count, layer = spec.split(":")
        injections[int(update)] = (kind, int(count), layer)

    model = DemoNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    spike_update, spike_factor = (float(v) for v in args.spike.split(":"))
    deferred = args.readout == "deferred"  # it cannot skip: the answer comes after the step
    monitor = gradtel.GradMonitor(
        model,
        on_warning="warn" if deferred else "skip",
        on_critical="warn" if deferred else args.on_critical,
        grad_norm=args.grad_norm,
        readout=args.readout,
    )
    gradtel.serve(port=args.port)
    print("serving", flush=True)
    inputs, targets = torch.randn(64, 16), torch.randn(64, 1)
    update = 0
    while True:
        update += 1
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        if update == spike_update:
            loss = loss * spike_factor
            print(f"injected {update} {time.time()}", flush=True)
        loss.backward()
        if update in injections:
            kind, count, layer = injections[update]
            grad = model.get_submodule(layer).weight.grad
            grad.view(-1)[:count] = float("nan") if kind == "nan" else float("inf")
            print(f"injected {update} {time.time()}", flush=True)
        monitor.collect()
        optimizer.step()
        time.sleep(0.1)


if __name__ == "__main__":
    main()
