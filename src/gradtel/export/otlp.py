"""OTLP push: the same instruments sent to an OpenTelemetry Collector over OTLP/HTTP.

For jobs that Prometheus cannot scrape (batch schedulers, short-lived pods).
Needs the ``otlp`` extra: ``pip install 'gradtel[otlp]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from .._checks import seconds
from .context import context

__all__ = ["otlp_meter_provider"]

logger = logging.getLogger("gradtel")


class _PublishingReader(PeriodicExportingMetricReader):
    """Pushes what a deferred read-out has finished, as a scrape does, and at shutdown
    everything it still holds: a stalled or ending run's last update (a NaN) is pushed too.
    Its monitors publish through the global registry's context, where a provider that
    gradtel's Prometheus reader does not serve is kept."""

    # The SDK marks collect() final; this override only publishes before calling it, as
    # the Prometheus endpoint does before its collection.
    def collect(self, timeout_millis: float = 10_000) -> None:  # type: ignore[misc]
        _publish(wait=False)
        super().collect(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        _publish(wait=True)
        super().shutdown(timeout_millis=timeout_millis, **kwargs)


def _publish(wait: bool) -> None:
    try:
        context().publish(wait)
    except Exception as exc:  # a "raise" policy: the update is recorded before it acts
        logger.warning("gradtel: an update published before an OTLP push raised: %r", exc)


def otlp_meter_provider(
    endpoint: str | None = None,
    *,
    interval: float = 10.0,
    headers: Mapping[str, str] | None = None,
    service_name: str = "gradtel",
) -> MeterProvider:
    """A ``MeterProvider`` that pushes gradtel's metrics over OTLP/HTTP every ``interval`` seconds.

    Args:
        endpoint: Metrics URL of the collector, e.g. ``http://otel-collector:4318/v1/metrics``;
            default ``$OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` or the OTLP default
            ``http://localhost:4318/v1/metrics``.
        interval: Seconds between two pushes (> 0).
        headers: Extra HTTP headers, e.g. for authentication.
        service_name: The ``service.name`` resource attribute.

    Returns:
        Pass it as ``GradMonitor(model, meter_provider=...)``; call its
        ``shutdown()`` at the end of training to push the last values.

    Raises:
        ValueError: ``interval`` is not a positive number.
    """
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError as exc:  # the optional extra is missing
        raise ImportError(
            "gradtel's OTLP push needs the otlp extra: pip install 'gradtel[otlp]'"
        ) from exc
    interval = seconds("interval", interval)
    reader = _PublishingReader(
        OTLPMetricExporter(endpoint=endpoint, headers=dict(headers or {})),
        export_interval_millis=interval * 1000,
    )
    return MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": service_name})
    )
