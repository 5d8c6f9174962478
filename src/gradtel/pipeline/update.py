"""One optimizer update, from its scan queued on the device to its :class:`GradHealth`.

An update is in one of these states:

- *sampled out*: ``sample_every`` left it out; nothing was looked at;
- *unscanned*: it was due, but nothing could be scanned (``unscanned`` says why:
  ``"no_gradients"`` or ``"scan_error"``);
- *launched*: its scan is queued on the device; its read-out may be pending
  (``readout="deferred"``);
- *read*: its counts are on the host and its health is known.

An update is *due* when ``sample_every`` does not leave it out.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..health import GradHealth, Thresholds
from .order import BackwardOrder
from .parameters import Gradients, Watched
from .readout import HostCopy, completes_when_queued
from .scan import Launched, Scanner, per_tensor_norms, stacked
from .scan import total_norm as total_norm_of

__all__ = ["Norms", "ReadAlong", "State", "Update", "launch"]

Norms = torch.Tensor | Mapping[torch.Tensor, torch.Tensor]
"""Norms of the gradients computed by the caller: one per watched parameter, or by parameter."""


class State(enum.Enum):
    SAMPLED_OUT = "sampled_out"
    UNSCANNED = "unscanned"
    LAUNCHED = "launched"
    READ = "read"


@dataclass(frozen=True)
class ReadAlong:
    """Small values read to the host with the update's own read-out, so that none of them
    costs a read of its own. Packed by :meth:`tensors` and named again by :meth:`fields`."""

    origin: torch.Tensor | None = None
    """This rank's own NaN and Inf counts before the cross-rank reduction (float64, exact),
    and the sum of the squares of its own gradients there."""
    loss_bad: torch.Tensor | None = None
    """1 when the loss held a NaN or Inf."""
    norm: torch.Tensor | None = None
    """The L2 norm of all gradients."""
    layers: tuple[str, ...] = ()
    layer_norms: torch.Tensor | None = None
    """The L2 norm of each of ``layers``' gradients (float64)."""
    scale: torch.Tensor | None = None
    """The AMP scaler's loss scale (float64)."""
    scaled: bool = False
    """The gradients are still multiplied by ``scale`` (a fused optimizer unscales in its
    step, ``scan="backward"`` looks before the scaler does): their norms are divided by it."""
    local: bool = False
    """This rank's counts before the reduction are reported (a hook feeds them); 0 when
    none came with this update."""

    def tensors(self) -> list[torch.Tensor]:
        """The values to read, in the order :meth:`fields` reads them back."""
        packed = (self.origin, self.loss_bad, self.norm, self.layer_norms, self.scale)
        return [t for t in packed if t is not None]

    def fields(self, values: Sequence[float]) -> dict[str, Any]:
        """The :class:`GradHealth` fields that ``values`` (read from :meth:`tensors`) give."""
        it: Iterator[float] = iter(values)
        found: dict[str, Any] = {}
        if self.origin is not None:
            nan, inf, squares = int(next(it)), int(next(it)), next(it)
            local_norm: float | None = math.sqrt(squares)
        else:
            nan, inf, local_norm = 0, 0, None
        if self.local:
            found["local_nan_total"], found["local_inf_total"] = nan, inf
            found["local_grad_norm"] = local_norm
        if self.loss_bad is not None:
            found["loss_finite"] = not next(it)
        if self.norm is not None:
            found["grad_norm"] = next(it)
        if self.layer_norms is not None:
            found["layer_grad_norms"] = {layer: next(it) for layer in self.layers}
        if self.scale is not None:
            found["loss_scale"] = scale = next(it)
            # Norms of the gradients as the optimizer takes them, unscaled; this rank's own
            # before the reduction were taken in backward, scaled, always.
            if self.scaled and scale:
                if "grad_norm" in found:
                    found["grad_norm"] /= scale
                if "layer_grad_norms" in found:
                    found["layer_grad_norms"] = {
                        layer: norm / scale for layer, norm in found["layer_grad_norms"].items()
                    }
            if found.get("local_grad_norm") is not None and scale:
                found["local_grad_norm"] /= scale
        return found


