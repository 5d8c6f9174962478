"""The AMP skips alert: the GradScaler keeps skipping updates for overflow."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

from ...metrics import SKIPPED_UPDATES, UPDATES
from ..options import AMP_SKIPS_ALERT, AMP_SKIPS_FOR, KitOptions, duration_seconds
from . import promql
from ._promtool import GAP, _check, _labels, _life, _lives, _minutes, _more, _scrapes, _series
from .alert import Alert, Case

__all__ = ["ALERT"]


SETTLE_SKIPS = 16
"""The most updates a ``GradScaler`` skips while its loss scale settles: it starts at
65,536 (2**16, its default ``init_scale``) and halves at each overflow, so a settle that
halved it more than 16 times would take it below 1, the default ``amp_scale_floor``, where
``GradtelAmpLossScaleCollapsed`` pages: a collapse, not a settle."""


def _skipping(o: KitOptions, selector: str) -> list[str]:
    """The processes that skip more than ``amp_skip_ratio`` of the window's updates for
    overflow, and have skipped more than a settle makes since they started (one a line).

    A share of the updates in a window of minutes alone cannot tell a settle from a scale
    that keeps collapsing: at one update a minute, the few halvings of a run's first steps
    are most of the window's updates for minutes. What tells them apart is a number of
    updates, whatever the step rate: a settle skips at most :data:`SETTLE_SKIPS`, at the
    process's start. So a process must also have skipped more than that since it started
    (its counter, exported at 0 from the start and read through failed scrapes and gaps;
    a restarted process counts, and settles, anew). Past that the share judges persistence,
    as before: the lone overflow of a growth interval (``GradScaler`` doubles the scale after
    2,000 good updates, and may overflow once) is one of the window's updates, not most of
    them, in any run that steps more than twice a window."""
    w = o.window
    skipped = f'{SKIPPED_UPDATES}{{{selector},reason="amp_overflow"}}'
    return [
        f"increase({skipped}[{w}])",
        "/ ignoring (reason)",
        f"increase({UPDATES}{{{selector}}}[{w}])",
        f"> {o.amp_skip_ratio:g}",
        "and ignoring (reason)",
        f"last_over_time({skipped}[{w}]) > {SETTLE_SKIPS}",
    ]


def _capped(limit: int) -> Callable[[int], int]:
    """A counter that rises by one a minute up to ``limit``, as promtool's series values."""
    return lambda minute: min(minute, limit)


def _rule(o: KitOptions) -> dict[str, Any]:
    return {
        "alert": AMP_SKIPS_ALERT,
        # The first-steps overflows of an fp16 run are the scaler doing its job, however
        # slowly the run steps; a share of skipped updates that stays high past them is a
        # loss scale collapsing.
        "expr": promql.per_run(*_skipping(o, o.job_selector)),
        "for": AMP_SKIPS_FOR,
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "The AMP GradScaler keeps skipping updates for overflow",
            "description": f"{promql.where()}: on {{{{ $value }}}} ranks, {_condition(o)}",
            "runbook_url": o.runbook(AMP_SKIPS_ALERT),
        },
    }


def _condition(o: KitOptions) -> str:
    """What the description says of each rank, after its job and number of ranks."""
    return (
        f"more than {o.amp_skip_ratio:.0%} of the updates in the last {o.window} had non-finite "
        f"gradients and were skipped by the GradScaler, for {AMP_SKIPS_FOR}, and more than "
        f"{SETTLE_SKIPS} since the process started (a loss scale settling from 65,536 skips at "
        f"most {SETTLE_SKIPS}): the loss scale is collapsing and the model is barely training."
    )


def _amp_skips_alert(o: KitOptions) -> dict[str, Any]:
    return {
        "exp_labels": {"job": o.job, "severity": "warning"},
        "exp_annotations": {
            "summary": "The AMP GradScaler keeps skipping updates for overflow",
            "description": f"{o.job}: on 1 ranks, {_condition(o)}",
            "runbook_url": o.runbook(AMP_SKIPS_ALERT),
        },
    }


