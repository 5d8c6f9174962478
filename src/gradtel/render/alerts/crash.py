"""The crash alert: an uncaught exception ended a training process."""

from __future__ import annotations

import itertools
from typing import Any

from ...metrics import (
    LAST_UNHEALTHY_STEP,
    SEVERITIES,
    START_TIME,
    TRAINING_EXCEPTIONS,
    UNHEALTHY_UPDATES,
    UPDATE_STATUS,
    Metric,
)
from ..options import ALERT_NAMES, CRASH_ALERT, DOWN_ALERT, KINDS, KitOptions, duration_seconds
from . import promql
from ._promtool import (
    GAP,
    GPU,
    INSTANCE,
    PCI,
    Value,
    _check,
    _count,
    _device,
    _fired,
    _labels,
    _life,
    _lives,
    _minutes,
    _more,
    _rank,
    _scrapes,
    _series,
)
from .alert import Alert, Case

__all__ = ["ALERT"]


def _crashed(o: KitOptions, scope: str, unhealthy: str = "") -> str:
    """Processes that an uncaught exception ended in the window, one series per type: the
    series is born as its process ends, and once per process. ``unhealthy``: the label
    value that selects those after which NaN or Inf gradients came first (its ``gradients``)."""
    series = f"{TRAINING_EXCEPTIONS}{{{scope}{f',gradients={unhealthy}' if unhealthy else ''}}}"
    return promql.new_or_increased(o, series, scope, on_demand=True, per_process=True)


def _rule(o: KitOptions, severity: str) -> dict[str, Any]:
    """A training process died from an uncaught exception: critical when NaN or Inf gradients
    came before (the crash is likely their consequence), else warning. The crash's own
    series says which, as the process saw it when it died: a process restarted on the same
    labels does not change it. One alert per run, whatever the exceptions: when one rank
    dies the others die of their own (a collective that lost its peer), and that is one
    incident, critical when any of its ranks had NaN or Inf gradients."""
    unhealthy = '"unhealthy"'
    critical = f"count by ({promql.INCIDENT}) ({_crashed(o, o.job_selector, unhealthy)})"
    crashed = f"count by ({promql.INCIDENT}) ({_crashed(o, o.job_selector)})"
    # In a template the value is the query's third argument: a quote would end its string.
    steps = promql.query(
        f"max by (kind) (last_over_time({promql.run_series(LAST_UNHEALTHY_STEP)}[{o.window}]) "
        f"and on ({promql.PROCESS}) {_crashed(o, promql.RUN_SCOPE, '%[3]q')})",
        *promql.RUN_ARGS,
        unhealthy,
    )
    after = (
        f'training crashed after {{{{ range $i, $s := sortByLabel "kind" ({steps}) }}}}{{{{ if $i }}}} and {{{{ end }}}}'
        '{{ if eq $s.Labels.kind "nan" }}NaN{{ else }}Inf{{ end }} gradients at step '
        '{{ $s.Value | printf "%.0f" }}{{ else }}NaN or Inf gradients{{ end }}'
    )
    is_critical = severity == "critical"
    return {
        "alert": CRASH_ALERT,
        "expr": critical
        if is_critical
        else f"{crashed}\nunless on ({promql.INCIDENT})\n{critical}",
        # The last scrapes of the ranks that died are in: the page names them all.
        "for": o.settle,
        "labels": {"severity": severity},
        "annotations": {
            "summary": f"Training crashed with an uncaught exception ({severity})",
            "description": (
                f"{promql.where()}: "
                + (after if is_critical else "training crashed")
                + ": uncaught exceptions ended "
                + promql.targets(
                    _crashed(o, promql.RUN_SCOPE),
                    *promql.RUN_ARGS,
                    then="{{ with $s.Labels.type }}: {{ . }}{{ end }}",
                )
                + (
                    "; NaN or Inf gradients came before: resume from the last healthy checkpoint, "
                    "not the latest."
                    if is_critical
                    else "; gradtel saw no unhealthy update before."
                )
                + promql.hardware(o, _crashed(o, promql.RUN_SCOPE), *promql.RUN_ARGS)
            ),
            "runbook_url": o.runbook(CRASH_ALERT),
        },
    }


def _crash_alert(
    o: KitOptions,
    severity: str,
    after: str = "",
    targets: str = f"{INSTANCE}: ValueError",
    hardware: str = "",
) -> dict[str, Any]:
    """The page of a crash (by default one target's ``ValueError``); ``after``: "NaN gradients at step 41"."""
    return {
        "exp_labels": {"job": o.job, "severity": severity},
        "exp_annotations": {
            "summary": f"Training crashed with an uncaught exception ({severity})",
            "description": (
                f"{o.job}: training crashed after {after}: uncaught exceptions ended {targets}; NaN or Inf "
                f"gradients came before: resume from the last healthy checkpoint, not the latest.{hardware}"
                if severity == "critical"
                else f"{o.job}: training crashed: uncaught exceptions ended {targets}; gradtel saw no unhealthy "
                "update before."
            ),
            "runbook_url": o.runbook(CRASH_ALERT),
        },
    }


