"""The AMP skips alert: the GradScaler keeps skipping updates for overflow."""

from __future__ import annotations

from typing import Any

from ...metrics import SKIPPED_UPDATES, UPDATES
from ..options import AMP_SKIPS_ALERT, AMP_SKIPS_FOR, KitOptions, duration_seconds
from . import promql
from ._promtool import GAP, _check, _labels, _life, _lives, _minutes, _more, _scrapes, _series
from .alert import Alert, Case

__all__ = ["ALERT"]


def _rule(o: KitOptions) -> dict[str, Any]:
    sel, w = o.job_selector, o.window
    skipped = f'increase({SKIPPED_UPDATES}{{{sel},reason="amp_overflow"}}[{w}])'
    return {
        "alert": AMP_SKIPS_ALERT,
        # The first-steps overflows of an fp16 run are the scaler doing its job; a
        # share of skipped updates that stays high is a loss scale collapsing.
        "expr": promql.per_run(
            skipped,
            "/ ignoring (reason)",
            f"increase({UPDATES}{{{sel}}}[{w}])",
            f"> {o.amp_skip_ratio:g}",
        ),
        "for": AMP_SKIPS_FOR,
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "The AMP GradScaler keeps skipping updates for overflow",
            "description": (
                f"{promql.where()}: on {{{{ $value }}}} ranks, more than {o.amp_skip_ratio:.0%} of the "
                f"updates in the last {w} had non-finite gradients and were skipped by the "
                f"GradScaler, for {AMP_SKIPS_FOR}: the loss scale is collapsing and the model is "
                "barely training."
            ),
            "runbook_url": o.runbook(AMP_SKIPS_ALERT),
        },
    }


def _amp_skips_alert(o: KitOptions) -> dict[str, Any]:
    return {
        "exp_labels": {"job": o.job, "severity": "warning"},
        "exp_annotations": {
            "summary": "The AMP GradScaler keeps skipping updates for overflow",
            "description": (
                f"{o.job}: on 1 ranks, more than {o.amp_skip_ratio:.0%} of the updates "
                f"in the last {o.window} had non-finite gradients and were skipped by "
                f"the GradScaler, for {AMP_SKIPS_FOR}: the loss scale is collapsing and "
                "the model is barely training."
            ),
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


def rules(o: KitOptions) -> list[dict[str, Any]]:
    return [_rule(o)]


def cases(o: KitOptions, case: Case) -> None:
    _behaviours(o, case)
    _histories(o, case)


def runbook(o: KitOptions) -> str:
    return f"""## {AMP_SKIPS_ALERT}

**Meaning.** More than {o.amp_skip_ratio:.0%} of the updates in the last
{o.window} overflowed and the AMP `GradScaler` skipped their optimizer step, and
this went on for {AMP_SKIPS_FOR}. The first few overflows of every fp16 run are
the scaler finding its loss scale and do not page: they are counted in
`{SKIPPED_UPDATES}{{reason="amp_overflow"}}`, not as unhealthy
updates. A share that stays high means the loss scale keeps halving: the model
is barely training and will soon produce real NaN.

**Look first at** the scaler's scale (`scaler.get_scale()` in your logs), the
learning rate, and the layers named by the overflowing updates (the
`GradHealth` that `collect()` returns has them; gradtel logs them at DEBUG).

**Do** lower the learning rate, clip gradients, move unstable ops (softmax,
norms, losses) to fp32 or bf16, or restart from the last healthy checkpoint.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
