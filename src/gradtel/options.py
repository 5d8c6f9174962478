"""``GradMonitor``'s options, checked once when the monitor is made, and the checks of
``collect()``'s own arguments, made at each call."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from . import _checks
from .export.incidents import check_path
from .health import Thresholds
from .pipeline.layers import DEFAULT_MAX_LAYERS
from .pipeline.policy import Action, check_action
from .pipeline.readout import READOUTS, Readout

__all__ = [
    "DEFAULT_REPLICA_CHECK_EVERY",
    "MAX_LAYERS_LIMIT",
    "MonitorOptions",
    "check_collect",
    "check_norms",
    "check_step",
]

DEFAULT_REPLICA_CHECK_EVERY = 250
"""Updates between two replica checks: one hash of the parameters costs 1.0 to 1.8 times a
healthy ``collect()`` on CPU (``benchmarks/bench_fingerprint.py``), so one in 250 keeps the
check's average cost under 1% of ``collect()`` (0.4 to 0.7%)."""

MAX_LAYERS_LIMIT = 1998
"""Upper bound of ``max_layers``: each metric keeps one series per layer plus
the overflow layer below the OpenTelemetry SDK's per-metric limit of 2000,
past which the SDK would silently relabel series."""

LayerSeries = Literal["on_demand", "all"]


@dataclass(frozen=True)
class MonitorOptions:
    """What a :class:`~gradtel.GradMonitor` was asked to do (its keyword arguments).

    A wrong type raises ``TypeError``, a value out of range ``ValueError``.

    >>> MonitorOptions(sample_every=0)
    Traceback (most recent call last):
    ValueError: sample_every must be >= 1, got 0
    """

    thresholds: Thresholds = Thresholds()
    on_warning: Action = "warn"
    on_critical: Action = "warn"
    max_layers: int = DEFAULT_MAX_LAYERS
    layer_depth: int | None = None
    layer_series: LayerSeries = "on_demand"
    sample_every: int = 1
    on_error: Literal["warn", "raise"] = "warn"
    grad_norm: bool = False
    layer_norms: bool = False
    readout: Readout = "sync"
    incident_log: str | os.PathLike[str] | None = None
    replica_check_every: int | None = DEFAULT_REPLICA_CHECK_EVERY

    def __post_init__(self) -> None:
        if not isinstance(self.thresholds, Thresholds):
            raise TypeError(
                f"thresholds must be a gradtel.Thresholds, got {self.thresholds!r} "
                f"({type(self.thresholds).__name__})"
            )
        check_action("on_warning", self.on_warning)
        check_action("on_critical", self.on_critical)
        _checks.positive_int("max_layers", self.max_layers)
        if self.max_layers > MAX_LAYERS_LIMIT:
            raise ValueError(
                f"max_layers must be from 1 to {MAX_LAYERS_LIMIT}, got {self.max_layers}; "
                "use layer_depth= to group layers instead"
            )
        _checks.positive_int("layer_depth", self.layer_depth, allow_none=True)
        _checks.choice("layer_series", self.layer_series, ("on_demand", "all"))
        _checks.positive_int("sample_every", self.sample_every)
        _checks.on_error(self.on_error)
        _checks.flag("grad_norm", self.grad_norm)
        _checks.flag("layer_norms", self.layer_norms)
        _checks.choice("readout", self.readout, READOUTS)
        check_path("incident_log", self.incident_log)
        every = self.replica_check_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)):
            raise TypeError(
                "replica_check_every must be an int >= 0 (0 or None: no replica check), "
                f"got {every!r} ({type(every).__name__})"
            )
        if every is not None and every < 0:
            raise ValueError(
                f"replica_check_every must be >= 0 (0 or None: no replica check), got {every!r}"
            )
        if self.readout == "deferred":
            for name in ("on_warning", "on_critical"):
                action = getattr(self, name)
                if action in ("raise", "skip"):
                    raise ValueError(
                        f"{name}={action!r} must act on an update before optimizer.step(), but "
                        "readout='deferred' learns an update's health after collect() returns: "
                        f"use readout='sync' with {name}={action!r}, or {name}='warn' (or "
                        "'ignore') with readout='deferred'"
                    )

    @property
    def replica_check(self) -> int | None:
        """Updates between two replica checks, or None when the check is off."""
        return self.replica_check_every or None

    @property
    def sampled(self) -> bool:
        """Whether updates are left out (``sample_every > 1``)."""
        return self.sample_every > 1


def check_step(step: object) -> None:
    """A training step: an int >= 0, or None."""
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise TypeError(f"step must be an int >= 0 or None, got {step!r} ({type(step).__name__})")


def check_collect(step: object, scaler: object, loss: object, total_norm: object) -> bool:
    """Check ``collect()``'s arguments; whether ``scaler`` is an enabled GradScaler, whose
    overflow is then not an unhealthy update."""
    check_step(step)
    if loss is not None and not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss must be a tensor or None, got {loss!r} ({type(loss).__name__})")
    if total_norm is not None and not (
        isinstance(total_norm, torch.Tensor) and total_norm.numel() == 1
    ):
        raise TypeError(f"total_norm must be a one-element tensor or None, got {total_norm!r}")
    if scaler is None:
        return False
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"scaler must be a torch.amp.GradScaler or None, got {scaler!r} ({type(scaler).__name__})"
        )
    return scaler.is_enabled()


def check_norms(norms: object, watched: int) -> None:
    """``collect(norms=...)``: one norm per watched parameter, as a tensor or a mapping."""
    if norms is None:
        return
    allowed = (
        f"a 1-D tensor with one norm per watched parameter ({watched}, in the "
        "order of monitor.parameters) or a mapping from parameter to norm tensor"
    )
    if isinstance(norms, torch.Tensor):
        if norms.dim() != 1 or norms.numel() != watched:
            raise ValueError(f"norms must be {allowed}, got a tensor of shape {tuple(norms.shape)}")
    elif not isinstance(norms, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in norms.values()
    ):
        raise TypeError(f"norms must be {allowed}, got {type(norms).__name__}")
