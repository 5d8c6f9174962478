"""Callbacks for training frameworks, each in its own optional extra.

- :mod:`gradtel.integrations.lightning`: ``GradtelCallback`` for PyTorch Lightning
  (``pip install 'gradtel[lightning]'``).
- :mod:`gradtel.integrations.transformers`: ``GradtelTrainerCallback`` for the
  Hugging Face ``Trainer`` (``pip install 'gradtel[transformers]'``).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _checks
from ..export.endpoint import MetricsServer, serve
from ..monitor import GradMonitor

__all__ = ["Session"]


def enabled_scaler(scaler: object) -> torch.amp.GradScaler | None:
    """``scaler`` when it is an enabled AMP ``GradScaler`` (a framework's may be off)."""
    return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None


class Session:
    """What a framework callback owns while training runs: a monitor and its endpoint.

    Args:
        port: Endpoint port (default ``$GRADTEL_PORT`` or 9464; + ``LOCAL_RANK`` per rank).
        addr: Bind address (default ``$GRADTEL_ADDR`` or ``127.0.0.1``).
        serve_metrics: Start the endpoint (``False`` when you serve it yourself).
        monitor_options: Passed to :class:`~gradtel.GradMonitor`.
        protect_checkpoints: Refuse to save checkpoints once the weights have
            taken an unhealthy update (see :meth:`GradMonitor.allow_checkpoint`).

    Raises:
        TypeError: ``protect_checkpoints`` is not a bool.
    """

    def __init__(
        self,
        port: int | None,
        addr: str | None,
        serve_metrics: bool,
        monitor_options: dict[str, Any],
        protect_checkpoints: bool = False,
    ) -> None:
        self.protect_checkpoints = _checks.flag("protect_checkpoints", protect_checkpoints)
        self._port, self._addr, self._serve = port, addr, serve_metrics
        self._options = monitor_options
        self.monitor: GradMonitor | None = None
        self.server: MetricsServer | None = None

    def start(self, model: torch.nn.Module) -> GradMonitor:
        """Watch ``model`` and serve its metrics; once per training run."""
        if self.monitor is None:
            self.monitor = GradMonitor(model, **self._options)
            if self._serve:
                self.server = serve(self._port, self._addr)
        return self.monitor

    def collect(
        self, loss: torch.Tensor | None = None, step: int | None = None, scaler: object = None
    ) -> None:
        """Collect one update. ``scaler``: the framework's AMP ``GradScaler``, if it uses an
        enabled one: the overflows it skips are counted as skipped, never as unhealthy."""
        if self.monitor is not None:
            self.monitor.collect(loss=loss, step=step, scaler=enabled_scaler(scaler))

    def allow_checkpoint(self, step: int) -> bool:
        """Whether every rank may save the checkpoint of ``step`` (a collective in a
        distributed run: the frameworks save on every rank); always with no protection."""
        if not self.protect_checkpoints or self.monitor is None:
            return True
        return self.monitor.allow_checkpoint(step, all_ranks=True)

    def stop(self) -> None:
        """Stop watching, and close the endpoint (after its last scrape of an unhealthy
        update, if any)."""
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.server is not None:
            self.server.close()
            self.server = None
