"""Kubernetes side of the kit: a PodMonitor, a PrometheusRule with the same rules, and an
example training Job that serves gradtel on all interfaces with a health probe.

For clusters running the Prometheus Operator (monitoring.coreos.com/v1).
"""

from __future__ import annotations

from typing import Any

from .options import KitOptions
from .prometheus import rules

__all__ = ["PORT_NAME", "pod_monitor", "prometheus_rule", "training_job"]

PORT_NAME = "gradtel"
_LABELS = {"app.kubernetes.io/name": "training", "app.kubernetes.io/component": "trainer"}


def pod_monitor(o: KitOptions) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": o.job, "labels": {"app.kubernetes.io/part-of": "gradtel"}},
        "spec": {
            "jobLabel": "app.kubernetes.io/name",
            "selector": {"matchLabels": dict(_LABELS)},
            "podMetricsEndpoints": [
                {
                    "port": PORT_NAME,
                    "path": "/metrics",
                    "interval": "5s",
                    # The rules select job="<job>": set it whatever the pod is called.
                    "relabelings": [
                        {"targetLabel": "job", "replacement": o.job, "action": "replace"}
                    ],
                }
            ],
        },
    }


def prometheus_rule(o: KitOptions) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "gradtel-rules", "labels": {"app.kubernetes.io/part-of": "gradtel"}},
        "spec": rules(o),
    }


def training_job() -> dict[str, Any]:
    probe = {
        "httpGet": {"path": "/healthz", "port": PORT_NAME},
        "periodSeconds": 30,
        "failureThreshold": 3,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "training"},
        "spec": {
            "template": {
                "metadata": {"labels": dict(_LABELS)},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "your-registry/your-training-image:latest",
                            "command": ["python", "train.py"],
                            "env": [
                                # Prometheus scrapes the pod IP: listen beyond loopback.
                                {"name": "GRADTEL_ADDR", "value": "0.0.0.0"},
                                {"name": "GRADTEL_PORT", "value": "9464"},
                            ],
                            "ports": [{"name": PORT_NAME, "containerPort": 9464}],
                            # /healthz turns 503 after 10 minutes without an update.
                            "livenessProbe": probe,
                        }
                    ],
                },
            }
        },
    }
