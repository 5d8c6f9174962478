"""PyTorch Lightning: ``Trainer(callbacks=[GradtelCallback()])``.

Lightning calls ``on_before_optimizer_step`` once per optimizer update, after
gradient accumulation and after AMP unscaling, and before gradient clipping:
exactly where gradtel should count. The monitor is made at ``on_fit_start``,
after ``configure_model()`` has built the layers.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer

from . import Session

__all__ = ["GradtelCallback"]


class GradtelCallback(Callback):
    """Watch the LightningModule's gradients and serve ``/metrics`` while it trains.

    Takes ``port``, ``addr`` and ``serve_metrics`` (see :class:`gradtel.integrations.Session`);
    other keyword arguments go to :class:`~gradtel.GradMonitor`.
    """

    def __init__(
        self, *, port: int | None = None, addr: str | None = None, serve_metrics: bool = True, **monitor_options: Any
    ) -> None:
        self.session = Session(port, addr, serve_metrics, monitor_options)
        self._loss: Tensor | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.session.start(pl_module)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._loss = loss.detach()  # said in the page when the NaN was already in the loss

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        # The step this update makes: Lightning's global step once it is taken.
        self.session.collect(loss=self._loss, step=trainer.global_step + 1)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.session.stop()
