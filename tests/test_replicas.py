"""A replica that drifts, end to end: a real 4-rank torchrun DDP job (gloo, CPU) whose rank 3
has one parameter element changed by 1e-3 after an optimizer step, scraped by a real
Prometheus with the rendered rules at 1 s settings, or through the scale-out set-up into
VictoriaMetrics, whose vmalert reads the alert's recording rules back through the store;
routed by a real Alertmanager to a webhook receiver: exactly one page, naming rank 3 and
its instance."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradtel.metrics import REPLICA_FINGERPRINT
from gradtel.tools.stack import Stack, StackTimings, free_port, free_ports

from .conftest import require_tool
from .test_distributed import scale_out_stacks

pytestmark = pytest.mark.slow

RANKS, BAD_RANK = 4, 3
CHECK_EVERY = 30
"""Updates between checks: about 2 s at the trainer's pace, longer than the 1 s scrape."""
SERIES_BUDGET = 200
"""Series a healthy rank may export (docs/many-ranks.md)."""
ALERT = "GradtelReplicaDrifted"


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


PAGE_WITHIN = {"prometheus": 60, "victoriametrics": 180}
"""Seconds from the corruption to the page, at most: vmalert's rules read each other's
results through the store, each at least its latency offset old."""


@pytest.mark.parametrize("store", PAGE_WITHIN)
@pytest.mark.waits(80)
def test_one_page_names_the_rank_whose_parameters_drifted(tmp_path: Path, store: str) -> None:
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    base = free_ports(RANKS)
    go = tmp_path / "go"
    trainer = Path(__file__).with_name("replica_trainer.py")
    run = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(trainer), str(base), str(CHECK_EVERY), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its workers hold the pipes: they are stopped with it
    )  # fmt: skip
    targets = [f"127.0.0.1:{base + rank}" for rank in range(RANKS)]
    if store == "prometheus":
        stacks = [Stack(targets, timings=StackTimings("1s", "1s", "1s", "5s"))]
    else:
        stacks = scale_out_stacks(targets)
    stack = stacks[-1]  # the store that pages here
    try:
        assert run.stdout is not None
        said = ""
        while len(re.findall(r"rank \d serving", said)) < RANKS:
            line = run.stdout.readline()
            assert line, f"torchrun ended early: {said!r}"
            said += line
        for started in reversed(stacks):  # the store the agent also writes to first
            started.start()
        assert stack.receiver is not None

        def checked_twice() -> bool:
            found = stack.query(f'{REPLICA_FINGERPRINT}{{slot="previous"}}')
            return len(found) == RANKS

        wait_for(checked_twice, 60, "two replica checks of every rank")
        # Healthy replicas: the same fingerprint, no page; series within the budget.
        healthy = stack.query(f'{REPLICA_FINGERPRINT}{{slot="latest"}}')
        series = stack.query('count by (rank) ({__name__=~"gradtel_.*"})')
        replica = stack.query('count by (rank) ({__name__=~"gradtel_replica_.*"})')
        assert sorted(int(s["value"][1]) for s in replica) == [4] * RANKS, replica
        per_rank = sorted(int(s["value"][1]) for s in series)
        assert len(per_rank) == RANKS and per_rank[-1] <= SERIES_BUDGET, series
        print(f"\nseries per healthy rank: {per_rank} (4 of them the replica check's)")
        assert stack.receiver.firing() == [], [str(p) for p in stack.receiver.firing()]
        assert len(healthy) == RANKS

        go.touch()
        line = run.stdout.readline()
        assert line.startswith("corrupted "), line
        corrupted = float(line.split()[2])

        def paged() -> bool:
            assert stack.receiver is not None
            return any(p.alertname == ALERT for p in stack.receiver.firing("pager"))

        wait_for(paged, PAGE_WITHIN[store], f"a {ALERT} page")
        pages = [p for p in stack.receiver.firing("pager") if p.alertname == ALERT]
        page = pages[0]
        took = page.received - corrupted
        # Checks go on every ~2 s: a page that resolved and fired again would be here.
        time.sleep(8)
        pages = [p for p in stack.receiver.firing("pager") if p.alertname == ALERT]
        assert len(pages) == 1, [str(p) for p in pages]
        assert page.severity == "critical"
        assert f"the parameters of rank {BAD_RANK} ({targets[BAD_RANK]}) differ" in page.description
        hardware = (
            f"Hardware: {targets[BAD_RANK]} (rank {BAD_RANK}) on host {socket.gethostname()}."
        )
        assert page.description.endswith(hardware), page.description
        others = [p for p in stack.receiver.pages if p.alertname != ALERT]
        assert others == [], [str(p) for p in others]
        print(f"{store}: corruption -> page: {took:.1f}s; page: {page.description}")
    finally:
        run.terminate()  # torchrun stops its workers (each in a session of its own), then exits
        try:
            run.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
        for started in stacks:
            started.stop()
