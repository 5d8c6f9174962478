"""OpenTelemetry instruments fed from each update's :class:`GradHealth`.

Instrument names are chosen so that ``PrometheusMetricReader`` produces the
metric contract as scraped: counters gain ``_total``, a unit of seconds gains
``_seconds``. Every series that can appear is created at 0 up front, because
Prometheus' ``increase()`` cannot see the first value of a series born
non-zero.

Recording costs the training thread no SDK call per layer: an update's counts land
in each monitor's plain fields, and the per-layer series, the unhealthy-update
bands and the per-update series are read from them when the metrics are collected.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from prometheus_client import REGISTRY, CollectorRegistry

from .. import metrics as m
from .._ratelimit import RateLimitedLog
from ..health import GradHealth, Status
from ..metrics import ERROR_STAGES, KINDS, SKIP_REASONS, UNSCANNED_REASONS, Metric
from ..pipeline.checkpoints import WeightsHealth
from .context import context, context_of, contexts
from .ranks import process_attributes

__all__ = [
    "GradTelemetry",
    "count_error",
    "count_exception",
    "default_meter_provider",
    "prometheus_meter_provider",
]

# Per-update scan time spans microseconds (small models) to seconds (huge
# models on slow hosts); the SDK's default buckets are meant for milliseconds.
SCAN_DURATION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

DURATIONS_KEPT = 256
"""Update durations that wait for the next collection of the metrics; when that many
wait, the training thread records them itself."""

_SEVERITIES = {Status.WARNING: "warning", Status.CRITICAL: "critical"}


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
    # still waits for a last scrape (see gradtel.export.endpoint). Nothing is lost
    # without it: a Prometheus reader holds no data to flush.
    provider = SdkMeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    served = context(registry)
    with served.lock:
        served.providers.add(provider)
        served.made = provider
        pending = served.pending_errors
        for stage, count in pending.items():
            instruments_for(provider).errors.add(count, {**process_attributes(), "stage": stage})
        pending.clear()
    return provider


def default_meter_provider() -> MeterProvider:
    """gradtel's own provider, on prometheus-client's global registry (made on first use)."""
    served = context()
    with served.lock:
        if served.default_provider is None:
            served.default_provider = prometheus_meter_provider()
        return served.default_provider


class Instruments:
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

        # What every update changes (the count, status and time of the latest update, the
        # gradient norm and its peak) is read when scraped, from each monitor's plain
        # fields (the scan's duration too, drained when collected): a healthy update
        # makes no SDK call at all. So are the per-layer counts and the unhealthy-update
        # bands: an SDK call costs several microseconds, per layer, in the training thread.
        self.update_sources: set[GradTelemetry] = set()
        observed: tuple[tuple[Metric, Callable[[CallbackOptions], Iterable[Observation]]], ...] = (
            *((m.GRADS_TOTAL[kind], partial(self._observe_layer_totals, kind)) for kind in KINDS),
            *((m.UPDATE_GRADS[kind], partial(self._observe_layer_latest, kind)) for kind in KINDS),
            (m.UNHEALTHY_UPDATES, self._observe_bands),
            (m.LAST_UNHEALTHY_STEP, self._observe_last_unhealthy_step),
            (m.UPDATES, self._observe_updates),
            (m.UPDATE_STATUS, self._observe_status),
            (m.LAST_UPDATE_TIMESTAMP, self._observe_last_update),
            (m.START_TIME, self._observe_start),
            (m.GRAD_NORM, self._observe_norm),
            (m.GRAD_NORM_PEAK, self._observe_norm_peak),
            (m.LOCAL_GRAD_NORM, self._observe_local_norm),
            (m.AMP_LOSS_SCALE, self._observe_loss_scale),
        )
        for metric, observe in observed:
            create = (
                meter.create_observable_counter
                if metric.type == "counter"
                else meter.create_observable_gauge
            )
            create(metric.instrument, [observe], unit=metric.unit, description=metric.help)
        self.unscanned = make(m.UNSCANNED_UPDATES)
        self.duration = make(m.SCAN_DURATION)
        self.first_bad = make(m.FIRST_BAD_LAYER)
        # Read when scraped, not set per update: hundreds of layers would cost the
        # SDK tens of microseconds each, every update.
        # Kept like the other series, after their monitor is gone.
        self.layer_norm_sources: set[GradTelemetry] = set()
        meter.create_observable_gauge(
            m.LAYER_GRAD_NORM.instrument,
            [self._observe_layer_norms],
            description=m.LAYER_GRAD_NORM.help,
        )
        self.skipped = make(m.SKIPPED_UPDATES)
        self.origin = make(m.ORIGIN_UPDATES)
        self.device_info = make(m.DEVICE_INFO)
        self.nonfinite_loss = make(m.NONFINITE_LOSS_UPDATES)
        self.nonfinite_loss_incident_step = make(m.NONFINITE_LOSS_INCIDENT_STEP)
        self.refused_checkpoints = make(m.REFUSED_CHECKPOINTS)
        self.errors = make(m.ERRORS)
        self.exceptions = make(m.TRAINING_EXCEPTIONS)
        self.fingerprint = make(m.REPLICA_FINGERPRINT)
        self.fingerprint_update = make(m.REPLICA_FINGERPRINT_UPDATE)

    def _by_labels(self) -> dict[frozenset[tuple[str, str]], list[GradTelemetry]]:
        """The monitors by their labels: two monitors of one process share their series."""
        found: dict[frozenset[tuple[str, str]], list[GradTelemetry]] = {}
        for source in list(self.update_sources):
            found.setdefault(frozenset(source.labels.items()), []).append(source)
        return found

    def _observe_updates(self, options: CallbackOptions) -> Iterable[Observation]:
        # The SDK runs these callbacks before it collects the synchronous instruments:
        # the durations that wait are recorded in time for this collection.
        for source in list(self.update_sources):
            try:
                source.record_durations()
            except Exception as exc:  # the scrape still gets every other series
                source.failed("record", exc)
        for sources in self._by_labels().values():
            yield Observation(sum(s.updates for s in sources), sources[0].labels)

    def _observe_layer_totals(self, kind: str, options: CallbackOptions) -> Iterable[Observation]:
        for sources in self._by_labels().values():
            # Summed over the monitors sharing these labels, as one counter would add them.
            totals: dict[str, tuple[dict[str, str], int]] = {}
            for source in sources:
                for layer, attrs, count in source.layer_totals(kind):
                    totals[layer] = (attrs, totals.get(layer, (attrs, 0))[1] + count)
            for attrs, count in totals.values():
                yield Observation(count, attrs)

    def _observe_layer_latest(self, kind: str, options: CallbackOptions) -> Iterable[Observation]:
        for sources in self._by_labels().values():
            # The most recent scanned update of these labels, as one monitor's gauges would
            # show it: the layers of the other monitors that share them are 0, so that no
            # sum over layers mixes two updates (a closed monitor's give way to the next).
            newest = max(sources, key=lambda s: s.scanned_time)
            latest: dict[str, tuple[dict[str, str], int]] = {}
            for source in sources:
                for layer, attrs, count in source.layer_latest(kind):
                    if source is newest:
                        latest[layer] = (attrs, count)
                    else:
                        latest.setdefault(layer, (attrs, 0))
            for attrs, count in latest.values():
                yield Observation(count, attrs)

    def _observe_bands(self, options: CallbackOptions) -> Iterable[Observation]:
        for sources in self._by_labels().values():
            for band, attrs in sources[0].band_attrs.items():
                yield Observation(sum(s.bands[band] for s in sources), attrs)

    def _observe_last_unhealthy_step(self, options: CallbackOptions) -> Iterable[Observation]:
        for sources in self._by_labels().values():
            for kind in KINDS:
                steps = [
                    s.last_unhealthy_steps[kind] for s in sources if kind in s.last_unhealthy_steps
                ]
                if steps:  # born with the first unhealthy update of that kind
                    yield Observation(max(steps)[1], sources[0].kind_attrs[kind])

    def _observe_status(self, options: CallbackOptions) -> Iterable[Observation]:
        for sources in self._by_labels().values():
            latest = max(sources, key=lambda s: s.last_update)
            yield Observation(latest.status, latest.labels)

    def _observe_last_update(self, options: CallbackOptions) -> Iterable[Observation]:
        for sources in self._by_labels().values():
            yield Observation(max(s.last_update for s in sources), sources[0].labels)

    def _observe_start(self, options: CallbackOptions) -> Iterable[Observation]:
        for sources in self._by_labels().values():
            yield Observation(min(s.start_time for s in sources), sources[0].labels)

    def _observe_loss_scale(self, options: CallbackOptions) -> Iterable[Observation]:
        for sources in self._by_labels().values():
            scaled = [s for s in sources if s.loss_scale is not None]
            if scaled:
                latest = max(scaled, key=lambda s: s.last_update)
                yield Observation(latest.loss_scale, latest.labels)  # type: ignore[arg-type]

    def _observe_norm(self, options: CallbackOptions) -> Iterable[Observation]:
        for source, norm in self._latest_norms():
            yield Observation(norm, source.labels)

    def _observe_norm_peak(self, options: CallbackOptions) -> Iterable[Observation]:
        for sources in self._by_labels().values():
            # The largest of the monitors sharing these labels (a GAN's two, say); none in
            # the window: no peak, rather than an old one.
            peak = max((p for p in (s.norm_peak() for s in sources) if p is not None), default=None)
            if peak is not None:
                yield Observation(peak, sources[0].labels)

    def _observe_local_norm(self, options: CallbackOptions) -> Iterable[Observation]:
        for sources in self._by_labels().values():
            normed = [s for s in sources if s.local_grad_norm is not None]
            if normed:
                latest = max(normed, key=lambda s: s.last_update)
                yield Observation(latest.local_grad_norm, latest.labels)  # type: ignore[arg-type]

    def _latest_norms(self) -> Iterable[tuple[GradTelemetry, float]]:
        """Per set of labels, the largest latest norm of the open monitors sharing them (a
        GAN's two, whose peak is the largest of theirs too: the spike alert compares the
        two), else the norm of the monitor that recorded one last (none: no series yet)."""
        for sources in self._by_labels().values():
            normed = [(s, s.grad_norm) for s in sources if s.grad_norm is not None]
            watching = [pair for pair in normed if pair[0].closed is None]
            if watching:
                yield max(watching, key=lambda pair: pair[1])
            elif normed:
                yield max(normed, key=lambda pair: pair[0].last_norm)

    def _observe_layer_norms(self, options: CallbackOptions) -> Iterable[Observation]:
        for source in list(self.layer_norm_sources):
            for attrs, norm in source.layer_norms.values():
                yield Observation(norm, attrs)


def instruments_for(meter_provider: MeterProvider) -> Instruments:
    """The gradtel instruments on ``meter_provider``, made on first use."""
    served = context_of(meter_provider)
    with served.lock:
        found: Instruments | None = served.instruments.get(meter_provider)
        if found is None:
            found = served.instruments[meter_provider] = Instruments(meter_provider)
        return found


def count_error(stage: str, registry: CollectorRegistry | None = None) -> None:
    """Count one failure inside gradtel in ``gradtel_errors_total{stage=...}``, in the
    metrics of ``registry`` (default: the global ``REGISTRY``) that gradtel records into."""
    served = context(registry)
    with served.lock:
        provider = served.made
        if provider is None and served.registry is REGISTRY:
            provider = default_meter_provider()
        if (
            provider is None
        ):  # nothing records into it yet: counted by the first provider made for it
            served.pending_errors[stage] = served.pending_errors.get(stage, 0) + 1
            return
    instruments_for(provider).errors.add(1, {**process_attributes(), "stage": stage})


def gradients_before_crash(sources: Sequence[GradTelemetry]) -> str:
    """The ``gradients`` label of a crash, from the monitors that record on one provider.

    The open monitors describe the training that crashed (a monitor closed and replaced
    described weights since reloaded); with none open, the one closed last does (closed on
    the way out). One that saw NaN or Inf is enough; one that did not look at its latest
    update makes the others' "healthy" unknown."""
    watching = [s for s in sources if s.closed is None] or sorted(
        sources, key=lambda s: s.closed or 0
    )[-1:]
    seen = {s.gradients_state() for s in watching}
    return "unhealthy" if "unhealthy" in seen else "healthy" if seen == {"healthy"} else "unknown"


