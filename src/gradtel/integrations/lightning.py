"""PyTorch Lightning: ``Trainer(callbacks=[GradtelCallback()])``.

Lightning calls ``on_before_optimizer_step`` once per optimizer update, after
gradient accumulation and after AMP unscaling, and before gradient clipping:
exactly where gradtel should count. With ``precision="16-mixed"`` the precision
plugin's ``GradScaler`` skips the updates that overflow: the callback hands it to
the monitor, so they are counted as ``amp_overflow`` skips, never as unhealthy,
and never block a checkpoint. The monitor is made at ``on_fit_start``,
after ``configure_model()`` has built the layers.

With ``protect_checkpoints=True`` a checkpoint callback (``ModelCheckpoint``)
saves nothing once the weights have taken an unhealthy update: its save is
stopped before it writes a file or rotates an old one out, so the healthy
checkpoints stay on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer

from ..attach.optimizer import summed_loss
from . import Session

__all__ = ["GradtelCallback"]

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
        self._loss: Tensor | None = None
        self._undo: list[Callable[[], None]] = []
        self._in_checkpoint_hook = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.session.start(pl_module)
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

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        # The step this update makes: Lightning's global step once it is taken. Under
        # "16-mixed" the precision plugin's scaler has just unscaled, and skips overflows.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.session.collect(loss=self._loss, step=trainer.global_step + 1, scaler=scaler)
        self._loss = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            while self._undo:
                self._undo.pop()()
            self.session.stop()
