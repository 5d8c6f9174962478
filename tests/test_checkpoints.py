"""Checkpoints that are not poisoned: ``monitor.healthy``, ``last_healthy_step``,
``allow_checkpoint()``, and ``protect_checkpoints=True`` in the real Lightning
``ModelCheckpoint`` and Hugging Face ``Trainer`` save paths, with rotation on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

from gradtel import GradMonitor, NonFiniteGradientError, Thresholds, prometheus_meter_provider

from .conftest import absent, net, sample, samples, tiny_gpt2

NAN = float("nan")


def update(model: nn.Module, monitor: GradMonitor, *, nan: bool = False, **collect: Any) -> None:
    model.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    if nan:
        model[0].weight.grad[0, 0] = NAN
    monitor.collect(**collect)


def test_an_unhealthy_update_the_weights_take_stops_checkpoints(
    provider: MeterProvider, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="warn")
    assert monitor.healthy and monitor.last_healthy_step is None
    absent(samples(registry), "gradtel_refused_checkpoints_total")  # no series until a guarded save
    for step in (1, 2):
        update(model, monitor, step=step)
    assert monitor.allow_checkpoint(step=2)
    assert sample(samples(registry), "gradtel_refused_checkpoints_total") == 0
    update(model, monitor, step=3, nan=True)
    update(model, monitor, step=4)  # healthy gradients, poisoned weights all the same
    assert not monitor.healthy and monitor.last_healthy_step == 2
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        assert not monitor.allow_checkpoint(step=4)
        assert not monitor.allow_checkpoint(step=5)  # counted, not logged again within the minute
    assert sample(samples(registry), "gradtel_refused_checkpoints_total") == 2
    refusals = [
        r.getMessage() for r in caplog.records if "not saving a checkpoint" in r.getMessage()
    ]
    assert refusals == [
        "gradtel: not saving a checkpoint at step 4: the weights took the warning update of step 3 "
        "(1 NaN, 0 Inf); the last healthy step was 2. Resume from a checkpoint saved before the "
        "unhealthy update (counted in gradtel_refused_checkpoints_total)"
    ]
    monitor.reset_health()  # the weights were restored from the checkpoint of step 2
    update(model, monitor, step=3)
    assert monitor.healthy and monitor.last_healthy_step == 3 and monitor.allow_checkpoint()


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_an_update_kept_from_the_weights_leaves_them_healthy(
    provider: MeterProvider, policy: str
) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, on_warning=policy)
    update(model, monitor, step=1)
    try:
        update(model, monitor, step=2, nan=True)
    except NonFiniteGradientError:
        assert policy == "raise"
    assert monitor.healthy and monitor.allow_checkpoint()
    assert monitor.last_healthy_step == (
        2 if policy == "skip" else 1
    )  # "raise": no step 2 was taken


def test_an_amp_overflow_the_scaler_skips_leaves_the_weights_healthy(
    provider: MeterProvider,
) -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    monitor = GradMonitor(model, meter_provider=provider, on_critical="warn")
    monitor.attach(optimizer, scaler=scaler)
    for scale in (1e3, 1.0):  # the first overflows
        optimizer.zero_grad()
        scaler.scale(scale * model(torch.randn(2, 4)).pow(2).mean()).backward()
        scaler.step(optimizer)
        scaler.update()
    # The skipped step is not counted by the optimizer: both updates make step 1.
    assert monitor.healthy and monitor.last_healthy_step == 1


def test_updates_not_looked_at_are_not_taken_for_healthy(provider: MeterProvider) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, sample_every=2)
    update(model, monitor, step=1)
    update(model, monitor, step=2)  # sampled out
    model.zero_grad(set_to_none=True)
    monitor.collect(step=3)  # no gradients: not scanned
    assert monitor.last_healthy_step == 1 and monitor.healthy


def own_provider() -> MeterProvider:
    """Counts of this test's own, not in the registry other tests of the process read."""
    return prometheus_meter_provider(CollectorRegistry())


def finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("protect", [True, False])
def test_lightning_model_checkpoint_keeps_the_last_healthy_checkpoint(
    tmp_path: Path, protect: bool, caplog: pytest.LogCaptureFixture
) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from gradtel.integrations.lightning import GradtelCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.head = nn.Linear(8, 16), nn.Linear(16, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.head(torch.relu(self.encoder(x))), y)

        def on_after_backward(self) -> None:
            if self.global_step == 2:  # the update that makes step 3
                self.encoder.weight.grad.view(-1)[:3] = NAN

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    # Keep only the latest checkpoint: the rotation that deletes the healthy ones.
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=1)
    gradtel_callback = GradtelCallback(
        serve_metrics=False, protect_checkpoints=protect, meter_provider=own_provider()
    )
    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[gradtel_callback, checkpoints],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        trainer.fit(
            Tiny(),
            torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1)), batch_size=8
            ),
        )
    on_disk = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    saved = torch.load(tmp_path / "ckpt" / on_disk[-1], weights_only=False)
    if protect:
        assert on_disk == ["epoch=0-step=2.ckpt"]
        assert finite(saved["state_dict"])
        assert (
            # The checkpoint's step=3 (after 3 updates); the update's step as Lightning logs it.
            "gradtel: not saving a checkpoint at step 3: the weights took the warning update of step 2 "
            "(3 NaN, 0 Inf); the last healthy step was 1." in caplog.text
        )
    else:  # what protection prevents: the healthy checkpoint rotated out, a poisoned one in its place
        assert on_disk == ["epoch=0-step=5.ckpt"]
        assert not finite(saved["state_dict"])
    assert "save_checkpoint" not in vars(trainer) and "on_train_batch_end" not in vars(
        checkpoints
    )  # undone


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("protect", [True, False])
def test_hugging_face_trainer_keeps_the_last_healthy_checkpoint(
    tmp_path: Path, protect: bool
) -> None:
    from safetensors.torch import load_file
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from gradtel.integrations.transformers import GradtelTrainerCallback

    model = tiny_gpt2()
    state_step = [0]

    class Observe(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            state_step[0] = state.global_step

    def poison(param: torch.Tensor) -> None:
        if state_step[0] == 2:  # the update that makes step 3
            param.grad.view(-1)[:3] = NAN

    model.transformer.h[1].mlp.c_fc.weight.register_post_accumulate_grad_hook(poison)
    gradtel_callback = GradtelTrainerCallback(
        serve_metrics=False, protect_checkpoints=protect, meter_provider=own_provider()
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2, report_to=[],
        save_strategy="steps", save_steps=1, save_total_limit=1, logging_strategy="no",
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 64, (16, 12))]
    Trainer(
        model=model, args=args, train_dataset=data, callbacks=[Observe(), gradtel_callback]
    ).train()
    on_disk = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    weights = load_file(tmp_path / on_disk[-1] / "model.safetensors")
    if protect:
        assert on_disk == ["checkpoint-2"] and finite(weights)
    else:
        assert on_disk == ["checkpoint-5"] and not finite(weights)


def sgd_step(model: nn.Module, monitor: GradMonitor, *, nan: int = 0, step: int) -> None:
    """One update the optimizer takes, with ``nan`` NaN in one layer's gradient."""
    model.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    model[0].weight.grad.view(-1)[:nan] = NAN
    monitor.collect(step=step)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad


def test_nan_under_the_warning_threshold_poisons_the_weights_all_the_same(
    provider: MeterProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """``Thresholds(warning=3)``: 2 NaN is a healthy update for the alerts, yet the weights
    take the NaN; the gate judged by the band and let a poisoned checkpoint through."""
    model = net()
    monitor = GradMonitor(
        model, meter_provider=provider, thresholds=Thresholds(warning=3, critical=10)
    )
    sgd_step(model, monitor, step=1)
    sgd_step(model, monitor, nan=2, step=2)
    assert not all(p.isfinite().all() for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        assert not monitor.allow_checkpoint(step=2)
    assert not monitor.healthy and monitor.last_healthy_step == 1
    assert "the weights took an update under the warning threshold of step 2 (2 NaN, 0 Inf)" in (
        caplog.text
    )


def test_the_gate_looks_at_the_weights_that_took_an_update_it_did_not_scan(
    provider: MeterProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """``sample_every=2``: the NaN came in a sampled-out update; the gate said "save", a
    poisoned checkpoint, because no scanned update was unhealthy."""
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, sample_every=2)
    sgd_step(model, monitor, step=1)  # scanned
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    assert monitor.allow_checkpoint(step=1) and monitor.healthy
    sgd_step(model, monitor, nan=1, step=2)  # sampled out
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        assert not monitor.allow_checkpoint(step=2)
    assert not monitor.healthy
    nan = sum(int(p.isnan().sum()) for p in model.parameters())  # counted here
    assert nan > 0
    assert f"the weights hold {nan} NaN and 0 Inf values, from an update gradtel did not scan" in (
        caplog.text
    )
    model.load_state_dict(kept)
    monitor.reset_health()
    assert monitor.allow_checkpoint(step=1) and monitor.healthy


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_a_weight_with_no_values_leaves_the_look_at_the_others(
    provider: MeterProvider, on_error: str
) -> None:
    """A frozen layer left on the meta device (loaded lazily): its values cannot be read,
    which failed the whole look, so poisoned weights were let through (or, with
    ``on_error="raise"``, every save raised)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, device="meta"))
    model[1].requires_grad_(False)
    monitor = GradMonitor(model, meter_provider=provider, on_error=on_error)  # type: ignore[arg-type]
    assert monitor.allow_checkpoint()
    with torch.no_grad():
        model[0].weight[0, 0] = NAN  # as an update not scanned leaves it
    assert not monitor.allow_checkpoint()
