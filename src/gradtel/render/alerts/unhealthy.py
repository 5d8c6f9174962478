"""The unhealthy-update alerts, one per kind (NaN, Inf) and severity: an update whose
gradients held NaN or Inf values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...metrics import (
    FIRST_BAD_LAYER,
    GRADS_TOTAL,
    NAN_GRADS,
    NONFINITE_LOSS_INCIDENT_STEP,
    NONFINITE_LOSS_UPDATES,
    ORIGIN_UPDATES,
    SEVERITIES,
    START_TIME,
    UNHEALTHY_UPDATES,
    UPDATE_GRADS,
    UPDATES,
)
from ..options import ALERT_NAMES, KINDS, KitOptions, duration_seconds, duration_text
from . import promql
from ._promtool import (
    GAP,
    GPU,
    INSTANCE,
    OUTAGE,
    PCI,
    Value,
    _band,
    _check,
    _count,
    _device,
    _fired,
    _incident,
    _labels,
    _layer,
    _life,
    _lives,
    _minutes,
    _more,
    _rank,
    _scrapes,
    _series,
    _steps,
)
from .alert import Alert, Case

__all__ = ["ALERT", "band_text"]


def band_text(o: KitOptions, severity: str) -> str:
    """The per-update counts of NaN or Inf values that make an update ``severity``."""
    t = o.thresholds
    if severity == "critical":
        return f"more than {t.critical}"
    return f"more than {t.warning} and at most {t.critical}"


def _origin_template(o: KitOptions) -> str:
    """ "It originated on rank 2." when a rank's own gradients were bad before the reduction,
    then the hardware of each such rank that exports its device info."""
    series = promql.run_series(ORIGIN_UPDATES, kind=True)
    counted = promql.new_or_increased(o, series, promql.RUN_SCOPE)
    query = promql.query(counted, *promql.KIND_ARGS)
    return (
        f"{{{{ with {query} }}}} It originated on rank{{{{ if gt (len .) 1 }}}}s{{{{ end }}}} "
        '{{ range $i, $s := sortByLabel "rank" . }}{{ if $i }}, {{ end }}{{ $s.Labels.rank }}{{ end }}.{{ end }}'
        + promql.hardware(o, counted, *promql.KIND_ARGS)
    )


def _first_bad(o: KitOptions) -> str:
    """The step of each first bad layer of the alert's run and kind, of its newest incident."""
    return promql.as_it_stands(o, promql.run_series(FIRST_BAD_LAYER, kind=True))


def _loss_template(o: KitOptions) -> str:
    """Says the values entered in the forward pass when the incident's first unhealthy update
    already had a non-finite loss. Once NaN is in the weights every later loss is NaN too, so
    a non-finite loss somewhere in the window says nothing of where the incident started:
    each process records the step of its newest incident that began with one, and the page
    says so when one is the step of the incident it names (its first bad layer's)."""
    # Each rank records its own loss: a rank whose scrape failed still counts.
    loss = promql.as_it_stands(
        o, promql.run_series(NONFINITE_LOSS_INCIDENT_STEP, kind=True), per_process=True
    )
    query = promql.query(f"{loss} == on () group_left () max({_first_bad(o)})", *promql.KIND_ARGS)
    return f"{{{{ with {query} }}}} The loss was already non-finite: it entered in the forward pass.{{{{ end }}}}"


def _top_layers_template(o: KitOptions, kind: str) -> str:
    # Ranks hold the same reduced gradients: the largest count of a layer over the
    # ranks, not their sum.
    series = promql.run_series(GRADS_TOTAL[kind])
    counted = promql.new_or_increased(o, series, promql.RUN_SCOPE, on_demand=True, exact=True)
    query = promql.query(f"sort_desc(topk(3, max by (layer) {counted}))", *promql.RUN_ARGS)
    return (
        f" Layers with {KINDS[kind]} values in that window: "
        f"{{{{ range $i, $s := {query} }}}}"
        "{{ if $i }}, {{ end }}{{ $s.Labels.layer }} ({{ $s.Value }})"
        "{{ else }}none in the counters yet{{ end }}."
    )


def _first_bad_template(o: KitOptions) -> str:
    """The first bad layer of the alert's kind and its step: of the newest incident."""
    query = promql.query(f"topk(1, max by (layer) {_first_bad(o)})", *promql.KIND_ARGS)
    return (
        f"{{{{ with {query} }}}}{{{{ with index . 0 }}}} First bad layer in backward order: "
        "{{ .Labels.layer }}, at step {{ .Value }}.{{ end }}{{ end }}"
    )


