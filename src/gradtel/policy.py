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
from collections.abc import Iterable
from typing import Literal, get_args

import torch

from .health import GradHealth

__all__ = ["Action", "NonFiniteGradientError", "apply_action", "check_action"]

Action = Literal["ignore", "warn", "raise", "skip"]
ACTIONS: tuple[str, ...] = get_args(Action)

logger = logging.getLogger("gradtel")


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
    if not isinstance(value, str) or value not in ACTIONS:
        allowed = ", ".join(repr(a) for a in ACTIONS)
        raise ValueError(f"{argument} must be one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]


def apply_action(action: Action, health: GradHealth, params: Iterable[torch.Tensor]) -> None:
    """Carry out ``action`` for an unhealthy update."""
    if action == "ignore":
        return
    if action == "raise":
        raise NonFiniteGradientError(health)
    if action == "skip":
        for param in params:
            param.grad = None
        logger.warning("%s; gradients cleared, the next optimizer step is skipped", health.describe())
        return
    logger.warning("%s", health.describe())
