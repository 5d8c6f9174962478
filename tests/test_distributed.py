"""A real 4-process torchrun DDP run (gloo, CPU) in which one rank gets one NaN in its input
batch: each rank serves its own endpoint, the rank where the NaN started is the one whose
origin counter moves, torchrun's SIGTERM to the other ranks loses nothing, and a real
Prometheus and Alertmanager with the rendered kit deliver exactly one page for the incident."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradtel.stack import Stack, StackTimings, free_port

from .conftest import parse, require_tool, sample, scrape

pytestmark = pytest.mark.slow

RANKS, BAD_RANK, BAD_UPDATE = 4, 2, 80


def free_ports(count: int) -> int:
    """A port P such that P .. P + count - 1 are all free on loopback."""
    for _ in range(50):
        base = free_port()
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, probe in enumerate(sockets):
                probe.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


def test_one_page_says_the_nan_originated_on_rank_2_and_nothing_is_lost_at_exit() -> None:
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    base = free_ports(RANKS)
    run = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(Path(__file__).with_name("ddp_trainer.py")), str(base), str(BAD_RANK), str(BAD_UPDATE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    urls = [f"http://127.0.0.1:{base + rank}/metrics" for rank in range(RANKS)]
    stack = Stack([f"127.0.0.1:{base + rank}" for rank in range(RANKS)], timings=StackTimings("1s", "1s", "5s", "5s"))
    try:
        assert run.stdout is not None
        said = ""
        while len(re.findall(r"rank \d serving \S+/metrics", said)) < RANKS:
            line = run.stdout.readline()
            assert line, f"torchrun ended early: {said!r}"
            said += line
        assert sorted(re.findall(r"rank \d serving \S+/metrics", said)) == [
            f"rank {rank} serving {urls[rank]}" for rank in range(RANKS)
        ], said
        stack.start()
        line = run.stdout.readline()
        assert line.startswith("injected "), line
        injected = float(line.split()[1])

        # Rank 2 raised on its NaN and died; torchrun then stopped the other ranks with
        # SIGTERM. Every rank's endpoint stayed up until Prometheus had its last update.
        run.communicate(timeout=120)
        assert run.returncode != 0
        # The targets are gone: their series are stale now, read their last values.
        found = stack.query('last_over_time(gradtel_unhealthy_updates_total{kind="nan",severity="critical"}[5m])')
        assert sorted((a["metric"]["rank"], a["value"][1]) for a in found) == [
            (str(rank), "1") for rank in range(RANKS)
        ], found
        origins = stack.query('last_over_time(gradtel_origin_updates_total{kind="nan"}[5m])')
        assert sorted((a["metric"]["rank"], a["value"][1]) for a in origins) == [
            (str(rank), "1" if rank == BAD_RANK else "0") for rank in range(RANKS)
        ], origins
        layers = stack.query("last_over_time(gradtel_nan_grads_total[5m])")
        assert layers and not [a for a in layers if "module" in a["metric"]["layer"]], layers

        assert stack.receiver is not None
        deadline = injected + 40
        while time.time() < deadline and not stack.receiver.firing("pager"):
            time.sleep(0.2)
        time.sleep(8)  # longer than group_wait + group_interval: a second page would be here
        pages = stack.receiver.firing("pager")
        assert len(pages) == 1, [str(p) for p in pages]
        page = pages[0]
        assert (page.alertname, page.severity) == ("GradtelNaNGradients", "critical")
        assert "affected ranks: 4." in page.description
        assert "originated on rank 2." in page.description, page.description
        assert f"at update {BAD_UPDATE}." in page.description
        assert [p for p in stack.receiver.firing("chat") if p.alertname != "GradtelExporterDown"] == []
        print(f"\ninjection -> page: {page.received - injected:.1f}s; page: {page.description}")
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        stack.stop()
