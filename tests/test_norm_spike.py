"""The early warning end to end: a real training process whose gradient norm spikes 50x at
one step (no NaN), scraped by a real Prometheus with the rendered rules, pages
``GradtelGradNormSpike``; the same run without the spike does not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradtel.render import KitOptions
from gradtel.tools.stack import Stack, StackTimings, free_port

from .conftest import require_tool

pytestmark = pytest.mark.slow

TRAINER = Path(__file__).with_name("trainer.py")
TIMINGS = StackTimings(
    scrape_interval="1s", evaluation_interval="1s", group_wait="2s", group_interval="5s"
)
# The shipped defaults are 10x over 1h with 10m of history; the same rule, in seconds.
OPTIONS = KitOptions(spike_baseline="1m", spike_history="5s")
RUNS = {"spiked": ["--spike", "80:50"], "steady": []}


@pytest.mark.waits(15)
def test_a_50x_norm_spike_warns_and_the_same_run_without_it_does_not() -> None:
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    ports = {name: free_port() for name in RUNS}
    trainers: dict[str, subprocess.Popen[str]] = {}
    with Stack(
        [f"127.0.0.1:{port}" for port in ports.values()], options=OPTIONS, timings=TIMINGS
    ) as stack:
        try:
            for name, extra in RUNS.items():
                trainers[name] = subprocess.Popen(
                    [sys.executable, str(TRAINER), str(ports[name]), "--grad-norm", *extra],
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "GRADTEL_RUN": name},
                )
            spiked = trainers["spiked"].stdout
            assert spiked is not None and spiked.readline().strip() == "serving"
            injected = float(spiked.readline().split()[2])  # "injected 80 UNIX_TIME", 8 s in

            assert stack.receiver is not None
            deadline = injected + 20
            while not (
                pages := [
                    p for p in stack.receiver.firing("chat") if p.labels.get("run") == "spiked"
                ]
            ):
                assert time.time() < deadline, (
                    f"no spike page within 20 s: {[str(p) for p in stack.receiver.pages]}"
                )
                time.sleep(0.1)
            page = pages[0]
            assert page.alertname == "GradtelGradNormSpike" and page.severity == "warning"
            ratio = re.search(
                r"rose to \S+, (\d+) times its median over the last 1m", page.description
            )
            assert ratio and 30 <= int(ratio.group(1)) <= 70, page.description
            assert "affected ranks: 1." in page.description

            # The steady run had the same history and as many evaluations: never even pending.
            time.sleep(3)
            alerts = stack.query('max_over_time(ALERTS{alertname="GradtelGradNormSpike"}[5m])')
            assert {a["metric"]["run"] for a in alerts} == {"spiked"}
            assert stack.query('count(gradtel_grad_norm{run="steady"})'), (
                "the steady run exported no norm"
            )
        finally:
            for trainer in trainers.values():
                trainer.kill()
                trainer.communicate(timeout=10)
