"""Prometheus side of the kit: alert and recording rules, Alertmanager routing, scrape configs."""

from __future__ import annotations

from typing import Any

from ..metrics import INF_GRADS, NAN_GRADS, UNHEALTHY_UPDATES
from .alerts import ALERTS
from .options import AMP_COLLAPSE_ALERT, AMP_SKIPS_ALERT, KitOptions

__all__ = ["alertmanager_config", "compose_file", "rules", "scrape_config"]


def rules(o: KitOptions) -> dict[str, Any]:
    """The rule file: the recording rules of the dashboards, and every alert's rules (with
    the recording rules an alert reads)."""
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
    return {
        "groups": [
            {"name": "gradtel.recording", "rules": recording},
            {"name": "gradtel.alerts", "rules": [r for alert in ALERTS for r in alert.rules(o)]},
        ]
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
        # A critical alert mutes the warning of the same alert, job, run and kind, and no
        # other alert's: Alertmanager takes a label missing on both sides as equal, so
        # without `alertname` a critical without `kind` would mute every warning of its
        # run (a critical without `run`, those of the whole job). The one other pair is
        # named: a collapsed loss scale is why most updates overflow.
        "inhibit_rules": [
            {
                "source_matchers": ['severity="critical"'],
                "target_matchers": ['severity="warning"'],
                "equal": ["alertname", "job", "run", "kind"],
            },
            {
                "source_matchers": [f'alertname="{AMP_COLLAPSE_ALERT}"'],
                "target_matchers": [f'alertname="{AMP_SKIPS_ALERT}"'],
                "equal": ["job", "run"],
            },
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
