"""PyTorch Lightning: ``Trainer(callbacks=[GradtelCallback()])``.

Lightning calls ``on_before_optimizer_step`` once per optimizer update, after
gradient accumulation and after AMP unscaling, and before gradient clipping:
exactly where gradtel should count.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from ..exporter import MetricsServer, serve
from ..monitor import GradMonitor

__all__ = ["GradtelCallback"]


class GradtelCallback(Callback):
    """Watch the LightningModule's gradients and serve ``/metrics`` while it trains.

    Args:
        port: Endpoint port (default ``$GRADTEL_PORT`` or 9464; + ``LOCAL_RANK`` per rank).
        addr: Bind address (default ``$GRADTEL_ADDR`` or ``127.0.0.1``).
        serve_metrics: Start the endpoint (``False`` when you serve it yourself).
        **monitor_options: Passed to :class:`~gradtel.GradMonitor` (thresholds, policies, ...).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        addr: str | None = None,
        serve_metrics: bool = True,
        **monitor_options: Any,
    ) -> None:
        self._port, self._addr, self._serve = port, addr, serve_metrics
        self._options = monitor_options
        self.monitor: GradMonitor | None = None
        self.server: MetricsServer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.monitor is not None:
            return
        self.monitor = GradMonitor(pl_module, **self._options)
        if self._serve:
            self.server = serve(self._port, self._addr)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        if self.monitor is not None:
            self.monitor.collect()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.server is not None:
            self.server.close()
            self.server = None
