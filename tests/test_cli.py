"""``gradtel demo`` as a user runs it: a subprocess, scraped while it trains."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradtel.tools.cli import main

from .conftest import Samples, absent, default_ctrl_c, fetch, parse, sample, scrape

pytestmark = pytest.mark.slow


def start_demo(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``gradtel demo`` on a free port; returns the process and its metrics URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gradtel.tools.cli", "demo", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=default_ctrl_c,  # the tests stop it with Ctrl-C
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    found = re.match(r"gradtel demo: serving (http://\S+/metrics)$", first.strip())
    if not found:  # stopped here: a demo left running would fail a later test instead
        process.terminate()  # not kill(): a SIGTERM lets the demo stop the stack it started
        try:
            _, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        pytest.fail(f"unexpected first line {first!r}; exit {process.returncode}; stderr:\n{err}")
    return process, found.group(1)


@pytest.fixture
def stop() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def scrape_until(url: str, done: object, timeout: float = 60) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        found = parse(fetch(url)[0])
        if done(found) or time.monotonic() > deadline:  # type: ignore[operator]
            return found
        time.sleep(0.1)


def test_demo_serves_the_contract_while_it_trains(stop: list[subprocess.Popen[str]]) -> None:
    process, url = start_demo("--steps", "400", "--interval", "0.01")
    stop.append(process)
    before = parse(fetch(url)[0])
    assert sample(before, "gradtel_unhealthy_updates_total", kind="nan", severity="warning") == 0
    absent(before, "gradtel_nan_grads_total", layer="body.0")  # no series before its first NaN

    found = scrape_until(url, lambda s: (s.get(("gradtel_updates_total", frozenset())) or 0) >= 50)
    updates = sample(found, "gradtel_updates_total")
    assert 50 <= updates <= 400
    # The documented schedule: 3 NaN in body.0 on updates 10, 35, ...; 7 Inf in head on 20, 45, ...
    warnings = sum(1 for u in range(1, int(updates) + 1) if u % 25 == 10)
    criticals = sum(1 for u in range(1, int(updates) + 1) if u % 25 == 20)
    assert sample(found, "gradtel_unhealthy_updates_total", kind="nan", severity="warning") in (
        warnings,
        warnings + 1,  # the scrape may fall between two updates' records
    )
    assert (
        sample(found, "gradtel_unhealthy_updates_total", kind="inf", severity="critical")
        >= criticals
    )
    assert sample(found, "gradtel_unhealthy_updates_total", kind="nan", severity="critical") == 0
    assert sample(found, "gradtel_unhealthy_updates_total", kind="inf", severity="warning") == 0
    assert sample(found, "gradtel_nan_grads_total", layer="body.0") >= 3 * warnings
    assert sample(found, "gradtel_inf_grads_total", layer="head") >= 7 * criticals
    absent(found, "gradtel_inf_grads_total", layer="embed")

    # Keep scraping like Prometheus would: the endpoint waits at exit for a scrape
    # of the last unhealthy update, and this scraper provides it.
    while process.poll() is None:
        try:
            scrape(url)
        except OSError:
            pass
        time.sleep(0.2)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "done: 400 updates, 32 unhealthy, each kept from the optimizer by gradtel" in out
    assert "step 10 is warning: NaN=3 Inf=0" in out and "top layers: body.0 (3)" in out
    assert "step 20 is critical: NaN=0 Inf=7" in out and "top layers: head (7)" in out
    assert "Traceback" not in err


def test_ctrl_c_stops_the_demo_cleanly(stop: list[subprocess.Popen[str]]) -> None:
    process, url = start_demo("--steps", "100000", "--interval", "0.01")
    stop.append(process)
    fetch(url)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0
    assert out.rstrip().endswith("stopped by Ctrl-C")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_demo_reports_a_taken_port_and_exits_non_zero(stop: list[subprocess.Popen[str]]) -> None:
    process, url = start_demo("--steps", "100000", "--interval", "0.05")
    stop.append(process)
    port = url.rsplit(":", 1)[1].split("/")[0]
    second = subprocess.run(
        [sys.executable, "-m", "gradtel.tools.cli", "demo", "--port", port, "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in second.stderr
    assert "Traceback" not in second.stderr


def test_banner_styles_counts_on_a_terminal() -> None:
    from gradtel import GradHealth
    from gradtel.tools.banner import status_line

    line = status_line(GradHealth(nan_by_layer={"a": 2}, inf_by_layer={"b": 9}), color=True)
    assert line == "\033[1;31mNaN:2\033[0m \033[1;7;31mInf:9\033[0m critical"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["demo", "--interval", "-1"], "argument --interval: must be >= 0, got -1"),
        (["demo", "--port", "abc"], "argument --port: invalid int value: 'abc'"),
    ],
)
def test_bad_command_line_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_out_of_range_port_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--port", "70000", "--steps", "1"]) == 1
    assert (
        "port must be from 0 to 65535 (0 picks a free port), got 70000" in capsys.readouterr().err
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import gradtel

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"gradtel {gradtel.__version__}\n"


@pytest.mark.waits(30)
def test_demo_stack_prints_a_page_within_a_minute_and_cleans_up(
    stop: list[subprocess.Popen[str]],
) -> None:
    from .conftest import require_tool

    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    started = time.monotonic()
    process, url = start_demo("--stack", "--steps", "100000", "--interval", "0.05")
    stop.append(process)
    assert process.stdout is not None
    stack_line = process.stdout.readline()
    found = re.search(
        r"Prometheus (http://\S+)/alerts and Alertmanager (http://\S+) .*data in (\S+)\)",
        stack_line,
    )
    assert found, stack_line
    prometheus, alertmanager, data = found.groups()
    assert os.path.isdir(data)
    page = ""
    while time.monotonic() - started < 60:
        line = process.stdout.readline()
        if line.startswith("PAGE [pager] firing critical GradtelInfGradients"):
            page = line
            break
    assert page, "no page within a minute"
    # 7 Inf in head per injected update; more than one may come before the page leaves.
    layers = re.search(r"Layers with Inf values in that window: head \((\d+)\)\.", page)
    assert layers and int(layers.group(1)) % 7 == 0, page
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stopped by Ctrl-C" in out and "Traceback" not in err
    assert not os.path.exists(data), "the stack's data folder was left behind"
    for address in (prometheus, alertmanager, url):
        with pytest.raises(OSError):
            fetch(address)


def test_demo_stack_names_the_packages_when_prometheus_is_missing(tmp_path: object) -> None:
    bare_path = os.path.dirname(sys.executable)  # the venv, without /usr/bin
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradtel.tools.cli",
            "demo",
            "--stack",
            "--port",
            "0",
            "--steps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": bare_path},
    )
    assert result.returncode == 1
    assert "prometheus not found on PATH" in result.stderr
    assert (
        "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"
        in result.stderr
    )


def test_demo_stack_victoriametrics_names_its_package_when_missing(tmp_path: Path) -> None:
    """The scale-out set-up needs VictoriaMetrics besides Prometheus and Alertmanager."""
    from .conftest import require_tool

    for tool in ("prometheus", "prometheus-alertmanager"):
        (tmp_path / tool).symlink_to(require_tool(tool, tool))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradtel.tools.cli",
            "demo",
            "--stack",
            "victoriametrics",
            "--port",
            "0",
            "--steps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{tmp_path}:{os.path.dirname(sys.executable)}"},
    )
    assert result.returncode == 1
    assert "victoria-metrics not found on PATH" in result.stderr
    assert "apt-get install -y --no-install-recommends victoria-metrics" in result.stderr


def test_demo_refuses_an_unknown_stack() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gradtel.tools.cli", "demo", "--stack", "thanos", "--steps", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "invalid choice: 'thanos' (choose from" in result.stderr
