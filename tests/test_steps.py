"""The training step on every unhealthy update: ``collect(step=...)``, the optimizer's
step count when attached, and the framework callbacks (in test_integrations)."""

from __future__ import annotations

import logging

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry

import gradtel

from .conftest import net, sample, samples

NAN = float("nan")


def test_the_step_given_to_collect_is_on_the_health_the_log_and_the_metrics(
    provider: MeterProvider, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    model = net()
    monitor = gradtel.GradMonitor(model, meter_provider=provider, on_warning="warn")
    model(torch.randn(2, 4)).sum().backward()
    assert monitor.collect(step=41).step == 41
    model[0].weight.grad[0, 0] = NAN
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        health = monitor.collect(step=42)
    assert health.step == 42
    assert "gradtel: step 42 is warning: NaN=1" in caplog.text
    found = samples(registry)
    assert sample(found, "gradtel_last_unhealthy_step", kind="nan") == 42
    assert sample(found, "gradtel_first_bad_layer", kind="nan", layer="0") == 42
    assert ("gradtel_last_unhealthy_step", frozenset({("kind", "inf")})) not in found


def test_without_a_step_the_monitor_counts_updates(provider: MeterProvider) -> None:
    model = net()
    monitor = gradtel.GradMonitor(model, meter_provider=provider)
    model(torch.randn(2, 4)).sum().backward()
    assert [monitor.collect().step for _ in range(3)] == [1, 2, 3]


def test_attached_updates_carry_the_optimizer_step(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradtel.GradMonitor(model, meter_provider=provider, on_critical="skip")
    monitor.attach(optimizer)
    for step in range(1, 5):
        optimizer.zero_grad()
        x = torch.randn(2, 4)
        if step == 3:
            x[0, 0] = NAN  # a bad sample: backward makes NaN gradients
        model(x).sum().backward()
        optimizer.step()
    assert sample(samples(registry), "gradtel_last_unhealthy_step", kind="nan") == 3


@pytest.mark.parametrize("order", ["resumed, then attached", "attached, then resumed"])
def test_attached_to_a_resumed_optimizer_the_steps_go_on_from_its_count(
    provider: MeterProvider, registry: CollectorRegistry, order: str
) -> None:
    model = net()
    optimizer = torch.optim.Adam(model.parameters())
    for _ in range(3):  # a few real steps; the saved state then says 1000, as a long run
        optimizer.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
    saved = optimizer.state_dict()
    for state in saved["state"].values():
        state["step"] = torch.tensor(1000.0)
    resumed = torch.optim.Adam(model.parameters())
    monitor = gradtel.GradMonitor(model, meter_provider=provider)
    if order == "resumed, then attached":
        resumed.load_state_dict(saved)
        monitor.attach(resumed)
    else:
        monitor.attach(resumed)
        resumed.load_state_dict(saved)
    resumed.zero_grad()
    x = torch.randn(2, 4)
    x[0, 0] = NAN  # a bad sample: backward makes NaN gradients
    model(x).sum().backward()
    resumed.step()
    assert sample(samples(registry), "gradtel_last_unhealthy_step", kind="nan") == 1001
    assert monitor.last_healthy_step is None
    assert gradtel.attach.optimizer.steps_taken(resumed) == 1001


def test_after_a_rollback_the_first_bad_layer_is_the_new_incidents(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = net()
    monitor = gradtel.GradMonitor(model, meter_provider=provider, on_warning="ignore")
    for step, layer in ((500, 2), (501, 0)):  # one incident, in layer 2, spreading to 0
        model.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        model[layer].weight.grad[0, 0] = NAN
        monitor.collect(step=step)
    assert sample(samples(registry), "gradtel_first_bad_layer", kind="nan", layer="2") == 500
    monitor.reset_health()  # the recovery recipe: roll back to a healthy checkpoint
    model.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    model[0].weight.grad[0, 0] = NAN
    monitor.collect(step=450)  # a new incident, at an earlier step, in layer 0
    found = samples(registry)
    assert sample(found, "gradtel_first_bad_layer", kind="nan", layer="0") == 450
    assert sample(found, "gradtel_first_bad_layer", kind="nan", layer="2") == 0


def test_attach_takes_the_users_own_step_and_loss(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, on_warning="skip", on_critical="skip"
    )
    iter_num = 0
    loss = torch.tensor(0.0)
    monitor.attach(optimizer, step=lambda: iter_num, loss=lambda: loss)
    for iter_num in range(3761, 3764):
        optimizer.zero_grad()
        x = torch.randn(2, 4)
        if iter_num == 3762:
            x[0, 0] = NAN  # the NaN enters in the forward pass
        loss = model(x).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    found = samples(registry)
    assert sample(found, "gradtel_last_unhealthy_step", kind="nan") == 3762
    assert sample(found, "gradtel_nonfinite_loss_updates_total") == 1
    assert monitor.last_healthy_step == 3763  # the bad update never reached the weights


def test_the_step_of_the_newest_incident_whose_first_update_had_a_non_finite_loss(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    """gradtel_nonfinite_loss_incident_step holds the step of the newest incident whose first
    unhealthy update already had a NaN/Inf loss, for each kind it had: not the NaN losses that
    poisoned weights make later, nor an older incident's once a newer one began in backward."""
    model = net()
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, on_warning="ignore", on_critical="ignore"
    )

    def update(step: int, x: torch.Tensor, bad_grad: float | None = None) -> gradtel.GradHealth:
        model.zero_grad()
        loss = model(x).sum()
        loss.backward()
        if bad_grad is not None:
            model[2].weight.grad[0, 0] = bad_grad  # backward made it, the loss was finite
        return monitor.collect(step=step, loss=loss)

    def steps() -> tuple[float | None, ...]:
        """Each kind's step, None while its series is not born (a process restarted on the
        same labels must not hide the step of the one before with a 0)."""
        found = samples(registry)
        return tuple(
            found.get(("gradtel_nonfinite_loss_incident_step", frozenset({("kind", kind)})))
            for kind in ("nan", "inf")
        )

    nan_input, inf_input = torch.full((2, 4), NAN), torch.randn(2, 4)
    inf_input[0, 0] = float("inf")
    update(1, torch.randn(2, 4), bad_grad=NAN)  # the incident starts in backward
    for step in range(2, 6):  # then the weights are poisoned: every loss is NaN
        assert update(step, nan_input).loss_finite is False
    assert steps() == (None, None)
    assert sample(samples(registry), "gradtel_nonfinite_loss_updates_total") == 4

    monitor.reset_health()  # rolled back: the next unhealthy update is a new incident
    health = update(6, inf_input)  # an Inf loss makes NaN and Inf gradients at once
    assert health.nan_total and health.inf_total and health.loss_finite is False
    update(7, nan_input)  # the same incident goes on
    assert steps() == (6, 6)
    update(8, torch.randn(2, 4))  # healthy again
    update(9, nan_input)  # a new incident, its first loss already NaN
    assert steps() == (9, 6)
    update(10, torch.randn(2, 4))
    update(11, torch.randn(2, 4), bad_grad=float("inf"))  # an Inf incident from backward
    assert steps() == (9, 6)  # the page compares with the first bad layer's step, 11
    monitor.reset_health()
    assert steps() == (0, 0)


def test_an_incident_after_unscanned_updates_is_never_said_to_come_from_the_loss(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    """A NaN written into a gradient in an update left out by ``sample_every`` poisons the
    weights; the next scanned update's NaN loss does not make it a forward-pass incident."""
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, sample_every=2, on_warning="ignore", on_critical="ignore"
    )
    for step in range(1, 4):  # step 2 is left out
        optimizer.zero_grad()
        loss = model(torch.randn(2, 4)).sum()
        loss.backward()
        if step == 2:  # not scanned: backward's NaN reaches the weights unseen
            model[2].weight.grad[0, 0] = NAN
        health = monitor.collect(step=step, loss=loss)
        optimizer.step()
    assert health.sampled and health.loss_finite is False and health.nan_total
    found = samples(registry)
    assert (
        sample(found, "gradtel_first_bad_layer", kind="nan", layer="0") == 3
    )  # where backward met it
    assert ("gradtel_nonfinite_loss_incident_step", frozenset({("kind", "nan")})) not in found


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("readout", ["sync", "deferred"])
@pytest.mark.parametrize("collected_by", ["collect", "attach", "attach-backward"])
@pytest.mark.parametrize("enters", ["forward", "backward"])
def test_the_incident_step_of_a_non_finite_loss_in_every_way_of_collecting(
    provider: MeterProvider,
    registry: CollectorRegistry,
    enters: str,
    collected_by: str,
    readout: str,
    accumulate: int,
) -> None:
    """A NaN that enters with the last micro-batch's input at step 3 is a forward-pass
    incident at step 3, however the update is collected; one made in backward is not."""
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clean = [p.detach().clone() for p in model.parameters()]
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, readout=readout, on_warning="ignore", on_critical="ignore"
    )
    training: dict[str, object] = {"step": 0, "loss": None, "nan_in_backward": False}
    model[2].weight.register_hook(lambda grad: grad * NAN if training["nan_in_backward"] else grad)
    if collected_by != "collect":
        scan = "backward" if collected_by == "attach-backward" else "step"
        monitor.attach(
            optimizer, scan=scan, step=lambda: training["step"], loss=lambda: training["loss"]
        )
    for step in range(1, 6):
        training["step"] = step
        optimizer.zero_grad()
        for micro in range(accumulate):
            x = torch.randn(2, 4)
            bad = step == 3 and micro == accumulate - 1
            if bad and enters == "forward":
                x[0, 0] = NAN
            training["nan_in_backward"] = bad and enters == "backward"
            loss = training["loss"] = model(x).sum()
            loss.backward()
        if collected_by == "collect":
            monitor.collect(step=step, loss=loss)
        optimizer.step()
        with torch.no_grad():  # the weights stay clean: one incident, one update long
            for param, kept in zip(model.parameters(), clean):
                param.copy_(kept)
    monitor.flush()
    found = samples(registry)
    first_bad = {
        labels: value
        for (name, labels), value in found.items()
        if name == "gradtel_first_bad_layer"
    }
    assert set(first_bad.values()) == {3}
    incident = found.get(("gradtel_nonfinite_loss_incident_step", frozenset({("kind", "nan")})))
    assert incident == (3 if enters == "forward" else None)
    assert sample(found, "gradtel_nonfinite_loss_updates_total") == (enters == "forward")
