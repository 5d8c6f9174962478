"""A real 2-process torchrun DDP run (gloo, CPU): one endpoint per rank, `rank` on every series,
and the shipped alert rule evaluated by a real Prometheus names the rank."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradtel.stack import Stack, StackTimings, free_port

from .conftest import fetch, parse, require_tool, sample

pytestmark = pytest.mark.slow


def two_free_ports() -> int:
    """A port P such that P and P + 1 are both free on loopback."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports")


def test_each_rank_serves_its_own_series_and_the_alert_names_rank_1() -> None:
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    base = two_free_ports()
    run = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(Path(__file__).with_name("ddp_trainer.py")), str(base)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    urls = [f"http://127.0.0.1:{base + rank}/metrics" for rank in (0, 1)]
    stack = Stack([f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"], timings=StackTimings("1s", "1s", "5s", "5s"))
    try:
        assert run.stdout is not None
        said = ""
        while len(re.findall(r"rank \d serving \S+/metrics", said)) < 2:
            line = run.stdout.readline()
            assert line, f"torchrun ended early: {said!r}"
            said += line
        assert sorted(re.findall(r"rank \d serving \S+/metrics", said)) == [
            f"rank 0 serving {urls[0]}",
            f"rank 1 serving {urls[1]}",
        ], said
        stack.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            one = parse(fetch(urls[1])[0])
            if sample(one, "gradtel_nan_grads_total", layer="head", rank="1") >= 4:
                break
            time.sleep(0.2)
        zero = parse(fetch(urls[0])[0])
        assert sample(one, "gradtel_unhealthy_updates_total", kind="nan", severity="warning", rank="1") >= 1
        assert sample(zero, "gradtel_nan_grads_total", layer="head", rank="0") == 0
        assert sample(zero, "gradtel_unhealthy_updates_total", kind="nan", severity="warning", rank="0") == 0
        assert all(dict(labels).get("rank") == "0" for name, labels in zero if name.startswith("gradtel_"))

        firing: list[dict] = []
        while time.monotonic() < deadline + 30 and not firing:
            firing = stack.query('ALERTS{alertstate="firing", alertname="GradtelNaNGradients"}')
            time.sleep(0.5)
        assert [alert["metric"]["rank"] for alert in firing] == ["1"], firing
        assert firing[0]["metric"]["instance"] == f"127.0.0.1:{base + 1}"
    finally:
        run.terminate()
        run.communicate(timeout=30)
        stack.stop()
