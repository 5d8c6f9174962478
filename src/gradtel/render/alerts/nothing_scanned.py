"""The coverage alert: updates arrive, but gradtel scans none of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...metrics import ERRORS, UNSCANNED_UPDATES, UPDATE_STATUS, UPDATES
from ..options import NOTHING_SCANNED_ALERT, KitOptions, duration_seconds
from . import promql
from ._promtool import (
    GAP,
    Value,
    _check,
    _labels,
    _life,
    _lives,
    _minutes,
    _more,
    _scrapes,
    _series,
)
from .alert import Alert, Case

__all__ = ["ALERT"]


def _rule(o: KitOptions) -> dict[str, Any]:
    sel, w = o.job_selector, o.window
    return {
        "alert": NOTHING_SCANNED_ALERT,
        # Due updates arrive, none is scanned: gradtel is blind and says so, rather
        # than letting a quiet dashboard look healthy.
        "expr": promql.per_run(
            f"sum without (reason) (increase({UNSCANNED_UPDATES}{{{sel}}}[{w}])) > 0",
            "unless on (job, instance, rank)",
            f"increase({UPDATES}{{{sel}}}[{w}]) > 0",
        ),
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "gradtel cannot see the gradients: no update is scanned",
            "description": (
                f"{promql.where()}: on {{{{ $value }}}} ranks, updates in the last {w} were due but "
                "none was scanned: NaN/Inf gradients would not be seen. collect() runs where no "
                "gradient exists (before backward() or after zero_grad()), or the scan fails "
                f'({ERRORS}{{stage="scan"}}).'
            ),
            "runbook_url": o.runbook(NOTHING_SCANNED_ALERT),
        },
    }


def _nothing_scanned_alert(o: KitOptions) -> dict[str, Any]:
    return {
        "exp_labels": {"job": o.job, "severity": "warning"},
        "exp_annotations": {
            "summary": "gradtel cannot see the gradients: no update is scanned",
            "description": (
                f"{o.job}: on 1 ranks, updates in the last {o.window} were due but "
                "none was scanned: NaN/Inf gradients would not be seen. collect() runs "
                "where no gradient exists (before backward() or after zero_grad()), or "
                'the scan fails (gradtel_errors_total{stage="scan"}).'
            ),
            "runbook_url": o.runbook(NOTHING_SCANNED_ALERT),
        },
    }


def _behaviours(o: KitOptions, case: Case) -> None:
    """One case per behaviour of the alert."""
    window = _minutes(duration_seconds(o.window, "window"))
    span = window + 10  # every case runs well past one window
    unscanned = [
        _series(UNSCANNED_UPDATES, _labels(o, reason=reason), values)
        for reason, values in (("no_gradients", f"0+60x{span}"), ("scan_error", f"0x{span}"))
    ]
    case(
        f"{NOTHING_SCANNED_ALERT} fires when updates arrive but none is scanned",
        [*unscanned, _series(UPDATES, _labels(o), f"0x{span}")],
        [_check(window, NOTHING_SCANNED_ALERT, _nothing_scanned_alert(o))],
    )
    case(
        f"{NOTHING_SCANNED_ALERT} does not fire while updates are scanned",
        [
            _series(UNSCANNED_UPDATES, _labels(o, reason="no_gradients"), f"0x{span}"),
            _series(UPDATES, _labels(o), f"0+60x{span}"),
        ],
        [_check(t, NOTHING_SCANNED_ALERT) for t in (1, window, span)],
    )
    case(
        f"{NOTHING_SCANNED_ALERT} does not fire when some updates have no gradient but others are scanned",
        [
            _series(UNSCANNED_UPDATES, _labels(o, reason="no_gradients"), f"0+1x{span}"),
            _series(UPDATES, _labels(o), f"0+60x{span}"),
        ],
        [_check(t, NOTHING_SCANNED_ALERT) for t in (window, span)],
    )


def _histories(o: KitOptions, case: Case) -> None:
    """Through failed scrapes, gaps and restarts."""
    w = _minutes(duration_seconds(o.window, "window"))
    minutes = 3 * w
    labels = _labels(o)
    failed = w + 2
    case(
        f"{NOTHING_SCANNED_ALERT} fires once while nothing is scanned, through a failed scrape",
        [
            _series(
                UNSCANNED_UPDATES,
                _more(labels, reason="no_gradients"),
                _scrapes(minutes, lambda m: 60 * m, failed=(failed,)),
            ),
            _series(UPDATES, labels, _scrapes(minutes, 0, failed=(failed,))),
        ],
        [
            _check(m, NOTHING_SCANNED_ALERT, _nothing_scanned_alert(o))
            for m in (w, failed, failed + 1)
        ],
    )
    gone, first = w + 2, w + 4
    scanning: dict[str, tuple[Value, Sequence[int]]] = {
        f"Prometheus has a gap of {GAP}m": (lambda m: 60 * m, range(w, w + GAP)),
        "a process restarts": (
            _lives(_life(lambda m: 60 * m, gone=gone), _life(lambda m: 60 * (m - first), first)),
            (),
        ),
    }
    for history, (value, gaps) in scanning.items():
        case(
            f"{NOTHING_SCANNED_ALERT} does not fire when {history}",
            [
                _series(
                    UNSCANNED_UPDATES,
                    _more(labels, reason="no_gradients"),
                    _scrapes(minutes, 0, gaps=gaps),
                ),
                _series(UPDATES, labels, _scrapes(minutes, value, gaps=gaps)),
            ],
            [_check(m, NOTHING_SCANNED_ALERT) for m in range(0, minutes, 2)],
        )


def rules(o: KitOptions) -> list[dict[str, Any]]:
    return [_rule(o)]


def cases(o: KitOptions, case: Case) -> None:
    _behaviours(o, case)
    _histories(o, case)


def runbook(o: KitOptions) -> str:
    return f"""## {NOTHING_SCANNED_ALERT}

**Meaning.** Updates keep arriving (`collect()` is called) but in the last
{o.window} not one was scanned: gradtel is blind, and a NaN would not page.
Each such update is counted in `{UNSCANNED_UPDATES}{{reason=...}}`,
reports status `unknown` (`{UPDATE_STATUS} == -1`) and is not in
`{UPDATES}`.

**Look first at** the `reason` (the "Updates not scanned" panel):

- `no_gradients`: no watched parameter had a gradient when `collect()` ran. It
  runs before `backward()`, or after `optimizer.zero_grad()` (gradients set to
  `None`), or on a model other than the one trained. The process log says
  "0 of N watched trainable parameters had a gradient".
- `scan_error`: gradtel failed to count (see `{ERRORS}{{stage="scan"}}`
  and the log line `gradtel scan failed`), e.g. gradients of a kind it cannot
  read (meta or MKLDNN tensors).

**Do** move `collect()` between `backward()` and `optimizer.step()` (or use
`monitor.attach(optimizer)`), or fix what the scan error names.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
