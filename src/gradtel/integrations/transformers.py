"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[GradtelTrainerCallback()])``.

The Trainer clips gradients before ``on_pre_optimizer_step``, and clipping with
a non-finite norm turns every gradient into NaN. So the callback counts at the
end of the backward pass that completes each accumulation cycle, before
clipping, a cycle cut short at the end of an epoch too: its length is the
Trainer's ``current_gradient_accumulation_steps`` (with a Trainer that has none,
the short cycle is counted at ``on_pre_optimizer_step``, after clipping).

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

The counts reach every ``report_to`` integration (TensorBoard, W&B, MLflow...) in the
``logs`` of ``on_log``, as ``gradtel/...`` (see :meth:`gradtel.GradHealth.scalars`):
each log carries the sums of the updates since the previous one. The Trainer calls the
``callbacks=[...]`` you give it after its ``report_to`` ones, which would write each
log before gradtel added to it: so a small companion callback that adds them is put,
when the Trainer is made (or at the first step, after ``trainer.add_callback()``), just
after the Trainer's flow callback, ahead of them. The gradtel callback keeps its place.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch.utils.hooks import RemovableHandle
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from .. import _checks
from ..attach.optimizer import Attachment, at_end_of_backward, summed_loss
from ..health import HealthTally
from . import Session

T = TypeVar("T")

__all__ = ["GradtelTrainerCallback"]


class GradtelTrainerCallback(TrainerCallback):
    """Watch the model's gradients and serve ``/metrics`` while the Trainer trains.

    Takes ``port``, ``addr``, ``serve_metrics`` and ``protect_checkpoints`` (see
    :class:`gradtel.integrations.Session`); other keyword arguments go to
    :class:`~gradtel.GradMonitor`. With ``protect_checkpoints=True`` the Trainer
    saves no checkpoint once the weights have taken an unhealthy update (its save,
    and the rotation of old checkpoints, do not happen); an explicit
    ``trainer.save_model()`` is yours to guard with ``monitor.allow_checkpoint()``.

    With ``log_to_loggers=True`` (default) every log of the Trainer gets
    ``gradtel/nan_total``, ``gradtel/inf_total``, ``gradtel/status``,
    ``gradtel/nan/<layer>``... summed over the updates since the previous log
    (:class:`gradtel.HealthTally`); ``False`` adds nothing.

    Raises:
        TypeError: ``log_to_loggers`` or ``protect_checkpoints`` is not a bool.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        addr: str | None = None,
        serve_metrics: bool = True,
        protect_checkpoints: bool = False,
        log_to_loggers: bool = True,
        **monitor_options: Any,
    ) -> None:
        self.session = Session(port, addr, serve_metrics, monitor_options, protect_checkpoints)
        self.log_to_loggers = _checks.flag("log_to_loggers", log_to_loggers)
        self._since_log = HealthTally()
        """The updates since the Trainer last logged."""
        self._logs_first = _LogsFirst(self) if self.log_to_loggers else None
        self._logs_placed = False
        self._hooks: Attachment | None = None
        self._loss_hook: RemovableHandle | None = None
        self._loss: torch.Tensor | None = None
        self._backwards = 0
        self._step: int | None = None
        self._collected = False
        self._accumulation = self._configured = 1
        self._scaler: object = None

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._place_logs_first()

    def _place_logs_first(self) -> None:
        """Put the companion that feeds the logs just after the Trainer's flow callback,
        ahead of the ``report_to`` ones; once per training run. The Trainer shows callbacks
        neither itself nor its handler: the handler is the caller of this hook."""
        if self._logs_first is None or self._logs_placed:
            return
        handler = _caller(CallbackHandler)
        if handler is None:
            return
        self._logs_placed = True
        callbacks = handler.callbacks
        if self._logs_first not in callbacks:
            flow = next(
                (i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)), -1
            )
            # The handler is calling this hook over the list: the hook is called once more,
            # which places nothing.
            callbacks.insert(flow + 1, self._logs_first)

    def _add_to_logs(self, state: TrainerState, logs: dict[str, float] | None) -> None:
        if logs is None:
            return
        monitor = self.session.monitor
        if monitor is not None:
            # A deferred read-out is waited for only when the Trainer logs, which reads its
            # loss to the host anyway: the update is in the log of its own step, and neither
            # the last log nor an early stop leaves one pending.
            monitor.flush()
        logs.update(self._since_log.take())

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        monitor = self.session.start(model)
        self._since_log.take()  # a tally left by an earlier run belongs to it
        if self.log_to_loggers:
            monitor.subscribe(self._since_log.add)
        self._configured = self._accumulation = max(1, int(args.gradient_accumulation_steps))
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
        self._place_logs_first()  # added with trainer.add_callback() once the Trainer was made
        self._backwards, self._collected = 0, False
        self._step = state.global_step + 1  # the step this update makes, as the Trainer logs it
        # The micro-batches of this cycle: the last one of an epoch may be shorter, and it
        # must be counted at its end too, before the Trainer clips.
        trainer = _caller(Trainer)
        cycle = getattr(trainer, "current_gradient_accumulation_steps", None)
        self._accumulation = cycle if isinstance(cycle, int) and cycle > 0 else self._configured

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
        self._logs_placed = False
        self.session.stop()


class _LogsFirst(TrainerCallback):
    """Adds gradtel's numbers to the Trainer's logs, called ahead of the ``report_to``
    callbacks; the gradtel callback itself keeps the place it was given."""

    def __init__(self, owner: GradtelTrainerCallback) -> None:
        self._owner = owner

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self._owner._add_to_logs(state, logs)


def _caller(kind: type[T]) -> T | None:
    """The Trainer, or its callback handler, found among the few callers of a hook: the
    Trainer shows callbacks neither."""
    frame = sys._getframe(1)
    for _ in range(5):
        owner = frame.f_locals.get("self")
        if isinstance(owner, kind):
            return owner
        if frame.f_back is None:
            break
        frame = frame.f_back
    return None
