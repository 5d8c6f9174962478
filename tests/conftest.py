"""Shared fixtures: fresh registries, real scrapes, and tools that must exist in CI."""

from __future__ import annotations

import os
import shutil
import signal
import urllib.request
from collections.abc import Iterator

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradtel
import gradtel.export.httpd

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# The tests train small models: one intra-op thread per process, in this one and in those it
# starts. With more processes than cores (test workers, ranks, servers), a second thread per
# process spins waiting for the first and takes a core from the others.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# The Go servers and tools the tests start (promtool above all, which the suite runs on
# every rule file) collect garbage less often: a quarter less CPU for a larger heap.
os.environ.setdefault("GOGC", "400")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first, by their ``waits`` mark: under pytest-xdist their waits on
    real servers then overlap the short tests instead of trailing after them. (With
    ``--dist loadgroup`` pytest-xdist still starts the xdist_groups before them.)"""
    items.sort(key=lambda item: -_waits(item))


def _waits(item: pytest.Item) -> float:
    mark = item.get_closest_marker("waits")
    return float(mark.args[0]) if mark else 0.0


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


class FakeClock:
    """A clock that stands still until advanced: the time-dependent parts take it as their
    ``clock``, so a window of minutes is crossed without waiting."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def provider(registry: CollectorRegistry) -> Iterator[MeterProvider]:
    provider = gradtel.prometheus_meter_provider(registry)
    yield provider
    provider.shutdown()


def parse(text: str) -> Samples:
    """Samples of a classic text exposition, keyed by name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def samples(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def sample(found: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in found, (
        f"no sample {name}{labels}; have {sorted(k for k in found if k[0] == name)}"
    )
    return found[key]


def fetch(url: str, accept: str | None = None) -> tuple[str, str]:
    """GET ``url``; returns the body and the Content-Type."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode(), response.headers["Content-Type"]


def require_tool(name: str, package: str) -> str:
    """Path of a command-line tool; missing fails in CI and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} is not installed; install it with "
            f"`sudo apt-get install -y --no-install-recommends {package}` "
            "(the README's test command does this when run as root)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


PROMETHEUS_HEADERS = {
    "User-Agent": "Prometheus/2.45.3",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}


def scrape(url: str) -> str:
    """GET ``url`` as Prometheus does: only such a scrape ends an endpoint's exit wait."""
    request = urllib.request.Request(url, headers=PROMETHEUS_HEADERS)
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def absent(found: Samples, name: str, **labels: str) -> None:
    """No such series: a per-layer series appears only with its layer's first NaN or Inf."""
    key = (name, frozenset(labels.items()))
    assert key not in found, f"unexpected sample {name}{labels} = {found[key]}"


def default_ctrl_c() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: Python installs its Ctrl-C
    handler only when SIGINT is not ignored at start, and a shell ignores it in the jobs it
    runs in the background (a CI runner's, say)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Net(nn.Module):
    """A small model with a body and a head: three layers, in module order."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def net_backward(model: nn.Module) -> None:
    model.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()


def net() -> nn.Sequential:
    """Two linear layers, the same weights every time."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def tiny_gpt2() -> nn.Module:
    """A GPT-2 built locally from a small config (no model hub), seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    )
