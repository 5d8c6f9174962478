"""OpenTelemetry instruments fed from each update's :class:`GradHealth`.

Instrument names are chosen so that ``PrometheusMetricReader`` produces the
metric contract as scraped: counters gain ``_total``, a unit of seconds gains
``_seconds``. Every series that can appear is created at 0 up front, because
Prometheus' ``increase()`` cannot see the first value of a series born
non-zero.

Recording is incremental: a healthy update touches a constant number of
series whatever the number of layers (layers whose last-update gauges were
non-zero are reset, counters only move where a count is above 0).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from prometheus_client import REGISTRY, CollectorRegistry

from . import metrics as m
from .health import GradHealth, Status
from .metrics import ERROR_STAGES, KINDS, SKIP_REASONS, UNSCANNED_REASONS, Metric

__all__ = [
    "GradTelemetry",
    "count_error",
    "default_meter_provider",
    "last_collect",
    "last_unhealthy_record",
    "launcher_world_size",
    "note_collect",
    "process_attributes",
    "prometheus_meter_provider",
    "run_id",
]

# Per-update scan time spans microseconds (small models) to seconds (huge
# models on slow hosts); the SDK's default buckets are meant for milliseconds.
SCAN_DURATION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

_SEVERITIES = {Status.WARNING: "warning", Status.CRITICAL: "critical"}

_default_provider: SdkMeterProvider | None = None
_default_lock = threading.RLock()
_last_unhealthy_record: float | None = None
_last_collect: float | None = None


def last_collect() -> float | None:
    """``time.monotonic()`` of the latest ``collect()`` call of any monitor, scanned or
    not, or None: the liveness ``/healthz`` reports."""
    return _last_collect


def note_collect() -> float:
    """Note a ``collect()`` call (liveness); returns its ``time.monotonic()``."""
    global _last_collect
    _last_collect = time.monotonic()
    return _last_collect


def last_unhealthy_record() -> float | None:
    """``time.monotonic()`` of the latest unhealthy update any monitor recorded, or None.

    The endpoint uses it to stay up at exit until Prometheus has scraped it.
    """
    return _last_unhealthy_record


def prometheus_meter_provider(registry: CollectorRegistry | None = None) -> SdkMeterProvider:
    """A ``MeterProvider`` whose metrics are exposed on a prometheus-client registry.

    The reader drops the ``otel_scope_*`` labels and the ``target_info``
    metric: Prometheus adds ``job`` and ``instance`` itself, and the scope
    labels would only repeat "gradtel" on every series.

    Args:
        registry: Registry to expose on; defaults to prometheus-client's
            global ``REGISTRY``, the one :func:`gradtel.serve` serves.

    Returns:
        A new SDK ``MeterProvider``; pass it as ``GradMonitor(meter_provider=...)``.

    Raises:
        TypeError: ``registry`` is not a ``CollectorRegistry``.
    """
    if registry is not None and not isinstance(registry, CollectorRegistry):
        raise TypeError(
            "registry must be a prometheus_client.CollectorRegistry or None (the global "
            f"REGISTRY), got {registry!r} ({type(registry).__name__})"
        )
    reader = PrometheusMetricReader(
        disable_target_info=True,
        scope_info_enabled=False,
        registry=REGISTRY if registry is None else registry,
    )
    # No shutdown at exit: it would unregister the metrics while the endpoint
    # still waits for a last scrape (see gradtel.exporter). Nothing is lost
    # without it: a Prometheus reader holds no data to flush.
    return SdkMeterProvider(metric_readers=[reader], shutdown_on_exit=False)


def default_meter_provider() -> SdkMeterProvider:
    """gradtel's own provider, on prometheus-client's global registry (made on first use)."""
    global _default_provider
    with _default_lock:
        if _default_provider is None:
            _default_provider = prometheus_meter_provider()
        return _default_provider


class _Instruments:
    """The instruments themselves, made once per meter provider from the metric contract.

    Several monitors may share a provider; asking the SDK twice for the same
    instrument would log a duplicate-registration warning each time.
    """

    def __init__(self, meter_provider: MeterProvider) -> None:
        meter = meter_provider.get_meter("gradtel")

        def make(metric: Metric) -> Any:
            create = {"counter": meter.create_counter, "gauge": meter.create_gauge}.get(metric.type)
            if create is None:
                return meter.create_histogram(
                    metric.instrument,
                    unit=metric.unit,
                    description=metric.help,
                    explicit_bucket_boundaries_advisory=SCAN_DURATION_BUCKETS,
                )
            return create(metric.instrument, unit=metric.unit, description=metric.help)

        self.totals = {kind: make(m.GRADS_TOTAL[kind]) for kind in KINDS}
        self.per_update = {kind: make(m.UPDATE_GRADS[kind]) for kind in KINDS}
        self.updates = make(m.UPDATES)
        self.unhealthy = make(m.UNHEALTHY_UPDATES)
        self.status = make(m.UPDATE_STATUS)
        self.last_update = make(m.LAST_UPDATE_TIMESTAMP)
        self.unscanned = make(m.UNSCANNED_UPDATES)
        self.duration = make(m.SCAN_DURATION)
        self.first_bad = make(m.FIRST_BAD_LAYER)
        self.skipped = make(m.SKIPPED_UPDATES)
        self.origin = make(m.ORIGIN_UPDATES)
        self.nonfinite_loss = make(m.NONFINITE_LOSS_UPDATES)
        self.errors = make(m.ERRORS)


_instruments: weakref.WeakKeyDictionary[MeterProvider, _Instruments] = weakref.WeakKeyDictionary()


def instruments_for(meter_provider: MeterProvider) -> _Instruments:
    """The gradtel instruments on ``meter_provider``, made on first use."""
    with _default_lock:
        found = _instruments.get(meter_provider)
        if found is None:
            found = _instruments[meter_provider] = _Instruments(meter_provider)
        return found


def count_error(stage: str, meter_provider: MeterProvider | None = None) -> None:
    """Count one failure inside gradtel in ``gradtel_errors_total{stage=...}``."""
    provider = default_meter_provider() if meter_provider is None else meter_provider
    instruments_for(provider).errors.add(1, {**process_attributes(), "stage": stage})


def launcher_world_size() -> int:
    """``WORLD_SIZE`` as torchrun and most launchers set it; 1 when absent or empty.

    Raises:
        ValueError: ``WORLD_SIZE`` is set but not a positive integer.
    """
    import os

    text = os.environ.get("WORLD_SIZE", "").strip()
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise ValueError(
            f"WORLD_SIZE must be a positive integer, as torchrun sets it, got {text!r}; "
            "fix or unset it"
        )
    return int(text)


def run_id() -> str | None:
    """The training run this process belongs to: ``$GRADTEL_RUN``, else torchrun's
    ``$TORCHELASTIC_RUN_ID`` (unless it is torchrun's placeholder ``none``), else None.
    The alerts page once per run, whatever its number of ranks."""
    import os

    for name in ("GRADTEL_RUN", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(name, "").strip()
        if value and value != "none":
            return value
    return None


def process_attributes() -> dict[str, str]:
    """Labels every series of this process carries: ``run`` when the launcher names the run
    (see :func:`run_id`), ``rank`` when distributed with world size > 1.

    The rank comes from ``torch.distributed`` when it is initialised, else from
    the ``RANK`` and ``WORLD_SIZE`` variables that torchrun (and most launchers) set.

    Raises:
        ValueError: ``WORLD_SIZE`` or ``RANK`` is set but malformed.
    """
    run = run_id()
    return {"run": run, **_rank()} if run is not None else _rank()


def _rank() -> dict[str, str]:
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            return {"rank": str(dist.get_rank())}
        return {}
    if launcher_world_size() > 1:
        rank = os.environ.get("RANK", "").strip()
        if not rank:
            return {}
        if not rank.isdigit():
            raise ValueError(f"RANK must be a non-negative integer, as torchrun sets it, got {rank!r}")
        return {"rank": rank}
    return {}


class _RankPrefix(logging.Filter):
    """In a distributed run every gradtel log line starts with ``rank N:``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            rank = process_attributes().get("rank")
        except ValueError:  # a malformed launcher variable: reported where it is used
            rank = None
        if rank is not None and not getattr(record, "gradtel_rank", None):
            record.msg = f"rank {rank}: {record.msg}"
            record.gradtel_rank = rank
        return True


logging.getLogger("gradtel").addFilter(_RankPrefix())


class GradTelemetry:
    """The gradtel instruments on one meter provider, for one set of layers.

    Args:
        layers: The ``layer`` labels whose series exist from the start, at 0.
        meter_provider: Where the instruments live.
        attributes: Labels put on every series (``rank`` in distributed runs).
        start_time: Unix time the ``last_update_timestamp`` gauge starts at,
            so that a stall alert counts from start until the first update.
    """

    def __init__(
        self,
        layers: Sequence[str],
        *,
        meter_provider: MeterProvider,
        attributes: Mapping[str, str],
        start_time: float,
    ) -> None:
        self._base = dict(attributes)
        self._layer_attrs: dict[str, dict[str, str]] = {}
        self._band_attrs = {
            (kind, status): {**self._base, "kind": kind, "severity": severity}
            for kind in KINDS
            for status, severity in _SEVERITIES.items()
        }
        self._error_attrs = {stage: {**self._base, "stage": stage} for stage in ERROR_STAGES}
        self._skip_attrs = {reason: {**self._base, "reason": reason} for reason in SKIP_REASONS}
        self._unscanned_attrs = {r: {**self._base, "reason": r} for r in UNSCANNED_REASONS}
        self._first_bad_attrs: dict[tuple[str, str], dict[str, str]] = {}
        self._origin_attrs = {kind: {**self._base, "kind": kind} for kind in KINDS}
        self._last_nonzero: dict[str, set[str]] = {"nan": set(), "inf": set()}

        self._instruments = ins = instruments_for(meter_provider)
        self.add_layers(layers)
        for attrs in self._band_attrs.values():
            ins.unhealthy.add(0, attrs)
        for attrs in self._error_attrs.values():
            ins.errors.add(0, attrs)
        for attrs in self._skip_attrs.values():
            ins.skipped.add(0, attrs)
        for attrs in self._unscanned_attrs.values():
            ins.unscanned.add(0, attrs)
        for attrs in self._origin_attrs.values():
            ins.origin.add(0, attrs)
        ins.nonfinite_loss.add(0, self._base)
        ins.updates.add(0, self._base)
        ins.status.set(Status.UNKNOWN.level, self._base)  # no update looked at yet
        ins.last_update.set(start_time, self._base)

    def add_layers(self, layers: Sequence[str]) -> None:
        """Make the series of layers not seen before, at 0."""
        for layer in layers:
            self._layer(layer)

    def _layer(self, layer: str) -> dict[str, str]:
        """The labels of ``layer``'s series, made at 0 on first use (a layer frozen when
        the monitor was made gets its series when it first has a gradient counted)."""
        attrs = self._layer_attrs.get(layer)
        if attrs is None:
            attrs = self._layer_attrs[layer] = {**self._base, "layer": layer}
            for kind in KINDS:
                self._instruments.totals[kind].add(0, attrs)
                self._instruments.per_update[kind].set(0, attrs)
        return attrs

    def record(self, health: GradHealth, *, duration: float, timestamp: float) -> None:
        """Record one due update: scanned, unscanned, or an AMP overflow the scaler skips."""
        ins = self._instruments
        ins.last_update.set(timestamp, self._base)
        if health.unscanned is not None:
            ins.unscanned.add(1, self._unscanned_attrs[health.unscanned])
            ins.status.set(Status.UNKNOWN.level, self._base)
            return
        ins.updates.add(1, self._base)
        ins.duration.record(duration, self._base)
        for kind, local in (("nan", health.local_nan_total), ("inf", health.local_inf_total)):
            if local:
                ins.origin.add(1, self._origin_attrs[kind])
        if health.loss_finite is False:
            ins.nonfinite_loss.add(1, self._base)
        if health.amp_overflow:
            # Handled by the scaler: not an unhealthy update, and the per-layer
            # series keep describing the updates that reached the optimizer.
            ins.skipped.add(1, self._skip_attrs["amp_overflow"])
            return
        for kind, by_layer in (("nan", health.nan_by_layer), ("inf", health.inf_by_layer)):
            total, gauge = ins.totals[kind], ins.per_update[kind]
            for layer, count in by_layer.items():
                attrs = self._layer(layer)
                total.add(count, attrs)
                gauge.set(count, attrs)
            for layer in self._last_nonzero[kind].difference(by_layer):
                gauge.set(0, self._layer_attrs[layer])
            self._last_nonzero[kind] = set(by_layer)
        for kind, status in (("nan", health.nan_status), ("inf", health.inf_status)):
            if status is not Status.HEALTHY:
                ins.unhealthy.add(1, self._band_attrs[(kind, status)])
        global _last_unhealthy_record
        if health.status is not Status.HEALTHY:
            _last_unhealthy_record = time.monotonic()
        for kind, first in (("nan", health.first_nan_layer), ("inf", health.first_inf_layer)):
            if first is not None:
                ins.first_bad.set(health.step, self._first_bad_series(kind, first))
        ins.status.set(health.status.level, self._base)

    def _first_bad_series(self, kind: str, layer: str) -> dict[str, str]:
        attrs = self._first_bad_attrs.get((kind, layer))
        if attrs is None:
            attrs = self._first_bad_attrs[(kind, layer)] = {**self._layer(layer), "kind": kind}
        return attrs

    def touch(self, timestamp: float) -> None:
        """Note an update that was not due for a scan (``sample_every``): liveness only."""
        self._instruments.last_update.set(timestamp, self._base)

    def record_skip(self, reason: str) -> None:
        """Count one update whose optimizer step is skipped (``reason`` from :data:`SKIP_REASONS`)."""
        self._instruments.skipped.add(1, self._skip_attrs[reason])

    def record_error(self, stage: str) -> None:
        """Count one failure inside gradtel (``stage`` from :data:`ERROR_STAGES`)."""
        self._instruments.errors.add(1, self._error_attrs[stage])
