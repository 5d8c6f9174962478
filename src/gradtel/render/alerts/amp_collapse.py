"""The AMP loss-scale collapse alert: the GradScaler's scale fell below its floor."""

from __future__ import annotations

from typing import Any

from ...metrics import AMP_LOSS_SCALE, SKIPPED_UPDATES, START_TIME
from ..options import AMP_COLLAPSE_ALERT, AMP_SKIPS_ALERT, KitOptions, duration_seconds
from . import promql
from ._promtool import (
    GAP,
    INSTANCE,
    Value,
    _check,
    _labels,
    _life,
    _lives,
    _minutes,
    _scrapes,
    _series,
)
from .alert import Alert, Case

__all__ = ["ALERT"]


def _collapsed(o: KitOptions, selector: str) -> str:
    """Processes whose loss scale fell below the floor in the window and stays there: a
    sample at or above it in the window before the latest one below, or a process younger
    than the window. Failed scrapes and gaps are read through; an old collapse, seen again
    after a gap, or left behind by a restart with a healthy scale, pages no more."""
    scale, floor = f"{AMP_LOSS_SCALE}{{{selector}}}", f"{o.amp_scale_floor:g}"
    return (
        f"last_over_time({scale}[{o.window}]) < {floor} and on ({promql.PROCESS}) (max_over_time({scale}[{o.window}]) >= {floor}"
        f" or on ({promql.PROCESS}) {promql.young(o, selector)})"
    )


def _rule(o: KitOptions) -> dict[str, Any]:
    # The scaler halves its scale at every update that overflows and doubles it after a
    # run of good ones: the few halvings of an fp16 run's first steps stay far above the
    # floor, an update that overflows every time drives it to 0.
    lowest = promql.query(
        f"min(min_over_time({promql.run_series(AMP_LOSS_SCALE)}[{o.window}]))", *promql.RUN_ARGS
    )
    return {
        "alert": AMP_COLLAPSE_ALERT,
        "expr": promql.per_run(_collapsed(o, o.job_selector)),
        "labels": {"severity": "critical"},
        "annotations": {
            "summary": "The AMP loss scale collapsed: training has stopped learning",
            "description": (
                f"{promql.where()}: the AMP GradScaler's loss scale fell below {o.amp_scale_floor:g} in the last "
                f'{o.window}, to {{{{ with {lowest} }}}}{{{{ . | first | value | printf "%.3g" }}}}{{{{ end }}}}, on '
                + promql.targets(_collapsed(o, promql.RUN_SCOPE), *promql.RUN_ARGS)
                + ". The scaler halves it at every update whose gradients overflow: nearly every "
                "update overflows and is skipped, and training has stopped learning."
                + promql.hardware(o, _collapsed(o, promql.RUN_SCOPE), *promql.RUN_ARGS)
            ),
            "runbook_url": o.runbook(AMP_COLLAPSE_ALERT),
        },
    }


def _amp_collapse_alert(o: KitOptions, lowest: float) -> dict[str, Any]:
    return {
        "exp_labels": {"job": o.job, "severity": "critical"},
        "exp_annotations": {
            "summary": "The AMP loss scale collapsed: training has stopped learning",
            "description": (
                f"{o.job}: the AMP GradScaler's loss scale fell below {o.amp_scale_floor:g} in the last "
                f"{o.window}, to {lowest:.3g}, on {INSTANCE}. The scaler halves it at every update whose "
                "gradients overflow: nearly every update overflows and is skipped, and training has "
                "stopped learning."
            ),
            "runbook_url": o.runbook(AMP_COLLAPSE_ALERT),
        },
    }


