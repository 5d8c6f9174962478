"""Prometheus side of the kit: alert and recording rules, Alertmanager routing, scrape configs."""

from __future__ import annotations

from typing import Any

from .options import (
    ALERT_NAMES,
    AMP_SKIPS_ALERT,
    AMP_SKIPS_FOR,
    DOWN_ALERT,
    KINDS,
    NOTHING_SCANNED_ALERT,
    STALLED_ALERT,
    KitOptions,
    duration_seconds,
)

__all__ = ["alertmanager_config", "band_text", "compose_file", "rules", "scrape_config"]


def band_text(o: KitOptions, severity: str) -> str:
    t = o.thresholds
    if severity == "critical":
        return f"more than {t.critical}"
    return f"more than {t.warning} and at most {t.critical}"


def _top_layers_template(o: KitOptions, kind: str) -> str:
    current = f"gradtel_{kind}_grads_total{{job=%q,instance=%q,rank=%q}}"
    window = f"{current}[{o.window}]"
    # A series younger than the window counts from 0 at start: its value is the
    # count. Otherwise max - min over the window, exact for a counter without a
    # restart where increase() would extrapolate. rank="" matches no rank label.
    query = (
        f"sort_desc(topk(3, ({current} > 0 unless {current} offset {o.window}) "
        f"or (max_over_time({window}) - min_over_time({window}) > 0)))"
    )
    args = " ".join(["$labels.job $labels.instance $labels.rank"] * (query.count("%q") // 3))
    return (
        f'{{{{ range $i, $s := query (printf "{query}" {args}) }}}}'
        "{{ if $i }}, {{ end }}{{ $s.Labels.layer }} ({{ $s.Value }})"
        "{{ else }}none in the counters yet{{ end }}."
    )


def _first_bad_template(o: KitOptions) -> str:
    """Says the first bad layer of the alert's kind when gradtel_first_bad_layer has it."""
    series = f"gradtel_first_bad_layer{{job=%q,instance=%q,rank=%q,kind=%q}}[{o.window}]"
    query = f"topk(1, max_over_time({series}))"
    return (
        f'{{{{ with query (printf "{query}" $labels.job $labels.instance $labels.rank $labels.kind) }}}}'
        "{{ with index . 0 }} First bad layer in backward order: {{ .Labels.layer }}.{{ end }}{{ end }}"
    )


def _where() -> str:
    return "{{ $labels.job }}/{{ $labels.instance }}{{ with $labels.rank }} rank {{ . }}{{ end }}"


def _unhealthy_rule(o: KitOptions, kind: str, severity: str) -> dict[str, Any]:
    series = (
        f'gradtel_unhealthy_updates_total{{{o.job_selector},kind="{kind}",severity="{severity}"}}'
    )
    label = KINDS[kind]
    return {
        "alert": ALERT_NAMES[kind],
        # increase() sees any unhealthy update between two scrapes, and a restart
        # whose first scraped value is already > 0. The second branch covers a
        # series first scraped above 0 (the very first update was unhealthy).
        "expr": f"increase({series}[{o.window}]) > 0\nor\n({series} > 0 unless {series} offset {o.window})",
        "labels": {"severity": severity},
        "annotations": {
            "summary": f"Training produced {label} gradients ({severity})",
            "description": (
                f"{_where()}: an update in the last {o.window} had {band_text(o, severity)} "
                f"{label} gradient values. Layers with {label} values in that window: "
                + _top_layers_template(o, kind)
                + _first_bad_template(o)
            ),
            "runbook_url": o.runbook(ALERT_NAMES[kind]),
        },
    }


def rules(o: KitOptions) -> dict[str, Any]:
    sel, w = o.job_selector, o.window
    recording = [
        {
            "record": f"job_instance_rank_kind_severity:gradtel_unhealthy_updates:increase{w}",
            "expr": f"sum by (job, instance, rank, kind, severity) (increase(gradtel_unhealthy_updates_total{{{sel}}}[{w}]))",
        },
        {
            "record": f"job_instance_rank_layer:gradtel_nonfinite_grads:increase{w}",
            "expr": (
                f"sum by (job, instance, rank, layer) (increase(gradtel_nan_grads_total{{{sel}}}[{w}]))\n"
                f"+\nsum by (job, instance, rank, layer) (increase(gradtel_inf_grads_total{{{sel}}}[{w}]))"
            ),
        },
    ]
    alerts = [
        _unhealthy_rule(o, kind, severity) for kind in KINDS for severity in ("critical", "warning")
    ]
    alerts.append(
        {
            "alert": DOWN_ALERT,
            "expr": f"up{{{sel}}} == 0\nor\nabsent(up{{{sel}}})",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "gradtel metrics endpoint cannot be scraped",
                "description": (
                    "{{ with $labels.instance }}{{ $labels.job }}/{{ . }}{{ with $labels.rank }} rank {{ . }}{{ end }} "
                    "has not been scraped for 5m (up == 0){{ else }}"
                    f"No {o.job} target has been scraped for 5m{{{{ end }}}}: the training process "
                    "died, hangs before serving, or its endpoint is unreachable. Unhealthy updates "
                    "would not page."
                ),
                "runbook_url": o.runbook(DOWN_ALERT),
            },
        }
    )
    stall = duration_seconds(o.stall_after, "stall_after")
    alerts += [_nothing_scanned_rule(o), _amp_skips_rule(o)]
    alerts.append(
        {
            "alert": STALLED_ALERT,
            "expr": (
                f"(time() - gradtel_last_update_timestamp_seconds{{{sel}}}) > {stall}\n"
                f"and on (job, instance) up{{{sel}}} == 1"
            ),
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Training is up but gradtel sees no update",
                "description": (
                    f"{_where()} is up but has had no update (no collect() call) for "
                    "{{ $value | humanizeDuration }} (more than "
                    f"{o.stall_after}): training hangs, waits on data or on another rank, or "
                    "collect() is no longer called."
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


def _nothing_scanned_rule(o: KitOptions) -> dict[str, Any]:
    sel, w = o.job_selector, o.window
    return {
        "alert": NOTHING_SCANNED_ALERT,
        # Due updates arrive, none is scanned: gradtel is blind and says so, rather
        # than letting a quiet dashboard look healthy.
        "expr": (
            f"sum without (reason) (increase(gradtel_unscanned_updates_total{{{sel}}}[{w}])) > 0\n"
            f"unless on (job, instance, rank)\n"
            f"increase(gradtel_updates_total{{{sel}}}[{w}]) > 0"
        ),
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "gradtel cannot see the gradients: no update is scanned",
            "description": (
                f"{_where()}: {{{{ $value | humanize }}}} updates in the last {w} were due but "
                "not scanned, and none was scanned: NaN/Inf gradients would not be seen. "
                "collect() runs where no gradient exists (before backward() or after "
                "zero_grad()), or the scan fails (gradtel_errors_total{stage=\"scan\"})."
            ),
            "runbook_url": o.runbook(NOTHING_SCANNED_ALERT),
        },
    }


def _amp_skips_rule(o: KitOptions) -> dict[str, Any]:
    sel, w = o.job_selector, o.window
    skipped = f'increase(gradtel_skipped_updates_total{{{sel},reason="amp_overflow"}}[{w}])'
    return {
        "alert": AMP_SKIPS_ALERT,
        # The first-steps overflows of an fp16 run are the scaler doing its job; a
        # share of skipped updates that stays high is a loss scale collapsing.
        "expr": (
            f"{skipped}\n/ ignoring (reason)\nincrease(gradtel_updates_total{{{sel}}}[{w}])\n"
            f"> {o.amp_skip_ratio:g}"
        ),
        "for": AMP_SKIPS_FOR,
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "The AMP GradScaler keeps skipping updates for overflow",
            "description": (
                f"{_where()}: {{{{ $value | humanizePercentage }}}} of the updates in the last "
                f"{w} had non-finite gradients and were skipped by the GradScaler (more than "
                f"{o.amp_skip_ratio:.0%} for {AMP_SKIPS_FOR}): the loss scale is collapsing and "
                "the model is barely training."
            ),
            "runbook_url": o.runbook(AMP_SKIPS_ALERT),
        },
    }


def alertmanager_config(o: KitOptions) -> dict[str, Any]:
    group_by = ["alertname", "job", "instance", "rank", "kind"]
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
                "equal": ["job", "instance", "rank", "kind"],
            }
        ],
        "receivers": [
            {
                "name": "pager",
                "webhook_configs": [{"url": "http://127.0.0.1:9095/pager", "send_resolved": True}],
            },
            {
                "name": "chat",
                "webhook_configs": [{"url": "http://127.0.0.1:9095/chat", "send_resolved": True}],
            },
        ],
    }


def scrape_config(o: KitOptions, *, ranks: bool = False, compose: bool = False) -> dict[str, Any]:
    """Prometheus config: one local process, several ranks, or inside deploy/compose.yaml."""
    job: dict[str, Any] = {"job_name": o.job, "scrape_interval": "5s"}
    alertmanager = "127.0.0.1:9093"
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
        job["static_configs"] = [{"targets": ["127.0.0.1:9464"]}]
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "5s"},
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
