"""Prometheus side of the kit: alert and recording rules, Alertmanager routing, scrape configs."""

from __future__ import annotations

from typing import Any

from ..metrics import (
    AMP_LOSS_SCALE,
    ERRORS,
    FIRST_BAD_LAYER,
    GRAD_NORM,
    GRAD_NORM_PEAK,
    GRADS_TOTAL,
    INF_GRADS,
    LAST_UNHEALTHY_STEP,
    LAST_UPDATE_TIMESTAMP,
    NAN_GRADS,
    NONFINITE_LOSS_INCIDENT_STEP,
    NORM_PEAK_SECONDS,
    ORIGIN_UPDATES,
    SKIPPED_UPDATES,
    START_TIME,
    TRAINING_EXCEPTIONS,
    UNHEALTHY_UPDATES,
    UNSCANNED_UPDATES,
    UPDATES,
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

__all__ = ["alertmanager_config", "band_text", "compose_file", "rules", "scrape_config"]


def band_text(o: KitOptions, severity: str) -> str:
    t = o.thresholds
    if severity == "critical":
        return f"more than {t.critical}"
    return f"more than {t.warning} and at most {t.critical}"


INCIDENT = "job, run"
"""The labels of one training run: every alert is one per run, whatever its number of
ranks (``run`` is set by gradtel from ``GRADTEL_RUN`` or torchrun's run id, if any)."""

PROCESS = "job, instance, rank, run"
"""The labels of one training process, as the rules join its series on them."""


def _query(template: str, *args: str) -> str:
    """A Go-template ``query`` call: ``template`` with a printf verb for each of ``args``
    (``%[i]q`` for the i-th, where a query uses one several times)."""
    return f'query (printf "{template}" {" ".join(args)})'


_RUN = '(or $labels.run "")'
"""The alert's ``run`` label as a string: vmalert gives ``nil`` for a missing label, and
``printf "%q"`` would print that as ``%!q(<nil>)``; Prometheus gives ``""``."""
RUN_SCOPE = "job=%[1]q,run=%[2]q"
"""The selector of the alert's run, in a template query; its arguments are :data:`RUN_ARGS`,
and ``%[3]q`` is the alert's ``kind`` where the query passes it."""
RUN_ARGS = ("$labels.job", _RUN)
KIND_ARGS = (*RUN_ARGS, "$labels.kind")


def _started(o: KitOptions, scope: str) -> str:
    """When each process started, through failed scrapes and gaps shorter than the window."""
    return f"last_over_time({START_TIME}{{{scope}}}[{o.window}])"


def _counted(
    o: KitOptions,
    series: str,
    scope: str,
    *,
    on_demand: bool = False,
    per_process: bool = False,
    exact: bool = False,
) -> list[str]:
    """The branches of :func:`_new_or_increased`."""
    w = o.window
    held = f"last_over_time({series}[{w}]) > 0"
    # A process younger than the window holds counts of the window alone; its first
    # scrape may already be above 0, which increase() cannot see, and so may a restart
    # whose first value equals the last one of the process it replaced. Its start time
    # tells it from an old process seen again after a failed scrape or a gap.
    young = f"{held} and on ({PROCESS}) {_started(o, scope)} > time() - {duration_seconds(w)}"
    branches = [young]
    if on_demand:
        # Born in an old process (a layer's first NaN): no sample in the window before.
        # A gap longer than the window hides that sample, and the series reads as new.
        before = f"last_over_time({series}[{w}] offset {w})"
        if per_process:
            # Born as its process ends (a crash): a sample in the window before is this
            # one only if it came from the process of now, and a process replaced since
            # (a restart) crashed anew, however old it is.
            before += f" and on ({PROCESS}) min_over_time({START_TIME}{{{scope}}}[{w}] offset {w}) == on ({PROCESS}) {_started(o, scope)}"
        branches.append(f"{held} unless ({before})")
    # max - min is exact where increase() would extrapolate; a restart is a young process.
    moved = (
        f"max_over_time({series}[{w}]) - min_over_time({series}[{w}])"
        if exact
        else f"increase({series}[{w}])"
    )
    return branches + [f"{moved} > 0"]


def _new_or_increased(o: KitOptions, series: str, scope: str, **how: bool) -> str:
    """Series of a counter that counted in the window, valued by how much: whatever scrapes
    failed or gaps Prometheus had, only an update counted in the window makes one.
    ``scope`` selects the processes of ``series``; ``on_demand`` for a per-layer counter
    born with its first count, ``per_process`` for one born as its process ends, ``exact``
    for counts rather than extrapolated increases."""
    return "(" + " or ".join(f"({b})" for b in _counted(o, series, scope, **how)) + ")"


def _where() -> str:
    return "{{ $labels.job }}{{ with $labels.run }} run {{ . }}{{ end }}"


def _origin_template(o: KitOptions) -> str:
    """ "It originated on rank 2." when a rank's own gradients were bad before the reduction."""
    series = f"{ORIGIN_UPDATES}{{{RUN_SCOPE},kind=%[3]q}}"
    query = _query(_new_or_increased(o, series, RUN_SCOPE), *KIND_ARGS)
    return (
        f"{{{{ with {query} }}}} It originated on rank{{{{ if gt (len .) 1 }}}}s{{{{ end }}}} "
        '{{ range $i, $s := sortByLabel "rank" . }}{{ if $i }}, {{ end }}{{ $s.Labels.rank }}{{ end }}.{{ end }}'
    )


def _loss_template(o: KitOptions) -> str:
    """Says the values entered in the forward pass when the incident's first unhealthy update
    already had a non-finite loss. Once NaN is in the weights every later loss is NaN too, so
    a non-finite loss somewhere in the window says nothing of where the incident started:
    each process records the step of its newest incident that began with one, and the page
    says so when one is the step of the incident it names (its first bad layer's)."""
    # Each rank records its own loss: a rank whose scrape failed still counts.
    loss = _as_it_stands(
        o, f"{NONFINITE_LOSS_INCIDENT_STEP}{{{RUN_SCOPE},kind=%[3]q}}", per_process=True
    )
    first_bad = _as_it_stands(o, f"{FIRST_BAD_LAYER}{{{RUN_SCOPE},kind=%[3]q}}")
    query = _query(f"{loss} == on () group_left () max({first_bad})", *KIND_ARGS)
    return f"{{{{ with {query} }}}} The loss was already non-finite: it entered in the forward pass.{{{{ end }}}}"


def _top_layers_template(o: KitOptions, kind: str) -> str:
    # Ranks hold the same reduced gradients: the largest count of a layer over the
    # ranks, not their sum.
    series = f"{GRADS_TOTAL[kind]}{{{RUN_SCOPE}}}"
    counted = _new_or_increased(o, series, RUN_SCOPE, on_demand=True, exact=True)
    query = _query(f"sort_desc(topk(3, max by (layer) {counted}))", *RUN_ARGS)
    return (
        f" Layers with {KINDS[kind]} values in that window: "
        f"{{{{ range $i, $s := {query} }}}}"
        "{{ if $i }}, {{ end }}{{ $s.Labels.layer }} ({{ $s.Value }})"
        "{{ else }}none in the counters yet{{ end }}."
    )


def _as_it_stands(o: KitOptions, series: str, *, per_process: bool = False) -> str:
    """A gauge of incident steps as its series stand, above 0: reset_health() set an older
    incident's to 0, and a step after a rollback may be lower than the older one's. Where
    none is scraped now (the processes are gone, or their scrape failed), their last values:
    of each process's labels the series sampled last, as a dead process's stay in the window
    after a restart on the same labels. ``per_process``: the last values of each process not
    scraped now, even while others are (a gauge whose ranks differ). The subquery steps by
    the scrape interval, so as to see a series that lived for one scrape."""
    sampled = f"max_over_time(timestamp({series})[{o.window}:{o.scrape_interval}])"
    newest = f"{sampled} == on ({PROCESS}) group_left () max by ({PROCESS}) ({sampled})"
    scraped = f"on ({PROCESS}) {series}" if per_process else f"on () ({series} > 0)"
    return f"(({series} > 0) or (last_over_time({series}[{o.window}]) > 0 and ({newest}) unless {scraped}))"


def _first_bad_template(o: KitOptions) -> str:
    """The first bad layer of the alert's kind and its step: of the newest incident."""
    series = _as_it_stands(o, f"{FIRST_BAD_LAYER}{{{RUN_SCOPE},kind=%[3]q}}")
    query = _query(f"topk(1, max by (layer) {series})", *KIND_ARGS)
    return (
        f"{{{{ with {query} }}}}{{{{ with index . 0 }}}} First bad layer in backward order: "
        "{{ .Labels.layer }}, at step {{ .Value }}.{{ end }}{{ end }}"
    )


def _unhealthy_rule(o: KitOptions, kind: str, severity: str) -> dict[str, Any]:
    series = f'{UNHEALTHY_UPDATES}{{{o.job_selector},kind="{kind}",severity="{severity}"}}'
    label = KINDS[kind]
    counted = "\n  or\n  ".join(_counted(o, series, o.job_selector))
    return {
        "alert": ALERT_NAMES[kind],
        # One alert per run, its value the number of ranks affected.
        "expr": f"count by ({INCIDENT}, kind) (\n  {counted}\n)",
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
                f"{_where()}: an update in the last {o.window} had {band_text(o, severity)} "
                f"{label} gradient values; affected ranks: {{{{ $value }}}}."
                + _origin_template(o)
                + _loss_template(o)
                + _top_layers_template(o, kind)
                + _first_bad_template(o)
            ),
            "runbook_url": o.runbook(ALERT_NAMES[kind]),
        },
    }


