"""The deferred read-out (``readout="deferred"``) on the CPU: ``collect()`` never waits on
its own update's result, an update's NaN shows up by the next ``collect()``, a scrape or
``flush()``, and nothing is lost at exit."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel
from gradtel import GradMonitor, Status
from gradtel.pipeline.readout import HostCopy

from .conftest import net, sample, samples, scrape

NAN = float("nan")


def backward(model: nn.Module, nan: bool = False) -> None:
    model.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    if nan:
        model[2].weight.grad[0, :3] = NAN


def unhealthy(registry: CollectorRegistry) -> float:
    return sample(
        samples(registry), "gradtel_unhealthy_updates_total", kind="nan", severity="warning"
    )


def test_collect_returns_the_latest_finished_update(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, readout="deferred")
    backward(model)
    first = monitor.collect()
    assert (
        first.pending
        and first.status is Status.UNKNOWN
        and "has not finished yet" in first.describe()
    )
    backward(model, nan=True)
    assert monitor.collect().step == 1  # update 1, healthy, published by this call
    assert unhealthy(registry) == 0  # update 2 is not published yet
    backward(model)
    said = monitor.collect()
    assert (said.step, said.nan_by_layer, said.first_nan_layer) == (2, {"2": 3}, "2")
    assert unhealthy(registry) == 1
    monitor.flush()
    assert sample(samples(registry), "gradtel_updates_total") == 3
    assert sample(samples(registry), "gradtel_update_status") == 0  # update 3


def test_collect_never_waits_on_its_own_update(
    provider: MeterProvider, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A device whose work is queued, as a GPU's is, and a copy still in flight: ready() is
    # False until flush() waits for it.
    waits: list[str] = []
    monkeypatch.setattr("gradtel.pipeline.update.completes_when_queued", lambda tensor: False)
    monkeypatch.setattr(HostCopy, "ready", lambda self: False)
    original = HostCopy.read

    def read(self: HostCopy) -> list[Any]:
        waits.append(threading.current_thread().name)
        return original(self)

    monkeypatch.setattr(HostCopy, "read", read)
    monkeypatch.setattr(
        "gradtel.pipeline.scan.Scanner.read", lambda *args: pytest.fail("a blocking read-out")
    )
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, readout="deferred")
    for nan in (False, True, False):
        backward(model, nan)
        assert monitor.collect().pending
    assert waits == [] and unhealthy(registry) == 0
    monitor.flush()
    assert len(waits) == 3 and unhealthy(registry) == 1
    assert monitor.collect().step == 3


def test_a_scrape_publishes_what_has_finished(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, readout="deferred")
    backward(model, nan=True)
    monitor.collect()
    server = gradtel.serve(port=0, registry=registry, exit_grace=0)
    try:
        assert server.url is not None
        assert 'gradtel_unhealthy_updates_total{kind="nan",severity="warning"} 1.0' in scrape(
            server.url
        )
    finally:
        server.close()
        monitor.close()


def test_a_checkpoint_decision_waits_for_the_pending_updates(provider: MeterProvider) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, readout="deferred")
    backward(model, nan=True)
    monitor.collect()
    assert not monitor.allow_checkpoint(step=1)


def reference(model: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """NaN and Inf per layer, counted plainly by the test."""
    nan: dict[str, int] = {}
    inf: dict[str, int] = {}
    for name, p in model.named_parameters():
        layer = name.rpartition(".")[0]
        assert p.grad is not None
        for found, kind in ((nan, torch.isnan(p.grad)), (inf, torch.isinf(p.grad))):
            if kind.any():
                found[layer] = found.get(layer, 0) + int(kind.sum())
    return nan, inf


REWRITES = {
    "torch's clip_grad_norm_": lambda model, monitor: torch.nn.utils.clip_grad_norm_(
        model.parameters(), 1.0
    ),
    "gradtel.clip_grad_norm_": lambda model, monitor: None,  # it collects, then clips
    "grad.data.zero_()": lambda model, monitor: [p.grad.data.zero_() for p in model.parameters()],
    "zero_grad(set_to_none=False)": lambda model, monitor: model.zero_grad(set_to_none=False),
}


@pytest.fixture(params=["cpu", "queued"])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CPU, where work is done when queued; or, on the CPU, the read-out of a device
    whose work is queued (a GPU's): exact counts launched at collect()."""
    if request.param == "queued":
        monkeypatch.setattr("gradtel.pipeline.update.completes_when_queued", lambda tensor: False)
    return str(request.param)


