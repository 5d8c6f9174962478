"""Health classification: thresholds, status levels and the result of one update.

The thresholds come from the TELE-300/TELE-301 design records: an update is
healthy with no NaN/Inf, in the warning band with ``0 < n <= 5`` and critical
with ``n > 5``. NaN and Inf are judged separately and the worse status wins.
Every artifact gradtel renders derives its numbers from one ``Thresholds``.
"""

from __future__ import annotations

import enum
import math
import re
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from .pipeline.layers import ROOT_LAYER

__all__ = ["GradHealth", "HealthTally", "Status", "Thresholds"]


class Status(str, enum.Enum):
    """Health of one update; ``level`` is the number exported as ``gradtel_update_status``.

    UNKNOWN means gradtel did not look: nothing could be scanned, or the update
    was sampled out. It is never reported as healthy.
    """

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def level(self) -> int:
        """-1 unknown, 0 healthy, 1 warning, 2 critical."""
        return _LEVELS[self]

    def __str__(self) -> str:
        return self.value


_LEVELS = {Status.UNKNOWN: -1, Status.HEALTHY: 0, Status.WARNING: 1, Status.CRITICAL: 2}


@dataclass(frozen=True)
class Thresholds:
    """Per-update counts above which an update is a warning or critical.

    Args:
        warning: An update is at least WARNING when a count is ``> warning``.
        critical: An update is CRITICAL when a count is ``> critical``.

    Raises:
        TypeError: a threshold is not an int.
        ValueError: ``warning < 0`` or ``warning > critical``.

    >>> t = Thresholds()
    >>> [t.classify(n).value for n in (0, 1, 5, 6)]
    ['healthy', 'warning', 'warning', 'critical']
    """

    warning: int = 0
    critical: int = 5

    def __post_init__(self) -> None:
        for name in ("warning", "critical"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"Thresholds.{name} must be an int count, got {value!r} "
                    f"({type(value).__name__}); allowed: integers with 0 <= warning <= critical"
                )
        if self.warning < 0:
            raise ValueError(
                f"Thresholds.warning must be >= 0, got {self.warning}; "
                "allowed: integers with 0 <= warning <= critical"
            )
        if self.warning > self.critical:
            raise ValueError(
                f"Thresholds.warning ({self.warning}) must be <= Thresholds.critical "
                f"({self.critical}); allowed: integers with 0 <= warning <= critical"
            )

    def classify(self, count: int) -> Status:
        """Status of one per-update count (NaN or Inf, whole model)."""
        if count > self.critical:
            return Status.CRITICAL
        if count > self.warning:
            return Status.WARNING
        return Status.HEALTHY


def _worst(a: Status, b: Status) -> Status:
    return a if a.level >= b.level else b


