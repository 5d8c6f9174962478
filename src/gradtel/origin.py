"""Which rank a NaN started on: each rank's own gradients, counted before the cross-rank reduction.

After DistributedDataParallel's all-reduce every rank holds the same gradients,
so a NaN that entered on one rank (one bad sample in its batch) shows on all of
them; FSDP's reduce-scatter spreads it the same way. torch's reduction hooks
see this rank's gradients just before they are reduced: gradtel counts their
NaN and ±Inf values there, on the device, and reads the counts to the host
with the update's own read-out.

- DDP: a communication hook (``register_comm_hook``).
- FSDP, the older wrapper (``FullyShardedDataParallel``): its communication
  hook, registered on the root before the first forward; not offered by torch
  for the hybrid sharding strategies.
- FSDP, ``fully_shard``: a custom reduce-scatter (``set_custom_reduce_scatter``)
  on each sharded module; it is not called in a one-rank group.
"""

# No `from __future__ import annotations`: DDP checks a hook's annotations as objects.
import logging
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import GradBucket
from torch.distributed.algorithms._comm_hooks import default_hooks as fsdp_hooks
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
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


def install_origin_hook(model: torch.nn.Module, monitor: Any) -> Optional[Callable[[], None]]:
    """Count ``model``'s own gradients before their reduction, if it is a DDP or FSDP model;
    logs why not when torch's hook is taken or unavailable. Returns what undoes it (None:
    nothing was installed)."""
    try:
        if isinstance(model, DistributedDataParallel):
            _install_ddp(model, monitor)
        elif isinstance(model, FullyShardedDataParallel):
            _install_fsdp_wrapper(model, monitor)
        elif any(isinstance(m, FSDPModule) for m in model.modules()):
            _install_fully_shard(model, monitor)
        return None
    except Exception as exc:  # noqa: BLE001 (telemetry never breaks training)
        logger.warning(
            "gradtel: cannot count each rank's own gradients before the reduction "
            "(the origin rank will not be known): %s: %s",
            type(exc).__name__,
            exc,
        )
        return None


def _install_ddp(ddp: DistributedDataParallel, monitor: Any) -> None:
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


def _install_fsdp_wrapper(fsdp: FullyShardedDataParallel, monitor: Any) -> None:
    """The older FSDP wrapper: one communication hook on the root serves every unit. Like
    DDP's, a hook the application registers later becomes the reduction behind the count."""
    counter: OriginCounter = monitor.origin
    group = fsdp.process_group or dist.group.WORLD
    reduction: list[Any] = [fsdp_hooks.DefaultState(group), None]  # type: ignore[arg-type]

    def gradtel_origin_hook(state: Any, grad: torch.Tensor, output: Optional[torch.Tensor] = None) -> Any:
        counter.add(grad)  # this rank's flat, unsharded gradient of one unit
        inner_state, inner = reduction
        if inner is not None:
            return inner(inner_state, grad) if output is None else inner(inner_state, grad, output)
        if output is None:  # NO_SHARD: an all-reduce
            return fsdp_hooks.allreduce_hook(inner_state, grad)
        return fsdp_hooks.reduce_scatter_hook(inner_state, grad, output)

    fsdp.register_comm_hook(None, gradtel_origin_hook)
    counter.installed = True

    def register_comm_hook(state: object, hook: Callable[..., Any]) -> None:
        reduction[:] = [state, hook]

    fsdp.register_comm_hook = register_comm_hook  # type: ignore[method-assign]


class _CountingReduceScatter(DefaultReduceScatter):
    """``fully_shard``'s reduce-scatter, counting this rank's gradients on the way in."""

    def __init__(self, counter: OriginCounter) -> None:
        super().__init__()
        self.counter = counter

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> dist.Work:
        self.counter.add(input_tensor)  # every rank's padded, unsharded gradients of one group
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def _install_fully_shard(model: torch.nn.Module, monitor: Any) -> None:
    """``fully_shard``: one counting reduce-scatter on each sharded module, unless the
    application set its own (torch has no way to wrap it)."""
    counter: OriginCounter = monitor.origin
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    groups = [m._get_fsdp_state()._fsdp_param_group for m in sharded]
    ours = (DefaultReduceScatter, _CountingReduceScatter)
    custom = [g for g in groups if g is not None and type(g._reduce_scatter_comm) not in ours]
    if custom:
        logger.warning(
            "gradtel: %d sharded modules already have a custom reduce-scatter (%s), so gradtel "
            "cannot count each rank's own gradients before the reduction",
            len(custom),
            type(custom[0]._reduce_scatter_comm).__name__,
        )
        return
    comm: ReduceScatter = _CountingReduceScatter(counter)
    for module in sharded:
        module.set_custom_reduce_scatter(comm)
    # One rank reduces nothing: torch then skips the reduce-scatter, and there is no origin to find.
    counter.installed = any(g is not None and getattr(g.mesh_info, "shard_mesh_size", 1) > 1 for g in groups)
