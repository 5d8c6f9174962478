"""Collecting without loop edits: optimizer and GradScaler hooks, gradient accumulation, AMP."""

from __future__ import annotations

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

from gradtel import GradMonitor, Status

from .conftest import sample, samples
from .test_clip_and_sampling import record_collects

NAN = float("nan")


def make(
    provider: MeterProvider, **kwargs: object
) -> tuple[nn.Module, torch.optim.Optimizer, GradMonitor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = GradMonitor(
        model, meter_provider=provider, on_warning="ignore", on_critical="ignore", **kwargs
    )  # type: ignore[arg-type]
    return model, optimizer, monitor


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    micro: int,
    nan_at: tuple[int, int] | None = None,
) -> None:
    for step in range(steps):
        optimizer.zero_grad()
        for m in range(micro):
            x = torch.randn(4, 8)
            if (step, m) == nan_at:
                x[0, 0] = NAN  # a bad sample in one micro-batch
            (model(x).pow(2).mean() / micro).backward()
        optimizer.step()


def test_one_scan_per_optimizer_update_with_gradient_accumulation(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model, optimizer, monitor = make(provider)
    monitor.attach(optimizer)
    found = record_collects(monitor)
    train(model, optimizer, steps=5, micro=4, nan_at=(2, 1))
    assert sample(samples(registry), "gradtel_updates_total") == 5
    assert [h.status for h in found] == [Status.HEALTHY] * 2 + [Status.CRITICAL] + [
        Status.CRITICAL
    ] * 2
    # After the bad step the weights are NaN, so later updates stay critical: as in real training.


def test_scan_every_backward(provider: MeterProvider, registry: CollectorRegistry) -> None:
    model, optimizer, monitor = make(provider)
    monitor.attach(optimizer, scan="backward")
    train(model, optimizer, steps=3, micro=4)
    assert sample(samples(registry), "gradtel_updates_total") == 12


def test_remove_detaches(provider: MeterProvider, registry: CollectorRegistry) -> None:
    model, optimizer, monitor = make(provider)
    attachment = monitor.attach(optimizer)
    train(model, optimizer, steps=2, micro=1)
    attachment.remove()
    train(model, optimizer, steps=2, micro=1)
    assert sample(samples(registry), "gradtel_updates_total") == 2


def amp_update(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> None:
    """One bf16 update through ``scaler``: the gradients of 1e3 times a first scale of
    2**127 overflow fp32, and the back-off brings the scale to a sane one."""
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = 1e3 * model(torch.randn(4, 8)).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def test_amp_overflow_is_counted_although_the_scaler_skips_the_step(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model, optimizer, monitor = make(provider)
    # A huge first scale overflows the scaled loss; the back-off brings it to a sane one.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    monitor.attach(optimizer, scaler=scaler)
    found = record_collects(monitor)
    seen: list[torch.Tensor] = []
    original = monitor.collect

    def collect_and_keep(**kwargs: object) -> object:
        seen.append(model[2].weight.grad.clone())
        return original(**kwargs)  # type: ignore[arg-type]

    monitor.collect = collect_and_keep  # type: ignore[method-assign]
    weights = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        amp_update(model, optimizer, scaler)
        if len(found) == 1:
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights)), (
                "step not skipped"
            )
    assert found[0].nan_total + found[0].inf_total > 0 and found[0].status is Status.CRITICAL
    assert found[1].status is Status.HEALTHY
    # What gradtel counted is what the optimizer saw: the unscaled gradients.
    torch.testing.assert_close(seen[1], model[2].weight.grad)
    found_samples = samples(registry)
    assert sample(found_samples, "gradtel_skipped_updates_total", reason="amp_overflow") == 1
    assert sample(found_samples, "gradtel_updates_total") == 2


def test_scan_every_backward_with_a_scaler_counts_its_overflow_as_a_skip(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    """``scan="backward"`` sees the scaled gradients: an overflow the scaler skips is no
    unhealthy update there either."""
    model, optimizer, monitor = make(provider)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    monitor.attach(optimizer, scaler=scaler, scan="backward")
    found = record_collects(monitor)
    for _ in range(2):
        amp_update(model, optimizer, scaler)
    assert [h.amp_overflow for h in found] == [True, False]
    assert found[1].status is Status.HEALTHY
    found_samples = samples(registry)
    assert sample(found_samples, "gradtel_skipped_updates_total", reason="amp_overflow") == 1
    assert not any(
        v for (name, _), v in found_samples.items() if name == "gradtel_unhealthy_updates_total"
    )


def test_bf16_autocast_without_a_scaler(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model, optimizer, monitor = make(provider)
    monitor.attach(optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(4, 8)).float().pow(2).mean().backward()
        optimizer.step()
    found = samples(registry)
    assert sample(found, "gradtel_updates_total") == 3
    assert sample(found, "gradtel_skipped_updates_total", reason="amp_overflow") == 0


def test_policy_skips_are_counted(provider: MeterProvider, registry: CollectorRegistry) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    monitor = GradMonitor(model, meter_provider=provider, on_critical="skip")
    model(torch.randn(2, 4)).sum().backward()
    model.weight.grad.fill_(NAN)
    monitor.collect()
    assert sample(samples(registry), "gradtel_skipped_updates_total", reason="policy") == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (("sgd",), {}, TypeError, r"optimizer must be a torch.optim.Optimizer, got 'sgd' \(str\)"),
        ((), {"scan": "epoch"}, ValueError, r"scan must be 'step' or 'backward', got 'epoch'"),
        ((), {"scaler": 1.0}, TypeError, r"scaler must be a torch.amp.GradScaler or None, got 1.0"),
    ],
)
def test_bad_attach_arguments(
    provider: MeterProvider, args: tuple, kwargs: dict, error: type, message: str
) -> None:
    _, optimizer, monitor = make(provider)
    with pytest.raises(error, match=message):
        monitor.attach(*(args or (optimizer,)), **kwargs)


def test_the_loss_scale_is_exported_from_the_updates_own_read_out(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model, optimizer, monitor = make(provider)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    monitor.attach(optimizer, scaler=scaler)
    scales = []
    for step in range(3):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(4, 8)).pow(2).mean()).backward()
        if step == 1:
            model[0].weight.grad[0, 0] = float("inf")  # an overflow: the scale halves after it
        scaler.step(optimizer)
        scales.append(sample(samples(registry), "gradtel_amp_loss_scale"))
        scaler.update()
    assert scales == [1024.0, 1024.0, 512.0]