@dataclass(frozen=True)
class GradHealth:
    """Non-finite gradient counts of one update, per layer and for the whole model.

    ``nan_by_layer`` and ``inf_by_layer`` hold only layers with a count above 0.
    The totals and statuses are worked out once, on first use: recording and
    acting on an unhealthy update ask for them many times.
    ``status`` is UNKNOWN when the update was not looked at (``sampled`` is
    False or ``unscanned`` says why), never HEALTHY.

    >>> h = GradHealth(nan_by_layer={"fc1": 3}, inf_by_layer={"fc2": 7}, scanned=4)
    >>> h.nan_total, h.inf_total, h.status.value
    (3, 7, 'critical')
    """

    nan_by_layer: Mapping[str, int] = field(default_factory=dict)
    inf_by_layer: Mapping[str, int] = field(default_factory=dict)
    scanned: int = 0
    """Gradient tensors counted in this update."""
    skipped: int = 0
    """Watched parameters left out of this update: frozen, or no gradient."""
    thresholds: Thresholds = field(default_factory=Thresholds)
    step: int = 0
    """The training step this update makes: given to ``collect(step=...)``, counted from
    the optimizer's steps when attached, the framework's global step in the callbacks;
    otherwise the monitor's own count of updates, from 1."""
    sampled: bool = True
    """False when ``sample_every`` left this update unscanned: its counts are
    zero because nothing was looked at, not because the gradients are healthy."""
    pending: bool = False
    """True when ``collect()`` with ``readout="deferred"`` had no finished update to
    return yet: nothing is known so far."""
    grad_norm: float | None = None
    """The L2 norm of all gradients of this update, when computed: with
    ``GradMonitor(grad_norm=True)``, or from :func:`gradtel.clip_grad_norm_` (``norm_type=2``)."""
    layer_grad_norms: Mapping[str, float] | None = None
    """The L2 norm of each layer's gradients in this update, with ``GradMonitor(layer_norms=True)``."""
    first_bad_layer: str | None = None
    """Of the layers with NaN or Inf, the first whose gradient backward produced."""
    first_nan_layer: str | None = None
    """Of the layers with NaN, the first in backward order."""
    first_inf_layer: str | None = None
    """Of the layers with ±Inf, the first in backward order."""
    unscanned: str | None = None
    """Why nothing was scanned in this due update (``"no_gradients"`` or
    ``"scan_error"``); None when it was scanned."""
    amp_overflow: bool = False
    """The update's non-finite values are an overflow that the AMP ``GradScaler``
    handles by skipping the optimizer step: counted as skipped, not unhealthy."""
    local_nan_total: int | None = None
    """NaN values in this rank's own gradients before the cross-rank reduction
    (DDP); None when gradtel does not see them."""
    local_inf_total: int | None = None
    """±Inf values in this rank's own gradients before the cross-rank reduction."""
    local_grad_norm: float | None = None
    """The L2 norm of this rank's own gradients before the cross-rank reduction (NaN
    when they held a NaN); None when gradtel does not see them, or none were reduced."""

    loss_scale: float | None = None
    """The AMP ``GradScaler``'s loss scale at this update, when ``collect(scaler=...)`` had one."""

    loss_finite: bool | None = None
    """Whether the loss passed to ``collect(loss=...)`` was finite; False means the
    NaN or Inf was already there in the forward pass. None when no loss was given."""

    @property
    def originated_here(self) -> bool:
        """This rank's own gradients held NaN or ±Inf before the cross-rank reduction."""
        return bool(self.local_nan_total or self.local_inf_total)

    @cached_property
    def nan_total(self) -> int:
        """NaN gradient values in the whole model (TELE-300 ``nan_grad_count``)."""
        return sum(self.nan_by_layer.values())

    @cached_property
    def inf_total(self) -> int:
        """±Inf gradient values in the whole model (TELE-301 ``inf_grad_count``)."""
        return sum(self.inf_by_layer.values())

    @cached_property
    def nan_status(self) -> Status:
        return self.thresholds.classify(self.nan_total)

    @cached_property
    def inf_status(self) -> Status:
        return self.thresholds.classify(self.inf_total)

    @cached_property
    def status(self) -> Status:
        """Worse of the NaN and Inf statuses; UNKNOWN when the update was not looked at.
        An AMP overflow keeps the status of its counts: :attr:`amp_overflow` says that the
        scaler skips it, so that gradtel records and acts on it as no unhealthy update."""
        if not self.sampled or self.pending or self.unscanned is not None:
            return Status.UNKNOWN
        if not (
            self.nan_by_layer or self.inf_by_layer
        ):  # the usual update, asked several times each
            return Status.HEALTHY
        return _worst(self.nan_status, self.inf_status)

    def scalars(self, prefix: str = "gradtel/") -> dict[str, float]:
        """This update as finite numbers for a training logger (TensorBoard, W&B, MLflow, CSV).

        ``<prefix>nan_total``, ``<prefix>inf_total``, ``<prefix>status`` (the level of
        ``gradtel_update_status``: -1 unknown, 0 healthy, 1 warning, 2 critical),
        ``<prefix>grad_norm`` when computed and finite, ``<prefix>nan/<layer>`` and
        ``<prefix>inf/<layer>`` for the layers with a count, and ``<prefix>unscanned``
        (1) for an update not looked at. Nothing non-finite: loggers
        drop NaN from their charts. See :class:`HealthTally` for several updates.

        Raises:
            TypeError: ``prefix`` is not a str.

        >>> GradHealth(nan_by_layer={"fc1": 3}, grad_norm=float("nan")).scalars()
        {'gradtel/nan_total': 3.0, 'gradtel/inf_total': 0.0, 'gradtel/status': 1.0, 'gradtel/nan/fc1': 3.0}
        """
        tally = HealthTally()
        tally.add(self)
        return tally.take(prefix)

    def top_layers(self, k: int = 3) -> list[tuple[str, int]]:
        """The ``k`` layers with the most non-finite values, most first."""
        totals: dict[str, int] = dict(self.nan_by_layer)
        for layer, n in self.inf_by_layer.items():
            totals[layer] = totals.get(layer, 0) + n
        return sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:k]

    def describe(self) -> str:
        """One log line: status, counts and the top offending layers.

        >>> GradHealth(nan_by_layer={"fc1": 3}, step=7).describe()
        'gradtel: step 7 is warning: NaN=3 Inf=0 (warning > 0, critical > 5); top layers: fc1 (3)'
        """
        if self.status is Status.UNKNOWN:
            why = "sampled out" if not self.sampled else (self.unscanned or "").replace("_", " ")
            if self.pending:
                return f"gradtel: step {self.step} is unknown: its read-out has not finished yet"
            return f"gradtel: step {self.step} is unknown: not scanned ({why})"
        line = (
            f"gradtel: step {self.step} is {self.status.value}: "
            f"NaN={self.nan_total} Inf={self.inf_total} "
            f"(warning > {self.thresholds.warning}, critical > {self.thresholds.critical})"
        )
        top = self.top_layers()
        if top:
            line += "; top layers: " + ", ".join(f"{layer} ({n})" for layer, n in top)
        for kind, first in (("NaN", self.first_nan_layer), ("Inf", self.first_inf_layer)):
            if first is not None:
                line += f"; first {kind} layer in backward order: {first}"
        if self.originated_here:
            line += (
                f"; this rank's own gradients held NaN={self.local_nan_total} "
                f"Inf={self.local_inf_total} before the cross-rank reduction"
            )
        if self.loss_finite is False:
            line += "; the loss was already non-finite: it entered in the forward pass"
        if self.amp_overflow:
            line += "; an AMP overflow: the GradScaler skips this step"
        return line


