"""Whether the weights have taken an unhealthy update, and the checkpoints refused for it.

One NaN update that reaches the optimizer poisons the weights for good (NaN
propagates through every later step), and a checkpoint saved after it is
poisoned too. Checkpoint rotation then deletes the healthy ones, and an
auto-resume reloads NaN. So gradtel remembers the first unhealthy update the
weights took, and the checkpoint guards (:meth:`GradMonitor.allow_checkpoint`,
the callbacks' ``protect_checkpoints``) refuse to save after it.

An unhealthy update does not reach the weights when the AMP ``GradScaler``
skips it (an overflow), when gradtel's ``"skip"`` policy clears its gradients,
or when ``"raise"`` stops the step. Updates gradtel did not scan (sampled out,
no gradients, a failed scan) change nothing here: they are not known healthy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .._ratelimit import RateLimitedLog
from ..health import GradHealth, Status
from .policy import Action

__all__ = ["WeightsHealth"]

logger = logging.getLogger("gradtel")


class WeightsHealth:
    """The weights' health as the scanned updates tell it."""

    def __init__(self) -> None:
        self.poisoned_by: GradHealth | None = None
        """The first unhealthy update the weights took, or None."""
        self.last_healthy_step: int | None = None
        """The step of the latest scanned update after which the weights were still healthy."""
        self._lock = threading.Lock()
        self._log = RateLimitedLog(logger)

    @property
    def healthy(self) -> bool:
        return self.poisoned_by is None

    def note(self, health: GradHealth, action: Action | None) -> None:
        """Take in one scanned update and the policy's action on it (None: healthy)."""
        if health.status is Status.UNKNOWN or action == "raise":  # not looked at, or no step taken
            return
        with self._lock:
            reached = (
                health.status is not Status.HEALTHY and not health.amp_overflow and action != "skip"
            )
            if reached and self.poisoned_by is None:
                self.poisoned_by = health
            elif self.poisoned_by is None:
                self.last_healthy_step = health.step

    def allow(
        self,
        step: int | None,
        *,
        all_ranks: bool,
        agree: Callable[[bool], bool | None],
        record: Callable[[bool], object],
    ) -> bool:
        """Whether a checkpoint may be saved now: while the weights are healthy (on every
        rank with ``all_ranks``: ``agree`` asks them, a collective; None when it could not).
        A refusal is logged; ``record`` counts the decision (``refused``)."""
        allowed = self.healthy
        if all_ranks:
            agreed = agree(allowed)
            allowed = allowed if agreed is None else agreed
        if not allowed:
            self.refuse(step)
        record(not allowed)
        return allowed

    def reset(self) -> None:
        with self._lock:
            self.poisoned_by = None

    def refuse(self, step: int | None) -> None:
        """Log why a checkpoint is not saved (at most once a minute)."""
        with self._lock:
            bad, last = self.poisoned_by, self.last_healthy_step
        at = "" if step is None else f" at step {step}"
        if bad is None:
            why = "another rank's weights took an unhealthy update (see its log)"
        else:
            since = (
                "no healthy step seen yet" if last is None else f"the last healthy step was {last}"
            )
            why = (
                f"the weights took the {bad.status.value} update of step {bad.step} "
                f"({bad.nan_total} NaN, {bad.inf_total} Inf); {since}"
            )
        self._log.log(
            "refused",
            logging.WARNING,
            "gradtel: not saving a checkpoint%s: %s. Resume from a checkpoint saved before the "
            "unhealthy update (counted in gradtel_refused_checkpoints_total)",
            at,
            why,
        )
