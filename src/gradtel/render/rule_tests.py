"""``promtool test rules`` cases for the rendered rules, one case per behaviour.

Time runs from 0, with one scrape and one evaluation a minute (a case with the scrapes of
several ranks has one at each scrape interval); the window, the stall time and the
annotation texts all come from the same :class:`KitOptions` as the rules. Besides the
behaviours, every alert goes through the histories of a real deployment: failed
scrapes (staleness markers), Prometheus gaps (no samples), restarts of processes and
ranks, rollbacks and ranks joining late. It fires once for each new incident, never
for an old one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .alerts import ALERTS
from .options import KitOptions

__all__ = ["rule_tests"]


def rule_tests(o: KitOptions) -> dict[str, Any]:
    """The ``promtool test rules`` file for the rules rendered from ``o``: every alert's cases."""
    cases: list[dict[str, Any]] = []

    def case(
        name: str,
        series: list[dict[str, str]],
        checks: list[dict[str, Any]],
        interval: str = "1m",
        *,
        recorded: Sequence[dict[str, Any]] = (),
    ) -> None:
        cases.append(
            {"name": name, "interval": interval, "input_series": series, "alert_rule_test": checks}
            | ({"promql_expr_test": list(recorded)} if recorded else {})
        )

    for alert in ALERTS:
        alert.cases(o, case)
    return {"rule_files": ["gradtel-rules.yml"], "evaluation_interval": "1m", "tests": cases}