def _cases(o: KitOptions, case: Case) -> None:
    """A training process that an uncaught exception ended: its series is born in its last
    scrape (the endpoint waits for it), and the process is gone after. One page per crash,
    critical when NaN or Inf gradients came before it; none again for an old crash, through failed
    scrapes, gaps and restarts."""
    w = _minutes(duration_seconds(o.window, "window"))
    alert, labels = CRASH_ALERT, _labels(o)
    bad, at = 3, 6  # an unhealthy update, then the crash
    minutes = at + 2 * w + GAP + 5
    Lives = dict[tuple[Metric, tuple[tuple[str, str], ...]], Value]

    def process(
        first: int = 0,
        crash: int = at,
        steps: dict[str, tuple[int, int]] | None = None,
        held: int = 1,
        error: str = "ValueError",
    ) -> Lives:
        """One process from ``first``: its unhealthy updates (``steps``: kind -> (minute, step)),
        unhealthy to the end, and its crash, in the ``held`` scrapes of the exit wait; gone after."""
        gone = crash + held
        bad_from = min((minute for minute, _ in (steps or {}).values()), default=gone)
        lives: Lives = {
            (START_TIME, ()): _life(first * 60, first, gone),
            (UPDATE_STATUS, ()): _life(lambda m: 2 if m >= bad_from else 0, first, gone),
            (
                TRAINING_EXCEPTIONS,
                (("type", error), ("gradients", "unhealthy" if steps else "healthy")),
            ): _life(1, crash, gone),
        }
        for kind, severity in itertools.product(KINDS, SEVERITIES):
            minute = (steps or {}).get(kind, (None,))[0] if severity == "critical" else None
            counted = _count(minute) if minute is not None else 0
            lives[(UNHEALTHY_UPDATES, (("kind", kind), ("severity", severity)))] = _life(
                counted, first, gone
            )
        for kind, (minute, step) in (steps or {}).items():
            lives[(LAST_UNHEALTHY_STEP, (("kind", kind),))] = _life(step, minute, gone)
        return lives

    def scraped(labels: str, *lives: Lives, **how: Any) -> list[dict[str, str]]:
        """The series of processes that follow one another on ``labels``."""
        return [
            _series(
                metric,
                _more(labels, **dict(extra)),
                _scrapes(
                    minutes,
                    _lives(*(life[(metric, extra)] for life in lives if (metric, extra) in life)),  # type: ignore[arg-type]
                    **how,
                ),
            )
            for metric, extra in dict.fromkeys(key for life in lives for key in life)
        ]

    nan41 = {"nan": (bad, 41)}
    case(
        f"{alert} critical fires when training crashes after NaN gradients, naming the step, the exception and the rank",
        scraped(_rank(o, 0), process(steps=nan41)),
        [
            _check(at, alert),
            _check(
                _fired(o, at),
                alert,
                _crash_alert(
                    o, "critical", "NaN gradients at step 41", "trainer-0:9464 (rank 0): ValueError"
                ),
            ),
            _check(at + w + 1, alert),
        ],
    )
    case(
        f"{alert} critical names the host and GPU of the rank that crashed",
        scraped(_rank(o, 2), process(steps=nan41)) + [_device(o, 2, at + w + 2)],
        [
            _check(
                _fired(o, at),
                alert,
                _crash_alert(
                    o,
                    "critical",
                    "NaN gradients at step 41",
                    "trainer-2:9464 (rank 2): ValueError",
                    f" Hardware: trainer-2:9464 (rank 2) on host node-1, {GPU} (PCI {PCI}).",
                ),
            ),
        ],
    )
    # Rank 0 raises on its NaN; rank 1's collective then loses its peer and raises too.
    case(
        f"{alert} critical fires once for a run whose ranks die of different exceptions",
        scraped(_rank(o, 0), process(steps=nan41)) + scraped(_rank(o, 1), process(steps=nan41, error="RuntimeError")),
        [
            _check(
                _fired(o, at), alert,
                _crash_alert(
                    o, "critical", "NaN gradients at step 41",
                    "trainer-0:9464 (rank 0): ValueError, trainer-1:9464 (rank 1): RuntimeError",
                ),
            ),
        ],
    )  # fmt: skip
    # Sharded gradients (FSDP): rank 0's shard held the NaN and raised; rank 1's was finite,
    # and it died of the collective that lost its peer.
    case(
        f"{alert} critical fires once for a run whose ranks saw different gradients, naming them all",
        scraped(_rank(o, 0), process(steps=nan41, error="NonFiniteGradientError"))
        + scraped(_rank(o, 1), process(error="DistBackendError")),
        [
            _check(
                _fired(o, at), alert,
                _crash_alert(
                    o, "critical", "NaN gradients at step 41",
                    "trainer-0:9464 (rank 0): NonFiniteGradientError, trainer-1:9464 (rank 1): DistBackendError",
                ),
            ),
        ],
    )  # fmt: skip
    case(
        f"{alert} critical names the last unhealthy step of each kind",
        scraped(labels, process(steps={"nan": (bad, 41), "inf": (bad - 1, 40)})),
        [
            _check(
                _fired(o, at),
                alert,
                _crash_alert(
                    o, "critical", "Inf gradients at step 40 and NaN gradients at step 41"
                ),
            )
        ],
    )
    case(
        f"{alert} warning fires when training crashes after a healthy update",
        scraped(labels, process()),
        [_check(_fired(o, at), alert, _crash_alert(o, "warning"))],
    )
    case(
        f"{alert} does not fire when a training process ends without an exception",
        [_series(START_TIME, labels, _scrapes(minutes, _life(0, gone=at)))],
        [_check(m, alert) for m in range(0, minutes, 2)],
    )
    # The exit wait holds the endpoint for more than one scrape, one of which fails.
    paged = _crash_alert(o, "critical", "NaN gradients at step 41")
    case(
        f"{alert} critical fires once for a crash, through a failed scrape",
        scraped(labels, process(steps=nan41, held=3), failed=(at + 1,)),
        [_check(m, alert, paged) for m in range(_fired(o, at), at + w)]
        + [_check(m, alert) for m in range(at + w, minutes)],
    )
    down = range(at + 1, at + 1 + GAP)
    case(
        f"{alert} critical does not fire again when Prometheus has a gap of {GAP}m after a crash",
        scraped(labels, process(steps=nan41), gaps=down),
        [_check(_fired(o, at), alert, paged)]
        + [_check(m, alert) for m in range(at + w + 1, minutes)],
    )
    first = at + 2  # restarted: a new process, the same labels
    case(
        f"{alert} critical does not fire again when the process restarts after a crash",
        scraped(labels, process(steps=nan41), process(first, crash=minutes)),  # training goes on
        [_check(_fired(o, at), alert, paged)]
        + [_check(m, alert) for m in range(at + w + 1, minutes)],
    )
    # The restarted process reports healthy updates: the crash stays what it was.
    case(
        f"{alert} critical stays critical for its window when the process restarts healthy on the same labels",
        scraped(labels, process(steps=nan41), process(first, crash=minutes)),
        [_check(m, alert, paged) for m in range(_fired(o, at), at + w)],
    )
    again = at + w + 5  # the restarted process is older than the window when it crashes
    case(
        f"{alert} critical fires when a restarted process crashes again, {again - at}m after the last crash",
        scraped(labels, process(steps=nan41), process(first, again, {"nan": (again - 2, 900)})),
        [
            _check(_fired(o, at), alert, paged),
            _check(again, alert),
            _check(
                _fired(o, again), alert, _crash_alert(o, "critical", "NaN gradients at step 900")
            ),
        ],
    )


