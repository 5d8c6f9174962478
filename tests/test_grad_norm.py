"""The gradient norm as a signal: ``gradtel_grad_norm``, computed on request or for free by
``gradtel.clip_grad_norm_``, read with the update's own read-out."""

from __future__ import annotations

import math

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel
from gradtel.export.telemetry import RollingMax

from .conftest import FakeClock, sample, samples


def trained(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    model(torch.randn(8, 16)).pow(2).sum().backward()
    return model


def torch_norm(model: nn.Module) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))


def test_the_norm_is_torchs_total_norm_when_asked_for(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = trained()
    health = gradtel.GradMonitor(model, meter_provider=provider, grad_norm=True).collect()
    assert health.grad_norm == pytest.approx(torch_norm(model), rel=1e-6)
    assert sample(samples(registry), "gradtel_grad_norm") == pytest.approx(health.grad_norm)


def test_no_norm_and_no_series_by_default(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    assert gradtel.GradMonitor(trained(), meter_provider=provider).collect().grad_norm is None
    assert not [name for name, _ in samples(registry) if name == "gradtel_grad_norm"]


def test_clipping_gives_the_norm_for_free(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = trained(1)
    expected = torch_norm(model)
    monitor = gradtel.GradMonitor(model, meter_provider=provider)  # grad_norm off
    total = gradtel.clip_grad_norm_(model.parameters(), 0.5, monitor=monitor)
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert sample(samples(registry), "gradtel_grad_norm") == pytest.approx(expected, rel=1e-6)


def test_a_max_norm_clip_is_not_an_l2_norm(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = trained(2)
    monitor = gradtel.GradMonitor(model, meter_provider=provider)
    gradtel.clip_grad_norm_(model.parameters(), 0.5, norm_type=math.inf, monitor=monitor)
    assert not [name for name, _ in samples(registry) if name == "gradtel_grad_norm"]


def test_an_unhealthy_update_has_a_nan_norm_and_the_gauge_keeps_the_last_finite_one(
    provider: MeterProvider, registry: CollectorRegistry, capfd: pytest.CaptureFixture[str]
) -> None:
    model = trained(3)
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, grad_norm=True, on_warning="ignore"
    )
    healthy = monitor.collect().grad_norm
    model[0].weight.grad[0, 0] = float("nan")
    health = monitor.collect()
    assert health.nan_total == 1 and math.isnan(health.grad_norm or 0.0)
    assert sample(samples(registry), "gradtel_grad_norm") == healthy
    assert "not finite" not in capfd.readouterr().err  # no complaint from the SDK


def test_clipping_a_subset_does_not_pass_for_the_updates_norm(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = trained(5)
    monitor = gradtel.GradMonitor(model, meter_provider=provider)
    gradtel.clip_grad_norm_(model[0].parameters(), 0.5, monitor=monitor)
    assert not [name for name, _ in samples(registry) if name == "gradtel_grad_norm"]


def test_with_the_norm_the_counts_stay_exact(provider: MeterProvider) -> None:
    model = trained(6)
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, grad_norm=True, on_critical="ignore"
    )
    model[0].weight.grad.view(-1)[:7] = float("nan")
    model[0].bias.grad[:2] = float("inf")
    model[2].weight.grad[0, 3] = -float("inf")
    health = monitor.collect()
    assert health.nan_by_layer == {"0": 7}
    assert health.inf_by_layer == {"0": 2, "2": 1}


def test_the_peak_holds_a_spike_that_the_latest_norm_has_left(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = trained(7)
    monitor = gradtel.GradMonitor(model, meter_provider=provider, grad_norm=True)
    base = monitor.collect().grad_norm or 0.0
    for p in model.parameters():
        p.grad.mul_(50)
    spike = monitor.collect().grad_norm or 0.0
    for p in model.parameters():
        p.grad.div_(50)
    monitor.collect()
    scraped = samples(registry)
    assert spike == pytest.approx(50 * base)
    assert sample(scraped, "gradtel_grad_norm") == pytest.approx(base)
    assert sample(scraped, "gradtel_grad_norm_peak") == pytest.approx(spike)


def test_the_peak_covers_its_window_of_wall_time_when_no_norm_comes(
    provider: MeterProvider, registry: CollectorRegistry, clock: FakeClock
) -> None:
    model = trained(7)
    monitor = gradtel.GradMonitor(model, meter_provider=provider, grad_norm=True)
    monitor._telemetry.clock = clock
    for p in model.parameters():
        p.grad.mul_(50)
    spike = monitor.collect().grad_norm
    clock.advance(60)
    for p in model.parameters():
        p.grad.fill_(float("nan"))  # then only non-finite norms: a run of NaN updates
    monitor.collect()
    assert sample(samples(registry), "gradtel_grad_norm_peak") == pytest.approx(spike)
    clock.advance(61)  # 121 s after the spike, no finite norm since
    scraped = samples(registry)
    assert ("gradtel_grad_norm_peak", frozenset()) not in scraped
    assert sample(scraped, "gradtel_grad_norm") == pytest.approx(spike)  # the latest finite one


def test_the_peak_forgets_values_older_than_its_window() -> None:
    peak = RollingMax(120)
    assert [peak.add(v, now=t) for t, v in ((0, 5.0), (60, 1.0), (119, 2.0), (121, 1.5), (190, 1.0))] == [
        5.0, 5.0, 5.0, 2.0, 2.0,
    ]  # fmt: skip
    assert peak.add(0.5, now=400) == 0.5


def layer_norms_by_hand(model: nn.Sequential) -> dict[str, float]:
    return {
        name: float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters()]))
        for name, module in model.named_children()
        if any(True for _ in module.parameters())
    }


def test_layer_norms_on_request_without_the_nan_and_inf_series(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = trained(8)
    expected = layer_norms_by_hand(model)
    health = gradtel.GradMonitor(model, meter_provider=provider, layer_norms=True).collect()
    assert health.layer_grad_norms == pytest.approx(expected, rel=1e-6)
    assert health.grad_norm is None  # the total is its own option
    scraped = samples(registry)
    for layer, norm in expected.items():
        assert sample(scraped, "gradtel_layer_grad_norm", layer=layer) == pytest.approx(
            norm, rel=1e-6
        )
    assert not [key for key in scraped if key[0] == "gradtel_nan_grads_total"]  # still on demand


def test_layer_norms_reuse_the_norms_of_clipping(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = trained(9)
    expected = layer_norms_by_hand(model)
    monitor = gradtel.GradMonitor(model, meter_provider=provider, layer_norms=True)
    gradtel.clip_grad_norm_(model.parameters(), 0.5, monitor=monitor)
    assert sample(samples(registry), "gradtel_layer_grad_norm", layer="2") == pytest.approx(
        expected["2"], rel=1e-6
    )


def test_a_layer_with_nan_keeps_its_last_finite_norm(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = trained(10)
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, layer_norms=True, on_warning="ignore"
    )
    before = monitor.collect().layer_grad_norms or {}
    for p in model[2].parameters():
        p.grad.mul_(2)
    model[0].weight.grad[0, 0] = float("nan")
    after = monitor.collect().layer_grad_norms or {}
    assert math.isnan(after["0"]) and after["2"] == pytest.approx(2 * before["2"])
    scraped = samples(registry)
    assert sample(scraped, "gradtel_layer_grad_norm", layer="0") == pytest.approx(before["0"])
    assert sample(scraped, "gradtel_layer_grad_norm", layer="2") == pytest.approx(after["2"])


def test_only_rank_0_computes_layer_norms(
    provider: MeterProvider, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    health = gradtel.GradMonitor(trained(11), meter_provider=provider, layer_norms=True).collect()
    assert health.layer_grad_norms is None
    assert not [key for key in samples(registry) if key[0] == "gradtel_layer_grad_norm"]


def test_the_peak_is_the_largest_of_the_monitors_that_share_the_labels(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    generator, discriminator = trained(1), trained(2)  # a GAN's two models, one process
    for p in generator.parameters():
        p.grad.mul_(1000)
    spiking = gradtel.GradMonitor(generator, meter_provider=provider, grad_norm=True)
    calm = gradtel.GradMonitor(discriminator, meter_provider=provider, grad_norm=True)
    spike = spiking.collect().grad_norm
    calm.collect()  # later, in the same second
    assert sample(samples(registry), "gradtel_grad_norm_peak") == pytest.approx(spike)
    # And so is the norm, which the spike alert holds the peak against: the calm one's,
    # collected last, made a GAN's steady norms a spike of the peak over the median.
    assert sample(samples(registry), "gradtel_grad_norm") == pytest.approx(spike)
    spiking.close()  # a closed monitor's norm is no longer the largest
    calm.collect()
    assert sample(samples(registry), "gradtel_grad_norm") == pytest.approx(
        torch_norm(discriminator)
    )


def test_a_layer_frozen_since_has_no_layer_norm(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    """It kept its norm of the last update it trained in, forever."""
    model = trained(3)
    monitor = gradtel.GradMonitor(model, meter_provider=provider, layer_norms=True)
    monitor.collect()
    model[0].requires_grad_(False)
    model[0].weight.grad = model[0].bias.grad = None
    assert set(monitor.collect().layer_grad_norms or ()) == {"2"}
    exported = {labels for name, labels in samples(registry) if name == "gradtel_layer_grad_norm"}
    assert exported == {frozenset({("layer", "2")})}


def test_a_norm_asked_for_but_not_computed_for_sparse_gradients_is_said(
    provider: MeterProvider, caplog: pytest.LogCaptureFixture
) -> None:
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    monitor = gradtel.GradMonitor(model, meter_provider=provider, grad_norm=True)
    model(torch.tensor([1, 2])).sum().backward()
    assert monitor.collect().grad_norm is None
    assert "sparse gradients: grad_norm and layer_norms are not computed" in caplog.text
