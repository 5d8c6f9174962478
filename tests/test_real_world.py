"""Survives the real world: signals and exits, forked workers, hostile or slow clients,
errors that say what to do, and logs a person can read. Real processes, signals and sockets."""

from __future__ import annotations

import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel
from gradtel import GradMonitor, serve
from gradtel._ratelimit import RateLimitedLog
from gradtel.tools.stack import free_port

from .conftest import (
    FakeClock,
    default_ctrl_c,
    fetch,
    parse,
    require_tool,
    sample,
    samples,
    scrape,
)
from .test_cli import start_demo

NAN = float("nan")

TRAINER = textwrap.dedent(
    """
    import signal, sys, time, torch, gradtel
    if "own-handler" in sys.argv:
        signal.signal(signal.SIGTERM, lambda *a: (print("own handler", flush=True), sys.exit(3)))
    model = torch.nn.Linear(4, 2)
    monitor = gradtel.GradMonitor(model, on_critical="ignore")
    server = gradtel.serve(port=0, exit_grace=20)
    print(server.url, flush=True)
    sys.stdin.readline()  # the parent has scraped once, as Prometheus
    if "poison" in sys.argv:
        model(torch.randn(2, 4)).sum().backward()
        model.weight.grad.view(-1)[:7] = float("nan")
        monitor.collect()
    print("ready", flush=True)
    if "exit" in sys.argv:
        sys.exit(0)  # the interpreter's exit waits for the last scrape
    while True:
        time.sleep(0.05)  # training goes on until a signal
    """
)


class Trainer:
    """A training process serving gradtel, driven through its stdin and stdout."""

    def __init__(self, *words: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", TRAINER, *words],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_ctrl_c,  # some tests stop it with Ctrl-C
        )
        assert self.process.stdin and self.process.stdout
        self.url = self.process.stdout.readline().strip()
        assert self.url.startswith("http://"), self.url + self.process.stderr.read()  # type: ignore[union-attr]
        scrape(self.url)
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "ready"

    def exited_within(self, seconds: float) -> bool:
        try:
            self.process.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    def finish(self) -> tuple[str, str]:
        if self.process.poll() is None:
            self.process.kill()
        out, err = self.process.communicate(timeout=30)
        return out, err


@pytest.fixture
def trainers() -> Iterator[list[Trainer]]:
    started: list[Trainer] = []
    yield started
    for trainer in started:
        trainer.finish()


# 1. Exits and signals ------------------------------------------------------------------


def test_sigterm_waits_until_prometheus_scrapes_the_last_unhealthy_update(
    trainers: list[Trainer],
) -> None:
    trainer = Trainer("poison")
    trainers.append(trainer)
    trainer.process.send_signal(signal.SIGTERM)
    assert not trainer.exited_within(1.0), "SIGTERM killed the process before the last scrape"
    fetch(trainer.url)  # curl or gradtel watch: not a Prometheus scrape, the wait goes on
    assert not trainer.exited_within(0.5)
    found = parse(scrape(trainer.url))
    assert sample(found, "gradtel_unhealthy_updates_total", kind="nan", severity="critical") == 1
    assert trainer.exited_within(5.0)
    assert trainer.process.returncode == -signal.SIGTERM  # then SIGTERM's default action
    assert "keeping http" in trainer.finish()[1]


def test_sigterm_with_nothing_pending_exits_at_once(trainers: list[Trainer]) -> None:
    trainer = Trainer()
    trainers.append(trainer)
    started = time.monotonic()
    trainer.process.send_signal(signal.SIGTERM)
    assert trainer.exited_within(5.0)
    assert time.monotonic() - started < 1.5
    assert trainer.process.returncode == -signal.SIGTERM


def test_an_applications_own_sigterm_handler_is_kept(trainers: list[Trainer]) -> None:
    trainer = Trainer("own-handler", "poison")
    trainers.append(trainer)
    trainer.process.send_signal(signal.SIGTERM)
    assert not trainer.exited_within(0.5)  # its sys.exit(3), then the usual exit wait,
    scrape(trainer.url)  # which Prometheus' scrape ends
    assert trainer.exited_within(10.0)
    out, _ = trainer.finish()
    assert "own handler" in out and trainer.process.returncode == 3


