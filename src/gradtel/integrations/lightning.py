"""PyTorch Lightning: ``Trainer(callbacks=[GradtelCallback()])``.

Lightning calls ``on_before_optimizer_step`` once per optimizer update, after
gradient accumulation and after AMP unscaling, and before gradient clipping:
exactly where gradtel should count. With manual optimization several optimizers
may step one backward pass: the first of those steps collects it, the others
count nothing again (one update per backward pass, as backward left it). With
``precision="16-mixed"`` the precision plugin's ``GradScaler`` skips the updates
that overflow: the callback hands it to the monitor, so they are counted as
``amp_overflow`` skips, never as unhealthy, and never block a checkpoint. The
monitor is made at ``on_fit_start``, after ``configure_model()`` has built the layers.

The training step gradtel gives an update (on logs, pages and the incident record) is
the one Lightning's loggers give the metrics of the batch that made it. With automatic
optimization that is the global step before the update, and a checkpoint Lightning names
``step=N`` holds the updates of the steps before N; with manual optimization Lightning's
loggers count batches, the global step optimizer steps, and gradtel follows the loggers.

The counts reach the Trainer's loggers (TensorBoard, W&B, MLflow, CSV) through the
module's ``log_dict``, as ``gradtel/...`` (see :meth:`gradtel.GradHealth.scalars`), at
the loggers' own cadence (``log_every_n_steps``): each logged step carries the sums of
the updates since the previous one, so an update between two log steps is not lost,
and the updates after the last log step are written when training ends.

With ``protect_checkpoints=True`` a checkpoint callback (``ModelCheckpoint``)
saves nothing once the weights have taken an unhealthy update: its save is
stopped before it writes a file or rotates an old one out, so the healthy
checkpoints stay on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer

from .. import _checks
from ..attach.optimizer import summed_loss
from ..health import HealthTally
from . import Session, enabled_scaler

__all__ = ["GradtelCallback"]

_GRAD_NORM = "gradtel/grad_norm"
"""The one number that is no count: the latest finite norm stands until a newer one."""

_SAVING_HOOKS = (
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_validation_end",
    "on_exception",
    "on_train_end",
)
"""The hooks in which Lightning's checkpoint callbacks save (and rotate) checkpoints."""


class _Refused(Exception):
    """Ends a checkpoint callback's hook at its save: nothing written, nothing rotated out."""