@pytest.mark.parametrize("rewrite", REWRITES)
def test_gradients_rewritten_after_collect_are_published_as_collect_saw_them(
    provider: MeterProvider, registry: CollectorRegistry, device: str, rewrite: str
) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, readout="deferred")
    backward(model)
    model[0].weight.grad[1, 2] = NAN
    model[2].bias.grad[0] = float("inf")
    expected = reference(model)
    if rewrite == "gradtel.clip_grad_norm_":
        gradtel.clip_grad_norm_(model.parameters(), 1.0, monitor=monitor)
    else:
        monitor.collect()
        REWRITES[rewrite](model, monitor)
    assert reference(model) != expected  # the gradients really were rewritten
    monitor.flush()
    health = monitor.collect()  # no new gradients: returns the published update
    assert (health.step, dict(health.nan_by_layer), dict(health.inf_by_layer)) == (1, *expected)
    assert (health.first_nan_layer, health.first_inf_layer) == ("0", "2")
    found = samples(registry)
    assert sample(found, "gradtel_nan_grads_total", layer="0") == 1
    assert sample(found, "gradtel_inf_grads_total", layer="2") == 1
    assert sample(found, "gradtel_nan_grads_total", layer="2") == 0  # not a NaN after all
    assert unhealthy(registry) == 1
    monitor.close()


def test_an_unhealthy_update_is_published_by_sampled_out_collects(
    provider: MeterProvider, registry: CollectorRegistry, device: str
) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, readout="deferred", sample_every=3)
    backward(model, nan=True)
    monitor.collect()  # scanned
    backward(model)
    assert not monitor.collect().sampled  # left out, yet it publishes the update before it
    assert unhealthy(registry) == 1
    assert not monitor.healthy
    monitor.close()


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("held", ["by its function", "in a reference cycle"])
def test_a_dropped_monitor_publishes_its_last_update(
    provider: MeterProvider, registry: CollectorRegistry, held: str
) -> None:
    model = net()

    def train() -> None:
        monitor = GradMonitor(
            model, meter_provider=provider, readout="deferred", on_warning="ignore"
        )
        if held == "in a reference cycle":
            monitor.itself = monitor  # type: ignore[attr-defined]
        for nan in (False, False, True):
            backward(model, nan=nan)
            monitor.collect()  # the last one is left pending: no close()

    train()
    gc.collect()
    wait_for(lambda: unhealthy(registry) == 1)
    assert sample(samples(registry), "gradtel_updates_total") == 3
    train()  # the same parameters are free for the next monitor at once
    gc.collect()
    wait_for(lambda: unhealthy(registry) == 2)