def test_the_first_ctrl_c_ends_the_exit_wait_without_a_traceback(trainers: list[Trainer]) -> None:
    trainer = Trainer("poison", "exit")
    trainers.append(trainer)
    assert not trainer.exited_within(1.0), "the exit did not wait for the last scrape"
    trainer.process.send_signal(signal.SIGINT)
    assert trainer.exited_within(3.0)
    _, err = trainer.finish()
    assert "Traceback" not in err and "exit wait ended by Ctrl-C" in err


def test_forked_data_loader_workers_do_not_hold_the_listening_socket(
    registry: CollectorRegistry,
) -> None:
    server = serve(port=0, registry=registry, exit_grace=0)
    port = server.port
    assert port is not None
    data = torch.utils.data.TensorDataset(torch.randn(64, 4))
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, num_workers=2, multiprocessing_context="fork", persistent_workers=True
    )
    batches = iter(loader)
    # Batches go to the workers in turn: after two, each worker has run past its fork (and
    # past gradtel's at-fork handler) rather than merely been forked after serve().
    next(batches), next(batches)
    server.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    again = serve(port=port, registry=registry, on_error="raise", exit_grace=0)
    assert again.port == port
    again.close()
    del batches, loader


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_demo_stack_cleans_up_on_sigterm_and_sighup(sig: signal.Signals) -> None:
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    process, _ = start_demo("--stack", "--steps", "100000")
    try:
        assert process.stdout is not None
        found = re.search(r"data in (\S+)\)", process.stdout.readline())
        assert found
        data = found.group(1)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) == 2  # Prometheus and Alertmanager
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert f"stopped by {sig.name}" in out and "Traceback" not in err
        assert not os.path.exists(data), "the stack's data folder was left behind"
        for child in children:
            assert not os.path.exists(f"/proc/{child}"), f"process {child} outlived the demo"
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


# 2. An endpoint that hostile or slow clients cannot hurt -------------------------------


def threads_and_rss() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
    return threads, rss


def test_a_thousand_idle_connections_pin_no_threads(registry: CollectorRegistry) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    with serve(port=0, registry=registry, exit_grace=0) as server:
        assert server.port is not None and server.url is not None
        scrape(server.url)
        before, _ = threads_and_rss()
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(1000)]
        try:
            time.sleep(0.2)
            started = time.monotonic()
            scrape(server.url)  # Prometheus still gets through
            assert time.monotonic() - started < 2
            after, _ = threads_and_rss()
            assert after <= before, (before, after)
        finally:
            for conn in idle:
                conn.close()


def test_idle_half_sent_and_http09_requests_are_closed(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gradtel.export.httpd, "IDLE_TIMEOUT", 0.5)
    monkeypatch.setattr(gradtel.export.httpd, "REQUEST_TIMEOUT", 0.5)
    with serve(port=0, registry=registry, exit_grace=0) as server:
        assert server.port is not None and server.url is not None

        def closed_within(conn: socket.socket, seconds: float) -> bytes:
            conn.settimeout(seconds)  # a socket.timeout here means the server kept it open
            received = b""
            try:
                while chunk := conn.recv(65536):
                    received += chunk
            except ConnectionResetError:  # closed with the request unread: also closed
                pass
            return received

        idle = socket.create_connection(("127.0.0.1", server.port))
        half = socket.create_connection(("127.0.0.1", server.port))
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        old = socket.create_connection(("127.0.0.1", server.port))
        old.sendall(b"GET /metrics\r\n")  # HTTP/0.9
        for conn in (idle, half):
            assert closed_within(conn, 5) == b""
        closed_within(old, 5)  # answered or closed, never pinned
        for conn in (idle, half, old):
            conn.close()
        assert fetch(server.url)[1].startswith("text/plain")  # still serving


def test_a_bad_accept_header_gets_406_counted_and_no_traceback(
    registry: CollectorRegistry, provider: MeterProvider, capfd: pytest.CaptureFixture[str]
) -> None:
    with serve(port=0, registry=registry, exit_grace=0) as server:
        assert server.url is not None
        for _ in range(3):
            with pytest.raises(urllib.error.HTTPError) as refused:
                fetch(server.url, accept="text/plain; version=x.y")
            assert refused.value.code == 406
            refused.value.close()
    assert registry.get_sample_value("gradtel_errors_total", {"stage": "serve"}) == 3
    assert "Traceback" not in capfd.readouterr().err


