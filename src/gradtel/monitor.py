"""``GradMonitor``: the public class, which runs one update through the pipeline: the
watched parameters' gradients, the scan (:mod:`gradtel.pipeline.update`), the read-out
(:mod:`gradtel.pipeline.readout`), telemetry, the weights' health and the policy."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

import torch
from opentelemetry.metrics import MeterProvider

from . import _checks
from ._ratelimit import RateLimitedLog
from .attach.optimizer import Attachment, attach
from .attach.origin import OriginCounter, install_origin_hook
from .export.context import (
    close_when_dropped,
    context_of,
    flush_at_exit,
    free_collectives_at_exit,
)
from .export.device import device_labels
from .export.incidents import IncidentLog
from .export.ranks import every_rank, process_attributes
from .export.telemetry import GradTelemetry, default_meter_provider
from .health import GradHealth, Thresholds
from .options import (
    DEFAULT_REPLICA_CHECK_EVERY,
    MAX_LAYERS_LIMIT,
    LayerSeries,
    MonitorOptions,
    check_collect,
    check_norms,
    check_step,
)
from .pipeline.checkpoints import WeightsHealth
from .pipeline.fingerprint import fingerprint, replica_check
from .pipeline.layers import DEFAULT_MAX_LAYERS
from .pipeline.listeners import Listeners
from .pipeline.once import OncePerUpdate
from .pipeline.parameters import named_parameters, registrations, watch_registrations
from .pipeline.policy import Action, NonFiniteGradientError, Policy
from .pipeline.readout import Pending, Readout
from .pipeline.stage import ScanStage, added
from .pipeline.update import Norms, Update

__all__ = ["MAX_LAYERS_LIMIT", "REFRESH_EVERY", "GradMonitor"]

REFRESH_EVERY = 50
"""Updates between two automatic checks for parameters added to or removed from the model."""

logger = logging.getLogger("gradtel")

T = TypeVar("T")


class GradMonitor:
    """Count NaN and ±Inf gradient values per layer after each backward pass.

    Call :meth:`collect` once per optimizer update, after ``backward()`` and
    before ``optimizer.step()`` (or let :meth:`attach` call it). Every
    parameter of the model is watched, frozen ones too, so that one unfrozen
    later is counted from that update on; a layer added or replaced in an
    ``nn.Module`` is watched from the next update.

    Args:
        model: An ``nn.Module`` (a DDP, DataParallel or ``torch.compile``
            wrapper is fine: labels are the wrapped model's module paths) or an
            iterable of ``(name, Parameter)`` pairs.
        thresholds: Warning and critical bands of the per-update counts.
        on_warning: Action for an update in the warning band: ``"ignore"``,
            ``"warn"`` (one log line; default), ``"raise"``
            (:class:`~gradtel.NonFiniteGradientError`) or ``"skip"`` (clear the
            gradients so the next optimizer step changes nothing).
        on_critical: The same for a critical update.
        max_layers: Distinct ``layer`` labels kept (1..1998); past it the
            layers in the middle of the model are reported as ``"(other)"``,
            never those at either end. Default 1000.
        layer_depth: Truncate layer labels to this many module-path components
            (``None``: full path).
        meter_provider: OpenTelemetry ``MeterProvider`` to record into; default
            gradtel's own, exported on prometheus-client's global registry.
            Two live monitors may not watch the same parameter on one provider.
        layer_series: ``"on_demand"`` (default): a layer's series appear the
            first time it has a NaN or Inf, so a healthy process exports a
            fixed number of series whatever the model's size; ``"all"``: every
            trainable layer's series exist from the start, at 0.
        sample_every: Scan one update in this many (default 1: every update).
            Updates left out are not scanned, recorded or counted anywhere:
            the returned ``GradHealth`` has ``sampled=False`` and status UNKNOWN.
        on_error: ``"warn"`` (default): a failure inside gradtel is logged (at
            most once a minute per stage), counted in ``gradtel_errors_total``,
            and training goes on; ``"raise"``: the failure propagates.
        grad_norm: Also compute the L2 norm of all gradients of each scanned
            update (``GradHealth.grad_norm``, ``gradtel_grad_norm``): per-gradient
            norms replace the scan's first pass, about twice its cost on CPU, so
            off by default. :func:`gradtel.clip_grad_norm_` gives it for free.
        layer_norms: Also compute the L2 norm of each layer's gradients
            (``GradHealth.layer_grad_norms``, ``gradtel_layer_grad_norm{layer}``),
            at about the cost of ``grad_norm``. One series per layer, so in a
            distributed run only rank 0 computes and exports them: under DDP
            every rank holds the same reduced gradients (under FSDP they are
            rank 0's shards).
        readout: ``"sync"`` (default): ``collect()`` reads the update's result
            to the host and returns its health. ``"deferred"``: a healthy
            ``collect()`` makes no blocking device-to-host read; the update is
            published (recorded, logged, returned) when its result is ready:
            by the next ``collect()``, a scrape of the endpoint, :meth:`flush`,
            :meth:`close` or exit. ``collect()`` then returns the latest
            published update's health (its ``step`` says which). The
            ``"raise"`` and ``"skip"`` actions need the answer before
            ``optimizer.step()``, so they are refused with it.
        incident_log: Write one JSON line per unhealthy, AMP-skipped or unscanned
            update to this file (``gradtel incidents`` reads them). Each rank writes
            its own: ``{rank}`` in the path is replaced by the rank; without it, one
            rank of several inserts ``.rank<N>`` before the extension. The file is
            rotated past 10 MiB (one old copy, ``PATH.1``). A failure to write is
            logged and counted like other failures inside gradtel. ``None``
            (default): ``$GRADTEL_INCIDENT_LOG`` if set, else off.
        replica_check_every: In a ``DistributedDataParallel`` run, hash this rank's
            parameters exactly every this many updates (default 250; 0 or None: never)
            and export it as ``gradtel_replica_fingerprint``: replicas hold the same bits,
            and ``GradtelReplicaDrifted`` pages for a rank whose hash differs from the
            others' at the same update (silent data corruption). Off for other models.

    Raises:
        TypeError: ``model`` is not a module or named parameters, or an option
            has the wrong type.
        ValueError: no trainable parameters, an option is out of range, or
            another live monitor watches one of these parameters on the same
            meter provider.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> monitor = GradMonitor(model)
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> health = monitor.collect()
    >>> health.status.value, health.nan_total, health.scanned
    ('healthy', 0, 2)
    >>> monitor.close()
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]],
        *,
        thresholds: Thresholds = Thresholds(),
        on_warning: Action = "warn",
        on_critical: Action = "warn",
        max_layers: int = DEFAULT_MAX_LAYERS,
        layer_depth: int | None = None,
        meter_provider: MeterProvider | None = None,
        layer_series: LayerSeries = "on_demand",
        sample_every: int = 1,
        on_error: Literal["warn", "raise"] = "warn",
        grad_norm: bool = False,
        layer_norms: bool = False,
        readout: Readout = "sync",
        incident_log: str | os.PathLike[str] | None = None,
        replica_check_every: int | None = DEFAULT_REPLICA_CHECK_EVERY,
    ) -> None:
        self._options = MonitorOptions(
            thresholds=thresholds,
            on_warning=on_warning,
            on_critical=on_critical,
            max_layers=max_layers,
            layer_depth=layer_depth,
            layer_series=layer_series,
            sample_every=sample_every,
            on_error=on_error,
            grad_norm=grad_norm,
            layer_norms=layer_norms,
            readout=readout,
            incident_log=incident_log,
            replica_check_every=replica_check_every,
        )
        if meter_provider is not None and not hasattr(meter_provider, "get_meter"):
            raise TypeError(
                "meter_provider must be an OpenTelemetry MeterProvider, "
                f"got {meter_provider!r} ({type(meter_provider).__name__})"
            )
        named = named_parameters(model)
        if not any(p.requires_grad for _, p in named):
            raise ValueError(
                f"model has no trainable parameters (requires_grad=True) to watch: {model!r}"
            )
        provider = default_meter_provider() if meter_provider is None else meter_provider
        self._module = model if isinstance(model, torch.nn.Module) else None
        self._policy = Policy(on_warning, on_critical)
        # One series per layer per rank would not fit the series budget of many ranks.
        self._layer_norms = layer_norms and process_attributes().get("rank", "0") == "0"
        self._step = 0
        self._training_step = 0
        self._lock = threading.RLock()
        self._error_log = RateLimitedLog(logger)
        self._weights = WeightsHealth()
        self.origin = OriginCounter()
        """This rank's own gradients before the cross-rank reduction, fed by a DDP hook."""
        watch_registrations()
        free_collectives_at_exit()
        self._stage = ScanStage(
            named,
            self._options,
            layer_norms=self._layer_norms,
            origin=self.origin,
            failed=self._failed_weakly("scan"),
            error_log=self._error_log,
        )
        self._registrations = registrations()
        """torch's registrations the watched parameters reflect: another one means a refresh."""
        self._attachments: list[Attachment] = []
        """What :meth:`attach` installed: :meth:`close` removes it."""
        self._closed = False
        self.dropped = False
        """Dropped with updates still to publish: being closed (see :meth:`__del__`)."""
        # A dropped monitor takes its backward-order hooks with it, whatever it watches then.
        weakref.finalize(self, self._stage.unwatch)
        self._provider = provider
        context_of(provider).claim(self, provider)
        self._telemetry = GradTelemetry(
            self._trainable_layers(),
            meter_provider=provider,
            attributes=process_attributes(),
            start_time=time.time(),
            error_log=self._error_log,
            weights=self._weights,
            sampled=self._options.sampled,
            device=self._device_labels(),
        )
        self._incidents = IncidentLog.open(
            None if incident_log is None else os.fspath(incident_log),
            on_error=self._failed_weakly("incident_log"),
        )
        # What close() must undo of the origin hooks, so that a new monitor counts again.
        self._uninstall_origin = (
            install_origin_hook(self._module, self) if self._module is not None else None
        )
        self._replica_check = replica_check(self._module, self._options.replica_check)
        """Updates between two replica checks (None: off)."""
        self._pending: Pending[Update] = Pending()
        """Updates whose deferred read-out is not published yet."""
        self._latest: GradHealth | None = None
        """The latest published update's health (``readout="deferred"``)."""
        stage = self._stage  # not the monitor: a dropped monitor is freed at once
        self._once = OncePerUpdate(lambda: stage.watched.first_grad())
        """Which of several collections around an attached step counts the update."""
        self._gradients_scaled = False
        """Set by an attachment for the next ``collect()``: the gradients are still scaled."""
        self._listeners = Listeners(on_error=self._failed_weakly("record"))
        if self.readout == "deferred":
            self._telemetry.context.deferred.add(self)  # a scrape publishes, the exit wait flushes
            flush_at_exit()

    @property
    def options(self) -> MonitorOptions:
        """The options this monitor was made with (read-only)."""
        return self._options

    # The options most read, as attributes of their own (read-only).
    @property
    def thresholds(self) -> Thresholds:
        return self._options.thresholds

    @property
    def layer_series(self) -> LayerSeries:
        return self._options.layer_series

    @property
    def sample_every(self) -> int:
        return self._options.sample_every

    @property
    def grad_norm(self) -> bool:
        return self._options.grad_norm

    @property
    def layer_norms(self) -> bool:
        return self._options.layer_norms

    @property
    def readout(self) -> Readout:
        return self._options.readout

    def close(self) -> None:
        """Stop watching: remove gradtel's gradient hooks and what :meth:`attach` installed,
        and free the parameters for another monitor on the same meter provider. The series
        stay as they are. A :meth:`collect` afterwards scans and records nothing: it
        returns an UNKNOWN update and counts an error (``on_error``)."""
        with self._lock:
            self._publish(wait=True)
            self._closed = True
            self._stage.unwatch()
            for attachment in self._attachments:
                attachment.remove()
            self._attachments = []
            if self._uninstall_origin is not None:
                self._uninstall_origin()
                self._uninstall_origin = None
            self._telemetry.context.release(self, self._provider)
            self._telemetry.closed = time.monotonic()
            if self._incidents is not None:
                self._incidents.close()

    def _forget_pending(self) -> None:
        """In a forked child: drop the updates still to publish, which are the parent's."""
        if not self._lock.acquire(blocking=False):
            # Held by a thread of the parent, which the child has not: never released.
            self._lock = threading.RLock()
        else:
            self._lock.release()
        self._pending.clear()

    def __del__(self) -> None:
        # A dropped monitor must not take what its deferred read-out holds (a last NaN) with
        # it: a gradtel thread closes it, which publishes that (a finalizer may run inside
        # a lock that publishing takes).
        if getattr(self, "_pending", None) and not self._closed:
            self.dropped = True
            close_when_dropped(self)

    def subscribe(self, listener: Callable[[GradHealth], None]) -> Callable[[], None]:
        """Hand ``listener`` the health of every due update once it is known: in
        ``collect()`` with ``readout="sync"``, when the update is published with
        ``"deferred"`` (maybe in the endpoint's scrape thread); sampled-out updates too
        (UNKNOWN). A listener that fails is handled as any failure inside gradtel
        (``on_error``). The framework callbacks feed their loggers this way.

        Args:
            listener: Called with each :class:`~gradtel.GradHealth`, in update order.

        Returns:
            A function that unsubscribes ``listener``.

        Raises:
            TypeError: ``listener`` is not callable.

        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> monitor = GradMonitor(model)
        >>> seen = []
        >>> unsubscribe = monitor.subscribe(seen.append)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> _ = monitor.collect(step=7)
        >>> [h.step for h in seen]
        [7]
        >>> monitor.close()
        """
        return self._listeners.add(listener)

    def refresh(self) -> bool:
        """Pick up parameters added to (or removed from) the model since it was watched.

        Runs by itself in the first update after any module gets a new
        submodule or parameter, and every ``REFRESH_EVERY`` updates, when the
        monitor watches an ``nn.Module``. New layers get their series (at 0)
        and are scanned; the series of layers that are gone stay at their last values.

        Returns:
            Whether the watched parameters changed.
        """
        with self._lock:
            if self._module is None:
                return False
            self._registrations = registrations()
            named = named_parameters(self._module)
            if not named or self._stage.watched.same(named):
                return False
            self._stage.watch(named)
            self._telemetry.add_layers(self._trainable_layers())
            return True

    def _trainable_layers(self) -> list[str]:
        """The layers whose series exist from the start: none on demand; with
        ``layer_series="all"`` those that train now (a frozen base model, as in a
        LoRA fine-tune, does not export hundreds of zero series)."""
        return [] if self.layer_series == "on_demand" else self._stage.watched.trainable_layers()

    @property
    def parameters(self) -> tuple[torch.nn.Parameter, ...]:
        """The watched parameters, in the order ``collect(norms=...)`` takes a tensor of norms."""
        return self._stage.watched.params

    @property
    def layers(self) -> tuple[str, ...]:
        """Every ``layer`` label this monitor reports, in model order."""
        return self._stage.watched.layers

    def collect(
        self,
        *,
        norms: Norms | None = None,
        scaler: torch.amp.GradScaler | None = None,
        loss: torch.Tensor | None = None,
        step: int | None = None,
        total_norm: torch.Tensor | None = None,
    ) -> GradHealth:
        """Scan the current gradients, record them and apply the policy.

        Args:
            norms: Norms of the gradients already computed this update
                (:func:`gradtel.clip_grad_norm_` passes them): a 1-D tensor
                with one norm per watched parameter in the order of
                :attr:`parameters`, or a mapping by parameter. gradtel then
                decides health without reading the gradients again, and counts
                exactly only those whose norm is not finite.
            scaler: The enabled ``torch.amp.GradScaler`` that steps this update,
                when you collect between ``scaler.unscale_(optimizer)`` and
                ``scaler.step(optimizer)``. Non-finite values are then the
                overflow the scaler handles by skipping the step: counted in
                ``gradtel_skipped_updates_total{reason="amp_overflow"}``, not as
                an unhealthy update, and no policy acts on them.
            loss: This update's loss (of the last micro-batch with gradient
                accumulation): gradtel reads whether it was finite with the
                update's own read-out, and says so when the NaN or Inf entered
                in the forward pass (``GradHealth.loss_finite``,
                ``gradtel_nonfinite_loss_updates_total``).
            step: The training step this update makes, as your logs and
                checkpoints number it: ``GradHealth.step``, the log line, the
                ``gradtel_last_unhealthy_step`` gauge and the page say it.
                Default: the optimizer's step count when attached, else the
                monitor's own count of updates (from 1).
            total_norm: The L2 norm of all gradients of this update, when you
                computed it (:func:`gradtel.clip_grad_norm_` passes it): read
                with the update's own read-out into ``GradHealth.grad_norm`` and
                ``gradtel_grad_norm``, without another pass.

        Returns:
            The update's :class:`~gradtel.GradHealth`; its status is UNKNOWN
            when nothing could be scanned.

        Raises:
            NonFiniteGradientError: the update is unhealthy and its policy is ``"raise"``.
            TypeError, ValueError: ``norms``, ``scaler`` or ``step`` is not as described.
        """
        overflow_possible = check_collect(step, scaler, loss, total_norm)
        with self._lock, torch.no_grad():
            scaled, self._gradients_scaled = self._gradients_scaled, False
            if self._closed:  # its parameters may be another monitor's: never count them twice
                return self._closed_collect(step)
            repeated = self._once.repeated()  # beside attach(): collected already
            if repeated is not None:
                return repeated
            was = self._once.counting()
            try:
                health = self._collect(
                    norms, scaler, loss, step, total_norm, overflow_possible, scaled
                )
            except NonFiniteGradientError as exc:  # "raise": a repeat raises no more
                self._once.counted(exc.health)
                raise
            except BaseException:  # nothing was collected: the next call counts the update
                self._once.failed(was)
                raise
            self._once.counted(health)
            return health

    def _collect(
        self,
        norms: Norms | None,
        scaler: torch.amp.GradScaler | None,
        loss: torch.Tensor | None,
        step: int | None,
        total_norm: torch.Tensor | None,
        overflow_possible: bool,
        scaled: bool,
    ) -> GradHealth:
        """:meth:`collect`, under its lock."""
        started = time.perf_counter()
        looked, looked_origin = self._stage.take_look(loss)
        self._telemetry.note_collect()
        self._step += 1
        self._training_step = self._step if step is None else step
        check_norms(norms, len(self.parameters))  # the parameters they were computed for
        if self._module is not None and (
            self._registrations != registrations() or self._step % REFRESH_EVERY == 0
        ):
            refreshed = self._guarded("scan", self.refresh)
            if refreshed and isinstance(norms, torch.Tensor):
                norms = None  # one per parameter watched before: the scan reads them anew
        # Before the sampling: every replica checks the same updates, whatever it scans.
        if self._replica_check and (self._step - 1) % self._replica_check == 0:
            self._guarded("scan", self._check_replica)
        if (self._step - 1) % self.sample_every:
            return self._sampled_out()
        if looked is None or norms is not None:  # clipping's norms give the gradient norm too
            update = self._stage.launch(
                self._training_step,
                self._step,
                norms=norms,
                loss=loss,
                total_norm=total_norm,
                origin=added(looked_origin, self.origin.take()),
                scale=_scale_of(scaler) if overflow_possible else None,
                scaled=scaled,
            )
        else:  # attach() looked at the gradients as backward left them
            update = looked  # with this rank's counts before the reduction, taken then
            update.restep(self._training_step, self._step)
            self.origin.take()  # the update ends: the next one's buckets are its own
        update.overflow_possible = overflow_possible
        if self.readout == "deferred":
            return self._defer(update, started)
        health = self._stage.read_out(update)
        update.duration = time.perf_counter() - started - update.waited
        update.timestamp = time.time()
        return self._conclude(update, health)

    def _closed_collect(self, step: int | None) -> GradHealth:
        exc = RuntimeError(
            "collect() on a closed GradMonitor scans and records nothing; "
            "make a new GradMonitor to go on watching"
        )
        if self._options.on_error == "raise":
            raise exc  # unlike a failed scan, with no mark on the series: they are another's now
        self._telemetry.failed("scan", exc)
        step = self._training_step if step is None else step
        return GradHealth(thresholds=self.thresholds, step=step, unscanned="scan_error")

    def _defer(self, update: Update, started: float) -> GradHealth:
        """Queue ``update`` for its read-out; the latest published update's health."""
        self._publish(wait=False)  # the updates before this one, in order, if ready
        if update.pending:
            if update.launched is not None and update.launched.exact is None:
                self._stage.read_out(update)  # done when queued: read it now, for free
            else:
                update.start_readout()
        update.duration, update.timestamp = time.perf_counter() - started, time.time()
        self._pending.append(update)
        return self._latest or GradHealth(
            thresholds=self.thresholds, step=self._training_step, pending=True
        )

    def _check_replica(self) -> None:
        """Hash the parameters, which the previous optimizer step left the same on every
        replica (a host read, one update in ``replica_check_every``)."""
        self._telemetry.record_fingerprint(self._step, fingerprint(self.parameters))

    def _sampled_out(self) -> GradHealth:
        """An update ``sample_every`` leaves out: nothing is looked at, and it says so."""
        self.origin.take()  # this rank's counts belong to the update left out, not the next
        if self.readout == "deferred":
            self._publish(wait=False)
        update = Update.sampled_out(self._training_step, self.thresholds, self._step)
        self._guarded("record", lambda: self._telemetry.touch(time.time(), update.sequence))
        assert update.health is not None
        self._listeners.tell(update.health)
        return update.health

    def _conclude(self, update: Update, health: GradHealth) -> GradHealth:
        """Record an update whose counts are known, and act on it."""
        scaler_skips = update.overflow_possible and bool(health.nan_total + health.inf_total)
        # A loss that was already non-finite is no overflow the scaler handles: it only hides it.
        if scaler_skips and health.loss_finite is not False:
            health = dataclasses.replace(health, amp_overflow=True)
            logger.debug("%s", health.describe())
        # Record before acting: a "raise" policy must not hide the update from Prometheus.
        self._guarded(
            "record",
            lambda: self._telemetry.record(
                health,
                duration=update.duration,
                timestamp=update.timestamp,
                sequence=update.sequence,
            ),
        )
        self._listeners.tell(health)
        action = None if health.amp_overflow else self._policy.action(health)
        if self._incidents is not None:
            self._incidents.write(health, action, update.timestamp, update.sequence)
        if health.unscanned is not None:
            return health
        self._weights.note(health, "skip" if scaler_skips else action)  # what reaches the weights
        if health.amp_overflow:
            return health
        if action == "skip":
            self._guarded("record", lambda: self._telemetry.record_skip("policy"))
        self._policy.apply(health, self.parameters)
        return health

    def flush(self, wait: bool = True) -> None:
        """Publish the updates whose deferred read-out is pending (``readout="deferred"``):
        record them, log them, and make the latest the one ``collect()`` returns.

        Args:
            wait: Wait for every pending read-out (default); ``False`` publishes
                only those already finished, as a scrape of the endpoint does.
        """
        with self._lock:
            self._publish(wait)

    @torch.no_grad()
    def _publish(self, wait: bool) -> None:
        for update in self._pending.take(wait):
            self._latest = self._conclude(update, self._stage.read_out(update))

    @property
    def healthy(self) -> bool:
        """Whether the weights are free of NaN and Inf, so a checkpoint saved now is not
        poisoned: True until an update with any NaN or Inf (under the warning threshold
        too) reaches the weights (one the optimizer takes; not one the AMP ``GradScaler``
        or the ``"skip"`` policy skips, nor one ``"raise"`` stops), or
        :meth:`allow_checkpoint` finds NaN or Inf in the weights themselves; True again
        after :meth:`reset_health`. With ``readout="deferred"`` it waits for the pending
        updates' read-outs first."""
        self.flush()
        return self._weights.healthy

    @property
    def last_healthy_step(self) -> int | None:
        """The step of the latest scanned update after which the weights were still
        healthy: resume from a checkpoint saved at or before it. None before the first."""
        self.flush()
        return self._weights.last_healthy_step

    def allow_checkpoint(self, step: int | None = None, *, all_ranks: bool = False) -> bool:
        """Whether to save a checkpoint now: ``False`` while not :attr:`healthy`, with a
        log line (at most once a minute) and a count in ``gradtel_refused_checkpoints_total``.
        It counts NaN and Inf in the watched weights too (one pass over them, far less than
        saving them): an update that was not scanned (sampled out) may have brought them.

        Args:
            step: The training step the checkpoint is of, for the log line.
            all_ranks: Refuse unless every rank is healthy (a collective: call it
                on every rank, as sharded checkpoints are saved). Needed when the
                ranks' gradients differ (FSDP shards); under DDP every rank holds
                the same reduced gradients and decides alike.

        Raises:
            TypeError: ``step`` or ``all_ranks`` is of the wrong type.

        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> monitor = GradMonitor(model, on_warning="ignore")
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> model.weight.grad[0, 0] = float("nan")
        >>> _ = monitor.collect()
        >>> monitor.healthy, monitor.last_healthy_step, monitor.allow_checkpoint(step=1)
        (False, None, False)
        >>> monitor.close()
        """
        check_step(step)
        _checks.flag("all_ranks", all_ranks)
        self.flush()  # a deferred read-out must not let a poisoned update through
        self._guarded("scan", lambda: self._weights.look_at(self.parameters))
        return self._weights.allow(
            step,
            all_ranks=all_ranks,
            agree=lambda allowed: self._guarded("record", lambda: every_rank(allowed)),
            record=lambda refused: self._guarded(
                "record", lambda: self._telemetry.record_checkpoint(refused=refused)
            ),
        )

    def reset_health(self) -> None:
        """Call after restoring the weights from a healthy checkpoint in this process:
        :attr:`healthy` is True again, and the next unhealthy update is a new incident (its
        own first bad layer and step on ``gradtel_first_bad_layer``; the older incidents'
        series are set to 0)."""
        self.flush()  # a pending unhealthy update belongs to the weights rolled back
        self._weights.reset()
        self._guarded("record", self._telemetry.forget_incidents)

    def attach(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        scaler: torch.amp.GradScaler | None = None,
        scan: Literal["step", "backward"] = "step",
        step: Callable[[], int] | None = None,
        loss: Callable[[], torch.Tensor | None] | None = None,
    ) -> Attachment:
        """Collect by itself, with no ``collect()`` in the training loop.

        Args:
            optimizer: The optimizer whose updates are scanned.
            scaler: The ``torch.amp.GradScaler`` in use, if any: gradtel then
                collects right after the scaler unscales the gradients (or,
                for fused optimizers that unscale inside their step, just
                before the step), and an update the scaler skips for overflow
                is counted in ``gradtel_skipped_updates_total{reason="amp_overflow"}``,
                not as unhealthy.
            scan: ``"step"`` (default): once per optimizer update, i.e. after
                the last micro-batch of gradient accumulation. ``"backward"``:
                after every backward pass, counting the gradients accumulated so far
                (still scaled, with ``scaler``: an overflow is a skipped update).
            step: Returns the training step each update makes, as your logs and
                checkpoints number it (``step=lambda: iter_num``); called once
                per collected update. Default: the optimizer's own step count.
            loss: Returns this update's loss tensor (``loss=lambda: loss``), read
                with the update's own read-out as in :meth:`collect`.

        Returns:
            An :class:`~gradtel.attach.optimizer.Attachment`; ``remove()`` undoes it.

        Raises:
            TypeError: ``optimizer`` or ``scaler`` is of the wrong type, or
                ``step`` or ``loss`` is not callable.
            ValueError: unknown ``scan``, or this monitor is already attached
                to ``optimizer``; with ``scan="backward"`` to any optimizer, or
                already attached with it.
            RuntimeError: this monitor is closed.
        """
        if self._closed:
            raise RuntimeError("this GradMonitor is closed: make a new one to attach")
        attachment = attach(self, optimizer, scaler=scaler, scan=scan, step=step, loss=loss)
        self._attachments = [a for a in self._attachments if a.installed] + [attachment]
        return attachment

    def _collect_at_step(self, by: int, collect: Callable[[], T]) -> T | None:
        """``collect`` for optimizer ``by``'s step, as ``attach()`` or a callback drives it:
        nothing when the user or another optimizer collected since the latest pass."""
        if not self._once.due_at_step(by):
            return None
        try:
            return collect()
        finally:
            self._once.made_by(by)

    def _unwatch_passes(self) -> None:
        """The last attachment that watched the backward passes is gone: drop its look of
        the latest pass, and collections count each as they come."""
        with self._lock:
            self._stage.take_look(None)
            self._once.unwatch()

    def _look(self, loss: torch.Tensor | None = None) -> None:
        """Scan the gradients as backward left them, for the next :meth:`collect` to publish:
        ``attach()`` calls it at the end of every backward pass, so that code running
        between backward and ``optimizer.step()`` (clipping) cannot change what is counted.
        With gradient accumulation each backward pass looks again; the last look counts."""
        with self._lock, torch.no_grad():
            if self._step % self.sample_every:  # the coming update is left out: no need to look
                return
            self._stage.look(self._training_step, self._step, loss)

    def _device_labels(self) -> dict[str, str] | None:
        """The labels of ``gradtel_device_info``: of the device the model's parameters live on."""
        if not self.parameters:
            return None
        try:
            return device_labels(self.parameters[0].device)
        except Exception as exc:  # pages then name the rank without its host: no reason to stop
            self._error_log.log(
                "device",
                logging.WARNING,
                "gradtel: cannot tell which host and device this process trains on: %s: %s",
                type(exc).__name__,
                exc,
            )
            return None

    def _guarded(self, stage: str, work: Callable[[], T]) -> T | None:
        try:
            return work()
        except Exception as exc:
            self._failed(stage, exc)
            return None

    def _failed_weakly(self, stage: str) -> Callable[[Exception], None]:
        """:meth:`_failed` for ``stage``, for a part this monitor owns to keep: it holds the
        monitor weakly, so that a dropped monitor is freed at once, its parameters with it."""
        failed = weakref.WeakMethod(self._failed)

        def report(exc: Exception) -> None:
            method = failed()
            if method is not None:
                method(stage, exc)

        return report

    def _failed(self, stage: str, exc: Exception) -> None:
        if self._options.on_error == "raise":
            if stage == "scan":  # the update was not looked at: a crash now is not "healthy"
                self._telemetry.touch(time.time(), self._step)
            raise exc
        self._telemetry.failed(stage, exc)


def _scale_of(scaler: torch.amp.GradScaler | None) -> torch.Tensor | None:
    """An enabled scaler's current loss scale, as the tensor it keeps (``get_scale()`` would
    read it to the host: it is read with the update's own read-out instead)."""
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None
