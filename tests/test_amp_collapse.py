"""A real fp16 run whose loss scale collapses pages critical: a ``GradScaler`` with autocast
on the CPU, scraped by a real Prometheus with the rendered rules. The same run that does
not diverge settles its scale and does not page."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradtel.tools.stack import Stack, StackTimings, free_port

from .conftest import require_tool

pytestmark = pytest.mark.slow

TRAINER = Path(__file__).with_name("amp_trainer.py")
TIMINGS = StackTimings(
    scrape_interval="1s", evaluation_interval="1s", group_wait="2s", group_interval="5s"
)
RUNS = {"diverged": ["--diverge", "60"], "steady": []}
ALERT = "GradtelAmpLossScaleCollapsed"


@pytest.mark.waits(15)
def test_a_collapsing_loss_scale_pages_critical_and_a_settling_one_does_not() -> None:
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    ports = {name: free_port() for name in RUNS}
    trainers: dict[str, subprocess.Popen[str]] = {}
    with Stack([f"127.0.0.1:{port}" for port in ports.values()], timings=TIMINGS) as stack:
        try:
            for name, extra in RUNS.items():
                trainers[name] = subprocess.Popen(
                    [sys.executable, str(TRAINER), str(ports[name]), *extra],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    env={**os.environ, "GRADTEL_RUN": name},
                )
            diverged = trainers["diverged"].stdout
            assert diverged is not None and diverged.readline().strip() == "serving"
            at = float(diverged.readline().split()[1])

            assert stack.receiver is not None
            deadline = at + 30
            while not (
                pages := [p for p in stack.receiver.firing("pager") if p.alertname == ALERT]
            ):
                assert time.time() < deadline, (
                    f"no page within 30 s: {[str(p) for p in stack.receiver.pages]}"
                )
                time.sleep(0.1)
            [page] = pages
            assert page.severity == "critical" and page.labels["run"] == "diverged"
            assert (
                "diverged: the AMP GradScaler's loss scale fell below 1 in the last 10m, to "
                in page.description
            )
            assert f"127.0.0.1:{ports['diverged']}. The scaler halves it" in page.description

            # The steady run's scale settled (GradScaler halves it in the first steps), well above the floor.
            [steady] = stack.query('min_over_time(gradtel_amp_loss_scale{run="steady"}[5m])')
            assert 1 < float(steady["value"][1]) < 65536
            alerts = stack.query(f'max_over_time(ALERTS{{alertname="{ALERT}"}}[5m])')
            assert [a["metric"]["run"] for a in alerts] == ["diverged"]
        finally:
            for trainer in trainers.values():
                trainer.kill()
                trainer.communicate(timeout=10)
