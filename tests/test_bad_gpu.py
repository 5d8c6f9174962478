"""The bad GPU end to end: two real 4-rank torchrun DDP jobs (gloo, CPU) on one real
Prometheus with the rendered rules and one Alertmanager. In one, rank 2's own gradients
are multiplied by 50 from some update on, as a GPU with silent data corruption bends
them, and no value becomes NaN: exactly one page, ``GradtelRankDisagrees``, names rank 2
and its host. The other trains on ordinary random data on every rank for as long: no
alert of any kind, not even pending."""

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

from gradtel.render import KitOptions
from gradtel.tools.stack import Stack, StackTimings, free_port, free_ports

from .conftest import require_tool

pytestmark = pytest.mark.slow

RANKS, BAD_RANK = 4, 2
TRAINER = Path(__file__).with_name("bad_gpu_trainer.py")
TIMINGS = StackTimings(
    scrape_interval="1s", evaluation_interval="1s", group_wait="2s", group_interval="5s"
)
# The shipped rule (10x from the median for 2m, processes older than 2m), in seconds.
OPTIONS = KitOptions(disagree_for="10s")
CORRUPT_AFTER = 12  # seconds after a rank serves: its process is older than disagree_for
RUNS = {"corrupt": BAD_RANK, "steady": -1}


def torchrun(base: int, bad_rank: int, run: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(TRAINER), str(base), str(bad_rank), str(CORRUPT_AFTER)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "GRADTEL_RUN": run},  # one intra-op thread: see tests/conftest.py
        start_new_session=True,  # its workers are stopped with it
    )  # fmt: skip


@pytest.mark.waits(45)
def test_a_rank_whose_gradients_are_bent_50x_pages_once_naming_it_and_a_steady_run_does_not() -> (
    None
):
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    bases = {run: free_ports(RANKS) for run in RUNS}
    targets = [f"127.0.0.1:{base + rank}" for base in bases.values() for rank in range(RANKS)]
    jobs: dict[str, subprocess.Popen[str]] = {}
    with Stack(targets, options=OPTIONS, timings=TIMINGS) as stack:
        try:
            jobs = {run: torchrun(bases[run], bad, run) for run, bad in RUNS.items()}
            said = ""
            out = jobs["corrupt"].stdout
            assert out is not None
            while not (found := re.search(r"corrupted (\d+) (\S+)", said)):
                line = out.readline()
                assert line, f"torchrun ended early: {said!r}"
                said += line
            corrupted = float(found.group(2))

            assert stack.receiver is not None
            deadline = corrupted + 60
            while not stack.receiver.pages:
                assert time.time() < deadline, "no page within 60 s of the corruption"
                time.sleep(0.1)
            time.sleep(6)  # longer than group_interval: a second page would be here by now
            pages = stack.receiver.pages
            assert [(p.receiver, p.alertname, p.labels.get("run")) for p in pages] == [
                ("pager", "GradtelRankDisagrees", "corrupt")
            ], [str(p) for p in pages]
            page = pages[0]
            assert page.severity == "critical"
            assert f"(rank {BAD_RANK}) at " in page.description, page.description
            instance = re.search(r"(\S+) \(rank 2\) at ", page.description)
            assert instance, page.description
            assert (
                f"Hardware: {instance.group(1)} (rank {BAD_RANK}) on host {socket.gethostname()}."
                in page.description
            ), page.description
            assert "median of the run's 4 ranks" in page.description, page.description
            assert set(re.findall(r"\(rank (\d+)\)", page.description)) == {str(BAD_RANK)}
            ratio = re.search(r"at (\S+) times the median", page.description)
            assert ratio and 20 <= float(ratio.group(1)) <= 120, page.description

            # The steady run ran as long, on the same Prometheus: no alert, not even pending.
            alerts = stack.query('max_over_time(ALERTS{run="steady"}[10m])')
            assert alerts == [], alerts
            norms = stack.query('count by (run) (gradtel_local_grad_norm{run=~"corrupt|steady"})')
            assert {(n["metric"]["run"], n["value"][1]) for n in norms} == {
                ("corrupt", "4"),
                ("steady", "4"),
            }
            print(
                f"\ncorruption -> page: {page.received - corrupted:.1f}s; page: {page.description}"
            )
        finally:
            # torchrun stops its workers (in sessions of their own) on SIGTERM.
            for job in jobs.values():
                job.terminate()
            for job in jobs.values():
                try:
                    job.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(job.pid, signal.SIGKILL)
                    job.communicate()
