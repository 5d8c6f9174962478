"""Device-side counting of NaN and ±Inf values in gradients.

The scan runs in two phases so that the common, healthy update costs about
one read of gradient memory and one host read-out:

1. *Flag.* One reduction per gradient (a sum, accumulated in at least fp32)
   whose result is non-finite whenever the gradient holds a NaN or an Inf.
   The per-gradient results are stacked and checked on the device, then read
   to the host in a single transfer. A healthy update stops here.
2. *Count.* Only the flagged gradients are counted exactly (int64 counts, so
   a 38M-element embedding is counted right), again read out in one transfer.
   A flag can be a false alarm (finite values whose sum overflows); the
   exact count then comes back as zero, so results are always exact.

Neither phase ever synchronises per gradient or per layer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["countable_values", "count_nonfinite"]

_SPARSE_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)
# Half-width dtypes are summed in fp32: an fp16 sum of healthy values overflows
# at 65504, which would turn every healthy update into a slow false alarm.
_WIDE_SUM = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


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


def _flag_sum(values: torch.Tensor) -> torch.Tensor:
    wide = _WIDE_SUM.get(values.dtype)
    return values.sum(dtype=wide) if wide is not None else values.sum()


def _exact_counts(values: torch.Tensor) -> torch.Tensor:
    nan = torch.isnan(values).count_nonzero()
    # A complex element with a NaN part counts as NaN, else as Inf if a part
    # is infinite: non-finite minus NaN gives exactly that for every dtype.
    nonfinite = values.numel() - torch.isfinite(values).count_nonzero()
    return torch.stack((nan, nonfinite - nan))


def _read_out(
    values: Sequence[torch.Tensor],
    indices: Sequence[int],
    reduce: Callable[[torch.Tensor], torch.Tensor],
    finish: Callable[[torch.Tensor], torch.Tensor],
) -> list[Any]:
    """Apply ``reduce`` to each tensor, grouped by device and dtype, and read all results once.

    Each group's results are stacked and passed through ``finish`` on their
    device; the groups are then gathered onto one device so that the host
    read-out is a single transfer however many devices and dtypes there are.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i in indices:
        groups[(values[i].device, values[i].dtype)].append(i)
    order: list[int] = []
    parts: list[torch.Tensor] = []
    target = None
    for members in groups.values():
        part = finish(torch.stack([reduce(values[i]) for i in members]))
        target = part.device if target is None else target
        parts.append(part.to(target, non_blocking=True))
        order.extend(members)
    if not parts:
        return []
    # The one device -> host read-out of this phase.
    host = torch.cat(parts).tolist()
    by_index = dict(zip(order, host))
    return [by_index[i] for i in indices]


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
    everything = range(len(values))
    finite = _read_out(values, everything, _flag_sum, torch.isfinite)
    flagged = [i for i, ok in zip(everything, finite) if not ok]
    if not flagged:
        return {}
    counts = _read_out(values, flagged, _exact_counts, lambda stacked: stacked)
    return {i: (nan, inf) for i, (nan, inf) in zip(flagged, counts) if nan or inf}
