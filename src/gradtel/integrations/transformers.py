"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[GradtelTrainerCallback()])``.

The Trainer clips gradients before ``on_pre_optimizer_step``, and clipping with
a non-finite norm turns every gradient into NaN. So the callback counts at the
end of the backward pass that completes each accumulation cycle, before
clipping. A cycle cut short at the end of an epoch is counted at
``on_pre_optimizer_step`` instead (after clipping, when clipping is on).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..exporter import MetricsServer, serve
from ..hooks import Attachment, at_end_of_backward
from ..monitor import GradMonitor

__all__ = ["GradtelTrainerCallback"]


class GradtelTrainerCallback(TrainerCallback):
    """Watch the model's gradients and serve ``/metrics`` while the Trainer trains.

    Args:
        port: Endpoint port (default ``$GRADTEL_PORT`` or 9464; + ``LOCAL_RANK`` per rank).
        addr: Bind address (default ``$GRADTEL_ADDR`` or ``127.0.0.1``).
        serve_metrics: Start the endpoint (``False`` when you serve it yourself).
        **monitor_options: Passed to :class:`~gradtel.GradMonitor`.
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
        self._hooks: Attachment | None = None
        self._backwards = 0
        self._collected = False
        self._accumulation = 1

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        self.monitor = GradMonitor(model, **self._options)
        self._accumulation = max(1, int(args.gradient_accumulation_steps))
        self._hooks = at_end_of_backward(self.monitor.parameters, self._end_of_backward)
        if self._serve:
            self.server = serve(self._port, self._addr)

    def _end_of_backward(self) -> None:
        self._backwards += 1
        if self._backwards == self._accumulation and self.monitor is not None:
            self.monitor.collect()
            self._collected = True

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._backwards, self._collected = 0, False

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._collected and self.monitor is not None:
            self.monitor.collect()
        self._collected = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        if self.server is not None:
            self.server.close()
            self.server = None
