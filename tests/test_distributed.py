"""A real 4-process torchrun DDP run (gloo, CPU) in which one rank gets one NaN in its input
batch: each rank serves its own endpoint, the rank where the NaN started is the one whose
origin counter moves, torchrun's SIGTERM to the other ranks loses nothing, and a real
Prometheus and Alertmanager with the rendered kit deliver exactly one page for the incident:
scraping the ranks directly, or through the kit's scale-out set-up (a Prometheus agent
remote-writing to a central Prometheus and to VictoriaMetrics with vmalert). FSDP's
flavours find the origin rank too."""

from __future__ import annotations

import json
import logging
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import gradtel
from gradtel.stack import Stack, StackTimings, free_port

from .conftest import require_tool

pytestmark = pytest.mark.slow

RANKS, BAD_RANK = 4, 2


def free_ports(count: int) -> int:
    """A port P such that P .. P + count - 1 are all free on loopback, below the ephemeral
    range (32768 and up on Linux), where gloo's and the stacks' own sockets land."""
    for _ in range(50):
        base = random.randrange(20_000, 32_000)
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


def scale_out_stacks(targets: list[str]) -> list[Stack]:
    """The kit's scale-out set-up: one Prometheus agent scrapes the ranks and remote-writes
    to a central Prometheus and to VictoriaMetrics (with vmalert) alike; each store has its
    own Alertmanager and receiver. (Scraping by the evaluating Prometheus itself is the
    1,024-rank replay's and the other end-to-end tests' set-up.)"""
    require_tool("victoria-metrics", "victoria-metrics")
    timings = StackTimings("1s", "1s", "5s", "5s")
    victoria = Stack([], timings=timings, store="victoriametrics")
    return [Stack(targets, timings=timings, agent=True, also_write=[victoria.write_url]), victoria]


def test_one_page_says_the_nan_originated_on_rank_2_and_nothing_is_lost_at_exit(tmp_path: Path) -> None:
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
            run.kill()
            run.communicate()
        for stack in stores:
            stack.stop()


def paged(stack: Stack) -> bool:
    return stack.receiver is not None and bool(stack.receiver.firing("pager"))


def where(stack: Stack) -> str:
    return f"{stack.store}{' behind an agent' if stack.agent else ''}"


def last_values(stack: Stack, series: str, expected: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each rank's last value of ``series``, polled until it is ``expected`` or 30 s have
    passed: a store behind an agent holds the newest samples back for a while
    (VictoriaMetrics: ``-search.latencyOffset``)."""
    deadline = time.monotonic() + 30
    while True:
        # The targets are gone: their series are stale now, read their last values.
        found = sorted((a["metric"]["rank"], a["value"][1]) for a in stack.query(f"last_over_time({series}[5m])"))
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
    pages = stack.receiver.firing("pager")
    assert len(pages) == 1, (where(stack), [str(p) for p in pages], stack.log("vmalert"))
    page = pages[0]
    assert (page.alertname, page.severity) == ("GradtelNaNGradients", "critical")
    assert "affected ranks: 4." in page.description, (where(stack), page.description)
    assert "originated on rank 2." in page.description, (where(stack), page.description)
    assert "The loss was already non-finite: it entered in the forward pass." in page.description
    assert f"at step {bad_update}." in page.description, (where(stack), page.description)
    assert "Layers with NaN values in that window: body." in page.description, (where(stack), page.description)
    assert [p for p in stack.receiver.firing("chat") if p.alertname != "GradtelExporterDown"] == []
    print(f"\n{where(stack)}: injection -> page: {page.received - injected:.1f}s; page: {page.description}")


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
        "It originated on rank 2. Layers with NaN values in that window: lm_head (4), norm (2)."
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
        assert [u["local_nan"] for u in healthy] == [0, 0] and [u["nan"] for u in healthy] == [0, 0], ranks
        assert [u["originated"] for u in bad] == [False, True], ranks
        assert bad[0]["local_nan"] == 0 and bad[1]["local_nan"] > 0, ranks
        assert sum(u["nan"] for u in bad) > 0, ranks  # the reduced shards carry it
        assert [r["origin_nan"] for r in ranks] == [0, 1], ranks
    # Only rank 1's shard is bad, and no rank saves: a sharded save is a collective.
    agreed = sorted((r for r in said if "allowed" in r), key=lambda r: r["rank"])
    assert [(r["healthy"], r["allowed"]) for r in agreed] == [(True, False), (False, False)], said


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def test_own_gradients_are_counted_before_the_reduction_with_any_hook(one_rank_group: None) -> None:
    ddp = nn.parallel.DistributedDataParallel(net())
    monitor = gradtel.GradMonitor(
        ddp, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()), on_critical="ignore"
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
    assert bad.local_nan_total == bad.nan_total > 0 and bad.originated_here and bad.loss_finite is False
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
        gradtel.GradMonitor(ddp, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()))
    assert "register gradtel.ddp_comm_hook(monitor, inner=your_hook)" in caplog.text
    other = nn.parallel.DistributedDataParallel(net())
    monitor = gradtel.GradMonitor(
        other.module, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()), on_critical="ignore"
    )
    other.register_comm_hook(None, gradtel.ddp_comm_hook(monitor, inner=default_hooks.fp16_compress_hook))
    x = torch.randn(4, 4)
    x[0, 0] = float("inf")
    other(x).sum().backward()
    health = monitor.collect()
    assert health.local_inf_total == health.inf_total > 0


def test_a_loss_that_is_not_a_tensor_is_refused() -> None:
    model = net()
    monitor = gradtel.GradMonitor(model, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry()))
    with pytest.raises(TypeError, match=r"loss must be a tensor or None, got 1.5 \(float\)"):
        monitor.collect(loss=1.5)  # type: ignore[arg-type]
