"""Which rank a NaN started on: each rank's own gradients, counted before the cross-rank reduction.

After DistributedDataParallel's all-reduce every rank holds the same gradients,
so a NaN that entered on one rank (one bad sample in its batch) shows on all of
them. A DDP communication hook sees each bucket of this rank's gradients just
before it is reduced: gradtel counts its NaN and ±Inf values there, on the
device, and reads the counts to the host with the update's own read-out.
"""

# No `from __future__ import annotations`: DDP checks a hook's annotations as objects.
import logging
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch._C._distributed_c10d import GradBucket
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

__all__ = ["CommHook", "OriginCounter", "ddp_comm_hook", "install_origin_hook"]

logger = logging.getLogger("gradtel")

CommHook = Callable[[Any, GradBucket], torch.futures.Future[torch.Tensor]]


class OriginCounter:
    """NaN and ±Inf counts of this rank's own gradients in the current update, on the device."""

    def __init__(self) -> None:
        self._counts: Optional[torch.Tensor] = None
        self.installed = False
        """Whether a hook feeds this counter (otherwise there are no local counts to report)."""

    @torch.no_grad()
    def add(self, grads: torch.Tensor) -> None:
        """Count the non-finite values of one bucket (no host sync)."""
        nan = torch.isnan(grads).sum()
        nonfinite = grads.numel() - torch.isfinite(grads).sum()
        pair = torch.stack((nan, nonfinite - nan))
        self._counts = pair if self._counts is None else self._counts + pair.to(self._counts.device)

    def take(self) -> Optional[torch.Tensor]:
        """The counts since the last take, as a 2-element int64 tensor, or None when none came."""
        counts, self._counts = self._counts, None
        return counts


def ddp_comm_hook(monitor: Any, inner: Optional[CommHook] = None) -> CommHook:
    """A DDP communication hook that counts this rank's gradients, then reduces them.

    Register it instead of your own hook to keep origin-rank counting::

        ddp.register_comm_hook(process_group, gradtel.ddp_comm_hook(monitor, inner=fp16_compress_hook))

    Args:
        monitor: The :class:`~gradtel.GradMonitor` whose updates the counts join.
        inner: The hook that does the reduction (for example an fp16/bf16
            compression hook); default: DDP's plain all-reduce.

    Returns:
        A hook for ``DistributedDataParallel.register_comm_hook``; the state
        registered with it is passed on to ``inner``.
    """
    counter: OriginCounter = monitor.origin
    counter.installed = True
    reduce = allreduce_hook if inner is None else inner

    def gradtel_origin_hook(state: Any, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
        counter.add(bucket.buffer())  # before the reduction mixes every rank's values
        return reduce(state, bucket)

    return gradtel_origin_hook


def install_origin_hook(ddp: DistributedDataParallel, monitor: Any) -> None:
    """Register gradtel's hook on ``ddp``; a hook the application registers later becomes
    the reduction behind gradtel's count (DDP itself accepts only one hook)."""
    if ddp._comm_hooks:
        logger.warning(
            "gradtel: this DDP model already has a communication hook, so gradtel cannot count "
            "each rank's own gradients; register gradtel.ddp_comm_hook(monitor, inner=your_hook) "
            "instead of your hook"
        )
        return
    reduction: list[Any] = [None, allreduce_hook]  # the state and hook that reduce

    def reduce(state: Any, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
        return reduction[1](reduction[0], bucket)  # type: ignore[no-any-return]

    ddp.register_comm_hook(None, ddp_comm_hook(monitor, inner=reduce))

    def register_comm_hook(state: object, hook: CommHook) -> None:
        reduction[:] = [state, hook]

    ddp.register_comm_hook = register_comm_hook  # type: ignore[method-assign]
