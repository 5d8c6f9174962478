"""gradtel's counts in the researcher's own loggers: finite numbers under ``gradtel/``, the
updates between two logged steps summed, read back from the real loggers' files."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

from gradtel import GradHealth, GradMonitor, HealthTally, Status, Thresholds

from .conftest import absent, net, sample, samples, tiny_gpt2

NAN, INF = float("nan"), float("inf")

F = TypeVar("F", bound=Callable[..., None])


def framework(test: F) -> F:
    """A test that trains with a real framework and its loggers."""
    marks = [
        pytest.mark.slow,
        # The frameworks (and MLflow) warn about CPU-only and small-data runs: not gradtel's.
        pytest.mark.filterwarnings("ignore::UserWarning"),
        pytest.mark.filterwarnings("ignore::DeprecationWarning"),
        pytest.mark.filterwarnings("ignore::FutureWarning"),
    ]
    for mark in marks:
        test = mark(test)
    return test


# --- the numbers ---------------------------------------------------------------------------


def test_scalars_of_an_unhealthy_update() -> None:
    health = GradHealth(
        nan_by_layer={"enc.fc1": 3, "(root)": 1}, inf_by_layer={"head": 7}, grad_norm=2.5
    )
    assert health.scalars() == {
        "gradtel/nan_total": 4.0,
        "gradtel/inf_total": 7.0,
        "gradtel/status": 2.0,
        "gradtel/grad_norm": 2.5,
        "gradtel/nan/enc.fc1": 3.0,
        "gradtel/nan/_root_": 1.0,  # MLflow refuses parentheses in a key
        "gradtel/inf/head": 7.0,
    }
    assert health.scalars(prefix="grad/")["grad/nan_total"] == 4.0


@pytest.mark.parametrize("norm", [NAN, INF, -INF, None])
def test_a_non_finite_or_missing_norm_is_left_out(norm: float | None) -> None:
    assert GradHealth(grad_norm=norm).scalars() == {
        "gradtel/nan_total": 0.0,
        "gradtel/inf_total": 0.0,
        "gradtel/status": 0.0,
    }


@pytest.mark.parametrize(
    "health",
    [
        GradHealth(sampled=False),
        GradHealth(pending=True),
        GradHealth(unscanned="scan_error", grad_norm=NAN),
    ],
    ids=["sampled_out", "pending", "unscanned"],
)
def test_an_update_not_looked_at_says_unknown(health: GradHealth) -> None:
    assert health.scalars() == {
        "gradtel/nan_total": 0.0,
        "gradtel/inf_total": 0.0,
        "gradtel/status": -1.0,
        "gradtel/unscanned": 1.0,  # its 0 NaN is "not counted", not "none"
    }


def test_an_amp_overflow_is_a_skip_not_counts() -> None:
    health = GradHealth(inf_by_layer={"fc": 9}, amp_overflow=True)
    assert health.scalars() == {
        "gradtel/nan_total": 0.0,
        "gradtel/inf_total": 0.0,
        "gradtel/status": 0.0,
        "gradtel/amp_overflows": 1.0,
    }


def test_a_tally_sums_the_updates_since_it_was_taken() -> None:
    tally = HealthTally()
    assert tally.take() == {} and len(tally) == 0
    tally.add(GradHealth(sampled=False))
    tally.add(GradHealth(nan_by_layer={"fc": 2}, grad_norm=1.0))
    tally.add(GradHealth(nan_by_layer={"fc": 1}, inf_by_layer={"out": 1}, grad_norm=NAN))
    assert len(tally) == 3
    # Worst status of the updates looked at (two warnings), the latest finite norm, and
    # the update not looked at: its values are in no count.
    assert tally.take() == {
        "gradtel/nan_total": 3.0,
        "gradtel/inf_total": 1.0,
        "gradtel/status": 1.0,
        "gradtel/grad_norm": 1.0,
        "gradtel/nan/fc": 3.0,
        "gradtel/inf/out": 1.0,
        "gradtel/unscanned": 1.0,
    }
    assert tally.take() == {}
    tally.add(GradHealth(sampled=False))
    tally.add(GradHealth(unscanned="scan_error"))
    taken = tally.take()
    assert taken["gradtel/status"] == -1.0 and taken["gradtel/unscanned"] == 2.0


def test_a_prefix_that_is_no_str_is_refused() -> None:
    with pytest.raises(TypeError, match=r"prefix must be a str such as 'gradtel/', got 3 \(int\)"):
        GradHealth().scalars(prefix=3)  # type: ignore[arg-type]


counts = st.dictionaries(st.text(min_size=1, max_size=8), st.integers(1, 10**12), max_size=4)
healths = st.builds(
    GradHealth,
    nan_by_layer=counts,
    inf_by_layer=counts,
    thresholds=st.just(Thresholds()),
    sampled=st.booleans(),
    grad_norm=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    unscanned=st.sampled_from([None, "no_gradients", "scan_error"]),
    amp_overflow=st.booleans(),
)


@given(st.lists(healths, min_size=1, max_size=5))
def test_nothing_non_finite_ever_reaches_a_logger(updates: list[GradHealth]) -> None:
    tally = HealthTally()
    for health in updates:
        found = health.scalars()
        assert all(math.isfinite(v) for v in found.values()), found
        assert all(k.startswith("gradtel/") for k in found)
        tally.add(health)
    summed = tally.take()
    assert all(math.isfinite(v) for v in summed.values()), summed
    kept = [h for h in updates if not h.amp_overflow]
    assert summed["gradtel/nan_total"] == sum(h.nan_total for h in kept)
    assert summed["gradtel/status"] == max(
        h.status.level if not h.amp_overflow else 0 for h in updates
    )


layer_names = st.sets(st.text(min_size=1, max_size=8), min_size=1, max_size=6)


@settings(deadline=None)  # the first example imports MLflow
@given(layer_names | st.just({"(root)", "_root_", "a b", "a_b", "a/b", "a:2f:b", ".", ".."}))
def test_each_layer_gets_its_own_key_and_mlflow_takes_every_key(layers: set[str]) -> None:
    from mlflow.utils.validation import _validate_metric_name

    found = GradHealth(nan_by_layer=dict.fromkeys(layers, 1)).scalars()
    keys = [key for key in found if key.startswith("gradtel/nan/")]
    assert len(keys) == len(layers)  # no two layers' counts merged into one key
    for key in found:
        _validate_metric_name(key)  # raises for a key MLflow refuses


# --- the monitor hands every update's health to its listeners -------------------------------


def net_backward(model: nn.Module) -> None:
    model.zero_grad()
    model(torch.randn(2, 4)).sum().backward()


def test_listeners_get_every_update_once_known(provider: MeterProvider) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, sample_every=2, on_warning="ignore")
    seen: list[GradHealth] = []
    stop = monitor.subscribe(seen.append)
    for step in (1, 2, 3):
        net_backward(model)
        if step == 3:
            model[0].weight.grad[0, :2] = NAN
        monitor.collect(step=step)
    assert [(h.step, h.status, h.nan_total) for h in seen] == [
        (1, Status.HEALTHY, 0),
        (2, Status.UNKNOWN, 0),  # sampled out: said, not taken for healthy
        (3, Status.WARNING, 2),
    ]
    stop()
    net_backward(model)
    monitor.collect(step=4)
    assert len(seen) == 3
    monitor.close()


def test_a_deferred_update_is_handed_over_when_it_is_concluded(provider: MeterProvider) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, readout="deferred", on_warning="ignore")
    seen: list[GradHealth] = []
    monitor.subscribe(seen.append)
    net_backward(model)
    model[2].weight.grad[0, :3] = NAN
    monitor.collect(step=1)
    assert seen == []  # not read out yet
    net_backward(model)
    monitor.collect(step=2)
    assert [(h.step, h.nan_total) for h in seen] == [(1, 3)]
    monitor.close()  # publishes the last one
    assert [(h.step, h.nan_total) for h in seen] == [(1, 3), (2, 0)]


def test_a_failing_listener_does_not_stop_training(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider)
    seen: list[GradHealth] = []

    def broken(health: GradHealth) -> None:
        raise RuntimeError("logger is down")

    monitor.subscribe(broken)
    monitor.subscribe(seen.append)
    net_backward(model)
    assert monitor.collect().status is Status.HEALTHY
    assert len(seen) == 1
    assert sample(samples(registry), "gradtel_errors_total", stage="record") == 1
    with pytest.raises(TypeError, match=r"listener must be callable with a GradHealth, got 3"):
        monitor.subscribe(3)  # type: ignore[arg-type]
    monitor.close()


# --- the frameworks' loggers ----------------------------------------------------------------


@contextmanager
def host_reads_counted(monkeypatch: pytest.MonkeyPatch, counted: list[str]) -> Iterator[None]:
    """Count the Tensor methods that read a value to the host (each a device sync on an
    accelerator), delegating to the real ones."""
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
            real = getattr(torch.Tensor, name)

            def counting(self: torch.Tensor, *args: Any, _real: Any = real, _n: str = name) -> Any:
                counted.append(_n)
                return _real(self, *args)

            patch.setattr(torch.Tensor, name, counting)
        yield


def counted(cls: type[Any], monkeypatch: pytest.MonkeyPatch, reads: list[str]) -> type[Any]:
    """``cls`` with the host reads of its hooks that collect and log counted into ``reads``."""

    def wrapped(hook: str) -> Callable[..., Any]:
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            with host_reads_counted(monkeypatch, reads):
                return getattr(super(subclass, self), hook)(*args, **kwargs)

        return run

    hooks = ("on_before_optimizer_step", "on_train_batch_end", "on_train_end", "on_log")
    subclass = type("Counted", (cls,), {h: wrapped(h) for h in hooks if hasattr(cls, h)})
    return subclass


def lightning_module(bad: dict[int, tuple[str, float, int]]) -> Any:
    """Logs its own loss at every step; ``bad[global_step] = (layer, value, n)`` writes
    ``n`` values into that layer's gradient after backward. The optimizer then steps on
    finite gradients, so the updates after one stay healthy."""
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(8, 16)
            self.head = nn.Linear(16, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.head(torch.relu(self.encoder(x))), y)
            self.log("train_loss", loss)
            return loss

        def on_after_backward(self) -> None:
            if self.global_step in bad:
                layer, value, n = bad[self.global_step]
                getattr(self, layer).weight.grad.view(-1)[:n] = value

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            # After gradtel's callback has counted (callbacks run before the module's hook).
            for p in self.parameters():
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Tiny()


def fit(module: Any, tmp_path: Path, loggers: list[Any], callback: Any, **trainer: Any) -> Any:
    import lightning.pytorch as pl

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    run = pl.Trainer(
        accelerator="cpu", logger=loggers, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback], **trainer,
    )  # fmt: skip
    run.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return run


def tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the event files under ``directory``, read back by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, float]] = {}
    for events in sorted(directory.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                found.setdefault(tag, {})[event.step] = event.value
    return found


def csv_scalars(path: Path) -> dict[str, dict[int, float]]:
    found: dict[str, dict[int, float]] = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key != "step" and value != "":
                    found.setdefault(key, {})[int(row["step"])] = float(value)
    return found


# Lightning writes batch k at step k, every 2nd batch (1, 3, 5): the NaN of the update made
# in batch 2 is summed into step 3; the ±Inf of the last batch (6), after the last logged
# step, is written when training ends. A layer's count, once logged, is 0 when it has none.
EXPECTED = {
    "gradtel/nan_total": {1: 0.0, 3: 3.0, 5: 0.0, 6: 0.0},
    "gradtel/inf_total": {1: 0.0, 3: 0.0, 5: 0.0, 6: 2.0},
    "gradtel/status": {1: 0.0, 3: 1.0, 5: 0.0, 6: 1.0},
    "gradtel/nan/encoder": {3: 3.0, 5: 0.0, 6: 0.0},
    "gradtel/inf/head": {6: 2.0},
}


@pytest.mark.parametrize("readout", ["sync", "deferred"])
@framework
def test_lightning_loggers_get_the_counts_at_their_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readout: str
) -> None:
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
    from mlflow import MlflowClient

    from gradtel.integrations.lightning import GradtelCallback

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store, read back below
    tracking = f"file:{tmp_path / 'mlruns'}"
    loggers = [
        TensorBoardLogger(tmp_path / "tb"),
        CSVLogger(tmp_path / "csv"),
        MLFlowLogger(experiment_name="gradtel", tracking_uri=tracking),
    ]
    callback = GradtelCallback(serve_metrics=False, on_warning="ignore", readout=readout)
    module = lightning_module({2: ("encoder", NAN, 3), 6: ("head", INF, 2)})
    fit(module, tmp_path, loggers, callback, max_steps=7, log_every_n_steps=2)

    tensorboard = tensorboard_scalars(tmp_path / "tb")
    table = csv_scalars(Path(loggers[1].log_dir) / "metrics.csv")
    client = MlflowClient(tracking)
    mlflow = {
        key: {m.step: m.value for m in client.get_metric_history(loggers[2].run_id, key)}
        for key in EXPECTED
    }
    for found in (tensorboard, table, mlflow):
        assert {key: found.get(key) for key in EXPECTED} == EXPECTED
    # At the steps Lightning writes its own metrics, and at the run's last one.
    assert sorted(tensorboard["gradtel/status"]) == sorted(tensorboard["train_loss"]) + [6]
    assert not any(key.startswith("gradtel/grad_norm") for key in tensorboard)


@pytest.mark.parametrize("readout", ["sync", "deferred"])
@framework
def test_lightning_logs_each_update_at_its_own_step_once(tmp_path: Path, readout: str) -> None:
    """Every step logged: a deferred read-out is waited for at the step that logs it, and
    the end of training writes no second row for the last step."""
    from lightning.pytorch.loggers import CSVLogger

    from gradtel.integrations.lightning import GradtelCallback

    logger = CSVLogger(tmp_path / "csv")
    callback = GradtelCallback(serve_metrics=False, on_warning="ignore", readout=readout)
    fit(lightning_module({2: ("encoder", NAN, 3)}), tmp_path, [logger], callback, max_steps=6,
        log_every_n_steps=1)  # fmt: skip
    with (Path(logger.log_dir) / "metrics.csv").open(newline="") as file:
        rows = [(int(row["step"]), row["gradtel/nan_total"]) for row in csv.DictReader(file)]
    assert rows == [(step, "3.0" if step == 2 else "0.0") for step in range(6)]


class Still(torch.optim.SGD):
    """An optimizer that takes no step: the weights keep no NaN."""

    def step(self, closure: Any = None) -> Any:
        return closure() if closure is not None else None


def manual_module(bad_batch: int) -> Any:
    """Manual optimization, two micro-batches per update (it steps at the odd batches), a
    NaN in the head's gradient at ``bad_batch``; logs its own loss at every batch, which
    Lightning writes at step ``batch_idx`` (one epoch). ``reference[batch_idx]``: the NaN
    of the update made at that batch, counted before the user's clipping."""
    import lightning.pytorch as pl

    class Manual(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 1)
            self.head.weight.register_hook(self.poison)
            self.bad_batch = False
            self.reference: dict[int, int] = {}

        def poison(self, grad: torch.Tensor) -> torch.Tensor:
            if self.bad_batch:
                grad = grad.clone()
                grad[0, 0] = NAN
            return grad

        def training_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.bad_batch = batch_idx == bad_batch
            loss = (self.head(torch.relu(self.body(x))) - y).pow(2).mean()
            self.manual_backward(loss)
            if batch_idx % 2 == 1:  # two micro-batches per update
                optimizer = self.optimizers()
                grads = [p.grad for p in self.parameters()]
                self.reference[batch_idx] = sum(int(g.isnan().sum()) for g in grads)
                self.clip_gradients(optimizer, gradient_clip_val=1.0)  # a NaN norm: all NaN
                optimizer.step()
                optimizer.zero_grad()
            self.log("train_loss", loss)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return Still(self.parameters(), lr=0.0)

    return Manual()