def _crashed(o: KitOptions, scope: str, unhealthy: str = "") -> str:
    """Processes that an uncaught exception ended in the window, one series per type: the
    series is born as its process ends, and once per process. ``unhealthy``: the label
    value that selects those after which NaN or Inf gradients came first (its ``gradients``)."""
    series = f"{TRAINING_EXCEPTIONS}{{{scope}{f',gradients={unhealthy}' if unhealthy else ''}}}"
    return _new_or_increased(o, series, scope, on_demand=True, per_process=True)


def _crash_rule(o: KitOptions, severity: str) -> dict[str, Any]:
    """A training process died from an uncaught exception: critical when NaN or Inf gradients
    came before (the crash is likely their consequence), else warning. The crash's own
    series says which, as the process saw it when it died: a process restarted on the same
    labels does not change it. One alert per run, whatever the exceptions: when one rank
    dies the others die of their own (a collective that lost its peer), and that is one
    incident, critical when any of its ranks had NaN or Inf gradients."""
    unhealthy = '"unhealthy"'
    critical = f"count by ({INCIDENT}) ({_crashed(o, o.job_selector, unhealthy)})"
    crashed = f"count by ({INCIDENT}) ({_crashed(o, o.job_selector)})"
    # In a template the value is the query's third argument: a quote would end its string.
    steps = _query(
        f"max by (kind) (last_over_time({LAST_UNHEALTHY_STEP}{{{RUN_SCOPE}}}[{o.window}]) "
        f"and on ({PROCESS}) {_crashed(o, RUN_SCOPE, '%[3]q')})",
        *RUN_ARGS,
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
        "expr": critical if is_critical else f"{crashed}\nunless on ({INCIDENT})\n{critical}",
        # The last scrapes of the ranks that died are in: the page names them all.
        "for": o.settle,
        "labels": {"severity": severity},
        "annotations": {
            "summary": f"Training crashed with an uncaught exception ({severity})",
            "description": (
                f"{_where()}: "
                + (after if is_critical else "training crashed")
                + ": uncaught exceptions ended "
                + _targets_template(
                    _crashed(o, RUN_SCOPE),
                    *RUN_ARGS,
                    then="{{ with $s.Labels.type }}: {{ . }}{{ end }}",
                )
                + (
                    "; NaN or Inf gradients came before: resume from the last healthy checkpoint, "
                    "not the latest."
                    if is_critical
                    else "; gradtel saw no unhealthy update before."
                )
            ),
            "runbook_url": o.runbook(CRASH_ALERT),
        },
    }


