"""A real 4-process torchrun DDP run (gloo, CPU) in which one rank gets one NaN in its input
batch: each rank serves its own endpoint, the rank where the NaN started is the one whose
origin counter moves, torchrun's SIGTERM to the other ranks loses nothing, and a real
Prometheus and Alertmanager with the rendered kit deliver exactly one page for the incident:
scraping the ranks directly, or through the kit's scale-out set-up (a Prometheus agent
remote-writing to a central Prometheus and to VictoriaMetrics with vmalert). FSDP's
flavours find the origin rank too, and every flavour keeps finding it with gradient
accumulation, a reduce-scatter of the application's own and a monitor created again; a
job that ends on gradtel's checkpoint agreement exits 0."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import gradtel
from gradtel.tools.stack import Stack, StackTimings, free_port, free_ports

from .conftest import net, require_tool

pytestmark = pytest.mark.slow

RANKS, BAD_RANK = 4, 2


def scale_out_stacks(targets: list[str]) -> list[Stack]:
    """The kit's scale-out set-up: one Prometheus agent scrapes the ranks and remote-writes
    to a central Prometheus and to VictoriaMetrics (with vmalert) alike; each store has its
    own Alertmanager and receiver. (Scraping by the evaluating Prometheus itself is the
    1,024-rank replay's and the other end-to-end tests' set-up.)"""
    require_tool("victoria-metrics", "victoria-metrics")
    timings = StackTimings("1s", "1s", "5s", "5s")
    victoria = Stack([], timings=timings, store="victoriametrics")
    return [Stack(targets, timings=timings, agent=True, also_write=[victoria.write_url]), victoria]


@pytest.mark.waits(50)
def test_one_page_says_the_nan_originated_on_rank_2_and_nothing_is_lost_at_exit(
    tmp_path: Path,
) -> None:
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    base = free_ports(RANKS)
    go = tmp_path / "go"
    run = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(Path(__file__).with_name("ddp_trainer.py")), str(base), str(BAD_RANK), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its workers hold the pipes: they are stopped with it
    )  # fmt: skip
    urls = [f"http://127.0.0.1:{base + rank}/metrics" for rank in range(RANKS)]
    stores = scale_out_stacks([f"127.0.0.1:{base + rank}" for rank in range(RANKS)])
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
        for stack in reversed(stores):  # the store the agent also writes to first
            stack.start()
        # Every rank scraped (and so kept up at exit until its last update is scraped).
        healthy = [(str(rank), "0") for rank in range(RANKS)]
        assert last_values(stores[0], "gradtel_nonfinite_loss_updates_total", healthy) == healthy
        go.touch()
        line = run.stdout.readline()
        assert line.startswith("injected "), line
        _, bad_update, injected = line.split()

        # Rank 2 raised on its NaN and died; torchrun then stopped the other ranks with
        # SIGTERM. Every rank's endpoint stayed up until the agent had its last update.
        run.communicate(timeout=120)
        assert run.returncode != 0
        for stack in stores:
            assert_every_rank_scraped(stack)
        deadline = float(injected) + 40
        while time.time() < deadline and not all(paged(stack) for stack in stores):
            time.sleep(0.2)
        time.sleep(6)  # longer than group_wait: a page per rank would be here by now
        for stack in stores:
            assert_one_page(stack, float(injected), int(bad_update))
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)  # torchrun and the workers that hold its pipes
            run.communicate()
        for stack in stores:
            stack.stop()


def paged(stack: Stack) -> bool:
    return stack.receiver is not None and bool(stack.receiver.firing("pager"))


def where(stack: Stack) -> str:
    return f"{stack.store}{' behind an agent' if stack.agent else ''}"


def last_values(
    stack: Stack, series: str, expected: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Each rank's last value of ``series``, polled until it is ``expected`` or 30 s have
    passed: a store behind an agent holds the newest samples back for a while
    (VictoriaMetrics: ``-search.latencyOffset``)."""
    deadline = time.monotonic() + 30
    while True:
        # The targets are gone: their series are stale now, read their last values.
        found = sorted(
            (a["metric"]["rank"], a["value"][1])
            for a in stack.query(f"last_over_time({series}[5m])")
        )
        if found == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def assert_every_rank_scraped(stack: Stack) -> None:
    unhealthy = [(str(rank), "1") for rank in range(RANKS)]
    series = 'gradtel_unhealthy_updates_total{kind="nan",severity="critical"}'
    assert last_values(stack, series, unhealthy) == unhealthy, where(stack)
    origins = [(str(rank), "1" if rank == BAD_RANK else "0") for rank in range(RANKS)]
    series = 'gradtel_origin_updates_total{kind="nan"}'
    assert last_values(stack, series, origins) == origins, where(stack)
    layers = stack.query("last_over_time(gradtel_nan_grads_total[5m])")
    assert layers and not [a for a in layers if "module" in a["metric"]["layer"]], layers


