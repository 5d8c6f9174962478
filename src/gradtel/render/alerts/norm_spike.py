"""The gradient-norm spike alert: the norm rose far above its median."""

from __future__ import annotations

from typing import Any

from ...metrics import GRAD_NORM, GRAD_NORM_PEAK, NORM_PEAK_SECONDS, START_TIME, Metric
from ..options import NORM_SPIKE_ALERT, KitOptions, duration_seconds, duration_text
from . import promql
from ._promtool import (
    GAP,
    Value,
    _check,
    _labels,
    _life,
    _lives,
    _minutes,
    _rank,
    _scrapes,
    _series,
)
from .alert import Alert, Case

__all__ = ["ALERT"]


def _norm_median(o: KitOptions, selector: str) -> str:
    return f"quantile_over_time(0.5, {GRAD_NORM}{{{selector}}}[{o.spike_baseline}])"


def _norm_peak(selector: str) -> str:
    """The norm's recent peak, through failed scrapes and gaps shorter than it is held."""
    return f"last_over_time({GRAD_NORM_PEAK}{{{selector}}}[{duration_text(NORM_PEAK_SECONDS)}])"


def _rule(o: KitOptions) -> dict[str, Any]:
    sel, factor = o.job_selector, f"{o.spike_factor:g}"
    history = duration_seconds(o.spike_history, "spike_history")
    # The peak gauge holds a one-step spike until a scrape sees it; the median of the
    # per-update norm is the baseline, which one spike does not move. A process younger
    # than spike_history, or with less of norms, has no baseline yet, and its first norms
    # fall fast; its start time tells it from an older process on the same labels.
    ratio = promql.query(
        f"max({_norm_peak(promql.RUN_SCOPE)} / {_norm_median(o, promql.RUN_SCOPE)})",
        *promql.RUN_ARGS,
    )
    peak = promql.query(f"max({_norm_peak(promql.RUN_SCOPE)})", *promql.RUN_ARGS)
    return {
        "alert": NORM_SPIKE_ALERT,
        "expr": promql.per_run(
            _norm_peak(sel),
            f"> {factor} * {_norm_median(o, sel)}",
            "and",
            f"present_over_time({GRAD_NORM}{{{sel}}}[{o.spike_baseline}] offset {o.spike_history})",
            f"and on ({promql.PROCESS})",
            f"{promql.started(o, sel)} < time() - {history}",
        ),
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "The gradient norm spiked",
            "description": (
                f"{promql.where()}: the gradient norm rose to {{{{ with {peak} }}}}{{{{ . | first | value | humanize }}}}"
                f'{{{{ end }}}}, {{{{ with {ratio} }}}}{{{{ . | first | value | printf "%.0f" }}}}{{{{ end }}}} '
                f"times its median over the last {o.spike_baseline} (the alert fires above "
                f"{factor} times); affected ranks: {{{{ $value }}}}. A spike in the gradient norm often comes "
                "before a loss spike or NaN gradients: check the data batch, the learning-rate "
                "schedule, the loss scale, and whether one rank alone is off."
            ),
            "runbook_url": o.runbook(NORM_SPIKE_ALERT),
        },
    }


def _peaks(norms: list[float]) -> list[float]:
    """``gradtel_grad_norm_peak`` of one update a minute: each norm held ``NORM_PEAK_SECONDS``."""
    held = _minutes(NORM_PEAK_SECONDS)
    return [max(norms[max(0, i - held + 1) : i + 1]) for i in range(len(norms))]


def _norm_series(
    o: KitOptions, norms: list[float], labels: str | None = None
) -> list[dict[str, str]]:
    """``gradtel_grad_norm`` with one update a minute, and the peak gauge that holds each
    value for ``NORM_PEAK_SECONDS``, as gradtel exports them, of a process started at 0."""
    labels = _labels(o) if labels is None else labels
    return [
        _series(GRAD_NORM, labels, " ".join(f"{v:g}" for v in norms)),
        _series(GRAD_NORM_PEAK, labels, " ".join(f"{v:g}" for v in _peaks(norms))),
        _series(START_TIME, labels, f"0x{len(norms) - 1}"),
    ]


