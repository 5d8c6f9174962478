"""The public surface is small and deliberate: changing it must change this test."""

from __future__ import annotations

import importlib

import gradtel

EXPORTED = {
    "DEFAULT_ADDR",
    "DEFAULT_PORT",
    "OVERFLOW_LAYER",
    "ROOT_LAYER",
    "GradHealth",
    "GradMonitor",
    "MetricsServer",
    "NonFiniteGradientError",
    "PortInUseError",
    "Status",
    "Thresholds",
    "__version__",
    "clip_grad_norm_",
    "ddp_comm_hook",
    "layer_name",
    "prometheus_meter_provider",
    "serve",
}
MODULES = [
    "banner", "cli", "clip", "demo", "exporter", "health", "layers", "monitor", "policy", "scan", "telemetry",
    "render", "render.grafana", "render.options", "render.prometheus", "render.rule_tests",
    "render.runbook", "stack", "watch", "hooks", "otlp", "origin",
    "_checks", "_ratelimit", "integrations", "integrations.lightning", "integrations.transformers", "httpd", "render.kubernetes",
]  # fmt: skip


def test_exported_names() -> None:
    assert set(gradtel.__all__) == EXPORTED
    for name in EXPORTED:
        assert getattr(gradtel, name) is not None


def test_every_module_lists_its_public_names() -> None:
    for name in MODULES:
        module = importlib.import_module(f"gradtel.{name}")
        assert module.__all__, name
        for public in module.__all__:
            assert hasattr(module, public), f"gradtel.{name}.{public}"
