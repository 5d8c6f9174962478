"""Faults that must never reach training, the health route, TLS and mutual TLS, cardinality."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel
from gradtel import GradMonitor, serve
from gradtel.export.context import context
from gradtel.tools.stack import Stack, StackTimings

from .conftest import FakeClock, parse, require_tool, sample, samples


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_healthz_reports_stale_when_no_update_arrives(
    provider: MeterProvider, registry: CollectorRegistry, clock: FakeClock
) -> None:
    context(registry).clock = clock
    model = nn.Linear(2, 2)
    monitor = GradMonitor(model, meter_provider=provider)
    with serve(port=0, registry=registry, stale_after=0.5, exit_grace=0) as server:
        health = (server.url or "").replace("/metrics", "/healthz")
        status, body = get(health)
        assert status == 200 and json.loads(body)["status"] == "ok"
        clock.advance(0.7)
        status, body = get(health)
        assert status == 503 and json.loads(body)["status"] == "stale"
        assert json.loads(body)["seconds_since_update"] == 0.7
        model(torch.ones(1, 2)).sum().backward()
        monitor.collect()
        clock.advance(0.2)
        status, body = get(health)
        assert status == 200 and json.loads(body)["updates_seen"] is True
        assert json.loads(body)["seconds_since_update"] == 0.2  # since that collect() call
        assert get(health.replace("/healthz", "/nothing"))[0] == 404


def test_a_scraper_hanging_up_mid_request_harms_nothing(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = nn.Linear(2, 2)
    monitor = GradMonitor(model, meter_provider=provider)
    with serve(port=0, registry=registry, exit_grace=0) as server:
        assert server.port is not None
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", server.port)) as rude:
                rude.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                rude.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            model(torch.ones(1, 2)).sum().backward()
            monitor.collect()  # training goes on
        status, body = get(server.url or "")
        assert status == 200 and sample(parse(body), "gradtel_updates_total") == 20


def test_a_failing_record_is_logged_once_counted_and_training_goes_on(
    provider: MeterProvider,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Linear(2, 2)
    monitor = GradMonitor(model, meter_provider=provider)
    instruments = gradtel.export.telemetry.instruments_for(provider)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(instruments.duration, "record", broken)
    model(torch.ones(1, 2)).sum().backward()
    message = "gradtel record failed, training continues: RuntimeError('exporter exploded')"
    with caplog.at_level(logging.ERROR, logger="gradtel"):
        for _ in range(5):
            assert monitor.collect().status is gradtel.Status.HEALTHY
        assert caplog.records == []  # durations are recorded when scraped
        found = samples(registry)
        assert sample(found, "gradtel_errors_total", stage="record") == 1
        assert sample(found, "gradtel_updates_total") == 5  # the scrape lost nothing else
        # Never scraped: the training thread records them, and fails, every DURATIONS_KEPT
        # updates, after the update's own series.
        for _ in range(gradtel.export.telemetry.DURATIONS_KEPT - 1):
            assert monitor.collect().status is gradtel.Status.HEALTHY
        model.weight.grad[0, 0] = float("nan")
        assert monitor.collect().nan_total == 1
    assert [r.getMessage() for r in caplog.records] == [message]  # once a minute at most
    found = samples(registry)
    assert sample(found, "gradtel_errors_total", stage="record") == 2
    assert sample(found, "gradtel_update_nan_grads", layer=monitor.layers[0]) == 1


def test_collect_from_two_threads(provider: MeterProvider, registry: CollectorRegistry) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    model(torch.ones(1, 8)).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(200):
                assert monitor.collect().nan_total == 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    found = samples(registry)
    assert sample(found, "gradtel_updates_total") == 400
    assert sample(found, "gradtel_nan_grads_total", layer="1") == 400


def test_ten_thousand_parameters_in_five_thousand_modules_export_a_bounded_number_of_series(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(5000)])
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    assert len(monitor.layers) == 1001 and monitor.layers[500] == gradtel.OVERFLOW_LAYER
    assert (monitor.layers[0], monitor.layers[-1]) == ("0", "4999")  # both ends keep their names
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    monitor.collect()
    healthy = [key for key in samples(registry) if key[0].startswith("gradtel_")]
    assert len(healthy) <= 60  # the fixed series and the histogram's: no per-layer series yet
    model[4321].weight.grad.fill_(float("nan"))
    monitor.collect()
    found = samples(registry)
    series = [key for key in found if key[0].startswith("gradtel_")]
    assert len(series) <= len(healthy) + 5  # the bad layer's 4 series and its first-bad gauge
    assert sample(found, "gradtel_nan_grads_total", layer="(other)") == 1


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    openssl = require_tool("openssl", "openssl")
    folder = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=gradtel test CA",
    )
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extra in (("server", ["-extfile", "server.ext"]), ("client", [])):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            *extra,
        )
    return folder


SHARES_CERTIFICATES = pytest.mark.xdist_group("hardening-certificates")
"""On one pytest-xdist worker (``--dist loadgroup``), which makes the certificates once."""


@SHARES_CERTIFICATES
def test_tls_and_mutual_tls(certificates: Path, registry: CollectorRegistry) -> None:
    pki = certificates
    trusting = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with serve(
        port=0,
        registry=registry,
        tls_cert=str(pki / "server.crt"),
        tls_key=str(pki / "server.key"),
        exit_grace=0,
    ) as server:
        assert server.url and server.url.startswith("https://127.0.0.1:")
        assert get(server.url, trusting)[0] == 200
        with pytest.raises(OSError):  # refused in the handshake or cut off
            get(server.url.replace("https", "http"))  # plain HTTP to a TLS endpoint
        assert get(server.url, trusting)[0] == 200  # and it keeps serving
    with serve(
        port=0, registry=registry, tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.crt"), exit_grace=0,
    ) as mutual:  # fmt: skip
        assert mutual.url
        with pytest.raises(OSError):  # refused in the handshake or cut off
            get(mutual.url, trusting)  # no client certificate
        trusting.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
        assert get(mutual.url, trusting)[0] == 200


@pytest.mark.slow
@SHARES_CERTIFICATES
def test_a_real_prometheus_scrapes_over_mutual_tls(certificates: Path) -> None:
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    pki = certificates
    registry = CollectorRegistry()
    provider = gradtel.prometheus_meter_provider(registry)
    GradMonitor(nn.Linear(2, 2), meter_provider=provider)
    server = serve(
        port=0, registry=registry, tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.crt"), exit_grace=0,
    )  # fmt: skip
    tls = {
        "ca_file": str(pki / "ca.crt"),
        "cert_file": str(pki / "client.crt"),
        "key_file": str(pki / "client.key"),
    }
    stack = Stack(
        [f"127.0.0.1:{server.port}"],
        timings=StackTimings("1s", "1s", "5s", "5s"),
        scrape={"scheme": "https", "tls_config": tls},
    )
    try:
        stack.start()
        deadline = time.monotonic() + 30
        up: list[dict] = []
        while time.monotonic() < deadline:
            up = stack.query('up{job="gradtel"} == 1 and on(instance) gradtel_updates_total')
            if up:
                break
            time.sleep(0.5)
        assert up, stack.log("prometheus")
    finally:
        stack.stop()
        server.close()
        provider.shutdown()


def test_layers_added_and_removed_after_the_monitor_was_made(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = nn.ModuleDict({"first": nn.Linear(2, 2)})
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    model["added"] = nn.Linear(2, 2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model["added"].weight.grad[0, 0] = float("nan")
    assert monitor.collect().nan_by_layer == {"added": 1}  # picked up in the very next update
    assert monitor.layers == ("first", "added")
    assert sample(samples(registry), "gradtel_update_nan_grads", layer="added") == 1
    del model["added"]
    assert monitor.refresh() and monitor.layers == ("first",)
    assert monitor.collect().nan_total == 0
    found = samples(registry)
    assert sample(found, "gradtel_nan_grads_total", layer="added") == 1  # stays at its last value
    assert not monitor.refresh()  # nothing changed since


def test_the_serving_thread_restarts_after_a_fault(
    registry: CollectorRegistry,
    provider: MeterProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def serve_errors() -> float:
        # Counted with the metrics of the registry the endpoint serves.
        return registry.get_sample_value("gradtel_errors_total", {"stage": "serve"}) or 0.0

    with serve(port=0, registry=registry, exit_grace=0) as server:
        faults = [RuntimeError("select broke")]

        def failing_loop_step() -> None:
            if faults:
                raise faults.pop()

        with caplog.at_level(logging.ERROR, logger="gradtel"):
            server._running.server.service_actions = (
                failing_loop_step  # a fault inside serve_forever
            )
            deadline = time.monotonic() + 5
            while faults and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
        assert get(server.url or "")[0] == 200  # serving again
        assert server._running.thread.is_alive()
    assert serve_errors() == 1
    assert "the metrics endpoint failed (RuntimeError('select broke')) and restarts" in caplog.text


def test_a_gradient_of_an_unexpected_kind_is_skipped_counted_and_logged_once(
    provider: MeterProvider, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    weird = nn.Parameter(torch.ones(2, 2).to_mkldnn())
    normal = nn.Parameter(torch.ones(3))
    monitor = GradMonitor([("odd.weight", weird), ("even.weight", normal)], meter_provider=provider)
    weird.grad = torch.zeros(2, 2).to_mkldnn()
    normal.grad = torch.zeros(3)
    with caplog.at_level(logging.ERROR, logger="gradtel"):
        results = [monitor.collect() for _ in range(3)]
    assert [(h.scanned, h.skipped) for h in results] == [(1, 1)] * 3
    assert [r.getMessage() for r in caplog.records] == [
        "gradtel scan failed, training continues: TypeError('cannot count a torch._mkldnn torch.float32 gradient in odd')"
    ]
    assert sample(samples(registry), "gradtel_errors_total", stage="scan") == 3