def assert_one_page(stack: Stack, injected: float, bad_update: int) -> None:
    assert stack.receiver is not None
    pager = stack.receiver.firing("pager")
    pages = [p for p in pager if p.alertname == "GradtelNaNGradients"]
    assert len(pages) == 1, (where(stack), [str(p) for p in pager], stack.log("vmalert"))
    page = pages[0]
    # Rank 2 raised on its NaN (on_critical="raise"), the ranks whose all-reduce lost it
    # raised too: one crash page for the run, after NaN, naming rank 2's exception.
    crashes = [p for p in pager if p.alertname == "GradtelTrainingCrashed"]
    assert len(crashes) == 1, (where(stack), [p.description for p in crashes])
    assert f"after NaN gradients at step {bad_update}" in crashes[0].description, crashes[
        0
    ].description
    assert "(rank 2): NonFiniteGradientError" in crashes[0].description, crashes[0].description
    assert len(pager) == 2, (where(stack), [str(p) for p in pager])
    assert (page.alertname, page.severity) == ("GradtelNaNGradients", "critical")
    assert "affected ranks: 4." in page.description, (where(stack), page.description)
    assert "originated on rank 2." in page.description, (where(stack), page.description)
    assert "The loss was already non-finite: it entered in the forward pass." in page.description
    assert f"at step {bad_update}." in page.description, (where(stack), page.description)
    assert "Layers with NaN values in that window: body." in page.description, (
        where(stack),
        page.description,
    )
    assert [p for p in stack.receiver.firing("chat") if p.alertname != "GradtelExporterDown"] == []
    print(
        f"\n{where(stack)}: injection -> page: {page.received - injected:.1f}s; page: {page.description}"
    )