_KEPT_IN_LOGGER_KEYS = re.compile(r"[\w.\- ]")
"""Characters a layer keeps in a logger's key: MLflow refuses parentheses, and a ``/``
would make a layer's key a path of several parts."""


def logger_key(layer: str) -> str:
    """The part of a logger's key that names ``layer``, one per layer (no two layers share
    a key) and accepted by MLflow: ``(root)`` is ``_root_``; another character than a
    letter, digit, ``_``, ``-``, ``.`` or space, and a leading ``.``, is written as
    ``:<hex code>:`` (so a ``:`` starts an escape only); a layer named ``_root_`` is
    ``:5f:root_``.

    >>> logger_key("(root)"), logger_key("blocks.a b"), logger_key("enc/fc:1")
    ('_root_', 'blocks.a b', 'enc:2f:fc:3a:1')
    """
    if layer == ROOT_LAYER:
        return "_root_"
    key = "".join(
        c if _KEPT_IN_LOGGER_KEYS.fullmatch(c) and not (i == 0 and c == ".") else f":{ord(c):x}:"
        for i, c in enumerate(layer)
    )
    return ":5f:root_" if key == "_root_" else key


class HealthTally:
    """The updates since a logger last wrote, summed into one set of finite numbers.

    A logger writes every few steps; the updates in between are not lost: their counts
    are summed per layer, the status is the worst of the updates looked at (-1 when none
    was), the norm is the latest finite one, and ``<prefix>unscanned`` says how many were not
    looked at (sampled out, no gradients, a failed scan): their values are in no count. An
    AMP overflow the ``GradScaler`` skips adds no counts (it is no unhealthy update) but
    ``<prefix>amp_overflows``. Updates may be
    added from another thread (a deferred read-out is published by the endpoint's scrape).

    >>> tally = HealthTally()
    >>> tally.add(GradHealth(nan_by_layer={"fc1": 3}, step=1))
    >>> tally.add(GradHealth(nan_by_layer={"fc1": 1}, inf_by_layer={"(root)": 9}, step=2))
    >>> tally.take()  # doctest: +NORMALIZE_WHITESPACE
    {'gradtel/nan_total': 4.0, 'gradtel/inf_total': 9.0, 'gradtel/status': 2.0,
     'gradtel/nan/fc1': 4.0, 'gradtel/inf/_root_': 9.0}
    >>> tally.take()  # nothing since
    {}
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._updates = 0
        self._nan: Counter[str] = Counter()
        self._inf: Counter[str] = Counter()
        self._level = Status.UNKNOWN.level
        self._grad_norm: float | None = None
        self._amp_overflows = 0
        self._unscanned = 0

    def __len__(self) -> int:
        """Updates added since the last :meth:`take`."""
        return self._updates

    def add(self, health: GradHealth) -> None:
        """Add one update's health (its read-out is done: no device is waited for)."""
        with self._lock:
            self._updates += 1
            if health.amp_overflow:  # skipped by the scaler: nothing reached the weights
                self._amp_overflows += 1
                self._level = max(self._level, Status.HEALTHY.level)
            else:
                if health.nan_by_layer or health.inf_by_layer:  # not the usual update
                    self._nan.update(health.nan_by_layer)
                    self._inf.update(health.inf_by_layer)
                self._level = max(self._level, health.status.level)
                self._unscanned += health.status is Status.UNKNOWN
            if health.grad_norm is not None and math.isfinite(health.grad_norm):
                self._grad_norm = health.grad_norm

    def take(self, prefix: str = "gradtel/") -> dict[str, float]:
        """The numbers of the updates added since the last call (``{}`` when none was),
        named as in :meth:`GradHealth.scalars`; the tally starts again from zero.

        Raises:
            TypeError: ``prefix`` is not a str.
        """
        if not isinstance(prefix, str):
            raise TypeError(
                f"prefix must be a str such as 'gradtel/', got {prefix!r} ({type(prefix).__name__})"
            )
        with self._lock:
            if not self._updates:
                return {}
            found = {
                f"{prefix}nan_total": float(self._nan.total()),
                f"{prefix}inf_total": float(self._inf.total()),
                f"{prefix}status": float(self._level),
            }
            if self._grad_norm is not None:
                found[f"{prefix}grad_norm"] = self._grad_norm
            if self._amp_overflows:
                found[f"{prefix}amp_overflows"] = float(self._amp_overflows)
            if self._unscanned:
                found[f"{prefix}unscanned"] = float(self._unscanned)
            for kind, counts in (("nan", self._nan), ("inf", self._inf)):
                for layer, n in counts.items():
                    found[f"{prefix}{kind}/{logger_key(layer)}"] = float(n)
            self._clear()
            return found
