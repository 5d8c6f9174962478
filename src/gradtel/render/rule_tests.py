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

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..metrics import (
    AMP_LOSS_SCALE,
    FIRST_BAD_LAYER,
    GRAD_NORM,
    GRAD_NORM_PEAK,
    GRADS_TOTAL,
    LAST_UNHEALTHY_STEP,
    LAST_UPDATE_TIMESTAMP,
    NAN_GRADS,
    NONFINITE_LOSS_INCIDENT_STEP,
    NONFINITE_LOSS_UPDATES,
    NORM_PEAK_SECONDS,
    ORIGIN_UPDATES,
    SEVERITIES,
    SKIPPED_UPDATES,
    START_TIME,
    TRAINING_EXCEPTIONS,
    UNHEALTHY_UPDATES,
    UNSCANNED_UPDATES,
    UPDATE_STATUS,
    UPDATES,
    Metric,
)
from .options import (
    ALERT_NAMES,
    AMP_COLLAPSE_ALERT,
    AMP_SKIPS_ALERT,
    AMP_SKIPS_FOR,
    CRASH_ALERT,
    DOWN_ALERT,
    KINDS,
    NORM_SPIKE_ALERT,
    NOTHING_SCANNED_ALERT,
    STALLED_ALERT,
    KitOptions,
    duration_seconds,
    duration_text,
)
from .prometheus import band_text

__all__ = ["rule_tests"]

INSTANCE = "trainer-0:9464"


def _minutes(seconds: int) -> int:
    return math.ceil(seconds / 60)