@dataclass
class Update:
    """One update. ``collect()`` makes it, the read-out turns it into a :class:`GradHealth`."""

    step: int
    thresholds: Thresholds
    state: State
    skipped: int = 0
    """Watched parameters left out: frozen, or no gradient."""
    launched: Launched | None = None
    values: list[torch.Tensor] | None = None
    """The gradients counted, kept until the flags say there is nothing to count."""
    present: tuple[int, ...] = ()
    """The watched parameters' positions of ``values``."""
    labels: Sequence[str] = ()
    """The layer label of every watched parameter."""
    order: BackwardOrder | None = None
    read_along: ReadAlong = field(default_factory=ReadAlong)
    overflow_possible: bool = False
    """An enabled AMP ``GradScaler`` steps this update: its non-finite values are an overflow."""
    duration: float = 0.0
    """``collect()``'s own time, the wait for the device left out."""
    timestamp: float = 0.0
    """Unix time of the ``collect()`` that made it."""
    sequence: int = 0
    """Which ``collect()`` of its monitor made it (1, 2, ...): orders updates whatever the
    wall clock does."""
    waited: float = 0.0
    """How long the blocking read-out waited for work queued before the scan."""
    copy: HostCopy | None = None
    """The deferred read-out's host copy, once started."""
    health: GradHealth | None = None
    """Known in state READ (and for an update with nothing to read)."""
    _read: list[Any] | None = None

    @classmethod
    def sampled_out(cls, step: int, thresholds: Thresholds, sequence: int) -> Update:
        health = GradHealth(thresholds=thresholds, step=step, sampled=False)
        return cls(step, thresholds, State.SAMPLED_OUT, health=health, sequence=sequence)

    @classmethod
    def not_scanned(
        cls, step: int, thresholds: Thresholds, reason: str, skipped: int, sequence: int
    ) -> Update:
        update = cls(step, thresholds, State.UNSCANNED, sequence=sequence)
        update.unscan(reason, skipped)
        return update

    def unscan(self, reason: str, skipped: int) -> GradHealth:
        """Nothing of this update could be counted: its health says why (``"no_gradients"``,
        ``"scan_error"``), with ``skipped`` watched parameters left out."""
        self.state, self.skipped, self.values = State.UNSCANNED, skipped, None
        self.health = GradHealth(
            thresholds=self.thresholds, step=self.step, unscanned=reason, skipped=skipped
        )
        return self.health

    def restep(self, step: int, sequence: int) -> None:
        """Give an update made before its step was known (at the end of backward) its step,
        and the ``collect()`` that takes it."""
        self.step, self.sequence = step, sequence
        if self.health is not None:
            self.health = dataclasses.replace(self.health, step=step)

    @property
    def pending(self) -> bool:
        """Launched, its counts not read yet."""
        return self.state is State.LAUNCHED

    def start_readout(self) -> None:
        """Copy the exact counts to the host without blocking (the deferred read-out); the
        gradients are let go, their counts are taken."""
        assert self.launched is not None
        self.copy = HostCopy(self.launched.result)
        self.values = None

    def ready(self) -> bool:
        """Whether the read-out would not wait."""
        if not self.pending:
            return True
        if self._read is None and self.copy is not None and self.copy.ready():
            self._read = self.copy.read()
        return self._read is not None

    def read_out(self, scanner: Scanner) -> GradHealth:
        """The health: the read-out (the host copy, or a blocking read now), then exact
        counts of what it flags. Raises what the scan raises; the update stays launched."""
        if self.health is not None:
            return self.health
        launched = self.launched
        assert launched is not None
        if self.copy is not None:
            read = self._read if self._read is not None else self.copy.read()
        else:
            read, self.waited = scanner.read(launched)
        counts = scanner.finish(self.values or [], launched, read)
        along = self.read_along.fields(read[len(read) - launched.also :])
        self.health = self._health(counts, along)
        self.state = State.READ
        self.values = None
        return self.health

    def _health(self, counts: dict[int, tuple[int, int]], along: dict[str, Any]) -> GradHealth:
        present, labels = self.present, self.labels
        along["scanned"], along["skipped"] = len(present), self.skipped
        if not counts:  # the usual update: healthy
            return GradHealth(thresholds=self.thresholds, step=self.step, **along)
        nan_by_layer: dict[str, int] = {}
        inf_by_layer: dict[str, int] = {}
        for i, (nan, inf) in counts.items():
            layer = labels[present[i]]
            if nan:
                nan_by_layer[layer] = nan_by_layer.get(layer, 0) + nan
            if inf:
                inf_by_layer[layer] = inf_by_layer.get(layer, 0) + inf

        def first(indices: list[int]) -> str | None:
            """The label of the parameter, among ``indices``, whose gradient backward made first."""
            found = self.order.first(indices) if self.order is not None else None
            return None if found is None else labels[found]

        return GradHealth(
            thresholds=self.thresholds,
            step=self.step,
            nan_by_layer=nan_by_layer,
            inf_by_layer=inf_by_layer,
            first_bad_layer=first([present[i] for i in counts]),
            first_nan_layer=first([present[i] for i, c in counts.items() if c[0]]),
            first_inf_layer=first([present[i] for i, c in counts.items() if c[1]]),
            **along,
        )


