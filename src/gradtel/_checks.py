"""Argument checks shared by several entry points: one message for one rule."""

from __future__ import annotations

from typing import Literal

__all__ = ["on_error", "seconds"]


def on_error(value: object) -> Literal["warn", "raise"]:
    """The ``on_error`` option: ``"warn"`` (log, count, go on) or ``"raise"``."""
    if value not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', got {value!r}")
    return value


def seconds(argument: str, value: object, *, zero_ok: bool = False) -> float:
    """A duration in seconds: a number > 0 (>= 0 with ``zero_ok``).

    >>> seconds("interval", 2)
    2.0
    """
    bound = ">= 0" if zero_ok else "> 0"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (value >= 0 if zero_ok else value > 0)
    ):
        raise ValueError(f"{argument} must be a number of seconds {bound}, got {value!r}")
    return float(value)
