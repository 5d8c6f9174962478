"""What the replica check costs per update at its default ``replica_check_every``, as a
share of a healthy ``collect()``, in one run.

Run from a checkout (after `bash scripts/setup.sh`):

    .venv/bin/python benchmarks/bench_fingerprint.py [--repeats 25]

A check hashes every parameter once (``gradtel.pipeline.fingerprint.fingerprint``, what
``collect()`` runs on a check update, besides setting two gauges); it runs one update in
``DEFAULT_REPLICA_CHECK_EVERY``, so its average cost per update is its time divided by
that. Methods interleaved round-robin; medians in milliseconds. For comparison, the same
check with ``torch.hash_tensor`` (torch 2.9 and later) in place of gradtel's wrapping
same-width sum of the bit patterns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_grad_norm import convolutions, with_gradients
from bench_scan import measure_all
from models import GPT2Small, many_linears

import gradtel
from gradtel.options import DEFAULT_REPLICA_CHECK_EVERY
from gradtel.pipeline import fingerprint as fp


def with_hash_tensor(params: list[torch.Tensor]) -> int:
    """The check with ``torch.hash_tensor`` for the per-tensor word."""
    word = fp.tensor_word
    fp.tensor_word = lambda t: torch.hash_tensor(t.view(fp._INTS[t.element_size()]))  # type: ignore[attr-defined]
    try:
        return fp.fingerprint(params)
    finally:
        fp.tensor_word = word


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    n = DEFAULT_REPLICA_CHECK_EVERY
    workloads = {
        "300 x Linear(128)": many_linears(),
        "GPT-2-small shape, fp32": GPT2Small(),
        "6 x Conv2d(64), channels_last": convolutions(),
    }
    hashed = hasattr(torch, "hash_tensor")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
        f"{args.repeats}, interleaved; replica_check_every={n}"
    )
    print(
        "| workload | `collect()` (ms) | check (ms) | check per update, share of `collect()` "
        "| check with `hash_tensor` (ms) | per update, share |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, model in workloads.items():
        with_gradients(model)
        params = list(model.parameters())
        provider = gradtel.prometheus_meter_provider(CollectorRegistry())
        monitor = gradtel.GradMonitor(model, meter_provider=provider)
        methods = {
            "collect": monitor.collect,
            "check": lambda params=params: fp.fingerprint(params),
        }
        if hashed:
            methods["hash"] = lambda params=params: with_hash_tensor(params)
        timing = measure_all(methods, args.repeats)
        collect = timing["collect"].median * 1e3
        check = timing["check"].median * 1e3
        hash_ms = timing["hash"].median * 1e3 if hashed else float("nan")
        print(
            f"| {name} | {collect:.2f} | {check:.2f} | {check / n / collect:.2%} | "
            f"{hash_ms:.2f} | {hash_ms / n / collect:.2%} |"
        )
        monitor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
