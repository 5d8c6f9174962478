"""Device-side counting of NaN and ±Inf values in gradients.

The scan runs in two phases so that the common, healthy update costs about
one read of gradient memory and one host read-out:

1. *Flag.* A sum, whose result is non-finite whenever its input holds a NaN
   or an Inf: one per small tensor, one per chunk of ``CHUNK`` elements of
   each large tensor (as fast as one sum over the tensor, and it tells where
   the bad values are), and for tiny 1-D tensors (biases, norm weights) one
   concatenation and one segmented sum, since a call per tensor would cost
   more than the arithmetic. Sums, not norms: squaring makes subnormal
   gradients, common deep in a network, several times slower on CPUs. The
   results are checked on the device and read to the host in one transfer,
   grouped by device and dtype. A healthy update stops here.
2. *Count.* Only flagged pieces (a small tensor, or one chunk of a large
   one) are counted exactly, into int64 (a 38M-element embedding is counted
   right), and read out in one more transfer. A flag can be a false alarm
   (finite values whose sum overflows): the exact count is then zero, so
   results are always exact.

When the caller already has one norm per gradient (gradient clipping
computes them), phase 1 uses those instead of reading gradient memory again.

Neither phase ever synchronises per tensor or per layer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CHUNK", "Scanner", "count_nonfinite", "countable_values"]

CHUNK = 1 << 16
"""Elements per chunk of a large tensor; tensors smaller than this are flagged whole."""

TINY = 4096
"""1-D tensors up to this size are summed together in one segmented sum."""

_SPARSE_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def countable_values(grad: torch.Tensor) -> torch.Tensor | None:
    """Return the dense tensor whose elements are counted for ``grad``.

    Sparse gradients count their stored values; dtypes that torch cannot
    reduce directly (float8, complex32) are widened. Returns None for a kind
    of tensor gradtel cannot count.
    """
    if grad.layout is torch.strided:
        values = grad
    elif grad.layout is torch.sparse_coo:
        values = grad._values()
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


@dataclass(frozen=True)
class _Piece:
    """What one flag stands for: elements ``start:stop`` of tensor ``index`` (all when stop is None)."""

    index: int
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class _Group:
    """Tensors of one device and dtype, and the order their flags come in."""

    tiny: tuple[int, ...]  # flagged whole, summed together
    tiny_lengths: torch.Tensor | None
    small: tuple[int, ...]  # flagged whole
    large: tuple[tuple[int, int, int], ...]  # (index, full chunks, remainder)
    pieces: tuple[_Piece, ...]


def _is_tiny(v: torch.Tensor) -> bool:
    # segment_reduce has no complex kernels.
    return v.dim() == 1 and 0 < v.numel() <= TINY and not v.is_complex()


def _plan(values: Sequence[torch.Tensor]) -> list[_Group]:
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        by_kind[(v.device, v.dtype)].append(i)
    groups = []
    for (device, _), members in by_kind.items():
        tiny = tuple(i for i in members if _is_tiny(values[i]))
        lengths = torch.tensor([values[i].numel() for i in tiny], device=device) if tiny else None
        small = tuple(i for i in members if values[i].numel() < CHUNK and i not in tiny)
        pieces = [_Piece(i) for i in tiny + small]
        large = []
        for i in members:
            numel = values[i].numel()
            if numel < CHUNK:
                continue
            chunks, rest = divmod(numel, CHUNK)
            large.append((i, chunks, rest))
            pieces += [_Piece(i, c * CHUNK, (c + 1) * CHUNK) for c in range(chunks)]
            if rest:
                pieces.append(_Piece(i, chunks * CHUNK, numel))
        groups.append(_Group(tiny, lengths, small, tuple(large), tuple(pieces)))
    return groups


def _flags(values: Sequence[torch.Tensor], group: _Group) -> torch.Tensor:
    """Per piece of ``group``: True where it holds (or, rarely, seems to hold) a non-finite value."""
    # Sums keep the input dtype: asking torch for a wider one is 25x slower on CPU
    # for half types. An fp16 sum can overflow on healthy values: a false alarm
    # that phase 2 resolves by counting, never a wrong count.
    parts = []
    if group.tiny_lengths is not None:
        joined = torch.cat([values[i] for i in group.tiny])
        parts.append(torch.segment_reduce(joined, "sum", lengths=group.tiny_lengths))
    if group.small:
        parts.append(torch.stack([values[i].sum() for i in group.small]))
    for i, chunks, rest in group.large:
        tensor = values[i]
        if not rest and tensor.is_contiguous():  # the usual case: one view, one sum
            parts.append(tensor.view(chunks, CHUNK).sum(1))
            continue
        # reshape is a view for contiguous gradients, a copy otherwise.
        flat = tensor.reshape(-1)
        parts.append(flat[: chunks * CHUNK].view(chunks, CHUNK).sum(1))
        if rest:
            parts.append(flat[chunks * CHUNK :].sum().reshape(1))
    summary = parts[0] if len(parts) == 1 else torch.cat(parts)
    return torch.isfinite(summary).logical_not_()


def _exact(values: Sequence[torch.Tensor], piece: _Piece) -> torch.Tensor:
    tensor = values[piece.index]
    part = tensor if piece.stop is None else tensor.reshape(-1)[piece.start : piece.stop]
    nan = torch.isnan(part).count_nonzero()
    # A complex element with a NaN part counts as NaN, else as Inf if a part
    # is infinite: non-finite minus NaN gives exactly that for every dtype.
    nonfinite = part.numel() - torch.isfinite(part).count_nonzero()
    return torch.stack((nan, nonfinite - nan))


def _to_host(parts: list[torch.Tensor]) -> list[Any]:
    """Gather per-device results onto one device and read them to the host in one transfer."""
    target = parts[0].device
    gathered = [p if p.device == target else p.to(target, non_blocking=True) for p in parts]
    return (gathered[0] if len(gathered) == 1 else torch.cat(gathered)).tolist()


class Scanner:
    """Counts NaN and ±Inf elements exactly, reusing its plan while the tensors keep their layout.

    Args:
        cache_size: Plans kept, keyed by the caller's ``key`` (gradtel uses
            the set of parameters that have a gradient in the update).
    """

    def __init__(self, cache_size: int = 8) -> None:
        self._plans: dict[object, tuple[tuple[object, ...], list[_Group]]] = {}
        self._cache_size = cache_size

    def _flag_pieces(self, values: Sequence[torch.Tensor], key: object) -> list[_Piece]:
        """Phase 1: the pieces whose cheap reduction is not finite."""
        # A model moved with .to() after the plan was made keeps its parameters
        # but not their device or dtype: check the ends before reusing a plan.
        first, last = values[0], values[-1]
        signature = (len(values), first.device, first.dtype, last.device, last.dtype)
        cached = self._plans.get(key) if key is not None else None
        if cached is not None and cached[0] == signature:
            plan = cached[1]
        else:
            plan = _plan(values)
            if key is not None:
                if len(self._plans) >= self._cache_size and key not in self._plans:
                    self._plans.pop(next(iter(self._plans)))
                self._plans[key] = (signature, plan)
        flags = _to_host([_flags(values, group) for group in plan])
        pieces = [piece for group in plan for piece in group.pieces]
        return [piece for piece, bad in zip(pieces, flags) if bad]

    def count(
        self,
        values: Sequence[torch.Tensor],
        key: object = None,
        norms: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> dict[int, tuple[int, int]]:
        """``{position: (nan, inf)}`` for each tensor holding a non-finite element.

        Args:
            values: Dense floating or complex tensors (see :func:`countable_values`).
            key: Identifies the tensors' devices, dtypes and sizes; the plan
                made for a key is reused. ``None`` plans anew.
            norms: One norm per tensor already computed elsewhere (gradient
                clipping computes them), as a list or stacked in a 1-D tensor:
                phase 1 then reads no gradient memory.
        """
        if not values:
            return {}
        if norms is None:
            flagged = self._flag_pieces(values, key)
        else:
            flagged = _flag_by_norms(norms)
        if not flagged:
            return {}
        # Phase 2: exact counts of the flagged pieces, grouped by device, one read-out.
        on_device: dict[torch.device, list[_Piece]] = defaultdict(list)
        for piece in flagged:
            on_device[values[piece.index].device].append(piece)
        ordered = [piece for members in on_device.values() for piece in members]
        counts = _to_host(
            [torch.stack([_exact(values, p) for p in members]) for members in on_device.values()]
        )
        result: dict[int, tuple[int, int]] = {}
        for piece, (nan, inf) in zip(ordered, counts):
            if nan or inf:
                old_nan, old_inf = result.get(piece.index, (0, 0))
                result[piece.index] = (old_nan + nan, old_inf + inf)
        return result


def _flag_by_norms(norms: torch.Tensor | Sequence[torch.Tensor]) -> list[_Piece]:
    """Phase 1 from per-tensor norms: whole tensors whose norm is not finite."""
    if isinstance(norms, torch.Tensor) or len({norm.device for norm in norms}) == 1:
        stacked = norms if isinstance(norms, torch.Tensor) else torch.stack(list(norms))
        finite = torch.isfinite(stacked).tolist()
        return [_Piece(i) for i, ok in enumerate(finite) if not ok]
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, norm in enumerate(norms):
        by_device[norm.device].append(i)
    order = [i for members in by_device.values() for i in members]
    finite = _to_host(
        [torch.isfinite(torch.stack([norms[i] for i in m])) for m in by_device.values()]
    )
    return [_Piece(i) for i, ok in zip(order, finite) if not ok]


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
