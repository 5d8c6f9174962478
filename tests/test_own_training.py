"""docs/deploy.md's "Your own training", run as written: its commands render the kit for one
training process and start Alertmanager and Prometheus by hand; a real gradtel process then
has a NaN update, and a real webhook gets the page. On Prometheus 2.x and 3.x.

The doc's ports are swapped for free ones, so that the test runs beside anything else."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradtel.tools.stack import WebhookReceiver, free_port, prometheus_version

from .conftest import require_tool
from .prometheus_versions import prometheus_bin  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
TRAINER = Path(__file__).with_name("trainer.py")
PORTS = {"trainer": 9464, "webhook": 9095, "alertmanager": 9093, "prometheus": 9090}
"""The ports the doc uses."""
PAGE_DEADLINE = 60.0


def commands() -> list[str]:
    """The shell blocks of the section, in order: render, Alertmanager, Prometheus."""
    text = DOC.read_text()
    section = text[text.index("\n## Your own training\n") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def test_the_doc_gives_the_commands_with_the_kit_s_ports() -> None:
    render, alertmanager, prometheus = commands()
    assert render.startswith("gradtel render --out my-kit --targets 127.0.0.1:9464 ")
    assert "prometheus-alertmanager --config.file=alertmanager.yml" in alertmanager
    assert alertmanager.rstrip().endswith("--cluster.listen-address=")
    assert "\nprometheus --config.file=prometheus.yml" in prometheus
    for name, port in PORTS.items():
        assert f"127.0.0.1:{port}" in "".join(commands()), name


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started in their own session, and all they started, stopped at the end."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{url}: exited at start:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{url} not ready:\n{log.read_text()[-3000:]}")


@pytest.mark.waits(35)
def test_the_doc_s_commands_page_for_a_real_training_process(
    prometheus_bin: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
    started: list[subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    receiver = WebhookReceiver()
    ports = {**{name: free_port() for name in PORTS}, "webhook": receiver.port}
    swap = lambda block: re.sub(  # noqa: E731
        r"127\.0\.0\.1:(\d+)",
        lambda found: (
            f"127.0.0.1:{ports[next(n for n, p in PORTS.items() if str(p) == found.group(1))]}"
        ),
        block,
    )
    # The doc's binary names, this version's Prometheus first; `gradtel` from this environment.
    env = {
        **os.environ,
        "PATH": f"{prometheus_bin}:{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    try:
        render, *servers = (swap(block) for block in commands())
        rendered = subprocess.run(
            ["bash", "-euc", render], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert rendered.returncode == 0, rendered.stderr
        for name, block in zip(("alertmanager", "prometheus"), servers):
            log = tmp_path / f"{name}.log"
            with log.open("wb") as out:
                started.append(
                    subprocess.Popen(
                        ["bash", "-euc", block],
                        cwd=tmp_path,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            wait_ready(f"http://127.0.0.1:{ports[name]}/-/ready", started[-1], log)

        trainer = subprocess.Popen(
            [sys.executable, str(TRAINER), str(ports["trainer"]), "--inject", "60:nan:7:body.0"],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        started.append(trainer)
        assert trainer.stdout is not None
        lines = iter(trainer.stdout.readline, b"")
        injected = float(next(line for line in lines if line.startswith(b"injected ")).split()[2])
        deadline = injected + PAGE_DEADLINE
        while not receiver.firing("pager") and time.time() < deadline:
            time.sleep(0.2)
        pages = receiver.firing("pager")
        assert pages, (receiver.pages, (tmp_path / "prometheus.log").read_text()[-3000:])
        [page] = pages
        assert (page.alertname, page.severity) == ("GradtelNaNGradients", "critical")
        assert "Layers with NaN values in that window: body.0 (7)." in page.description
        with capsys.disabled():
            version = ".".join(map(str, prometheus_version(str(prometheus_bin / "prometheus"))))
            print(
                f"\nPrometheus {version}: injection -> page {page.received - injected:.1f}s with the doc's commands"
            )
    finally:
        receiver.close()