def launch(
    watched: Watched,
    grads: Gradients,
    scanner: Scanner,
    update: Update,
    *,
    norms: Norms | None = None,
    loss: torch.Tensor | None = None,
    total_norm: torch.Tensor | None = None,
    origin: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    scaled: bool = False,
    local: bool = False,
    grad_norm: bool = False,
    layer_norms: bool = False,
    exact: bool = False,
    no_norms: Callable[[], None] = lambda: None,
) -> None:
    """Queue ``update``'s scan of ``grads`` on the device, with what it reads along
    (``origin``, ``scale``, ``local``: see :class:`ReadAlong`).

    ``norms``: the caller's norms, which stand in for the scan's first pass. ``exact``: on
    a device whose work is queued, count every gradient exactly now (they may be rewritten
    before the read-out). ``no_norms`` is told when the norms asked for cannot be computed
    (sparse gradients). Raises what the scan raises.
    """
    values, present, dense = grads.values, grads.present, grads.dense
    summary: torch.Tensor | list[torch.Tensor] | None = None
    if norms is not None and dense:
        if isinstance(norms, torch.Tensor):
            everyone = present is watched.everyone
            summary = norms if everyone else norms[torch.tensor(present, device=norms.device)]
        else:
            summary = []
            for i, v in zip(present, values):
                # A flat parameter's norm is not its spans': they get their own.
                norm = norms.get(watched.params[i]) if watched.spans[i] is None else None
                summary.append(torch.linalg.vector_norm(v) if norm is None else norm)
    # Clipping passes its total only with L2 norms, which are then reused.
    l2 = summary if summary is not None and total_norm is not None else None
    wants_norms = layer_norms or (grad_norm and total_norm is None)
    if dense and l2 is None and wants_norms:
        # A norm is not finite when its gradient holds a NaN or Inf: the L2 norms
        # stand in for the scan's own first pass, one pass over gradient memory for both.
        l2 = per_tensor_norms(values)
        summary = l2 if summary is None else summary
    if total_norm is None and grad_norm and l2 is not None:
        total_norm = total_norm_of(l2)
    if not dense and wants_norms:
        no_norms()
    layers, by_layer = _layer_norms(watched, l2, present) if layer_norms else ((), None)
    along = ReadAlong(
        # Counts as float64, exact in the read-out that promotes everything to one dtype.
        origin=None if origin is None else origin.double(),
        loss_bad=_loss_bad(loss),
        norm=None if total_norm is None else total_norm.detach().reshape(1),
        layers=layers,
        layer_norms=by_layer,
        scale=None if scale is None else scale.detach().double().reshape(1),
        scaled=scaled,
        local=local,
    )
    extra = along.tensors()
    if exact and not all(map(completes_when_queued, values)):
        # Counted exactly now: the gradients may be clipped or zeroed before the read-out.
        launched = scanner.launch_exact(values, extra)
    else:
        # Sparse gradients change size every update: plan them anew each time.
        launched = scanner.launch(values, present if dense else None, summary, extra)
    update.launched, update.values, update.present = launched, values, present
    update.labels, update.order, update.read_along = watched.labels, watched.order, along


def _layer_norms(
    watched: Watched, l2: torch.Tensor | list[torch.Tensor] | None, present: tuple[int, ...]
) -> tuple[tuple[str, ...], torch.Tensor | None]:
    """The layers of the ``present`` gradients, and their L2 norms (float64): the root of
    the sum of their gradients' squared norms."""
    if l2 is None:
        return (), None
    squares = stacked(l2).double().square_()
    slots, layers = watched.layer_slots(present, squares.device)
    sums = torch.zeros(len(layers), dtype=torch.float64, device=squares.device)
    return layers, sums.index_add_(0, slots, squares).sqrt_()


def _loss_bad(loss: torch.Tensor | None) -> torch.Tensor | None:
    """A 1-element tensor, 1 when ``loss`` holds a NaN or Inf (no host read)."""
    if loss is None:
        return None
    return torch.isfinite(loss.detach()).all().logical_not().reshape(1)
