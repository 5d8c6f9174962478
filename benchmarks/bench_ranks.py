"""A run of many ranks replayed through a real Prometheus and Alertmanager with the kit.

Run from a checkout (after `bash scripts/test.sh` has installed Prometheus):

    .venv/bin/python benchmarks/bench_ranks.py [--ranks 1024]

One process serves, for every simulated rank, the real ``/metrics`` body of a
gradtel process (taken from a real monitor, ``rank`` label rewritten) on its
own path; Prometheus scrapes each as a target (scrape every 5 s, as the shipped
kit does, evaluation every 1 s) with
the rendered rules, Alertmanager routes with the rendered config. After a
warm-up, every rank's body turns to that of a NaN update, with rank 2's origin
counter moved, as DDP's all-reduce would leave it. The script prints the rule
group's evaluation time before and during the incident, the pages delivered,
and the time from the injection to the page.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from prometheus_client import CollectorRegistry, generate_latest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

from bench_series import llama

import gradtel
from gradtel.tools.stack import Stack, StackTimings


def bodies() -> tuple[str, str, str]:
    """The /metrics text of a healthy rank, of a rank after a NaN update, and of the origin rank."""
    model = llama(80)  # a Llama-2-70B-shaped structure
    registry = CollectorRegistry()
    monitor = gradtel.GradMonitor(
        model, meter_provider=gradtel.prometheus_meter_provider(registry), on_critical="ignore"
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(5):
        monitor.collect()
    healthy = generate_latest(registry).decode()
    model.lm_head.weight.grad.fill_(float("nan"))
    model.norm.weight.grad.fill_(float("nan"))  # 6 NaN: critical
    monitor.collect()
    bad = generate_latest(registry).decode()
    origin = bad.replace(
        'gradtel_origin_updates_total{kind="nan"} 0.0',
        'gradtel_origin_updates_total{kind="nan"} 1.0',
    )
    return healthy, bad, origin


def with_rank(body: str, rank: int) -> str:
    """The body as rank ``rank`` would serve it: ``rank`` on every gradtel series."""

    def label(match: re.Match[str]) -> str:
        name, labels = match.group(1), match.group(2)
        inner = f'rank="{rank}"' + (f",{labels[1:-1]}" if labels else "")
        return f"{name}{{{inner}}}"

    return re.sub(r"^(gradtel_\w+)(\{[^}]*\})?", label, body, flags=re.M)


class Ranks:
    """Serves /rank/N/metrics for N in range(count); ``inject()`` turns on the NaN update."""

    def __init__(self, count: int) -> None:
        healthy, bad, origin = bodies()
        self.healthy = [with_rank(healthy, r).encode() for r in range(count)]
        self.bad = [with_rank(origin if r == 2 else bad, r).encode() for r in range(count)]
        self.injected: float | None = None
        ranks = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as a gradtel endpoint answers: Prometheus reuses one connection per
            # target instead of a connection and a thread per scrape.
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                rank = int(self.path.split("/")[2])
                body = (ranks.bad if ranks.injected else ranks.healthy)[rank]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except ConnectionError:  # Prometheus gave up on a slow answer
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def inject(self) -> None:
        self.injected = time.time()


def evaluation_seconds(stack: Stack) -> float:
    with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    return float(next(g for g in groups if g["name"] == "gradtel.alerts")["evaluationTime"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument(
        "--baseline", type=int, default=10, help="healthy evaluations measured first"
    )
    parser.add_argument(
        "--settle", type=int, default=10, help="seconds watched for more pages after the first"
    )
    parser.add_argument(
        "--json", action="store_true", help="also print the results as one JSON line"
    )
    args = parser.parse_args()
    ranks = Ranks(args.ranks)
    port = ranks.server.server_port
    stack = Stack(
        [f"127.0.0.1:{port}"],
        timings=StackTimings("5s", "1s", "10s", "10s"),  # the kit's group_wait
        scrape={
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{port}"],
                    "labels": {
                        "__metrics_path__": f"/rank/{r}/metrics",
                        "instance": f"node-{r // 8}:{9464 + r % 8}",
                    },
                }
                for r in range(args.ranks)
            ]
        },
    )
    try:
        stack.start(timeout=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            up = stack.query("count(up == 1)")
            if up and int(float(up[0]["value"][1])) == args.ranks:
                break
            time.sleep(0.25)
        before = []
        for _ in range(args.baseline):
            before.append(evaluation_seconds(stack))
            time.sleep(1)
        ranks.inject()
        assert stack.receiver is not None and ranks.injected is not None
        during = []
        while time.time() - ranks.injected < 90 and not stack.receiver.firing("pager"):
            during.append(evaluation_seconds(stack))
            time.sleep(1)
        for _ in range(args.settle):  # a page per rank would come with the first one
            during.append(evaluation_seconds(stack))
            time.sleep(1)
        pages = stack.receiver.firing("pager")
        print(f"{args.ranks} ranks, scrape every 5 s, evaluation every 1 s")
        print(f"rule evaluation (gradtel.alerts): median {statistics.median(before) * 1e3:.1f} ms "
              f"before, median {statistics.median(during) * 1e3:.1f} ms / max {max(during) * 1e3:.1f} ms "
              "during the incident")  # fmt: skip
        print(f"pager notifications: {len(pages)}; chat: {len(stack.receiver.firing('chat'))}")
        for page in pages + stack.receiver.firing("chat"):
            print(
                f"injection -> {page.receiver} {page.received - ranks.injected:.1f} s: {page.alertname}: {page.description}"
            )
        if args.json:
            print(json.dumps({
                "ranks": args.ranks,
                "evaluation_before_s": before,
                "evaluation_during_s": during,
                "pages": [{"description": p.description, "after_s": p.received - ranks.injected} for p in pages],
                "chat": [p.alertname for p in stack.receiver.firing("chat")],
            }))  # fmt: skip
    finally:
        stack.stop()
        ranks.server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
