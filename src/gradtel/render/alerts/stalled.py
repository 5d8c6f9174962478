"""The stall alert: the endpoint is up but no update arrives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...metrics import LAST_UPDATE_TIMESTAMP
from ..options import DOWN_ALERT, STALLED_ALERT, KitOptions, duration_seconds, duration_text
from . import promql
from ._promtool import INSTANCE, Value, _check, _labels, _life, _lives, _minutes, _scrapes, _series
from .alert import Alert, Case

__all__ = ["ALERT"]


def _stalled(o: KitOptions, selector: str) -> str:
    """Processes with no update for ``stall_after``: their last update time is the one they
    showed more than that (and a scrape interval) ago. It is compared with itself, never
    with Prometheus' clock: the training host's clock may be off. It is read through failed
    scrapes and gaps up to half the stall time; a process scraped last longer ago is down
    (GradtelExporterDown), and the last scrape of one that crashed, just after its last
    update, never reads as a stall."""
    stall = duration_seconds(o.stall_after, "stall_after")
    last = f"last_over_time({LAST_UPDATE_TIMESTAMP}{{{selector}}}[{duration_text(stall // 2)}]"
    before = duration_text(stall + duration_seconds(o.scrape_interval))
    return f"{last}) == {last} offset {before})"


def _stalled_alert(o: KitOptions) -> dict[str, Any]:
    return {
        "exp_labels": {"job": o.job, "severity": "warning"},
        "exp_annotations": {
            "summary": "Training is up but gradtel sees no update",
            "description": (
                f"{o.job}: 1 targets are up but have had no update (no collect() call) "
                f"for more than {o.stall_after}: {INSTANCE}. Training hangs, waits on "
                "data or on another rank, or collect() is no longer called."
            ),
            "runbook_url": o.runbook(STALLED_ALERT),
        },
    }


def _behaviours(o: KitOptions, case: Case) -> None:
    """One case per behaviour of the alert."""
    up_labels = _labels(o)
    stall = duration_seconds(o.stall_after, "stall_after")
    last_update = 5 * 60  # updates every minute until 5m, then none
    fires_at = _minutes(last_update + stall + 1)
    stalled_span = fires_at + 3
    timestamps = f"0+60x5 {last_update}x{stalled_span}"
    case(
        f"{STALLED_ALERT} fires when no update arrives for {o.stall_after} while up",
        [
            _series(LAST_UPDATE_TIMESTAMP, up_labels, timestamps),
            _series("up", up_labels, f"1x{stalled_span + 5}"),
        ],
        [
            _check(fires_at - 1, STALLED_ALERT),
            _check(fires_at, STALLED_ALERT, _stalled_alert(o)),
        ],
    )
    case(
        f"{STALLED_ALERT} does not fire while updates keep arriving",
        [
            _series(LAST_UPDATE_TIMESTAMP, up_labels, f"0+60x{stalled_span}"),
            _series("up", up_labels, f"1x{stalled_span}"),
        ],
        [_check(fires_at, STALLED_ALERT)],
    )
    # The training host's clock is off: its timestamps are compared with each other only.
    behind, ahead = stall + 60, 3600
    case(
        f"{STALLED_ALERT} does not fire while updates keep arriving on a host whose clock is "
        f"{_minutes(behind)}m behind",
        [
            _series(LAST_UPDATE_TIMESTAMP, up_labels, f"{-behind}+60x{stalled_span}"),
            _series("up", up_labels, f"1x{stalled_span}"),
        ],
        [_check(m, STALLED_ALERT) for m in range(stalled_span)],
    )
    case(
        f"{STALLED_ALERT} fires when no update arrives for {o.stall_after} on a host whose "
        f"clock is {_minutes(ahead)}m ahead",
        [
            _series(
                LAST_UPDATE_TIMESTAMP,
                up_labels,
                f"{ahead}+60x5 {ahead + last_update}x{stalled_span}",
            ),
            _series("up", up_labels, f"1x{stalled_span + 5}"),
        ],
        [
            _check(fires_at - 1, STALLED_ALERT),
            _check(fires_at, STALLED_ALERT, _stalled_alert(o)),
        ],
    )


def _histories(o: KitOptions, case: Case) -> None:
    """The stall alert through failed scrapes, gaps, crashes and restarts."""
    stall = _minutes(duration_seconds(o.stall_after, "stall_after"))
    stalled = 5  # updates every minute until then, then none
    fires = stalled + stall + 1
    labels = _labels(o)

    def target(
        minutes: int, value: Value, failed: Sequence[int] = (), gaps: Sequence[int] = ()
    ) -> list[dict[str, str]]:
        """A target's last update time, and ``up``: 0 at a failed scrape and while no process serves."""
        sample = value if callable(value) else lambda m: value
        up = lambda m: int(isinstance(sample(m), (int, float)) and m not in failed)  # noqa: E731
        return [
            _series(
                LAST_UPDATE_TIMESTAMP, labels, _scrapes(minutes, value, failed=failed, gaps=gaps)
            ),
            _series("up", labels, _scrapes(minutes, up, gaps=gaps)),
        ]

    updates = lambda m: 60 * min(m, stalled)  # noqa: E731
    case(
        f"{STALLED_ALERT} fires once for a stall, through a failed scrape",
        target(fires + 5, updates, failed=(fires + 2,)),
        [
            _check(fires - 1, STALLED_ALERT),
            *(_check(m, STALLED_ALERT, _stalled_alert(o)) for m in (fires, fires + 2, fires + 3)),
        ],
    )
    bridged = stall // 2 - 1
    down = range(fires + 1, fires + 1 + bridged)
    case(
        f"{STALLED_ALERT} fires once for a stall, through a Prometheus gap of {bridged}m",
        target(down.stop + 3, updates, gaps=down),
        [
            _check(m, STALLED_ALERT, _stalled_alert(o))
            for m in (fires, down.start, down.stop - 1, down.stop)
        ],
    )
    training = lambda m: 60 * m - 30  # noqa: E731  (an update half a minute before each scrape)
    case(
        f"{STALLED_ALERT} does not fire when the process crashes",
        target(fires + 5, _life(training, gone=stalled + 1)),
        [_check(m, STALLED_ALERT) for m in range(stalled, fires + 5)],
    )
    down = range(stalled, stalled + stall + 2)
    case(
        f"{STALLED_ALERT} does not fire when Prometheus has a gap of {len(down)}m while training goes on",
        target(down.stop + 5, training, gaps=down),
        [_check(m, STALLED_ALERT) for m in range(stalled, down.stop + 5)],
    )
    # A restarted process reports its start as its last update until its first one.
    gone, first = stalled + 3, stalled + 5
    case(
        f"{STALLED_ALERT} fires when a restarted process stalls, not for the restart",
        target(first + stall + 3, _lives(_life(training, gone=gone), _life(first * 60, first))),
        [_check(m, STALLED_ALERT) for m in range(gone, first + stall + 1)]
        + [_check(first + stall + 1, STALLED_ALERT, _stalled_alert(o))],
    )


