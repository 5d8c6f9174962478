"""``promtool test rules`` cases for the rendered rules, one case per behaviour.

Time runs in steps of one minute from 0; the window, the stall time and the
annotation texts all come from the same :class:`KitOptions` as the rules.
"""

from __future__ import annotations

import math
from typing import Any

from ..metrics import (
    FIRST_BAD_LAYER,
    GRAD_NORM,
    GRAD_NORM_PEAK,
    GRADS_TOTAL,
    LAST_UPDATE_TIMESTAMP,
    NAN_GRADS,
    NONFINITE_LOSS_UPDATES,
    NORM_PEAK_SECONDS,
    ORIGIN_UPDATES,
    SKIPPED_UPDATES,
    UNHEALTHY_UPDATES,
    UNSCANNED_UPDATES,
    UPDATES,
    Metric,
)
from .options import (
    ALERT_NAMES,
    AMP_SKIPS_ALERT,
    AMP_SKIPS_FOR,
    DOWN_ALERT,
    KINDS,
    NORM_SPIKE_ALERT,
    NOTHING_SCANNED_ALERT,
    STALLED_ALERT,
    KitOptions,
    duration_seconds,
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
    return _series(
        UNHEALTHY_UPDATES, _labels(o, kind=kind, severity=severity), values
    )


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
) -> dict[str, Any]:
    """The one alert of a run; ``origin`` is the expected "It originated on ..." sentence."""
    label = KINDS[kind]
    return {
        "exp_labels": {"job": o.job, "kind": kind, "severity": severity},
        "exp_annotations": {
            "summary": f"Training produced {label} gradients ({severity})",
            "description": (
                f"{o.job}: an update in the last {o.window} had {band_text(o, severity)} {label} "
                f"gradient values; affected ranks: {ranks}."
                + (f" {origin}" if origin else "")
                + (" The loss was already non-finite: it entered in the forward pass." if forward else "")
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


def _humanize_duration(seconds: int) -> str:
    """Prometheus' humanizeDuration for whole seconds of at least a minute."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(days or hours) + [f"{minutes}m", f"{secs}s"]
    return " ".join(parts)


def rule_tests(o: KitOptions) -> dict[str, Any]:
    """The ``promtool test rules`` file for the rules rendered from ``o``."""
    window = _minutes(duration_seconds(o.window, "window"))
    span = window + 10  # every case runs well past one window
    nan, inf = ALERT_NAMES["nan"], ALERT_NAMES["inf"]
    cases: list[dict[str, Any]] = []

    def case(name: str, series: list[dict[str, str]], checks: list[dict[str, Any]]) -> None:
        cases.append({"name": name, "interval": "1m", "input_series": series, "alert_rule_test": checks})

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
                _check(3, alert, _unhealthy_alert(o, kind, "warning", "encoder.0 (3)")),
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
            [_check(3, alert, _unhealthy_alert(o, kind, "critical", "head (7), encoder.0 (2)"))],
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
                3,
                nan,
                _unhealthy_alert(o, "nan", "critical", "encoder.0 (9), encoder.1 (8)", ("encoder.1", 3)),
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
    four = [_labels(o, rank=str(r)).replace(INSTANCE, f"trainer-{r}:9464") for r in range(4)]
    case(
        f"{nan} fires once for a run of 4 ranks, saying which rank it originated on",
        [_series(UNHEALTHY_UPDATES, r[:-1] + ',kind="nan",severity="critical"}', _steps(3, 1, span)) for r in four]
        + [_series(NAN_GRADS, r[:-1] + ',layer="head"}', _steps(3, 9, span)) for r in four]
        + [
            _series(ORIGIN_UPDATES, r[:-1] + ',kind="nan"}', _steps(3, int(i == 2), span))
            for i, r in enumerate(four)
        ]
        + [_series(FIRST_BAD_LAYER, r[:-1] + ',kind="nan",layer="head"}', f"_x2 30x{span}") for r in four],
        [
            _check(
                3,
                nan,
                _unhealthy_alert(
                    o, "nan", "critical", "head (9)", ("head", 30), ranks=4, origin="It originated on rank 2."
                ),
            )
        ],
    )
    case(
        f"{nan} says when the loss was already non-finite (the forward pass)",
        [
            _band(o, "nan", "critical", _steps(3, 1, span)),
            _series(NONFINITE_LOSS_UPDATES, _labels(o), _steps(3, 1, span)),
        ],
        [_check(3, nan, _unhealthy_alert(o, "nan", "critical", "none in the counters yet", forward=True))],
    )
    case(
        f"{nan} names every rank it originated on",
        [_series(UNHEALTHY_UPDATES, r[:-1] + ',kind="nan",severity="critical"}', _steps(3, 1, span)) for r in four]
        + [
            _series(ORIGIN_UPDATES, r[:-1] + ',kind="nan"}', _steps(3, int(i in (0, 3)), span))
            for i, r in enumerate(four)
        ],
        [
            _check(
                3,
                nan,
                _unhealthy_alert(
                    o, "nan", "critical", "none in the counters yet", ranks=4,
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
        _band(o, kind, severity, f"0x{span}") for kind in KINDS for severity in ("warning", "critical")
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
            _layer(o, "inf", "head", f"_x2 7x{span}"),
        ],
        [
            _check(
                2, inf, _unhealthy_alert(o, "inf", "critical", "head (7)")
            ),
            _check(2 + window + 1, inf),
        ],
    )
    case(
        f"{nan} critical resolves {o.window} after the last unhealthy update",
        [
            _band(o, "nan", "critical", _steps(3, 1, span)),
            _layer(o, "nan", "fc1", _steps(3, 6, span)),
        ],
        [
            _check(2 + window, nan, _unhealthy_alert(o, "nan", "critical", "fc1 (6)")),
            _check(3 + window, nan),
        ],
    )

    up_labels = _labels(o)
    ranks = [_labels(o, rank=str(r)).replace(INSTANCE, f"trainer-{r}:9464") for r in range(4)]
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
            _check(
                fires_at,
                STALLED_ALERT,
                {
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
                },
            ),
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
        [
            _check(
                window,
                NOTHING_SCANNED_ALERT,
                {
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
                },
            )
        ],
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
            _check(
                5 + window + hold,
                AMP_SKIPS_ALERT,
                {
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
                },
            ),
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


def _norm_series(o: KitOptions, norms: list[float], labels: str | None = None) -> list[dict[str, str]]:
    """``gradtel_grad_norm`` with one update a minute, and the peak gauge that holds each
    value for ``NORM_PEAK_SECONDS``, as gradtel exports them."""
    held = _minutes(NORM_PEAK_SECONDS)
    peaks = [max(norms[max(0, i - held + 1) : i + 1]) for i in range(len(norms))]
    labels = _labels(o) if labels is None else labels
    return [
        _series(GRAD_NORM, labels, " ".join(f"{v:g}" for v in norms)),
        _series(GRAD_NORM_PEAK, labels, " ".join(f"{v:g}" for v in peaks)),
    ]


def _norm_spike_cases(o: KitOptions, case: Any) -> None:
    """Cases of the gradient-norm spike alert: a real spike, and what is not one."""
    history = _minutes(duration_seconds(o.spike_history, "spike_history"))
    baseline = _minutes(duration_seconds(o.spike_baseline, "spike_baseline"))
    factor = o.spike_factor
    spike = 2 * factor  # the spike the alert is for: twice the factor
    at = history + 5
    steady = [1.0] * (at + 10)

    def alert(peak: float, ranks: int = 1) -> dict[str, Any]:
        return {
            "exp_labels": {"job": o.job, "severity": "warning"},
            "exp_annotations": {
                "summary": "The gradient norm spiked",
                "description": (
                    f"{o.job}: the gradient norm rose to {peak:g}, {peak:.0f} times its median over "
                    f"the last {o.spike_baseline} (the alert fires above {factor:g} times); affected "
                    f"ranks: {ranks}. A spike in the gradient norm often comes before a loss spike "
                    "or NaN gradients: check the data batch, the learning-rate schedule, the loss "
                    "scale, and whether one rank alone is off."
                ),
                "runbook_url": o.runbook(NORM_SPIKE_ALERT),
            },
        }

    spiked = steady[:at] + [spike] + steady[at + 1 :]
    case(
        f"{NORM_SPIKE_ALERT} fires on a {spike:g}x spike of the gradient norm",
        _norm_series(o, spiked),
        [
            _check(at - 1, NORM_SPIKE_ALERT),
            _check(at, NORM_SPIKE_ALERT, alert(spike)),
            _check(at + _minutes(NORM_PEAK_SECONDS) + 1, NORM_SPIKE_ALERT),
        ],
    )
    four = [_labels(o, rank=str(r)).replace(INSTANCE, f"trainer-{r}:9464") for r in range(4)]
    case(
        f"{NORM_SPIKE_ALERT} fires once for a run of 4 ranks",
        [s for r in four for s in _norm_series(o, spiked, r)],
        [_check(at, NORM_SPIKE_ALERT, alert(spike, ranks=4))],
    )
    # Growth by the factor over the whole baseline window is a trend, not a spike.
    growth = [factor ** (i / baseline) for i in range(baseline + history)]
    case(
        f"{NORM_SPIKE_ALERT} is silent on slow growth",
        _norm_series(o, growth),
        [_check(t, NORM_SPIKE_ALERT) for t in (history, baseline // 2, baseline, baseline + history - 1)],
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
