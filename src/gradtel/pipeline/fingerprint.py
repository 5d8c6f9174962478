"""The replica fingerprint: an exact hash of the parameters' bits, equal on replicas that hold
the same values and different when one element differs by as little as one ulp.

Each tensor is reduced on its device to one word: the wrapping sum of its elements' bit
patterns, viewed as integers of their own width (``Tensor.view(torch.int32)`` for fp32),
summed at that width. One element whose bits change moves the sum by less than the
word's modulus, so the word always changes; folded to 52 bits for Prometheus, two
different states then share a fingerprint about once in 2^52. A sum does not see two
elements of one tensor swapping places. ``torch.hash_tensor`` (an xor of the bit
patterns, torch 2.9 and later) is as exact, but slower on CPU
(``benchmarks/bench_fingerprint.py``), and torch 2.6 lacks it: the sum is the one path on
every torch. The words are read to the host in one copy per device and dtype, and mixed
with an odd weight per tensor, so that two tensors swapping their values show too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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


def tensor_word(tensor: torch.Tensor) -> torch.Tensor:
    """The wrapping sum of ``tensor``'s bit patterns at their own width, on its device (no
    host read, no copy: a same-width dtype view of any strides)."""
    if tensor.is_complex():  # its real and imaginary parts, each at their own width
        tensor = torch.view_as_real(tensor)
    ints = _INTS[tensor.element_size()]
    return tensor.view(ints).sum(dtype=ints)


def fingerprint(tensors: Sequence[torch.Tensor]) -> int:
    """The fingerprint of ``tensors``, in their order: a ``FINGERPRINT_BITS``-bit integer.

    One device-to-host copy per device and dtype: call it only when the fingerprint is due.

    Args:
        tensors: The tensors, the same number, shapes, dtypes and order on every replica.

    >>> a = torch.ones(3)
    >>> fingerprint([a]) == fingerprint([a.clone()])
    True
    >>> fingerprint([a]) == fingerprint([torch.nextafter(a, a + 1)])
    False
    """
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[torch.Tensor]]] = {}
    with torch.no_grad():  # an integer view of a parameter may not require grad
        for index, tensor in enumerate(tensors):
            indices, words = groups.setdefault((tensor.device, tensor.dtype), ([], []))
            indices.append(index)
            words.append(tensor_word(tensor))
    mixed = 0
    for indices, words in groups.values():
        for index, value in zip(indices, torch.stack(words).tolist(), strict=True):
            # An odd weight is a bijection mod 2^64: a change of one word always shows.
            mixed += (value & _MASK64) * ((2 * index + 1) * _GOLDEN & _MASK64)
    mixed &= _MASK64
    return (mixed ^ (mixed >> FINGERPRINT_BITS)) & ((1 << FINGERPRINT_BITS) - 1)


def replica_check(model: torch.nn.Module | None, every: int | None) -> int | None:
    """Updates between two replica checks of ``model``, or None: the check runs where the
    replicas' parameters must hold the same bits, a ``DistributedDataParallel`` model (with
    any communication hook) that reduces over every rank of a group of two ranks or more. Elsewhere it is off,
    and says so once when the run is distributed."""
    if every is None or not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size() <= 1:
        return None
    if isinstance(model, DistributedDataParallel):
        replicas = dist.get_world_size(model.process_group)
        if replicas == dist.get_world_size():
            return every
        # The rules compare every rank of a run: ranks of other data-parallel groups (other
        # pipeline stages or tensor-parallel parts) hold other parameters.
        logger.info(
            "gradtel: replica check off: this DistributedDataParallel model reduces over %d of "
            "the %d ranks, and the rules compare every rank of the run as replicas",
            replicas,
            dist.get_world_size(),
        )
        return None
    logger.info(
        "gradtel: replica check off: it compares the parameters of DistributedDataParallel "
        "replicas, and this model is a %s (FSDP shards and model-parallel parts differ by "
        "design)",
        type(model).__name__,
    )
    return None
