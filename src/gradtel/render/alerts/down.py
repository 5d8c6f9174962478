"""The exporter-down alert: Prometheus cannot scrape a gradtel endpoint."""

from __future__ import annotations

from typing import Any

from ...metrics import ERRORS, UPDATES
from ..options import DOWN_ALERT, KitOptions, duration_seconds
from . import promql
from ._promtool import GAP, INSTANCE, _check, _labels, _minutes, _rank, _scrapes, _series
from .alert import Alert, Case

__all__ = ["ALERT"]


def _behaviours(o: KitOptions, case: Case) -> None:
    """One case per behaviour of the alert."""
    window = _minutes(duration_seconds(o.window, "window"))
    span = window + 10  # every case runs well past one window
    ranks = [_rank(o, r) for r in range(4)]
    case(
        f"{DOWN_ALERT} fires once for a run whose ranks all died, naming them",
        [_series("up", r.replace(f',rank="{i}"', ""), f"1x3 0x{span}") for i, r in enumerate(ranks)]
        + [_series(UPDATES, r, "0+60x3") for r in ranks],
        [
            _check(7, DOWN_ALERT),
            _check(
                9,
                DOWN_ALERT,
                {
                    "exp_labels": {"job": o.job, "severity": "warning"},
                    "exp_annotations": {
                        "summary": "gradtel metrics endpoint cannot be scraped",
                        "description": (
                            f"{o.job}: 4 targets have not been scraped for 5m (up == 0): "
                            + ", ".join(f"trainer-{r}:9464 (rank {r})" for r in range(4))
                            + ": the training process died, hangs before serving, or its "
                            "endpoint is unreachable. Unhealthy updates would not page."
                        ),
                        "runbook_url": o.runbook(DOWN_ALERT),
                    },
                },
            ),
        ],
    )
    case(
        f"{DOWN_ALERT} fires when no {o.job} target is scraped at all",
        [_series("up", '{job="other"}', f"1x{span}")],
        [
            _check(
                6,
                DOWN_ALERT,
                {
                    "exp_labels": {"job": o.job, "severity": "warning"},
                    "exp_annotations": {
                        "summary": "gradtel metrics endpoint cannot be scraped",
                        "description": (
                            f"No {o.job} target has been scraped for 5m: the training process "
                            "died, hangs before serving, or its endpoint is unreachable. "
                            "Unhealthy updates would not page."
                        ),
                        "runbook_url": o.runbook(DOWN_ALERT),
                    },
                },
            )
        ],
    )


def _histories(o: KitOptions, case: Case) -> None:
    """The exporter-down alert through failed scrapes, Prometheus restarts and restarts of ranks."""
    minutes = 30
    up = lambda *down, gaps=(): _scrapes(minutes, lambda m: int(m not in down), gaps=gaps)  # noqa: E731
    late = _labels(o).replace(INSTANCE, "trainer-1:9464")
    histories = {
        "a scrape fails": [_series("up", _labels(o), up(10))],
        f"Prometheus restarts, with a gap of {GAP}m": [
            _series("up", _labels(o), up(gaps=range(10, 10 + GAP)))
        ],
        "a process restarts": [_series("up", _labels(o), up(10, 11))],
        "a rank joins late": [_series("up", _labels(o), up()), _series("up", late, up(0, 1, 2, 3))],
    }
    for history, series in histories.items():
        case(
            f"{DOWN_ALERT} does not fire when {history}",
            series,
            [_check(m, DOWN_ALERT) for m in range(0, minutes, 2)],
        )


def rules(o: KitOptions) -> list[dict[str, Any]]:
    sel = o.job_selector
    # The endpoints of a run that died: the gradtel series, still in Prometheus for
    # a while, tell which rank each dead target was.
    down = f"(up{{job=%[1]q}} == 0) * on (job, instance) group_left (rank) max by (job, instance, rank) (last_over_time({UPDATES}{{job=%[1]q}}[1h])) or on (job, instance) (up{{job=%[1]q}} == 0)"
    return [
        {
            "alert": DOWN_ALERT,
            "expr": f"count by (job) (up{{{sel}}} == 0)\nor\nabsent(up{{{sel}}})",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "gradtel metrics endpoint cannot be scraped",
                "description": (
                    f"{{{{ with {promql.query('up{job=%q} == 0', '$labels.job')} }}}}{{{{ $labels.job }}}}: "
                    "{{ len . }} targets have not been scraped for 5m (up == 0): "
                    + promql.targets(down, "$labels.job")
                    + f"{{{{ else }}}}No {o.job} target has been scraped for 5m{{{{ end }}}}: the "
                    "training process died, hangs before serving, or its endpoint is unreachable. "
                    "Unhealthy updates would not page." + promql.hardware(o, down, "$labels.job")
                ),
                "runbook_url": o.runbook(DOWN_ALERT),
            },
        }
    ]


def cases(o: KitOptions, case: Case) -> None:
    _behaviours(o, case)
    _histories(o, case)


def runbook(o: KitOptions) -> str:
    return f"""## {DOWN_ALERT}

**Meaning.** Prometheus could not scrape a gradtel endpoint for 5 minutes
(`up == 0`), or no target of job `{o.job}` is scraped at all. While this fires,
unhealthy updates of that process cannot page.

**Look first at** the training process (did it exit, crash, or get OOM-killed?),
its log for `gradtel cannot serve /metrics` (a port in use: see
`{ERRORS}{{stage="serve"}}` on another endpoint), and the scrape
target list in Prometheus (`/targets`).

**Do** restart the run or fix the endpoint (port, bind address: gradtel binds
`127.0.0.1` unless told `addr="0.0.0.0"`, which a Kubernetes pod needs).
Training that ended on purpose also fires this alert: silence it, or remove
ended targets from discovery.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
