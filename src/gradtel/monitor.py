"""``GradMonitor``: ties naming, scan, health, telemetry and policy together."""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from opentelemetry.metrics import MeterProvider
from torch.distributed.tensor import DTensor

from . import _checks
from ._ratelimit import RateLimitedLog
from .checkpoints import WeightsHealth
from .health import GradHealth, Thresholds
from .hooks import Attachment, attach
from .layers import DEFAULT_MAX_LAYERS, assign_layers, distinct
from .order import BackwardOrder
from .origin import OriginCounter, install_origin_hook
from .policy import Action, Policy
from .ranks import every_rank, process_attributes
from .readout import HostCopy, Readout, check_readout, completes_when_queued
from .scan import Launched, Scanner, countable_values, per_tensor_norms, stacked
from .scan import total_norm as total_norm_of
from .telemetry import GradTelemetry, default_meter_provider
from .watched import named_parameters, registrations, watch_registrations

__all__ = ["MAX_LAYERS_LIMIT", "REFRESH_EVERY", "GradMonitor"]

MAX_LAYERS_LIMIT = 1998
"""Upper bound of ``max_layers``: each metric keeps one series per layer plus
the overflow layer below the OpenTelemetry SDK's per-metric limit of 2000,
past which the SDK would silently relabel series."""

REFRESH_EVERY = 50
"""Updates between two automatic checks for parameters added to or removed from the model."""

logger = logging.getLogger("gradtel")

T = TypeVar("T")

_PLAIN_DTYPES = {
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128
}  # fmt: skip


