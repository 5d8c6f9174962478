"""The test stack on Prometheus 2.x and 3.x: the scale-out agent starts with the flags of its
version, a stack that fails to start fails at once and leaves no process behind, and its
ports are picked where no other process's connection can take them first."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry

import gradtel
from gradtel.render import scale_out
from gradtel.tools import stack as stack_module
from gradtel.tools.stack import Stack, StackTimings, free_port, free_ports

from .conftest import require_tool
from .prometheus_versions import prometheus_bin  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

TIMINGS = StackTimings("1s", "1s", "1s", "1s")


@pytest.fixture
def endpoint(provider: MeterProvider, registry: CollectorRegistry) -> Iterator[str]:
    """A gradtel endpoint with one update recorded."""
    model = torch.nn.Linear(4, 1)
    monitor = gradtel.GradMonitor(model, meter_provider=provider)
    model(torch.randn(2, 4)).sum().backward()
    monitor.collect()
    server = gradtel.serve(port=0, registry=registry)
    yield f"127.0.0.1:{server.port}"
    server.close()


def test_the_agent_remote_writes_to_the_central_prometheus_on_every_version(
    prometheus_bin: Path,  # noqa: F811 (the fixture)
    endpoint: str,
) -> None:
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    with Stack(
        [endpoint], timings=TIMINGS, agent=True, prometheus=str(prometheus_bin / "prometheus")
    ) as stack:
        deadline = time.monotonic() + 30
        while not stack.query("gradtel_updates_total") and time.monotonic() < deadline:
            time.sleep(0.5)
        [found] = stack.query("gradtel_updates_total")
        assert found["metric"]["instance"] == endpoint and found["value"][1] == "1"


def test_a_stack_that_fails_to_start_fails_at_once_and_leaves_no_process_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    # The agent flag of the other major version: that Prometheus refuses to start.
    monkeypatch.setattr(
        scale_out, "agent_flags", lambda version=(3,): [scale_out.AGENT_FLAGS[5 - version[0]]]
    )
    stack = Stack(["127.0.0.1:9"], timings=TIMINGS, agent=True)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="agent exited at start"):
        stack.start()
    assert time.monotonic() - began < 30
    assert {name: process.poll() is not None for name, process in stack.processes.items()} == {
        "alertmanager": True, "prometheus": True, "agent": True,
    }  # fmt: skip
    assert not stack.root.exists()


def test_a_stack_s_ports_are_picked_below_the_ephemeral_range() -> None:
    """Outgoing connections (the suite's scrapes, gloo) and ``bind(0)`` take their ports from
    the ephemeral range: a port picked there could be taken before the server binds it."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if not ranges.exists():
        pytest.skip("the ephemeral range is read from Linux's /proc")
    ephemeral = int(ranges.read_text().split()[0])
    base = free_ports(3)
    assert 10_000 <= base and base + 2 < ephemeral
    for port in range(base, base + 3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))  # still free: the pick held none of them
    assert free_port() < ephemeral
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    stack = Stack([], timings=TIMINGS)
    try:
        assert stack.store_port < ephemeral and stack.alertmanager_port < ephemeral
    finally:
        stack.stop()  # never started: this removes its folder


def test_where_the_ephemeral_range_leaves_no_room_below_it_any_free_port_will_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stack_module, "_ephemeral_start", lambda: 1024)  # net.ipv4 tuned so
    for _ in range(20):
        base = free_ports(2)
        assert 10_000 <= base and base + 1 <= 65_535
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", base))
            second.bind(("127.0.0.1", base + 1))