def _targets_template(query: str, *args: str, then: str = "") -> str:
    """A comma-separated list of the instances (and ranks) a query returns, at most 10;
    ``then``: what follows each, from its series ``$s``."""
    return (
        f'{{{{ range $i, $s := sortByLabel "instance" ({_query(f"topk(10, {query})", *args)}) }}}}'
        "{{ if $i }}, {{ end }}"
        "{{ $s.Labels.instance }}{{ with $s.Labels.rank }} (rank {{ . }}){{ end }}"
        + then
        + "{{ end }}"
    )


def rules(o: KitOptions) -> dict[str, Any]:
    sel, w = o.job_selector, o.window
    recording = [
        {
            "record": f"job_instance_rank_kind_severity:gradtel_unhealthy_updates:increase{w}",
            "expr": f"sum by (job, instance, rank, kind, severity) (increase({UNHEALTHY_UPDATES}{{{sel}}}[{w}]))",
        },
        {
            "record": f"job_instance_rank_layer:gradtel_nonfinite_grads:increase{w}",
            "expr": (
                f"sum by (job, instance, rank, layer) (increase({NAN_GRADS}{{{sel}}}[{w}]))\n"
                f"+\nsum by (job, instance, rank, layer) (increase({INF_GRADS}{{{sel}}}[{w}]))"
            ),
        },
    ]
    alerts = [
        _unhealthy_rule(o, kind, severity) for kind in KINDS for severity in ("critical", "warning")
    ]
    alerts += [_crash_rule(o, severity) for severity in ("critical", "warning")]
    # The endpoints of a run that died: the gradtel series, still in Prometheus for
    # a while, tell which rank each dead target was.
    down = f"(up{{job=%q}} == 0) * on (job, instance) group_left (rank) max by (job, instance, rank) (last_over_time({UPDATES}{{job=%q}}[1h])) or on (job, instance) (up{{job=%q}} == 0)"
    alerts.append(
        {
            "alert": DOWN_ALERT,
            "expr": f"count by (job) (up{{{sel}}} == 0)\nor\nabsent(up{{{sel}}})",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "gradtel metrics endpoint cannot be scraped",
                "description": (
                    f"{{{{ with {_query('up{job=%q} == 0', '$labels.job')} }}}}{{{{ $labels.job }}}}: "
                    "{{ len . }} targets have not been scraped for 5m (up == 0): "
                    + _targets_template(down, *["$labels.job"] * 3)
                    + f"{{{{ else }}}}No {o.job} target has been scraped for 5m{{{{ end }}}}: the "
                    "training process died, hangs before serving, or its endpoint is unreachable. "
                    "Unhealthy updates would not page."
                ),
                "runbook_url": o.runbook(DOWN_ALERT),
            },
        }
    )
    alerts += [
        _nothing_scanned_rule(o),
        _amp_skips_rule(o),
        _amp_collapse_rule(o),
        _norm_spike_rule(o),
    ]
    alerts.append(
        {
            "alert": STALLED_ALERT,
            "expr": f"count by ({INCIDENT}) (\n  {_stalled(o, sel)}\n)",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Training is up but gradtel sees no update",
                "description": (
                    f"{_where()}: {{{{ $value }}}} targets are up but have had no update (no "
                    f"collect() call) for more than {o.stall_after}: "
                    + _targets_template(_stalled(o, RUN_SCOPE), *RUN_ARGS)
                    + ". Training hangs, waits on data or on another rank, or collect() is no "
                    "longer called."
                ),
                "runbook_url": o.runbook(STALLED_ALERT),
            },
        }
    )
    return {
        "groups": [
            {"name": "gradtel.recording", "rules": recording},
            {"name": "gradtel.alerts", "rules": alerts},
        ]
    }