# Monitors by the meter provider they record into: two live monitors watching the
# same parameter there would export every count twice.
_claims: weakref.WeakKeyDictionary[MeterProvider, weakref.WeakSet[GradMonitor]] = (
    weakref.WeakKeyDictionary()
)
_claims_lock = threading.Lock()


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
        layer_series: Literal["on_demand", "all"] = "on_demand",
        sample_every: int = 1,
        on_error: Literal["warn", "raise"] = "warn",
        grad_norm: bool = False,
        layer_norms: bool = False,
        readout: Readout = "sync",
    ) -> None:
        if not isinstance(thresholds, Thresholds):
            raise TypeError(
                f"thresholds must be a gradtel.Thresholds, got {thresholds!r} "
                f"({type(thresholds).__name__})"
            )
        self._policy = Policy(on_warning, on_critical)
        self.readout = check_readout(readout, on_warning, on_critical)
        _checks.on_error(on_error)
        if isinstance(max_layers, int) and not isinstance(max_layers, bool):
            if max_layers > MAX_LAYERS_LIMIT:
                raise ValueError(
                    f"max_layers must be from 1 to {MAX_LAYERS_LIMIT}, got {max_layers}; "
                    "use layer_depth= to group layers instead"
                )
        if layer_series not in ("on_demand", "all"):
            raise ValueError(f"layer_series must be 'on_demand' or 'all', got {layer_series!r}")
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
            raise ValueError(f"sample_every must be an int >= 1, got {sample_every!r}")
        for name, flag in (("grad_norm", grad_norm), ("layer_norms", layer_norms)):
            if not isinstance(flag, bool):
                raise TypeError(
                    f"{name} must be True or False, got {flag!r} ({type(flag).__name__})"
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
        self._naming = {"max_layers": max_layers, "depth": layer_depth}
        self.thresholds = thresholds
        self.layer_series = layer_series
        self.sample_every = sample_every
        self.grad_norm = grad_norm
        self.layer_norms = layer_norms
        # One series per layer per rank would not fit the series budget of many ranks.
        self._layer_norms = layer_norms and process_attributes().get("rank", "0") == "0"
        self._on_error = on_error
        self._step = 0
        self._training_step = 0
        self._lock = threading.RLock()
        self._error_log = RateLimitedLog(logger)
        self._order: BackwardOrder | None = None
        self._order_finalizer: weakref.finalize[Any, Any] | None = None
        self._weights = WeightsHealth()
        self.origin = OriginCounter()
        """This rank's own gradients before the cross-rank reduction, fed by a DDP hook."""
        watch_registrations()
        _free_collectives_at_exit()
        self._watch(named)
        self._claim(provider)
        self._telemetry = GradTelemetry(
            self._trainable_layers(),
            meter_provider=provider,
            attributes=process_attributes(),
            start_time=time.time(),
            error_log=self._error_log,
            weights=self._weights,
        )
        self._telemetry.sampled = sample_every > 1
        # What close() must undo of the origin hooks, so that a new monitor counts again.
        self._uninstall_origin = (
            install_origin_hook(self._module, self) if self._module is not None else None
        )
        self._pending: deque[tuple[_Update | GradHealth, bool, float, float]] = deque()
        """Updates whose deferred read-out is not published yet: the update, whether an
        AMP overflow is possible, collect()'s own time, and its Unix time."""
        self._latest: GradHealth | None = None
        self._looked: _Update | GradHealth | None = None
        """What :meth:`_look` saw at the end of the latest backward pass, not collected yet."""
        self._looked_origin: torch.Tensor | None = None
        self._looked_grads: tuple[torch.Tensor | None, ...] = ()
        if self.readout == "deferred":
            self._telemetry.activity.deferred.add(self)  # a scrape publishes, the exit wait flushes
            _flush_at_exit_too(self)

    def _claim(self, provider: MeterProvider) -> None:
        mine = {id(p) for p in self._params}
        with _claims_lock:
            others = _claims.setdefault(provider, weakref.WeakSet())
            for other in others:
                shared = [p for p in other._params if id(p) in mine]
                if shared:
                    raise ValueError(
                        f"another GradMonitor already watches {len(shared)} of these parameters "
                        "and records into the same meter_provider, so every count would be "
                        "exported twice; close() the other monitor first, or give this one its "
                        "own meter_provider (gradtel.prometheus_meter_provider(registry))"
                    )
            others.add(self)
        self._provider = provider

    def close(self) -> None:
        """Stop watching: remove gradtel's gradient hooks and free the parameters for
        another monitor on the same meter provider. The series stay as they are."""
        with self._lock:
            self._publish(wait=True)
            if self._order is not None:
                self._order.remove()
            if self._uninstall_origin is not None:
                self._uninstall_origin()
                self._uninstall_origin = None
            with _claims_lock:
                _claims.get(self._provider, weakref.WeakSet()).discard(self)
            self._telemetry.closed = time.monotonic()

    def _watch(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        """Take ``named`` as the watched parameters (at creation and at each refresh)."""
        labels = assign_layers((n for n, _ in named), **self._naming)  # type: ignore[arg-type]
        self._params = [p for _, p in named]
        self._watched = tuple(self._params)
        self._labels = labels
        self._layer_names = tuple(distinct(labels))
        self._scanner = Scanner()
        self._registrations = registrations()
        if self._order is not None:
            self._order.remove()
        if self._order_finalizer is not None:
            self._order_finalizer.detach()
        self._order = BackwardOrder(self._params)
        # A dropped monitor takes its hooks with it (one finalizer, the current order's).
        self._order_finalizer = weakref.finalize(self, self._order.remove)
        # Gradients of these dtypes are counted as they are when strided.
        self._plain = [
            p.dtype in _PLAIN_DTYPES and not isinstance(p, DTensor) for p in self._params
        ]
        self._all_plain = all(self._plain)
        self._everyone = tuple(range(len(self._params)))
        self._layer_sums: tuple[tuple[int, ...], torch.Tensor, tuple[str, ...]] | None = None

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
            same = len(named) == len(self._params) and all(
                mine is theirs for (_, mine), theirs in zip(named, self._params)
            )  # identity: == on tensors compares elements
            if not named or same:
                return False
            self._watch(named)
            self._telemetry.add_layers(self._trainable_layers())
            return True

    def _trainable_layers(self) -> list[str]:
        """The layers whose series exist from the start: none on demand; with
        ``layer_series="all"`` those that train now (a frozen base model, as in a
        LoRA fine-tune, does not export hundreds of zero series)."""
        if self.layer_series == "on_demand":
            return []
        return distinct([label for label, p in zip(self._labels, self._params) if p.requires_grad])

    @property
    def parameters(self) -> tuple[torch.nn.Parameter, ...]:
        """The watched parameters, in the order ``collect(norms=...)`` takes a tensor of norms."""
        return self._watched

    @property
    def layers(self) -> tuple[str, ...]:
        """Every ``layer`` label this monitor reports, in model order."""
        return self._layer_names

    def collect(
        self,
        *,
        norms: torch.Tensor | Mapping[torch.Tensor, torch.Tensor] | None = None,
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
        if total_norm is not None and not (
            isinstance(total_norm, torch.Tensor) and total_norm.numel() == 1
        ):
            raise TypeError(f"total_norm must be a one-element tensor or None, got {total_norm!r}")
        _check_step(step)
        with self._lock:
            started = time.perf_counter()
            looked, looked_origin = self._looked, self._looked_origin
            self._looked = self._looked_origin = None
            if looked is not None and not (
                _same(self._looked_grads, [p.grad for p in self._params])
                and (loss is None or _has_loss(looked))
            ):
                # Gradients replaced since backward (not rewritten in place), or a loss the look
                # did not see: scan now.
                looked = None
            self._telemetry.note_collect()
            self._step += 1
            self._training_step = self._step if step is None else step
            if self._module is not None and (
                self._registrations != registrations() or self._step % REFRESH_EVERY == 0
            ):
                self._guarded("scan", self.refresh)
            if (self._step - 1) % self.sample_every:
                self.origin.take()  # this rank's counts belong to the update left out, not the next
                if self.readout == "deferred":
                    self._publish(wait=False)
                self._guarded("record", lambda: self._telemetry.touch(time.time()))
                return GradHealth(
                    thresholds=self.thresholds, step=self._training_step, sampled=False
                )
            self._check_norms(norms)
            overflow_possible = _check_scaler(scaler)
            if loss is not None and not isinstance(loss, torch.Tensor):
                raise TypeError(
                    f"loss must be a tensor or None, got {loss!r} ({type(loss).__name__})"
                )
            with torch.no_grad():
                if looked is None:
                    scale = _scale_of(scaler) if overflow_possible else None
                    origin = _added(looked_origin, self.origin.take())
                    launched = self._launch(norms, loss, total_norm, origin, scale=scale)
                else:  # attach() looked at the gradients as backward left them
                    launched = _restepped(looked, self._training_step)
                if self.readout == "deferred":
                    self._publish(wait=False)  # the updates before this one, in order, if ready
                    if isinstance(launched, _Update):
                        if (
                            launched.launched.exact is None
                        ):  # done when queued: read it now, for free
                            launched = self._read_out(launched)
                        else:
                            launched.start_readout()
                    self._pending.append(
                        (launched, overflow_possible, time.perf_counter() - started, time.time())
                    )
                    return self._latest or self._health(self._training_step, pending=True)
                health = launched if isinstance(launched, GradHealth) else self._read_out(launched)
            duration = time.perf_counter() - started - self._scanner.waited
            return self._conclude(health, overflow_possible, duration, time.time())

    def _conclude(
        self, health: GradHealth, overflow_possible: bool, duration: float, timestamp: float
    ) -> GradHealth:
        """Record an update whose counts are known, and act on it."""
        scaler_skips = overflow_possible and bool(health.nan_total + health.inf_total)
        # A loss that was already non-finite is no overflow the scaler handles: it only hides it.
        if scaler_skips and health.loss_finite is not False:
            health = dataclasses.replace(health, amp_overflow=True)
            logger.debug("%s", health.describe())
        # Record before acting: a "raise" policy must not hide the update from Prometheus.
        self._guarded(
            "record", lambda: self._telemetry.record(health, duration=duration, timestamp=timestamp)
        )
        if health.unscanned is not None:
            return health
        action = None if health.amp_overflow else self._policy.action(health)
        self._weights.note(health, "skip" if scaler_skips else action)  # what reaches the weights
        if health.amp_overflow:
            return health
        if action == "skip":
            self._guarded("record", lambda: self._telemetry.record_skip("policy"))
        self._policy.apply(health, self._params)
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
        while self._pending:
            launched, overflow_possible, duration, timestamp = self._pending[0]
            if isinstance(launched, _Update) and not (wait or launched.ready()):
                return
            self._pending.popleft()
            health = launched if isinstance(launched, GradHealth) else self._read_out(launched)
            self._latest = self._conclude(health, overflow_possible, duration, timestamp)

    @property
    def healthy(self) -> bool:
        """Whether the weights are free of unhealthy updates, so a checkpoint saved now is
        not poisoned: True until an unhealthy update reaches the weights (one the
        optimizer takes; not one the AMP ``GradScaler`` or the ``"skip"`` policy skips,
        nor one ``"raise"`` stops), and again after :meth:`reset_health`. With
        ``readout="deferred"`` it waits for the pending updates' read-outs first."""
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
        _check_step(step)
        if not isinstance(all_ranks, bool):
            raise TypeError(f"all_ranks must be True or False, got {all_ranks!r}")
        self.flush()  # a deferred read-out must not let a poisoned update through
        allowed = self._weights.healthy
        if all_ranks:
            agreed = self._guarded("record", lambda: every_rank(allowed))
            allowed = allowed if agreed is None else agreed
        if not allowed:
            self._weights.refuse(step)
        self._guarded("record", lambda: self._telemetry.record_checkpoint(refused=not allowed))
        return allowed

    def reset_health(self) -> None:
        """Call after restoring the weights from a healthy checkpoint in this process:
        :attr:`healthy` is True again, and the next unhealthy update is a new incident (its
        own first bad layer and step on ``gradtel_first_bad_layer``; the older incidents'
        series are set to 0)."""
        self.flush()  # a pending unhealthy update belongs to the weights rolled back
        self._weights.reset()
        self._guarded("record", self._telemetry.forget_incidents)

    def _check_norms(self, norms: object) -> None:
        if norms is None:
            return
        allowed = (
            f"a 1-D tensor with one norm per watched parameter ({len(self._params)}, in the "
            "order of monitor.parameters) or a mapping from parameter to norm tensor"
        )
        if isinstance(norms, torch.Tensor):
            if norms.dim() != 1 or norms.numel() != len(self._params):
                raise ValueError(
                    f"norms must be {allowed}, got a tensor of shape {tuple(norms.shape)}"
                )
        elif not isinstance(norms, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in norms.values()
        ):
            raise TypeError(f"norms must be {allowed}, got {type(norms).__name__}")

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
            An :class:`~gradtel.hooks.Attachment`; ``remove()`` undoes it.

        Raises:
            TypeError: ``optimizer`` or ``scaler`` is of the wrong type, or
                ``step`` or ``loss`` is not callable.
            ValueError: unknown ``scan``, or this monitor is already attached
                to ``optimizer``.
        """
        return attach(self, optimizer, scaler=scaler, scan=scan, step=step, loss=loss)

    def _gather(self) -> tuple[list[torch.Tensor], tuple[int, ...], int, bool]:
        """Countable gradients, their parameters' positions, how many were skipped, all dense."""
        grads = [p.grad for p in self._params]
        strided = torch.strided
        # The usual update: every watched parameter has a plain dense gradient.
        # (Never `None in grads`: it compares each tensor with None elementwise.)
        if self._all_plain and all(
            g is not None and g.layout is strided and p.requires_grad
            for g, p in zip(grads, self._params)
        ):
            return grads, self._everyone, 0, True  # type: ignore[return-value]
        values: list[torch.Tensor] = []
        present: list[int] = []
        skipped = 0
        dense = True
        for index, (param, grad) in enumerate(zip(self._params, grads)):
            if grad is None or not param.requires_grad:
                skipped += 1
                continue
            if self._plain[index] and grad.layout is torch.strided:
                countable: torch.Tensor | None = grad
            else:
                dense = dense and grad.layout is torch.strided
                countable = countable_values(grad)
            if countable is None:
                skipped += 1
                self._failed(
                    "scan",
                    TypeError(
                        f"cannot count a {grad.layout} {grad.dtype} gradient in {self._labels[index]}"
                    ),
                )
                continue
            values.append(countable)
            present.append(index)
        return values, tuple(present), skipped, dense

    def _look(self, loss: torch.Tensor | None = None) -> None:
        """Scan the gradients as backward left them, for the next :meth:`collect` to publish:
        ``attach()`` calls it at the end of every backward pass, so that code running
        between backward and ``optimizer.step()`` (clipping) cannot change what is counted.
        With gradient accumulation each backward pass looks again; the last look counts."""
        with self._lock, torch.no_grad():
            if self._step % self.sample_every:  # the coming update is left out: no need to look
                return
            try:
                # A look replaced later keeps its micro-batch's counts for the next one.
                self._looked_origin = _added(
                    self._looked_origin, self.origin.take(update_ends=False)
                )
                looked = self._launch(None, loss, None, self._looked_origin, exact=True)
                if isinstance(looked, _Update) and looked.launched.exact is None:
                    looked = self._read_out(looked)  # done when queued: read it now, for free
                self._looked = looked
                self._looked_grads = tuple(p.grad for p in self._params)
            except Exception as exc:  # the next collect() scans as it always did
                self._looked = None
                self._failed("scan", exc)

    def _launch(
        self,
        norms: torch.Tensor | Mapping[torch.Tensor, torch.Tensor] | None,
        loss: torch.Tensor | None,
        total_norm: torch.Tensor | None,
        origin: torch.Tensor | None,
        exact: bool = False,
        scale: torch.Tensor | None = None,
    ) -> _Update | GradHealth:
        """Queue this update's scan on the device: an :class:`_Update` to read out, or the
        health of an update in which nothing could be scanned. ``origin``: this rank's own
        counts before the reduction, to read with it. ``exact``: on a device whose work is
        queued, count every gradient exactly now (they may be rewritten before the read-out)."""
        step = self._training_step
        values, present, skipped, dense = self._gather()
        # Read with the update's own read-out: this rank's counts before the
        # reduction, whether the loss was already non-finite, the gradient norm.
        loss_bad = _loss_bad(loss)
        unscanned = self._unscanned(values, skipped)
        if unscanned is not None:
            return self._health(step, unscanned=unscanned, skipped=skipped)
        summary: torch.Tensor | list[torch.Tensor] | None = None
        if norms is not None and dense:
            if isinstance(norms, torch.Tensor):
                everyone = present is self._everyone
                summary = norms if everyone else norms[torch.tensor(present, device=norms.device)]
            else:
                summary = []
                for i, v in zip(present, values):
                    norm = norms.get(self._params[i])
                    summary.append(torch.linalg.vector_norm(v) if norm is None else norm)
        # Clipping passes its total only with L2 norms, which are then reused.
        l2 = summary if summary is not None and total_norm is not None else None
        if dense and l2 is None and (self._layer_norms or (self.grad_norm and total_norm is None)):
            # A norm is not finite when its gradient holds a NaN or Inf: the L2 norms
            # stand in for the scan's own first pass, one pass over gradient memory for both.
            l2 = per_tensor_norms(values)
            summary = l2 if summary is None else summary
        if total_norm is None and self.grad_norm and l2 is not None:
            total_norm = total_norm_of(l2)
        if not dense and (self._layer_norms or (self.grad_norm and total_norm is None)):
            self._error_log.log(
                "sparse_norms", logging.WARNING,
                "gradtel: step %d has sparse gradients: grad_norm and layer_norms are not "
                "computed for it (the NaN/Inf counts are)", step,
            )  # fmt: skip
        # Sparse gradients change size every update: plan them anew each time.
        slots = present if dense else None
        norm = None if total_norm is None else total_norm.detach().reshape(1)
        layers, layer_norms = self._layer_norms_of(l2, present) if self._layer_norms else ((), None)
        # Counts as float64, exact in the read-out that promotes everything to one dtype.
        counts = None if origin is None else origin.double()
        scale = None if scale is None else scale.detach().double().reshape(1)
        extra = [t for t in (counts, loss_bad, norm, layer_norms, scale) if t is not None]
        try:
            if (exact or self.readout == "deferred") and not all(
                map(completes_when_queued, values)
            ):
                # Counted exactly now: the gradients may be clipped or zeroed before the read-out.
                launched = self._scanner.launch_exact(values, extra)
            else:
                launched = self._scanner.launch(values, slots, summary, extra)
        except Exception as exc:  # the scan failed: nothing was counted, say so
            self._failed("scan", exc)
            return self._health(step, unscanned="scan_error", skipped=len(self._params))
        return _Update(
            step=step,
            values=values,
            present=present,
            skipped=skipped,
            labels=self._labels,
            order=self._order,
            launched=launched,
            local=self.origin.installed,
            origin=origin is not None,
            loss=loss is not None,
            norm=norm is not None,
            layers=layers,
            scale=scale is not None,
        )

    def _read_out(self, update: _Update) -> GradHealth:
        """The health of a launched update: its read-out, then exact counts of what it flags."""
        try:
            # The deferred read-out's host copy, or the blocking read-out now.
            read = update.read() if update.copy is not None else self._scanner.read(update.launched)
            counts = self._scanner.finish(update.values or [], update.launched, read)
        except Exception as exc:  # the scan failed: nothing was counted, say so
            self._failed("scan", exc)
            return self._health(update.step, unscanned="scan_error", skipped=len(update.labels))
        also = list(self._scanner.also_read)
        local: dict[str, Any] = {}
        if update.local:
            nan, inf = also[:2] if update.origin else (0, 0)
            local = {"local_nan_total": int(nan), "local_inf_total": int(inf)}
        if update.scale:
            local["loss_scale"] = also.pop()
        if update.layers:
            local["layer_grad_norms"] = dict(zip(update.layers, also[-len(update.layers) :]))
            del also[-len(update.layers) :]
        if update.norm:
            local["grad_norm"] = also.pop()
        if update.loss:
            local["loss_finite"] = not also[-1]
        if not counts:  # the usual update: healthy
            return self._health(
                update.step, scanned=len(update.present), skipped=update.skipped, **local
            )
        nan_by_layer: dict[str, int] = {}
        inf_by_layer: dict[str, int] = {}
        labels, present = update.labels, update.present
        for i, (nan, inf) in counts.items():
            layer = labels[present[i]]
            if nan:
                nan_by_layer[layer] = nan_by_layer.get(layer, 0) + nan
            if inf:
                inf_by_layer[layer] = inf_by_layer.get(layer, 0) + inf

        def first(indices: list[int]) -> str | None:
            """The label of the parameter, among ``indices``, whose gradient backward made first."""
            found = update.order.first(indices) if update.order is not None else None
            return None if found is None else labels[found]

        return self._health(
            update.step,
            nan_by_layer=nan_by_layer,
            inf_by_layer=inf_by_layer,
            scanned=len(present),
            skipped=update.skipped,
            first_bad_layer=first([present[i] for i in counts]),
            first_nan_layer=first([present[i] for i, c in counts.items() if c[0]]),
            first_inf_layer=first([present[i] for i, c in counts.items() if c[1]]),
            **local,
        )

    def _layer_norms_of(
        self, l2: torch.Tensor | list[torch.Tensor] | None, present: tuple[int, ...]
    ) -> tuple[tuple[str, ...], torch.Tensor | None]:
        """The layers of the ``present`` gradients, and their L2 norms (float64) for the
        update's read-out: the root of the sum of their gradients' squared norms."""
        if l2 is None:
            return (), None
        squares = stacked(l2).double().square_()
        cached = self._layer_sums
        if cached is None or cached[0] is not present or cached[1].device != squares.device:
            names: dict[str, int] = {}
            slots = [names.setdefault(self._labels[i], len(names)) for i in present]
            # Kept on the device: no host-to-device copy per update.
            cached = self._layer_sums = (
                present,
                torch.tensor(slots, device=squares.device),
                tuple(names),
            )
        _, slots_tensor, layers = cached
        sums = torch.zeros(len(layers), dtype=torch.float64, device=squares.device)
        return layers, sums.index_add_(0, slots_tensor, squares).sqrt_()

    def _health(self, step: int, **fields: Any) -> GradHealth:
        return GradHealth(thresholds=self.thresholds, step=step, **fields)

    def _unscanned(self, values: list[torch.Tensor], skipped: int) -> str | None:
        """Why nothing can be scanned in this update, or None; logs what to check."""
        if values:
            return None
        trainable = sum(p.requires_grad for p in self._params)
        without = sum(p.requires_grad and p.grad is None for p in self._params)
        if without < trainable:  # gradients were there, gradtel could not count them
            return "scan_error"
        self._error_log.log(
            "no_gradients",
            logging.WARNING,
            "gradtel: step %d not scanned: 0 of %d watched trainable parameters had a "
            "gradient; is collect() called after backward() and before zero_grad()? "
            "(status unknown, counted in gradtel_unscanned_updates_total)",
            self._training_step,
            trainable,
        )
        return "no_gradients"

    def _guarded(self, stage: str, work: Callable[[], T]) -> T | None:
        try:
            return work()
        except Exception as exc:
            self._failed(stage, exc)
            return None

    def _failed(self, stage: str, exc: Exception) -> None:
        if self._on_error == "raise":
            raise exc
        self._telemetry.failed(stage, exc)


@dataclass
class _Update:
    """One scanned update, from its scan queued on the device to its read-out."""

    step: int
    values: list[torch.Tensor] | None
    """The gradients counted, kept until the flags say there is nothing to count."""
    present: tuple[int, ...]
    skipped: int
    labels: list[str]
    order: BackwardOrder | None
    launched: Launched
    local: bool
    """This rank's counts before the reduction are reported (a hook feeds them)."""
    origin: bool
    """They ride along in this read-out (the first two values)."""
    loss: bool
    norm: bool
    layers: tuple[str, ...]
    scale: bool = False
    """The AMP scaler's loss scale rides along, last."""
    copy: HostCopy | None = None
    _read: list[Any] | None = None

    def start_readout(self) -> None:
        """Copy the exact counts to the host without blocking (the deferred read-out); the
        gradients are let go, their counts are taken."""
        self.copy = HostCopy(self.launched.result)
        self.values = None

    def ready(self) -> bool:
        """Whether the read-out is done."""
        if self._read is None and self.copy is not None and self.copy.ready():
            self.read()
        return self._read is not None

    def read(self) -> list[Any]:
        """The host copy of the result, waiting for it if it is not there yet."""
        if self._read is None and self.copy is not None:
            self._read = self.copy.read()
        assert self._read is not None
        return self._read


_flush_at_exit: weakref.WeakSet[GradMonitor] = weakref.WeakSet()
"""Monitors with a deferred read-out: published before the interpreter exits."""


def _flush_all() -> None:
    for monitor in list(_flush_at_exit):
        monitor.flush()


def _free_collectives_at_exit() -> None:
    """In a distributed run, collect reference cycles when the interpreter begins to exit.

    A gloo work item holds Python objects (the thread-local state it was queued with); its
    worker thread drops them once it holds the GIL. One still held when the interpreter
    finalizes aborts the process (``terminate called without an active exception``), with
    or without gradtel; the cycles of a DDP or FSDP model keep such items alive until then.
    Collected in an exit handler, they are freed while the worker threads can still run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(_publish_then_collect)  # once, however many monitors
        atexit.register(_publish_then_collect)


def _publish_then_collect() -> None:
    # Publish first: a deferred monitor that only a cycle holds is freed by the collection.
    _flush_all()
    gc.collect()


def _flush_at_exit_too(monitor: GradMonitor) -> None:
    # Registered with the first such monitor, not at import: exit handlers run last-in
    # first-out, so this runs before the shutdown hook of a MeterProvider made earlier.
    if not _flush_at_exit:
        atexit.unregister(_flush_all)
        atexit.register(_flush_all)
    _flush_at_exit.add(monitor)


def _added(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of two optional count tensors (on the device, no host read)."""
    if a is None or b is None:
        return a if b is None else b
    return a + b.to(a.device)


def _same(a: Sequence[object], b: Sequence[object]) -> bool:
    """The same objects, one by one (identity: ``==`` on tensors compares their elements)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _has_loss(looked: _Update | GradHealth) -> bool:
    return looked.loss if isinstance(looked, _Update) else looked.loss_finite is not None


def _restepped(looked: _Update | GradHealth, step: int) -> _Update | GradHealth:
    """A look taken before its update's step was known, with that step."""
    if isinstance(looked, GradHealth):
        return dataclasses.replace(looked, step=step)
    looked.step = step
    return looked


def _scale_of(scaler: torch.amp.GradScaler | None) -> torch.Tensor | None:
    """An enabled scaler's current loss scale, as the tensor it keeps (``get_scale()`` would
    read it to the host: it is read with the update's own read-out instead)."""
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None


def _check_step(step: object) -> None:
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise TypeError(f"step must be an int >= 0 or None, got {step!r} ({type(step).__name__})")


def _loss_bad(loss: torch.Tensor | None) -> torch.Tensor | None:
    """A 1-element tensor, 1 when ``loss`` holds a NaN or Inf (no host read)."""
    if loss is None:
        return None
    return torch.isfinite(loss.detach()).all().logical_not().reshape(1)


def _check_scaler(scaler: object) -> bool:
    """Whether ``scaler`` is an enabled GradScaler (None: no scaler)."""
    if scaler is None:
        return False
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"scaler must be a torch.amp.GradScaler or None, got {scaler!r} ({type(scaler).__name__})"
        )
    return scaler.is_enabled()