def count_exception(exc_type: type[BaseException]) -> None:
    """Count an uncaught exception that ends the process in ``gradtel_training_exceptions_total``,
    on every meter provider gradtel records into, and have the endpoints wait for its scrape."""
    attributes = {**process_attributes(), "type": exc_type.__name__}
    for recorded, instruments in [(c, i) for c in contexts() for i in list(c.instruments.values())]:
        try:
            recorded.publish(wait=True)  # the updates a deferred read-out still holds
        except Exception as exc:
            logging.getLogger("gradtel").warning(
                "gradtel: could not publish the pending updates: %r", exc
            )
            count_error("record", recorded.registry)
        state = gradients_before_crash(list(instruments.update_sources))
        instruments.exceptions.add(1, {**attributes, "gradients": state})
        recorded.last_unhealthy = time.monotonic()


class RollingMax:
    """The largest value added in the last ``seconds``, in O(1) amortized per value. The
    times (``now``) come from the owner's clock: this class never reads one.

    >>> peak = RollingMax(60)
    >>> peak.add(3.0, now=0), peak.add(1.0, now=30), peak.add(2.0, now=70)
    (3.0, 3.0, 2.0)
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._kept: deque[tuple[float, float]] = deque()  # (time, value), values decreasing

    def add(self, value: float, now: float) -> float:
        kept = self._kept
        while kept and kept[-1][1] <= value:
            kept.pop()
        kept.append((now, value))
        return self.peak(now)  # type: ignore[return-value]

    def peak(self, now: float) -> float | None:
        """The largest value added in the last ``seconds`` before ``now``; None if none was.

        >>> peak = RollingMax(60)
        >>> peak.add(3.0, now=0), peak.peak(now=59), peak.peak(now=61)
        (3.0, 3.0, None)
        """
        kept = self._kept
        while kept and kept[0][0] < now - self.seconds:
            kept.popleft()
        return kept[0][1] if kept else None


class GradTelemetry:
    """The gradtel instruments on one meter provider, for one set of layers.

    Args:
        layers: The ``layer`` labels whose series exist from the start, at 0.
        meter_provider: Where the instruments live.
        attributes: Labels put on every series (``rank`` in distributed runs).
        start_time: Unix time the monitor started (``gradtel_start_time_seconds``), and
            that the ``last_update_timestamp`` gauge starts at, so that a stall alert
            counts from start until the first update.
        error_log: Where failures are logged, once a minute per stage at most
            (the monitor's, shared with its other stages).
        clock: Monotonic seconds, for the rolling peak of the gradient norm.
        weights: What the monitor's updates left in its weights, for the ``gradients``
            label of a crash.
        sampled: The monitor scans one update in several (``sample_every``): an
            incident's first scanned update may follow unscanned ones that poisoned the
            weights.
        device: The host and device labels of ``gradtel_device_info``
            (:func:`gradtel.export.device.device_labels`); None: no such series.
    """

    def __init__(
        self,
        layers: Sequence[str],
        *,
        meter_provider: MeterProvider,
        attributes: Mapping[str, str],
        start_time: float,
        error_log: RateLimitedLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        weights: WeightsHealth | None = None,
        sampled: bool = False,
        device: Mapping[str, str] | None = None,
    ) -> None:
        self.error_log = error_log or RateLimitedLog(logging.getLogger("gradtel"))
        self.clock = clock
        self.weights = weights
        self.closed: float | None = None
        """When the monitor was closed (monotonic), or None: a crash is described by the
        open monitors, else by the one closed last."""
        self.scanned_time = -math.inf
        """Unix time of the latest scanned update that the per-layer series describe (not
        an AMP overflow the scaler skips)."""
        self.sampled = sampled
        self._latest_unhealthy = False  # the latest scanned update was, and no rollback since
        # Which collect() made the latest scanned update and the latest one left unscanned
        # (counted, not timed: a wall clock may step back): a deferred read-out records an
        # update after later sampled-out ones.
        self._scanned_at = self._unscanned_at = -math.inf
        self._unscanned_before = False  # the latest recorded update was not scanned
        # Born with its first value: a process restarted on the same labels must not hide,
        # with a 0, the step the process before it recorded.
        self._loss_step_kinds: set[str] = set()
        self.labels = dict(attributes)
        """The labels on every series of this monitor."""
        self._layer_attrs: dict[str, dict[str, str]] = {}
        self.band_attrs: dict[tuple[str, Status], dict[str, str]] = {
            (kind, status): {**self.labels, "kind": kind, "severity": severity}
            for kind in KINDS
            for status, severity in _SEVERITIES.items()
        }
        self._error_attrs = {stage: {**self.labels, "stage": stage} for stage in ERROR_STAGES}
        self._skip_attrs = {reason: {**self.labels, "reason": reason} for reason in SKIP_REASONS}
        self._unscanned_attrs = {r: {**self.labels, "reason": r} for r in UNSCANNED_REASONS}
        self._first_bad_attrs: dict[tuple[str, str], dict[str, str]] = {}
        self.kind_attrs = {kind: {**self.labels, "kind": kind} for kind in KINDS}
        self.bands = dict.fromkeys(self.band_attrs, 0)
        """Unhealthy updates per kind and band, for ``gradtel_unhealthy_updates_total``."""
        self.last_unhealthy_steps: dict[str, tuple[float, int]] = {}
        """Per kind, the time and step of the latest unhealthy update with values of it."""
        self._totals: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}
        self._latest: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}
        """Per kind, the latest update's layers with values of it (swapped whole)."""
        self._ongoing: set[str] = set()
        """The kinds whose run of unhealthy updates goes on: the previous update had values
        of that kind, and no rollback (:meth:`forget_incidents`) came since."""
        self._norm_peak = RollingMax(m.NORM_PEAK_SECONDS)
        self._durations: deque[float] = deque()  # appends and pops are thread-safe
        self.layer_norms: dict[str, tuple[dict[str, str], float]] = {}
        """The latest finite norm of each layer, and its labels (no NaN/Inf series come with them)."""

        self._instruments = ins = instruments_for(meter_provider)
        self.context = context_of(meter_provider)
        self.add_layers(layers)
        for attrs in self._error_attrs.values():
            ins.errors.add(0, attrs)
        for attrs in self._skip_attrs.values():
            ins.skipped.add(0, attrs)
        for attrs in self._unscanned_attrs.values():
            ins.unscanned.add(0, attrs)
        for attrs in self.kind_attrs.values():
            ins.origin.add(0, attrs)
        ins.nonfinite_loss.add(0, self.labels)
        if device is not None:
            ins.device_info.set(1, {**self.labels, **device})
        self.updates = 0
        """Updates scanned, for ``gradtel_updates_total``."""
        self.status = Status.UNKNOWN.level  # no update looked at yet
        self.start_time = start_time
        self.last_update = start_time
        self.grad_norm: float | None = None
        """The latest finite gradient norm, for ``gradtel_grad_norm`` (None: none yet)."""
        self.last_norm = 0.0  # monotonic time of the latest norm
        self.loss_scale: float | None = None
        """The AMP scaler's latest loss scale, for ``gradtel_amp_loss_scale`` (None: none seen)."""
        self._fingerprint: tuple[int, int] | None = None
        """The latest replica check: its update and fingerprint."""
        self.local_grad_norm: float | None = None
        """The latest finite norm of this rank's own gradients before the reduction, for
        ``gradtel_local_grad_norm`` (None: none yet, or not a distributed run)."""
        ins.update_sources.add(self)

    def forget_incidents(self) -> None:
        """The weights were rolled back: set every first-bad-layer series to 0, so that the
        next unhealthy update starts a new incident and the page names its layer and step."""
        for attrs in self._first_bad_attrs.values():
            self._instruments.first_bad.set(0, attrs)
        for kind in self._loss_step_kinds:
            self._instruments.nonfinite_loss_incident_step.set(0, self.kind_attrs[kind])
        self._ongoing = set()
        self._latest_unhealthy = False

    def gradients_state(self) -> str:
        """The ``gradients`` label of a crash: ``unhealthy`` when NaN or Inf gradients came
        before it (the weights took an unhealthy update, or the latest scanned update was
        unhealthy, stopped or skipped, and no rollback came since); else ``unknown`` when the
        latest update was not scanned (sampled out, no gradients, a failed scan) or none was
        yet; ``healthy`` when it was, and was."""
        if (self.weights is not None and not self.weights.healthy) or self._latest_unhealthy:
            return "unhealthy"
        return "healthy" if self.updates and self._scanned_at > self._unscanned_at else "unknown"

    def norm_peak(self) -> float | None:
        """The largest gradient norm of the last ``NORM_PEAK_SECONDS``, as of now."""
        return self._norm_peak.peak(self.clock())

    def add_layers(self, layers: Sequence[str]) -> None:
        """Make the series of layers not seen before, at 0."""
        for layer in layers:
            self._layer(layer)

    def _layer(self, layer: str) -> dict[str, str]:
        """The labels of ``layer``'s series, made at 0 on first use (a layer frozen when
        the monitor was made gets its series when it first has a gradient counted)."""
        attrs = self._layer_attrs.get(layer)
        if attrs is None:
            # Labels first: a scrape reading the totals meanwhile finds the labels of each.
            attrs = self._layer_attrs[layer] = {**self.labels, "layer": layer}
            for totals in self._totals.values():
                totals[layer] = 0
        return attrs

    def layer_totals(self, kind: str) -> list[tuple[str, dict[str, str], int]]:
        """Each layer, its labels and its count of ``kind`` values since start."""
        attrs = self._layer_attrs
        return [(layer, attrs[layer], n) for layer, n in list(self._totals[kind].items())]

    def layer_latest(self, kind: str) -> list[tuple[str, dict[str, str], int]]:
        """Each layer, its labels and its count of ``kind`` values in the latest update."""
        latest = self._latest[kind]
        layers = list(self._layer_attrs.items())  # a copy: the training thread may add one
        return [(layer, attrs, latest.get(layer, 0)) for layer, attrs in layers]

    def record(
        self, health: GradHealth, *, duration: float, timestamp: float, sequence: int
    ) -> None:
        """Record one due update: scanned, unscanned, or an AMP overflow the scaler skips.
        ``sequence``: which ``collect()`` of its monitor made it."""
        self.last_update = timestamp
        if health.unscanned is None:
            self.updates += 1
            if not health.amp_overflow:
                self.scanned_time = timestamp
            # An SDK record is a sixth of a small model's update (its code is cold after
            # a training step): the duration waits for the next collection instead.
            self._durations.append(duration)
        self._record_series(health)
        self._unscanned_before = health.unscanned is not None
        if health.unscanned is None:
            self._latest_unhealthy = (
                not health.amp_overflow and health.status.level > Status.HEALTHY.level
            )
            self._scanned_at = max(self._scanned_at, sequence)
        else:
            self._unscanned_at = max(self._unscanned_at, sequence)
        if len(self._durations) >= DURATIONS_KEPT:  # nothing collects them: record them now
            self.record_durations()

    def _record_series(self, health: GradHealth) -> None:
        """The update's own series, its duration apart."""
        ins = self._instruments
        if health.unscanned is not None:
            ins.unscanned.add(1, self._unscanned_attrs[health.unscanned])
            self.status = Status.UNKNOWN.level
            return
        if health.loss_scale is not None:
            self.loss_scale = health.loss_scale
        for kind, local in (("nan", health.local_nan_total), ("inf", health.local_inf_total)):
            if local:
                ins.origin.add(1, self.kind_attrs[kind])
        local_norm = health.local_grad_norm
        if local_norm is not None and math.isfinite(local_norm):
            self.local_grad_norm = local_norm  # a NaN or Inf one is the origin count's business
        if health.loss_finite is False:
            ins.nonfinite_loss.add(1, self.labels)
        if health.amp_overflow:
            # Handled by the scaler: not an unhealthy update, and the per-layer
            # series keep describing the updates that reached the optimizer.
            ins.skipped.add(1, self._skip_attrs["amp_overflow"])
            return
        if health.grad_norm is not None and math.isfinite(health.grad_norm):
            # A NaN or Inf norm is the NaN/Inf alerts' business: the gauge keeps the last finite one.
            self.last_norm = self.clock()
            self._norm_peak.add(health.grad_norm, self.last_norm)
            self.grad_norm = health.grad_norm
        if health.layer_grad_norms:
            self._keep_layer_norms(health.layer_grad_norms)
        latest = self._latest
        if not (health.nan_by_layer or health.inf_by_layer or latest["nan"] or latest["inf"]):
            self.status = Status.HEALTHY.level  # the usual update: no per-layer series move
            return
        if (
            not (self._ongoing or self._unscanned_before or self.sampled)
            and health.loss_finite is False
        ):
            # The incident's first update (once the weights hold NaN every later loss does),
            # with nothing unscanned before it that could have poisoned the weights.
            for kind, first in (("nan", health.first_nan_layer), ("inf", health.first_inf_layer)):
                if first is not None:
                    ins.nonfinite_loss_incident_step.set(health.step, self.kind_attrs[kind])
                    self._loss_step_kinds.add(kind)
        for kind, first in (("nan", health.first_nan_layer), ("inf", health.first_inf_layer)):
            # Only on an update that starts a run of updates with values of that kind (``last``
            # is still the previous update's): in those that follow, the first bad layer is
            # where the values spread to.
            if first is not None and kind not in self._ongoing:
                ins.first_bad.set(health.step, self._first_bad_series(kind, first))
        for kind, by_layer in (("nan", health.nan_by_layer), ("inf", health.inf_by_layer)):
            totals = self._totals[kind]
            for layer, count in by_layer.items():
                self._layer(layer)
                totals[layer] += count
            self._latest[kind] = dict(by_layer)
        self._ongoing = {kind for kind, layers in self._latest.items() if layers}
        for kind, status in (("nan", health.nan_status), ("inf", health.inf_status)):
            if status is not Status.HEALTHY:
                self.bands[(kind, status)] += 1
                self.last_unhealthy_steps[kind] = (self.last_update, health.step)
        if health.status is not Status.HEALTHY:
            self.context.last_unhealthy = time.monotonic()
        self.status = health.status.level

    def record_durations(self) -> None:
        """Record the durations of the updates made since the last collection. One that
        the SDK fails to record is lost; the first failure is raised after the others."""
        record, durations = self._instruments.duration.record, self._durations
        failure: Exception | None = None
        while True:
            try:
                duration = durations.popleft()
            except IndexError:  # none left, or another thread took the last one
                break
            try:
                record(duration, self.labels)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _keep_layer_norms(self, norms: Mapping[str, float]) -> None:
        # Swapped whole: a scrape may be reading the old one. A layer with no gradient in
        # this update (frozen since) has no norm; a non-finite one keeps its last finite.
        kept = {layer: value for layer, value in self.layer_norms.items() if layer in norms}
        for layer, norm in norms.items():
            if math.isfinite(norm):
                attrs = kept[layer][0] if layer in kept else {**self.labels, "layer": layer}
                kept[layer] = (attrs, norm)
        self.layer_norms = kept
        self._instruments.layer_norm_sources.add(self)

    def _first_bad_series(self, kind: str, layer: str) -> dict[str, str]:
        attrs = self._first_bad_attrs.get((kind, layer))
        if attrs is None:
            attrs = self._first_bad_attrs[(kind, layer)] = {**self._layer(layer), "kind": kind}
        return attrs

    def note_collect(self) -> None:
        """Note a ``collect()`` call, scanned or not: the liveness ``/healthz`` reports."""
        self.context.last_collect = self.context.clock()

    def touch(self, timestamp: float, sequence: int) -> None:
        """Note an update left unscanned outside :meth:`record` (sampled out, or a scan
        that raised): liveness, and a crash after it is not called healthy."""
        self.last_update = timestamp
        self._unscanned_at = max(self._unscanned_at, sequence)

    def record_fingerprint(self, update: int, fingerprint: int) -> None:
        """Record the replica check of ``update``; the check before it moves to the
        ``previous`` slot. Previous is written first: a scrape between the two writes sees
        one check in both slots, never two checks mixed in one."""
        ins = self._instruments
        latest, previous = ({**self.labels, "slot": slot} for slot in m.REPLICA_SLOTS)
        if self._fingerprint is not None:
            ins.fingerprint_update.set(self._fingerprint[0], previous)
            ins.fingerprint.set(self._fingerprint[1], previous)
        ins.fingerprint_update.set(update, latest)
        ins.fingerprint.set(fingerprint, latest)
        self._fingerprint = (update, fingerprint)

    def record_checkpoint(self, *, refused: bool) -> None:
        """Count a refused checkpoint save (an allowed one makes the series, at 0)."""
        self._instruments.refused_checkpoints.add(int(refused), self.labels)

    def record_skip(self, reason: str) -> None:
        """Count one update whose optimizer step is skipped (``reason`` from :data:`SKIP_REASONS`)."""
        self._instruments.skipped.add(1, self._skip_attrs[reason])

    def failed(self, stage: str, exc: Exception) -> None:
        """Count a failure inside gradtel (``stage`` from :data:`ERROR_STAGES`) and log it
        (once a minute per stage at most)."""
        self._instruments.errors.add(1, self._error_attrs[stage])
        self.error_log.log(
            stage, logging.ERROR, "gradtel %s failed, training continues: %r", stage, exc
        )
