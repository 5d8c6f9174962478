"""The metric contract: every metric gradtel exports, as Prometheus scrapes it.

This table is the one place that names them. The instruments (``telemetry``),
the deploy kit (rules, rule tests, dashboard, runbook), ``gradtel watch`` and the
tests all read it, and a test pins it against a real scrape.

Besides the labels listed per metric, every series carries the process labels:
``rank`` in a distributed run (world size > 1) and ``run`` when the launcher
names the run (``$GRADTEL_RUN``, or torchrun's ``$TORCHELASTIC_RUN_ID``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "AMP_LOSS_SCALE",
    "DEVICE_INFO",
    "DEVICE_LABELS",
    "ERRORS",
    "ERROR_STAGES",
    "FIRST_BAD_LAYER",
    "GRADS_TOTAL",
    "GRAD_NORM",
    "GRAD_NORM_PEAK",
    "INF_GRADS",
    "KINDS",
    "LAST_UNHEALTHY_STEP",
    "LAST_UPDATE_TIMESTAMP",
    "LAYER_GRAD_NORM",
    "LOCAL_GRAD_NORM",
    "METRICS",
    "NAN_GRADS",
    "NONFINITE_LOSS_INCIDENT_STEP",
    "NONFINITE_LOSS_UPDATES",
    "NORM_PEAK_SECONDS",
    "ORIGIN_UPDATES",
    "PROCESS_LABELS",
    "REFUSED_CHECKPOINTS",
    "REPLICA_FINGERPRINT",
    "REPLICA_FINGERPRINT_UPDATE",
    "REPLICA_SLOTS",
    "SCAN_DURATION",
    "SEVERITIES",
    "SKIPPED_UPDATES",
    "SKIP_REASONS",
    "START_TIME",
    "TRAINING_EXCEPTIONS",
    "UNHEALTHY_UPDATES",
    "UNSCANNED_REASONS",
    "UNSCANNED_UPDATES",
    "UPDATES",
    "UPDATE_GRADS",
    "UPDATE_INF_GRADS",
    "UPDATE_NAN_GRADS",
    "UPDATE_STATUS",
    "Metric",
]

PROCESS_LABELS = ("rank", "run")
"""Labels of the process, on every series when they apply."""
KINDS = ("nan", "inf")
"""Values of ``kind``."""
SEVERITIES = ("warning", "critical")
"""Values of ``severity``."""
ERROR_STAGES = ("scan", "record", "serve", "incident_log")
"""Values of ``stage`` in ``gradtel_errors_total``."""
SKIP_REASONS = ("amp_overflow", "policy")
"""Values of ``reason`` in ``gradtel_skipped_updates_total``."""
UNSCANNED_REASONS = ("no_gradients", "scan_error")
"""Values of ``reason`` in ``gradtel_unscanned_updates_total``."""
REPLICA_SLOTS = ("latest", "previous")
"""Values of ``slot`` in the replica fingerprint: the latest check and the one before it, so
that ranks scraped on either side of a check still have one check in common."""
DEVICE_LABELS = ("host", "device", "gpu_uuid", "pci_bus_id")
"""Labels of ``gradtel_device_info``: named as dcgm-exporter's ``Hostname``, ``UUID`` and
``pci_bus_id`` hold them, for joins with its metrics."""


@dataclass(frozen=True)
class Metric:
    """One metric as Prometheus scrapes it. ``str(metric)`` is its name, for PromQL."""

    name: str
    type: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    """Its own labels, besides :data:`PROCESS_LABELS`."""
    unit: Literal["1", "s"] = "1"

    def __str__(self) -> str:
        return self.name

    @property
    def instrument(self) -> str:
        """The OpenTelemetry instrument name that the Prometheus exporter turns into
        :attr:`name`: it adds ``_seconds`` for the unit ``s`` and ``_total`` to a counter."""
        name = self.name.removesuffix("_total") if self.type == "counter" else self.name
        return name.removesuffix("_seconds") if self.unit == "s" else name


NAN_GRADS = Metric(
    "gradtel_nan_grads_total", "counter", "NaN gradient values seen since start.", ("layer",)
)
INF_GRADS = Metric(
    "gradtel_inf_grads_total", "counter", "±Inf gradient values seen since start.", ("layer",)
)
UPDATE_NAN_GRADS = Metric(
    "gradtel_update_nan_grads",
    "gauge",
    "NaN gradient values in the most recent scanned update (TELE-300).",
    ("layer",),
)
UPDATE_INF_GRADS = Metric(
    "gradtel_update_inf_grads",
    "gauge",
    "±Inf gradient values in the most recent scanned update (TELE-301).",
    ("layer",),
)
UPDATES = Metric("gradtel_updates_total", "counter", "Updates scanned.")
UNHEALTHY_UPDATES = Metric(
    "gradtel_unhealthy_updates_total",
    "counter",
    "Updates whose whole-model NaN or Inf count fell in the warning or critical band.",
    ("kind", "severity"),
)
UPDATE_STATUS = Metric(
    "gradtel_update_status",
    "gauge",
    "Health of the most recent due update: -1 unknown (not scanned, or none yet), "
    "0 healthy, 1 warning, 2 critical; an AMP overflow the scaler skips leaves it.",
)
LAST_UPDATE_TIMESTAMP = Metric(
    "gradtel_last_update_timestamp_seconds",
    "gauge",
    "Unix time of the most recent update (collect() call), scanned or not.",
    unit="s",
)
START_TIME = Metric(
    "gradtel_start_time_seconds",
    "gauge",
    "Unix time this process started recording gradient health (its first GradMonitor): "
    "the rules tell a new process's first scrape from an old one's after a gap.",
    unit="s",
)
UNSCANNED_UPDATES = Metric(
    "gradtel_unscanned_updates_total",
    "counter",
    "Due updates in which nothing could be scanned: no_gradients (no watched parameter had "
    "a gradient) or scan_error. Not in gradtel_updates_total.",
    ("reason",),
)
SCAN_DURATION = Metric(
    "gradtel_scan_duration_seconds",
    "histogram",
    "Time gradtel spent scanning one update.",
    unit="s",
)
FIRST_BAD_LAYER = Metric(
    "gradtel_first_bad_layer",
    "gauge",
    "Step of the latest update that started a run of updates with values of that kind, "
    "in which this layer was the first in backward order; series appear when it first happens.",
    ("kind", "layer"),
)
LAST_UNHEALTHY_STEP = Metric(
    "gradtel_last_unhealthy_step",
    "gauge",
    "Training step of the latest unhealthy update with values of that kind (collect(step=...), "
    "the optimizer's or the framework's step, else gradtel's count of updates); series appear "
    "with the first one.",
    ("kind",),
)
GRAD_NORM = Metric(
    "gradtel_grad_norm",
    "gauge",
    "L2 norm of all gradients of the latest scanned update whose norm was finite, when "
    "computed: with GradMonitor(grad_norm=True), or from gradtel.clip_grad_norm_ with norm_type=2.",
)
LAYER_GRAD_NORM = Metric(
    "gradtel_layer_grad_norm",
    "gauge",
    "L2 norm of the layer's gradients in the latest scanned update whose norm was finite, "
    "with GradMonitor(layer_norms=True); exported by rank 0 alone in a distributed run.",
    ("layer",),
)
NORM_PEAK_SECONDS = 120
"""How far back ``gradtel_grad_norm_peak`` looks: longer than any usual scrape interval
(Prometheus' default is 1 minute), like Micrometer's decaying ``_max``."""
GRAD_NORM_PEAK = Metric(
    "gradtel_grad_norm_peak",
    "gauge",
    f"Largest gradtel_grad_norm of the scanned updates in the last {NORM_PEAK_SECONDS} s, so "
    "that a spike at one step between two scrapes is still scraped (GradtelGradNormSpike).",
)
AMP_LOSS_SCALE = Metric(
    "gradtel_amp_loss_scale",
    "gauge",
    "Loss scale of the AMP GradScaler at the latest scanned update that had one (collect(scaler=...), "
    "attach(scaler=...), the framework callbacks): a scale that keeps falling means overflows on "
    "every step, and training has stopped learning.",
)
LOCAL_GRAD_NORM = Metric(
    "gradtel_local_grad_norm",
    "gauge",
    "Distributed runs (DDP, FSDP): L2 norm of this rank's own gradients before the cross-rank "
    "reduction, in the latest update whose local norm was finite (with accumulation: of what "
    "it reduced, under no_sync(); of its first micro-batch, reducing each; AMP: divided by the loss scale, when the update reads it). The ranks of a run see different "
    "data but the same model: one far from the others' median points at its GPU "
    "(GradtelRankDisagrees).",
)
DEVICE_INFO = Metric(
    "gradtel_device_info",
    "gauge",
    "Always 1: the host and the device this process trains on (the device of the model's "
    "parameters). gpu_uuid (GPU-...) and pci_bus_id (00000000:3B:00.0) as dcgm-exporter's "
    "UUID and pci_bus_id labels hold them; empty on a CPU.",
    DEVICE_LABELS,
)
SKIPPED_UPDATES = Metric(
    "gradtel_skipped_updates_total",
    "counter",
    "Updates whose optimizer step was skipped: amp_overflow (GradScaler found non-finite "
    "gradients) or policy (gradtel's on_warning/on_critical skip).",
    ("reason",),
)
ORIGIN_UPDATES = Metric(
    "gradtel_origin_updates_total",
    "counter",
    "Distributed runs (DDP, FSDP): updates in which this rank's own gradients, before the "
    "cross-rank reduction, held NaN (kind=nan) or ±Inf (kind=inf): the rank where it started. "
    "Stays 0 in a single process.",
    ("kind",),
)
NONFINITE_LOSS_UPDATES = Metric(
    "gradtel_nonfinite_loss_updates_total",
    "counter",
    "Updates whose loss, given to collect(loss=...), was already NaN or ±Inf: the values "
    "entered in the forward pass.",
)
NONFINITE_LOSS_INCIDENT_STEP = Metric(
    "gradtel_nonfinite_loss_incident_step",
    "gauge",
    "Step of the newest incident (a run of updates with NaN or ±Inf gradients, of either kind, "
    "after a healthy scanned update) whose first update already had a NaN or ±Inf loss, for "
    "each kind it had: the values entered in the forward pass. Compare with "
    "gradtel_first_bad_layer's step. No series until one; 0 after reset_health(). Never set "
    "with sample_every above 1, nor after an unscanned update: updates not looked at could "
    "have poisoned the weights.",
    ("kind",),
)
REFUSED_CHECKPOINTS = Metric(
    "gradtel_refused_checkpoints_total",
    "counter",
    "Checkpoint saves refused because the weights took an unhealthy update "
    "(monitor.allow_checkpoint(), the callbacks' protect_checkpoints=True); the series "
    "appears, at 0, with the first guarded save.",
)
TRAINING_EXCEPTIONS = Metric(
    "gradtel_training_exceptions_total",
    "counter",
    "Uncaught exceptions that ended the training process while gradtel served its metrics, "
    "by exception type, and by whether NaN or Inf gradients came before it, as the open "
    "monitors (with none open, the one closed last) saw it: gradients=unhealthy when the weights had taken an unhealthy update "
    "(GradMonitor.healthy is False) or the latest scanned update was unhealthy (a warn, skip "
    "or raise policy) with no reset_health() since; healthy otherwise (AMP overflows the "
    "GradScaler skipped are not unhealthy); unknown before the first scanned update. The "
    "series appears with the first one (the endpoint then waits for a last scrape).",
    ("type", "gradients"),
)
REPLICA_FINGERPRINT = Metric(
    "gradtel_replica_fingerprint",
    "gauge",
    "DDP runs: a 52-bit exact hash of this rank's parameters at the replica check of "
    "gradtel_replica_fingerprint_update (slot=latest, and the check before it, slot=previous). "
    "Replicas hold the same bits: a rank whose value differs from the others' at the same "
    "update has drifted (GradtelReplicaDrifted). Series appear with the first check.",
    ("slot",),
)
REPLICA_FINGERPRINT_UPDATE = Metric(
    "gradtel_replica_fingerprint_update",
    "gauge",
    "DDP runs: the update (gradtel's count of collect() calls in this process, the same on "
    "every replica) whose parameters gradtel_replica_fingerprint of the same slot hashes.",
    ("slot",),
)
ERRORS = Metric(
    "gradtel_errors_total",
    "counter",
    "Failures inside gradtel, by stage; training went on.",
    ("stage",),
)

GRADS_TOTAL = {"nan": NAN_GRADS, "inf": INF_GRADS}
"""The per-layer counters, by ``kind``."""
UPDATE_GRADS = {"nan": UPDATE_NAN_GRADS, "inf": UPDATE_INF_GRADS}
"""The per-layer gauges of the latest update, by ``kind``."""

METRICS = (
    NAN_GRADS,
    UPDATE_NAN_GRADS,
    INF_GRADS,
    UPDATE_INF_GRADS,
    UNHEALTHY_UPDATES,
    ERRORS,
    SKIPPED_UPDATES,
    AMP_LOSS_SCALE,
    UNSCANNED_UPDATES,
    UPDATES,
    UPDATE_STATUS,
    LAST_UPDATE_TIMESTAMP,
    START_TIME,
    SCAN_DURATION,
    FIRST_BAD_LAYER,
    LAST_UNHEALTHY_STEP,
    ORIGIN_UPDATES,
    NONFINITE_LOSS_UPDATES,
    NONFINITE_LOSS_INCIDENT_STEP,
    GRAD_NORM,
    GRAD_NORM_PEAK,
    LAYER_GRAD_NORM,
    LOCAL_GRAD_NORM,
    DEVICE_INFO,
    REFUSED_CHECKPOINTS,
    TRAINING_EXCEPTIONS,
    REPLICA_FINGERPRINT,
    REPLICA_FINGERPRINT_UPDATE,
)
"""Every metric gradtel exports."""
