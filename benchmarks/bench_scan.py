"""What gradtel costs per update, next to what it replaces and what a step costs.

Run from a checkout (after `bash scripts/setup.sh`):

    .venv/bin/python benchmarks/bench_scan.py [--quick] [--json benchmarks/results/scan.json]

Everything runs in one process with torch.set_num_threads(2); each method is
repeated many times after warm-up and reported as median and min. Machines are
noisy: absolute times drift, ratios measured in one run hold.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import GPT2Small, many_linears

import gradtel
from gradtel.export.telemetry import GradTelemetry
from gradtel.health import GradHealth

NAN, INF = float("nan"), float("inf")


@dataclass
class Timing:
    median: float
    min: float

    def __str__(self) -> str:
        return f"{self.median * 1e3:9.3f} {self.min * 1e3:9.3f}"


def measure(work: Callable[[], object], repeats: int, warmup: int = 3) -> Timing:
    return measure_all({"work": work}, repeats, warmup)["work"]


def measure_all(
    methods: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, Timing]:
    """Time each method ``repeats`` times, round-robin, so that a slow spell of a
    noisy machine hits every method alike and their ratios stay fair. Each round
    runs them in a new order (seeded), so that no method always runs after the same
    one and finds the caches as that one left them: a method that follows itself
    (or one running the same code) can look twice as fast."""
    for work in methods.values():
        for _ in range(warmup):
            work()
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods.items())
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name, work in order:
            started = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - started)
    return {name: Timing(statistics.median(t), min(t)) for name, t in times.items()}


def original_per_layer(model: nn.Module) -> Callable[[], object]:
    """The original design: per layer, isnan/isinf sums read to the host one by one."""
    layers = [
        m for m in model.modules() if any(p.grad is not None for p in m.parameters(recurse=False))
    ]

    def scan() -> tuple[int, int]:
        nan = inf = 0
        for layer in layers:
            flat = torch.cat([p.grad.reshape(-1) for p in layer.parameters(recurse=False)])
            nan += int(torch.isnan(flat).sum().item())
            inf += int(torch.isinf(flat).sum().item())
        return nan, inf

    return scan


def poison(model: nn.Module, layers: list[str]) -> dict[str, tuple[int, int]]:
    """Write 10 non-finite values spread over 3 layers; returns the expected (nan, inf) per layer."""
    plan = {layers[0]: (4, 0), layers[1]: (0, 3), layers[2]: (2, 1)}
    for layer, (nan, inf) in plan.items():
        grad = model.get_submodule(layer).weight.grad
        flat = grad.view(-1)
        stride = max(1, flat.numel() // 8)
        for k in range(nan):
            flat[k * stride] = NAN
        for k in range(inf):
            flat[(nan + k) * stride + 1] = INF if k % 2 == 0 else -INF
    return plan


def bench_workload(
    name: str, model: nn.Module, step: Callable[[], None], bad_layers: list[str], quick: bool
) -> dict[str, object]:
    repeats = 5 if quick else 25
    model.zero_grad(set_to_none=False)
    step()
    step_time = measure(step, repeats=2 if quick else 3, warmup=1)
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    registry = CollectorRegistry()
    monitor = gradtel.GradMonitor(
        model,
        meter_provider=gradtel.prometheus_meter_provider(registry),
        on_warning="ignore",
        on_critical="ignore",
    )
    values = list(grads)
    below = 0.5 * nn.utils.get_total_norm(grads).item()
    key = tuple(range(len(values)))
    numel = sum(g.numel() for g in grads)
    buffer = torch.randn(numel).to(grads[0].dtype)
    found_inf = torch.zeros(1)
    inv_scale = torch.ones(1)

    def amp_check() -> None:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)

    sampled = gradtel.GradMonitor(
        model, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()),
        sample_every=10,
    )  # fmt: skip
    methods: dict[str, Callable[[], object]] = {
        "collect()": monitor.collect,
        "scan alone": lambda: monitor._stage.scanner.count(values, key),
        "get_total_norm": lambda: nn.utils.get_total_norm(grads),
        "memory floor (one sum)": buffer.sum,
        # Clipping that clips (half the norm): under max_norm gradtel also saves torch's pass.
        "clip_grad_norm_ (torch)": lambda: nn.utils.clip_grad_norm_(params, below),
        "clip_grad_norm_ + health": lambda: gradtel.clip_grad_norm_(params, below, monitor=monitor),
        "collect(), sample_every=10": sampled.collect,
        "original per-layer": original_per_layer(model),
    }
    if grads[0].dtype in (torch.float16, torch.float32, torch.float64):
        methods["AMP non-finite check"] = amp_check
    rows = measure_all(methods, repeats)
    rows["forward+backward step"] = step_time

    saved = [g.clone() for g in grads]
    expected = poison(model, bad_layers)
    health = monitor.collect()
    got = {
        layer: (health.nan_by_layer.get(layer, 0), health.inf_by_layer.get(layer, 0))
        for layer in expected
    }
    exact = got == expected and health.nan_total == 6 and health.inf_total == 4
    poisoned = [g.clone() for g in grads]

    # Healthy and unhealthy collect(), interleaved on the same gradient memory.
    times: dict[str, list[float]] = {"healthy": [], "unhealthy": []}
    for _ in range(repeats):
        for case, source in (("healthy", saved), ("unhealthy", poisoned)):
            for grad, data in zip(grads, source):
                grad.copy_(data)
            started = time.perf_counter()
            monitor.collect()
            times[case].append(time.perf_counter() - started)
    rows["collect(), healthy (paired)"] = Timing(
        statistics.median(times["healthy"]), min(times["healthy"])
    )
    rows["collect(), unhealthy"] = Timing(
        statistics.median(times["unhealthy"]), min(times["unhealthy"])
    )
    for grad, clean in zip(grads, saved):
        grad.copy_(clean)

    print(
        f"\n== workload {name}: {len(grads)} gradient tensors, {numel / 1e6:.1f}M elements, {grads[0].dtype}"
    )
    print(f"{'method':32} {'median ms':>9} {'min ms':>9}")
    for method, timing in rows.items():
        print(f"{method:32} {timing}")
    print(f"unhealthy counts exact per layer: {exact} ({got})")
    return {
        "rows": {k: vars(v) for k, v in rows.items()},
        "exact": exact,
        "tensors": len(grads),
        "elements": numel,
    }


def gpt2_step(model: nn.Module, dtype: torch.dtype, batch: int, tokens: int) -> Callable[[], None]:
    ids = torch.randint(0, 50257, (batch, tokens))

    def step() -> None:
        model.zero_grad(set_to_none=False)
        logits = model(ids)
        nn.functional.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), ids.view(-1)
        ).backward()

    return step


def linears_step(model: nn.Module) -> Callable[[], None]:
    x = torch.randn(64, 128)

    def step() -> None:
        model.zero_grad(set_to_none=False)
        model(x).pow(2).mean().backward()

    return step


def bench_telemetry(layers: int, quick: bool) -> dict[str, float]:
    registry = CollectorRegistry()
    provider = gradtel.prometheus_meter_provider(registry)
    names = [f"blocks.{i}" for i in range(layers)]
    telemetry = GradTelemetry(names, meter_provider=provider, attributes={}, start_time=time.time())
    healthy = GradHealth(scanned=2 * layers)

    def record() -> None:
        telemetry.record(healthy, duration=1e-3, timestamp=time.time(), sequence=1)

    recording = measure(record, 2000 if not quick else 200)
    with gradtel.serve(port=0, registry=registry, exit_grace=0) as server:
        url = server.url or ""

        def scrape_after_update() -> None:
            record()  # every scrape sees new data, as during training
            urllib.request.urlopen(url).read()

        scrape = measure(scrape_after_update, 100 if not quick else 10)
    print(
        f"\n== {layers} layers: telemetry record of a healthy update {recording.median * 1e3:.3f} ms "
        f"(min {recording.min * 1e3:.3f}); /metrics scrape after an update: median "
        f"{scrape.median * 1e3:.1f} ms (min {scrape.min * 1e3:.1f})"
    )
    return {"record_ms": recording.median * 1e3, "scrape_ms": scrape.median * 1e3}


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def bench_memory(calls: int) -> dict[str, float]:
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(8)])
    model(torch.randn(4, 32)).sum().backward()
    monitor = gradtel.GradMonitor(
        model, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()),
        on_warning="ignore", on_critical="ignore",
    )  # fmt: skip
    warmup = calls // 10
    bad = model[3].weight.grad
    for i in range(calls):
        if i == warmup:
            gc.collect()
            start = rss_mib()
        if i % 100 == 0:  # an unhealthy update now and then
            bad[0, 0] = NAN
        monitor.collect()
        if i % 100 == 0:
            bad[0, 0] = 0.0
    gc.collect()
    end = rss_mib()
    print(
        f"\n== {calls} collect() calls: resident memory {start:.1f} MiB after {warmup} (warm-up), {end:.1f} MiB at the end ({end - start:+.2f} MiB)"
    )
    return {"start_mib": start, "end_mib": end}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions, smaller step (a smoke run)"
    )
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "scan.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, gradtel {gradtel.__version__}"
    )

    results: dict[str, object] = {}
    a = many_linears()
    results["A"] = bench_workload(
        "A (300 x Linear(128,128))", a, linears_step(a), ["0", "150", "299"], args.quick
    )
    batch, tokens = (1, 64) if args.quick else (4, 512)
    print(f"\nB: GPT-2-small shape, forward+backward on {batch} x {tokens} tokens")
    b = GPT2Small()
    bad_b = ["wte", "h.5.mlp.c_fc", "h.11.ln_2"]
    results["B fp32"] = bench_workload(
        "B fp32", b, gpt2_step(b, torch.float32, batch, tokens), bad_b, args.quick
    )
    b = b.to(torch.bfloat16)
    results["B bf16"] = bench_workload(
        "B bf16", b, gpt2_step(b, torch.bfloat16, batch, tokens), bad_b, args.quick
    )
    del b
    gc.collect()
    results["1000 layers"] = bench_telemetry(1000, args.quick)
    results["memory"] = bench_memory(10_000 if args.quick else 100_000)
    if args.quick:
        print(
            "\n(--quick: few repetitions and a tiny step; the targets below mean something only in a full run)"
        )
    results["targets"] = check_targets(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


def check_targets(results: dict[str, object]) -> list[dict[str, object]]:
    def med(workload: str, method: str) -> float:
        return results[workload]["rows"][method]["median"]  # type: ignore[index, no-any-return]

    checks = []

    def check(what: str, value: float, limit: float, *, at_least: bool = False) -> None:
        ok = value >= limit if at_least else value <= limit
        checks.append({"target": what, "value": round(value, 4), "limit": limit, "ok": ok})

    for b in ("B fp32", "B bf16"):
        c = med(b, "collect()")
        check(f"{b} healthy: collect() / memory floor", c / med(b, "memory floor (one sum)"), 1.2)
        check(f"{b} healthy: collect() / get_total_norm", c / med(b, "get_total_norm"), 1.0)
        check(
            f"{b} healthy: collect() / forward+backward step",
            c / med(b, "forward+backward step"),
            0.01,
        )
        check(
            f"{b}: clip+health / clip alone",
            med(b, "clip_grad_norm_ + health") / med(b, "clip_grad_norm_ (torch)"),
            1.1,
        )
    a = "A"
    check(
        "A healthy: original per-layer / collect()",
        med(a, "original per-layer") / med(a, "collect()"),
        8.0,
        at_least=True,
    )
    check(
        "A healthy: collect() / get_total_norm", med(a, "collect()") / med(a, "get_total_norm"), 1.0
    )
    check(
        "A: clip+health / clip alone",
        med(a, "clip_grad_norm_ + health") / med(a, "clip_grad_norm_ (torch)"),
        1.1,
    )
    for w in ("A", "B fp32", "B bf16"):
        check(
            f"{w} unhealthy / healthy collect()",
            med(w, "collect(), unhealthy") / med(w, "collect(), healthy (paired)"),
            1.5,
        )
        check(
            f"{w} unhealthy counts exact per layer", float(results[w]["exact"]), 1.0, at_least=True
        )  # type: ignore[index]
    layers = results["1000 layers"]
    check("1000 layers: telemetry record, healthy (ms)", layers["record_ms"], 0.2)  # type: ignore[index]
    check("1000 layers: /metrics scrape median (ms)", layers["scrape_ms"], 50.0)  # type: ignore[index]
    memory = results["memory"]
    check(
        "collect() x N: resident memory growth after warm-up (MiB)",
        memory["end_mib"] - memory["start_mib"],
        1.0,
    )  # type: ignore[index]

    print("\n== targets")
    for c in checks:
        print(
            f"{'PASS' if c['ok'] else 'FAIL'}  {c['target']:58} {c['value']:>10} (limit {c['limit']})"
        )
    return checks


if __name__ == "__main__":
    main()
