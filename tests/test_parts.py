"""GradMonitor's collaborators, each tested alone: its options, the watched parameters, an
update's record from launch to health, the scan stage, the deferred queue and the listeners."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gradtel
from gradtel._ratelimit import RateLimitedLog
from gradtel.attach.origin import OriginCounter
from gradtel.health import GradHealth
from gradtel.options import MonitorOptions
from gradtel.pipeline.listeners import Listeners
from gradtel.pipeline.parameters import Watched
from gradtel.pipeline.readout import Pending
from gradtel.pipeline.scan import Scanner
from gradtel.pipeline.stage import ScanStage
from gradtel.pipeline.update import ReadAlong, State, Update, launch


@pytest.mark.parametrize(
    ("option", "wrong_type", "out_of_range"),
    [
        ("on_warning", 3, "RAISE"),
        ("on_critical", None, "abort"),
        ("max_layers", 2.0, 0),
        ("layer_depth", "2", 0),
        ("layer_series", ["all"], "some"),
        ("sample_every", "2", 0),
        ("on_error", False, "ignore"),
        ("readout", 1, "async"),
        ("incident_log", 3, ""),
    ],
)
def test_an_option_of_the_wrong_type_is_a_type_error_and_out_of_range_a_value_error(
    option: str, wrong_type: object, out_of_range: object
) -> None:
    with pytest.raises(TypeError, match=rf"^{option} must be .*\({type(wrong_type).__name__}\)$"):
        MonitorOptions(**{option: wrong_type})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"^{option} must be .*got {out_of_range!r}"):
        MonitorOptions(**{option: out_of_range})  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", ["grad_norm", "layer_norms"])
def test_a_flag_takes_only_true_or_false(flag: str) -> None:
    with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got 1 \(int\)$"):
        MonitorOptions(**{flag: 1})  # type: ignore[arg-type]


def test_options_are_frozen_and_the_monitor_reads_them() -> None:
    monitor = gradtel.GradMonitor(
        nn.Linear(2, 2), meter_provider=gradtel.prometheus_meter_provider(_registry())
    )
    with pytest.raises(AttributeError):
        monitor.options.sample_every = 2  # type: ignore[misc]
    assert (monitor.sample_every, monitor.readout) == (1, "sync")
    monitor.close()


def _registry() -> object:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


def _watched(model: nn.Module) -> Watched:
    return Watched(list(model.named_parameters()), max_layers=10, depth=None)


def test_the_watched_gradients_leave_out_frozen_and_missing_ones() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
    model[1].requires_grad_(False)
    model(torch.ones(1, 2)).sum().backward()
    model[2].bias.grad = None
    watched = _watched(model)
    grads = watched.gather(lambda exc: pytest.fail(f"counted: {exc}"))
    assert (grads.present, grads.skipped, grads.dense) == ((0, 1, 4), 3, True)
    assert watched.layers == ("0", "1", "2")


def test_an_update_reads_along_its_loss_norm_and_scale_and_names_them_again() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    watched, scanner = _watched(model), Scanner()  # before backward: it learns the order
    loss = model(torch.ones(2, 3)).sum()
    loss.backward()
    model[1].weight.grad[0, 1] = float("nan")
    update = Update(7, gradtel.Thresholds(), State.LAUNCHED)
    grads = watched.gather(lambda exc: pytest.fail(str(exc)))
    launch(
        watched,
        grads,
        scanner,
        update,
        loss=loss,
        origin=torch.tensor([2.0, 1.0, 9.0]),  # NaN and Inf counts, the sum of squares
        scale=torch.tensor(1024.0),
        local=True,
        grad_norm=True,
        layer_norms=True,
    )
    assert isinstance(update.read_along, ReadAlong)
    assert update.pending
    health = update.read_out(scanner)
    assert update.state is State.READ and health is update.read_out(scanner)
    assert (health.step, health.nan_by_layer, health.first_nan_layer) == (7, {"1": 1}, "1")
    assert (health.local_nan_total, health.local_inf_total) == (2, 1)
    assert health.local_grad_norm == 3.0 / 1024  # taken in backward, still scaled
    assert health.loss_finite is True and health.loss_scale == 1024.0
    assert health.grad_norm is not None and health.grad_norm != health.grad_norm  # NaN
    assert set(health.layer_grad_norms or {}) == {"0", "1"}
    expected = torch.linalg.vector_norm(
        torch.cat([p.grad.flatten() for p in model[0].parameters()])
    )
    assert health.layer_grad_norms["0"] == pytest.approx(float(expected))  # type: ignore[index]


def test_the_scan_stage_launches_reads_out_and_keeps_a_look_only_while_it_stands() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    failures: list[Exception] = []
    stage = ScanStage(
        list(model.named_parameters()),
        MonitorOptions(),
        layer_norms=False,
        origin=OriginCounter(),
        failed=failures.append,
        error_log=RateLimitedLog(logging.getLogger("gradtel.test")),
    )
    nothing = stage.launch(1, 1)  # before backward: no gradient to count, and it says why
    assert nothing.state is State.UNSCANNED and nothing.health is not None
    assert nothing.health.unscanned == "no_gradients"
    model(torch.ones(2, 3)).sum().backward()
    model[0].weight.grad[1, 2] = float("inf")
    health = stage.read_out(stage.launch(5, 2))
    assert (health.step, health.inf_by_layer, health.scanned) == (5, {"0": 1}, 4)
    stage.look(5, 2, loss=None)  # as attach() does at the end of backward
    looked, _ = stage.take_look(loss=None)
    assert looked is not None and stage.read_out(looked).inf_by_layer == {"0": 1}
    assert stage.take_look(loss=None) == (None, None)  # taken once
    stage.look(6, 3, loss=None)
    first = model[0]
    assert isinstance(first, nn.Linear)
    first.weight.grad = torch.zeros_like(first.weight)  # replaced since the look
    assert stage.take_look(loss=None)[0] is None
    assert stage.read_out(stage.launch(6, 3)).status.value == "healthy"
    assert failures == []


class _Copy:
    def __init__(self, done: bool) -> None:
        self.done = done

    def ready(self) -> bool:
        return self.done


def test_the_deferred_queue_publishes_in_order_up_to_the_first_unfinished() -> None:
    queue: Pending[_Copy] = Pending([_Copy(True), _Copy(False), _Copy(True)])
    assert len(list(queue.take(wait=False))) == 1  # the third waits for the second
    assert len(queue) == 2
    assert len(list(queue.take(wait=True))) == 2 and not queue


def test_a_failing_listener_is_reported_and_the_others_are_still_told() -> None:
    errors: list[Exception] = []
    listeners = Listeners(on_error=errors.append)
    told: list[tuple[str, int]] = []

    def failing(health: GradHealth) -> None:
        raise RuntimeError("logger down")

    listeners.add(failing)
    listeners.add(lambda h: told.append(("a", h.step)))
    twice = lambda h: told.append(("b", h.step))  # noqa: E731
    listeners.add(twice)
    unsubscribe = listeners.add(twice)
    listeners.tell(GradHealth(step=1))
    unsubscribe()  # once: the other subscription stays
    listeners.tell(GradHealth(step=2))
    assert told == [("a", 1), ("b", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert [str(e) for e in errors] == ["logger down", "logger down"]
    with pytest.raises(TypeError, match=r"^listener must be callable with a GradHealth, got 3"):
        listeners.add(3)  # type: ignore[arg-type]


def test_a_monitor_s_options_cannot_be_replaced() -> None:
    monitor = gradtel.GradMonitor(
        nn.Linear(2, 2), meter_provider=gradtel.prometheus_meter_provider(_registry())
    )
    with pytest.raises(AttributeError):
        monitor.options = MonitorOptions(sample_every=3)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        monitor.sample_every = 3  # type: ignore[misc]
    monitor.close()


def test_a_registry_gradtel_counted_an_error_in_is_freed_with_it() -> None:
    import gc
    import weakref

    from gradtel.export.telemetry import count_error

    registry = _registry()
    count_error("serve", registry)  # type: ignore[arg-type]
    gone = weakref.ref(registry)
    del registry
    gc.collect()
    assert gone() is None


def test_an_attachment_is_removed_once_even_when_a_step_of_it_fails() -> None:
    from gradtel.attach.optimizer import Attachment

    undone: list[str] = []
    attachment = Attachment()

    def fails() -> None:
        undone.append("fails")
        raise RuntimeError("a hook that is gone already")

    attachment._undo += [lambda: undone.append("first"), fails]
    with pytest.raises(RuntimeError, match="gone already"):
        attachment.remove()
    attachment.remove()  # a close() after the failure: nothing left to run, nothing raised
    assert undone == ["fails", "first"] and not attachment.installed  # the rest ran too
