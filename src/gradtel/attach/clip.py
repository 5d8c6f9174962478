"""Gradient clipping that collects gradient health from the same pass over the gradients.

Clipping already computes one norm per gradient; a norm is not finite when its
gradient holds a NaN or an Inf, so gradtel decides health from those norms and
counts exactly only the gradients whose norm is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..monitor import GradMonitor
from ..pipeline.parameters import same_objects
from ..pipeline.scan import per_tensor_norms, stacked
from ..pipeline.update import Norms

__all__ = ["clip_grad_norm_"]


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    monitor: GradMonitor,
    scaler: torch.amp.GradScaler | None = None,
    loss: torch.Tensor | None = None,
    step: int | None = None,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also runs ``monitor.collect()`` on the way.

    Takes torch's arguments in torch's order, plus ``monitor`` (and what
    ``collect()`` takes: ``scaler``, ``loss``, ``step``). Health is
    collected *before* the gradients are rescaled: clipping with a non-finite
    total norm rewrites every gradient (one NaN makes them all NaN). The
    monitor's policy runs first too, so ``on_critical="skip"`` clears the
    gradients and nothing is clipped. For ``norm_type > 0`` (and ``inf``) the
    per-gradient norms clipping computes decide health; other norm types
    (0 counts non-zeros, negative ones are minima) do not see every NaN or
    Inf, so the monitor scans the gradients itself.

    When the total norm is read on the host anyway (an L2 norm, ``readout="sync"``)
    and is under ``max_norm``, the gradients are left as they are: torch would
    multiply each by exactly 1, a pass over gradient memory for nothing.

    Args:
        parameters: Parameters (or one tensor) whose gradients are clipped.
        max_norm: Largest allowed total norm.
        norm_type: Type of the p-norm; ``float("inf")`` for the max norm.
        error_if_nonfinite: Raise ``RuntimeError`` when the total norm is not
            finite, as torch does (after gradtel has counted and recorded).
        foreach: As in torch: ``None`` uses multi-tensor kernels where the
            device supports them, ``False`` one norm per gradient.
        monitor: The :class:`~gradtel.GradMonitor` to collect into.
        scaler: The enabled AMP ``GradScaler`` that steps this update, when you clip
            between ``scaler.unscale_(optimizer)`` and ``scaler.step(optimizer)``:
            its overflows are counted as skipped, not as unhealthy (see
            :meth:`GradMonitor.collect`).
        loss: This update's loss, for :meth:`GradMonitor.collect`.
        step: The training step this update makes, as your logs number it, for
            :meth:`GradMonitor.collect`.

    Returns:
        The total norm of the gradients before clipping, as a tensor
        (``tensor(0.)`` when no parameter has a gradient).

    Raises:
        TypeError: ``monitor`` is not a :class:`~gradtel.GradMonitor`.
        RuntimeError: the total norm is not finite and ``error_if_nonfinite``.

    >>> import torch, gradtel
    >>> model = torch.nn.Linear(4, 2)
    >>> monitor = gradtel.GradMonitor(model)
    >>> model(torch.ones(1, 4)).sum().backward()
    >>> total = gradtel.clip_grad_norm_(model.parameters(), 1.0, monitor=monitor)
    >>> bool(total > 0)
    True
    >>> monitor.close()
    """
    if not isinstance(monitor, GradMonitor):
        raise TypeError(
            f"monitor must be a gradtel.GradMonitor, got {monitor!r} ({type(monitor).__name__})"
        )
    collect: dict[str, Any] = {"scaler": scaler, "loss": loss, "step": step}
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    all_grads = [p.grad for p in params]
    with_grad = [p for p, g in zip(params, all_grads) if g is not None]
    grads = [g for g in all_grads if g is not None]
    norm_type = float(norm_type)
    if not with_grad or norm_type <= 0 or not all(g.layout is torch.strided for g in grads):
        # Nothing to clip (the monitor says why), a norm that can hide NaN or Inf,
        # or sparse gradients (no multi-tensor norm): scan first, then torch clips.
        monitor.collect(**collect)
        clipped: torch.Tensor = torch.nn.utils.clip_grad_norm_(
            params, max_norm, norm_type, error_if_nonfinite, foreach
        )
        return clipped
    norms = per_tensor_norms(grads, norm_type, foreach)
    every = stacked(norms)
    total: torch.Tensor = torch.linalg.vector_norm(every, norm_type)
    given: Norms = every  # the usual call: clip what is watched
    whole = same_objects(with_grad, monitor.parameters)
    if not whole:
        given = dict(zip(with_grad, norms))
        # What is watched, but for the frozen parameters (they have no gradient)?
        trains = [p for p in monitor.parameters if p.grad is not None and p.requires_grad]
        whole = {id(p) for p in with_grad} == set(map(id, trains))
    # The L2 total of what is watched is the gradient-norm gauge, for free; a subset's is not.
    l2_total = total if whole and norm_type == 2.0 else None
    health = monitor.collect(norms=given, total_norm=l2_total, **collect)
    # The total, when read with the update's own read-out.
    known = health.grad_norm if l2_total is not None and monitor.readout == "sync" else None
    # Only an unhealthy update can have had its gradients cleared by a "skip" policy.
    kept = (
        [i for i, p in enumerate(with_grad) if p.grad is not None]
        if health.status.level > 0
        else None
    )
    if kept is not None and len(kept) < len(with_grad):  # a "skip" policy cleared the gradients
        if not kept:
            return torch.tensor(0.0)
        with_grad = [with_grad[i] for i in kept]
        every = every[torch.tensor(kept, device=every.device)]
        total, known = torch.linalg.vector_norm(every, norm_type), None
    if error_if_nonfinite and _not_finite(total, known):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. gradtel has counted the non-finite values per layer; "
            "set error_if_nonfinite=False to clip anyway."
        )
    if known is not None and _scales_by_one(known, float(max_norm), total.dtype):
        return total  # torch would multiply every gradient by exactly 1: a pass saved
    torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total, foreach)
    return total


def _scales_by_one(total: float, max_norm: float, dtype: torch.dtype) -> bool:
    """Whether torch's coefficient, ``min(1, max_norm / (total + 1e-6))`` computed in
    ``dtype``, is exactly 1: true with a margin of its few rounding errors."""
    return math.isfinite(total) and max_norm >= (total + 1e-6) * (1 + 4 * torch.finfo(dtype).eps)


def _not_finite(total: torch.Tensor, known: float | None) -> bool:
    """Whether the total norm is not finite, without another host read when it is known."""
    if known is not None:
        return not math.isfinite(known)
    return bool(torch.logical_or(total.isnan(), total.isinf()))
