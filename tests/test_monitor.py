"""GradMonitor on real models with real gradients: counts, labels, series and policies."""

from __future__ import annotations

import gc
import logging
import time
import weakref
from pathlib import Path

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel
from gradtel import GradMonitor, NonFiniteGradientError, Status, Thresholds

from .conftest import Net, net_backward, sample, samples
from .test_clip import model_with_grads
from .test_hooks import amp_step

NAN, INF = float("nan"), float("inf")


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def backward(model: nn.Module, *inputs: torch.Tensor) -> None:
    model.zero_grad()
    out = model(*inputs) if inputs else model(torch.randn(4, 8))
    out.abs().sum().backward()


def poison(grad: torch.Tensor, nan: int = 0, inf: int = 0) -> None:
    flat = grad.view(-1)
    flat[:nan] = NAN
    flat[nan : nan + inf] = INF


def test_two_layer_acceptance(provider: MeterProvider, registry: CollectorRegistry) -> None:
    model = TwoLayer()
    monitor = GradMonitor(model, meter_provider=provider, on_critical="ignore")
    backward(model)
    poison(model.fc1.weight.grad, nan=3)
    poison(model.fc2.weight.grad, inf=7)

    health = monitor.collect()

    assert (health.nan_total, health.inf_total, health.status) == (3, 7, Status.CRITICAL)
    assert health.nan_by_layer == {"fc1": 3} and health.inf_by_layer == {"fc2": 7}
    assert (health.scanned, health.skipped, health.step) == (4, 0, 1)
    found = samples(registry)
    assert sample(found, "gradtel_update_inf_grads", layer="fc2") == 7
    assert sample(found, "gradtel_update_nan_grads", layer="fc1") == 3
    bands = {
        (kind, severity): sample(
            found, "gradtel_unhealthy_updates_total", kind=kind, severity=severity
        )
        for kind in ("nan", "inf")
        for severity in ("warning", "critical")
    }
    assert bands == {
        ("nan", "warning"): 1,
        ("nan", "critical"): 0,
        ("inf", "warning"): 0,
        ("inf", "critical"): 1,
    }
    assert sample(found, "gradtel_update_status") == 2
    assert sample(found, "gradtel_updates_total") == 1


