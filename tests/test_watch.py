"""``gradtel watch`` against a real running demo, read through a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

import gradtel
from gradtel import GradMonitor, Thresholds
from gradtel.tools.stack import free_port
from gradtel.tools.terminal import Snapshot, fit, frame, scrape

from .conftest import Net, net_backward

pytestmark = pytest.mark.slow

RED_BOLD = "\033[1;31m"
RED_BOLD_REVERSE = "\033[1;7;31m"


def start_demo(port: int, interval: str = "0.3") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gradtel.tools.cli",
            "demo",
            "--port",
            str(port),
            "--interval",
            interval,
            "--steps",
            "100000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class Terminal:
    """A command running on a pseudo-terminal, and everything it wrote."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gradtel.tools.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        self.screen = ""

    def wait_for(self, *texts: str, timeout: float = 40) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(text in self.screen for text in texts):
                return True
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:
                    return all(text in self.screen for text in texts)
        return False

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        os.close(self.master)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes] | Terminal]]:
    started: list[subprocess.Popen[bytes] | Terminal] = []
    yield started
    for item in started:
        if isinstance(item, Terminal):
            item.close()
        elif item.poll() is None:
            item.kill()
            item.wait(timeout=10)


def test_watch_shows_the_banner_styled_by_the_thresholds(processes: list) -> None:
    port = free_port()
    processes.append(start_demo(port, interval="0.15"))
    terminal = Terminal("watch", f"http://127.0.0.1:{port}/metrics", "--interval", "0.05")
    processes.append(terminal)
    # Demo schedule: 3 NaN in body.0 (warning) and 7 Inf in head (critical).
    assert terminal.wait_for(
        f"{RED_BOLD}NaN:3\033[0m warning", f"{RED_BOLD_REVERSE}Inf:7\033[0m critical"
    ), terminal.screen[-2000:]
    assert terminal.wait_for("top layers, latest update: head (7)")
    assert "\033[H\033[2J" in terminal.screen  # refreshed in place
    assert "updates " in terminal.screen and "/s), last update" in terminal.screen


def test_watch_says_when_unreachable_and_picks_the_endpoint_up_later(processes: list) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    terminal = Terminal("watch", url, "--interval", "0.2")
    processes.append(terminal)
    assert terminal.wait_for(f"{url}\r\n  unreachable ([Errno 111] Connection refused); retrying")
    processes.append(start_demo(port, interval="0.05"))
    assert terminal.wait_for("last update", timeout=60), terminal.screen[-1000:]


def test_watch_once_exit_codes() -> None:
    dead = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradtel.tools.cli",
            "watch",
            f"http://127.0.0.1:{free_port()}/metrics",
            "--once",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode == 1 and "unreachable" in dead.stdout
    assert "retrying" not in dead.stdout and "Ctrl-C" not in dead.stdout  # it does not