def _rule(o: KitOptions, kind: str, severity: str) -> dict[str, Any]:
    series = f'{UNHEALTHY_UPDATES}{{{o.job_selector},kind="{kind}",severity="{severity}"}}'
    label = KINDS[kind]
    counted = "\n  or\n  ".join(promql.counted(o, series, o.job_selector))
    return {
        "alert": ALERT_NAMES[kind],
        # One alert per run, its value the number of ranks affected.
        "expr": promql.per_run(counted, by="kind"),
        # An unhealthy update is a discrete failure, fired on at once but for this: the
        # ranks' scrapes of one update are spread over a scrape interval, and Prometheus
        # sends a firing alert's later annotations only after its resend delay (1m by
        # default). Firing once every rank's scrape is in, the page counts them all and
        # names the origin rank. A crashed process's series keep it true: ranges read
        # past its staleness markers.
        "for": o.settle,
        "labels": {"severity": severity},
        "annotations": {
            "summary": f"Training produced {label} gradients ({severity})",
            "description": (
                f"{promql.where()}: an update in the last {o.window} had {band_text(o, severity)} "
                f"{label} gradient values; affected ranks: {{{{ $value }}}}."
                + _origin_template(o)
                + _loss_template(o)
                + _top_layers_template(o, kind)
                + _first_bad_template(o)
            ),
            "runbook_url": o.runbook(ALERT_NAMES[kind]),
        },
    }


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


def _behaviours(o: KitOptions, case: Case) -> None:
    """One case per behaviour of the alert."""
    window = _minutes(duration_seconds(o.window, "window"))
    span = window + 10  # every case runs well past one window
    nan, inf = ALERT_NAMES["nan"], ALERT_NAMES["inf"]
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
    origin_on_2 = (
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
        ]
    )

    def origin_page(origin: str) -> dict[str, Any]:
        return _check(
            _fired(o, 3),
            nan,
            _unhealthy_alert(
                o, "nan", "critical", "head (9)", ("head", 30), ranks=4, origin=origin
            ),
        )

    case(
        f"{nan} fires once for a run of 4 ranks, saying which rank it originated on",
        origin_on_2,
        [origin_page("It originated on rank 2.")],
    )
    case(
        f"{nan} names the host and GPU of the rank it originated on",
        origin_on_2 + [_device(o, r, span) for r in range(4)],
        [
            origin_page(
                f"It originated on rank 2. Hardware: trainer-2:9464 (rank 2) on host node-1, {GPU} (PCI {PCI})."
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


def _histories(o: KitOptions, case: Case) -> None:
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


def rules(o: KitOptions) -> list[dict[str, Any]]:
    return [_rule(o, kind, severity) for kind in KINDS for severity in ("critical", "warning")]


def cases(o: KitOptions, case: Case) -> None:
    _behaviours(o, case)
    _histories(o, case)
    _first_bad_histories(o, case)


def runbook(o: KitOptions) -> str:
    return "\n".join(_runbook(o, kind, label) for kind, label in (("nan", "NaN"), ("inf", "Inf")))


def _runbook(o: KitOptions, kind: str, label: str) -> str:
    other = (
        "NaN usually starts in one layer and spreads backward: the layer *closest "
        "to the output* among those listed is often where it began. A NaN loss makes "
        "every gradient NaN at once."
        if kind == "nan"
        else "Inf means overflow: activations or gradients exceeded the dtype's range "
        "(65504 in fp16). Under AMP a few Inf updates are expected while the loss "
        "scale settles; a steady stream is not."
    )
    return f"""## {ALERT_NAMES[kind]}

**Meaning.** At least one update in the last {o.window} had {label} values in its
gradients: `severity="warning"` for {band_text(o, "warning")} values in one update,
`severity="critical"` for {band_text(o, "critical")}. {other}

**Look first at**

1. *Which layers*: the alert description lists the top layers; the
   `{UPDATE_GRADS[kind]}` gauges show the latest update per layer.
2. *Which rank*: the `rank` label. One rank alone points at its data shard or its
   hardware; all ranks at once point at the model or the learning rate.
3. *Loss scale* (AMP): a collapsing `GradScaler` scale means repeated overflow.
4. *Learning rate*: did a warm-up end or a schedule step just before?
5. *The data batch*: log the batch indices of the update (`GradHealth.step`)
   and replay them; a corrupt sample or a label out of range is a common cause.

**Do**

- Warning: watch the trend. If it repeats, lower the learning rate, enable
  gradient clipping, or check the layers named.
- Critical: stop or roll back the run to the last healthy checkpoint before
  the weights are damaged, unless `on_critical="skip"` already keeps these
  updates from reaching the optimizer (check `{UNHEALTHY_UPDATES}`
  against `{UPDATES}`: skipping most updates is not training).
- Fix the cause (data, learning rate, precision, an unstable op such as a
  `log` or `sqrt` of a non-positive value, a division by zero) and resume.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