def test_name_filter_works_as_in_prometheus_client(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    GradMonitor(nn.Linear(2, 2), meter_provider=provider)
    with serve(port=0, registry=registry, exit_grace=0) as server:
        body, _ = fetch(f"{server.url}?name[]=gradtel_updates_total&name[]=gradtel_update_status")
    assert set(name for name, _ in parse(body)) == {
        "gradtel_updates_total",
        "gradtel_update_status",
    }


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    openssl = require_tool("openssl", "openssl")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [openssl, "pkey", "-in", str(tmp_path / "key.pem"), "-aes256", "-passout", "pass:secret",
         "-out", str(tmp_path / "locked.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    return tmp_path


def test_a_stalled_tls_handshake_is_cut_off(
    pem: Path, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl

    monkeypatch.setattr(gradtel.export.httpd, "REQUEST_TIMEOUT", 0.5)
    with serve(port=0, registry=registry, exit_grace=0, tls_cert=str(pem / "cert.pem"),
               tls_key=str(pem / "key.pem")) as server:  # fmt: skip
        assert server.port is not None and server.url is not None
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stalled.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        stalled.settimeout(5)
        try:
            assert stalled.recv(1024) == b""  # closed by the server, not left pinned
        except ConnectionResetError:
            pass
        stalled.close()
        context = ssl.create_default_context(cafile=str(pem / "cert.pem"))
        context.check_hostname = False
        with urllib.request.urlopen(server.url, timeout=10, context=context) as response:
            assert response.status == 200  # still serving


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        (
            "garbage.pem",
            "key.pem",
            r"tls_cert '.*garbage.pem' and tls_key '.*key.pem' must be a PEM",
        ),
        ("cert.pem", "locked.pem", r"tls_key '.*locked.pem' is protected by a passphrase"),
    ],
)
def test_tls_setup_errors_name_the_file_and_leave_no_socket(
    pem: Path, cert: str, key: str, message: str
) -> None:
    port = free_port()
    with pytest.raises(ValueError, match=message):
        serve(port=port, tls_cert=str(pem / cert), tls_key=str(pem / key), on_error="raise")
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # nothing kept it


# 3. Errors that say what to do, and logs a person can read -----------------------------


def test_warn_logs_the_first_unhealthy_update_then_one_line_a_minute(
    provider: MeterProvider, caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    model = nn.Linear(4, 4)
    monitor = GradMonitor(model, meter_provider=provider)
    monitor._policy.clock = clock
    model(torch.randn(2, 4)).sum().backward()
    model.weight.grad[0, 0] = NAN
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        for _ in range(50):  # one update a second: 49 s without a second line
            monitor.collect()
            clock.advance(1)
        assert len(caplog.records) == 1
        clock.advance(10)  # a minute since the first line
        monitor.collect()
    assert [r.getMessage() for r in caplog.records] == [
        "gradtel: step 1 is warning: NaN=1 Inf=0 (warning > 0, critical > 5); top layers: (root) (1); "
        "first NaN layer in backward order: (root)",
        "gradtel: step 51 is warning: NaN=1 Inf=0 (warning > 0, critical > 5); top layers: (root) (1); "
        "first NaN layer in backward order: (root) (49 more warning updates since the last line)",
    ]


def test_a_failure_is_logged_once_a_minute_per_stage(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    log = RateLimitedLog(logging.getLogger("gradtel"), clock=clock)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        assert log.log("scan", logging.WARNING, "scan failed %d", 1)
        clock.advance(59.9)
        assert not log.log("scan", logging.WARNING, "scan failed %d", 2)
        assert log.log("record", logging.WARNING, "record failed")  # a stage has its own minute
        clock.advance(0.1)
        assert log.log("scan", logging.WARNING, "scan failed %d", 3)
    assert [r.getMessage() for r in caplog.records] == [
        "scan failed 1",
        "record failed",
        "scan failed 3",
    ]


def test_every_log_line_names_the_rank_in_a_distributed_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    registry = CollectorRegistry()
    model = nn.Linear(4, 4)
    monitor = GradMonitor(model, meter_provider=gradtel.prometheus_meter_provider(registry))
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        monitor.collect()  # no gradient yet
        model(torch.randn(2, 4)).sum().backward()
        model.weight.grad[0, 0] = NAN
        monitor.collect()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all(m.startswith("rank 2: gradtel: step ") for m in messages), (
        messages
    )
    assert sample(samples(registry), "gradtel_updates_total", rank="2") == 1


def test_close_is_fast(registry: CollectorRegistry) -> None:
    server = serve(port=0, registry=registry, exit_grace=0)
    assert server.url is not None
    scrape(server.url)
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 0.5  # no polling interval to wait out
