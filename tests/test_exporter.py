"""The real /metrics endpoint, scraped over HTTP and checked with the real promtool."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
from collections.abc import Iterator

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from torch import nn

import gradtel
from gradtel import GradMonitor, MetricsServer, PortInUseError, serve
from gradtel.export.context import context

from .conftest import FakeClock, Net, fetch, net_backward, parse, require_tool, sample, scrape

CONTRACT_TYPES = {
    "gradtel_nan_grads": "counter",
    "gradtel_inf_grads": "counter",
    "gradtel_update_nan_grads": "gauge",
    "gradtel_update_inf_grads": "gauge",
    "gradtel_updates": "counter",
    "gradtel_unhealthy_updates": "counter",
    "gradtel_update_status": "gauge",
    "gradtel_last_update_timestamp_seconds": "gauge",
    "gradtel_scan_duration_seconds": "histogram",
    "gradtel_errors": "counter",
}


@pytest.fixture
def server(registry: CollectorRegistry) -> Iterator[MetricsServer]:
    server = serve(port=0, registry=registry)
    yield server
    server.close(grace=0)


@pytest.fixture
def unhealthy_update(provider: MeterProvider) -> None:
    """One update with 3 NaN in ``fc1`` and 7 Inf in ``fc2``."""
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(4, 4))
    model.add_module("fc2", nn.Linear(4, 2))
    monitor = GradMonitor(model, meter_provider=provider, on_critical="ignore")
    model(torch.randn(2, 4)).sum().backward()
    model.fc1.weight.grad.view(-1)[:3] = float("nan")
    model.fc2.weight.grad.view(-1)[:7] = float("inf")
    monitor.collect()


def test_scrape_has_exact_names_types_labels_and_values(
    server: MetricsServer, unhealthy_update: None
) -> None:
    assert server.url is not None
    body, content_type = fetch(server.url)
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in parse_text(body)}
    assert {name: families[name].type for name in CONTRACT_TYPES} == CONTRACT_TYPES
    found = parse(body)
    assert sample(found, "gradtel_update_inf_grads", layer="fc2") == 7
    assert sample(found, "gradtel_update_nan_grads", layer="fc1") == 3
    assert sample(found, "gradtel_inf_grads_total", layer="fc1") == 0
    assert sample(found, "gradtel_unhealthy_updates_total", kind="inf", severity="critical") == 1
    assert sample(found, "gradtel_unhealthy_updates_total", kind="nan", severity="warning") == 1
    assert sample(found, "gradtel_unhealthy_updates_total", kind="inf", severity="warning") == 0
    assert sample(found, "gradtel_unhealthy_updates_total", kind="nan", severity="critical") == 0
    # Noise labels are off: no otel_scope_* labels, no target_info.
    assert not any(label.startswith("otel_") for _, labels in found for label, _ in labels)
    assert "target_info" not in families


def test_openmetrics_is_negotiated(server: MetricsServer, unhealthy_update: None) -> None:
    assert server.url is not None
    body, content_type = fetch(server.url, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(body)}
    assert families["gradtel_unhealthy_updates"].type == "counter"
    assert families["gradtel_scan_duration_seconds"].unit == "seconds"


def test_promtool_check_metrics_passes_on_real_output(
    server: MetricsServer, unhealthy_update: None
) -> None:
    # promtool lints the classic text format; OpenMetrics is checked by the strict
    # prometheus-client parser in the negotiation test above.
    promtool = require_tool("promtool", "prometheus")
    assert server.url is not None
    body, _ = fetch(server.url)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_default_bind_is_loopback_and_port_zero_picks_a_free_port(server: MetricsServer) -> None:
    assert server.addr == "127.0.0.1"
    assert server.port is not None and server.port > 0
    assert server.serving and repr(server) == f"<MetricsServer {server.url}>"


def test_environment_overrides_defaults_and_arguments_override_environment(
    monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    monkeypatch.setenv("GRADTEL_PORT", str(free))
    monkeypatch.setenv("GRADTEL_ADDR", "localhost")
    with serve(registry=registry) as from_env:
        assert (from_env.addr, from_env.port) == ("localhost", free)
        assert from_env.url is not None
        fetch(from_env.url)
    with serve(port=0, addr="127.0.0.1", registry=registry) as explicit:
        assert explicit.addr == "127.0.0.1" and explicit.port != free


def test_close_frees_the_port_and_is_idempotent(registry: CollectorRegistry) -> None:
    server = serve(port=0, registry=registry)
    url, port = server.url, server.port
    assert url is not None
    server.close()
    server.close()
    assert not server.serving
    with pytest.raises(urllib.error.URLError):
        fetch(url)
    with serve(port=port, registry=registry) as again:
        assert again.port == port


def test_port_in_use_is_logged_and_counted_by_default(
    server: MetricsServer,
    registry: CollectorRegistry,
    provider: MeterProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def serve_errors(where: CollectorRegistry) -> float:
        return where.get_sample_value("gradtel_errors_total", {"stage": "serve"}) or 0.0

    global_before = serve_errors(REGISTRY)
    with caplog.at_level(logging.ERROR, logger="gradtel"):
        failed = serve(port=server.port, registry=registry)
    assert not failed.serving and failed.port is None and failed.url is None
    failed.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"gradtel cannot serve /metrics: port {server.port} on 127.0.0.1 is already in use; "
        "pick another with port= or GRADTEL_PORT, or port=0 for a free one; "
        "training continues without a metrics endpoint"
    ]
    # Counted with the metrics of the registry it was to serve, not in the global one.
    assert serve_errors(registry) == 1
    assert serve_errors(REGISTRY) == global_before


def test_an_endpoint_error_before_any_monitor_is_counted_when_one_records(
    server: MetricsServer,
) -> None:
    registry = CollectorRegistry()
    serve(port=server.port, registry=registry).close()  # nothing records into it yet
    assert registry.get_sample_value("gradtel_errors_total", {"stage": "serve"}) is None
    provider = gradtel.prometheus_meter_provider(registry)
    try:
        assert registry.get_sample_value("gradtel_errors_total", {"stage": "serve"}) == 1
    finally:
        provider.shutdown()


def test_port_in_use_raises_when_asked(server: MetricsServer, registry: CollectorRegistry) -> None:
    with pytest.raises(PortInUseError, match=f"port {server.port} on 127.0.0.1 is already in use"):
        serve(port=server.port, registry=registry, on_error="raise")


def poisoned_update(provider: MeterProvider) -> None:
    model = nn.Linear(4, 2)
    monitor = GradMonitor(model, meter_provider=provider, on_critical="ignore")
    model(torch.randn(2, 4)).sum().backward()
    model.weight.grad.view(-1)[:7] = float("inf")
    monitor.collect()


def test_close_waits_until_the_last_unhealthy_update_is_scraped(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    server = serve(port=0, registry=registry, exit_grace=20)
    assert server.url is not None
    scrape(server.url)  # a Prometheus is scraping this endpoint
    poisoned_update(provider)
    assert server.pending_unhealthy
    scraped: list[str] = []

    def late_scrape() -> None:
        time.sleep(1.0)
        scraped.append(scrape(server.url))  # type: ignore[arg-type]

    threading.Thread(target=late_scrape).start()
    started = time.monotonic()
    server.close()
    waited = time.monotonic() - started
    assert scraped, "close() returned before the final scrape"
    assert (
        sample(
            parse(scraped[0]), "gradtel_unhealthy_updates_total", kind="inf", severity="critical"
        )
        == 1
    )
    assert 0.9 < waited < 5


def test_close_waits_for_the_first_scrape_of_a_young_endpoint(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    """A run whose first update is NaN and which then crashes, before Prometheus ever
    scraped it: the endpoint closed at once, and no alert ever fired."""
    server = serve(port=0, registry=registry, exit_grace=20)
    assert server.url is not None
    poisoned_update(provider)
    scraped: list[str] = []

    def first_scrape() -> None:
        time.sleep(1.0)  # Prometheus' first scrape of a new target, within its interval
        scraped.append(scrape(server.url))  # type: ignore[arg-type]

    threading.Thread(target=first_scrape).start()
    server.close()
    assert scraped, "close() returned before the first scrape"
    found = parse(scraped[0])
    assert sample(found, "gradtel_unhealthy_updates_total", kind="inf", severity="critical") == 1


def test_close_does_not_wait_when_nobody_scraped_for_the_grace_or_nothing_is_pending(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    never_scraped = serve(port=0, registry=registry, exit_grace=0.3)
    time.sleep(0.4)  # up longer than its grace with no scrape: no Prometheus comes
    poisoned_update(provider)
    started = time.monotonic()
    never_scraped.close()
    assert time.monotonic() - started < 0.25

    scraped = serve(port=0, registry=registry, exit_grace=20)
    assert scraped.url is not None
    scrape(scraped.url)  # after the unhealthy update: nothing pending
    assert not scraped.pending_unhealthy
    started = time.monotonic()
    scraped.close()
    assert time.monotonic() - started < 1


def test_close_gives_up_after_the_grace_period(
    provider: MeterProvider, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(port=0, registry=registry, exit_grace=0.5)
    assert server.url is not None
    scrape(server.url)
    poisoned_update(provider)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        server.close()
    assert 0.5 <= time.monotonic() - started < 2
    assert f"keeping {server.url} up for at most 0.5s" in caplog.text


def test_a_run_that_crashes_right_after_an_unhealthy_update_still_gets_scraped() -> None:
    script = textwrap.dedent(
        """
        import sys, torch, gradtel
        model = torch.nn.Linear(4, 2)
        monitor = gradtel.GradMonitor(model, on_critical="raise")
        server = gradtel.serve(port=0, exit_grace=20)
        print(server.url, flush=True)
        sys.stdin.readline()  # the parent has scraped once
        model(torch.randn(2, 4)).sum().backward()
        model.weight.grad.view(-1)[:7] = float("nan")
        print("poisoned", flush=True)
        monitor.collect()  # raises NonFiniteGradientError: the run dies here
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdin and process.stdout
        url = process.stdout.readline().strip()
        before = parse(scrape(url))
        assert (
            sample(before, "gradtel_unhealthy_updates_total", kind="nan", severity="critical") == 0
        )
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "poisoned"
        time.sleep(1.0)  # the exception has ended the training loop by now
        assert process.poll() is None, "the endpoint did not outlive the crash"
        after = parse(scrape(url))
        assert (
            sample(after, "gradtel_unhealthy_updates_total", kind="nan", severity="critical") == 1
        )
        _, err = process.communicate(timeout=10)
        assert process.returncode == 1
        assert "NonFiniteGradientError: gradtel: step 1 is critical: NaN=7" in err
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_each_rank_of_a_node_serves_on_base_port_plus_local_rank(
    monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry
) -> None:
    from gradtel.tools.stack import free_ports

    base = free_ports(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with serve(port=base, registry=registry, exit_grace=0) as rank_one:
        assert rank_one.port == base + 1
    with serve(port=base, registry=registry, exit_grace=0, rank_offset=False) as as_given:
        assert as_given.port == base
    with serve(port=0, registry=registry, exit_grace=0) as free:
        assert free.port not in (None, 0)
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(ValueError, match="LOCAL_RANK must be a non-negative integer, got 'first'"):
        serve(port=base, registry=registry)


def test_rank_label_comes_from_the_launcher_before_init_process_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gradtel.export.ranks import process_attributes

    assert process_attributes() == {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert process_attributes() == {"rank": "3"}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert process_attributes() == {}


def test_healthz_follows_collect_calls_not_scanned_updates(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    context(registry).clock = clock
    provider = gradtel.prometheus_meter_provider(registry)
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider, sample_every=20)
    net_backward(model)
    statuses = []
    with gradtel.serve(port=0, registry=registry, stale_after=0.3, exit_grace=0) as server:
        assert server.url is not None
        health_url = server.url.replace("/metrics", "/healthz")
        for _ in range(30):  # 1.5 s of collect() calls every 50 ms: one scan in 20
            monitor.collect()
            clock.advance(0.05)
            try:
                with urllib.request.urlopen(health_url, timeout=5) as response:
                    statuses.append((response.status, json.loads(response.read())["status"]))
            except urllib.error.HTTPError as exc:
                statuses.append((exc.code, json.loads(exc.read())["status"]))
    assert set(statuses) == {(200, "ok")}
    provider.shutdown()
