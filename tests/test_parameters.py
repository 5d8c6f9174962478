"""The watched parameters: a model changed in training is watched as it is now, and the
backward order that names the first bad layer."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel
from gradtel import GradHealth, GradMonitor, Status

from .conftest import Net, net_backward, sample, samples

INF = float("inf")
NAN = float("nan")


def test_a_replaced_layer_is_counted_in_the_next_update(provider: MeterProvider) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    net_backward(model)
    monitor.collect()
    model.head = nn.Linear(16, 1)  # a new module, new parameters
    net_backward(model)
    model.head.weight.grad[0, 0] = NAN
    assert monitor.collect().nan_by_layer == {"head": 1}


def test_a_parameter_unfrozen_later_is_counted(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    model.head.requires_grad_(False)
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    net_backward(model)
    assert monitor.collect().status is Status.HEALTHY
    # A frozen layer exports no series (a frozen base model would export hundreds).
    assert ("gradtel_nan_grads_total", frozenset({("layer", "head")})) not in samples(registry)
    model.head.requires_grad_(True)
    net_backward(model)
    model.head.weight.grad[0, 0] = NAN
    assert monitor.collect().nan_by_layer == {"head": 1}
    assert sample(samples(registry), "gradtel_nan_grads_total", layer="head") == 1


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((256, 256), (600, 256)),
        ((300, 256), (600, 256)),
        ((10, 256), (600, 256)),
        ((600, 256), (256, 256)),
    ],
)
def test_a_parameter_resized_in_place_is_counted_whole(
    provider: MeterProvider, before: tuple[int, int], after: tuple[int, int]
) -> None:
    model = nn.Linear(before[1], before[0], bias=False)
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    model.weight.grad = torch.zeros(before)
    assert monitor.collect().status is Status.HEALTHY  # the plan is made for the old size
    model.weight.data = torch.zeros(after)
    model.weight.grad = torch.zeros(after)
    model.weight.grad[-1, -3:] = NAN  # in the part that is new when the tensor grew
    for _ in range(2):
        assert monitor.collect().nan_total == 3


def test_backward_order_hooks_go_after_the_first_pass_even_without_collect(
    provider: MeterProvider,
) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    for _ in range(200):
        net_backward(model)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    del monitor


def test_first_bad_layer_per_kind(provider: MeterProvider, registry: CollectorRegistry) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    net_backward(model)
    model.body[0].weight.grad[0, :3] = NAN
    model.head.weight.grad[0, :7] = INF
    health = monitor.collect()
    assert (health.first_nan_layer, health.first_inf_layer) == ("body.0", "head")
    assert health.first_bad_layer == "head"  # backward reaches the head first
    net_backward(model)
    monitor.collect()  # healthy: the next NaN starts a new run of NaN updates
    net_backward(model)
    model.body[2].weight.grad[0, 0] = NAN  # a later NaN update elsewhere
    monitor.collect()
    found = samples(registry)
    assert sample(found, "gradtel_first_bad_layer", kind="nan", layer="body.0") == 1
    assert sample(found, "gradtel_first_bad_layer", kind="inf", layer="head") == 1
    assert sample(found, "gradtel_first_bad_layer", kind="nan", layer="body.2") == 3


def test_first_bad_layer_names_where_the_values_started_not_where_they_spread(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    # Nothing skips the Inf update: the next update's Inf is met first in body.2. A page
    # sent after it must still say that the Inf started in head, at update 1.
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    net_backward(model)
    model.head.weight.grad[0, :7] = INF
    monitor.collect()
    net_backward(model)
    model.body[2].weight.grad[0, :14] = INF
    model.body[0].weight.grad[0, :2] = NAN  # the first NaN update: a run of its own kind
    health = monitor.collect()
    assert health.first_inf_layer == "body.2"  # the update's own answer is unchanged
    found = samples(registry)
    assert sample(found, "gradtel_first_bad_layer", kind="inf", layer="head") == 1
    assert not [
        key
        for key in found
        if key[0] == "gradtel_first_bad_layer" and ("layer", "body.2") in key[1]
    ]
    assert sample(found, "gradtel_first_bad_layer", kind="nan", layer="body.0") == 2


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_an_fsdp_flat_parameter_is_counted_and_normed_by_the_layers_it_holds(
    provider: MeterProvider, tmp_path: Path
) -> None:
    """``FullyShardedDataParallel(use_orig_params=False)`` in a one-process group: against
    the same model unwrapped, each layer's NaN count and gradient norm, clipping with
    gradtel (whose norm per flat parameter is no layer's: it made every layer's norm the
    flat parameter's)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
        )
        flat = FullyShardedDataParallel(copy.deepcopy(plain), device_id=torch.device("cpu"))
        monitor = GradMonitor(flat, meter_provider=provider, layer_norms=True, on_critical="ignore")
        published: list[GradHealth] = []
        monitor.subscribe(published.append)
        x = torch.randn(2, 4)
        x[1, 2] = float("nan")
        for model in (flat, plain):
            model(x).sum().backward()
        gradtel.clip_grad_norm_(flat.parameters(), 1e9, monitor=monitor)
        nan: dict[str, int] = {}
        for name, p in plain.named_parameters():
            nan[name.rpartition(".")[0]] = nan.get(name.rpartition(".")[0], 0) + int(
                p.grad.isnan().sum()
            )
        assert dict(published[-1].nan_by_layer) == nan and set(monitor.layers) == set(nan)
        x[1, 2] = 1.0  # and a healthy update, for the norms
        for model in (flat, plain):
            model.zero_grad()
            model(x).sum().backward()
        gradtel.clip_grad_norm_(flat.parameters(), 1e9, monitor=monitor)
        norms = {
            layer: torch.linalg.vector_norm(
                torch.cat([p.grad.flatten() for p in module.parameters()])
            ).item()
            for layer, module in (("0", plain[0]), ("2.0", plain[2][0]), ("2.1", plain[2][1]))
        }
        assert published[-1].layer_grad_norms == pytest.approx(norms, rel=1e-5)
        monitor.close()
    finally:
        dist.destroy_process_group()
