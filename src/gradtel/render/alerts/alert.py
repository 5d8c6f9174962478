"""One alert of the kit: its rules, its promtool cases and its runbook section together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..options import KitOptions

__all__ = ["Alert", "Case"]

Case = Callable[..., None]
"""Adds one ``promtool test rules`` case: name, input series, alert checks, interval, and
``recorded=``: checks of the series its recording rules record (``promql_expr_test``)."""


@dataclass(frozen=True)
class Alert:
    """What changing one alert touches, each rendered from the same :class:`KitOptions`."""

    rules: Callable[[KitOptions], list[dict[str, Any]]]
    """Its rules, in the order of the rule file: the recording rules it reads come first,
    in its group, which evaluates them in order at one time."""
    cases: Callable[[KitOptions, Case], None]
    """Adds its ``promtool`` cases, one per behaviour and per history of a deployment."""
    runbook: Callable[[KitOptions], str]
    """Its runbook section(s), under an anchor named after the alert."""
