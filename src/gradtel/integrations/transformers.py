"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[GradtelTrainerCallback()])``.

The Trainer clips gradients before ``on_pre_optimizer_step``, and clipping with
a non-finite norm turns every gradient into NaN. So the callback counts at the
end of the backward pass that completes each accumulation cycle, before
clipping. A cycle cut short at the end of an epoch is counted at
``on_pre_optimizer_step`` instead (after clipping, when clipping is on).

The Trainer shows callbacks no loss, so the callback keeps the ``loss`` of the
model's own output (Hugging Face models compute it when given labels), summed
over the update's micro-batches, as Lightning's callback does: a NaN loss in any
of them is said. A loss computed
outside the model (a custom ``compute_loss``) is not seen.

With fp16 on an accelerator, accelerate's optimizer wrapper holds a ``GradScaler``:
the callback hands it to the monitor, so the overflows it skips are counted as
``amp_overflow`` skips, not as unhealthy updates. (The gradients it counts are
still scaled then; scaling keeps finite values finite.) On the CPU accelerate uses
no scaler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..attach.optimizer import Attachment, at_end_of_backward, summed_loss
from . import Session

__all__ = ["GradtelTrainerCallback"]


class GradtelTrainerCallback(TrainerCallback):
    """Watch the model's gradients and serve ``/metrics`` while the Trainer trains.

    Takes ``port``, ``addr``, ``serve_metrics`` and ``protect_checkpoints`` (see
    :class:`gradtel.integrations.Session`); other keyword arguments go to
    :class:`~gradtel.GradMonitor`. With ``protect_checkpoints=True`` the Trainer
    saves no checkpoint once the weights have taken an unhealthy update (its save,
    and the rotation of old checkpoints, do not happen); an explicit
    ``trainer.save_model()`` is yours to guard with ``monitor.allow_checkpoint()``.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        addr: str | None = None,
        serve_metrics: bool = True,
        protect_checkpoints: bool = False,
        **monitor_options: Any,
    ) -> None:
        self.session = Session(port, addr, serve_metrics, monitor_options, protect_checkpoints)
        self._hooks: Attachment | None = None
        self._loss_hook: RemovableHandle | None = None
        self._loss: torch.Tensor | None = None
        self._backwards = 0
        self._step: int | None = None
        self._collected = False
        self._accumulation = 1
        self._scaler: object = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        monitor = self.session.start(model)
        self._accumulation = max(1, int(args.gradient_accumulation_steps))
        # Under fp16 on an accelerator, accelerate wraps the optimizer with its GradScaler:
        # the overflows it skips are counted as skipped, never as unhealthy.
        self._scaler = getattr(kwargs.get("optimizer"), "scaler", None)
        self._hooks = at_end_of_backward(monitor.parameters, self._end_of_backward)
        if isinstance(model, torch.nn.Module):
            self._loss_hook = model.register_forward_hook(self._keep_loss)

    def _keep_loss(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if isinstance(loss, torch.Tensor) and module.training:
            # Said in the page when the NaN was already in the loss, of any micro-batch.
            self._loss = summed_loss(self._loss, loss)

    def _end_of_backward(self) -> None:
        self._backwards += 1
        if self._backwards == self._accumulation:
            self._collect()

    def _collect(self) -> None:
        self.session.collect(loss=self._loss, step=self._step, scaler=self._scaler)
        self._collected, self._loss = True, None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._backwards, self._collected = 0, False
        self._step = state.global_step + 1  # the step this update makes, as the Trainer logs it

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._collected:
            self._collect()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._guard_save(state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._guard_save(state, control)

    def _guard_save(self, state: TrainerState, control: TrainerControl) -> None:
        # The Trainer's own flow callback asks for a save just before; the save follows.
        if control.should_save and not self.session.allow_checkpoint(state.global_step):
            control.should_save = False

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        if self._loss_hook is not None:
            self._loss_hook.remove()
        self.session.stop()
