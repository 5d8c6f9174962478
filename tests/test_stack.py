"""The test stack on Prometheus 2.x and 3.x: the scale-out agent starts with the flags of its
version, and a stack that fails to start fails at once and leaves no process behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry

import gradtel
from gradtel.render import scale_out
from gradtel.tools.stack import Stack, StackTimings

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
