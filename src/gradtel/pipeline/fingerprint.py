"""The replica fingerprint: an exact hash of the parameters' bits, equal on replicas that hold
the same values and different when one element differs by as little as one ulp.

Each tensor is reduced on its device to one 64-bit word: ``torch.hash_tensor`` (an xor of
the elements' 64-bit patterns, torch 2.9 and later) or, on older torch, a wrapping int64
sum of the elements' bit patterns. Either changes when one element's bits change. The words
are read to the host in one copy per device and mixed with an odd weight per tensor, so
that two tensors swapping their values change the fingerprint too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["FINGERPRINT_BITS", "fingerprint", "replica_check", "tensor_word"]

logger = logging.getLogger("gradtel")

FINGERPRINT_BITS = 52
"""Bits of the fingerprint: a Prometheus sample is a float64, which holds 52-bit integers
exactly, so equal and unequal survive the scrape."""

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive indices apart
_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The elements' bit patterns, as integers of their size (no copy when contiguous)."""
    return tensor.reshape(-1).view(_INTS[tensor.element_size()])


def _summed_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The wrapping int64 sum of the elements' bit patterns (torch before 2.9)."""
    return _bits(tensor).sum(dtype=torch.int64)


def _hashed_bits(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.hash_tensor`` of the bit patterns (the xor of each widened to 64 bits, which
    keeps them apart), as an int64: integers, so that every dtype is hashed alike."""
    return torch.hash_tensor(_bits(tensor)).view(torch.int64)


tensor_word: Callable[[torch.Tensor], torch.Tensor] = (
    _hashed_bits if hasattr(torch, "hash_tensor") else _summed_bits
)
"""One tensor's 64-bit word, on its device (no host read)."""


def fingerprint(
    tensors: Sequence[torch.Tensor],
    word: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """The fingerprint of ``tensors``, in their order: a ``FINGERPRINT_BITS``-bit integer.

    One device-to-host copy per device the tensors are on: call it only when the
    fingerprint is due.

    Args:
        tensors: The tensors, the same number, shapes, dtypes and order on every replica.
        word: How one tensor is reduced (default :data:`tensor_word`).

    >>> a = torch.ones(3)
    >>> fingerprint([a]) == fingerprint([a.clone()])
    True
    >>> fingerprint([a]) == fingerprint([torch.nextafter(a, a + 1)])
    False
    """
    reduce = word or tensor_word
    by_device: dict[torch.device, tuple[list[int], list[torch.Tensor]]] = {}
    for index, tensor in enumerate(tensors):
        indices, words = by_device.setdefault(tensor.device, ([], []))
        indices.append(index)
        words.append(reduce(tensor.detach()))
    mixed = 0
    for indices, words in by_device.values():
        for index, value in zip(indices, torch.stack(words).tolist(), strict=True):
            # An odd weight is a bijection mod 2^64: a change of one word always shows.
            mixed += (value & _MASK64) * ((2 * index + 1) * _GOLDEN & _MASK64)
    mixed &= _MASK64
    return (mixed ^ (mixed >> FINGERPRINT_BITS)) & ((1 << FINGERPRINT_BITS) - 1)


def replica_check(model: torch.nn.Module | None, every: int | None) -> int | None:
    """Updates between two replica checks of ``model``, or None: the check runs where the
    replicas' parameters must hold the same bits, a ``DistributedDataParallel`` model (with
    any communication hook) in a process group of two ranks or more. Elsewhere it is off,
    and says so once when the run is distributed."""
    if every is None or not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size() <= 1:
        return None
    if isinstance(model, DistributedDataParallel):
        return every
    logger.info(
        "gradtel: replica check off: it compares the parameters of DistributedDataParallel "
        "replicas, and this model is a %s (FSDP shards and model-parallel parts differ by "
        "design)",
        type(model).__name__,
    )
    return None