def _behaviours(o: KitOptions, case: Case) -> None:
    """One case per behaviour of the alert."""
    window = _minutes(duration_seconds(o.window, "window"))
    span = window + 10  # every case runs well past one window
    hold = _minutes(duration_seconds(AMP_SKIPS_FOR, "for"))
    skip_labels = _labels(o, reason="amp_overflow")
    # 60 updates a minute; from minute 5 on, every update overflows.
    case(
        f"{AMP_SKIPS_ALERT} fires when the scaler keeps skipping updates",
        [
            _series(SKIPPED_UPDATES, skip_labels, f"0x5 0+60x{span}"),
            _series(UPDATES, _labels(o), f"0+60x{span + 5}"),
        ],
        [
            _check(5 + 1, AMP_SKIPS_ALERT),
            _check(5 + window + hold, AMP_SKIPS_ALERT, _amp_skips_alert(o)),
        ],
    )
    case(
        f"{AMP_SKIPS_ALERT} does not fire on the usual first few overflows of an fp16 run",
        [
            _series(SKIPPED_UPDATES, skip_labels, f"0 12x{span}"),
            _series(UPDATES, _labels(o), f"0+60x{span}"),
        ],
        [_check(t, AMP_SKIPS_ALERT) for t in (1, hold + 1, window, span)],
    )
    _slow(o, case)


def _healthy_one_in(o: KitOptions) -> int | None:
    """The fewest updates ``n`` such that skipping all but one of every ``n`` is more than
    ``amp_skip_ratio`` of any window's updates at one update a minute (None: only skipping
    every update is). A window's increase() spans one minute less than the window where
    Prometheus 3 leaves its first sample out."""
    intervals = _minutes(duration_seconds(o.window, "window")) - 1
    for n in range(2, intervals + 1):
        if (intervals - math.ceil(intervals / n)) / intervals > o.amp_skip_ratio:
            return n
    return None