def rules(o: KitOptions) -> list[dict[str, Any]]:
    return [
        {
            "alert": STALLED_ALERT,
            "expr": promql.per_run(_stalled(o, o.job_selector)),
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Training is up but gradtel sees no update",
                "description": (
                    f"{promql.where()}: {{{{ $value }}}} targets are up but have had no update (no "
                    f"collect() call) for more than {o.stall_after}: "
                    + promql.targets(_stalled(o, promql.RUN_SCOPE), *promql.RUN_ARGS)
                    + ". Training hangs, waits on data or on another rank, or collect() is no "
                    "longer called."
                    + promql.hardware(o, _stalled(o, promql.RUN_SCOPE), *promql.RUN_ARGS)
                ),
                "runbook_url": o.runbook(STALLED_ALERT),
            },
        }
    ]


def cases(o: KitOptions, case: Case) -> None:
    _behaviours(o, case)
    _histories(o, case)


def runbook(o: KitOptions) -> str:
    return f"""## {STALLED_ALERT}

**Meaning.** The endpoint is up but `collect()` has not been called (no
update, scanned or not) for more than {o.stall_after}: its
`{LAST_UPDATE_TIMESTAMP}` is the one it showed {o.stall_after} ago (compared
with itself, not with Prometheus' clock, so a training host whose clock is off
neither stalls nor hides a stall). A target not scraped for half that time is
down ({DOWN_ALERT}), not stalled.

**Look first at** whether the process still uses CPU/GPU (a hang in a collective
operation waiting for another rank, a data loader stuck on I/O), whether another
rank is down (`{DOWN_ALERT}`), and whether `collect()` is still called (a code
path that skips it, an evaluation phase longer than {o.stall_after}).

**Do** take a stack dump (`py-spy dump --pid PID`), restart the stuck rank or
the job, or raise `stall_after` when long evaluation phases are normal.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