def rules(o: KitOptions) -> list[dict[str, Any]]:
    return [_rule(o, severity) for severity in ("critical", "warning")]


def cases(o: KitOptions, case: Case) -> None:
    _cases(o, case)


def runbook(o: KitOptions) -> str:
    return f"""## {CRASH_ALERT}

**Meaning.** An uncaught exception ended a training process while gradtel served
its metrics: gradtel counted it by type and by whether NaN or Inf gradients came
before it (`{TRAINING_EXCEPTIONS}{{type=...,gradients=...}}`), and kept the
endpoint up until Prometheus scraped it. The description names the exception,
the targets (and ranks) it ended, and, when NaN or Inf gradients came before, the
latest step with them of each kind (`{LAST_UNHEALTHY_STEP}`).
`severity="critical"` (`gradients="unhealthy"` on any target of the run): the
weights had taken an unhealthy update, or the process's latest scanned update
was unhealthy: the exception is likely their consequence (a policy that samples
from NaN logits, a loss that checks its input, `on_critical="raise"`).
`severity="warning"`: gradtel saw no unhealthy update (AMP overflows the
`GradScaler` skipped are not; the loss scale alert covers those), or none yet,
so the crash has another cause. The crash's own series holds this as the
process saw it when it died: a process restarted on the same labels does not
change the severity (the step named is the latest unhealthy one on those labels
in the window, which can be the new process's). One page per crash: a crash stays in
the window for {o.window}, and failed scrapes and gaps do not page it again. The
alert is one per run: a restarted process that crashes again while it still
fires (a crash loop) joins it without a new page; after it resolves, a new crash
pages anew.

**Look first at** the process's traceback in its log (gradtel passes the
exception on unchanged), the step named in the page against your own logs, and
whether other ranks died with it ({DOWN_ALERT} follows for their endpoints).

**Do**, when critical: resume from the last checkpoint *before* the step named,
not the latest, and treat the NaN first ({ALERT_NAMES["nan"]}, {ALERT_NAMES["inf"]}).
When warning: fix what the traceback says (data, out of memory, a bug) and
resume from the latest checkpoint.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