def test_every_series_exists_at_zero_before_any_update(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    before = time.time()
    GradMonitor(TwoLayer(), meter_provider=provider, layer_series="all")
    found = samples(registry)
    for layer in ("fc1", "fc2"):
        for name in (
            "gradtel_nan_grads_total",
            "gradtel_inf_grads_total",
            "gradtel_update_nan_grads",
            "gradtel_update_inf_grads",
        ):
            assert sample(found, name, layer=layer) == 0
    for kind in ("nan", "inf"):
        for severity in ("warning", "critical"):
            assert (
                sample(found, "gradtel_unhealthy_updates_total", kind=kind, severity=severity) == 0
            )
    for stage in ("scan", "record", "serve"):
        assert sample(found, "gradtel_errors_total", stage=stage) == 0
    for reason in ("no_gradients", "scan_error"):
        assert sample(found, "gradtel_unscanned_updates_total", reason=reason) == 0
    assert sample(found, "gradtel_updates_total") == 0
    assert sample(found, "gradtel_update_status") == -1  # nothing looked at yet: unknown
    assert before <= sample(found, "gradtel_last_update_timestamp_seconds") <= time.time()


def test_gauges_reset_on_a_healthy_update_while_counters_keep_counting(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = TwoLayer()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    backward(model)
    poison(model.fc1.bias.grad, nan=2)
    monitor.collect()
    backward(model)
    assert monitor.collect().status is Status.HEALTHY
    found = samples(registry)
    assert sample(found, "gradtel_update_nan_grads", layer="fc1") == 0
    assert sample(found, "gradtel_nan_grads_total", layer="fc1") == 2
    assert sample(found, "gradtel_updates_total") == 2
    assert sample(found, "gradtel_update_status") == 0
    assert sample(found, "gradtel_scan_duration_seconds_count") == 2


def test_a_healthy_update_records_its_duration_when_scraped_not_on_the_training_thread(
    provider: MeterProvider, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradtel.export import telemetry

    model = TwoLayer()
    monitor = GradMonitor(model, meter_provider=provider)
    duration = telemetry.instruments_for(provider).duration
    recorded: list[str] = []
    original = duration.record
    monkeypatch.setattr(
        duration, "record", lambda *a, **k: recorded.append("x") or original(*a, **k)
    )
    for _ in range(3):
        backward(model)
        monitor.collect()
    assert recorded == []  # an SDK record is a sixth of a small model's update
    assert sample(samples(registry), "gradtel_scan_duration_seconds_count") == 3
    assert len(recorded) == 3
    assert sample(samples(registry), "gradtel_scan_duration_seconds_count") == 3  # drained once
    # Never scraped: the training thread records them itself, a batch at a time.
    for _ in range(telemetry.DURATIONS_KEPT):
        backward(model)
        monitor.collect()
    assert len(recorded) == 3 + telemetry.DURATIONS_KEPT


def test_tied_parameters_are_counted_once(provider: MeterProvider) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm_head(self.embed(ids))

    model = Tied()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    assert monitor.layers == ("embed",)
    backward(model, torch.tensor([1, 2, 3]))
    poison(model.embed.weight.grad, nan=2)
    health = monitor.collect()
    assert health.nan_by_layer == {"embed": 2} and health.scanned == 1
    pairs = list(model.named_parameters(remove_duplicate=False))
    assert len(pairs) == 2
    monitor.close()
    assert GradMonitor(pairs, meter_provider=provider).layers == ("embed",)


def test_frozen_and_gradless_parameters_are_skipped_and_reported(provider: MeterProvider) -> None:
    model = TwoLayer()
    model.fc2.bias.requires_grad_(False)  # frozen at creation: watched, left out while frozen
    monitor = GradMonitor(model, meter_provider=provider)
    backward(model)
    model.fc1.bias.grad = None  # no gradient in this update
    model.fc2.weight.requires_grad_(False)  # frozen after creation
    health = monitor.collect()
    assert (health.scanned, health.skipped) == (1, 3)


def test_sparse_embedding_gradient(provider: MeterProvider) -> None:
    embed = nn.Embedding(100, 8, sparse=True)
    monitor = GradMonitor(embed, meter_provider=provider, on_warning="ignore")
    embed(torch.tensor([3, 3, 7])).sum().backward()
    grad = embed.weight.grad
    assert grad is not None and grad.is_sparse
    grad._values()[0, :2] = NAN
    grad._values()[2, 0] = -INF
    health = monitor.collect()
    assert (health.nan_by_layer, health.inf_by_layer) == ({ROOT: 2}, {ROOT: 1})


def test_a_sparse_embedding_counts_as_its_dense_twin_when_a_token_repeats(
    provider: MeterProvider,
) -> None:
    found = []
    for sparse in (True, False):
        torch.manual_seed(0)
        embed = nn.Embedding(10, 4, sparse=sparse)
        monitor = GradMonitor(
            embed, meter_provider=provider, on_warning="ignore", on_critical="ignore"
        )
        out = embed(torch.tensor([3, 3, 3, 5]))
        out.register_hook(lambda g: torch.where(torch.arange(4)[:, None] < 3, NAN, g))
        out.sum().backward()
        dense = embed.weight.grad.to_dense()
        health = monitor.collect()
        assert health.nan_total == int(dense.isnan().sum()) == 4  # token 3's row, once
        found.append((health.nan_by_layer, health.status))
        monitor.close()
    assert found[0] == found[1] == ({ROOT: 4}, Status.WARNING)


ROOT = gradtel.ROOT_LAYER


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_real_backward_in_each_floating_dtype(provider: MeterProvider, dtype: torch.dtype) -> None:
    model = TwoLayer().to(dtype)
    monitor = GradMonitor(model, meter_provider=provider, on_critical="ignore")
    model.zero_grad()
    model(torch.randn(4, 8, dtype=dtype)).float().abs().sum().backward()
    assert monitor.collect().status is Status.HEALTHY
    poison(model.fc2.weight.grad, nan=1, inf=6)
    health = monitor.collect()
    assert (health.nan_by_layer, health.inf_by_layer) == ({"fc2": 1}, {"fc2": 6})


def test_complex_parameters(provider: MeterProvider) -> None:
    class Spectral(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.filter = nn.Parameter(torch.randn(6, dtype=torch.complex64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (torch.fft.fft(x) * self.filter).abs()

    model = Spectral()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    model(torch.randn(6)).sum().backward()
    model.filter.grad[0] = complex(INF, NAN)  # NaN wins within an element
    model.filter.grad[1] = complex(1.0, -INF)
    health = monitor.collect()
    assert (health.nan_by_layer, health.inf_by_layer) == ({ROOT: 1}, {ROOT: 1})


def test_layer_bound_and_depth_shape_the_labels(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
    monitor = GradMonitor(model, meter_provider=provider, max_layers=2, on_warning="ignore")
    assert monitor.layers == ("0", gradtel.OVERFLOW_LAYER, "4")
    backward(model, torch.randn(1, 2))
    poison(model[2].weight.grad, nan=1)
    poison(model[3].weight.grad, nan=1)
    poison(model[4].weight.grad, nan=1)
    assert monitor.collect().nan_by_layer == {gradtel.OVERFLOW_LAYER: 2, "4": 1}
    assert sample(samples(registry), "gradtel_nan_grads_total", layer="(other)") == 2
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    assert GradMonitor(nested, meter_provider=provider, layer_depth=1).layers == ("0",)


def test_warn_logs_one_line_with_status_counts_and_top_layers(
    provider: MeterProvider, caplog: pytest.LogCaptureFixture
) -> None:
    model = TwoLayer()
    monitor = GradMonitor(model, meter_provider=provider)
    backward(model)
    poison(model.fc1.weight.grad, nan=4)
    poison(model.fc2.weight.grad, nan=5)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        monitor.collect()
    assert [r.getMessage() for r in caplog.records] == [
        "gradtel: step 1 is critical: NaN=9 Inf=0 (warning > 0, critical > 5); "
        "top layers: fc2 (5), fc1 (4); first NaN layer in backward order: fc2"
    ]


def test_ignore_stays_silent(provider: MeterProvider, caplog: pytest.LogCaptureFixture) -> None:
    model = TwoLayer()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    backward(model)
    poison(model.fc1.weight.grad, nan=1)
    with caplog.at_level(logging.DEBUG, logger="gradtel"):
        assert monitor.collect().status is Status.WARNING
    assert caplog.records == []


def test_raise_carries_the_health_and_still_records(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = TwoLayer()
    monitor = GradMonitor(model, meter_provider=provider, on_critical="raise")
    backward(model)
    poison(model.fc2.weight.grad, inf=6)
    with pytest.raises(NonFiniteGradientError, match="step 1 is critical: NaN=0 Inf=6") as raised:
        monitor.collect()
    assert raised.value.health.inf_by_layer == {"fc2": 6}
    found = samples(registry)
    assert sample(found, "gradtel_unhealthy_updates_total", kind="inf", severity="critical") == 1
    # The warning band keeps its own policy (warn by default): no raise there.
    backward(model)
    poison(model.fc2.weight.grad, inf=1)
    assert monitor.collect().status is Status.WARNING


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_skip_makes_the_following_optimizer_step_harmless(
    provider: MeterProvider, make_optimizer: object
) -> None:
    model = TwoLayer()
    optimizer = make_optimizer(model.parameters())  # type: ignore[operator]
    monitor = GradMonitor(model, meter_provider=provider, on_critical="skip")
    backward(model)
    monitor.collect()
    optimizer.step()  # one healthy step so optimizer state exists
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {
        n: {k: v.clone() for k, v in optimizer.state[p].items()}
        for n, p in model.named_parameters()
    }

    backward(model)
    poison(model.fc1.weight.grad, nan=10)
    assert monitor.collect().status is Status.CRITICAL
    assert all(p.grad is None for p in model.parameters())
    optimizer.step()

    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), name
        for key, value in optimizer.state[param].items():
            assert torch.equal(value, state[name][key]), (name, key)


def test_a_failing_scan_is_logged_once_counted_and_never_raised(
    provider: MeterProvider,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(self: object, *args: object) -> object:
        raise RuntimeError("device lost")

    model = TwoLayer()
    monitor = GradMonitor(model, meter_provider=provider)
    monkeypatch.setattr("gradtel.pipeline.scan.Scanner.launch", broken)
    backward(model)
    with caplog.at_level(logging.ERROR, logger="gradtel"):
        first, second = monitor.collect(), monitor.collect()
    assert (first.scanned, first.skipped, second.step) == (0, 4, 2)
    assert (first.status, first.unscanned) == (Status.UNKNOWN, "scan_error")
    assert [r.getMessage() for r in caplog.records] == [
        "gradtel scan failed, training continues: RuntimeError('device lost')"
    ]
    found = samples(registry)
    assert sample(found, "gradtel_errors_total", stage="scan") == 2
    assert sample(found, "gradtel_unscanned_updates_total", reason="scan_error") == 2
    assert sample(found, "gradtel_updates_total") == 0
    assert sample(found, "gradtel_update_status") == -1
    monitor.close()
    strict = GradMonitor(model, meter_provider=provider, on_error="raise")
    with pytest.raises(RuntimeError, match="device lost"):
        strict.collect()


def test_monitors_sharing_a_provider_share_series(
    provider: MeterProvider, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        a, b = (
            GradMonitor(TwoLayer(), meter_provider=provider, layer_series="all"),
            GradMonitor(nn.Linear(2, 2), meter_provider=provider, layer_series="all"),
        )
    assert caplog.records == []  # no duplicate-instrument warnings from the SDK
    found = samples(registry)
    assert sample(found, "gradtel_nan_grads_total", layer="fc1") == 0
    assert sample(found, "gradtel_nan_grads_total", layer=ROOT) == 0
    assert a.layers != b.layers


def test_a_closed_monitor_scans_and_records_nothing(
    provider: MeterProvider, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    # Its parameters may be another monitor's by now: recording would count them twice.
    model = TwoLayer()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    backward(model)
    monitor.collect()
    monitor.close()
    backward(model)
    poison(model.fc1.weight.grad, nan=2)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        health = monitor.collect()
    assert (health.status, health.unscanned) == (Status.UNKNOWN, "scan_error")
    assert "closed GradMonitor" in caplog.text
    found = samples(registry)
    assert sample(found, "gradtel_updates_total") == 1
    assert not [key for key in found if key[0] == "gradtel_nan_grads_total"]  # none counted
    assert sample(found, "gradtel_errors_total", stage="scan") == 1
    raising = GradMonitor(model, meter_provider=provider, on_error="raise", on_warning="ignore")
    backward(model)
    poison(model.fc1.weight.grad, nan=2)
    raising.collect()  # unhealthy: the status gauge says 1
    raising.close()
    successor = GradMonitor(model, meter_provider=provider)
    backward(model)
    successor.collect()
    with pytest.raises(RuntimeError, match="closed GradMonitor"):
        raising.collect()
    assert sample(samples(registry), "gradtel_update_status") == 0  # the successor's, still
    with pytest.raises(RuntimeError, match="closed: make a new one to attach"):
        raising.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    successor.close()


def test_a_closed_monitors_counts_give_way_to_the_next_monitors_update_of_the_same_layers(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = TwoLayer()
    old = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    backward(model)
    poison(model.fc2.weight.grad, nan=3)
    old.collect()
    old.close()
    new = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    found = samples(registry)  # before the new monitor looked: the last update is the old one's
    assert sample(found, "gradtel_update_nan_grads", layer="fc2") == 3
    backward(model)
    assert new.collect().status is Status.HEALTHY
    found = samples(registry)
    assert sample(found, "gradtel_update_status") == 0
    assert sample(found, "gradtel_update_nan_grads", layer="fc2") == 0  # not the old 3
    assert sample(found, "gradtel_nan_grads_total", layer="fc2") == 3
    new.close()


def test_two_live_monitors_naming_a_layer_alike_never_mix_their_updates_in_the_gauges(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    # A GAN: generator and discriminator are both Sequential, so they share layer "0".
    generator = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    critic = nn.Sequential(nn.Linear(4, 1))
    g, c = (
        GradMonitor(m, meter_provider=provider, on_warning="ignore", on_critical="ignore")
        for m in (generator, critic)
    )

    def latest() -> dict[str, float]:
        return {
            dict(labels)["layer"]: value
            for (name, labels), value in samples(registry).items()
            if name == "gradtel_update_nan_grads"
        }

    generator(torch.randn(2, 4)).sum().backward()
    poison(generator[0].weight.grad, nan=3)
    poison(generator[2].weight.grad, nan=2)
    assert g.collect().nan_total == 5
    assert latest() == {"0": 3, "2": 2}
    # An overflow the critic's scaler skips never reaches the weights: the gauges stay.
    critic(torch.randn(2, 4)).sum().backward()
    poison(critic[0].weight.grad, inf=1)
    assert c.collect(scaler=torch.amp.GradScaler("cpu")).amp_overflow
    assert latest() == {"0": 3, "2": 2}
    for nan in (1, 0):  # the critic's update, unhealthy or not, is the latest: no mix
        critic.zero_grad()
        critic(torch.randn(2, 4)).sum().backward()
        poison(critic[0].weight.grad, nan=nan)
        assert c.collect().nan_total == nan
        assert latest() == {"0": nan, "2": 0}
        assert sample(samples(registry), "gradtel_update_status") == (1 if nan else 0)
    g.close()
    c.close()


def test_monitors_sharing_a_provider_add_up_in_the_series_of_a_layer_they_both_name(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    # Per-layer series and bands are read when scraped, from each monitor: two monitors
    # whose layers share a name add up as one counter would, and the per-update gauge
    # shows the update recorded last.
    a, b = TwoLayer(), TwoLayer()
    first, second = (
        GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
        for model in (a, b)
    )
    backward(a)
    backward(b)
    poison(a.fc1.weight.grad, nan=2)
    poison(b.fc1.weight.grad, nan=3, inf=1)
    first.collect()
    second.collect()
    found = samples(registry)
    assert sample(found, "gradtel_nan_grads_total", layer="fc1") == 5
    assert sample(found, "gradtel_inf_grads_total", layer="fc1") == 1
    assert sample(found, "gradtel_update_nan_grads", layer="fc1") == 3
    assert sample(found, "gradtel_unhealthy_updates_total", kind="nan", severity="warning") == 2
    assert sample(found, "gradtel_unhealthy_updates_total", kind="inf", severity="warning") == 1
    assert sample(found, "gradtel_last_unhealthy_step", kind="nan") == 1
    backward(a)
    first.collect()  # healthy: its gauge goes back to 0, and it recorded last
    found = samples(registry)
    assert sample(found, "gradtel_update_nan_grads", layer="fc1") == 0
    assert sample(found, "gradtel_nan_grads_total", layer="fc1") == 5


def test_thresholds_shape_status_and_bands(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = TwoLayer()
    monitor = GradMonitor(
        model,
        meter_provider=provider,
        thresholds=Thresholds(warning=2, critical=10),
        on_warning="ignore",
    )
    backward(model)
    poison(model.fc1.weight.grad, nan=2)
    assert monitor.collect().status is Status.HEALTHY
    poison(model.fc1.weight.grad, nan=3)
    assert monitor.collect().status is Status.WARNING
    found = samples(registry)
    assert sample(found, "gradtel_unhealthy_updates_total", kind="nan", severity="warning") == 1
    assert sample(found, "gradtel_nan_grads_total", layer="fc1") == 5


class PoisonGradient(torch.autograd.Function):
    """Identity forward; backward hands NaN to everything before it, as an unstable op would."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, NAN)


class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = torch.tanh(block(x))
            if i == 1:
                x = PoisonGradient.apply(x)  # mid-network, during the real backward pass
        return self.head(x)


def test_the_first_bad_layer_is_where_backward_first_produced_nan(
    provider: MeterProvider, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    model = Deep()
    monitor = GradMonitor(model, meter_provider=provider)
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        with caplog.at_level(logging.WARNING, logger="gradtel"):
            health = monitor.collect()
    # NaN flows back from the poison into blocks.1 and blocks.0; head, blocks.3, blocks.2 stay finite.
    assert set(health.nan_by_layer) == {"blocks.0", "blocks.1"}
    assert health.first_bad_layer == health.first_nan_layer == "blocks.1"
    assert health.first_inf_layer is None
    assert caplog.records[-1].getMessage().endswith("first NaN layer in backward order: blocks.1")
    found = samples(registry)
    # The update number of the first of the two NaN updates: the run of them started there.
    assert sample(found, "gradtel_first_bad_layer", kind="nan", layer="blocks.1") == 1
    assert not [
        key
        for key in found
        if key[0] == "gradtel_first_bad_layer" and ("layer", "blocks.0") in key[1]
    ]
    # The order was recorded once, in the first backward pass: no hook is left.
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_first_bad_layer_is_unknown_without_a_backward_pass(provider: MeterProvider) -> None:
    model = TwoLayer()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # set by hand: no backward order known
    model.fc2.weight.grad[0, 0] = NAN
    assert monitor.collect().first_bad_layer is None


def test_counts_read_with_the_update_stay_exact_beyond_float32(provider: MeterProvider) -> None:
    # This rank's own counts ride in the update's one read-out beside float32 flags and
    # a float32 norm: 2**24 + 1 has no float32, so they must be read as float64.
    model = TwoLayer()
    monitor = GradMonitor(model, meter_provider=provider)
    monitor.origin.installed = True
    monitor.origin.add(torch.full((2**24 + 1,), NAN))
    backward(model)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    health = monitor.collect(total_norm=total)
    assert (health.local_nan_total, health.local_inf_total) == (2**24 + 1, 0)
    assert health.grad_norm == pytest.approx(float(total))
    monitor.close()


@pytest.mark.parametrize("when", ["before any backward", "after zero_grad(set_to_none=True)"])
def test_nothing_to_scan_is_unknown_counted_and_logged(
    provider: MeterProvider,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    when: str,
) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    if when != "before any backward":
        net_backward(model)
        torch.optim.SGD(model.parameters(), lr=0.1).zero_grad(set_to_none=True)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        health = monitor.collect()
        monitor.collect()  # the warning is rate-limited
    assert (health.status, health.unscanned, health.scanned) == (Status.UNKNOWN, "no_gradients", 0)
    assert [r.getMessage() for r in caplog.records] == [
        "gradtel: step 1 not scanned: 0 of 6 watched trainable parameters had a gradient; "
        "is collect() called after backward() and before zero_grad()? (status unknown, counted "
        "in gradtel_unscanned_updates_total)"
    ]
    found = samples(registry)
    assert sample(found, "gradtel_unscanned_updates_total", reason="no_gradients") == 2
    assert sample(found, "gradtel_unscanned_updates_total", reason="scan_error") == 0
    assert sample(found, "gradtel_updates_total") == 0
    assert sample(found, "gradtel_update_status") == -1
    net_backward(model)
    assert monitor.collect().status is Status.HEALTHY
    assert sample(samples(registry), "gradtel_update_status") == 0


def test_a_scan_that_raises_is_unknown_not_healthy(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = nn.Linear(4, 4, device="meta")  # counts cannot be read back from the meta device
    monitor = GradMonitor(model, meter_provider=provider)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    health = monitor.collect()
    assert (health.status, health.unscanned) == (Status.UNKNOWN, "scan_error")
    found = samples(registry)
    assert sample(found, "gradtel_unscanned_updates_total", reason="scan_error") == 1
    assert sample(found, "gradtel_updates_total") == 0
    assert sample(found, "gradtel_errors_total", stage="scan") == 1


def test_two_monitors_on_the_same_parameters_and_provider_are_refused(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    first = GradMonitor(model, meter_provider=provider)
    with pytest.raises(
        ValueError, match="another GradMonitor already watches 6 of these parameters"
    ):
        GradMonitor(model, meter_provider=provider)
    with pytest.raises(ValueError, match="already watches 2 of these"):
        GradMonitor(model.head.named_parameters(), meter_provider=provider)
    other = gradtel.prometheus_meter_provider(CollectorRegistry())
    GradMonitor(model, meter_provider=other)  # its own series: allowed
    GradMonitor(nn.Linear(2, 2), meter_provider=provider)  # other parameters: allowed
    first.close()
    second = GradMonitor(model, meter_provider=provider)
    net_backward(model)
    second.collect()
    assert sample(samples(registry), "gradtel_updates_total") == 1
    other.shutdown()


def test_a_dropped_monitor_is_freed_with_its_hooks(provider: MeterProvider) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    ref = weakref.ref(monitor)
    del monitor
    gc.collect()
    assert ref() is None
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    GradMonitor(model, meter_provider=provider)  # its parameters are free again


def test_a_dropped_monitor_is_freed_at_once_without_the_cycle_collector(
    provider: MeterProvider, tmp_path: Path
) -> None:
    # A cycle through the monitor would keep its parameters claimed until a collection
    # runs: a new monitor made right after would be refused.
    model = Net()
    gc.disable()
    try:
        monitor = GradMonitor(model, meter_provider=provider, incident_log=tmp_path / "i.jsonl")
        monitor.subscribe(lambda health: None)
        net_backward(model)
        monitor.collect()
        ref = weakref.ref(monitor)
        del monitor
        assert ref() is None
        GradMonitor(model, meter_provider=provider)
    finally:
        gc.enable()


def test_an_overflow_the_scaler_skips_is_not_an_unhealthy_update(
    provider: MeterProvider, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    monitor = GradMonitor(model, meter_provider=provider, on_critical="raise")
    monitor.attach(optimizer, scaler=scaler)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        amp_step(model, optimizer, scaler, scale=1e3)  # no raise: the scaler handles it
        amp_step(model, optimizer, scaler)
    assert caplog.records == []
    found = samples(registry)
    assert sample(found, "gradtel_skipped_updates_total", reason="amp_overflow") == 1
    assert sample(found, "gradtel_updates_total") == 2
    for kind in ("nan", "inf"):
        for severity in ("warning", "critical"):
            assert (
                sample(found, "gradtel_unhealthy_updates_total", kind=kind, severity=severity) == 0
            )
        assert (
            sum(v for (name, _), v in found.items() if name == f"gradtel_{kind}_grads_total") == 0
        )
    assert sample(found, "gradtel_update_status") == 0


def test_collect_with_a_scaler_by_hand(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    net_backward(model)
    model.head.weight.grad[0, 0] = INF
    health = monitor.collect(scaler=torch.amp.GradScaler("cpu"))
    assert health.amp_overflow and health.inf_total == 1
    assert not monitor.collect(scaler=torch.amp.GradScaler("cpu", enabled=False)).amp_overflow
    with pytest.raises(
        TypeError, match=r"scaler must be a torch.amp.GradScaler or None, got 'yes' \(str\)"
    ):
        monitor.collect(scaler="yes")  # type: ignore[arg-type]


def test_sample_every_scans_one_update_in_n(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = model_with_grads()
    monitor = GradMonitor(model, meter_provider=provider, sample_every=3, on_warning="ignore")
    model[2].bias.grad[0] = NAN
    results = [monitor.collect() for _ in range(7)]
    assert [h.sampled for h in results] == [True, False, False, True, False, False, True]
    assert [h.nan_total for h in results] == [1, 0, 0, 1, 0, 0, 1]
    assert [h.step for h in results] == list(range(1, 8))
    unsampled = results[1]
    assert unsampled.scanned == 0 and unsampled.status is Status.UNKNOWN  # not looked at
    found = samples(registry)
    assert sample(found, "gradtel_updates_total") == 3
    assert sample(found, "gradtel_unhealthy_updates_total", kind="nan", severity="warning") == 3
