"""The exporter-down alert: Prometheus cannot scrape a gradtel endpoint."""

from __future__ import annotations

from typing import Any

from ...metrics import ERRORS, UPDATES
from ..options import DOWN_ALERT, KitOptions, duration_seconds
from . import promql
from ._promtool import (
    GAP,
    INSTANCE,
    PCI,
    _check,
    _device,
    _gpu,
    _labels,
    _minutes,
    _rank,
    _scrapes,
    _series,
)
from .alert import Alert, Case

__all__ = ["ALERT"]


def _target(o: KitOptions, rank: int) -> str:
    """The labels of rank ``rank``'s scrape target: ``up`` has no rank (nor run)."""
    return _rank(o, rank).replace(f',rank="{rank}"', "")


def _down_alert(o: KitOptions, rank: int, run: str = "", gpu: str = "") -> dict[str, Any]:
    """The alert of rank ``rank``'s target, which gradtel served for ``run`` on ``gpu``."""
    instance = f"trainer-{rank}:9464"
    hardware = f" Hardware: {instance} (rank {rank}) on host node-{rank // 2}, {gpu} (PCI {PCI})."
    return {
        "exp_labels": {"job": o.job, "instance": instance, "severity": "warning"},
        "exp_annotations": {
            "summary": "gradtel metrics endpoint cannot be scraped",
            "description": (
                f"{o.job}: {instance} (rank {rank}){f' of run {run}' if run else ''} has not "
                "been scraped for 5m (up == 0): the training process died, hangs before "
                "serving, or its endpoint is unreachable. Unhealthy updates would not page."
                + (hardware if gpu else "")
            ),
            "runbook_url": o.runbook(DOWN_ALERT),
        },
    }


def _behaviours(o: KitOptions, case: Case) -> None:
    """One case per behaviour of the alert."""
    window = _minutes(duration_seconds(o.window, "window"))
    span = window + 10  # every case runs well past one window
    case(
        f"{DOWN_ALERT} fires for each rank of a run whose ranks all died, naming its rank and host",
        [_series("up", _target(o, r), f"1x3 0x{span}") for r in range(4)]
        + [_series(UPDATES, _rank(o, r), "0+60x3") for r in range(4)]
        + [_device(o, r, 3) for r in range(4)],
        [
            _check(7, DOWN_ALERT),
            _check(9, DOWN_ALERT, *(_down_alert(o, r, gpu=_gpu(r)) for r in range(4))),
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
    # Each target down 3m, the next one going down before the last comes back: the job
    # always has a target down, none of them for 5m.
    case(
        f"{DOWN_ALERT} does not fire for targets down 3m each, one after the other",
        [_series("up", _target(o, r), f"1x{2 * r} 0x2 1x{span}") for r in range(3)],
        [_check(m, DOWN_ALERT) for m in range(span)],
    )
    # Run A ended on purpose at minute 1, its target left in the scrape config (the runbook
    # says: silence it); at minute 20 rank 2 of run B dies: an alert of its own, which
    # Alertmanager notifies anew and which run A's silence does not cover.
    died = 20
    case(
        f"{DOWN_ALERT} fires anew for a target that dies while another one's alert fires",
        [
            _series("up", _target(o, 0), f"1 0x{died + 10}"),
            _series(UPDATES, _rank(o, 0, run="A"), "0"),
            _series("up", _target(o, 1), f"1x{died + 10}"),
            _series(UPDATES, _rank(o, 1, run="B"), f"0+60x{died + 10}"),
            _series("up", _target(o, 2), f"1x{died - 1} 0x10"),
            _series(UPDATES, _rank(o, 2, run="B"), f"0+60x{died - 1}"),
        ],
        [
            _check(5, DOWN_ALERT),
            _check(6, DOWN_ALERT, _down_alert(o, 0, "A")),
            _check(died + 4, DOWN_ALERT, _down_alert(o, 0, "A")),
            _check(died + 5, DOWN_ALERT, _down_alert(o, 0, "A"), _down_alert(o, 2, "B")),
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


def _down(selector: str) -> str:
    """The targets Prometheus cannot scrape, one alert each: ``for`` then times each
    target's own outage (targets down in turn never add up to one), and a target that
    goes down while another's alert fires is an alert of its own, so notified anew.
    Alertmanager groups them (by alertname, job and run; ``up`` has no run): the ranks of a
    job that died together are one notification."""
    return f"up{{{selector}}} == 0"


def rules(o: KitOptions) -> list[dict[str, Any]]:
    sel = o.job_selector
    # The alert's target, with the rank, run and hardware its gradtel series, still in
    # Prometheus for a while, tell: of a target down since then, or that never served, none.
    scope, within = "job=%[1]q,instance=%[2]q", "1h"
    down = (
        f"({_down(scope)}) * on (job, instance) group_left (rank, run) max by (job, instance, rank, run) "
        f"(last_over_time({UPDATES}{{{scope}}}[{within}])) or on (job, instance) ({_down(scope)})"
    )
    args = ("$labels.job", '(or $labels.instance "")')
    return [
        {
            "alert": DOWN_ALERT,
            "expr": f"{_down(sel)}\nor\nabsent(up{{{sel}}})",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "gradtel metrics endpoint cannot be scraped",
                "description": (
                    "{{ if $labels.instance }}{{ $labels.job }}: "
                    + promql.targets(
                        down, *args, then="{{ with $s.Labels.run }} of run {{ . }}{{ end }}"
                    )
                    + " has not been scraped for 5m (up == 0)"
                    f"{{{{ else }}}}No {o.job} target has been scraped for 5m{{{{ end }}}}: the "
                    "training process died, hangs before serving, or its endpoint is unreachable. "
                    "Unhealthy updates would not page."
                    + promql.hardware(o, down, *args, within=within)
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

**Meaning.** Prometheus could not scrape this gradtel endpoint (the alert's
`instance`) for 5 minutes (`up == 0`), or no target of job `{o.job}` is scraped at
all. While this fires, unhealthy updates of that process cannot page. The alert is
one per target, named with its rank and run, each timed by its own outage:
Alertmanager groups a job's into one notification (the ranks of a run that died
together), and a target that goes down while another's alert fires is notified
anew.

**Look first at** the training process (did it exit, crash, or get OOM-killed?),
its log for `gradtel cannot serve /metrics` (a port in use: see
`{ERRORS}{{stage="serve"}}` on another endpoint), and the scrape
target list in Prometheus (`/targets`).

**Do** restart the run or fix the endpoint (port, bind address: gradtel binds
`127.0.0.1` unless told `addr="0.0.0.0"`, which a Kubernetes pod needs).
Training that ended on purpose also fires this alert: silence it (by its
`instance`, so that it still fires for another run), or remove ended targets from
discovery.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
