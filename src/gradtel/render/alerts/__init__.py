"""The kit's alerts, one module each: its rules, its promtool cases and its runbook section
live together, and the rule file, the rule tests and the runbook iterate over
:data:`ALERTS`. The PromQL they share is in :mod:`.promql`."""

from __future__ import annotations

from . import (
    amp_collapse,
    amp_skips,
    crash,
    disagree,
    down,
    norm_spike,
    nothing_scanned,
    replicas,
    stalled,
    unhealthy,
)
from .alert import Alert, Case

__all__ = ["ALERTS", "Alert", "Case"]

ALERTS: tuple[Alert, ...] = (
    unhealthy.ALERT,
    crash.ALERT,
    down.ALERT,
    nothing_scanned.ALERT,
    amp_skips.ALERT,
    amp_collapse.ALERT,
    norm_spike.ALERT,
    replicas.ALERT,
    disagree.ALERT,
    stalled.ALERT,
)
"""In the order of the rule file, the rule tests and the runbook."""
