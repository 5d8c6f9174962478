"""Device-side counting of NaN and ±Inf values in gradients.

The scan runs in two phases so that the common, healthy update costs about
one read of gradient memory and one host read-out:

1. *Flag.* Small tensors (below ``CHUNK`` elements: biases, norm weights,
   most weights of small models) are flagged by torch's own fused non-finite
   check, the one ``GradScaler`` runs (``_amp_foreach_non_finite_check_and_unscale_``
   with a scale of 1, which writes every value back unchanged): on CUDA one
   multi-tensor launch for all of them, on the CPU one call per ``BATCH``
   tensors, where a call per tensor would cost more than the arithmetic.
   Large tensors are flagged by a sum per chunk of ``CHUNK`` elements, which
   is non-finite whenever the chunk holds a NaN or an Inf: as fast as one sum
   over the tensor, writes nothing, and tells where the bad values are. Sums,
   not norms: squaring makes subnormal gradients, common deep in a network,
   several times slower on CPUs. Gradients that must not be written (complex,
   overlapping, or part of an autograd graph) are summed whole. The flags are
   read to the host in one transfer. A healthy update stops here.
2. *Count.* Only flagged pieces are counted exactly, into int64 (a
   38M-element embedding is counted right), and read out in one more
   transfer: a chunk of a large tensor, or the tensors of a flagged batch
   that the fused check flags again, run per tensor (on CUDA first on
   batches of ``BATCH``), one read-out per level. A sum's flag can be a false alarm (finite
   values whose sum overflows): the exact count is then zero, so results are
   always exact.

Tensors are read in memory order (a channels-last or transposed gradient is
viewed, never copied), and nothing in either phase reads a value to the host
except the two read-outs. When the caller already has one norm per gradient
(gradient clipping computes them), phase 1 uses those instead.

The plan (which tensor is flagged how) is made per tensor, in linear time,
and kept per caller-given slot, so that a changing set of tensors (experts
that get no gradient in some updates) assembles it again cheaply. A plan
that no longer fits a tensor still counts every element, or fails to apply
and is made anew; it is never silently partial.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .._imported import imported

__all__ = [
    "CHUNK",
    "Launched",
    "Scanner",
    "count_nonfinite",
    "countable_values",
    "memory_order",
    "nan_and_inf",
    "per_tensor_norms",
    "stacked",
    "total_norm",
]

CHUNK = 1 << 16
"""Elements per chunk of a large tensor; tensors smaller than this are flagged whole."""

BATCH = 16
"""Small tensors flagged by one call of the fused check on the CPU: one flag per batch.
A flagged batch is checked again tensor by tensor, and only its flagged tensors are
counted. On CUDA, where a launch costs more than reading a batch, all small tensors of
a device and dtype share one call and one flag; a flagged group is split into batches
of ``BATCH``, then into tensors, one read-out per level."""

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

VERIFY_EVERY = 64
"""Uses of a plan between two checks that every tensor still has its planned size."""

_SPARSE_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def countable_values(grad: torch.Tensor) -> torch.Tensor | None:
    """Return the dense tensor whose elements are counted for ``grad``.

    Sparse gradients count their values once coalesced; a sharded ``DTensor`` (FSDP's
    ``fully_shard``) counts this rank's shard; dtypes that torch cannot reduce
    directly (float8, complex32) are widened. Returns None for a kind of
    tensor gradtel cannot count.
    """
    if isinstance(grad, imported("torch.distributed.tensor", "DTensor") or ()):
        grad = grad.to_local()
    if grad.layout is torch.strided:
        values = grad
    elif grad.layout is torch.sparse_coo:
        # The gradient is the sum of its entries at each index (a token repeated in a
        # batch has one per occurrence): NaN + 1 is one NaN, Inf + -Inf a NaN.
        values = (grad if grad.is_coalesced() else grad.coalesce())._values()
    elif grad.layout in _SPARSE_COMPRESSED:
        values = grad.values()
    else:
        return None
    if values.dtype is torch.complex32:
        return values.to(torch.complex64)
    if values.is_floating_point() and values.element_size() == 1:
        return values.float()
    if not (values.is_floating_point() or values.is_complex()):
        return None
    return values


def memory_order(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """The dimension order in which a non-contiguous ``tensor`` is laid out densely.

    None when ``tensor`` is contiguous, or when no order is dense (overlapping
    or gapped strides): ``tensor.permute(order).view(-1)`` is then impossible.

    >>> memory_order(torch.ones(2, 3).t())
    (1, 0)
    """
    if tensor.is_contiguous():
        return None
    strides, sizes = tensor.stride(), tensor.shape
    order = tuple(sorted(range(tensor.dim()), key=lambda d: (-strides[d], -sizes[d])))
    return order if tensor.permute(order).is_contiguous() else None


def _flat(tensor: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """All elements, 1-D, in memory order: a view (raises if the layout changed since planning)."""
    if order is None:
        return tensor.view(-1)
    return tensor.permute(order).view(-1)


@dataclass(frozen=True)
class _Entry:
    """How one tensor is flagged, decided once per slot."""

    device: torch.device
    dtype: torch.dtype
    numel: int
    fused: bool  # small, and the fused check may write it back
    chunks: int  # full chunks of a large tensor (0: flagged whole)
    rest: int
    order: tuple[int, ...] | None  # memory order of a non-contiguous large tensor
    copy: bool  # no dense order exists: flattened with a copy (never seen for gradients)


def _entry(tensor: torch.Tensor) -> _Entry:
    numel = tensor.numel()
    chunks, rest = divmod(numel, CHUNK) if numel >= CHUNK else (0, 0)
    dense = tensor.is_contiguous() or memory_order(tensor) is not None
    fused = not chunks and dense and tensor.dtype in _FUSED_DTYPES
    order = memory_order(tensor) if chunks else None
    copy = bool(chunks) and order is None and not tensor.is_contiguous()
    return _Entry(tensor.device, tensor.dtype, numel, fused, chunks, rest, order, copy)


@dataclass(frozen=True)
class _Piece:
    """What one flag stands for: tensor ``index`` whole, elements ``start:stop`` of it in
    memory order (``stop`` None: to the end), or, for a batch, the tensors ``members``."""

    index: int
    start: int = 0
    stop: int | None = None
    order: tuple[int, ...] | None = None
    copy: bool = False
    members: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Group:
    """Tensors of one device and dtype, and the order their flags come in."""

    batches: tuple[tuple[int, ...], ...]  # flagged by the fused check, one flag per batch
    small: tuple[int, ...]  # flagged whole, by a sum
    large: tuple[tuple[int, _Entry], ...]
    pieces: tuple[_Piece, ...]


def _assemble(entries: Sequence[_Entry]) -> list[_Group]:
    """The groups for tensors planned as ``entries`` (in the caller's order), in linear time."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, e in enumerate(entries):
        by_kind[(e.device, e.dtype)].append(i)
    groups = []
    for members in by_kind.values():
        fused = [i for i in members if entries[i].fused]
        size = _batch_size(entries[members[0]].device, len(fused))
        batches = tuple(tuple(fused[b : b + size]) for b in range(0, len(fused), size))
        small = tuple(i for i in members if not entries[i].fused and not entries[i].chunks)
        large = tuple((i, entries[i]) for i in members if entries[i].chunks)
        pieces = [_Piece(batch[0], members=batch) for batch in batches]
        pieces += [_Piece(i) for i in small]
        for i, e in large:
            pieces += [
                _Piece(i, c * CHUNK, (c + 1) * CHUNK, e.order, e.copy) for c in range(e.chunks)
            ]
            if e.rest:
                pieces.append(_Piece(i, e.chunks * CHUNK, None, e.order, e.copy))
        groups.append(_Group(batches, small, large, tuple(pieces)))
    return groups


def _batch_size(device: torch.device, small: int) -> int:
    """Small tensors per call of the fused check: all of them on CUDA, ``BATCH`` elsewhere."""
    return max(1, small) if device.type == "cuda" else BATCH


def _flatten(tensor: torch.Tensor, piece: _Piece | _Entry) -> torch.Tensor:
    return tensor.reshape(-1) if piece.copy else _flat(tensor, piece.order)


def _flags(values: Sequence[torch.Tensor], group: _Group) -> torch.Tensor:
    """Per piece of ``group``: True where it holds (or, rarely, seems to hold) a non-finite value."""
    # Sums keep the input dtype: asking torch for a wider one is 25x slower on CPU
    # for half types. An fp16 sum can overflow on healthy values: a false alarm
    # that phase 2 resolves by counting, never a wrong count.
    sums = []
    if group.small:
        # A whole-tensor sum reads any layout in place, without a copy.
        sums.append(torch.stack([values[i].sum() for i in group.small]))
    for i, e in group.large:
        flat = _flatten(values[i], e)
        if not e.rest:  # view() raises if the size changed since planning
            sums.append(flat.view(e.chunks, CHUNK).sum(1))
            continue
        sums.append(flat[: e.chunks * CHUNK].view(e.chunks, CHUNK).sum(1))
        sums.append(flat[e.chunks * CHUNK :].sum().reshape(1))  # whatever the tail's size now
    flags = [_fused_flags(values, group.batches)] if group.batches else []
    if sums:
        flags.append(_not_finite(sums[0] if len(sums) == 1 else torch.cat(sums)))
    return flags[0] if len(flags) == 1 else torch.cat(flags)


def _not_finite(sums: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(sums).logical_not_()


_ONES: dict[torch.device, torch.Tensor] = {}


def _fused_flags(
    values: Sequence[torch.Tensor], batches: tuple[tuple[int, ...], ...]
) -> torch.Tensor:
    """Per batch, whether it holds a non-finite value: torch's fused check with a scale of 1."""
    device = values[batches[0][0]].device
    found = torch.zeros(len(batches), device=device)
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones(1, device=device)
    check = torch._amp_foreach_non_finite_check_and_unscale_
    if len(batches) == 1:  # the usual case on CUDA, and for small models
        tensors = [values[i] for i in batches[0]]
        if not any(map(_in_graph, tensors)):
            check(tensors, found, one)
            return found
    flags = found.split(1) if len(batches) > 1 else (found,)  # one call: views cost a microsecond
    for batch, flag in zip(batches, flags):
        tensors = [values[i] for i in batch]
        if any(map(_in_graph, tensors)):  # in an autograd graph: read, never write
            flag.copy_(_not_finite(torch.stack([t.sum() for t in tensors])).any())
        else:
            check(tensors, flag, one)
    return found  # 0 or 1 per batch


_in_graph = attrgetter("requires_grad")


def _flagged_members(values: Sequence[torch.Tensor], batches: list[_Piece]) -> list[_Piece]:
    """The tensors of flagged batches that hold a non-finite value: the fused check again,
    on batches of at most ``BATCH`` tensors, then per tensor, one read-out per level
    (cheaper than counting every tensor of a batch)."""
    found: list[_Piece] = []
    while batches:
        by_device: dict[torch.device, list[tuple[int, ...]]] = defaultdict(list)
        for piece in batches:
            members = piece.members
            size = BATCH if len(members) > BATCH else 1
            by_device[values[piece.index].device] += [
                members[k : k + size] for k in range(0, len(members), size)
            ]
        split = [part for parts in by_device.values() for part in parts]
        flags = _on_one_device([_fused_flags(values, tuple(parts)) for parts in by_device.values()])
        flagged = [part for part, bad in zip(split, flags.tolist()) if bad]
        found += [_Piece(part[0]) for part in flagged if len(part) == 1]
        batches = [_Piece(part[0], members=part) for part in flagged if len(part) > 1]
    return found


def nan_and_inf(part: torch.Tensor) -> torch.Tensor:
    """The NaN and ±Inf counts of ``part``, on its device, as a tensor of two integers.
    ``count_nonzero`` of one mask per kind: a mask's ``sum()`` costs several times as much
    on the CPU."""
    nan = torch.isnan(part).count_nonzero()
    if not part.is_complex():  # isinf is one kernel, isfinite several
        return torch.stack((nan, torch.isinf(part).count_nonzero()))
    # A complex element with a NaN part counts as NaN, else as Inf if a part
    # is infinite: non-finite minus NaN gives exactly that.
    nonfinite = part.numel() - torch.isfinite(part).count_nonzero()
    return torch.stack((nan, nonfinite - nan))


def _exact_piece(values: Sequence[torch.Tensor], piece: _Piece) -> list[tuple[int, torch.Tensor]]:
    tensor = values[piece.index]
    if piece.start == 0 and piece.stop is None and not piece.order and not piece.copy:
        return [(piece.index, nan_and_inf(tensor))]
    return [(piece.index, nan_and_inf(_flatten(tensor, piece)[piece.start : piece.stop]))]


def _meeting_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    """Where results of several devices meet: the first accelerator among them, else the CPU.
    Never the CPU when an accelerator is there: a copy to the CPU that does not block
    could be read before it lands, and one that blocks is a host sync."""
    return next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)


def _on_one_device(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-device results as one tensor on one device (see :func:`_meeting_device`), for one read-out."""
    target = _meeting_device(parts)
    gathered = [p if p.device == target else p.to(target, non_blocking=True) for p in parts]
    return gathered[0] if len(gathered) == 1 else torch.cat(gathered)


class _Plan:
    """The groups for one sequence of slots, and what its tensors looked like when made."""

    def __init__(self, values: Sequence[torch.Tensor], entries: list[_Entry]) -> None:
        self.groups = _assemble(entries)
        self.pieces = [piece for group in self.groups for piece in group.pieces]
        self.numels = [e.numel for e in entries]
        first, last = entries[0], entries[-1]
        self.ends = (len(values), first.device, first.dtype, last.device, last.dtype)
        self.uses = 0

    def fits(self, values: Sequence[torch.Tensor]) -> bool:
        # A model moved with .to() keeps its parameters but not their device or dtype:
        # check the ends every time, and every size now and then (a plan that does not
        # fit a resized tensor still counts all of it, or fails and is made anew).
        first, last = values[0], values[-1]
        if (len(values), first.device, first.dtype, last.device, last.dtype) != self.ends:
            return False
        self.uses += 1
        return bool(self.uses % VERIFY_EVERY) or self.numels == [v.numel() for v in values]


class Scanner:
    """Counts NaN and ±Inf elements exactly, reusing its plans while the tensors keep their layout.

    Args:
        cache_size: Assembled plans kept, one per distinct sequence of slots.
    """

    def __init__(self, cache_size: int = 8) -> None:
        self._entries: dict[Hashable, _Entry] = {}
        self._plans: dict[tuple[Hashable, ...], _Plan] = {}
        self._cache_size = cache_size
        self._kept_lengths: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def _plan(self, values: Sequence[torch.Tensor], slots: Sequence[Hashable] | None) -> _Plan:
        if slots is None:
            return _Plan(values, [_entry(v) for v in values])
        key = tuple(slots)
        plan = self._plans.get(key)
        if plan is not None and plan.fits(values):
            return plan
        entries = []
        for slot, value in zip(slots, values):
            entry = self._entries.get(slot)
            if entry is None or plan is not None:  # no entry yet, or the old plan did not fit
                entry = self._entries[slot] = _entry(value)
            entries.append(entry)
        plan = _Plan(values, entries)
        if self._cache_size:
            if len(self._plans) >= self._cache_size and key not in self._plans:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan

    def _flag_parts(
        self, values: Sequence[torch.Tensor], slots: Sequence[Hashable] | None
    ) -> tuple[_Plan, list[torch.Tensor]]:
        """Phase 1 on the device: the plan, and its flags per group."""
        plan = self._plan(values, slots)
        try:
            return plan, [_flags(values, group) for group in plan.groups]
        except RuntimeError:
            if slots is None:
                raise
            # A tensor changed its size or layout since planning: plan it anew, once.
            for slot in slots:
                self._entries.pop(slot, None)
            self._plans.pop(tuple(slots), None)
            plan = self._plan(values, slots)
            return plan, [_flags(values, group) for group in plan.groups]

    def launch(
        self,
        values: Sequence[torch.Tensor],
        slots: Sequence[Hashable] | None = None,
        norms: torch.Tensor | Sequence[torch.Tensor] | None = None,
        also: Sequence[torch.Tensor] = (),
    ) -> Launched:
        """Phase 1, queued on the device with no host read: see :meth:`count` for the
        arguments. ``also``: 1-D tensors read to the host with the flags, at the end of
        :attr:`Launched.result`, in the dtype they and the flags promote to (float32 at
        least: give counts as float64 to read them exactly). Read the result to the host
        (:meth:`read`), then call :meth:`finish` (both under ``torch.no_grad()``, as
        :meth:`count` runs them)."""
        timed = values[0].device.type == "cuda"
        if timed:  # gradtel's own kernels, apart from the work queued before them
            stream = torch.cuda.current_stream(values[0].device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
        if norms is None:
            plan, parts = self._flag_parts(values, slots)
            pieces = plan.pieces
            flags = _on_one_device(parts)
        else:  # the norms themselves: one per tensor, not finite where it holds a NaN or Inf
            flags, pieces = stacked(norms), None
        result = _on_one_device([flags, *also]) if also else flags  # cat() promotes the dtypes
        if timed:
            end.record(stream)
        return Launched(
            pieces, result, sum(t.numel() for t in also), (start, end) if timed else None
        )

    def launch_exact(
        self, values: Sequence[torch.Tensor], also: Sequence[torch.Tensor] = ()
    ) -> Launched:
        """Exact counts of every tensor, queued on the device with no host read: for a
        read-out that comes later, when the gradients may have been rewritten (clipped,
        zeroed) since. About three passes over gradient memory instead of one."""
        counts, positions = self._exact_counts(values)
        result = _on_one_device([counts.double().reshape(-1), *also])
        return Launched(None, result, sum(t.numel() for t in also), exact=positions)

    def _exact_counts(self, values: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``(nan, inf)`` rows for ``values`` and the position of each row's tensor: small
        tensors of one device and dtype share a few launches (one copy, then segment sums),
        large ones are counted one by one, with no copy."""
        parts: list[torch.Tensor] = []
        positions: list[int] = []
        groups = _group_tensors_by_device_and_dtype([list(values)], with_indices=True)
        for [group], indices in groups.values():
            tensors = [t for t in group if t is not None]  # gradients: none is None
            small = [(i, t) for i, t in zip(indices, tensors) if t.numel() < CHUNK]
            for i, t in zip(indices, tensors):
                if t.numel() >= CHUNK:
                    parts.append(nan_and_inf(t).reshape(1, 2))
                    positions.append(i)
            if small:
                flat = torch.cat([t.reshape(-1) for _, t in small])
                lengths = self._lengths(tuple(t.numel() for _, t in small), flat.device)
                # Exact in float32: a segment holds fewer than CHUNK elements.
                pair = torch.stack(
                    (torch.isnan(flat), torch.isfinite(flat).logical_not_()), 1
                ).float()
                # unsafe: no check of the lengths, which would read them to the host (a sync).
                sums = torch.segment_reduce(pair, "sum", lengths=lengths, unsafe=True)
                parts.append(
                    sums - torch.nn.functional.pad(sums[:, :1], (1, 0))
                )  # Inf: non-finite - NaN
                positions += [i for i, _ in small]
        return _on_one_device(parts), tuple(positions)

    def _lengths(self, numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``numels`` as a tensor on ``device``, kept: no host-to-device copy per update."""
        key = (numels, device)
        found = self._kept_lengths.get(key)
        if found is None:
            if len(self._kept_lengths) >= max(1, self._cache_size):
                self._kept_lengths.pop(next(iter(self._kept_lengths)))
            found = self._kept_lengths[key] = torch.tensor(numels, device=device)
        return found

    def read(self, launched: Launched) -> tuple[list[Any], float]:
        """The blocking read-out of ``launched``, and the seconds it waited for the device
        work queued before it (an asynchronous backward pass), which is not gradtel's own."""
        began = time.perf_counter()
        read = launched.result.tolist()
        waited = 0.0
        if launched.events is not None:
            start, end = launched.events
            waited = max(0.0, time.perf_counter() - began - start.elapsed_time(end) / 1000)
        return read, waited

    def finish(
        self, values: Sequence[torch.Tensor], launched: Launched, read: Sequence[Any]
    ) -> dict[int, tuple[int, int]]:
        """Phase 2: exact counts of the pieces that ``read`` (the host copy of
        ``launched.result``) flags. The ``also`` values are ``read[-launched.also:]``."""
        if launched.exact is not None:
            pairs = read[: 2 * len(launched.exact)]
            return {
                i: (int(pairs[2 * k]), int(pairs[2 * k + 1]))
                for k, i in enumerate(launched.exact)
                if pairs[2 * k] or pairs[2 * k + 1]
            }
        pieces = launched.pieces
        flagged = [pieces[k] if pieces is not None else _Piece(k) for k in launched.flagged(read)]
        if not flagged:
            return {}
        batches = [piece for piece in flagged if piece.members]
        if batches:
            flagged = [piece for piece in flagged if not piece.members] + _flagged_members(
                values, batches
            )
            if not flagged:
                return {}
        # Exact counts of the flagged pieces, grouped by device, one read-out.
        on_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for piece in flagged:
            on_device[values[piece.index].device] += _exact_piece(values, piece)
        ordered = [index for members in on_device.values() for index, _ in members]
        counts = _on_one_device(
            [torch.stack([count for _, count in members]) for members in on_device.values()]
        ).tolist()
        result: dict[int, tuple[int, int]] = {}
        for index, (nan, inf) in zip(ordered, counts):
            if nan or inf:
                old_nan, old_inf = result.get(index, (0, 0))
                result[index] = (old_nan + nan, old_inf + inf)
        return result

    @torch.no_grad()
    def count(
        self,
        values: Sequence[torch.Tensor],
        slots: Sequence[Hashable] | None = None,
        norms: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> dict[int, tuple[int, int]]:
        """``{position: (nan, inf)}`` for each tensor holding a non-finite element.

        Args:
            values: Dense floating or complex tensors (see :func:`countable_values`).
            slots: One key per tensor that stays with it from update to update
                (gradtel uses the parameter's position): plans are kept per
                slot and reused. ``None`` plans anew.
            norms: One norm per tensor already computed elsewhere (gradient
                clipping computes them), as a list or stacked in a 1-D tensor:
                phase 1 then reads no gradient memory.
        """
        if not values:
            return {}
        launched = self.launch(values, slots, norms)
        return self.finish(values, launched, self.read(launched)[0])


@dataclass(frozen=True)
class Launched:
    """Phase 1 of one count, queued on the device."""

    pieces: list[_Piece] | None
    """What each flag stands for; None: the flags are norms, one per tensor."""
    result: torch.Tensor
    """The flags (non-zero: flagged) or norms (not finite: flagged), then the ``also``
    values, in one tensor on one device."""
    also: int
    """How many values at the end of :attr:`result` are ``also``."""
    events: tuple[Any, Any] | None = None
    """CUDA events around gradtel's own kernels."""
    exact: tuple[int, ...] | None = None
    """When :attr:`result` holds exact ``(nan, inf)`` counts instead of flags: the position
    of the tensor of each pair (see :meth:`Scanner.launch_exact`)."""

    def flagged(self, read: Sequence[Any]) -> list[int]:
        """The positions of the flags that ``read`` (the host copy of :attr:`result`) raises."""
        if self.exact is not None:
            pairs = read[: 2 * len(self.exact)]
            return [k for k in range(len(self.exact)) if pairs[2 * k] or pairs[2 * k + 1]]
        flags = read[: len(read) - self.also]
        if self.pieces is None:  # a sum of finite norms can overflow: then look at each
            return (
                []
                if math.isfinite(sum(flags))
                else [k for k, n in enumerate(flags) if not math.isfinite(n)]
            )
        return [k for k, flag in enumerate(flags) if flag] if any(flags) else []


def per_tensor_norms(
    grads: Sequence[torch.Tensor], norm_type: float = 2.0, foreach: bool | None = None
) -> list[torch.Tensor]:
    """One norm per tensor, in order, with a multi-tensor norm per device and dtype."""
    if foreach is False:
        return [torch.linalg.vector_norm(g, norm_type) for g in grads]
    # The grouping torch.nn.utils.clip_grad_norm_ itself uses (C++, no Python loop).
    groups = _group_tensors_by_device_and_dtype([list(grads)], with_indices=True)
    if len(groups) == 1:  # one device and dtype, the usual case: the norms come in order
        [([tensors], _)] = groups.values()
        return list(torch._foreach_norm(tensors, norm_type))  # type: ignore[arg-type]
    norms: list[torch.Tensor] = [torch.empty(0)] * len(grads)
    for [tensors], indices in groups.values():
        for i, norm in zip(indices, torch._foreach_norm(tensors, norm_type)):  # type: ignore[arg-type]
            norms[i] = norm
    return norms


def stacked(norms: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor norms as one tensor on one device (see :func:`_meeting_device`; no host read)."""
    if isinstance(norms, torch.Tensor):
        return norms
    try:
        return torch.stack(list(norms))  # all on one device, the usual case: no look at each
    except RuntimeError:  # on several devices
        device = _meeting_device(norms)
        return torch.stack([n if n.device == device else n.to(device) for n in norms])


def total_norm(norms: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of tensors whose L2 norms are ``norms``, as a float64 tensor on the
    device :func:`stacked` puts them on (no host read)."""
    total: torch.Tensor = torch.linalg.vector_norm(stacked(norms).double())
    return total


def count_nonfinite(values: Sequence[torch.Tensor]) -> dict[int, tuple[int, int]]:
    """Count NaN and ±Inf elements exactly in each tensor.

    Args:
        values: Dense floating or complex tensors (see :func:`countable_values`),
            on any mix of devices and dtypes.

    Returns:
        ``{position: (nan, inf)}`` for every tensor holding at least one
        non-finite element; empty when all are finite.

    >>> import torch
    >>> count_nonfinite([torch.ones(3), torch.tensor([float("nan"), float("inf"), 1.0])])
    {1: (1, 1)}
    """
    return Scanner(cache_size=0).count(values)
