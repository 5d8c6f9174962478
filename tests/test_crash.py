"""A training process that dies from an uncaught exception while gradtel serves: the
exception is counted by its type and scraped before the process is gone, and the
user's traceback and exit status are exactly Python's own."""

from __future__ import annotations

import http.client
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from opentelemetry.metrics import MeterProvider

import gradtel
from gradtel.export.telemetry import gradients_before_crash

from .conftest import parse, sample, scrape

SCRIPT = textwrap.dedent(
    """
    import sys, torch, gradtel

    model = torch.nn.Linear(4, 1)
    options = dict(readout=sys.argv[1], on_warning=sys.argv[2], on_critical=sys.argv[2], sample_every=int(sys.argv[4]))
    monitor = gradtel.GradMonitor(model, **options)
    server = gradtel.serve(port=0, exit_grace=30)
    print(server.url, flush=True)
    sys.stdin.readline()  # Prometheus has scraped once
    for step, bad in enumerate(sys.argv[3].split(",") if sys.argv[3] else [], start=40):
        if bad == "reset":
            monitor.reset_health()  # rolled back to a healthy checkpoint
            continue
        if bad in ("close", "reload"):  # closed on the way out, or replaced after a reload
            monitor.close()
            if bad == "reload":
                monitor = gradtel.GradMonitor(model, **options)
            continue
        model.zero_grad()
        if bad == "none":  # an update with no gradients: nothing to scan
            monitor.collect(step=step)
            continue
        model(torch.ones(1, 4)).sum().backward()
        if bad == "nan":
            model.weight.grad[0, 0] = float("nan")
        monitor.collect(step=step)
    # As a policy sampling from NaN weights does: torch.distributions raises.
    torch.distributions.Categorical(logits=torch.tensor([float("nan"), 0.0]))
    """
)


def crash(readout: str, policy: str, updates: str, sample_every: int = 1) -> tuple[dict, str, int]:
    """Run the script to its crash: the last scrape, stderr and exit status."""
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, readout, policy, updates, str(sample_every)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stdin is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http"), process.communicate(timeout=60)[1]
        scrape(url)
        process.stdin.write("go\n")
        process.stdin.flush()
        # As Prometheus does: scrape until the endpoint is gone. The exit wait holds it up
        # until a scrape that started after the crash was counted; one that started just
        # before may already show the crash, and is not the last.
        deadline, found = time.monotonic() + 60, {}
        while process.poll() is None and time.monotonic() < deadline:
            try:
                found = parse(scrape(url))
            except (OSError, http.client.HTTPException):  # refused or cut off: it closed
                break
            time.sleep(0.1)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    return found, stderr, process.returncode


def test_a_crash_is_counted_scraped_and_passed_on_unchanged() -> None:
    found, stderr, status = crash("sync", "warn", "ok,nan")
    assert (
        sample(found, "gradtel_training_exceptions_total", type="ValueError", gradients="unhealthy")
        == 1
    )
    assert sample(found, "gradtel_last_unhealthy_step", kind="nan") == 41
    assert status == 1
    lines = stderr.splitlines()
    traceback = lines.index("Traceback (most recent call last):")
    error = next(
        i
        for i, line in enumerate(lines)
        if line.startswith("ValueError: Expected parameter logits")
    )
    assert traceback < error  # Python's own report, whole


@pytest.mark.parametrize(
    ("readout", "policy", "updates", "exception", "gradients"),
    [
        # NaN in the weights, however many updates since.
        ("sync", "warn", "nan,nan,nan", "ValueError", "unhealthy"),
        ("deferred", "warn", "ok,nan", "ValueError", "unhealthy"),
        # The update was stopped before the weights took it: NaN gradients still came first.
        ("sync", "raise", "ok,nan", "NonFiniteGradientError", "unhealthy"),
        ("sync", "warn", "ok,ok", "ValueError", "healthy"),
        ("sync", "warn", "nan,reset,ok", "ValueError", "healthy"),
        ("sync", "warn", "ok,nan,reset", "ValueError", "healthy"),
        ("sync", "warn", "nan,reload,ok,ok", "ValueError", "healthy"),
        ("sync", "warn", "ok,nan,close", "ValueError", "unhealthy"),
        ("sync", "warn", "nan,reload,ok,close", "ValueError", "healthy"),
        ("sync", "skip", "nan,ok", "ValueError", "healthy"),
        ("sync", "warn", "", "ValueError", "unknown"),
    ],
    ids=[
        "poisoned",
        "deferred",
        "raised",
        "healthy",
        "rolled-back",
        "crash-right-after-rollback",
        "reloaded-then-healthy",
        "closed-on-the-way-out",
        "reloaded-then-closed-on-the-way-out",
        "skipped-then-healthy",
        "before-any-update",
    ],
)
def test_a_crash_says_whether_nan_or_inf_gradients_came_before_it(
    readout: str, policy: str, updates: str, exception: str, gradients: str
) -> None:
    """The crash's own series holds it: a process restarted on the same labels, reporting
    healthy updates, does not make an old crash look healthy."""
    found, _, status = crash(readout, policy, updates)
    assert status == 1
    crashes = {
        labels: value
        for (name, labels), value in found.items()
        if name == "gradtel_training_exceptions_total"
    }
    assert crashes == {frozenset({("type", exception), ("gradients", gradients)}): 1}