def _stalled(o: KitOptions, selector: str) -> str:
    """Processes with no update for ``stall_after``. Their last update time is read through
    failed scrapes and gaps up to half of it; a process scraped last longer ago is down
    (GradtelExporterDown), and the last scrape of one that crashed, just after its last
    update, never reads as a stall."""
    stall = duration_seconds(o.stall_after, "stall_after")
    held = duration_text(stall // 2)
    return f"time() - last_over_time({LAST_UPDATE_TIMESTAMP}{{{selector}}}[{held}]) > {stall}"


def _nothing_scanned_rule(o: KitOptions) -> dict[str, Any]:
    sel, w = o.job_selector, o.window
    return {
        "alert": NOTHING_SCANNED_ALERT,
        # Due updates arrive, none is scanned: gradtel is blind and says so, rather
        # than letting a quiet dashboard look healthy.
        "expr": (
            f"count by ({INCIDENT}) (\n"
            f"  sum without (reason) (increase({UNSCANNED_UPDATES}{{{sel}}}[{w}])) > 0\n"
            f"  unless on (job, instance, rank)\n"
            f"  increase({UPDATES}{{{sel}}}[{w}]) > 0\n)"
        ),
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "gradtel cannot see the gradients: no update is scanned",
            "description": (
                f"{_where()}: on {{{{ $value }}}} ranks, updates in the last {w} were due but "
                "none was scanned: NaN/Inf gradients would not be seen. collect() runs where no "
                "gradient exists (before backward() or after zero_grad()), or the scan fails "
                f'({ERRORS}{{stage="scan"}}).'
            ),
            "runbook_url": o.runbook(NOTHING_SCANNED_ALERT),
        },
    }