def _slow(o: KitOptions, case: Case) -> None:
    """A run at one update a minute: its loss scale's settle is most of a window's updates for
    minutes, and only the number of updates skipped tells it from a scale that keeps falling."""
    window = _minutes(duration_seconds(o.window, "window"))
    hold = _minutes(duration_seconds(AMP_SKIPS_FOR, "for"))
    skip_labels = _labels(o, reason="amp_overflow")
    for halvings in (6, SETTLE_SKIPS):
        minutes = halvings + window + hold + 5
        case(
            f"{AMP_SKIPS_ALERT} does not fire while a run at one update a minute settles its "
            f"loss scale in {halvings} halvings",
            [
                _series(SKIPPED_UPDATES, skip_labels, _scrapes(minutes, _capped(halvings))),
                _series(UPDATES, _labels(o), _scrapes(minutes, lambda m: m)),
            ],
            [_check(m, AMP_SKIPS_ALERT) for m in range(minutes)],
        )
    # It settles in 6 halvings, steps on healthy for a window, then keeps skipping most of
    # its updates: it fires once it has skipped more than a settle makes, and the share of
    # the window has stayed high for the alert's `for`.
    settle, n = 6, _healthy_one_in(o)
    start = settle + window

    def skipped(m: int) -> int:
        after = max(0, m - start)
        return min(m, settle) + after - (after // n if n else 0)

    beyond = next(m for m in itertools.count() if skipped(m) > SETTLE_SKIPS)
    fires = max(beyond, start + window) + hold + 1
    minutes = fires + 5
    share = f"{n - 1} of every {n}" if n else "every one"
    case(
        f"{AMP_SKIPS_ALERT} fires when a run at one update a minute keeps skipping {share} of "
        "its updates after its loss scale settled",
        [
            _series(SKIPPED_UPDATES, skip_labels, _scrapes(minutes, skipped)),
            _series(UPDATES, _labels(o), _scrapes(minutes, lambda m: m)),
        ],
        [_check(m, AMP_SKIPS_ALERT) for m in (*range(0, start + 1), beyond - 1)]
        + [_check(m, AMP_SKIPS_ALERT, _amp_skips_alert(o)) for m in range(fires, minutes)],
    )


def _histories(o: KitOptions, case: Case) -> None:
    """Through failed scrapes, gaps and restarts."""
    w = _minutes(duration_seconds(o.window, "window"))
    minutes = 3 * w
    labels = _labels(o)
    gone, first = w + 2, w + 4
    hold = _minutes(duration_seconds(AMP_SKIPS_FOR, "for"))
    fires = 5 + w + hold
    case(
        f"{AMP_SKIPS_ALERT} fires once while the scaler keeps skipping, through a failed scrape",
        [
            _series(
                SKIPPED_UPDATES,
                _more(labels, reason="amp_overflow"),
                _scrapes(fires + 5, lambda m: 60 * max(0, m - 5), failed=(fires + 1,)),
            ),
            _series(UPDATES, labels, _scrapes(fires + 5, lambda m: 60 * m, failed=(fires + 1,))),
        ],
        [_check(m, AMP_SKIPS_ALERT, _amp_skips_alert(o)) for m in (fires, fires + 1, fires + 2)],
    )
    # Every fp16 process overflows a few times at its start, a restarted one too.
    first_steps = lambda start: lambda m: 12 if m > start else 0  # noqa: E731
    skipping = {
        f"Prometheus has a gap of {GAP}m": (first_steps(0), lambda m: 60 * m, range(w, w + GAP)),
        "a process restarts": (
            _lives(_life(first_steps(0), gone=gone), _life(first_steps(first), first)),
            _lives(_life(lambda m: 60 * m, gone=gone), _life(lambda m: 60 * (m - first), first)),
            (),
        ),
    }
    for history, (skipped, updates, gaps) in skipping.items():
        case(
            f"{AMP_SKIPS_ALERT} does not fire when {history}",
            [
                _series(
                    SKIPPED_UPDATES,
                    _more(labels, reason="amp_overflow"),
                    _scrapes(minutes, skipped, gaps=gaps),
                ),
                _series(UPDATES, labels, _scrapes(minutes, updates, gaps=gaps)),
            ],
            [_check(m, AMP_SKIPS_ALERT) for m in range(0, minutes, 2)],
        )
    # The settle budget is each process's own: a process that had skipped more than a settle
    # makes (days of growth intervals' lone overflows) hangs, is restarted on the same
    # labels, and the new one settles anew, at one update a minute, while the old one's
    # samples are in the window.
    settle, hung, back = 6, 2, w + 1
    case(
        f"{AMP_SKIPS_ALERT} does not fire when a hung process that had skipped more than "
        f"{SETTLE_SKIPS} updates restarts and settles its loss scale anew, at one update a minute",
        [
            _series(
                SKIPPED_UPDATES,
                _more(labels, reason="amp_overflow"),
                _scrapes(
                    minutes,
                    _lives(
                        _life(4 * SETTLE_SKIPS, gone=w),
                        _life(lambda m: min(m - back, settle), back),
                    ),
                ),
            ),
            _series(
                UPDATES,
                labels,
                _scrapes(
                    minutes,
                    _lives(
                        _life(lambda m: 100_000 + min(m, hung), gone=w),
                        _life(lambda m: m - back, back),
                    ),
                ),
            ),
        ],
        [_check(m, AMP_SKIPS_ALERT) for m in range(minutes)],
    )


def rules(o: KitOptions) -> list[dict[str, Any]]:
    return [_rule(o)]


def cases(o: KitOptions, case: Case) -> None:
    _behaviours(o, case)
    _histories(o, case)


def runbook(o: KitOptions) -> str:
    return f"""## {AMP_SKIPS_ALERT}

**Meaning.** More than {o.amp_skip_ratio:.0%} of the updates in the last
{o.window} overflowed and the AMP `GradScaler` skipped their optimizer step, for
{AMP_SKIPS_FOR}, in a process that has skipped more than {SETTLE_SKIPS} updates since it
started. The first overflows of every fp16 run are the scaler finding its loss
scale and do not page, however slowly the run steps: they are counted in
`{SKIPPED_UPDATES}{{reason="amp_overflow"}}`, not as unhealthy
updates, and from its default 65,536 (2**16) the scale settles within
{SETTLE_SKIPS} halvings (one more would take it below 1). At one update a minute those
few halvings are most of the updates of a {o.window} window for minutes, so the share alone
cannot tell them from a collapse: the count of skips can. A share that stays high
past them means the loss scale keeps halving: the model is barely training and will
soon produce real NaN. (A `GradScaler` with a higher `init_scale` can skip more while
it settles, and a slow run's settle may then warn.)

**Look first at** the scaler's scale (`scaler.get_scale()` in your logs), the
learning rate, and the layers named by the overflowing updates (the
`GradHealth` that `collect()` returns has them; gradtel logs them at DEBUG).

**Do** lower the learning rate, clip gradients, move unstable ops (softmax,
norms, losses) to fp32 or bf16, or restart from the last healthy checkpoint.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