def csv_rows(path: Path, key: str) -> list[tuple[int, str]]:
    """``(step, key's value)`` of each row the CSV logger wrote, in the order written."""
    with path.open(newline="") as file:
        return [(int(row["step"]), row[key]) for row in csv.DictReader(file)]


@pytest.mark.parametrize("readout", ["sync", "deferred"])
@framework
def test_lightning_manual_optimization_counts_before_the_users_clipping_at_the_logged_step(
    tmp_path: Path, readout: str
) -> None:
    """Manual optimization: Lightning calls on_before_optimizer_step inside
    ``optimizer.step()``, after the user clipped; and writes its loggers at every batch,
    numbering them by batch (the global step counts the optimizer's steps: 2 at batch 5)."""
    from lightning.pytorch.loggers import CSVLogger

    from gradtel.integrations.lightning import GradtelCallback

    seen: list[GradHealth] = []

    class Observed(GradtelCallback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            super().on_fit_start(trainer, pl_module)
            self.session.monitor.subscribe(seen.append)

    module = manual_module(bad_batch=5)
    logger = CSVLogger(tmp_path / "csv")
    fit(module, tmp_path, [logger], Observed(serve_metrics=False, on_warning="ignore",
        readout=readout), max_epochs=1, log_every_n_steps=1, limit_train_batches=8)  # fmt: skip
    assert {h.step: h.nan_total for h in seen} == module.reference == {1: 0, 3: 0, 5: 1, 7: 0}
    found = csv_scalars(Path(logger.log_dir) / "metrics.csv")
    assert sorted(found["train_loss"]) == list(range(8))  # batch k at step k
    counts = found["gradtel/nan_total"]
    assert sum(counts.values()) == 1  # logged once, not repeated at the batches after it


@pytest.mark.parametrize("readout", ["sync", "deferred"])
@pytest.mark.parametrize(("bad_batch", "expected"), [(7, [0, 0, 1]), (1, [1, 0, 0])])
@framework
def test_lightning_manual_optimization_logs_each_update_at_the_next_logged_step_in_order(
    tmp_path: Path, readout: str, bad_batch: int, expected: list[int]
) -> None:
    """Lightning writes steps 2 and 5 (every 3rd batch, stepped or not): each carries the
    updates since the one before, and the last batch's update, after the last logged
    step, is written when training ends at that batch's step (7), after the others."""
    from lightning.pytorch.loggers import CSVLogger

    from gradtel.integrations.lightning import GradtelCallback

    logger = CSVLogger(tmp_path / "csv")
    record = tmp_path / "incidents.jsonl"
    callback = GradtelCallback(
        serve_metrics=False, on_warning="ignore", readout=readout, incident_log=record
    )
    fit(manual_module(bad_batch), tmp_path, [logger], callback, max_epochs=1,
        log_every_n_steps=3, limit_train_batches=8)  # fmt: skip
    rows = csv_rows(Path(logger.log_dir) / "metrics.csv", "gradtel/nan_total")
    assert rows == [(step, f"{float(n)}") for step, n in zip([2, 5, 7], expected, strict=True)]
    assert [json.loads(line)["step"] for line in record.read_text().splitlines()] == [bad_batch]


def two_optimizer_module(bad_batch: int, passes: str) -> Any:
    """Manual optimization, an optimizer for the body and one for the head, a NaN in the
    body's gradient at ``bad_batch``. ``passes="one"``: one backward pass, then both
    optimizers step; ``"each"``: a backward pass before each optimizer's step (as a GAN's
    two). ``reference``: ``(batch_idx, NaN count)`` of all gradients right after each
    ``manual_backward``, as backward left them."""
    import lightning.pytorch as pl

    class TwoOptimizers(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 1)
            self.body.weight.register_hook(self.poison)
            self.bad_batch = False
            self.reference: list[tuple[int, int]] = []

        def poison(self, grad: torch.Tensor) -> torch.Tensor:
            if self.bad_batch:
                grad = grad.clone()
                grad[0, :2] = NAN
            return grad

        def backward_pass(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            loss = (self.head(torch.relu(self.body(x))) - y).pow(2).mean()
            self.manual_backward(loss)
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            self.reference.append((batch_idx, sum(int(g.isnan().sum()) for g in grads)))

        def training_step(self, batch: Any, batch_idx: int) -> None:
            self.bad_batch = batch_idx == bad_batch
            body, head = self.optimizers()
            body.zero_grad()
            head.zero_grad()
            self.backward_pass(batch, batch_idx)
            body.step()
            if passes == "each":
                body.zero_grad()
                head.zero_grad()
                self.backward_pass(batch, batch_idx)
            head.step()

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return [Still(self.body.parameters(), lr=0.0), Still(self.head.parameters(), lr=0.0)]

    return TwoOptimizers()


@pytest.mark.parametrize(
    ("readout", "scaler"), [("sync", False), ("deferred", False), ("sync", True)]
)
@pytest.mark.parametrize("passes", ["one", "each"])
@framework
def test_lightning_manual_optimization_counts_a_backward_pass_once_however_many_optimizers_step(
    tmp_path: Path,
    provider: MeterProvider,
    registry: CollectorRegistry,
    readout: str,
    scaler: bool,
    passes: str,
) -> None:
    """One backward pass, then two optimizers step (each over its half of the model): one
    update, counted as backward left the gradients, not once more at the second step (with
    no look left, of the gradients after the first step). A backward pass per optimizer is
    an update each. ``scaler``: under a real fp16 ``GradScaler`` (counted at the step, after
    ``unscale_``), the same, and each NaN update is one ``amp_overflow`` skip."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins import MixedPrecision

    from gradtel.integrations.lightning import GradtelCallback

    seen: list[GradHealth] = []

    class Observed(GradtelCallback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            super().on_fit_start(trainer, pl_module)
            self.session.monitor.subscribe(seen.append)

    module = two_optimizer_module(bad_batch=2, passes=passes)
    logger = CSVLogger(tmp_path / "csv")
    callback = Observed(
        serve_metrics=False, on_warning="ignore", readout=readout, meter_provider=provider
    )
    amp = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))
    plugins = [amp] if scaler else []
    fit(module, tmp_path, [logger], callback, max_epochs=1, log_every_n_steps=1,
        limit_train_batches=4, plugins=plugins)  # fmt: skip
    passes_made = 4 if passes == "one" else 8
    assert len(module.reference) == passes_made
    assert [(h.step, h.nan_total) for h in seen] == module.reference
    assert [h.amp_overflow for h in seen] == [scaler and n > 0 for _, n in module.reference]
    assert [n for _, n in module.reference if n] == ([2] if passes == "one" else [2, 2])
    found = samples(registry)
    assert sample(found, "gradtel_updates_total") == passes_made
    skipped = sample(found, "gradtel_skipped_updates_total", reason="amp_overflow")
    assert skipped == (passes_made // 4 if scaler else 0)
    if scaler:  # an overflow the scaler handles is a skip, not NaN gradients
        absent(found, "gradtel_nan_grads_total", layer="body")
    else:  # the NaN are all the body's (the head's series is never born: it had none)
        nan_total = sum(n for _, n in module.reference)
        assert sample(found, "gradtel_nan_grads_total", layer="body") == nan_total
    logged = csv_scalars(Path(logger.log_dir) / "metrics.csv")["gradtel/nan_total"]
    bad_logged = {} if scaler else {2: float(2 * passes_made // 4)}  # a skip is no NaN count
    assert {step: n for step, n in logged.items() if n} == bad_logged


@pytest.mark.parametrize("optimization", ["automatic", "manual"])
@framework
def test_lightning_logger_and_incident_record_give_an_update_the_same_step(
    tmp_path: Path, optimization: str
) -> None:
    """The step Lightning's own loggers give the batch that made the update: with manual
    optimization the batch's (5), not the global step (2)."""
    from lightning.pytorch.loggers import CSVLogger

    from gradtel.integrations.lightning import GradtelCallback

    logger = CSVLogger(tmp_path / "csv")
    record = tmp_path / "incidents.jsonl"
    callback = GradtelCallback(serve_metrics=False, on_warning="ignore", incident_log=record)
    if optimization == "automatic":
        fit(lightning_module({2: ("encoder", NAN, 3)}), tmp_path, [logger], callback,
            max_steps=4, log_every_n_steps=1)  # fmt: skip
        bad, batches = 2, 4
    else:
        fit(manual_module(bad_batch=5), tmp_path, [logger], callback, max_epochs=1,
            log_every_n_steps=1, limit_train_batches=8)  # fmt: skip
        bad, batches = 5, 8
    found = csv_scalars(Path(logger.log_dir) / "metrics.csv")
    assert [step for step, n in found["gradtel/nan_total"].items() if n] == [bad]
    assert sorted(found["train_loss"]) == list(range(batches))
    assert [json.loads(line)["step"] for line in record.read_text().splitlines()] == [bad]


@framework
def test_a_lightning_callback_fit_twice_logs_no_key_of_the_first_fit(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from gradtel.integrations.lightning import GradtelCallback

    callback = GradtelCallback(serve_metrics=False, on_warning="ignore")
    for fit_number, layer in ((1, "encoder"), (2, "head")):
        logger = CSVLogger(tmp_path / f"csv{fit_number}")
        fit(lightning_module({2: (layer, NAN, 3)}), tmp_path, [logger], callback, max_steps=4,
            log_every_n_steps=1)  # fmt: skip
    found = csv_scalars(Path(logger.log_dir) / "metrics.csv")
    assert {key: steps for key, steps in found.items() if key.startswith("gradtel/nan/")} == {
        "gradtel/nan/head": {2: 3.0, 3: 0.0}
    }


@framework
def test_lightning_logs_nothing_with_the_option_off(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from gradtel.integrations.lightning import GradtelCallback

    logger = CSVLogger(tmp_path / "csv")
    callback = GradtelCallback(serve_metrics=False, on_warning="ignore", log_to_loggers=False)
    module = lightning_module({2: ("encoder", NAN, 3)})
    fit(module, tmp_path, [logger], callback, max_steps=4, log_every_n_steps=1)
    found = csv_scalars(Path(logger.log_dir) / "metrics.csv")
    assert sorted(found["train_loss"]) == [0, 1, 2, 3]
    assert [key for key in found if key.startswith("gradtel")] == []
    with pytest.raises(TypeError, match=r"log_to_loggers must be True or False, got 1 \(int\)"):
        GradtelCallback(log_to_loggers=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("readout", ["sync", "deferred"])
@framework
def test_lightning_logger_path_adds_no_host_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readout: str
) -> None:
    """The same healthy run with the loggers fed and not: gradtel's hooks read exactly as
    many tensors to the host (its own read-out of each update) either way; a deferred
    read-out is waited for at a logged step, never read twice."""
    from lightning.pytorch.loggers import CSVLogger

    from gradtel.integrations.lightning import GradtelCallback

    reads: dict[bool, list[str]] = {True: [], False: []}
    logged: dict[bool, dict[str, Any]] = {}
    for feed in (True, False):
        logger = CSVLogger(tmp_path / f"csv-{feed}")
        callback = counted(GradtelCallback, monkeypatch, reads[feed])(
            serve_metrics=False, log_to_loggers=feed, readout=readout
        )
        run = fit(
            lightning_module({}), tmp_path, [logger], callback, max_steps=6, log_every_n_steps=1
        )
        logged[feed] = dict(run.logged_metrics)
    assert logged[True]["gradtel/nan_total"] == 0  # the loggers were fed, every step
    assert "gradtel/nan_total" not in logged[False]
    assert reads[True] and reads[True] == reads[False]


def gpt2_trainer(tmp_path: Path, callback: Any, report_to: list[str], **args: Any) -> Any:
    from transformers import Trainer, TrainingArguments

    model = tiny_gpt2()
    ids = torch.randint(0, 64, (16, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    arguments = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=report_to,
        save_strategy="no", use_cpu=True, disable_tqdm=True, **args,
    )  # fmt: skip
    callbacks = None if callback is None else [callback]
    return Trainer(model=model, args=arguments, train_dataset=data, callbacks=callbacks)


@pytest.mark.parametrize(
    ("log_to_loggers", "added", "readout"),
    [
        (True, False, "sync"),
        (True, True, "sync"),
        (True, False, "deferred"),
        (False, False, "sync"),
    ],
)
@framework
def test_transformers_report_to_tensorboard_gets_the_counts_at_their_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_to_loggers: bool, added: bool, readout: str
) -> None:
    """``added``: the callback is given with ``trainer.add_callback()`` once the Trainer
    is made, not in ``callbacks=[...]``. With the deferred read-out the last update is
    concluded only when training ends, and still in the last log."""
    from transformers import TrainerCallback

    from gradtel.integrations.transformers import GradtelTrainerCallback

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    callback = GradtelTrainerCallback(
        serve_metrics=False, on_warning="ignore", log_to_loggers=log_to_loggers, readout=readout
    )
    trainer = gpt2_trainer(
        tmp_path,
        None if added else callback,
        ["tensorboard"],
        max_steps=4,
        logging_steps=2,
        max_grad_norm=1.0,
    )
    if added:
        trainer.add_callback(callback)
    making = [0]

    class Step(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            making[0] = state.global_step + 1

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # Counted by now: the weights stay finite, so the updates after stay healthy.
            for p in kwargs["model"].parameters():
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)

    def poison(step: int, n: int) -> Callable[[torch.Tensor], None]:
        def write(param: torch.Tensor) -> None:
            if making[0] == step:
                param.grad.view(-1)[:n] = NAN

        return write

    # The updates that make steps 3 and 4, both logged with step 4.
    blocks = trainer.model.transformer.h
    blocks[1].mlp.c_fc.weight.register_post_accumulate_grad_hook(poison(3, 3))
    blocks[0].mlp.c_proj.weight.register_post_accumulate_grad_hook(poison(4, 2))
    trainer.add_callback(Step())
    trainer.train()
    found = tensorboard_scalars(tmp_path / "tb")
    gradtel = {tag: steps for tag, steps in found.items() if "gradtel/" in tag}
    if not log_to_loggers:
        assert gradtel == {}
        return
    # TensorBoardCallback names the training logs train/...
    assert gradtel == {
        "train/gradtel/nan_total": {2: 0.0, 4: 5.0},
        "train/gradtel/inf_total": {2: 0.0, 4: 0.0},
        "train/gradtel/status": {2: 0.0, 4: 1.0},
        "train/gradtel/nan/transformer.h.1.mlp.c_fc": {4: 3.0},
        "train/gradtel/nan/transformer.h.0.mlp.c_proj": {4: 2.0},
    }
    assert sorted(found["train/loss"]) == [2, 4]


@framework
def test_transformers_deferred_counts_are_logged_at_their_step_and_on_an_early_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step logged, and training stopped after step 3 (as ``EarlyStoppingCallback``
    does): each update is in the log of its own step, the last one included."""
    from transformers import TrainerCallback

    from gradtel.integrations.transformers import GradtelTrainerCallback

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    callback = GradtelTrainerCallback(serve_metrics=False, on_warning="ignore", readout="deferred")
    trainer = gpt2_trainer(tmp_path, callback, ["tensorboard"], max_steps=8, logging_steps=1)
    making = [0]

    class StopAfterStep3(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            making[0] = state.global_step + 1

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            for p in kwargs["model"].parameters():
                torch.nan_to_num_(p.grad, nan=0.0)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            control.should_training_stop = state.global_step == 3

    def poison(step: int, n: int) -> Callable[[torch.Tensor], None]:
        def write(param: torch.Tensor) -> None:
            if making[0] == step:
                param.grad.view(-1)[:n] = NAN

        return write

    blocks = trainer.model.transformer.h
    blocks[1].mlp.c_fc.weight.register_post_accumulate_grad_hook(poison(2, 3))
    blocks[0].mlp.c_proj.weight.register_post_accumulate_grad_hook(poison(3, 2))
    trainer.add_callback(StopAfterStep3())
    trainer.train()
    found = tensorboard_scalars(tmp_path / "tb")
    assert found["train/gradtel/nan_total"] == {1: 0.0, 2: 3.0, 3: 2.0}


@framework
def test_transformers_logs_get_the_counts_with_no_host_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradtel.integrations.transformers import GradtelTrainerCallback

    reads: list[str] = []
    logs: list[dict[str, float]] = []

    class Counted(GradtelTrainerCallback):
        def _add_to_logs(self, state: Any, found: dict[str, float] | None) -> None:
            with host_reads_counted(monkeypatch, reads):
                super()._add_to_logs(state, found)
            logs.append(dict(found or {}))

    gpt2_trainer(tmp_path, Counted(serve_metrics=False), [], max_steps=3, logging_steps=1).train()
    assert [log["gradtel/nan_total"] for log in logs if "loss" in log] == [0.0, 0.0, 0.0]
    assert reads == []
    with pytest.raises(TypeError, match=r"log_to_loggers must be True or False, got 'yes'"):
        GradtelTrainerCallback(log_to_loggers="yes")  # type: ignore[arg-type]