def test_nothing_is_lost_at_exit() -> None:
    script = textwrap.dedent(
        """
        import atexit, torch
        from prometheus_client import CollectorRegistry
        import gradtel

        registry = CollectorRegistry()
        # Registered first, so it runs after gradtel's own exit handlers (last in, first out).
        atexit.register(lambda: print(registry.get_sample_value(
            "gradtel_unhealthy_updates_total", {"kind": "inf", "severity": "warning"})))
        model = torch.nn.Linear(4, 1)
        monitor = gradtel.GradMonitor(
            model, meter_provider=gradtel.prometheus_meter_provider(registry), readout="deferred"
        )
        model(torch.ones(1, 4)).sum().backward()
        model.weight.grad[0, 0] = float("inf")
        monitor.collect()  # the run ends here, its last update unpublished
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.strip()) == 1


def run_script(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in its own process group, which is killed if it takes over a minute
    (a forked child that hangs would outlive a plain timeout)."""
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"hung: {out} {err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_a_forked_child_leaves_the_parents_pending_update_to_the_parent(tmp_path: Any) -> None:
    log = tmp_path / "incidents.jsonl"
    script = textwrap.dedent(
        f"""
        import os, sys, torch, warnings
        import gradtel

        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
        model = torch.nn.Linear(4, 2)
        monitor = gradtel.GradMonitor(
            model, readout="deferred", on_warning="ignore", incident_log={str(log)!r}
        )
        model(torch.ones(2, 4)).sum().backward()
        model.weight.grad[0, 0] = float("nan")
        monitor.collect(step=1)  # pending when the process forks
        child = os.fork()
        if child == 0:  # a worker that trains on with the monitor, then ends normally
            model.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            model.weight.grad[0, 1] = float("inf")
            monitor.collect(step=2)  # its own, pending at its exit
            sys.exit(0)
        os.waitpid(child, 0)
        monitor.close()
        """
    )
    run = run_script(script)
    assert run.returncode == 0, run.stderr
    steps = sorted(json.loads(line)["step"] for line in log.read_text().splitlines())
    assert steps == [1, 2]  # the parent's update once, by the parent; the child's, by the child


def test_a_child_forked_while_a_dropped_monitor_is_being_closed_exits() -> None:
    script = textwrap.dedent(
        """
        import os, sys, time, torch, warnings
        import gradtel

        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
        model = torch.nn.Linear(4, 2)

        def train():
            monitor = gradtel.GradMonitor(model, readout="deferred", on_warning="ignore")
            monitor.subscribe(lambda health: time.sleep(1.0))  # a slow logger
            model(torch.ones(2, 4)).sum().backward()
            model.weight.grad[0, 0] = float("nan")
            monitor.collect()  # left pending: no close()

        train()
        time.sleep(0.3)  # a gradtel thread is closing the dropped monitor, holding its lock
        child = os.fork()
        if child == 0:
            sys.exit(0)  # a normal exit, running the exit handlers
        os.waitpid(child, 0)
        """
    )
    run = run_script(script)  # the child held the monitor's lock, taken by a thread it has not
    assert run.returncode == 0, run.stderr


def test_a_child_forked_while_a_parents_thread_publishes_goes_on_collecting() -> None:
    script = textwrap.dedent(
        """
        import os, threading, time, torch, warnings
        import gradtel

        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
        model = torch.nn.Linear(4, 2)
        monitor = gradtel.GradMonitor(model, readout="deferred", on_warning="ignore")
        monitor.subscribe(lambda health: time.sleep(1.0))  # a slow logger
        model(torch.ones(2, 4)).sum().backward()
        monitor.collect()
        publishing = threading.Thread(target=monitor.flush)  # as a scrape does
        publishing.start()
        time.sleep(0.3)  # it holds the monitor's lock, in the listener
        child = os.fork()
        if child == 0:  # a worker that trains on with the monitor
            model.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            monitor.collect()
            os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        publishing.join()
        """
    )
    run = run_script(script)
    assert run.returncode == 0, run.stderr


def test_the_exit_waits_for_a_dropped_monitor_being_closed(tmp_path: Any) -> None:
    log = tmp_path / "incidents.jsonl"
    script = textwrap.dedent(
        f"""
        import gc, time, torch
        import gradtel

        model = torch.nn.Linear(4, 2)

        def train():
            monitor = gradtel.GradMonitor(
                model, readout="deferred", on_warning="ignore", incident_log={str(log)!r}
            )

            def slow_logger(health):  # a network call per update; it names the monitor
                time.sleep(0.3)
                assert monitor.layers

            monitor.subscribe(slow_logger)
            model(torch.ones(2, 4)).sum().backward()
            model.weight.grad[0, 0] = float("nan")
            monitor.collect()  # left pending: no close()

        train()
        gc.collect()  # the cycle goes: a gradtel thread closes the monitor
        time.sleep(0.05)  # and is still at it when the script ends
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert len(log.read_text().splitlines()) == 1


def test_the_exit_wait_publishes_a_pending_update_and_waits_for_its_scrape(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, readout="deferred")
    server = gradtel.serve(port=0, registry=registry, exit_grace=10)
    assert server.url is not None
    scrape(server.url)  # Prometheus has scraped this endpoint before
    backward(model, nan=True)
    monitor.collect()  # the run's last update: its read-out still pending
    scraped: list[str] = []

    def prometheus() -> None:
        time.sleep(0.5)
        scraped.append(scrape(server.url or ""))

    later = threading.Thread(target=prometheus)
    later.start()
    started = time.monotonic()
    server.close()
    later.join()
    assert time.monotonic() - started >= 0.4  # it waited for that scrape
    assert 'gradtel_unhealthy_updates_total{kind="nan",severity="warning"} 1.0' in scraped[0]
    monitor.close()


def test_norms_reused_by_the_caller_before_the_read_out_do_not_pass_for_healthy(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, readout="deferred")
    backward(model, nan=True)
    norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in monitor.parameters])
    monitor.collect(norms=norms)
    norms.fill_(1.0)  # a buffer the loop reuses, rewritten before the update is published
    monitor.flush()
    assert unhealthy(registry) == 1
    assert monitor.collect().nan_by_layer == {"2": 3}


def test_a_rollback_while_the_bad_update_is_pending_leaves_the_monitor_healthy(
    provider: MeterProvider, registry: CollectorRegistry, device: str
) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, readout="deferred")
    backward(model, nan=True)
    monitor.collect()  # the loop sees the NaN loss itself, restores the weights, skips the step
    monitor.reset_health()
    backward(model)
    monitor.collect()
    assert monitor.healthy and monitor.allow_checkpoint(step=2)
    assert sample(samples(registry), "gradtel_first_bad_layer", kind="nan", layer="2") == 0
    monitor.close()
