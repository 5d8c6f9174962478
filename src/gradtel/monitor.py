"""``GradMonitor``: ties naming, scan, health, telemetry and policy together."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar

import torch
from opentelemetry.metrics import MeterProvider

from . import _checks
from ._ratelimit import RateLimitedLog
from .health import GradHealth, Status, Thresholds
from .hooks import Attachment, attach
from .layers import DEFAULT_MAX_LAYERS, assign_layers, distinct
from .policy import Action, apply_action, check_action
from .scan import Scanner, countable_values
from .telemetry import GradTelemetry, default_meter_provider, process_attributes

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


def _named_parameters(model: object) -> list[tuple[str, torch.nn.Parameter]]:
    if isinstance(model, torch.nn.Module):
        return list(model.named_parameters())
    if model is None or isinstance(model, (str, bytes, torch.Tensor)) or not isinstance(
        model, Iterable
    ):
        raise TypeError(
            "model must be a torch.nn.Module or an iterable of (name, Parameter) pairs, "
            f"got {model!r} ({type(model).__name__})"
        )
    pairs = []
    seen: set[int] = set()
    for item in model:
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        ):
            raise TypeError(
                "model must yield (name, Parameter) pairs such as Module.named_parameters() "
                f"gives, got an item {item!r}"
            )
        if id(item[1]) not in seen:  # tied parameters are watched once
            seen.add(id(item[1]))
            pairs.append(item)
    return pairs


class GradMonitor:
    """Count NaN and ±Inf gradient values per layer after each backward pass.

    Call :meth:`collect` once per optimizer update, after ``backward()`` and
    before ``optimizer.step()``. Parameters are taken when the monitor is made;
    those frozen then (``requires_grad=False``) are not watched.

    Args:
        model: An ``nn.Module`` or an iterable of ``(name, Parameter)`` pairs.
        thresholds: Warning and critical bands of the per-update counts.
        on_warning: Action for an update in the warning band: ``"ignore"``,
            ``"warn"`` (one log line; default), ``"raise"``
            (:class:`~gradtel.NonFiniteGradientError`) or ``"skip"`` (clear the
            gradients so the next optimizer step changes nothing).
        on_critical: The same for a critical update.
        max_layers: Distinct ``layer`` labels kept (1..1998); further layers
            are reported as ``"(other)"``. Default 1000.
        layer_depth: Truncate layer labels to this many module-path components
            (``None``: full path).
        meter_provider: OpenTelemetry ``MeterProvider`` to record into; default
            gradtel's own, exported on prometheus-client's global registry.
        sample_every: Scan one update in this many (default 1: every update).
            Updates left out are not scanned, recorded or counted anywhere:
            ``gradtel_updates_total`` counts scanned updates only, and the
            returned ``GradHealth`` has ``sampled=False``.
        on_error: ``"warn"`` (default): a failure inside gradtel is logged (at
            most once a minute per stage), counted in ``gradtel_errors_total``,
            and training goes on; ``"raise"``: the failure propagates.

    Raises:
        TypeError: ``model`` is not a module or named parameters, or an option
            has the wrong type.
        ValueError: no trainable parameters, or an option is out of range.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> monitor = GradMonitor(model)
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> health = monitor.collect()
    >>> health.status.value, health.nan_total, health.scanned
    ('healthy', 0, 2)
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
        sample_every: int = 1,
        on_error: Literal["warn", "raise"] = "warn",
    ) -> None:
        if not isinstance(thresholds, Thresholds):
            raise TypeError(
                f"thresholds must be a gradtel.Thresholds, got {thresholds!r} "
                f"({type(thresholds).__name__})"
            )
        self._actions = {
            Status.WARNING: check_action("on_warning", on_warning),
            Status.CRITICAL: check_action("on_critical", on_critical),
        }
        _checks.on_error(on_error)
        if isinstance(max_layers, int) and not isinstance(max_layers, bool):
            if max_layers > MAX_LAYERS_LIMIT:
                raise ValueError(
                    f"max_layers must be from 1 to {MAX_LAYERS_LIMIT}, got {max_layers}; "
                    "use layer_depth= to group layers instead"
                )
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
            raise ValueError(f"sample_every must be an int >= 1, got {sample_every!r}")
        if meter_provider is not None and not hasattr(meter_provider, "get_meter"):
            raise TypeError(
                "meter_provider must be an OpenTelemetry MeterProvider, "
                f"got {meter_provider!r} ({type(meter_provider).__name__})"
            )

        named = [(n, p) for n, p in _named_parameters(model) if p.requires_grad]
        if not named:
            raise ValueError(
                f"model has no trainable parameters (requires_grad=True) to watch: {model!r}"
            )
        self._module = model if isinstance(model, torch.nn.Module) else None
        self._naming = {"max_layers": max_layers, "depth": layer_depth}
        self._order_hooks: list[Any] = []
        self.thresholds = thresholds
        self.sample_every = sample_every
        self._on_error = on_error
        self._step = 0
        self._lock = threading.Lock()
        self._error_log = RateLimitedLog(logger)
        self._watch(named)
        self._telemetry = GradTelemetry(
            self._layer_names,
            meter_provider=default_meter_provider() if meter_provider is None else meter_provider,
            attributes=process_attributes(),
            start_time=time.time(),
        )

    def _watch(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        """Take ``named`` as the watched parameters (at creation and at each refresh)."""
        labels = assign_layers((n for n, _ in named), **self._naming)  # type: ignore[arg-type]
        self._params = [p for _, p in named]
        self._watched = tuple(self._params)
        self._labels = labels
        self._layer_names = tuple(distinct(labels))
        self._scanner = Scanner()
        # Backward order, recorded once from the first real backward pass: hooks
        # fire as each gradient is accumulated, then are removed (no steady cost).
        for handle in self._order_hooks:
            handle.remove()
        self._backward_seen: list[int] = []
        self._backward_rank: list[int] | None = None
        self._order_hooks = [
            p.register_post_accumulate_grad_hook(self._note_backward(i))
            for i, p in enumerate(self._params)
        ]
        # Gradients of these dtypes are counted as they are when strided.
        self._plain = [p.dtype in _PLAIN_DTYPES for p in self._params]
        self._all_plain = all(self._plain)
        self._everyone = list(range(len(self._params)))

    def refresh(self) -> bool:
        """Pick up parameters added to (or removed from) the model since it was watched.

        Runs by itself every ``REFRESH_EVERY`` updates when the monitor watches
        an ``nn.Module``. New layers get their series (at 0) and are scanned;
        the series of layers that are gone stay at their last values.

        Returns:
            Whether the watched parameters changed.
        """
        if self._module is None:
            return False
        named = [(n, p) for n, p in self._module.named_parameters() if p.requires_grad]
        same = len(named) == len(self._params) and all(
            mine is theirs for (_, mine), theirs in zip(named, self._params)
        )  # identity: == on tensors compares elements
        if not named or same:
            return False
        self._watch(named)
        self._telemetry.add_layers(self._layer_names)
        return True

    def _note_backward(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            self._backward_seen.append(index)

        return hook

    def _freeze_backward_order(self) -> None:
        if self._backward_rank is not None or not self._backward_seen:
            return
        rank = [len(self._params)] * len(self._params)  # never seen: after all seen ones
        for position, index in enumerate(dict.fromkeys(self._backward_seen)):
            rank[index] = position
        self._backward_rank = rank
        for handle in self._order_hooks:
            handle.remove()
        self._order_hooks = []

    @property
    def parameters(self) -> tuple[torch.nn.Parameter, ...]:
        """The watched parameters, in the order ``collect(norms=...)`` takes a tensor of norms."""
        return self._watched

    @property
    def layers(self) -> tuple[str, ...]:
        """Every ``layer`` label this monitor reports, in model order."""
        return self._layer_names

    def collect(
        self, *, norms: torch.Tensor | Mapping[torch.Tensor, torch.Tensor] | None = None
    ) -> GradHealth:
        """Scan the current gradients, record them and apply the policy.

        Args:
            norms: Norms of the gradients already computed this update
                (:func:`gradtel.clip_grad_norm_` passes them): a 1-D tensor in
                the order of :attr:`parameters`, or a mapping by parameter.
                gradtel then decides health without reading the gradients
                again, and counts exactly only those whose norm is not finite.

        Returns:
            The update's :class:`~gradtel.GradHealth`.

        Raises:
            NonFiniteGradientError: the update is unhealthy and its policy is ``"raise"``.
        """
        with self._lock:
            started = time.perf_counter()
            self._step += 1
            if self._step % REFRESH_EVERY == 0:
                self._guarded("scan", self.refresh)
            if (self._step - 1) % self.sample_every:
                return GradHealth(thresholds=self.thresholds, step=self._step, sampled=False)
            self._freeze_backward_order()
            health = self._scan(norms)
            duration = time.perf_counter() - started
            # Record before acting: a "raise" policy must not hide the update from Prometheus.
            self._guarded(
                "record",
                lambda: self._telemetry.record(health, duration=duration, timestamp=time.time()),
            )
            action = self._actions.get(health.status)
            if action == "skip":
                self._record_skip("policy")
            if action is not None:
                apply_action(action, health, self._params)
            return health

    def _record_skip(self, reason: str) -> None:
        self._guarded("record", lambda: self._telemetry.record_skip(reason))

    def attach(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        scaler: torch.amp.GradScaler | None = None,
        scan: Literal["step", "backward"] = "step",
    ) -> Attachment:
        """Collect by itself, with no ``collect()`` in the training loop.

        Args:
            optimizer: The optimizer whose updates are scanned.
            scaler: The ``torch.amp.GradScaler`` in use, if any: gradtel then
                collects right after the scaler unscales the gradients, so it
                counts what the optimizer would see and also sees the updates
                the scaler skips for overflow (``gradtel_skipped_updates_total
                {reason="amp_overflow"}``).
            scan: ``"step"`` (default): once per optimizer update, i.e. after
                the last micro-batch of gradient accumulation. ``"backward"``:
                after every backward pass, counting the gradients accumulated so far.

        Returns:
            An :class:`~gradtel.hooks.Attachment`; ``remove()`` undoes it.

        Raises:
            TypeError: ``optimizer`` or ``scaler`` is of the wrong type.
            ValueError: unknown ``scan``.
        """
        return attach(self, optimizer, scaler=scaler, scan=scan)

    def _gather(self) -> tuple[list[torch.Tensor], list[int], int, bool]:
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
        return values, present, skipped, dense

    def _scan(
        self, norms: torch.Tensor | Mapping[torch.Tensor, torch.Tensor] | None
    ) -> GradHealth:
        values, present, skipped, dense = self._gather()
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
        # Dense gradients keep their parameter's size, so the scan plan for a set
        # of present parameters can be reused; sparse ones change size each update.
        key: object = None
        if dense:
            key = "all" if present is self._everyone else tuple(present)
        counts = self._guarded("scan", lambda: self._scanner.count(values, key, summary))
        if counts is None:  # the scan failed: nothing was counted, say so
            skipped, values, counts = len(self._params), [], {}
        nan_by_layer: dict[str, int] = {}
        inf_by_layer: dict[str, int] = {}
        for i, (nan, inf) in counts.items():
            layer = self._labels[present[i]]
            if nan:
                nan_by_layer[layer] = nan_by_layer.get(layer, 0) + nan
            if inf:
                inf_by_layer[layer] = inf_by_layer.get(layer, 0) + inf
        first_bad = None
        if counts and self._backward_rank is not None:
            rank = self._backward_rank
            first = min((present[i] for i in counts), key=lambda index: (rank[index], index))
            first_bad = self._labels[first]
        return GradHealth(
            nan_by_layer=nan_by_layer,
            inf_by_layer=inf_by_layer,
            scanned=len(values),
            skipped=skipped,
            thresholds=self.thresholds,
            step=self._step,
            first_bad_layer=first_bad,
        )

    def _guarded(self, stage: str, work: Callable[[], T]) -> T | None:
        try:
            return work()
        except Exception as exc:
            self._failed(stage, exc)
            return None

    def _failed(self, stage: str, exc: Exception) -> None:
        if self._on_error == "raise":
            raise exc
        self._telemetry.record_error(stage)
        self._error_log.log(
            stage, logging.ERROR, "gradtel %s failed, training continues: %r", stage, exc
        )
