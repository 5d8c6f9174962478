"""Lightning and Hugging Face callbacks, with the real libraries on tiny local models
(no model hub): a NaN in one layer shows up in the scraped metrics under that layer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

from .conftest import absent, fetch, parse, sample, samples, tiny_gpt2

pytestmark = [
    pytest.mark.slow,
    # Both frameworks warn about CPU-only and small-data runs; not gradtel's business.
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

NAN = float("nan")


def published_from_training(gradtel_callback: Any) -> list[Any]:
    """The updates the Hugging Face callback's monitor publishes, once training began."""
    found: list[Any] = []
    original = gradtel_callback.on_train_begin

    def subscribe(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        gradtel_callback.session.monitor.subscribe(found.append)

    gradtel_callback.on_train_begin = subscribe
    return found


def shared(name: str, **labels: str) -> float:
    """A series the callbacks' default provider shares across tests in this process."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def tiny_lightning_module(
    after_backward: Callable[[Any], None], nan_loss_at: int | None = None
) -> Any:
    """An encoder and a head; ``after_backward(module)`` may write its gradients, and the
    loss of global step ``nan_loss_at`` is NaN."""
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lit_encoder = nn.Linear(8, 16)
            self.lit_head = nn.Linear(16, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.lit_head(torch.relu(self.lit_encoder(x))), y)
            return loss * NAN if self.global_step == nan_loss_at else loss

        def on_after_backward(self) -> None:
            after_backward(self)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Tiny()


def test_lightning_callback(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from gradtel.integrations.lightning import GradtelCallback

    def three_nan_at_step_2(module: Any) -> None:
        if module.global_step == 2:
            module.lit_encoder.weight.grad.view(-1)[:3] = NAN

    scraped: list[str] = []

    class Scrape(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            assert (
                gradtel_callback.session.server is not None and gradtel_callback.session.server.url
            )
            scraped.append(fetch(gradtel_callback.session.server.url)[0])

    updates_before = shared("gradtel_updates_total")
    gradtel_callback = GradtelCallback(port=0, on_warning="skip", on_critical="skip")
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[gradtel_callback, Scrape()],
    )  # fmt: skip
    trainer.fit(
        tiny_lightning_module(three_nan_at_step_2), torch.utils.data.DataLoader(data, batch_size=8)
    )
    found = parse(scraped[0])
    assert sample(found, "gradtel_updates_total") - updates_before == 5
    assert sample(found, "gradtel_nan_grads_total", layer="lit_encoder") == 3
    absent(found, "gradtel_nan_grads_total", layer="lit_head")
    # Written during global step 2: the step Lightning's loggers give that batch's metrics.
    assert sample(found, "gradtel_last_unhealthy_step", kind="nan") == 2
    assert gradtel_callback.session.server is None  # closed at teardown


def test_transformers_trainer_callback_counts_before_clipping(tmp_path: Path) -> None:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from gradtel.integrations.transformers import GradtelTrainerCallback

    model = tiny_gpt2()
    bad = model.transformer.h[1].mlp.c_fc.weight
    poisoned: list[int] = []

    def poison(param: torch.Tensor) -> None:
        # During the real backward pass of one micro-batch of optimizer step 2.
        if len(poisoned) == 0 and state_step[0] == 2:
            param.grad.view(-1)[:3] = NAN
            poisoned.append(1)

    state_step = [0]
    bad.register_post_accumulate_grad_hook(poison)
    scraped: list[str] = []

    class Observe(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            state_step[0] = state.global_step

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            assert (
                gradtel_callback.session.server is not None and gradtel_callback.session.server.url
            )
            scraped.append(fetch(gradtel_callback.session.server.url)[0])

    updates_before = shared("gradtel_updates_total")
    skips_before = shared("gradtel_skipped_updates_total", reason="policy")
    nan_before = shared("gradtel_nan_grads_total", layer="transformer.h.1.mlp.c_fc")
    gradtel_callback = GradtelTrainerCallback(port=0, on_warning="skip", on_critical="skip")
    ids = torch.randint(0, 64, (16, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_grad_norm=1.0, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    Trainer(
        model=model, args=args, train_dataset=data, callbacks=[Observe(), gradtel_callback]
    ).train()
    found = parse(scraped[0])
    # Once per optimizer update, not per micro-batch.
    assert sample(found, "gradtel_updates_total") - updates_before == 4
    # Counted before the Trainer clipped (clipping would have made every gradient NaN).
    nan = sample(found, "gradtel_nan_grads_total", layer="transformer.h.1.mlp.c_fc") - nan_before
    assert nan == 3  # the series is shared with earlier tests of this process
    absent(found, "gradtel_nan_grads_total", layer="transformer.h.0.mlp.c_fc")
    assert sample(found, "gradtel_skipped_updates_total", reason="policy") - skips_before == 1
    # Poisoned during global step 2: the update that makes step 3, as the Trainer logs it.
    assert sample(found, "gradtel_last_unhealthy_step", kind="nan") == 3


def test_transformers_callback_counts_after_reentrant_gradient_checkpointing(
    tmp_path: Path,
) -> None:
    """``gradient_checkpointing`` with reentrant checkpoints runs each block's backward as a
    pass of its own inside the model's: the callback counted at the end of the last block's
    and missed a NaN in the first block."""
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from gradtel.integrations.transformers import GradtelTrainerCallback

    model = tiny_gpt2()
    step = [0]
    reference: list[int] = []  # NaN in the first block's c_fc, as the optimizer takes it

    class Poison(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step[0] = state.global_step

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            grads = [p.grad for p in model.transformer.h[0].mlp.c_fc.parameters()]
            reference.append(sum(int(g.isnan().sum()) for g in grads if g is not None))

    first = model.transformer.h[0].mlp.c_fc.weight
    first.register_hook(
        lambda grad: grad.index_fill(1, torch.tensor([0]), NAN) if step[0] == 1 else grad
    )
    gradtel_callback = GradtelTrainerCallback(
        serve_metrics=False, on_warning="ignore", on_critical="ignore"
    )
    found = published_from_training(gradtel_callback)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
        max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 64, (8, 12))]
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[Poison(), gradtel_callback]
    )
    trainer.train()
    assert reference[1] > 0, reference
    assert [h.nan_by_layer.get("transformer.h.0.mlp.c_fc", 0) for h in found] == reference


def test_transformers_callback_counts_a_short_last_cycle_before_clipping(tmp_path: Path) -> None:
    """5 micro-batches an epoch, 2 per update: the epoch's last update has 1. It was counted
    at the optimizer step, after clipping had spread its 3 NaN to every gradient."""
    from transformers import Trainer, TrainingArguments

    from gradtel.integrations.transformers import GradtelTrainerCallback

    model = tiny_gpt2()
    bad = model.transformer.h[1].mlp.c_fc.weight
    backwards = [0]

    def poison(param: torch.Tensor) -> None:
        backwards[0] += 1
        if backwards[0] == 5:  # the one micro-batch of the epoch's last update
            param.grad.view(-1)[:3] = NAN

    bad.register_post_accumulate_grad_hook(poison)
    gradtel_callback = GradtelTrainerCallback(
        serve_metrics=False, on_warning="ignore", on_critical="ignore"
    )
    found = published_from_training(gradtel_callback)
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_grad_norm=1.0, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 64, (10, 12))]
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[gradtel_callback])
    trainer.train()
    assert [dict(h.nan_by_layer) for h in found] == [{}, {}, {"transformer.h.1.mlp.c_fc": 3}]


def test_transformers_trainer_callback_reads_the_models_own_loss(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from gradtel.integrations.transformers import GradtelTrainerCallback

    model = tiny_gpt2()
    forwards = [0]

    def nan_input(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        forwards[0] += 1
        if forwards[0] == 6:  # the data brings a NaN into the last micro-batch of update 3
            output.view(-1)[0] = NAN

    model.transformer.wte.register_forward_hook(nan_input)
    losses_before = shared("gradtel_nonfinite_loss_updates_total")
    gradtel_callback = GradtelTrainerCallback(serve_metrics=False, on_critical="skip")
    ids = torch.randint(0, 64, (16, 12))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in ids]
    Trainer(model=model, args=args, train_dataset=data, callbacks=[gradtel_callback]).train()
    assert shared("gradtel_nonfinite_loss_updates_total") - losses_before == 1


def overflow_counts() -> dict[str, float]:
    return {
        "amp": shared("gradtel_skipped_updates_total", reason="amp_overflow"),
        "unhealthy": sum(
            shared("gradtel_unhealthy_updates_total", kind=k, severity=s)
            for k in ("nan", "inf")
            for s in ("warning", "critical")
        ),
        "refused": shared("gradtel_refused_checkpoints_total"),
    }


def test_lightning_16_mixed_overflows_are_skips_not_unhealthy_and_checkpoints_go_on(
    tmp_path: Path,
) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import MixedPrecision

    from gradtel.integrations.lightning import GradtelCallback

    def overflow_at_steps_1_and_2(module: Any) -> None:
        if module.global_step in (1, 2):  # the scaled gradients overflow, as fp16 ones do
            module.lit_encoder.weight.grad[0, 0] = float("inf")

    before = overflow_counts()
    losses_before = shared("gradtel_nonfinite_loss_updates_total")
    gradtel_callback = GradtelCallback(serve_metrics=False, protect_checkpoints=True)
    checkpoints = tmp_path / "checkpoints"
    torch.manual_seed(0)  # no overflow but the two made: a loss scale the data never reaches
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        # On the CPU "16-mixed" means bf16 without a scaler; a real fp16 GradScaler here:
        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))],
        callbacks=[
            gradtel_callback,
            pl.callbacks.ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=1, save_top_k=-1),
        ],
    )  # fmt: skip
    # Then, at step 4, the loss itself is NaN: the scaler skips that step too, but it is no overflow.
    module = tiny_lightning_module(overflow_at_steps_1_and_2, nan_loss_at=4)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    after = overflow_counts()
    assert after["amp"] - before["amp"] == 2  # the overflows of steps 2 and 3
    # The update whose loss was NaN is unhealthy, though the scaler skips it as well...
    assert after["unhealthy"] - before["unhealthy"] == 1
    assert shared("gradtel_nonfinite_loss_updates_total") - losses_before == 1
    # ...and no update reached the weights: every checkpoint is saved.
    assert after["refused"] - before["refused"] == 0
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        f"epoch=0-step={s}.ckpt" for s in range(1, 7)
    ]


def test_transformers_callback_counts_the_scalers_overflows_as_skips(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from gradtel.integrations.transformers import GradtelTrainerCallback

    model = tiny_gpt2()
    backwards = [0]

    def overflow(param: torch.Tensor) -> None:
        backwards[0] += 1
        if backwards[0] in (3, 4):  # the scaled gradients of update 2 overflow
            param.grad.view(-1)[0] = float("inf")

    model.transformer.h[0].mlp.c_fc.weight.register_post_accumulate_grad_hook(overflow)
    before = overflow_counts()
    gradtel_callback = GradtelTrainerCallback(serve_metrics=False)
    ids = torch.randint(0, 64, (16, 12))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_grad_norm=1.0, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in ids]
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[gradtel_callback])
    # accelerate gives its optimizer wrapper a GradScaler under fp16 on an accelerator, never
    # on the CPU: give it one, so that the Trainer scales, unscales and skips as it does there.
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()
    after = overflow_counts()
    assert after["amp"] - before["amp"] == 1
    assert after["unhealthy"] - before["unhealthy"] == 0


def test_lightning_a_nan_loss_in_any_micro_batch_is_no_overflow(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import MixedPrecision

    from gradtel.integrations.lightning import GradtelCallback

    before = overflow_counts()
    losses_before = shared("gradtel_nonfinite_loss_updates_total")
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path, accumulate_grad_batches=2,
        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))],
        callbacks=[GradtelCallback(serve_metrics=False)],
    )  # fmt: skip
    # Global step 2 is made of micro-batches 4 and 5: the first of them has the NaN loss.
    module = tiny_lightning_module(lambda module: None)
    module.training_step = lambda batch, batch_idx: (
        nn.functional.mse_loss(  # type: ignore[method-assign]
            module.lit_head(torch.relu(module.lit_encoder(batch[0]))), batch[1]
        )
        * (NAN if batch_idx == 4 else 1.0)
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    after = overflow_counts()
    assert shared("gradtel_nonfinite_loss_updates_total") - losses_before == 1
    assert after["unhealthy"] - before["unhealthy"] == 1
    assert after["amp"] - before["amp"] == 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lightning_model_built_in_configure_model(
    provider: MeterProvider, registry: CollectorRegistry, tmp_path: Any
) -> None:
    import lightning.pytorch as pl

    from gradtel.integrations.lightning import GradtelCallback

    class Late(pl.LightningModule):
        def configure_model(self) -> None:
            if not hasattr(self, "layer"):
                self.layer = nn.Linear(8, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randn(32, 1))
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[GradtelCallback(serve_metrics=False, meter_provider=provider, layer_series="all")],
    )  # fmt: skip
    trainer.fit(Late(), torch.utils.data.DataLoader(data, batch_size=8))
    found = samples(registry)
    assert sample(found, "gradtel_updates_total") == 3
    assert sample(found, "gradtel_nan_grads_total", layer="layer") == 0