@pytest.mark.parametrize(
    ("readout", "updates", "sample_every", "gradients"),
    [
        ("sync", "ok,ok", 2, "unknown"),  # the latest update was sampled out
        ("deferred", "ok,ok", 2, "unknown"),  # ... published after it, at the crash
        ("sync", "ok,none", 1, "unknown"),  # the latest update had no gradients to scan
        ("sync", "ok,ok,ok", 2, "healthy"),  # the latest update was scanned
    ],
    ids=["sampled-out", "sampled-out-deferred", "no-gradients", "sampled-and-scanned"],
)
def test_a_crash_after_an_update_gradtel_did_not_scan_is_never_called_healthy(
    readout: str, updates: str, sample_every: int, gradients: str
) -> None:
    """NaN in an update gradtel did not look at could be what crashed the process."""
    found, _, status = crash(readout, "warn", updates, sample_every)
    assert status == 1
    crashes = {
        labels: value
        for (name, labels), value in found.items()
        if name == "gradtel_training_exceptions_total"
    }
    assert crashes == {frozenset({("type", "ValueError"), ("gradients", gradients)}): 1}


def _healthy_update(model: torch.nn.Module, monitor: gradtel.GradMonitor) -> gradtel.GradHealth:
    model.zero_grad()
    model(torch.ones(1, 4)).sum().backward()
    return monitor.collect()


def test_a_scan_that_raises_into_training_leaves_a_crash_unknown(
    provider: MeterProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_error="raise": the failed scan's update was not looked at; the error that ends
    the process may be its NaN."""
    model = torch.nn.Linear(4, 1)
    monitor = gradtel.GradMonitor(model, meter_provider=provider, on_error="raise")
    assert _healthy_update(model, monitor).status is gradtel.Status.HEALTHY
    assert gradients_before_crash([monitor._telemetry]) == "healthy"

    def broken(self: object, *args: object) -> object:
        raise RuntimeError("device lost")

    monkeypatch.setattr("gradtel.pipeline.scan.Scanner.launch", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        _healthy_update(model, monitor)
    assert gradients_before_crash([monitor._telemetry]) == "unknown"


def test_a_wall_clock_stepped_back_does_not_make_an_unscanned_update_healthy(
    provider: MeterProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Updates are ordered by the collect() that made them, not by the wall clock (NTP may
    step it back between two updates)."""
    model = torch.nn.Linear(4, 1)
    monitor = gradtel.GradMonitor(model, meter_provider=provider, sample_every=2)
    assert _healthy_update(model, monitor).sampled  # update 1, scanned
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now - 3600)
    assert not _healthy_update(model, monitor).sampled  # update 2, sampled out
    assert gradients_before_crash([monitor._telemetry]) == "unknown"


def test_with_two_monitors_one_that_did_not_scan_its_latest_update_makes_a_crash_unknown(
    provider: MeterProvider,
) -> None:
    """A GAN's two monitors: the generator's latest update was scanned, the critic's was
    sampled out."""
    generator, critic = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    watching = gradtel.GradMonitor(generator, meter_provider=provider)
    sampling = gradtel.GradMonitor(critic, meter_provider=provider, sample_every=2)
    _healthy_update(generator, watching)
    _healthy_update(critic, sampling)
    both = [watching._telemetry, sampling._telemetry]
    assert gradients_before_crash(both) == "healthy"
    _healthy_update(generator, watching)
    assert not _healthy_update(critic, sampling).sampled
    assert gradients_before_crash(both) == "unknown"
    sampling.close()  # a closed monitor no longer describes the training
    assert gradients_before_crash(both) == "healthy"


@pytest.mark.parametrize("between", ["sampled out", "no gradients"])
def test_an_attached_monitor_whose_latest_update_was_scanned_calls_a_crash_healthy(
    provider: MeterProvider, between: str
) -> None:
    """attach() scans at the end of backward, before collect() counts the update: the
    update is still the one that collect() made, not the one before it."""
    model = torch.nn.Linear(4, 1)
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, sample_every=2 if between == "sampled out" else 1
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(optimizer)
    for update in range(3):
        optimizer.zero_grad()
        if update != 1 or between == "sampled out":
            model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        state = gradients_before_crash([monitor._telemetry])
        assert state == ("unknown" if update == 1 else "healthy"), update
