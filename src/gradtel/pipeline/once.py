"""One update per backward pass, whoever collects it.

``attach()`` collects at the optimizer's step (a framework callback at its own), and the
user may still call ``collect()`` or ``gradtel.clip_grad_norm_`` around that step. While
such a collector sees the backward passes end, the first collection after a pass counts
the update and the others give its health again, counting nothing. Gradients given anew
without a pass (another tensor) are an update of their own, and so is an optimizer's
step with no pass since its own last one (a step without gradients, not looked at).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ..health import GradHealth

__all__ = ["OncePerUpdate"]


class OncePerUpdate:
    """Which collection counts an update.

    Args:
        first_grad: The gradient of the first watched parameter that trains, now: held
            weakly, it tells gradients given anew from those collected.
    """

    def __init__(self, first_grad: Callable[[], torch.Tensor | None]) -> None:
        self._first_grad = first_grad
        self.watched = False
        """A collector sees the backward passes end."""
        self._collected = False
        """Collected since the latest pass."""
        self._by: int | None = None
        """The optimizer (its id) whose step made the latest update; None: the user."""
        self._health: GradHealth | None = None
        self._grad: weakref.ref[torch.Tensor] | None = None

    def pass_ended(self) -> None:
        """A backward pass ended (or a collector began watching): a new update."""
        self.watched, self._collected = True, False

    def unwatch(self) -> None:
        self.watched = False

    def repeated(self) -> GradHealth | None:
        """The health to give again, or None when this collection counts the update."""
        if not (self.watched and self._collected) or self._health is None:
            return None
        grad, held = self._first_grad(), self._grad
        same = grad is None if held is None else (grad is not None and held() is grad)
        return self._health if same else None

    def due_at_step(self, by: int) -> bool:
        """Whether optimizer ``by``'s step collects: not when another collected since the
        latest pass (the user, or another optimizer of the model)."""
        if self.watched and self._collected and self._by != by:
            return False
        self._collected = False  # an update of its own, even with no pass since
        return True

    def counting(self) -> bool:
        """A collection that counts begins; returns what :meth:`failed` puts back."""
        was = self._collected
        self._collected, self._by, self._health = True, None, None
        if self.watched:  # else nothing is repeated: no need to read a gradient
            self._mark()
        return was

    def counted(self, health: GradHealth) -> None:
        self._health = health

    def made_by(self, by: int) -> None:
        """The update counted last was optimizer ``by``'s step's."""
        self._by = by

    def failed(self, was: bool) -> None:
        """Nothing was counted: the next collection counts the update."""
        self._collected = was

    def stepped(self, by: int) -> None:
        """After optimizer ``by``'s step: when it counted the update and passes ended since
        (an LBFGS step's closure), the gradients now are that update's."""
        if self._by == by and not self._collected:
            self._collected = True
            self._mark()

    def _mark(self) -> None:
        grad = self._first_grad()
        self._grad = None if grad is None else weakref.ref(grad)
