"""Argument checks shared by several entry points: one message for one rule.

A value of the wrong type raises ``TypeError``, a value of the right type out of what
is allowed raises ``ValueError``; both name the argument, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar

__all__ = ["choice", "flag", "on_error", "positive_int", "seconds"]

T = TypeVar("T", bound=str)


def _got(value: object) -> str:
    return f"got {value!r} ({type(value).__name__})"


def flag(argument: str, value: object) -> bool:
    """A ``True``/``False`` option (not 0 or 1, which usually mean a count).

    >>> flag("grad_norm", 1)
    Traceback (most recent call last):
    TypeError: grad_norm must be True or False, got 1 (int)
    """
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be True or False, {_got(value)}")
    return value


def positive_int(argument: str, value: object, *, allow_none: bool = False) -> int | None:
    """An int >= 1 (or None with ``allow_none``); a bool is not taken for an int."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        allowed = "a positive int or None" if allow_none else "a positive int"
        raise TypeError(f"{argument} must be {allowed}, {_got(value)}")
    if value < 1:
        raise ValueError(f"{argument} must be >= 1, got {value!r}")
    return value


def choice(argument: str, value: object, allowed: Sequence[T]) -> T:
    """One of the strings ``allowed``.

    >>> choice("layer_series", "some", ("on_demand", "all"))
    Traceback (most recent call last):
    ValueError: layer_series must be 'on_demand' or 'all', got 'some'
    """
    quoted = [repr(a) for a in allowed]
    names = " or ".join(quoted) if len(quoted) == 2 else "one of " + ", ".join(quoted)
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be {names}, {_got(value)}")
    if value not in allowed:
        raise ValueError(f"{argument} must be {names}, got {value!r}")
    return value  # type: ignore[return-value]


def on_error(value: object) -> Literal["warn", "raise"]:
    """The ``on_error`` option: ``"warn"`` (log, count, go on) or ``"raise"``."""
    return choice("on_error", value, ("warn", "raise"))


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
