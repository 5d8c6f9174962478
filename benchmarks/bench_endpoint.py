"""The endpoint under idle connections, and the exit after SIGTERM, in real processes.

Run from a checkout (after `bash scripts/setup.sh`):

    .venv/bin/python benchmarks/bench_endpoint.py [--connections 1000]

Prints, for a training process serving gradtel:
- its threads and resident memory before and while ``--connections`` idle
  connections are held open, and the latency of a scrape meanwhile;
- the time from SIGTERM to exit with nothing pending, and with an unhealthy
  update Prometheus has not scraped yet while a scraper polls every second.
Only public API is used in the training process, so the script also measures
older gradtel versions (put their ``src`` first on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

TRAINER = textwrap.dedent(
    """
    import sys, time, torch, gradtel
    model = torch.nn.Linear(4, 2)
    monitor = gradtel.GradMonitor(model, on_critical="ignore")
    server = gradtel.serve(port=0, exit_grace=20)
    print(server.url, flush=True)
    for line in sys.stdin:
        if line.strip() == "poison":
            model(torch.randn(2, 4)).sum().backward()
            model.weight.grad.view(-1)[:7] = float("nan")
            monitor.collect()
        print("done", flush=True)
    """
)
PROMETHEUS = {"User-Agent": "Prometheus/2.45.3", "X-Prometheus-Scrape-Timeout-Seconds": "10"}


class Trainer:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", TRAINER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdin and self.process.stdout
        self.url = self.process.stdout.readline().strip()
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def send(self, line: str) -> None:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "done"

    def status(self) -> tuple[int, float]:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        threads = int(re.search(r"^Threads:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
        rss = int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) / 1024  # type: ignore[union-attr]
        return threads, rss


def scrape(url: str) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(
        urllib.request.Request(url, headers=PROMETHEUS), timeout=30
    ) as response:
        response.read()
    return time.monotonic() - started


def idle_connections(count: int) -> None:
    trainer = Trainer()
    scrape(trainer.url)
    time.sleep(0.5)
    threads, rss = trainer.status()
    print(f"before: {threads} threads, {rss:.1f} MiB resident")
    held = []
    for _ in range(count):
        held.append(socket.create_connection(("127.0.0.1", trainer.port)))
    time.sleep(1.0)
    threads, rss = trainer.status()
    latency = scrape(trainer.url)
    print(
        f"with {count} idle connections: {threads} threads, {rss:.1f} MiB resident, scrape {latency * 1e3:.1f} ms"
    )
    for conn in held:
        conn.close()
    trainer.process.kill()
    trainer.process.wait()


def exit_after_sigterm(pending: bool, scrape_every: float = 1.0) -> float:
    trainer = Trainer()
    scrape(trainer.url)  # Prometheus has seen this endpoint
    if pending:
        trainer.send("poison")
    stop = threading.Event()

    def prometheus() -> None:
        while not stop.wait(scrape_every):
            try:
                scrape(trainer.url)
            except OSError:
                return

    scraper = threading.Thread(target=prometheus, daemon=True)
    scraper.start()
    started = time.monotonic()
    trainer.process.send_signal(signal.SIGTERM)
    trainer.process.wait(timeout=60)
    took = time.monotonic() - started
    stop.set()
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.connections + 512)), hard))
    idle_connections(args.connections)
    print(f"SIGTERM to exit, nothing pending: {exit_after_sigterm(False):.2f} s")
    print(
        "SIGTERM to exit, an unscraped unhealthy update, a scrape every 1 s: "
        f"{exit_after_sigterm(True):.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
