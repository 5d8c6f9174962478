"""Load and soak: training while concurrent clients scrape /metrics.

    .venv/bin/python benchmarks/bench_load.py [--clients 20] [--seconds 30] [--updates 100000]

Trains the demo model (forward, backward, collect, step) in this process while
``--clients`` separate processes scrape the endpoint as fast as they can for
``--seconds``. Reports scrape latency percentiles and failures, the step time
with and without scraping (ratio from one run), and resident memory at the
start and the end of ``--updates`` updates.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry

import gradtel
from gradtel.tools.demo import DemoNet

CLIENT = textwrap.dedent(
    """
    import json, sys, time, urllib.request
    url, seconds = sys.argv[1], float(sys.argv[2])
    latencies, failures = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                response.read()
            latencies.append(time.monotonic() - started)
        except Exception:
            failures += 1
    print(json.dumps({"latencies": latencies, "failures": failures}))
    """
)


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def soak(clients: int, seconds: float, updates: int) -> dict[str, Any]:
    """Train ``updates`` updates; scrape with ``clients`` processes during ``seconds`` of them."""
    torch.manual_seed(0)
    registry = CollectorRegistry()
    provider = gradtel.prometheus_meter_provider(registry)
    model = DemoNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, on_warning="skip", on_critical="skip"
    )
    server = gradtel.serve(port=0, registry=registry, exit_grace=0)
    inputs, targets = torch.randn(64, 16), torch.randn(64, 1)
    done = 0

    def train(count: int) -> float:
        """Seconds per update over ``count`` updates (0.0 for none)."""
        nonlocal done
        if count <= 0:  # the loaded phase may already have trained past the total
            return 0.0
        started = time.perf_counter()
        for _ in range(count):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            monitor.collect()
            optimizer.step()
        done += count
        return (time.perf_counter() - started) / count

    try:
        train(2000)  # warm-up
        rss_start = rss_mib()
        quiet = train(5000)
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, server.url or "", str(seconds)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(clients)
        ]
        loaded_steps: list[float] = []
        while any(p.poll() is None for p in processes):
            loaded_steps.append(train(200))
        results = [json.loads(p.communicate()[0]) for p in processes]
        train(max(0, updates - done))
        rss_end = rss_mib()
    finally:
        server.close(grace=0)
    latencies = [lat for r in results for lat in r["latencies"]]
    return {
        "clients": clients,
        "seconds": seconds,
        "updates": done,
        "scrapes": len(latencies),
        "failed_scrapes": sum(r["failures"] for r in results),
        "scrape_ms": {
            "p50": percentile(latencies, 0.5) * 1e3,
            "p90": percentile(latencies, 0.9) * 1e3,
            "p99": percentile(latencies, 0.99) * 1e3,
            "max": max(latencies, default=float("nan")) * 1e3,
        },
        "step_ms_quiet": quiet * 1e3,
        "step_ms_scraped": statistics.median(loaded_steps) * 1e3 if loaded_steps else float("nan"),
        "rss_mib_start": rss_start,
        "rss_mib_end": rss_end,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--updates", type=int, default=100_000)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "load.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # leave a core to the scrapers, as on a node that trains and serves
    result = soak(args.clients, args.seconds, args.updates)
    s = result["scrape_ms"]
    print(
        f"{result['clients']} clients for {result['seconds']:g}s: {result['scrapes']} scrapes, {result['failed_scrapes']} failed"
    )
    print(
        f"scrape latency ms: p50 {s['p50']:.1f}  p90 {s['p90']:.1f}  p99 {s['p99']:.1f}  max {s['max']:.1f}"
    )
    ratio = result["step_ms_scraped"] / result["step_ms_quiet"]
    print(
        f"training step ms: {result['step_ms_quiet']:.3f} quiet, {result['step_ms_scraped']:.3f} while scraped ({ratio:.2f}x)"
    )
    print(
        f"resident memory MiB over {result['updates']} updates: {result['rss_mib_start']:.1f} -> {result['rss_mib_end']:.1f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