def _amp_skips_rule(o: KitOptions) -> dict[str, Any]:
    sel, w = o.job_selector, o.window
    skipped = f'increase({SKIPPED_UPDATES}{{{sel},reason="amp_overflow"}}[{w}])'
    return {
        "alert": AMP_SKIPS_ALERT,
        # The first-steps overflows of an fp16 run are the scaler doing its job; a
        # share of skipped updates that stays high is a loss scale collapsing.
        "expr": (
            f"count by ({INCIDENT}) (\n  {skipped}\n  / ignoring (reason)\n"
            f"  increase({UPDATES}{{{sel}}}[{w}])\n  > {o.amp_skip_ratio:g}\n)"
        ),
        "for": AMP_SKIPS_FOR,
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "The AMP GradScaler keeps skipping updates for overflow",
            "description": (
                f"{_where()}: on {{{{ $value }}}} ranks, more than {o.amp_skip_ratio:.0%} of the "
                f"updates in the last {w} had non-finite gradients and were skipped by the "
                f"GradScaler, for {AMP_SKIPS_FOR}: the loss scale is collapsing and the model is "
                "barely training."
            ),
            "runbook_url": o.runbook(AMP_SKIPS_ALERT),
        },
    }


def _collapsed(o: KitOptions, selector: str) -> str:
    """Processes whose loss scale fell below the floor in the window and stays there: a
    sample at or above it in the window before the latest one below, or a process younger
    than the window. Failed scrapes and gaps are read through; an old collapse, seen again
    after a gap, or left behind by a restart with a healthy scale, pages no more."""
    scale, floor = f"{AMP_LOSS_SCALE}{{{selector}}}", f"{o.amp_scale_floor:g}"
    return (
        f"last_over_time({scale}[{o.window}]) < {floor} and on ({PROCESS}) (max_over_time({scale}[{o.window}]) >= {floor}"
        f" or on ({PROCESS}) {_started(o, selector)} > time() - {duration_seconds(o.window)})"
    )


def _amp_collapse_rule(o: KitOptions) -> dict[str, Any]:
    # The scaler halves its scale at every update that overflows and doubles it after a
    # run of good ones: the few halvings of an fp16 run's first steps stay far above the
    # floor, an update that overflows every time drives it to 0.
    lowest = _query(f"min(min_over_time({AMP_LOSS_SCALE}{{{RUN_SCOPE}}}[{o.window}]))", *RUN_ARGS)
    return {
        "alert": AMP_COLLAPSE_ALERT,
        "expr": f"count by ({INCIDENT}) (\n  {_collapsed(o, o.job_selector)}\n)",
        "labels": {"severity": "critical"},
        "annotations": {
            "summary": "The AMP loss scale collapsed: training has stopped learning",
            "description": (
                f"{_where()}: the AMP GradScaler's loss scale fell below {o.amp_scale_floor:g} in the last "
                f'{o.window}, to {{{{ with {lowest} }}}}{{{{ . | first | value | printf "%.3g" }}}}{{{{ end }}}}, on '
                + _targets_template(_collapsed(o, RUN_SCOPE), *RUN_ARGS)
                + ". The scaler halves it at every update whose gradients overflow: nearly every "
                "update overflows and is skipped, and training has stopped learning."
            ),
            "runbook_url": o.runbook(AMP_COLLAPSE_ALERT),
        },
    }


def _norm_median(o: KitOptions, selector: str) -> str:
    return f"quantile_over_time(0.5, {GRAD_NORM}{{{selector}}}[{o.spike_baseline}])"


def _norm_peak(selector: str) -> str:
    """The norm's recent peak, through failed scrapes and gaps shorter than it is held."""
    return f"last_over_time({GRAD_NORM_PEAK}{{{selector}}}[{duration_text(NORM_PEAK_SECONDS)}])"


