"""What to do with an unhealthy update: ignore, warn, raise or skip it.

``"skip"`` makes the update harmless for the ``optimizer.step()`` that follows
by setting every watched parameter's ``.grad`` to ``None``. PyTorch optimizers
leave a parameter whose gradient is ``None`` untouched: no weight change, no
weight decay, and no momentum or Adam moment/step-count update. Learning-rate
schedulers still advance, and gradients of parameters gradtel does not watch
(frozen when the monitor was created) are left as they are.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Literal, get_args

import torch

from .. import _checks
from ..health import GradHealth, Status

__all__ = ["WARN_INTERVAL", "Action", "NonFiniteGradientError", "Policy", "check_action"]

Action = Literal["ignore", "warn", "raise", "skip"]
ACTIONS: tuple[str, ...] = get_args(Action)

logger = logging.getLogger("gradtel")

WARN_INTERVAL = 60.0
"""Seconds between two log lines of the "warn" and "skip" actions for one status: a
diverged run logs its first warning and first critical update at once, then at most
one line a minute each, with the count of updates not logged since."""


class NonFiniteGradientError(RuntimeError):
    """Raised by ``collect()`` for an unhealthy update when the policy is ``"raise"``.

    Attributes:
        health: The :class:`~gradtel.GradHealth` of the offending update.
    """

    def __init__(self, health: GradHealth) -> None:
        super().__init__(health.describe())
        self.health = health


def check_action(argument: str, value: object) -> Action:
    """Validate a policy option and return it."""
    return _checks.choice(argument, value, ACTIONS)  # type: ignore[arg-type]


class Policy:
    """The actions for warning and critical updates, and their rate-limited log.

    Args:
        on_warning: Action for an update in the warning band.
        on_critical: Action for a critical update.
        clock: Monotonic seconds; the interval between two log lines is measured on it.

    Raises:
        ValueError: an action is not one of ``ignore``, ``warn``, ``raise``, ``skip``.
    """

    def __init__(
        self,
        on_warning: object,
        on_critical: object,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._actions = {
            Status.WARNING: check_action("on_warning", on_warning),
            Status.CRITICAL: check_action("on_critical", on_critical),
        }
        self.interval = WARN_INTERVAL
        self.clock = clock
        self._last_line = {Status.WARNING: -math.inf, Status.CRITICAL: -math.inf}
        self._unlogged = {Status.WARNING: 0, Status.CRITICAL: 0}
        self._lock = threading.Lock()

    def action(self, health: GradHealth) -> Action | None:
        """The action for ``health``; None for a healthy or unknown update."""
        return self._actions.get(health.status)

    def apply(self, health: GradHealth, params: Iterable[torch.Tensor]) -> None:
        """Carry out the action for an unhealthy update.

        Raises:
            NonFiniteGradientError: the action is ``"raise"``.
        """
        action = self.action(health)
        if action is None or action == "ignore":
            return
        if action == "raise":
            raise NonFiniteGradientError(health)
        if action == "skip":
            for param in params:
                param.grad = None
            self._log(
                health,
                f"{health.describe()}; gradients cleared, the next optimizer step is skipped",
            )
            return
        self._log(health, health.describe())

    def _log(self, health: GradHealth, line: str) -> None:
        """The first warning and the first critical update at once, then one line a minute each."""
        status, now = health.status, self.clock()
        with self._lock:
            if now - self._last_line[status] < self.interval:
                self._unlogged[status] += 1
                return
            unlogged, self._unlogged[status], self._last_line[status] = (
                self._unlogged[status],
                0,
                now,
            )
        if unlogged:
            line += f" ({unlogged} more {status.value} updates since the last line)"
        logger.warning("%s", line)