def _spike_alert(o: KitOptions, peak: float, ranks: int = 1) -> dict[str, Any]:
    return {
        "exp_labels": {"job": o.job, "severity": "warning"},
        "exp_annotations": {
            "summary": "The gradient norm spiked",
            "description": (
                f"{o.job}: the gradient norm rose to {peak:g}, {peak:.0f} times its median over "
                f"the last {o.spike_baseline} (the alert fires above {o.spike_factor:g} times); affected "
                f"ranks: {ranks}. A spike in the gradient norm often comes before a loss spike "
                "or NaN gradients: check the data batch, the learning-rate schedule, the loss "
                "scale, and whether one rank alone is off."
            ),
            "runbook_url": o.runbook(NORM_SPIKE_ALERT),
        },
    }


def _behaviours(o: KitOptions, case: Case) -> None:
    """Cases of the gradient-norm spike alert: a real spike, and what is not one."""
    history = _minutes(duration_seconds(o.spike_history, "spike_history"))
    baseline = _minutes(duration_seconds(o.spike_baseline, "spike_baseline"))
    factor = o.spike_factor
    spike = 2 * factor  # the spike the alert is for: twice the factor
    at = history + 5
    steady = [1.0] * (at + 10)

    spiked = steady[:at] + [spike] + steady[at + 1 :]
    case(
        f"{NORM_SPIKE_ALERT} fires on a {spike:g}x spike of the gradient norm",
        _norm_series(o, spiked),
        [
            _check(at - 1, NORM_SPIKE_ALERT),
            _check(at, NORM_SPIKE_ALERT, _spike_alert(o, spike)),
            _check(at + _minutes(NORM_PEAK_SECONDS) + 1, NORM_SPIKE_ALERT),
        ],
    )
    four = [_rank(o, r) for r in range(4)]
    case(
        f"{NORM_SPIKE_ALERT} fires once for a run of 4 ranks",
        [s for r in four for s in _norm_series(o, spiked, r)],
        [_check(at, NORM_SPIKE_ALERT, _spike_alert(o, spike, ranks=4))],
    )
    # Growth by the factor over the whole baseline window is a trend, not a spike.
    growth = [factor ** (i / baseline) for i in range(baseline + history)]
    case(
        f"{NORM_SPIKE_ALERT} is silent on slow growth",
        _norm_series(o, growth),
        [
            _check(t, NORM_SPIKE_ALERT)
            for t in (history, baseline // 2, baseline, baseline + history - 1)
        ],
    )
    noise = [(1.0, 3.0, 1.5, 2.0)[i % 4] for i in range(at + 10)]
    case(
        f"{NORM_SPIKE_ALERT} is silent on noise within 3x",
        _norm_series(o, noise),
        [_check(t, NORM_SPIKE_ALERT) for t in range(history, at + 10, 3)],
    )
    # A job starts with large norms that fall fast, and has no history to tell a spike by.
    start = [4.0, 2.0] + [1.0] * (history + 5)
    start[history // 2] = spike
    case(
        f"{NORM_SPIKE_ALERT} is silent at job start",
        _norm_series(o, start),
        [_check(t, NORM_SPIKE_ALERT) for t in range(history + 5)],
    )


def _histories(o: KitOptions, case: Case) -> None:
    """The spike alert through failed scrapes, gaps, restarts and late ranks."""
    history = _minutes(duration_seconds(o.spike_history, "spike_history"))
    spike = 2 * o.spike_factor
    at = history + 5
    held = _minutes(NORM_PEAK_SECONDS)
    alert = _spike_alert(o, spike)

    def life(norms: list[float], first: int = 0, gone: int | None = None) -> dict[Metric, Value]:
        """A process's norm series from its first scrape, one update a minute."""
        of = lambda series: _life(lambda m: series[min(m - first, len(series) - 1)], first, gone)  # noqa: E731
        return {
            GRAD_NORM: of(norms),
            GRAD_NORM_PEAK: of(_peaks(norms)),
            START_TIME: _life(first * 60, first, gone),
        }

    def scraped(
        labels: str, *lives: dict[Metric, Value], minutes: int, **how: Any
    ) -> list[dict[str, str]]:
        return [
            _series(metric, labels, _scrapes(minutes, _lives(*(lf[metric] for lf in lives)), **how))  # type: ignore[arg-type]
            for metric in lives[0]
        ]

    spiked = [1.0] * at + [spike] + [1.0] * 10
    case(
        f"{NORM_SPIKE_ALERT} fires once for a spike, through a failed scrape",
        scraped(_labels(o), life(spiked), minutes=len(spiked), failed=(at + 1,)),
        [
            _check(at, NORM_SPIKE_ALERT, alert),
            _check(at + 1, NORM_SPIKE_ALERT, alert),
            _check(at + held, NORM_SPIKE_ALERT),
        ],
    )
    down = range(at + 1, at + 1 + GAP)
    case(
        f"{NORM_SPIKE_ALERT} does not fire when Prometheus has a gap of {GAP}m after a spike",
        scraped(_labels(o), life(spiked), minutes=down.stop + 3, gaps=down),
        [
            _check(at, NORM_SPIKE_ALERT, alert),
            *(_check(m, NORM_SPIKE_ALERT) for m in (at + held + 1, down.stop, down.stop + 1)),
        ],
    )

    # A new process's first norms are large and fall fast, and it has no history: its start
    # time tells it from the old process on the same labels. Past spike_history, it is judged.
    gone = at + 10
    first = gone + 1
    young = [4.0, 2.0] + [1.0] * (history + 10)
    young[history // 2] = young[history + 5] = spike
    minutes = first + len(young)
    case(
        f"{NORM_SPIKE_ALERT} does not fire in a new process's first {o.spike_history} on the same labels",
        scraped(_labels(o), life([1.0] * gone, 0, gone), life(young, first), minutes=minutes),
        [_check(m, NORM_SPIKE_ALERT) for m in range(first, first + history)]
        + [_check(first + history + 5, NORM_SPIKE_ALERT, alert)],
    )
    case(
        f"{NORM_SPIKE_ALERT} does not fire when a rank joins late",
        scraped(_rank(o, 0), life([1.0] * minutes), minutes=minutes)
        + scraped(_rank(o, 1), life(young, first), minutes=first + history),
        [_check(m, NORM_SPIKE_ALERT) for m in range(first, first + history)],
    )


def rules(o: KitOptions) -> list[dict[str, Any]]:
    return [_rule(o)]


def cases(o: KitOptions, case: Case) -> None:
    _behaviours(o, case)
    _histories(o, case)


def runbook(o: KitOptions) -> str:
    return f"""## {NORM_SPIKE_ALERT}

**Meaning.** The L2 norm of the gradients (`{GRAD_NORM}`) rose above
{o.spike_factor:g} times its median over the last {o.spike_baseline}. The alert
reads `{GRAD_NORM_PEAK}`, the largest norm of the last couple of minutes, so a
spike at one step between two scrapes is not missed. A process must have run
for {o.spike_history}, with norms as long, before it is judged: the first minutes of
a job (or of a restarted rank) have no baseline, and their norms fall fast. Slow growth and noise are not spikes.
Norm spikes often come before loss spikes, divergence and NaN gradients: this
is the warning before the page. The norm is exported when the training loop
clips with `gradtel.clip_grad_norm_` or the monitor has `grad_norm=True`.

**Look first at**
- the data batch of that step: a corrupt, duplicated or extreme sample (log the
  batch indices around the spike);
- the learning-rate schedule: the end of warm-up, a restart, a jump;
- the loss scale with fp16 (`scaler.get_scale()`): a scale that just grew;
- one rank alone: `topk(3, {GRAD_NORM_PEAK}{{job="{o.job}"}})` by rank; under FSDP
  each rank has its own shard's norm.

**Do** nothing if it stays one spike and the loss recovers. If spikes repeat,
clip gradients (or lower the clip threshold), lower the learning rate, or skip
the offending batches. Keep the last checkpoint from before the spike out of
rotation: if NaN gradients follow, it is the one to resume from.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
