"""Collect without editing the training loop: hooks on the optimizer, the AMP scaler or backward.

``scan="step"`` (default) collects once per optimizer update, after the last
micro-batch of gradient accumulation: just before ``optimizer.step()``, or,
with a ``GradScaler``, right after it unscales the gradients. The scaler case
matters: when gradients overflow, ``scaler.step()`` skips ``optimizer.step()``,
so a step pre-hook alone would never see the very updates that went bad.

``scan="backward"`` collects at the end of every backward pass instead (each
micro-batch), counting the gradients accumulated so far.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from .monitor import GradMonitor

__all__ = ["Attachment", "at_end_of_backward", "attach"]


class Attachment:
    """What :func:`attach` installed; ``remove()`` takes it all away."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


def attach(
    monitor: GradMonitor,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    scan: Literal["step", "backward"] = "step",
) -> Attachment:
    """Make ``monitor.collect()`` run by itself; see :meth:`GradMonitor.attach`."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {optimizer!r} ({type(optimizer).__name__})"
        )
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {scaler!r}")
    if scan not in ("step", "backward"):
        raise ValueError(f"scan must be 'step' or 'backward', got {scan!r}")
    attachment = Attachment()
    if scan == "backward":
        attachment._undo.append(at_end_of_backward(monitor.parameters, monitor.collect).remove)
    elif scaler is not None and scaler.is_enabled():
        _after_unscale(monitor, scaler, optimizer, attachment)
    else:

        def before_step(*args: Any) -> None:
            monitor.collect()

        handle = optimizer.register_step_pre_hook(before_step)
        attachment._undo.append(handle.remove)
    return attachment


def _after_unscale(
    monitor: GradMonitor,
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    attachment: Attachment,
) -> None:
    original = scaler.unscale_

    def unscale_(opt: torch.optim.Optimizer) -> None:
        original(opt)
        if opt is optimizer:
            health = monitor.collect()
            # The scaler skips optimizer.step() exactly when an unscaled gradient is
            # not finite: gradtel's own counts say so, without another host read.
            if health.sampled and health.nan_total + health.inf_total > 0:
                monitor._record_skip("amp_overflow")

    scaler.unscale_ = unscale_  # type: ignore[method-assign, assignment]
    attachment._undo.append(lambda: delattr(scaler, "unscale_"))


def at_end_of_backward(params: Sequence[torch.Tensor], callback: Callable[[], object]) -> Attachment:
    """Run ``callback`` once at the end of every backward pass that reaches ``params``."""
    armed = [False]

    def end_of_backward() -> None:
        armed[0] = False
        callback()

    def arm(param: Any) -> None:
        # The first gradient of a backward pass queues one callback for its end.
        if not armed[0]:
            armed[0] = True
            torch.autograd.Variable._execution_engine.queue_callback(end_of_backward)

    attachment = Attachment()
    attachment._undo.extend(p.register_post_accumulate_grad_hook(arm).remove for p in params)
    return attachment