def test_watch_tells_an_endpoint_that_is_not_prometheus_from_an_unreachable_one(
    registry: CollectorRegistry,
) -> None:
    GradMonitor(Net(), meter_provider=gradtel.prometheus_meter_provider(registry))
    server = gradtel.serve(port=0, registry=registry)
    try:
        url = f"http://127.0.0.1:{server.port}/healthz"  # JSON, not metrics
        run = subprocess.run(
            [sys.executable, "-m", "gradtel.tools.cli", "watch", url, "--once"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.close()
    assert run.returncode == 1
    assert f"no Prometheus metrics at {url} (" in run.stdout and "unreachable" not in run.stdout


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "no Prometheus metrics at {url} (BadStatusLine"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "HTTP 404 Not Found from {url}"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",  # cut short
            "no Prometheus metrics at {url} (IncompleteRead",
        ),
    ],
)
def test_watch_says_what_a_wrong_answer_was_without_a_traceback(answer: bytes, said: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/metrics"

        def answer_once() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(answer)

        server = threading.Thread(target=answer_once)
        server.start()
        run = subprocess.run(
            [sys.executable, "-m", "gradtel.tools.cli", "watch", url, "--once"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        server.join(timeout=10)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert said.format(url=url) in run.stdout, run.stdout


def test_frame_shows_nothing_for_counts_when_healthy() -> None:
    healthy = Snapshot(taken=100.0, updates=10, last_update=99.5, status=0.0)
    healthy.latest = {"nan": {"a": 0.0}, "inf": {"a": 0.0}}
    lines = frame("u", healthy, None, Thresholds(), color=True)
    assert lines[1] == "  healthy" and "NaN" not in lines[1]
    sick = Snapshot(
        taken=101.0, updates=20, last_update=100.9, bands={("nan", "critical"): 1}, status=2.0
    )
    sick.latest = {"nan": {"a": 6.0, "b": 1.0}, "inf": {"a": 1.0}}
    lines = frame("u", sick, healthy, Thresholds(), color=True)
    assert lines[1] == f"  {RED_BOLD_REVERSE}NaN:7\033[0m {RED_BOLD}Inf:1\033[0m critical"
    assert lines[2] == "  updates 20 (10.0/s), last update 0.1s ago"
    assert lines[3].startswith("  unhealthy updates since the last refresh: 1;")
    assert lines[4] == "  top layers, latest update: a (7), b (1); since start: none"


@pytest.mark.parametrize("width", [120, 80, 50])
def test_lines_fit_the_terminal_and_break_between_fields_never_inside_a_word(width: int) -> None:
    sick = Snapshot(taken=101.0, updates=20, last_update=100.9, status=2.0)
    sick.bands = {
        (kind, severity): 12345.0 for kind in ("nan", "inf") for severity in ("warning", "critical")
    }
    sick.latest = {
        "nan": {"transformer.h.11.attn.c_attn": 6.0, "transformer.h.0.mlp.c_proj": 1.0},
        "inf": {},
    }
    sick.totals = {
        "nan": {"transformer.h.11.attn.c_attn": 600.0, "lm_head": 3.0},
        "inf": {"wte": 2.0},
    }
    lines = frame("http://127.0.0.1:9464/metrics", sick, None, Thresholds(), color=False)
    fitted = [piece for line in lines for piece in fit(line, width)]
    assert all(len(piece) <= width for piece in fitted), fitted
    assert " ".join(" ".join(lines).split()) == " ".join(
        " ".join(fitted).split()
    )  # every word whole
    assert any("inf critical 12345" in piece for piece in fitted)  # a field stays on one line


def test_watch_never_says_healthy_without_an_update(registry: CollectorRegistry) -> None:
    thresholds = gradtel.Thresholds()
    with gradtel.serve(port=0, registry=registry, exit_grace=0) as server:
        assert server.url is not None
        empty = frame(server.url, scrape(server.url), None, thresholds, color=False)
        assert (
            empty[1]
            == f"  no gradtel metrics at {server.url}: is this a gradtel endpoint, and is a GradMonitor made?"
        )
        provider = gradtel.prometheus_meter_provider(registry)
        model = Net()
        monitor = GradMonitor(model, meter_provider=provider)
        assert (
            frame(server.url, scrape(server.url), None, thresholds, color=False)[1]
            == "  no update yet"
        )
        monitor.collect()  # no gradient: not scanned
        lines = frame(server.url, scrape(server.url), None, thresholds, color=False)
        assert lines[1] == "  unknown (latest update not scanned; 1 not scanned since start)"
        net_backward(model)
        monitor.collect()
        assert (
            frame(server.url, scrape(server.url), None, thresholds, color=False)[1] == "  healthy"
        )
        provider.shutdown()
    # Two ranks behind one URL, one of which did not look: not "healthy" either.
    mixed = Snapshot(taken=1.0, updates=5, last_update=1.0, status=0.0, unknown=True)
    assert frame("u", mixed, None, thresholds, color=False)[1].startswith("  unknown")
