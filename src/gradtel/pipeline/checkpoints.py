"""Whether the weights have taken an unhealthy update, and the checkpoints refused for it.

One NaN update that reaches the optimizer poisons the weights for good (NaN
propagates through every later step), and a checkpoint saved after it is
poisoned too. Checkpoint rotation then deletes the healthy ones, and an
auto-resume reloads NaN. So gradtel remembers the first unhealthy update the
weights took, and the checkpoint guards (:meth:`GradMonitor.allow_checkpoint`,
the callbacks' ``protect_checkpoints``) refuse to save after it. Any NaN or Inf
counts, whatever the alert thresholds: a count under the warning threshold
poisons the weights all the same.

An unhealthy update does not reach the weights when the AMP ``GradScaler``
skips it (an overflow), when gradtel's ``"skip"`` policy clears its gradients,
or when ``"raise"`` stops the step. Updates gradtel did not scan (sampled out,
no gradients, a failed scan) are not known healthy: so the guards also look at
the weights themselves before a save, one pass over them, far less than writing
them, which also catches NaN the optimizer made from finite gradients.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch

from .._ratelimit import RateLimitedLog
from ..health import GradHealth, Status
from .policy import Action
from .scan import count_nonfinite, countable_values

__all__ = ["WeightsHealth"]

logger = logging.getLogger("gradtel")


class WeightsHealth:
    """The weights' health as the scanned updates tell it."""

    def __init__(self) -> None:
        self.poisoned_by: GradHealth | None = None
        """The first unhealthy update the weights took, or None."""
        self.nonfinite_weights: tuple[int, int] | None = None
        """The NaN and Inf values a look at the weights found, with no unhealthy update
        seen, or None."""
        self.last_healthy_step: int | None = None
        """The step of the latest scanned update after which the weights were still healthy."""
        self._lock = threading.Lock()
        self._log = RateLimitedLog(logger)

    @property
    def healthy(self) -> bool:
        return self.poisoned_by is None and self.nonfinite_weights is None

    def note(self, health: GradHealth, action: Action | None) -> None:
        """Take in one scanned update and the policy's action on it (None: healthy)."""
        if health.status is Status.UNKNOWN or action == "raise":  # not looked at, or no step taken
            return
        with self._lock:
            nonfinite = health.nan_total or health.inf_total  # under the thresholds too
            reached = bool(nonfinite) and not health.amp_overflow and action != "skip"
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

    def look_at(self, weights: Sequence[torch.Tensor]) -> None:
        """Count NaN and Inf in the weights themselves, once they seem healthy."""
        if not self.healthy:
            return
        with torch.no_grad():
            held = [w.detach() for w in weights if w.device.type != "meta"]  # meta: no values
            values = [v for w in held if (v := countable_values(w)) is not None]
            found = count_nonfinite(values)
        if found:
            with self._lock:
                self.nonfinite_weights = (
                    sum(nan for nan, _ in found.values()),
                    sum(inf for _, inf in found.values()),
                )

    def reset(self) -> None:
        with self._lock:
            self.poisoned_by = self.nonfinite_weights = None

    def refuse(self, step: int | None) -> None:
        """Log why a checkpoint is not saved (at most once a minute)."""
        with self._lock:
            bad, weights, last = self.poisoned_by, self.nonfinite_weights, self.last_healthy_step
        at = "" if step is None else f" at step {step}"
        since = "no healthy step seen yet" if last is None else f"the last healthy step was {last}"
        if bad is not None:
            what = (
                f"the {bad.status.value} update"
                if bad.status is not Status.HEALTHY
                else "an update under the warning threshold"
            )
            why = f"the weights took {what} of step {bad.step} ({bad.nan_total} NaN, {bad.inf_total} Inf); {since}"
        elif weights is not None:
            why = (
                f"the weights hold {weights[0]} NaN and {weights[1]} Inf values, from an update "
                f"gradtel did not scan or from the optimizer itself; {since}"
            )
        else:
            why = "another rank's weights took an unhealthy update (see its log)"
        self._log.log(
            "refused",
            logging.WARNING,
            "gradtel: not saving a checkpoint%s: %s. Resume from a checkpoint saved before the "
            "unhealthy update (counted in gradtel_refused_checkpoints_total)",
            at,
            why,
        )
