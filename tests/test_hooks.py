"""Collecting without loop edits: optimizer and GradScaler hooks, gradient accumulation, AMP."""

from __future__ import annotations

import copy
import gc
import pickle
import time
import weakref
from typing import Any

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel
from gradtel import GradMonitor, Status, prometheus_meter_provider

from .conftest import Net, sample, samples
from .test_clip import record_collects

NAN = float("nan")
INF = float("inf")


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


def test_close_removes_the_monitors_attachments(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    # A closed monitor frees its parameters for another one: its attachment must not go on
    # collecting beside the new monitor's, or every update would be counted twice.
    model, optimizer, old = make(provider)
    old.attach(optimizer)
    old.close()
    new = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    new.attach(optimizer)
    train(model, optimizer, steps=1, micro=1, nan_at=(0, 0))
    found = samples(registry)
    assert sample(found, "gradtel_updates_total") == 1
    reference = sum(int(torch.isnan(p.grad).sum()) for p in model.parameters())
    assert reference > 0
    assert (
        sum(v for (name, labels), v in found.items() if name == "gradtel_nan_grads_total")
        == reference
    )
    new.close()


def two_nans(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad.view(-1)[:2] = NAN
    return grad


def backbone_and_head(change: str) -> nn.Sequential:
    """A backbone and a head, the head frozen at first when it is to be unfrozen later."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    if change == "unfrozen head":
        model[1].requires_grad_(False)
    return model


def train_the_head_alone(
    model: nn.Sequential, change: str, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Transfer learning after attach(): freeze the backbone; unfreeze the head, or put a
    new one in (into ``optimizer`` too)."""
    model[0].requires_grad_(False)
    if change == "unfrozen head":
        model[1].requires_grad_(True)
        return
    model[1] = nn.Linear(8, 2)
    if optimizer is not None:
        optimizer.add_param_group({"params": list(model[1].parameters())})


@pytest.mark.parametrize("change", ["new head", "new head, refreshed by hand", "unfrozen head"])
def test_attach_counts_before_clipping_the_parameters_that_train_only_later(
    provider: MeterProvider, change: str
) -> None:
    # Transfer learning: the backbone is frozen and a head trains, one that was replaced or
    # unfrozen after attach(). Its gradients must be counted as backward left them, before
    # torch's clipping turns every gradient into NaN.
    model = backbone_and_head(change)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    found = record_collects(monitor)
    monitor.attach(optimizer)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    train_the_head_alone(model, change, optimizer)
    if change == "new head, refreshed by hand":
        assert monitor.refresh()
    model[1].weight.register_hook(two_nans)
    model(torch.randn(3, 4)).sum().backward()
    reference = sum(int(torch.isnan(p.grad).sum()) for p in model.parameters() if p.requires_grad)
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a NaN total norm: all NaN now
    optimizer.step()
    assert (found[-1].nan_total, found[-1].nan_by_layer) == (reference, {"1": 2})
    assert found[-1].status is Status.WARNING
    monitor.close()


@pytest.mark.parametrize("change", ["new head", "unfrozen head"])
def test_scan_backward_goes_on_collecting_when_only_later_parameters_train(
    provider: MeterProvider, registry: CollectorRegistry, change: str
) -> None:
    model = backbone_and_head(change)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = GradMonitor(model, meter_provider=provider)
    monitor.attach(optimizer, scan="backward")
    model(torch.randn(3, 4)).sum().backward()
    train_the_head_alone(model, change)
    for _ in range(3):
        model(torch.randn(3, 4)).sum().backward()
    assert sample(samples(registry), "gradtel_updates_total") == 4
    monitor.close()


@pytest.mark.parametrize("scan", ["step", "backward"])
def test_a_model_called_through_its_submodules_gets_a_new_heads_hooks_at_the_next_step(
    provider: MeterProvider, registry: CollectorRegistry, scan: str
) -> None:
    # The root module is never called, so no forward pre-hook of it runs: the optimizer's
    # step hooks the new head, and every update after the one that follows the swap is
    # counted as backward left it.
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(4, 8), "head": nn.Linear(8, 2)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    found = record_collects(monitor)
    monitor.attach(optimizer, scan=scan)  # type: ignore[arg-type]

    def update(nan: bool = False) -> int:
        optimizer.zero_grad()
        model["head"](model["body"](torch.randn(3, 4))).sum().backward()
        reference = sum(
            int(torch.isnan(p.grad).sum()) for p in model.parameters() if p.requires_grad
        )
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return reference

    update()
    model["body"].requires_grad_(False)
    model["head"] = nn.Linear(8, 2)
    optimizer.add_param_group({"params": list(model["head"].parameters())})
    update()  # hooked at this step
    model["head"].weight.register_hook(two_nans)
    assert update() == 2
    assert (found[-1].nan_total, found[-1].nan_by_layer) == (2, {"head": 2})
    monitor.close()


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("scan", ["step", "backward"])
def test_a_training_function_that_returns_frees_what_it_made_and_publishes_its_last_update(
    provider: MeterProvider, registry: CollectorRegistry, scan: str, amp: bool
) -> None:
    def run() -> list[weakref.ref[object]]:
        model, optimizer, monitor = make(provider, readout="deferred")
        scaler = (
            torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
            if amp
            else None
        )
        monitor.attach(optimizer, scan=scan, scaler=scaler)  # type: ignore[arg-type]
        if scaler is not None:
            for _ in range(2):
                amp_update(model, optimizer, scaler)  # an overflow, then a healthy update
        else:
            train(model, optimizer, steps=2, micro=1, nan_at=(1, 0))  # the last one: NaN
        return [weakref.ref(o) for o in (model, optimizer, monitor, scaler) if o is not None]

    def published() -> bool:
        found = samples(registry)
        unhealthy = sum(
            v for (name, _), v in found.items() if name == "gradtel_unhealthy_updates_total"
        )
        return sample(found, "gradtel_updates_total") == 2 and (amp or unhealthy == 1)

    made = run()  # no close()
    deadline = time.monotonic() + 10
    while any(ref() is not None for ref in made) or not published():
        assert time.monotonic() < deadline, ([ref() for ref in made], samples(registry))
        gc.collect()
        time.sleep(0.01)


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


def test_scan_backward_under_a_scaler_hooks_a_new_head_that_overflows_every_step(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    # The scaler skips every step, so no optimizer step hook runs: its unscale_ checks.
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(8, 8), "head": nn.Linear(8, 1)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    monitor = GradMonitor(model, meter_provider=provider)
    monitor.attach(optimizer, scan="backward", scaler=scaler)
    model["body"].requires_grad_(False)
    model["head"] = nn.Linear(8, 1)
    optimizer.add_param_group({"params": list(model["head"].parameters())})
    model["head"].weight.register_hook(lambda grad: torch.full_like(grad, INF))
    for _ in range(4):
        optimizer.zero_grad()
        scaler.scale(model["head"](model["body"](torch.randn(4, 8))).mean()).backward()
        scaler.step(optimizer)
        scaler.update()
    # Hooked at the first update's unscale_: the three after it are collected, as skips.
    found = samples(registry)
    assert sample(found, "gradtel_skipped_updates_total", reason="amp_overflow") == 3
    monitor.close()


def test_another_wrapper_of_the_scalers_unscale_is_kept_around_or_inside_gradtels(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model, optimizer, first = make(provider)
    second = GradMonitor(nn.Linear(2, 2), meter_provider=gradtel.prometheus_meter_provider(
        CollectorRegistry()))  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    calls: list[str] = []

    def wrap(name: str) -> None:
        inner = scaler.unscale_

        def unscale_(optimizer: torch.optim.Optimizer) -> None:  # someone else's profiler
            calls.append(name)
            inner(optimizer)

        scaler.unscale_ = unscale_  # type: ignore[method-assign]

    wrap("before")
    one = first.attach(optimizer, scaler=scaler)
    wrap("between")
    other = second.attach(optimizer, scaler=scaler)  # the same tap, inside "between"
    amp_update(model, optimizer, scaler)  # an overflow: only unscale_ sees it
    one.remove()
    amp_update(model, optimizer, scaler)
    assert calls == ["between", "before"] * 2
    found = samples(registry)
    assert sample(found, "gradtel_skipped_updates_total", reason="amp_overflow") == 1
    other.remove()
    second.close()
    first.close()
    assert scaler.unscale_.__name__ == "unscale_" and "unscale_" in scaler.__dict__
    amp_update(model, optimizer, scaler)
    assert calls[-2:] == ["between", "before"]  # both wrappers still called, gradtel gone


def test_a_tapped_scaler_pickles_and_copies_as_one_without_monitors(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model, optimizer, monitor = make(provider)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    monitor.attach(optimizer, scaler=scaler)
    restored = pickle.loads(pickle.dumps(scaler))
    twin = copy.deepcopy(scaler)
    for other in (restored, twin):  # unscale as their class does, reporting to no monitor
        amp_update(model, optimizer, other)
    assert sample(samples(registry), "gradtel_updates_total") == 0
    assert not scaler._per_optimizer_states  # the copies left the original's state alone
    amp_update(model, optimizer, scaler)
    assert sample(samples(registry), "gradtel_updates_total") == 1
    monitor.close()


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


@pytest.mark.parametrize("scan", ["step", "backward"])
def test_a_nan_loss_under_a_scaler_is_no_overflow_without_being_told_the_loss(
    provider: MeterProvider, registry: CollectorRegistry, scan: str
) -> None:
    """The reference's fp16 recipe, ``attach(optimizer, scaler=scaler)``, gives no ``loss=``:
    the NaN gradients of a NaN loss were an overflow the scaler handles, skipped and never
    unhealthy. gradtel reads the loss the scaler scales."""
    model, optimizer, monitor = make(provider)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    attachment = monitor.attach(optimizer, scaler=scaler, scan=scan)  # type: ignore[arg-type]
    found = record_collects(monitor)
    for bad in (False, True, False):
        optimizer.zero_grad()
        x = torch.randn(4, 8)
        x[0, 0] = NAN if bad else x[0, 0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped: the weights keep clear of the NaN
        scaler.update()
    assert [(h.loss_finite, h.amp_overflow, h.status) for h in found] == [
        (True, False, Status.HEALTHY),
        (False, False, Status.CRITICAL),
        (True, False, Status.HEALTHY),
    ]
    found_samples = samples(registry)
    assert sample(found_samples, "gradtel_nonfinite_loss_updates_total") == 1
    assert sample(found_samples, "gradtel_skipped_updates_total", reason="amp_overflow") == 0
    attachment.remove()
    assert "scale" not in vars(scaler) and "unscale_" not in vars(scaler)  # the class's own


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


def test_a_fused_optimizer_under_a_scaler_is_collected(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    monitor.attach(optimizer, scaler=scaler)
    found = record_collects(monitor)
    weights = [p.detach().clone() for p in model.parameters()]
    amp_step(model, optimizer, scaler, scale=1e3)  # overflows: the fused step skips itself
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    for _ in range(3):
        amp_step(model, optimizer, scaler)
    assert [h.amp_overflow for h in found] == [True, False, False, False]
    found_samples = samples(registry)
    assert sample(found_samples, "gradtel_updates_total") == 4
    assert sample(found_samples, "gradtel_skipped_updates_total", reason="amp_overflow") == 1


def test_a_fused_optimizer_unscaled_by_hand_is_collected_once(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu")
    GradMonitor(model, meter_provider=provider).attach(optimizer, scaler=scaler)
    for _ in range(3):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(4, 8)).pow(2).mean()).backward()
        scaler.unscale_(optimizer)  # to clip, as the AMP recipe does
        scaler.step(optimizer)
        scaler.update()
    assert sample(samples(registry), "gradtel_updates_total") == 3


def test_removing_one_of_two_monitors_on_a_scaler_keeps_the_other() -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    registries = [CollectorRegistry(), CollectorRegistry()]
    providers = [gradtel.prometheus_meter_provider(r) for r in registries]
    monitors = [GradMonitor(model, meter_provider=p) for p in providers]
    attachments = [m.attach(optimizer, scaler=scaler) for m in monitors]
    amp_step(model, optimizer, scaler)
    attachments[0].remove()
    amp_step(model, optimizer, scaler)
    attachments[1].remove()
    amp_step(model, optimizer, scaler)
    counts = [sample(samples(r), "gradtel_updates_total") for r in registries]
    assert counts == [1, 2]
    assert "unscale_" not in vars(scaler)  # the scaler is as it was
    for p in providers:
        p.shutdown()


@pytest.mark.parametrize("scaler", [False, True])
def test_collect_by_hand_beside_attach_collects_each_update_once(
    provider: MeterProvider, registry: CollectorRegistry, scaler: bool
) -> None:
    """A loop that keeps its ``collect()`` after adding ``attach()``: every update was counted
    twice (one NaN made two unhealthy updates). The first collection after backward counts
    it; the other repeats its health."""
    model, optimizer, monitor = make(provider)
    grad_scaler = torch.amp.GradScaler("cpu", enabled=scaler)
    monitor.attach(optimizer, scaler=grad_scaler)
    found = record_collects(monitor)
    for bad in (False, True, False):
        optimizer.zero_grad()
        x = torch.randn(4, 8)
        x[0, 0] = NAN if bad else x[0, 0]
        grad_scaler.scale(model(x).pow(2).mean()).backward()
        grad_scaler.unscale_(optimizer)  # attach() collects here with the scaler
        by_hand = monitor.collect(scaler=grad_scaler if scaler else None)
        grad_scaler.step(optimizer)  # and here without
        grad_scaler.update()
        assert found[-1] is by_hand
    updates = list({id(h): h for h in found}.values())
    assert len(updates) == 3 and updates[1].nan_total > 0
    unhealthy = [(name, v) for (name, _), v in samples(registry).items() if "unhealthy_up" in name]
    assert sample(samples(registry), "gradtel_updates_total") == 3
    assert sum(v for _, v in unhealthy) == sum(h.status.level > 0 for h in updates)


class Overflows(nn.Module):
    """A finite loss whose gradient overflows to Inf when asked: an overflow the scaler skips."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.w = nn.Linear(8, 1), nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, overflow: bool) -> torch.Tensor:
        out = self.lin(x).pow(2).mean()
        return out + torch.sqrt(self.w - self.w.detach()) if overflow else out  # d/dw: +Inf


def test_each_monitor_reads_its_own_models_loss_from_a_shared_scaler(
    provider: MeterProvider,
) -> None:
    """torch's AMP recipe for several models with one scaler: the loss a scaler scales is
    read by the monitor whose parameters its backward pass reaches. A NaN in A's loss made
    B's handled overflow an unhealthy update with a non-finite loss."""
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1)), Overflows()
    watch_a = GradMonitor(a, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    watch_b = GradMonitor(b, meter_provider=prometheus_meter_provider(CollectorRegistry()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.0) for m in (a, b)]
    for monitor, optimizer in zip((watch_a, watch_b), optimizers):
        monitor.attach(optimizer, scaler=scaler)
    found_a, found_b = record_collects(watch_a), record_collects(watch_b)
    for bad in (False, True):
        x = torch.randn(4, 8)
        scaler.scale(a(torch.where(torch.tensor(bad), NAN, x)).pow(2).mean()).backward()
        scaler.scale(b(x, overflow=bad)).backward()
        for optimizer in optimizers:
            scaler.step(optimizer)
            optimizer.zero_grad()
        scaler.update()
    assert [(h.loss_finite, h.amp_overflow) for h in found_a] == [(True, False), (False, False)]
    assert [(h.loss_finite, h.amp_overflow) for h in found_b] == [(True, False), (True, True)]


@pytest.mark.parametrize("removed", ["first", "second"])
@pytest.mark.parametrize("scale", ["a list", "a keyword"])
def test_the_scaled_loss_is_read_however_scale_is_called_and_attachments_removed(
    provider: MeterProvider, removed: str, scale: str
) -> None:
    """Two optimizers over one model and one scaler: removing the second attachment left the
    first reading the removed one's loss (never fed), and a NaN loss was an overflow again;
    ``scale([loss])`` was not read, and ``scale(outputs=loss)`` raised in the loop."""
    model, optimizer, monitor = make(provider)
    other = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    attachments = [monitor.attach(o, scaler=scaler) for o in (optimizer, other)]
    attachments[0 if removed == "first" else 1].remove()
    kept = other if removed == "first" else optimizer
    found = record_collects(monitor)
    for bad in (False, True):
        kept.zero_grad()
        x = torch.randn(4, 8)
        loss = model(torch.where(torch.tensor(bad), NAN, x)).pow(2).mean()
        scaled = scaler.scale([loss])[0] if scale == "a list" else scaler.scale(outputs=loss)
        scaled.backward()
        scaler.step(kept)
        scaler.update()
    assert [(h.loss_finite, h.amp_overflow, h.status) for h in found] == [
        (True, False, Status.HEALTHY),
        (False, False, Status.CRITICAL),
    ]


def test_once_per_update_with_scan_backward_lbfgs_and_gradients_without_backward(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    """``scan="backward"`` beside ``gradtel.clip_grad_norm_``, and LBFGS (three closure passes
    a step) beside ``collect()`` after the step, counted each update twice; gradients given
    by ``torch.autograd.grad`` after one backward pass were then never counted at all."""
    model, optimizer, monitor = make(provider)
    monitor.attach(optimizer, scan="backward")
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        gradtel.clip_grad_norm_(model.parameters(), 1.0, monitor=monitor)
        optimizer.step()
    monitor.close()
    assert sample(samples(registry), "gradtel_updates_total") == 3

    registry = CollectorRegistry()
    model, _, monitor = make(prometheus_meter_provider(registry))
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    monitor.attach(lbfgs)
    x = torch.randn(4, 8)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        lbfgs.step(closure)  # type: ignore[arg-type]
        monitor.collect()
    monitor.close()
    assert sample(samples(registry), "gradtel_updates_total") == 3

    registry = CollectorRegistry()
    model, optimizer, monitor = make(prometheus_meter_provider(registry))
    monitor.attach(optimizer)
    found = record_collects(monitor)
    for update in range(4):
        optimizer.zero_grad()
        loss = model(torch.randn(4, 8)).pow(2).mean()
        if update == 0:
            loss.backward()
        else:  # gradients of one's own, as a meta-learning loop gives them
            for p, g in zip(
                model.parameters(), torch.autograd.grad(loss, list(model.parameters()))
            ):
                p.grad = g.index_fill(0, torch.tensor([0]), NAN) if update == 2 else g
        optimizer.step()
    assert sample(samples(registry), "gradtel_updates_total") == 4
    assert [h.nan_total > 0 for h in found] == [False, False, True, True]


def test_attach_and_gradtel_clipping_export_the_gradient_norm(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    """The look ``attach()`` took at the end of backward has no norm: clipping's own is used."""
    model, optimizer, monitor = make(provider)
    monitor.attach(optimizer)
    optimizer.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    total = gradtel.clip_grad_norm_(model.parameters(), 1e9, monitor=monitor)
    optimizer.step()
    assert sample(samples(registry), "gradtel_grad_norm") == pytest.approx(float(total))


def test_collect_before_and_after_the_step_beside_attach_is_one_update(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    """Two collections of the user around an attached step counted the update twice, the
    second time after clipping; a "raise" policy's update, caught, was counted again."""
    model, optimizer, monitor = make(provider)
    monitor.attach(optimizer)
    for bad in (False, True, False):
        optimizer.zero_grad()
        x = torch.randn(4, 8)
        x[0, 0] = NAN if bad else x[0, 0]
        model(x).pow(2).mean().backward()
        before = monitor.collect()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # spreads a NaN everywhere
        optimizer.step()
        assert monitor.collect() is before
    assert sample(samples(registry), "gradtel_updates_total") == 3
    monitor.close()

    registry = CollectorRegistry()
    model, optimizer, _ = make(prometheus_meter_provider(CollectorRegistry()))
    raising = GradMonitor(
        model,
        meter_provider=prometheus_meter_provider(registry),
        on_warning="raise",
        on_critical="raise",
    )
    raising.attach(optimizer)
    x = torch.randn(4, 8)
    x[0, 0] = NAN
    model(x).pow(2).mean().backward()
    with pytest.raises(gradtel.NonFiniteGradientError) as raised:
        optimizer.step()
    assert raising.collect() is raised.value.health  # repeated, raising no more
    assert sample(samples(registry), "gradtel_updates_total") == 1


def test_a_collect_that_failed_leaves_the_update_to_the_next_collection(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    """A ``collect()`` given bad norms raised; the corrected call then repeated the update
    before, and the attached step counted nothing: the NaN update was lost."""
    model, optimizer, monitor = make(provider)
    monitor.attach(optimizer)
    for bad in (False, True):
        optimizer.zero_grad()
        x = torch.randn(4, 8)
        x[0, 0] = NAN if bad else x[0, 0]
        model(x).pow(2).mean().backward()
        with pytest.raises(ValueError, match="norms must be"):
            monitor.collect(norms=torch.ones(2))
        assert (monitor.collect().nan_total > 0) == bad
        optimizer.step()
    assert sample(samples(registry), "gradtel_updates_total") == 2


def test_gradients_given_anew_beside_attach_are_updates_of_their_own_a_first_layer_frozen(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    """Gradients assigned without a backward pass (``torch.autograd.grad``), collected by the
    loop and stepped with ``attach()``: the first layer frozen (as in adapters), the repeat
    check read its gradient, always None, and gave each update the health of the one before."""
    model, optimizer, monitor = make(provider)
    model[0].requires_grad_(False)
    monitor.attach(optimizer)
    trained = [p for p in model.parameters() if p.requires_grad]
    for update in range(3):
        optimizer.zero_grad()
        loss = model(torch.randn(4, 8)).pow(2).mean()
        for p, grad in zip(trained, torch.autograd.grad(loss, trained)):
            p.grad = grad.index_fill(0, torch.tensor([0]), NAN) if update == 1 else grad
        reference = sum(int(p.grad.isnan().sum()) for p in trained)  # counted here
        assert monitor.collect().nan_total == reference and (reference > 0) == (update > 0)
        optimizer.step()  # the NaN goes into the weights: the next gradients hold NaN too
    assert sample(samples(registry), "gradtel_updates_total") == 3


def test_a_collected_gradient_is_not_kept_alive(provider: MeterProvider) -> None:
    """The once-per-update check remembers the first trained parameter's gradient, often the
    embedding's and the largest: held strongly, ``zero_grad()`` no longer freed it."""
    model, optimizer, monitor = make(provider)
    monitor.attach(optimizer)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    optimizer.step()  # collected
    gradient = weakref.ref(model[0].weight.grad)
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    assert gradient() is None


def test_a_look_left_by_a_removed_attachment_is_not_counted(provider: MeterProvider) -> None:
    """A NaN pass, the attachment removed before the step, clean gradients written into the
    same tensors by the next pass: ``collect()`` counted the removed attachment's look."""
    model, optimizer, monitor = make(provider)
    attachment = monitor.attach(optimizer)
    x = torch.randn(4, 8)
    x[0, 0] = NAN
    optimizer.zero_grad(set_to_none=False)
    model(x).pow(2).mean().backward()
    attachment.remove()
    optimizer.zero_grad(set_to_none=False)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    assert monitor.collect().nan_total == 0


@pytest.mark.parametrize("how", ["fused", "scan backward"])
def test_the_norm_of_gradients_still_scaled_is_divided_by_the_scale(
    provider: MeterProvider, registry: CollectorRegistry, how: str
) -> None:
    """A fused optimizer unscales inside its step, and ``scan="backward"`` looks before the
    scaler does: the norms exported were the loss scale (4096) times the optimizer's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    fused = how == "fused"
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=fused or None)
    monitor = GradMonitor(model, meter_provider=provider, grad_norm=True, layer_norms=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    monitor.attach(optimizer, scaler=scaler, scan="step" if fused else "backward")
    found = record_collects(monitor)
    scaler.scale(model(torch.randn(4, 8)).pow(2).mean()).backward()
    unscaled = [p.grad / 4096.0 for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert found[-1].grad_norm == pytest.approx(float(nn.utils.get_total_norm(unscaled)))
    assert found[-1].layer_grad_norms == pytest.approx(
        {
            "0": float(nn.utils.get_total_norm(unscaled[:2])),
            "2": float(nn.utils.get_total_norm(unscaled[2:])),
        }
    )
    assert sample(samples(registry), "gradtel_grad_norm") == pytest.approx(found[-1].grad_norm)


def test_attaching_twice_to_one_optimizer_is_refused(provider: MeterProvider) -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = GradMonitor(model, meter_provider=provider)
    attachment = monitor.attach(optimizer)
    with pytest.raises(ValueError, match="already attached to this optimizer"):
        monitor.attach(optimizer, scaler=torch.amp.GradScaler("cpu"))
    attachment.remove()
    monitor.attach(optimizer, scan="backward").remove()  # free again after remove()


class FailsOnce(torch.autograd.Function):
    failed = False

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if not FailsOnce.failed:
            FailsOnce.failed = True
            raise torch.OutOfMemoryError("simulated out of memory")
        return grad


def test_scan_backward_is_attached_once_for_all_the_optimizers_of_a_model(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model, first, monitor = make(provider)
    second = torch.optim.SGD(model[2].parameters(), lr=0.01)
    attachment = monitor.attach(first, scan="backward")
    with pytest.raises(ValueError, match="serves every optimizer of the model"):
        monitor.attach(second, scan="backward")
    train(model, first, steps=2, micro=1)
    assert sample(samples(registry), "gradtel_updates_total") == 2  # once per pass
    with pytest.raises(ValueError, match="would count those updates again"):
        monitor.attach(second)  # scan="step" beside it: every pass counted twice as well
    attachment.remove()
    stepping = monitor.attach(second)
    with pytest.raises(ValueError, match="would count those updates again"):
        monitor.attach(first, scan="backward")
    stepping.remove()
    monitor.attach(first, scan="backward")  # free again
    monitor.close()


def test_scan_backward_resumes_after_a_backward_that_raised(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    monitor.attach(torch.optim.SGD(model.parameters(), lr=0.01), scan="backward")

    def step() -> None:
        model.zero_grad()
        # The head's gradient comes first; the failure comes on the way to the body.
        hidden = FailsOnce.apply(torch.relu(model.body(torch.randn(4, 8))))
        model.head(hidden).pow(2).mean().backward()

    with pytest.raises(torch.OutOfMemoryError):
        step()
    for _ in range(3):
        step()
    assert sample(samples(registry), "gradtel_updates_total") == 3


class Checkpointed(nn.Module):
    """A block in the middle recomputed in backward by reentrant activation checkpointing
    (Hugging Face's default): its backward is a backward pass inside a node of the outer."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.enc(x))
        block = torch.utils.checkpoint.checkpoint(
            lambda t: torch.relu(self.mid(t)), hidden, use_reentrant=True
        )
        return self.head(block)


@pytest.mark.parametrize("scan", ["step", "backward"])
@pytest.mark.parametrize("trains", ["all", "the checkpointed block only"])
def test_reentrant_checkpointing_is_one_backward_pass_counted_at_its_end(
    registry: CollectorRegistry, provider: MeterProvider, scan: str, trains: str
) -> None:
    """The block's own backward pass ended before the encoder's gradient was made: counted
    there, a NaN in the encoder was missed (the Hugging Face callback counted that early
    look) and ``scan="backward"`` made three updates of each pass, one of them healthy."""
    torch.manual_seed(0)
    model = Checkpointed()
    if trains != "all":  # as LoRA trains adapters inside the checkpointed layers
        for layer in (model.enc, model.head):
            layer.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    found = record_collects(monitor)
    monitor.attach(optimizer, scan=scan)  # type: ignore[arg-type]
    bad = model.enc if trains == "all" else model.mid
    poison = [False]
    bad.weight.register_hook(
        lambda grad: grad.index_fill(1, torch.tensor([0]), NAN) if poison[0] else grad
    )
    reference = []  # the NaN per layer that backward left, counted here
    for update in range(3):
        poison[0] = update == 1
        optimizer.zero_grad()
        # (A reentrant checkpoint needs an input that requires grad: as Hugging Face's
        # enable_input_require_grads() makes it for adapters.)
        model(torch.randn(4, 4).requires_grad_(trains != "all")).sum().backward()
        nan = {name.rsplit(".", 1)[0]: 0 for name, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            if p.grad is not None:
                nan[name.rsplit(".", 1)[0]] += int(p.grad.isnan().sum())
        reference.append({layer: count for layer, count in nan.items() if count})
        optimizer.step()  # lr 0, yet NaN * 0 is NaN: the weights take the NaN
    assert reference[0] == {} and reference[1] == {("enc" if trains == "all" else "mid"): 8}
    assert sample(samples(registry), "gradtel_updates_total") == 3
    assert [dict(h.nan_by_layer) for h in found] == reference


def amp_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scale: float = 1.0,
) -> None:
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = scale * model(torch.randn(4, 8)).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
