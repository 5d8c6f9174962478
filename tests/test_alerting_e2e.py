"""End to end with real processes: training → gradtel → Prometheus → rules → Alertmanager → webhook.

Five training processes run side by side, each scraped as its own instance:

- ``critical``: 7 Inf in ``head`` on update 30, then healthy;
- ``warning``: 3 NaN in ``body.0`` on update 30, then healthy;
- ``healthy``: never unhealthy;
- ``crash``: 7 NaN in ``body.2`` on update 30 with ``on_critical="raise"``: the run dies there,
  and pages twice: the NaN, and the crash that followed it;
- ``both``: 3 NaN then 7 NaN on updates 30 and 31: the critical page inhibits the warning;
- ``deferred``: 7 Inf in ``head`` on update 30, with the deferred read-out: the update
  is published by the next collect() or the scrape, and pages like ``critical`` (nothing
  skips it, so the NaN that follows in the weights pages too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gradtel.tools.stack import Page, Stack, StackTimings, free_port

from .conftest import require_tool

pytestmark = pytest.mark.slow

TRAINER = Path(__file__).with_name("trainer.py")
PAGE_DEADLINE = 30.0  # seconds from injection to page
TIMINGS = StackTimings(
    scrape_interval="1s", evaluation_interval="1s", group_wait="5s", group_interval="5s"
)
SCENARIOS = {
    "critical": ["--inject", "30:inf:7:head"],
    "warning": ["--inject", "30:nan:3:body.0"],
    "healthy": [],
    "crash": ["--inject", "30:nan:7:body.2", "--on-critical", "raise"],
    "both": ["--inject", "30:nan:3:body.0", "--inject", "31:nan:7:body.0"],
    "deferred": ["--inject", "30:inf:7:head", "--readout", "deferred"],
}


@dataclass
class Trainer:
    process: subprocess.Popen[str]
    run: str
    """The ``run`` label (GRADTEL_RUN): each scenario is its own training run."""

    def injected_at(self) -> float:
        """Unix time of the first injection the trainer reported."""
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            assert line, "the trainer ended before injecting"
            if line.startswith("injected "):
                return float(line.split()[2])


@pytest.fixture(scope="module")
def run() -> Iterator[tuple[dict[str, Trainer], Stack]]:
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    ports = {name: free_port() for name in SCENARIOS}
    trainers: dict[str, Trainer] = {}
    stack = Stack([f"127.0.0.1:{port}" for port in ports.values()], timings=TIMINGS)
    try:
        stack.start()
        for name, extra in SCENARIOS.items():
            process = subprocess.Popen(
                [sys.executable, str(TRAINER), str(ports[name]), *extra],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "GRADTEL_RUN": name},
            )
            trainers[name] = Trainer(process, name)
        for trainer in trainers.values():
            assert trainer.process.stdout is not None
            assert trainer.process.stdout.readline().strip() == "serving"
        yield trainers, stack
    finally:
        for trainer in trainers.values():
            if trainer.process.poll() is None:
                trainer.process.kill()
            trainer.process.communicate(timeout=10)
        stack.stop()


def wait_for_page(
    stack: Stack, receiver: str, run: str, since: float, alertname: str | None = None
) -> Page:
    assert stack.receiver is not None
    deadline = since + PAGE_DEADLINE + 5
    while time.time() < deadline:
        for page in stack.receiver.firing(receiver):
            if page.labels.get("run") == run and alertname in (None, page.alertname):
                return page
        time.sleep(0.1)
    pytest.fail(
        f"no {receiver} page for {run} within {PAGE_DEADLINE}s; got "
        f"{[str(p) for p in stack.receiver.pages]}\nprometheus log:\n{stack.log('prometheus')}"
    )


@pytest.mark.waits(30)
def test_pages_arrive_on_the_right_receiver_naming_the_layer(
    run: tuple[dict[str, Trainer], Stack], capsys: pytest.CaptureFixture[str]
) -> None:
    trainers, stack = run
    # Prometheus as users run it: its default resend delay, the page complete all the same.
    assert not [flag for flag in stack.processes["prometheus"].args if "resend-delay" in str(flag)]
    injected = {
        name: trainers[name].injected_at()
        for name in ("critical", "warning", "crash", "both", "deferred")
    }

    critical = wait_for_page(stack, "pager", trainers["critical"].run, injected["critical"])
    assert (critical.alertname, critical.severity) == ("GradtelInfGradients", "critical")
    assert critical.labels["kind"] == "inf"
    assert "more than 5 Inf gradient values" in critical.description
    assert "head (7)" in critical.description
    assert critical.description.endswith("First bad layer in backward order: head, at step 30.")

    warning = wait_for_page(stack, "chat", trainers["warning"].run, injected["warning"])
    assert (warning.alertname, warning.severity) == ("GradtelNaNGradients", "warning")
    assert "body.0 (3)" in warning.description

    # The crashed run's endpoint stayed up until Prometheus scraped its last update, and the crash.
    crash = wait_for_page(
        stack, "pager", trainers["crash"].run, injected["crash"], "GradtelNaNGradients"
    )
    assert crash.severity == "critical"
    assert "body.2 (7)" in crash.description
    crashed = wait_for_page(
        stack, "pager", trainers["crash"].run, injected["crash"], "GradtelTrainingCrashed"
    )
    assert crashed.severity == "critical"
    assert crashed.description.startswith(
        "gradtel run crash: training crashed after NaN gradients at step 30: uncaught exceptions "
        "ended 127.0.0.1:"
    ), crashed.description
    assert (
        ": NonFiniteGradientError; NaN or Inf gradients came before: resume" in crashed.description
    )
    assert trainers["crash"].process.wait(timeout=30) == 1
    assert trainers["crash"].process.stderr is not None
    assert "NonFiniteGradientError" in trainers["crash"].process.stderr.read()

    both = wait_for_page(stack, "pager", trainers["both"].run, injected["both"])
    assert (both.alertname, both.severity) == ("GradtelNaNGradients", "critical")

    # Nothing skips there, so the Inf update reached the weights and NaN followed: its own page too.
    deferred = wait_for_page(
        stack, "pager", trainers["deferred"].run, injected["deferred"], "GradtelInfGradients"
    )
    assert deferred.severity == "critical"
    # The Inf spreads to other layers in the updates that follow; whenever the page is
    # sent, it names where the Inf started.
    assert "Layers with Inf values in that window: " in deferred.description
    assert "head (" in deferred.description.split("Layers with Inf values in that window: ")[1]
    assert deferred.description.endswith("First bad layer in backward order: head, at step 30.")

    time.sleep(
        6
    )  # longer than group_wait: a page the inhibition or routing let through would be here
    assert stack.receiver is not None
    by_instance = {
        name: [
            (p.receiver, p.alertname, p.severity)
            for p in stack.receiver.firing()
            if p.labels.get("run") == t.run
        ]
        for name, t in trainers.items()
    }
    assert by_instance["healthy"] == []
    assert all(receiver == "chat" for receiver, _, _ in by_instance["warning"])
    assert all(receiver == "pager" for receiver, _, _ in by_instance["critical"])
    assert all(receiver == "pager" for receiver, _, _ in by_instance["both"]), (
        "the critical alert must inhibit the warning of the same run and kind"
    )
    # The warning alert of "both" did fire in Prometheus; Alertmanager muted it.
    both_alerts = stack.query(f'ALERTS{{alertstate="firing",run="{trainers["both"].run}"}}')
    assert {a["metric"]["severity"] for a in both_alerts} == {"critical", "warning"}

    latencies = {
        "critical": critical.received - injected["critical"],
        "warning": warning.received - injected["warning"],
        "crash": crash.received - injected["crash"],
        "crashed": crashed.received - injected["crash"],
        "deferred": deferred.received - injected["deferred"],
    }
    assert all(0 < seconds < PAGE_DEADLINE for seconds in latencies.values()), latencies
    with capsys.disabled():
        print(
            "\ninjection -> webhook latency (scrape 1s, evaluation 1s, for 2s, group_wait 5s): "
            + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in latencies.items())
        )