def _labels(o: KitOptions, **extra: str) -> str:
    labels = {"job": o.job, "instance": INSTANCE, **extra}
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _series(metric: Metric | str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{metric}{labels}", "values": values}


def _band(o: KitOptions, kind: str, severity: str, values: str) -> dict[str, str]:
    return _series(UNHEALTHY_UPDATES, _labels(o, kind=kind, severity=severity), values)


def _layer(o: KitOptions, kind: str, layer: str, values: str) -> dict[str, str]:
    return _series(GRADS_TOTAL[kind], _labels(o, layer=layer), values)


def _steps(before: int, value: int, after: int) -> str:
    """``before`` samples of 0, then ``after`` samples of ``value``: one jump between two scrapes."""
    return f"0x{before - 1} {value}x{after - 1}"


def _unhealthy_alert(
    o: KitOptions,
    kind: str,
    severity: str,
    layers: str,
    first_bad: tuple[str, int] | None = None,
    *,
    ranks: int = 1,
    origin: str = "",
    forward: bool = False,
    run: str = "",
) -> dict[str, Any]:
    """The one alert of a run; ``origin`` is the expected "It originated on ..." sentence."""
    label = KINDS[kind]
    return {
        "exp_labels": {
            "job": o.job,
            "kind": kind,
            "severity": severity,
            **({"run": run} if run else {}),
        },
        "exp_annotations": {
            "summary": f"Training produced {label} gradients ({severity})",
            "description": (
                f"{o.job}{f' run {run}' if run else ''}: an update in the last {o.window} had {band_text(o, severity)} {label} "
                f"gradient values; affected ranks: {ranks}."
                + (f" {origin}" if origin else "")
                + (
                    " The loss was already non-finite: it entered in the forward pass."
                    if forward
                    else ""
                )
                + f" Layers with {label} values in that window: {layers}."
                + (
                    f" First bad layer in backward order: {first_bad[0]}, at step {first_bad[1]}."
                    if first_bad
                    else ""
                )
            ),
            "runbook_url": o.runbook(ALERT_NAMES[kind]),
        },
    }


def _check(at: int, alert: str, *expected: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": f"{at}m", "alertname": alert, "exp_alerts": list(expected)}


def _fired(o: KitOptions, minute: int) -> int:
    """When an unhealthy-update alert first seen at ``minute`` fires: at the first evaluation
    its ``for`` later."""
    return minute + _minutes(duration_seconds(o.settle))


Value = float | str | None | Callable[[int], float | str | None]
"""A sample by minute: a number, ``"stale"`` (a staleness marker) or None (no sample)."""


def _life(
    value: Value, first: int = 0, gone: int | None = None
) -> Callable[[int], float | str | None]:
    """A series of one process: ``value`` (or ``value(minute)``) from its first scrape; a
    staleness marker at ``gone``, the first scrape after it ended; nothing else."""

    def at(minute: int) -> float | str | None:
        if minute < first or (gone is not None and minute > gone):
            return None
        if minute == gone:
            return "stale"
        return value(minute) if callable(value) else value

    return at


def _lives(*lives: Callable[[int], float | str | None]) -> Callable[[int], float | str | None]:
    """One series across restarts of processes with the same labels."""
    return lambda minute: next((v for v in (life(minute) for life in lives) if v is not None), None)


def _count(*updates: int, by: int = 1) -> Callable[[int], int]:
    """A counter that counts ``by`` at each of ``updates`` (minutes)."""
    return lambda minute: by * sum(minute >= u for u in updates)


def _scrapes(
    minutes: int, value: Value, *, failed: Sequence[int] = (), gaps: Sequence[int] = ()
) -> str:
    """promtool's notation of a series scraped once a minute: a staleness marker at a failed
    scrape, no sample in a gap (Prometheus down)."""
    samples = []
    for minute in range(minutes):
        sample = value(minute) if callable(value) else value
        if minute in gaps or sample is None:
            sample = "_"
        elif minute in failed:
            sample = "stale"
        samples.append(sample)
    return _notation(samples)


def _notation(samples: list[float | str]) -> str:
    words = []
    for sample, run in itertools.groupby(samples):
        n = len(list(run))
        if sample == "stale":
            words += ["stale"] * n
        elif sample == "_":
            words.append(f"_x{n}")
        else:
            words.append(f"{sample:g}" + f"x{n - 1}" * (n > 1))
    return " ".join(words)


def _rank(o: KitOptions, rank: int, **extra: str) -> str:
    """The labels of rank ``rank``'s target."""
    return _labels(o, rank=str(rank), **extra).replace(INSTANCE, f"trainer-{rank}:9464")


def _more(labels: str, **extra: str) -> str:
    """``labels`` with ``extra``."""
    return labels[:-1] + "".join(f',{k}="{v}"' for k, v in extra.items()) + "}"


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


def rule_tests(o: KitOptions) -> dict[str, Any]:
    """The ``promtool test rules`` file for the rules rendered from ``o``."""
    window = _minutes(duration_seconds(o.window, "window"))
    span = window + 10  # every case runs well past one window
    nan, inf = ALERT_NAMES["nan"], ALERT_NAMES["inf"]
    cases: list[dict[str, Any]] = []

    def case(
        name: str, series: list[dict[str, str]], checks: list[dict[str, Any]], interval: str = "1m"
    ) -> None:
        cases.append(
            {"name": name, "interval": interval, "input_series": series, "alert_rule_test": checks}
        )

    for kind in KINDS:
        alert = ALERT_NAMES[kind]
        case(
            f"{alert} warning fires on a single warning-band update",
            [
                _band(o, kind, "warning", _steps(3, 1, span)),
                _band(o, kind, "critical", f"0x{span + 2}"),
                _layer(o, kind, "encoder.0", _steps(3, 3, span)),
                _layer(o, kind, "head", f"0x{span + 2}"),
            ],
            [
                _check(2, alert),
                _check(3, alert),  # until every rank's scrape of the update is in
                _check(_fired(o, 3), alert, _unhealthy_alert(o, kind, "warning", "encoder.0 (3)")),
            ],
        )
        case(
            f"{alert} critical fires on a single critical-band update",
            [
                _band(o, kind, "warning", f"0x{span + 2}"),
                _band(o, kind, "critical", _steps(3, 1, span)),
                _layer(o, kind, "encoder.0", _steps(3, 2, span)),
                _layer(o, kind, "head", _steps(3, 7, span)),
            ],
            [
                _check(
                    _fired(o, 3),
                    alert,
                    _unhealthy_alert(o, kind, "critical", "head (7), encoder.0 (2)"),
                )
            ],
        )

    case(
        f"{nan} critical names the first bad layer in backward order",
        [
            _band(o, "nan", "critical", _steps(3, 1, span)),
            _layer(o, "nan", "encoder.0", _steps(3, 9, span)),
            _layer(o, "nan", "encoder.1", _steps(3, 8, span)),
            _series(FIRST_BAD_LAYER, _labels(o, kind="nan", layer="encoder.1"), f"_x2 3x{span}"),
        ],
        [
            _check(
                _fired(o, 3),
                nan,
                _unhealthy_alert(
                    o, "nan", "critical", "encoder.0 (9), encoder.1 (8)", ("encoder.1", 3)
                ),
            )
        ],
    )
    case(
        f"{nan} names the first NaN layer, not the first layer of a later Inf update",
        [
            _band(o, "nan", "critical", _steps(3, 1, span)),
            _band(o, "inf", "critical", _steps(5, 1, span)),
            _layer(o, "nan", "body.0", _steps(3, 6, span)),
            _layer(o, "inf", "head", _steps(5, 7, span)),
            _series(FIRST_BAD_LAYER, _labels(o, kind="nan", layer="body.0"), f"_x2 3x{span}"),
            _series(FIRST_BAD_LAYER, _labels(o, kind="inf", layer="head"), f"_x4 5x{span}"),
        ],
        [
            _check(6, nan, _unhealthy_alert(o, "nan", "critical", "body.0 (6)", ("body.0", 3))),
            _check(6, inf, _unhealthy_alert(o, "inf", "critical", "head (7)", ("head", 5))),
        ],
    )
    four = [_rank(o, r) for r in range(4)]
    case(
        f"{nan} fires once for a run of 4 ranks, saying which rank it originated on",
        [
            _series(
                UNHEALTHY_UPDATES, r[:-1] + ',kind="nan",severity="critical"}', _steps(3, 1, span)
            )
            for r in four
        ]
        + [_series(NAN_GRADS, r[:-1] + ',layer="head"}', _steps(3, 9, span)) for r in four]
        + [
            _series(ORIGIN_UPDATES, r[:-1] + ',kind="nan"}', _steps(3, int(i == 2), span))
            for i, r in enumerate(four)
        ]
        + [
            _series(FIRST_BAD_LAYER, r[:-1] + ',kind="nan",layer="head"}', f"_x2 30x{span}")
            for r in four
        ],
        [
            _check(
                _fired(o, 3),
                nan,
                _unhealthy_alert(
                    o,
                    "nan",
                    "critical",
                    "head (9)",
                    ("head", 30),
                    ranks=4,
                    origin="It originated on rank 2.",
                ),
            )
        ],
    )

    def incident(
        kind: str, first_bad: str, loss_step: str, layer: str = "head"
    ) -> list[dict[str, str]]:
        """An incident's first bad layer (its step), and the step of the newest incident whose
        first update had a non-finite loss."""
        return [
            _series(FIRST_BAD_LAYER, _labels(o, kind=kind, layer=layer), first_bad),
            _series(NONFINITE_LOSS_INCIDENT_STEP, _labels(o, kind=kind), loss_step),
        ]

    def losses(values: str) -> dict[str, str]:
        """The updates whose loss was non-finite (what the rules once read)."""
        return _series(NONFINITE_LOSS_UPDATES, _labels(o), values)

    def page(kind: str, first_bad: tuple[str, int] = ("head", 30), **how: Any) -> dict[str, Any]:
        return _unhealthy_alert(o, kind, "critical", "none in the counters yet", first_bad, **how)

    case(
        f"{nan} says when the loss was already non-finite (the forward pass)",
        [
            _band(o, "nan", "critical", _steps(3, 1, span)),
            losses(_steps(3, 1, span)),
            *incident("nan", f"_x2 30x{span}", f"0x2 30x{span}"),
        ],
        [_check(_fired(o, 3), nan, page("nan", forward=True))],
    )
    # An Inf loss makes NaN and Inf gradients in one update: both pages say where it entered.
    case(
        f"{nan} and {inf} say the loss was already non-finite when one update with an Inf loss had both",
        [
            _band(o, "nan", "critical", _steps(3, 1, span)),
            _band(o, "inf", "critical", _steps(3, 1, span)),
            losses(_steps(3, 1, span)),
            *incident("nan", f"_x2 30x{span}", f"0x2 30x{span}"),
            *incident("inf", f"_x2 30x{span}", f"0x2 30x{span}"),
        ],
        [_check(_fired(o, 3), ALERT_NAMES[kind], page(kind, forward=True)) for kind in KINDS],
    )
    # Once NaN is in the weights every later loss is NaN: the page describes where the
    # incident started, its first unhealthy update, however long it lasts.
    case(
        f"{nan} says the loss was already non-finite when the incident's first update had a non-finite loss",
        [
            _band(o, "nan", "critical", f"0x2 1+1x{span}"),
            losses(f"0x2 1+1x{span}"),
            *incident("nan", f"_x2 30x{span}", f"0x2 30x{span}"),
        ],
        [_check(t, nan, page("nan", forward=True)) for t in (4, window + 5)],
    )
    case(
        f"{nan} does not say the loss was non-finite when the incident's first update had a finite loss",
        [
            _band(o, "nan", "critical", f"0x2 1+1x{span}"),
            losses(f"0x3 1+1x{span}"),
            *incident("nan", f"_x2 30x{span}", f"0x{span + 2}"),
        ],
        [_check(t, nan, page("nan")) for t in (4, window + 5)],
    )
    # An Inf update with a finite loss, then NaN losses: the NaN incident began in the Inf one.
    case(
        f"{inf} does not say the loss was non-finite when an Inf update with a finite loss came before the NaN losses",
        [
            _band(o, "inf", "critical", f"0x2 1x{span}"),
            _band(o, "nan", "critical", f"0x3 1+1x{span}"),
            losses(f"0x3 1+1x{span}"),
            *incident("inf", f"_x2 30x{span}", f"0x{span + 2}"),
            *incident("nan", f"_x3 31x{span}", f"0x{span + 3}"),
        ],
        [_check(5, inf, page("inf")), _check(5, nan, page("nan", ("head", 31)))],
    )
    # An older incident began with a non-finite loss; the newer one, in backward.
    newer = 6
    case(
        f"{inf} does not say the loss was non-finite when an older NaN incident in the window began with one",
        [
            _band(o, "inf", "critical", f"0x{newer - 1} 1x{span}"),
            _band(o, "nan", "critical", f"0x2 1x{span}"),
            losses(f"0x2 1x{span}"),
            *incident("nan", f"_x2 100x{span}", f"0x2 100x{span}"),
            *incident("inf", f"_x{newer - 1} 160x{span}", f"0x{span + newer}", layer="2"),
        ],
        [_check(newer + 1, inf, page("inf", ("2", 160)))],
    )
    case(
        f"{nan} does not say the loss was non-finite when an older NaN incident in the window began with one",
        [
            _band(o, "nan", "critical", f"0x2 1x{newer - 3} 2x{span}"),
            losses(f"0x2 1x{span}"),
            *incident("nan", f"_x2 100x{span}", f"0x2 100x{span}"),
            _series(
                FIRST_BAD_LAYER, _labels(o, kind="nan", layer="2"), f"_x{newer - 1} 160x{span}"
            ),
        ],
        [_check(newer + 1, nan, page("nan", ("2", 160)))],
    )
    case(
        f"{nan} names every rank it originated on",
        [
            _series(
                UNHEALTHY_UPDATES, r[:-1] + ',kind="nan",severity="critical"}', _steps(3, 1, span)
            )
            for r in four
        ]
        + [
            _series(ORIGIN_UPDATES, r[:-1] + ',kind="nan"}', _steps(3, int(i in (0, 3)), span))
            for i, r in enumerate(four)
        ],
        [
            _check(
                _fired(o, 3),
                nan,
                _unhealthy_alert(
                    o,
                    "nan",
                    "critical",
                    "none in the counters yet",
                    ranks=4,
                    origin="It originated on ranks 0, 3.",
                ),
            )
        ],
    )
    case(
        f"{nan} warning and critical both fire when both happen in one window",
        [
            _band(o, "nan", "warning", _steps(2, 1, span)),
            _band(o, "nan", "critical", _steps(4, 1, span)),
            _layer(o, "nan", "fc1", _steps(2, 2, 2) + f" 9x{span - 2}"),
        ],
        [
            _check(
                5,
                nan,
                _unhealthy_alert(o, "nan", "critical", "fc1 (9)"),
                _unhealthy_alert(o, "nan", "warning", "fc1 (9)"),
            )
        ],
    )
    healthy = [
        _band(o, kind, severity, f"0x{span}")
        for kind in KINDS
        for severity in ("warning", "critical")
    ] + [_series(UPDATES, _labels(o), f"0+60x{span}")]
    case(
        f"{nan} and {inf} do not fire on healthy updates",
        healthy,
        [_check(t, alert) for t in (1, window, span) for alert in (nan, inf)],
    )
    case(
        f"{inf} critical does not fire on a counter reset alone (training restarted)",
        [_band(o, "inf", "critical", f"1x{window + 2} 0x{span}")],
        [_check(window + 4, inf), _check(window + span, inf)],
    )
    case(
        f"{inf} critical fires when the very first update after start is critical",
        [
            _series(
                UNHEALTHY_UPDATES,
                _labels(o, kind="inf", severity="critical"),
                f"_x2 1x{span}",
            ),
            _series(START_TIME, _labels(o), f"_x2 120x{span}"),
            _layer(o, "inf", "head", f"_x2 7x{span}"),
        ],
        [
            _check(_fired(o, 2), inf, _unhealthy_alert(o, "inf", "critical", "head (7)")),
            _check(2 + window + 1, inf),
        ],
    )
    case(
        f"{nan} critical resolves {o.window} after the last unhealthy update",
        [
            _band(o, "nan", "critical", _steps(3, 1, span)),
            _layer(o, "nan", "fc1", _steps(3, 6, span)),
        ],
        # Not at 2 + window: Prometheus 2.x's ranges still hold the sample on their left
        # edge, the one before the update, and 3.x's (left-open) do not.
        [
            _check(1 + window, nan, _unhealthy_alert(o, "nan", "critical", "fc1 (6)")),
            _check(3 + window, nan),
        ],
    )

    up_labels = _labels(o)
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
    _coverage_cases(o, case, span)
    _norm_spike_cases(o, case)
    _unhealthy_histories(o, case)
    _first_bad_histories(o, case)
    _norm_spike_histories(o, case)
    _stall_histories(o, case)
    _down_histories(o, case)
    _coverage_histories(o, case)
    _amp_collapse_cases(o, case)
    _crash_cases(o, case)
    return {"rule_files": ["gradtel-rules.yml"], "evaluation_interval": "1m", "tests": cases}


def _coverage_cases(o: KitOptions, case: Any, span: int) -> None:
    """Cases of the alerts that say when gradtel cannot see, or AMP keeps skipping."""
    window = _minutes(duration_seconds(o.window, "window"))
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


def _norm_spike_cases(o: KitOptions, case: Any) -> None:
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


Case = Callable[..., None]
LOOKBACK = 5
"""Prometheus' default lookback (minutes): an instant lookup finds no sample older than that."""
GAP = LOOKBACK + 3
"""A Prometheus gap (a restart, an outage) in which instant lookups find nothing for minutes."""
OUTAGE = 3
"""Minutes of failed scrapes: a staleness marker, then no sample until a scrape succeeds."""


def _incident(
    o: KitOptions,
    kind: str,
    severity: str,
    minutes: int,
    update: int,
    *,
    failed: Sequence[int] = (),
    gaps: Sequence[int] = (),
    labels: str | None = None,
) -> list[dict[str, str]]:
    """A process scraped from minute 0 with one unhealthy update, at ``update``; its layer
    ``head`` (7 values) gets its series with it, as per-layer series are born on demand."""
    labels = _labels(o) if labels is None else labels
    scrape = lambda value: _scrapes(minutes, value, failed=failed, gaps=gaps)  # noqa: E731
    return [
        _series(
            UNHEALTHY_UPDATES, _more(labels, kind=kind, severity=severity), scrape(_count(update))
        ),
        _series(START_TIME, labels, scrape(0)),
        _series(GRADS_TOTAL[kind], _more(labels, layer="head"), scrape(_life(7, first=update))),
    ]


def _unhealthy_histories(o: KitOptions, case: Case) -> None:
    """The unhealthy-update alerts through failed scrapes, gaps, restarts and late ranks."""
    w = _minutes(duration_seconds(o.window, "window"))
    old = w + 5  # an incident in a process older than the window
    nan, inf = ALERT_NAMES["nan"], ALERT_NAMES["inf"]

    for kind in KINDS:
        alert = ALERT_NAMES[kind]
        for severity in SEVERITIES:
            paged = _unhealthy_alert(o, kind, severity, "head (7)")
            failed = range(old + 2 * w, old + 2 * w + OUTAGE)
            case(
                f"{alert} {severity} does not fire when scrapes fail for {OUTAGE}m, "
                f"{duration_text(2 * w * 60)} after an incident",
                _incident(
                    o, kind, severity, failed.stop + w + 1, old, failed=failed[:1], gaps=failed[1:]
                ),
                [
                    _check(_fired(o, old), alert, paged),
                    *(
                        _check(at, alert)
                        for at in (
                            old + w + 1,
                            failed.start,
                            *range(failed.start + w, failed.stop + w + 1),
                        )
                    ),
                ],
            )
            down = range(old + w + 2, old + w + 2 + GAP)
            case(
                f"{alert} {severity} does not fire when Prometheus has a gap of {GAP}m after an incident",
                _incident(o, kind, severity, down.stop + w + 2, old, gaps=down),
                [
                    _check(_fired(o, old), alert, paged),
                    *(
                        _check(at, alert)
                        for at in (
                            down.start,
                            down.stop,
                            *range(down.stop - 3 + w, down.stop + w + 1),
                        )
                    ),
                ],
            )

    blip = old + 4 * w
    case(
        f"{nan} critical does not fire when one scrape fails {duration_text(4 * w * 60)} after an incident",
        _incident(o, "nan", "critical", blip + w + 2, old, failed=(blip,)),
        [_check(at, nan) for at in (old + w + 1, blip, blip + w, blip + w + 1)],
    )
    # increase() sees it while the window holds a sample from each side of the gap: for
    # the alert's `for`, two evaluations, on the left-open ranges of Prometheus 3.x too.
    down = range(old, old + min(GAP, w - 3))
    case(
        f"{nan} critical fires when the unhealthy update came during a Prometheus gap",
        _incident(o, "nan", "critical", down.stop + w, down.start + len(down) // 2, gaps=down),
        [
            _check(down.stop - 1, nan),
            _check(_fired(o, down.stop), nan, _unhealthy_alert(o, "nan", "critical", "head (7)")),
            _check(old + w, nan),
        ],
    )

    # A new incident on two ranks, failed scrapes one window before it: the old incident's
    # origin rank, non-finite loss and layer counts are not the new one's.
    failed = range(old + w + 2, old + w + 2 + OUTAGE)
    again = failed.start + w - _fired(o, 0)  # paged when the offset lookup meets the failed scrapes
    series = []
    for rank in (0, 1):
        labels = _rank(o, rank)
        scrape = lambda value: _scrapes(again + 3, value, failed=failed[:1], gaps=failed[1:])  # noqa: E731
        series += [
            _series(
                UNHEALTHY_UPDATES,
                _more(labels, kind="nan", severity="critical"),
                scrape(_count(old, again)),
            ),
            _series(START_TIME, labels, scrape(0)),
            _series(
                ORIGIN_UPDATES, _more(labels, kind="nan"), scrape(_count(old if rank else again))
            ),
            _series(NONFINITE_LOSS_UPDATES, labels, scrape(_count(old) if rank else 0)),
            _series(
                NONFINITE_LOSS_INCIDENT_STEP,
                _more(labels, kind="nan"),
                scrape(lambda m, rank=rank: 100 * old if rank and m >= old else 0),
            ),
            _series(
                NAN_GRADS,
                _more(labels, layer="head"),
                scrape(_life(_count(old, again, by=7), first=old)),
            ),
            _series(
                FIRST_BAD_LAYER,
                _more(labels, kind="nan", layer="head"),
                scrape(_life(lambda minute: 100 * (again if minute >= again else old), first=old)),
            ),
        ]
    case(
        f"{nan} fires when a new incident follows a failed scrape, naming its own origin rank, loss and counts",
        series,
        [
            _check(
                _fired(o, old),
                nan,
                _unhealthy_alert(
                    o,
                    "nan",
                    "critical",
                    "head (7)",
                    ("head", 100 * old),
                    ranks=2,
                    origin="It originated on rank 1.",
                    forward=True,
                ),
            ),
            _check(again - 1, nan),
            _check(
                _fired(o, again),
                nan,
                _unhealthy_alert(
                    o,
                    "nan",
                    "critical",
                    "head (7)",
                    ("head", 100 * again),
                    ranks=2,
                    origin="It originated on rank 0.",
                ),
            ),
        ],
    )

    # Restarts: the new process has the labels of the old one (no run label).
    gone = old + 2 * w
    first = gone + 2
    labels = _labels(o)

    def restart(new_count: int, failed: Sequence[int] = ()) -> list[dict[str, str]]:
        scrape = lambda old_value, new_value: _scrapes(  # noqa: E731
            first + w + 3,
            _lives(_life(old_value, gone=gone), _life(new_value, first)),
            failed=failed,
        )
        return [
            _series(
                UNHEALTHY_UPDATES,
                _more(labels, kind="nan", severity="critical"),
                scrape(_count(old), new_count),
            ),
            _series(START_TIME, labels, scrape(0, first * 60)),
            _series(
                NAN_GRADS,
                _more(labels, layer="head"),
                scrape(_life(7, old), 7 if new_count else None),
            ),
        ]

    case(
        f"{nan} critical fires when a restarted process's first update is unhealthy, its count equal to the old one's last",
        restart(1),
        [
            _check(_fired(o, old), nan, _unhealthy_alert(o, "nan", "critical", "head (7)")),
            _check(first - 1, nan),
            _check(_fired(o, first), nan, _unhealthy_alert(o, "nan", "critical", "head (7)")),
            _check(first + w + 1, nan),
        ],
    )
    case(
        f"{nan} critical does not fire when a process restarts with the same labels",
        restart(0, failed=(first + 1,)),
        [
            _check(at, nan)
            for at in (gone, _fired(o, first), first + 1, _fired(o, first + 1 + w), first + w + 2)
        ],
    )
    runs = {run: _labels(o, run=run) for run in ("a", "b")}
    case(
        f"{nan} critical fires when a new run starts with an unhealthy update, for that run alone",
        [
            *_incident(o, "nan", "critical", first + w, old, labels=runs["a"]),
            _series(
                UNHEALTHY_UPDATES,
                _more(runs["b"], kind="nan", severity="critical"),
                _scrapes(first + w, _life(1, first)),
            ),
            _series(START_TIME, runs["b"], _scrapes(first + w, _life(first * 60, first))),
        ],
        [
            _check(
                _fired(o, old), nan, _unhealthy_alert(o, "nan", "critical", "head (7)", run="a")
            ),
            _check(
                _fired(o, first),
                nan,
                _unhealthy_alert(o, "nan", "critical", "none in the counters yet", run="b"),
            ),
        ],
    )
    two = [_rank(o, rank) for rank in (0, 1)]
    case(
        f"{nan} critical does not fire when a rank restarts",
        _incident(o, "nan", "critical", first + w + 2, old, labels=two[0])
        + [
            _series(
                UNHEALTHY_UPDATES,
                _more(two[1], kind="nan", severity="critical"),
                _scrapes(first + w + 2, _lives(_life(_count(old), gone=gone), _life(0, first))),
            ),
            _series(
                START_TIME,
                two[1],
                _scrapes(first + w + 2, _lives(_life(0, gone=gone), _life(first * 60, first))),
            ),
        ],
        [
            _check(
                _fired(o, old), nan, _unhealthy_alert(o, "nan", "critical", "head (7)", ranks=2)
            ),
            *(_check(at, nan) for at in (gone, first, _fired(o, first), first + w)),
        ],
    )

    # Ranks that join a job late: their first scrape is young, healthy or not.
    late = [_rank(o, rank) for rank in range(3)]
    joins = old + 2 * w
    minutes = joins + w + 4
    joined = lambda rank, value: [  # noqa: E731
        _series(
            UNHEALTHY_UPDATES,
            _more(late[rank], kind="inf", severity="warning"),
            _scrapes(minutes, _life(value, joins)),
        ),
        _series(START_TIME, late[rank], _scrapes(minutes, _life(joins * 60, joins))),
    ]
    case(
        f"{inf} warning does not fire when a rank joins late",
        _incident(o, "inf", "warning", minutes, old, labels=late[0]) + joined(1, 0),
        [_check(at, inf) for at in (joins, _fired(o, joins), joins + w)],
    )
    case(
        f"{inf} warning fires when a rank that joins late starts with an unhealthy update",
        _incident(o, "inf", "warning", minutes, old, labels=late[0]) + joined(1, 0) + joined(2, 1),
        [
            _check(joins - 1, inf),
            _check(
                _fired(o, joins),
                inf,
                _unhealthy_alert(o, "inf", "warning", "none in the counters yet"),
            ),
            _check(joins + w + 1, inf),
        ],
    )

    # The ranks' scrapes of one update are spread over a scrape interval: the alert waits
    # for the last, here rank 3's, where the NaN originated.
    step = duration_seconds(o.scrape_interval)
    update = 3 * 60 // step
    scrapes = (3 + w + 1) * 60 // step
    four = [_rank(o, rank) for rank in range(4)]

    def spread(rank: int, value: object) -> str:
        return f"0x{update - 1 + (rank == 3)} {value}x{scrapes - update - (rank == 3)}"

    case(
        f"{nan} critical fires once every rank's scrape of the update is in, counting them all",
        [
            _series(UNHEALTHY_UPDATES, _more(r, kind="nan", severity="critical"), spread(i, 1))
            for i, r in enumerate(four)
        ]
        + [
            _series(ORIGIN_UPDATES, _more(r, kind="nan"), spread(i, int(i == 3)))
            for i, r in enumerate(four)
        ],
        [
            _check(3, nan),
            _check(
                _fired(o, 3),
                nan,
                _unhealthy_alert(
                    o,
                    "nan",
                    "critical",
                    "none in the counters yet",
                    ranks=4,
                    origin="It originated on rank 3.",
                ),
            ),
        ],
        interval=o.scrape_interval,
    )

    # A process that crashes right after the update, before the alert's `for` ends: one
    # scrape has it, between two evaluations, and a staleness marker follows, as
    # Prometheus writes it.
    at = old * 60 // step + 1
    crashes = (
        (
            f"{nan} critical fires when the process crashes right after the update, naming its first bad layer",
            "nan",
            0,
        ),
        (
            f"{inf} critical fires when a process's first and only scrape shows the update, before a crash",
            "inf",
            at,
        ),
    )
    for name, kind, first in crashes:
        alert = ALERT_NAMES[kind]
        paged = _unhealthy_alert(o, kind, "critical", "head (7)", ("head", 100 * old))
        healthy = at - first  # scrapes of the process before the update's
        since = f"_x{first} " * bool(first)
        case(
            name,
            [
                _series(
                    UNHEALTHY_UPDATES,
                    _labels(o, kind=kind, severity="critical"),
                    since + f"0x{healthy - 1} " * bool(healthy) + "1 stale",
                ),
                _series(START_TIME, _labels(o), since + f"{first * step}x{healthy} stale"),
                _series(GRADS_TOTAL[kind], _labels(o, layer="head"), f"_x{at} 7 stale"),
                _series(
                    FIRST_BAD_LAYER,
                    _labels(o, kind=kind, layer="head"),
                    f"_x{at} {100 * old} stale",
                ),
            ],
            [
                _check(_fired(o, old + 1), alert, paged),
                _check(old + w - 1, alert, paged),
                _check(old + w + 1, alert),
            ],
            interval=o.scrape_interval,
        )


def _first_bad_histories(o: KitOptions, case: Case) -> None:
    """The first bad layer a page names is the newest incident's."""
    w = _minutes(duration_seconds(o.window, "window"))
    nan = ALERT_NAMES["nan"]
    old = w + 5
    rollback = _fired(o, old) + 1  # reset_health() after restoring a checkpoint
    again = rollback + 1
    minutes = again + w + 2
    scrape = lambda value: _scrapes(minutes, value)  # noqa: E731
    labels = _labels(o)
    case(
        f"{nan} critical names the new incident's first bad layer after a rollback to an earlier step",
        [
            _series(
                UNHEALTHY_UPDATES,
                _more(labels, kind="nan", severity="critical"),
                scrape(_count(old, again)),
            ),
            _series(START_TIME, labels, scrape(0)),
            _series(NAN_GRADS, _more(labels, layer="body.3"), scrape(_life(7, old))),
            _series(NAN_GRADS, _more(labels, layer="body.1"), scrape(_life(9, again))),
            _series(
                FIRST_BAD_LAYER,
                _more(labels, kind="nan", layer="body.3"),
                scrape(_life(lambda minute: 0 if minute >= rollback else 500, old)),
            ),
            _series(
                FIRST_BAD_LAYER,
                _more(labels, kind="nan", layer="body.1"),
                scrape(_life(450, again)),
            ),
        ],
        [
            _check(
                _fired(o, old),
                nan,
                _unhealthy_alert(o, "nan", "critical", "body.3 (7)", ("body.3", 500)),
            ),
            _check(
                _fired(o, again),
                nan,
                _unhealthy_alert(o, "nan", "critical", "body.1 (9), body.3 (7)", ("body.1", 450)),
            ),
            _check(again + w + 1, nan),
        ],
    )
    # Two ranks of one DDP run: rank 0 took an older incident that began with a NaN loss
    # (its policy skipped it), the new one began with a NaN loss on rank 1 only, whose
    # scrape fails as the page fires.
    fires = _fired(o, old)
    two: list[dict[str, str]] = []
    for rank in (0, 1):

        def scrape(value: Value, rank: int = rank) -> str:
            return _scrapes(fires + 3, value, failed=(fires,) if rank else ())

        labels_of = _rank(o, rank)
        two += [
            _series(START_TIME, labels_of, scrape(0)),
            _series(
                UNHEALTHY_UPDATES,
                _more(labels_of, kind="nan", severity="critical"),
                scrape(_count(old)),
            ),
            _series(NONFINITE_LOSS_UPDATES, labels_of, scrape(_count(old) if rank else 1)),
            _series(
                FIRST_BAD_LAYER,
                _more(labels_of, kind="nan", layer="head"),
                scrape(lambda m: 300 if m >= old else 50),
            ),
            _series(
                NONFINITE_LOSS_INCIDENT_STEP,
                _more(labels_of, kind="nan"),
                scrape((lambda m: 300 if m >= old else 0) if rank else 50),
            ),
        ]
    case(
        f"{nan} says the loss was already non-finite when the rank whose loss was has its scrape fail as the page fires",
        two,
        [
            _check(
                fires, nan,
                _unhealthy_alert(o, "nan", "critical", "none in the counters yet", ("head", 300), ranks=2, forward=True),
            )
        ],
    )  # fmt: skip
    # A process crashes after an incident that began with a NaN loss; the job restarts it
    # from a checkpoint, under a new pod (new instance label) or on the same labels.
    pod_a, pod_b = _labels(o), _labels(o).replace(INSTANCE, "trainer-0b:9464")
    crashed_a = [
        _series(FIRST_BAD_LAYER, _more(pod_a, kind="nan", layer="head"), "_ _ 100 stale"),
        _series(NONFINITE_LOSS_INCIDENT_STEP, _more(pod_a, kind="nan"), "_ _ 100 stale"),
    ]
    case(
        f"{nan} critical names the new pod's incident, at an earlier step and with a finite loss, not the crashed pod's",
        crashed_a
        + [
            _series(START_TIME, pod_a, "0x2 stale"),
            _series(
                UNHEALTHY_UPDATES, _more(pod_a, kind="nan", severity="critical"), "0 0 1 stale"
            ),
            _series(NONFINITE_LOSS_UPDATES, pod_a, "0 0 1 stale"),
            _series(START_TIME, pod_b, "_x3 180x5"),
            _series(UNHEALTHY_UPDATES, _more(pod_b, kind="nan", severity="critical"), "_x3 0 1x4"),
            _series(FIRST_BAD_LAYER, _more(pod_b, kind="nan", layer="2"), "_x4 60x4"),
            _series(NONFINITE_LOSS_UPDATES, pod_b, "_x3 0x5"),
        ],
        [
            _check(
                _fired(o, 4),
                nan,
                _unhealthy_alert(
                    o, "nan", "critical", "none in the counters yet", ("2", 60), ranks=2
                ),
            )
        ],
    )
    # The restarted process exports no step of its own yet: the crashed one's stands.
    case(
        f"{nan} critical still says the crashed process's incident began with a non-finite loss once it restarts on the same labels",
        crashed_a
        + [
            _series(START_TIME, pod_a, "0x2 stale 240x4"),
            _series(
                UNHEALTHY_UPDATES, _more(pod_a, kind="nan", severity="critical"), "0 0 1 stale 0x4"
            ),
            _series(NONFINITE_LOSS_UPDATES, pod_a, "0 0 1 stale 0x4"),
        ],
        [
            _check(
                t,
                nan,
                _unhealthy_alert(
                    o, "nan", "critical", "none in the counters yet", ("head", 100), forward=True
                ),
            )
            for t in (3, 5)
        ],
    )
    # A rollback by restarting the process on the same labels, and the scrape of the
    # evaluation that fires fails: the dead process's first bad layer, with a higher step,
    # is still in the window; the page names the new process's.
    gone, bad = 14, 17
    fires = _fired(o, bad)
    scrape = lambda value: _scrapes(fires + 6, value, failed=(fires,))  # noqa: E731
    case(
        f"{nan} critical names the restarted process's first bad layer through a failed scrape as it fires",
        [
            _series(
                START_TIME,
                labels,
                scrape(_lives(_life(0, 0, gone), _life(60 * (gone + 1), gone + 1))),
            ),
            _series(
                UNHEALTHY_UPDATES,
                _more(labels, kind="nan", severity="critical"),
                scrape(_lives(_life(_count(2), 0, gone), _life(_count(bad), gone + 1))),
            ),
            _series(
                FIRST_BAD_LAYER,
                _more(labels, kind="nan", layer="body.3"),
                scrape(_life(500, 2, gone)),
            ),
            _series(
                FIRST_BAD_LAYER, _more(labels, kind="nan", layer="body.1"), scrape(_life(400, bad))
            ),
        ],
        [
            _check(
                fires,
                nan,
                _unhealthy_alert(o, "nan", "critical", "none in the counters yet", ("body.1", 400)),
            )
        ],
    )


def _norm_spike_histories(o: KitOptions, case: Case) -> None:
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


def _stall_histories(o: KitOptions, case: Case) -> None:
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


def _down_histories(o: KitOptions, case: Case) -> None:
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


def _coverage_histories(o: KitOptions, case: Case) -> None:
    """The coverage alerts through failed scrapes, gaps and restarts."""
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


def _amp_collapse_cases(o: KitOptions, case: Case) -> None:
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


def _crash_alert(
    o: KitOptions, severity: str, after: str = "", targets: str = f"{INSTANCE}: ValueError"
) -> dict[str, Any]:
    """The page of a crash (by default one target's ``ValueError``); ``after``: "NaN gradients at step 41"."""
    return {
        "exp_labels": {"job": o.job, "severity": severity},
        "exp_annotations": {
            "summary": f"Training crashed with an uncaught exception ({severity})",
            "description": (
                f"{o.job}: training crashed after {after}: uncaught exceptions ended {targets}; NaN or Inf "
                "gradients came before: resume from the last healthy checkpoint, not the latest."
                if severity == "critical"
                else f"{o.job}: training crashed: uncaught exceptions ended {targets}; gradtel saw no unhealthy "
                "update before."
            ),
            "runbook_url": o.runbook(CRASH_ALERT),
        },
    }


def _crash_cases(o: KitOptions, case: Case) -> None:
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