def _cases(o: KitOptions, case: Case) -> None:
    """The loss-scale collapse: a scale that falls to 0, or keeps falling, pages, for a window;
    the halvings of an fp16 run's first steps do not; failed scrapes, gaps and restarts page
    no more for an old collapse."""
    w = _minutes(duration_seconds(o.window, "window"))
    alert, labels = AMP_COLLAPSE_ALERT, _labels(o)
    start = 65536.0  # GradScaler's initial scale
    below = next(
        m for m in range(200) if start / 2**m < o.amp_scale_floor
    )  # halvings to fall below the floor
    collapse = 5
    # Firing while the window holds the sample before the fall: not at collapse + w - 1,
    # where Prometheus 2.x's ranges still hold it and 3.x's (left-open) do not.
    firing = range(collapse, collapse + w - 1)
    minutes = collapse + 2 * w + GAP + 5
    paged = _amp_collapse_alert(o, 0)

    def scale(minute: int) -> float:
        """Steady until ``collapse``, then every update overflows: 0 within a minute."""
        return start if minute < collapse else 0.0

    def scraped(value: Value, **how: Any) -> list[dict[str, str]]:
        return [
            _series(AMP_LOSS_SCALE, labels, _scrapes(minutes, value, **how)),
            _series(START_TIME, labels, _scrapes(minutes, 0, **how)),
        ]

    case(
        f"{alert} fires when the loss scale collapses to 0",
        scraped(scale),
        [_check(collapse - 1, alert), _check(collapse, alert, paged), _check(collapse + w, alert)],
    )
    case(
        f"{alert} fires when the loss scale keeps falling",
        [_series(AMP_LOSS_SCALE, labels, _scrapes(below + 3, lambda m: start / 2**m))],
        [_check(below - 1, alert), _check(below, alert, _amp_collapse_alert(o, start / 2**below))],
    )
    # GradScaler's first steps: a few halvings from 65,536, then a doubling after each run
    # of good updates.
    settling = [start, start / 8, start / 32, start / 64] + [
        start / 64 * 2 ** (m // 5) for m in range(3 * w)
    ]
    case(
        f"{alert} does not fire while the loss scale settles in an fp16 run's first steps",
        [_series(AMP_LOSS_SCALE, labels, " ".join(f"{v:g}" for v in settling))],
        [_check(m, alert) for m in range(0, len(settling), 2)],
    )
    failed = (collapse + 1, collapse + 3, collapse + w + 2)
    case(
        f"{alert} fires once for a collapse, through failed scrapes",
        scraped(scale, failed=failed),
        [_check(m, alert, paged) for m in firing]
        + [_check(m, alert) for m in range(collapse + w, minutes)],
    )
    down = range(collapse + w + 1, collapse + w + 1 + GAP)
    case(
        f"{alert} does not fire again when Prometheus has a gap of {GAP}m after a collapse",
        scraped(scale, gaps=down),
        [_check(collapse, alert, paged)] + [_check(m, alert) for m in range(collapse + w, minutes)],
    )
    # The collapsed run is stopped and resumed from a checkpoint: a new process, the same labels.
    gone, first = collapse + 3, collapse + 5

    def restarted(new_scale: float, first: int) -> list[dict[str, str]]:
        return [
            _series(
                AMP_LOSS_SCALE,
                labels,
                _scrapes(minutes, _lives(_life(scale, gone=gone), _life(new_scale, first))),
            ),
            _series(
                START_TIME,
                labels,
                _scrapes(minutes, _lives(_life(0, gone=gone), _life(first * 60, first))),
            ),
        ]

    case(
        f"{alert} does not fire again when the process restarts after a collapse",
        restarted(start, first),
        [_check(m, alert, paged) for m in (collapse, gone)]
        + [_check(m, alert) for m in range(first, minutes)],
    )
    late = collapse + w + 2  # after the first collapse's alert resolved
    case(
        f"{alert} fires when a restarted process's first scrape shows a collapsed scale",
        restarted(0.0, late),
        [_check(collapse, alert, paged), _check(late - 1, alert), _check(late, alert, paged)],
    )


def rules(o: KitOptions) -> list[dict[str, Any]]:
    return [_rule(o)]


def cases(o: KitOptions, case: Case) -> None:
    _cases(o, case)


def runbook(o: KitOptions) -> str:
    return f"""## {AMP_COLLAPSE_ALERT}

**Meaning.** The AMP `GradScaler`'s loss scale (`{AMP_LOSS_SCALE}`) fell below
{o.amp_scale_floor:g} in the last {o.window}. The scaler halves its scale at every update whose
gradients overflow and skips that update's step; it doubles it after a run of
good updates. A healthy fp16 run halves it a few times in its first steps and
settles far above {o.amp_scale_floor:g} (it starts at 65,536). Below it, nearly every update
overflows: the weights have diverged (a NaN loss makes every update overflow,
down to a scale of 0) and training has stopped learning, even though each
overflow is "handled". DeepSpeed and Megatron-LM stop a run at a scale of 1.
It keeps firing for {o.window} after the lowest scale, then resolves; a restart
with a healthy scale does not page again.

**Look first at** the loss (NaN or Inf since when?), `{AMP_LOSS_SCALE}` over
time (a sudden fall is a divergence, a slow slide is overflow outpacing the
scaler's growth), `{SKIPPED_UPDATES}{{reason="amp_overflow"}}`, and the
learning rate and data around the step where the scale began to fall.

**Do** stop the run: every step is skipped, and checkpoints saved now hold no
progress (or NaN). Resume from the last checkpoint before the fall with a lower
learning rate, gradient clipping, or the unstable ops (softmax, norms, losses)
in fp32 or bf16. This critical alert inhibits {AMP_SKIPS_ALERT} of the same
run, whose overflows it explains.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
