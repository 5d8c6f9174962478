"""OTLP push to a local OTLP/HTTP receiver that decodes the protobuf payload."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from torch import nn

import gradtel
from gradtel.export.otlp import otlp_meter_provider


class Receiver:
    """Accepts OTLP/HTTP metric exports and keeps the decoded requests."""

    def __init__(self) -> None:
        self.requests: list[ExportMetricsServiceRequest] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportMetricsServiceRequest()
                request.ParseFromString(body)
                receiver.requests.append(request)
                receiver.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/metrics"

    def points(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The latest value of every data point, by metric name and attributes."""
        found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for request in self.requests:
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        data = getattr(metric, metric.WhichOneof("data"))
                        for point in data.data_points:
                            attrs = frozenset(
                                (a.key, a.value.string_value) for a in point.attributes
                            )
                            if metric.WhichOneof("data") == "histogram":
                                value = float(point.count)
                            else:
                                value = getattr(point, point.WhichOneof("value"))
                            found[(metric.name, attrs)] = value
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.server.shutdown()
    running.server.server_close()


def test_the_same_instruments_are_pushed_over_otlp(receiver: Receiver) -> None:
    provider = otlp_meter_provider(receiver.url, interval=3600, service_name="trainer")
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    monitor = gradtel.GradMonitor(model, meter_provider=provider, on_critical="ignore")
    model(torch.randn(2, 4)).sum().backward()
    model[1].weight.grad.view(-1)[:7] = float("inf")
    monitor.collect()
    assert provider.force_flush()
    provider.shutdown()
    points = receiver.points()
    assert receiver.paths[0] == "/v1/metrics"
    assert points[("gradtel_update_inf_grads", frozenset({("layer", "1")}))] == 7
    assert points[("gradtel_inf_grads", frozenset({("layer", "1")}))] == 7
    assert (
        "gradtel_inf_grads",
        frozenset({("layer", "0")}),
    ) not in points  # on demand: no Inf there
    assert (
        points[
            ("gradtel_unhealthy_updates", frozenset({("kind", "inf"), ("severity", "critical")}))
        ]
        == 1
    )
    assert (
        points[("gradtel_unhealthy_updates", frozenset({("kind", "nan"), ("severity", "warning")}))]
        == 0
    )
    assert points[("gradtel_updates", frozenset())] == 1
    assert points[("gradtel_update_status", frozenset())] == 2
    resource = receiver.requests[0].resource_metrics[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "trainer"


def deferred_updates_with_a_nan_last(provider: Any) -> gradtel.GradMonitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, readout="deferred", on_critical="ignore"
    )
    for step in (1, 2, 3):
        model.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        if step == 3:
            model[1].weight.grad.view(-1)[:7] = float("nan")
        monitor.collect(step=step)
    return monitor


NAN_IN_LAYER_1 = ("gradtel_nan_grads", frozenset({("layer", "1")}))


def test_shutdown_pushes_the_last_update_a_deferred_read_out_holds(receiver: Receiver) -> None:
    """As the reference shows: ``provider.shutdown()`` at the end of training. The push
    carried two of the three updates and not the NaN."""
    provider = otlp_meter_provider(receiver.url, interval=3600)
    monitor = deferred_updates_with_a_nan_last(provider)
    provider.shutdown()
    points = receiver.points()
    assert points[("gradtel_updates", frozenset())] == 3
    assert points[NAN_IN_LAYER_1] == 7
    assert points[("gradtel_update_status", frozenset())] == 2
    monitor.close()


def test_a_periodic_push_carries_what_a_deferred_read_out_finished(receiver: Receiver) -> None:
    """A run stalled after a NaN update (a hung collective) is pushed the NaN by the next
    periodic push, as a scrape publishes it; before, no push ever carried it."""
    provider = otlp_meter_provider(receiver.url, interval=0.1)
    monitor = deferred_updates_with_a_nan_last(provider)
    deadline = time.monotonic() + 10
    while NAN_IN_LAYER_1 not in receiver.points() and time.monotonic() < deadline:
        time.sleep(0.05)  # the training thread calls nothing more
    assert receiver.points().get(NAN_IN_LAYER_1) == 7
    monitor.close()
    provider.shutdown()


def test_a_failure_published_in_the_push_thread_leaves_the_pushes_going(
    receiver: Receiver,
) -> None:
    """``on_error="raise"`` with a listener that fails once, in the update the push thread
    publishes: the exception ended OpenTelemetry's push thread, and no push came after."""
    provider = otlp_meter_provider(receiver.url, interval=0.1)
    calls: list[int] = []

    def fails_once(health: gradtel.GradHealth) -> None:
        calls.append(health.step)
        if len(calls) == 3:
            raise RuntimeError("a listener's own bug")

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, readout="deferred", on_error="raise"
    )
    monitor.subscribe(fails_once)
    for step in (1, 2, 3):  # the third is published by a push
        model.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        monitor.collect(step=step)
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    pushed = len(receiver.requests)
    while len(receiver.requests) < pushed + 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # pushes go on
    assert len(calls) == 3 and len(receiver.requests) >= pushed + 2
    monitor.close()
    provider.shutdown()