def _norm_spike_rule(o: KitOptions) -> dict[str, Any]:
    sel, factor = o.job_selector, f"{o.spike_factor:g}"
    history = duration_seconds(o.spike_history, "spike_history")
    # The peak gauge holds a one-step spike until a scrape sees it; the median of the
    # per-update norm is the baseline, which one spike does not move. A process younger
    # than spike_history, or with less of norms, has no baseline yet, and its first norms
    # fall fast; its start time tells it from an older process on the same labels.
    ratio = _query(f"max({_norm_peak(RUN_SCOPE)} / {_norm_median(o, RUN_SCOPE)})", *RUN_ARGS)
    peak = _query(f"max({_norm_peak(RUN_SCOPE)})", *RUN_ARGS)
    return {
        "alert": NORM_SPIKE_ALERT,
        "expr": (
            f"count by ({INCIDENT}) (\n  {_norm_peak(sel)}\n  > {factor} * {_norm_median(o, sel)}\n"
            f"  and\n  present_over_time({GRAD_NORM}{{{sel}}}[{o.spike_baseline}] offset {o.spike_history})\n"
            f"  and on ({PROCESS})\n  {_started(o, sel)} < time() - {history}\n)"
        ),
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "The gradient norm spiked",
            "description": (
                f"{_where()}: the gradient norm rose to {{{{ with {peak} }}}}{{{{ . | first | value | humanize }}}}"
                f'{{{{ end }}}}, {{{{ with {ratio} }}}}{{{{ . | first | value | printf "%.0f" }}}}{{{{ end }}}} '
                f"times its median over the last {o.spike_baseline} (the alert fires above "
                f"{factor} times); affected ranks: {{{{ $value }}}}. A spike in the gradient norm often comes "
                "before a loss spike or NaN gradients: check the data batch, the learning-rate "
                "schedule, the loss scale, and whether one rank alone is off."
            ),
            "runbook_url": o.runbook(NORM_SPIKE_ALERT),
        },
    }


def alertmanager_config(o: KitOptions) -> dict[str, Any]:
    # One notification per receiver for one incident of one run, however many ranks.
    group_by = ["alertname", "job", "run"]
    return {
        "route": {
            "receiver": "chat",
            "group_by": group_by,
            "group_wait": "10s",
            "group_interval": "1m",
            "repeat_interval": "4h",
            "routes": [
                {"receiver": "pager", "matchers": ['severity="critical"']},
                {"receiver": "chat", "matchers": ['severity="warning"']},
            ],
        },
        "inhibit_rules": [
            {
                "source_matchers": ['severity="critical"'],
                "target_matchers": ['severity="warning"'],
                "equal": ["job", "run", "kind"],
            }
        ],
        "receivers": [
            {"name": "pager", "webhook_configs": [{"url": o.pager_url, "send_resolved": True}]},
            {"name": "chat", "webhook_configs": [{"url": o.chat_url, "send_resolved": True}]},
        ],
    }


def scrape_config(o: KitOptions, *, ranks: bool = False, compose: bool = False) -> dict[str, Any]:
    """Prometheus config: the processes at ``o.targets``, several ranks (an example of
    static and file-based discovery), or inside deploy/compose.yaml."""
    job: dict[str, Any] = {"job_name": o.job, "scrape_interval": o.scrape_interval}
    alertmanager = o.alertmanager
    if ranks:
        # Rank r of a node serves on 9464 + local rank r.
        job["static_configs"] = [
            {"targets": ["127.0.0.1:9464", "127.0.0.1:9465"], "labels": {"node": "local"}}
        ]
        job["file_sd_configs"] = [{"files": ["targets/*.json"], "refresh_interval": "1m"}]
    elif compose:
        # From a container, the training process on the host (bound to 0.0.0.0).
        job["static_configs"] = [{"targets": ["host.docker.internal:9464"]}]
        alertmanager = "alertmanager:9093"
    else:
        job["static_configs"] = [{"targets": list(o.targets)}]
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": o.evaluation_interval},
        "rule_files": ["gradtel-rules.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [job],
    }


def compose_file() -> dict[str, Any]:
    """deploy/compose.yaml: Prometheus, Alertmanager and Grafana with the kit's configs."""
    return {
        "name": "gradtel",
        "services": {
            "prometheus": {
                "image": "prom/prometheus:v2.53.4",
                "command": [
                    "--config.file=/etc/prometheus/prometheus-compose.yml",
                    "--storage.tsdb.path=/prometheus",
                ],
                "volumes": ["./prometheus:/etc/prometheus:ro"],
                "ports": ["9090:9090"],
                "extra_hosts": ["host.docker.internal:host-gateway"],
            },
            "alertmanager": {
                "image": "prom/alertmanager:v0.27.0",
                "command": ["--config.file=/etc/alertmanager/alertmanager.yml"],
                "volumes": ["./prometheus/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro"],
                "ports": ["9093:9093"],
            },
            "grafana": {
                "image": "grafana/grafana:11.6.0",
                "volumes": [
                    "./grafana/provisioning:/etc/grafana/provisioning:ro",
                    "./grafana/dashboards:/var/lib/grafana/dashboards:ro",
                ],
                "ports": ["3000:3000"],
                "environment": {
                    "GF_AUTH_ANONYMOUS_ENABLED": "true",
                    "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                },
                "depends_on": ["prometheus"],
            },
        },
    }