@pytest.mark.waits(35)
def test_a_replay_of_1024_ranks_pages_once_naming_every_rank_and_the_origin() -> None:
    """``benchmarks/bench_ranks.py``: 1,024 simulated ranks through a real Prometheus and
    Alertmanager with the kit's timings (scrape every 5 s, group_wait 10 s)."""
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_ranks.py"
    run = subprocess.run(
        [sys.executable, str(bench), "--ranks", "1024", "--baseline", "1", "--settle", "4", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert [p["description"] for p in result["pages"]] == [
        "gradtel: an update in the last 10m had more than 5 NaN gradient values; affected ranks: 1024. "
        f"It originated on rank 2. Hardware: node-0:9466 (rank 2) on host {socket.gethostname()}. "
        "Layers with NaN values in that window: lm_head (4), norm (2)."
    ], result["pages"]
    assert result["chat"] == []
    print("\n" + "\n".join(run.stdout.splitlines()[:3]))


def test_fsdp_counts_each_rank_before_the_reduce_scatter_in_both_flavours() -> None:
    """``fully_shard`` (gradients are DTensor shards) and the older wrapper, 2 ranks, NaN on rank 1."""
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(Path(__file__).with_name("fsdp_trainer.py")), "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    said = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    for flavour in ("fully_shard", "FullyShardedDataParallel"):
        ranks = sorted((r for r in said if r.get("flavour") == flavour), key=lambda r: r["rank"])
        assert [r["rank"] for r in ranks] == [0, 1], said
        assert all(r["layers"] == ["0", "2"] for r in ranks), ranks  # no _fsdp_wrapped_module
        healthy, bad = zip(*(r["updates"] for r in ranks))
        assert [u["local_nan"] for u in healthy] == [0, 0] and [u["nan"] for u in healthy] == [
            0,
            0,
        ], ranks
        assert [u["originated"] for u in bad] == [False, True], ranks
        assert bad[0]["local_nan"] == 0 and bad[1]["local_nan"] > 0, ranks
        assert sum(u["nan"] for u in bad) > 0, ranks  # the reduced shards carry it
        assert [r["origin_nan"] for r in ranks] == [0, 1], ranks
    # Only rank 1's shard is bad, and no rank saves: a sharded save is a collective.
    agreed = sorted((r for r in said if "allowed" in r), key=lambda r: r["rank"])
    assert [(r["healthy"], r["allowed"]) for r in agreed] == [(True, False), (False, False)], said


def torchrun(script: str, *args: str, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(Path(__file__).with_name(script)), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def origins() -> dict[str, list[dict[str, Any]]]:
    """``origin_trainer.py``'s scenarios, each rank's line in rank order."""
    run = torchrun("origin_trainer.py")
    assert run.returncode == 0, run.stderr[-3000:]
    said: dict[str, list[dict[str, Any]]] = {}
    for line in run.stdout.splitlines():
        if line.startswith("{"):
            one = json.loads(line)
            said.setdefault(one["scenario"], []).append(one)
    return {scenario: sorted(ranks, key=lambda r: r["rank"]) for scenario, ranks in said.items()}


SHARES_ORIGINS = pytest.mark.xdist_group("distributed-origins")
"""On one pytest-xdist worker (``--dist loadgroup``), which runs ``origin_trainer.py`` once."""


FLAVOURS = [
    "DistributedDataParallel",
    "FullyShardedDataParallel",
    "FullyShardedDataParallel/NO_SHARD",
    "fully_shard",
]


@SHARES_ORIGINS
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_backward_passes_accumulated_without_no_sync_count_the_origin_on_its_own_rank(
    origins: dict[str, list[dict[str, Any]]], flavour: str
) -> None:
    """Every backward pass is reduced, and the next adds onto the reduced gradients: the NaN
    rank 1 had in the first is in every rank's second, yet it is rank 1's alone."""
    ranks = origins[f"accumulation/{flavour}"]
    assert [r["rank"] for r in ranks] == [0, 1], ranks
    (healthy, bad, after), (healthy_1, bad_1, after_1) = (r["updates"] for r in ranks)
    assert [u["local"] for u in (healthy, after, healthy_1, after_1)] == [[0, 0]] * 4, ranks
    assert bad["local"] == [0, 0] and bad_1["local"][0] > 0 and bad_1["local"][1] == 0, ranks
    assert bad["nan"] + bad_1["nan"] > 0, ranks  # the reduced gradients carry it
    assert [r["origins"] for r in ranks] == [[0, 0], [1, 0]], ranks


@SHARES_ORIGINS
def test_accumulated_backward_passes_collected_by_attach_count_the_origin_on_its_own_rank(
    origins: dict[str, list[dict[str, Any]]],
) -> None:
    """``monitor.attach(optimizer)`` counts at the end of every backward pass of the update."""
    assert [r["origins"] for r in origins["attached"]] == [[0, 0], [1, 0]], origins["attached"]


@SHARES_ORIGINS
@pytest.mark.parametrize(
    "scenario", ["attached", "attached/last", "attached/backward", "attached/bucket_view"]
)
def test_attach_counts_the_reduced_gradients_on_every_rank(
    origins: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    """DDP: rank 1 alone has a NaN input; after the all-reduce every rank's gradients hold
    the NaN, and ``attach()`` counts them on rank 0 too, not the rank's own gradients from
    before the reduction (which said rank 0 was healthy and let it save a checkpoint)."""
    ranks = origins[scenario]
    for rank in ranks:
        after_each_pass = rank["reference"]
        expected = after_each_pass if scenario.endswith("backward") else after_each_pass[1::2]
        assert expected[-1] > 0 and rank["counted"] == expected, ranks


@SHARES_ORIGINS
def test_a_later_backward_pass_leaves_out_only_the_buckets_a_reduction_made_non_finite(
    origins: dict[str, list[dict[str, Any]]],
) -> None:
    """DDP, one bucket per parameter: rank 1's own NaN in ``2.weight`` in the first backward
    pass, rank 0's own Inf in ``0.weight`` in the second; each rank counts its own only."""
    ranks = origins["buckets"]
    assert [[u["local"] for u in r["updates"]] for r in ranks] == [
        [[0, 0], [0, 32], [0, 0]],  # 0.weight: 8 x 4 Inf
        [[0, 0], [8, 0], [0, 0]],  # 2.weight: 1 x 8 NaN
    ], ranks
    assert [r["origins"] for r in ranks] == [[0, 1], [1, 0]], ranks


@SHARES_ORIGINS
@pytest.mark.parametrize("flavour", [f for f in FLAVOURS if "NO_SHARD" not in f])
def test_a_monitor_created_again_on_the_same_model_finds_the_origin(
    origins: dict[str, list[dict[str, Any]]], flavour: str
) -> None:
    """``monitor.close(); monitor = GradMonitor(model)``: torch keeps gradtel's hook, which now
    feeds the new monitor, and no longer the closed one."""
    ranks = origins[f"again/{flavour}"]
    assert [r["log"] for r in ranks] == ["", ""], ranks  # no "already has a communication hook"
    (healthy, bad), (healthy_1, bad_1) = (r["updates"] for r in ranks)
    assert [healthy["local"], bad["local"], healthy_1["local"]] == [[0, 0]] * 3, ranks
    assert bad_1["local"][0] > 0 and bad_1["local"][1] == 0, ranks
    assert [r["origins"] for r in ranks] == [[0, 0], [1, 0]], ranks
    assert [r["closed_fed"] for r in ranks] == [False, False], ranks


@SHARES_ORIGINS
@pytest.mark.parametrize("when", ["before", "after"])
def test_fully_shard_counts_around_the_applications_own_reduce_scatter(
    origins: dict[str, list[dict[str, Any]]], when: str
) -> None:
    """``set_custom_reduce_scatter`` before or after ``GradMonitor(model)``: the application's
    reduce-scatter does the reduction, gradtel counts what goes into it."""
    ranks = origins[f"custom_reduce_scatter/{when}"]
    assert [r["calls"] for r in ranks] == [4, 4], ranks  # 2 sharded modules, 2 updates
    assert [r["updates"][1]["local"][0] > 0 for r in ranks] == [False, True], ranks
    assert [r["origins"] for r in ranks] == [[0, 0], [1, 0]], ranks


@SHARES_ORIGINS
def test_fsdp_flat_parameters_are_counted_under_the_layers_they_were_made_of(
    origins: dict[str, list[dict[str, Any]]],
) -> None:
    """``FullyShardedDataParallel(use_orig_params=False)``, FSDP's default, flattens a unit's
    parameters into one: every count went under ``(root)``. Each rank now counts its shard's
    spans under their layers, as with the parameters kept."""
    kept, flattened = origins["flat/kept"], origins["flat/flattened"]
    assert [r["by_layer"] for r in flattened] == [r["by_layer"] for r in kept], origins
    assert any(r["by_layer"][1] for r in kept), kept  # the NaN is there
    assert all(set(r["layers"]) <= {"0", "2"} for r in flattened), flattened


@SHARES_ORIGINS
def test_a_nan_in_a_sampled_out_update_is_no_origin_of_the_next(
    origins: dict[str, list[dict[str, Any]]],
) -> None:
    """``sample_every=2`` scans updates 1, 3 and 5; rank 1's NaN in update 2 is not counted in
    update 3, its NaN in update 5 is."""
    ranks = origins["sampled"]
    assert [r["origins"] for r in ranks] == [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1]], ranks
    assert [[u["local"] for u in r["updates"]][2] for r in ranks] == [[0, 0], [0, 0]], ranks


def test_a_job_that_ends_on_a_checkpoint_agreement_exits_0() -> None:
    """gloo's worker thread lets go of a collective's tensor only once it holds the GIL; if
    the process finalizes first, it aborts (``terminate called without an active exception``).
    gradtel's agreement returns only after gloo has let go of its tensor."""
    run = torchrun("exit_trainer.py", "60")
    said = sorted((json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])  # fmt: skip
    assert [(r["held"], r["agreements"]) for r in said] == [(0, 59)] * 2, said
    assert run.returncode == 0, run.stderr[-3000:]


DROPPED_MODEL = """
import atexit, gc, sys, weakref, torch, torch.distributed as dist, gradtel
from prometheus_client import CollectorRegistry
from torch.nn.parallel import DistributedDataParallel

dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
gc.disable()  # cycles are freed by an explicit collection only
left = []
atexit.register(lambda: print("alive when the interpreter finalizes:", left[0]() is not None))

def train():
    model = DistributedDataParallel(torch.nn.Linear(4, 1))
    gradtel.GradMonitor(model, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()))
    model(torch.randn(2, 4)).sum().backward()
    left.append(weakref.ref(model))

train()
dist.destroy_process_group()
"""


def test_a_distributed_model_dropped_before_the_exit_is_freed_while_gloo_can_still_run() -> None:
    """A gloo worker thread that drops the Python objects of its work only once the
    interpreter finalizes aborts the process (``terminate called without an active
    exception``: about 1 in 5 of 2-rank DDP jobs that end right after their last backward
    pass, with or without gradtel). A DDP model's reference cycles keep such work alive
    until then, unless they are collected on the way out."""
    run = subprocess.run(
        [sys.executable, "-c", DROPPED_MODEL, f"tcp://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "alive when the interpreter finalizes: False" in run.stdout, run.stdout


CYCLE_HELD_MONITORS = """
import atexit, sys, torch, torch.distributed as dist, gradtel
from prometheus_client import REGISTRY

atexit.register(lambda: print("NaN updates at the exit:", REGISTRY.get_sample_value(
    "gradtel_unhealthy_updates_total", {"kind": "nan", "severity": "warning"})))
dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)

class Trainer:  # a model hook on a bound method: only a reference cycle holds the monitors
    def __init__(self):
        self.model, self.ema = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        self.monitor = gradtel.GradMonitor(self.model, readout="deferred")
        self.ema_monitor = gradtel.GradMonitor(self.ema, readout="deferred")
        self.model.register_forward_hook(self.hook)

    def hook(self, *args):
        pass

    def fit(self):
        for step in range(3):
            self.model.zero_grad()
            self.model(torch.ones(1, 4)).sum().backward()
            if step == 2:
                self.model.weight.grad[0, 0] = float("nan")  # the last update, still pending
            self.monitor.collect()

Trainer().fit()
"""


def test_the_exit_collection_comes_after_the_pending_updates_are_published() -> None:
    """Collecting cycles at the exit frees monitors that only a cycle holds: their pending
    deferred updates are published first, however many monitors re-registered it."""
    run = subprocess.run(
        [sys.executable, "-c", CYCLE_HELD_MONITORS, f"tcp://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    said = next(
        line for line in run.stdout.splitlines() if line.startswith("NaN updates at the exit:")
    )
    assert float(said.split(":")[1]) == 1, run.stdout


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_own_gradients_are_counted_before_the_reduction_with_any_hook(one_rank_group: None) -> None:
    ddp = nn.parallel.DistributedDataParallel(net())
    monitor = gradtel.GradMonitor(
        ddp,
        meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()),
        on_critical="ignore",
    )
    assert monitor.layers == ("0", "2")  # no "module."

    def update(bad: bool) -> gradtel.GradHealth:
        x = torch.randn(4, 4)
        if bad:
            x[1, 2] = float("nan")
        ddp.zero_grad()
        loss = ddp(x).sum()
        loss.backward()
        return monitor.collect(loss=loss)

    healthy = update(False)
    assert (healthy.local_nan_total, healthy.local_inf_total, healthy.loss_finite) == (0, 0, True)
    bad = update(True)
    assert (
        bad.local_nan_total == bad.nan_total > 0
        and bad.originated_here
        and bad.loss_finite is False
    )
    # A hook registered later becomes the reduction behind gradtel's count.
    ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    assert update(True).local_nan_total == bad.nan_total
    assert update(False).local_nan_total == 0


def test_a_model_with_a_hook_of_its_own_uses_ddp_comm_hook(
    one_rank_group: None, caplog: pytest.LogCaptureFixture
) -> None:
    ddp = nn.parallel.DistributedDataParallel(net())
    ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        gradtel.GradMonitor(
            ddp, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry())
        )
    assert "register gradtel.ddp_comm_hook(monitor, inner=your_hook)" in caplog.text
    other = nn.parallel.DistributedDataParallel(net())
    monitor = gradtel.GradMonitor(
        other.module,
        meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()),
        on_critical="ignore",
    )
    other.register_comm_hook(
        None, gradtel.ddp_comm_hook(monitor, inner=default_hooks.fp16_compress_hook)
    )
    x = torch.randn(4, 4)
    x[0, 0] = float("inf")
    other(x).sum().backward()
    health = monitor.collect()
    assert health.local_inf_total == health.inf_total > 0


def test_a_new_monitor_counts_through_the_ddp_comm_hook_the_application_registered(
    one_rank_group: None, caplog: pytest.LogCaptureFixture
) -> None:
    ddp = nn.parallel.DistributedDataParallel(net())
    provider = gradtel.prometheus_meter_provider(CollectorRegistry())
    first = gradtel.GradMonitor(ddp.module, meter_provider=provider)
    hook = gradtel.ddp_comm_hook(first, inner=default_hooks.fp16_compress_hook)
    ddp.register_comm_hook(None, hook)
    first.close()
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        second = gradtel.GradMonitor(
            ddp,
            meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()),
            on_critical="ignore",
        )
    assert caplog.text == ""
    x = torch.randn(4, 4)
    x[0, 0] = float("nan")
    ddp(x).sum().backward()
    health = second.collect()
    assert health.local_nan_total == health.nan_total > 0


def test_fully_shard_on_a_torch_without_custom_reduce_scatters_says_once_that_the_origin_is_unknown(
    one_rank_group: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    monkeypatch.delattr(FSDPModule, "set_custom_reduce_scatter")  # torch before 2.9
    monkeypatch.setattr(gradtel.attach.origin, "_said", set(), raising=False)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        for _ in range(2):
            model = net()
            fully_shard(model)
            monitor = gradtel.GradMonitor(
                model, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry())
            )
            model(torch.randn(4, 4)).sum().backward()
            assert monitor.collect().local_nan_total is None
            monitor.close()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "needs torch >= 2.9" in said[0], said


def test_gradtel_imports_on_a_torch_without_fully_shards_reduce_scatter_classes() -> None:
    """torch before 2.9 has neither ``ReduceScatter`` nor ``DefaultReduceScatter``."""
    code = (
        "from torch.distributed.fsdp._fully_shard import _fsdp_api, _fsdp_collectives\n"
        "del _fsdp_api.ReduceScatter, _fsdp_collectives.DefaultReduceScatter\n"
        "import gradtel\n"
        "print('imported')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout) == (0, "imported\n"), run.stderr[-3000:]


def test_a_nan_reduced_in_one_backward_pass_is_counted_once_in_the_update(
    one_rank_group: None,
) -> None:
    ddp = nn.parallel.DistributedDataParallel(net())
    monitor = gradtel.GradMonitor(
        ddp,
        meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()),
        on_critical="ignore",
    )

    def update(passes: int, bad: bool = True) -> int | None:
        """This rank's own NaN count in one update of ``passes`` backward passes, a NaN in the first."""
        torch.manual_seed(1)
        ddp.zero_grad()
        for index in range(passes):
            x = torch.randn(4, 4)
            x[1, 2] = float("nan") if bad and index == 0 else x[1, 2]
            ddp(x).sum().backward()  # the second pass adds onto the reduced NaN of the first
        return monitor.collect().local_nan_total

    once = update(1)
    assert once and update(2) == once and update(2, bad=False) == 0 and update(3) == once
