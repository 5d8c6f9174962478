"""Who hears of each due update once its health is known (``GradMonitor.subscribe``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

from ..health import GradHealth

__all__ = ["Listeners"]

Listener = Callable[[GradHealth], None]


class Listeners:
    """The listeners of one monitor, told in the order they subscribed. One that fails is
    handed to ``on_error``, and the others are still told."""

    def __init__(self, on_error: Callable[[Exception], None]) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._on_error = on_error

    def add(self, listener: Listener) -> Callable[[], None]:
        """Subscribe ``listener``; the function that unsubscribes it."""
        if not callable(listener):
            raise TypeError(
                f"listener must be callable with a GradHealth, got {listener!r} "
                f"({type(listener).__name__})"
            )
        with self._lock:
            self._listeners = [*self._listeners, listener]
        return partial(self._remove, listener)

    def _remove(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:  # once: a listener subscribed twice stays once
                kept = list(self._listeners)
                kept.remove(listener)
                self._listeners = kept

    def tell(self, health: GradHealth) -> None:
        for listener in self._listeners:  # a copy: a listener may unsubscribe while told
            try:
                listener(health)
            except Exception as exc:
                self._on_error(exc)
