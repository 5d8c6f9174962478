"""Render the deploy kit (Prometheus rules and their tests, Alertmanager routing,
scrape configs, runbook) from one :class:`~gradtel.Thresholds`.

Every number an operator sees in an alert, a rule test or the runbook comes
from here, so a kit rendered with other thresholds stays consistent with the
``GradMonitor`` that uses them. ``gradtel render --out deploy`` writes it; the
committed ``deploy/`` is the render of the defaults, and a test fails when the
two differ.
"""

from __future__ import annotations

import json
from pathlib import Path

from .grafana import dashboard_json, dashboard_provisioning, datasource_provisioning
from .kubernetes import pod_monitor, prometheus_rule, training_job
from .options import DEFAULT_RUNBOOK_URL, KitOptions, dump_yaml, header
from .prometheus import alertmanager_config, compose_file, rules, scrape_config
from .rule_tests import rule_tests
from .runbook import runbook
from .scale_out import (
    VICTORIAMETRICS_WRITE_URL,
    agent_config,
    central_prometheus_config,
    scale_out_readme,
)

__all__ = ["DEFAULT_RUNBOOK_URL", "KitOptions", "render_kit", "write_kit"]


def render_kit(options: KitOptions | None = None) -> dict[str, str]:
    """Render every deploy file.

    Returns:
        ``{path relative to the output folder: content}``.

    >>> kit = render_kit()
    >>> "prometheus/gradtel-rules.yml" in kit, "grafana/dashboards/gradtel.json" in kit
    (True, True)
    """
    o = options or KitOptions()
    return {
        "prometheus/gradtel-rules.yml": dump_yaml(
            header(o, "gradtel alerting and recording rules."), rules(o)
        ),
        "prometheus/gradtel-rules.test.yml": dump_yaml(
            header(
                o, "Unit tests of gradtel-rules.yml: promtool test rules gradtel-rules.test.yml"
            ),
            rule_tests(o),
        ),
        "prometheus/alertmanager.yml": dump_yaml(
            header(o, "Alertmanager routing: critical pages, warning goes to chat.")
            + "# Your receivers: render with --pager-url URL --chat-url URL.\n",
            alertmanager_config(o),
        ),
        "prometheus/prometheus.yml": dump_yaml(
            header(
                o, f"Prometheus scrape config for the training processes at {', '.join(o.targets)}."
            )
            + "# Your own: render with --targets HOST:PORT[,HOST:PORT...] --alertmanager HOST:PORT.\n",
            scrape_config(o, ranks=False),
        ),
        "prometheus/prometheus-ranks.yml": dump_yaml(
            header(
                o, "Prometheus scrape config for several ranks: static and file-based discovery."
            )
            + "# Each rank serves on base port + local rank (9464, 9465, ...).\n",
            scrape_config(o, ranks=True),
        ),
        "prometheus/targets/gradtel-ranks.json": json.dumps(
            [{"targets": ["node-1:9464", "node-1:9465"], "labels": {"node": "node-1"}}], indent=2
        )
        + "\n",
        "prometheus/prometheus-compose.yml": dump_yaml(
            header(o, "Prometheus config used by deploy/compose.yaml (inside a container).")
            + "# Run training with GRADTEL_ADDR=0.0.0.0 so that the container can reach it.\n",
            scrape_config(o, compose=True),
        ),
        "prometheus/runbook.md": runbook(o),
        "scale-out/prometheus-agent.yml": dump_yaml(
            header(o, "Prometheus agent: scrapes the ranks and remote-writes to the central store.")
            + f"# VictoriaMetrics as the central store: url: {VICTORIAMETRICS_WRITE_URL}\n",
            agent_config(o),
        ),
        "scale-out/central-prometheus.yml": dump_yaml(
            header(o, "Central Prometheus: gradtel's rules over what the agents remote-write."),
            central_prometheus_config(o),
        ),
        "scale-out/README.md": scale_out_readme(o),
        "grafana/dashboards/gradtel.json": dashboard_json(o),
        "grafana/provisioning/datasources/gradtel.yml": dump_yaml(
            header(o, "Grafana datasource provisioning: the Prometheus of deploy/compose.yaml."),
            datasource_provisioning("http://prometheus:9090"),
        ),
        "grafana/provisioning/dashboards/gradtel.yml": dump_yaml(
            header(o, "Grafana dashboard provisioning: loads deploy/grafana/dashboards."),
            dashboard_provisioning("/var/lib/grafana/dashboards"),
        ),
        "kubernetes/podmonitor.yaml": dump_yaml(
            header(o, "Prometheus Operator PodMonitor for training pods serving gradtel."),
            pod_monitor(o),
        ),
        "kubernetes/prometheusrule.yaml": dump_yaml(
            header(
                o, "Prometheus Operator PrometheusRule: the rules of prometheus/gradtel-rules.yml."
            ),
            prometheus_rule(o),
        ),
        "kubernetes/training-job.yaml": dump_yaml(
            header(o, "Example training Job: gradtel on 0.0.0.0:9464, /healthz as liveness probe."),
            training_job(),
        ),
        "compose.yaml": dump_yaml(
            header(
                o, "Prometheus, Alertmanager and Grafana with gradtel's configs: docker compose up"
            )
            + "# Grafana: http://localhost:3000 (anonymous viewer), Prometheus: http://localhost:9090\n",
            compose_file(),
        ),
    }


def write_kit(out: Path | str, options: KitOptions | None = None) -> list[Path]:
    """Write the rendered kit under ``out``; returns the files written.

    Raises:
        ValueError: ``options`` the kit's rule tests are not written for
            (:meth:`KitOptions.check_tested`): nothing is written.
    """
    (options or KitOptions()).check_tested()
    written = []
    for relative, content in render_kit(options).items():
        path = Path(out) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written