class GradtelCallback(Callback):
    """Watch the LightningModule's gradients and serve ``/metrics`` while it trains.

    Takes ``port``, ``addr``, ``serve_metrics`` and ``protect_checkpoints`` (see
    :class:`gradtel.integrations.Session`); other keyword arguments go to
    :class:`~gradtel.GradMonitor`. With ``protect_checkpoints=True``, every
    checkpoint callback of the Trainer and ``trainer.save_checkpoint()`` save
    nothing once the weights have taken an unhealthy update.

    With ``log_to_loggers=True`` (default) and a logger on the Trainer, every step
    Lightning logs gets ``gradtel/nan_total``, ``gradtel/inf_total``,
    ``gradtel/status``, ``gradtel/nan/<layer>``... summed over the updates since
    the previous logged step (:class:`gradtel.HealthTally`); ``False`` logs nothing.

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
        """The updates since Lightning last wrote to its loggers."""
        self._stepped = False
        self._counts: set[str] = set()
        """The keys of the counts logged so far."""
        self._loss: Tensor | None = None
        self._undo: list[Callable[[], None]] = []
        self._in_checkpoint_hook = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        monitor = self.session.start(pl_module)
        # A tally, keys or a step left by an earlier fit belong to it.
        self._since_log.take()
        self._counts.clear()
        self._stepped, self._loss = False, None
        if self.log_to_loggers and trainer.loggers:
            monitor.subscribe(self._since_log.add)
        if self.session.protect_checkpoints and not self._undo:
            self._protect(trainer)

    def _protect(self, trainer: Trainer) -> None:
        save = trainer.save_checkpoint

        def guarded_save(*args: Any, **kwargs: Any) -> None:
            if self.session.allow_checkpoint(trainer.global_step):
                save(*args, **kwargs)
            elif self._in_checkpoint_hook:
                raise _Refused

        trainer.save_checkpoint = guarded_save  # type: ignore[method-assign]
        self._undo.append(partial(delattr, trainer, "save_checkpoint"))
        for checkpoint in trainer.checkpoint_callbacks:
            for name in _SAVING_HOOKS:
                setattr(checkpoint, name, self._guarded_hook(getattr(checkpoint, name)))
                self._undo.append(partial(delattr, checkpoint, name))

    def _guarded_hook(self, hook: Callable[..., None]) -> Callable[..., None]:
        def guarded(*args: Any, **kwargs: Any) -> None:
            self._in_checkpoint_hook = True
            try:
                hook(*args, **kwargs)
            except _Refused:
                pass  # said in the log and counted by the monitor
            finally:
                self._in_checkpoint_hook = False

        return guarded

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: Tensor
    ) -> None:
        # Said in the page when the NaN was already in the loss, of any micro-batch of the update.
        self._loss = summed_loss(self._loss, loss)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # With manual optimization this hook runs in the user's step, where their clipping
        # comes before optimizer.step(): count the gradients as backward left them here
        # (each micro-batch looks again), and publish the look at the step.
        # Under an enabled GradScaler the gradients are still scaled here (their norms too):
        # the update is counted at the step, after unscale_, as with automatic optimization.
        # A new backward pass: the next optimizer step collects it (see on_before_optimizer_step).
        monitor = self.session.monitor
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if monitor is not None and not pl_module.automatic_optimization:
            monitor._once.pass_ended()
            if enabled_scaler(scaler) is None:
                monitor._look(self._loss)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        self._stepped = True
        # Under "16-mixed" the precision plugin's scaler has just unscaled, and skips overflows.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss, self._loss = self._loss, None

        def collect() -> None:
            self.session.collect(loss=loss, step=_logged_step(trainer), scaler=scaler)

        monitor = self.session.monitor
        if pl_module.automatic_optimization or monitor is None:
            collect()
        else:
            # One backward pass, stepped by several optimizers (each over its part of the
            # model): the first step collects it, as backward left it, the others count
            # nothing again; as with attach(), the same optimizer stepping again with no
            # backward pass in between is an update of its own.
            monitor._collect_at_step(id(optimizer), collect)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning writes this batch's metrics when it stepped the optimizer and the step is
        # one to log (Lightning's own LearningRateMonitor asks the same connector); on any
        # other batch the updates wait in the tally. A healthy update adds no host sync:
        # the numbers are host tensors, which Lightning keeps on the host.
        stepped, self._stepped = self._stepped, False
        monitor = self.session.monitor
        if monitor is None or not trainer._logger_connector.should_update_logs:
            return
        if not stepped and pl_module.automatic_optimization:
            return
        # A deferred read-out of an update is waited for only here, where Lightning reads
        # its own metrics to the host anyway: it is logged at its step.
        monitor.flush()
        found = self._numbers_since_log()
        if not stepped and not found:
            # Manual optimization: Lightning writes every batch then, stepped or not (the
            # updates since the last logged step go into this one): with none since, the
            # counts logged before are 0 in it, or Lightning would repeat them.
            found = dict.fromkeys(self._counts, 0.0)
        if found:
            pl_module.log_dict(_on_host(found), on_step=True, on_epoch=False)

    def _numbers_since_log(self) -> dict[str, float]:
        found = self._since_log.take()
        if found:
            # Lightning repeats a key's last value at the later logged steps of the epoch: a
            # count logged once is logged as 0 when there is none since.
            self._counts |= found.keys() - {_GRAD_NORM}
            found = {**dict.fromkeys(self._counts, 0.0), **found}
        return found

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The updates after the last logged step (Lightning logs nothing of them), with the
        # deferred read-outs still pending, at the step Lightning numbers the last batch.
        if self.session.monitor is not None:
            self.session.monitor.flush()
        found = self._numbers_since_log()
        if found:
            step = _logged_step(trainer) - 1  # the loop counted on past the last batch
            for logger in trainer.loggers:
                logger.log_metrics(found, step=step)
                logger.save()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            while self._undo:
                self._undo.pop()()
            self.session.stop()


def _logged_step(trainer: Trainer) -> int:
    """The step Lightning's loggers give the metrics of the batch being run (after the last
    batch: its step plus one). gradtel's logs, pages and incident record use the same."""
    # Not trainer.global_step: that counts optimizer steps, while Lightning's loggers count
    # the batches that stepped, and with manual optimization every batch (stepped or not).
    # The two agree only with automatic optimization; the global step would put an update
    # (and the end-of-training row) behind the rows Lightning writes of the same batches.
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _on_host(found: dict[str, float]) -> dict[str, Tensor]:
    """The numbers as host tensors: a Python number would be copied to the module's device
    by ``log`` (a host sync on CUDA) and read back before it is written."""
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in found.items()}
