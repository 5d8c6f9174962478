"""Which rank a NaN started on: each rank's own gradients, counted before the cross-rank reduction.

After DistributedDataParallel's all-reduce every rank holds the same gradients,
so a NaN that entered on one rank (one bad sample in its batch) shows on all of
them; FSDP's reduce-scatter spreads it the same way. torch's reduction hooks
see this rank's gradients just before they are reduced. gradtel takes their L2
norm there, on the device (``gradtel_local_grad_norm``, which the ranks compare to
find one whose GPU bends values without making them NaN), and reads it to the host
with the update's own read-out. Its square, the sum of the bucket's squares, is also
the bucket's flag: it is finite only when every value is, and only a bucket it flags
has its NaN and ±Inf values counted (on an accelerator every bucket is, as reading the
flag there would wait for the device).

The local norm of an update is the root of the sum, over the update's reductions,
of the squared norms of what this rank handed to them. With ``no_sync()`` (or one
backward pass per update) that is exactly the norm of this rank's accumulated
gradients. Reducing every micro-batch instead, a later micro-batch's bucket holds
the earlier reductions' values (every rank's) plus its own, which would hide one
rank among the others: only each bucket's first reduction in the update counts, the
norm of this rank's own first micro-batch. ``fully_shard``
hands its reduce-scatter gradients torch may have divided already by a factor
common to every rank.

- DDP: a communication hook (``register_comm_hook``).
- FSDP, the older wrapper (``FullyShardedDataParallel``): its communication
  hook, registered on the root before the first forward; not offered by torch
  for the hybrid sharding strategies.
- FSDP, ``fully_shard``: a counting wrapper around each sharded module's
  reduce-scatter, kept around whatever reduce-scatter the application sets
  later; it is not called in a one-rank group.

Gradient accumulation without ``no_sync()``: DDP (and the FSDP wrapper without
sharding) reduce every micro-batch, and the next micro-batch's gradients add
onto the reduced values, so a NaN that one rank reduced in micro-batch 1 is in
every rank's bucket in micro-batch 2. The hook keeps, per bucket, a device flag
"the reduction left it non-finite", and a later micro-batch of the same update
does not count that bucket again. The sharded flavours reduce only the current
backward's own gradients.

DDP and FSDP keep a communication hook for good: gradtel's hook stays on the
model and feeds the counters of the monitors that watch it now. ``close()``
detaches a monitor (the hook then only reduces), and a new monitor on the same
model attaches to the same hook.
"""

# No `from __future__ import annotations`: DDP checks a hook's annotations as objects.
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import GradBucket
from torch.distributed.algorithms._comm_hooks import default_hooks as fsdp_hooks
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from .._imported import imported
from .._ratelimit import RateLimitedLog
from ..pipeline.scan import nan_and_inf

if TYPE_CHECKING:  # imported where the application uses them: see gradtel._imported
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

__all__ = ["CommHook", "OriginCounter", "ddp_comm_hook", "install_origin_hook"]

logger = logging.getLogger("gradtel")
_errors = RateLimitedLog(logger)

CommHook = Callable[[Any, GradBucket], torch.futures.Future[torch.Tensor]]
Undo = Callable[[], None]

_FEED = "_gradtel_origin"
"""The attribute that marks a model or hook carrying gradtel's hook: the hook's :class:`_Feed`."""

# Methods by which torch or the application replace a sharded module's reduce-scatter.
_REDUCE_SCATTER_SETTERS = (
    "set_custom_reduce_scatter",
    "set_allocate_memory_from_process_group_for_comm",
    "set_symm_mem_for_comm",
)


class OriginCounter:
    """NaN and ±Inf counts, and the squared L2 norm, of this rank's own gradients in the
    current update, on the device."""

    def __init__(self) -> None:
        self._values: torch.Tensor | None = None
        self._spread: dict[Hashable, torch.Tensor] = {}
        """Per bucket key: whether a reduction earlier in this update left it non-finite."""
        self.installed = False
        """Whether a hook feeds this counter (otherwise there are no local counts to report)."""

    @torch.no_grad()
    def add(self, grads: torch.Tensor, keys: Sequence[Hashable] = ()) -> None:
        """Count the non-finite values of one bucket and sum its squares (no host sync);
        ``keys`` name the gradients it holds, for :meth:`reduced`."""
        if grads.element_size() == 1 and grads.is_floating_point():
            grads = grads.float()  # float8: torch neither norms nor counts it as it is
        squares, counts = _squares_and_counts(grads)
        spread = self._spread_over(keys)
        if spread is not None:
            # Accumulated onto values reduced earlier in this update: every rank's values are
            # in it, so neither its NaN (another rank's) nor its norm is this rank's own.
            counts = counts.masked_fill(spread, 0)
            squares = counts.new_zeros(1)
        values = torch.cat((counts, squares))
        self._values = (
            values if self._values is None else self._values + values.to(self._values.device)
        )

    def reduced(self, keys: Sequence[Hashable], nonfinite: torch.Tensor) -> None:
        """Whether the reduction of ``keys``' gradients left them non-finite (a device flag):
        later micro-batches of this update accumulate onto those reduced values."""
        for key in keys:
            self._spread[key] = nonfinite

    def _spread_over(self, keys: Sequence[Hashable]) -> torch.Tensor | None:
        flags = {id(f): f for f in map(self._spread.get, keys) if f is not None}
        if len(flags) <= 1:
            return next(iter(flags.values()), None)
        return torch.stack(list(flags.values())).any()  # DDP regrouped its buckets since

    def take(self, update_ends: bool = True) -> torch.Tensor | None:
        """What came since the last take, as a float64 tensor (NaN count, Inf count, sum of
        squares), or None when nothing came.

        Args:
            update_ends: Whether the update ends here (its gradients are not accumulated
                onto any more); False between the backward passes of one update.
        """
        values, self._values = self._values, None
        if update_ends:
            self._spread = {}
        return values


SQUARES_CHUNK = 1 << 20
"""Values per ``torch.dot`` of :func:`sum_of_squares`: each adds in float32, so the
chunks' sums are added in float64 (and a CUDA ``dot`` takes at most 2^31 - 1 values)."""


def sum_of_squares(grads: torch.Tensor) -> torch.Tensor:
    """The sum of the squares of ``grads``' values, as a float64 scalar on their device.

    ``torch.dot`` over chunks of ``SQUARES_CHUNK`` values for float32 and float64: on a
    CPU it costs half of ``vector_norm``, and with the chunks' sums added in float64 it
    stays within 1e-4 of a float64 sum on any bucket, where ``vector_norm`` drifts by
    percents on large ones. Other dtypes accumulate in at least float32 (a bf16 bucket's
    own precision would lose the digits)."""
    if grads.dtype in (torch.float32, torch.float64) and grads.is_contiguous():
        flat = grads.view(-1)
        if flat.numel() <= SQUARES_CHUNK:
            squares: torch.Tensor = torch.dot(flat, flat)
            return squares.double()
        return torch.stack([torch.dot(part, part) for part in flat.split(SQUARES_CHUNK)]).sum(
            dtype=torch.float64
        )
    norm: torch.Tensor = torch.linalg.vector_norm(
        grads, dtype=torch.promote_types(grads.dtype, torch.float32)
    )
    return norm.double().square()


def _squares_and_counts(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of ``grads``' squares and their NaN and ±Inf counts, as float64 tensors of
    one and two elements. The counts do not read ``grads`` again when the sum is finite:
    it is finite only when every value is. That is known on the host only without
    waiting for a device, so only a CPU bucket is spared the second read; there, finite
    values whose squares overflowed are summed again in float64 (on a GPU the sum stays
    infinite, and ``gradtel_local_grad_norm`` keeps its last finite value)."""
    squares = sum_of_squares(grads).reshape(1)
    if grads.device.type != "cpu":
        return squares, nan_and_inf(grads).double()
    if bool(torch.isfinite(squares)):
        return squares, torch.zeros(2, dtype=torch.float64)
    counts = nan_and_inf(grads).double()
    if not counts.any():
        wide = torch.promote_types(grads.dtype, torch.float64)
        norm: torch.Tensor = torch.linalg.vector_norm(grads, dtype=wide)
        squares = norm.double().square().reshape(1)
    return squares, counts


class _Feed:
    """What gradtel's hook on one model feeds: the counters of the monitors watching it now."""

    def __init__(self) -> None:
        self.counters: list[OriginCounter] = []

    def attach(self, counter: OriginCounter) -> Undo:
        self.counters = [*self.counters, counter]
        counter.installed = True

        def detach() -> None:
            self.counters = [c for c in self.counters if c is not counter]

        return detach

    def count(
        self, counters: list[OriginCounter], grads: torch.Tensor, keys: Sequence[Hashable] = ()
    ) -> None:
        try:
            for counter in counters:
                counter.add(grads, keys)
        except Exception as exc:
            _failed(exc)

    def reduced(self, counters: list[OriginCounter], keys: Sequence[Hashable], result: Any) -> None:
        if not (counters and keys):
            return
        try:
            reduced = result[0] if isinstance(result, (list, tuple)) else result
            nonfinite = ~torch.isfinite(torch.linalg.vector_norm(reduced, ord=float("inf")))
            for counter in counters:
                counter.reduced(keys, nonfinite)
        except Exception as exc:
            _failed(exc)


def _failed(exc: Exception) -> None:
    _errors.log(
        "origin",
        logging.WARNING,
        "gradtel: cannot count this rank's own gradients before the reduction: %s: %s",
        type(exc).__name__,
        exc,
    )


def ddp_comm_hook(monitor: Any, inner: CommHook | None = None) -> CommHook:
    """A DDP communication hook that counts this rank's gradients, then reduces them.

    Register it instead of your own hook to keep origin-rank counting::

        ddp.register_comm_hook(process_group, gradtel.ddp_comm_hook(monitor, inner=fp16_compress_hook))

    A :class:`~gradtel.GradMonitor` created later on the DDP model itself counts
    through this hook too, as no second hook can be registered.

    Args:
        monitor: The :class:`~gradtel.GradMonitor` whose updates the counts join.
        inner: The hook that does the reduction (for example an fp16/bf16
            compression hook); default: DDP's plain all-reduce.

    Returns:
        A hook for ``DistributedDataParallel.register_comm_hook``; the state
        registered with it is passed on to ``inner``.
    """
    feed = _Feed()
    feed.attach(monitor.origin)
    return _ddp_hook(feed, allreduce_hook if inner is None else inner)


def _ddp_hook(feed: _Feed, reduce: CommHook) -> CommHook:
    def gradtel_origin_hook(state: Any, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
        counters = feed.counters
        if not counters:
            return reduce(state, bucket)
        params = bucket.parameters()
        keys = [id(p) for p in params]
        buffer = bucket.buffer()
        if params and params[0].is_complex():
            # DDP buckets hold one dtype, and reduce a complex bucket as its real view:
            # count each complex value once.
            buffer = torch.view_as_complex(buffer.view(-1, 2))
        # Before the reduction mixes every rank's values.
        feed.count(counters, buffer, keys)

        def note(done: torch.futures.Future[Any]) -> Any:
            reduced = done.value()
            feed.reduced(counters, keys, reduced)
            return reduced

        return reduce(state, bucket).then(note)

    setattr(gradtel_origin_hook, _FEED, feed)
    return gradtel_origin_hook


def install_origin_hook(model: torch.nn.Module, monitor: Any) -> Undo | None:
    """Count ``model``'s own gradients before their reduction, if it is a DDP or FSDP model;
    logs why not when torch's hook is taken or unavailable. Returns what detaches
    ``monitor`` again (None: nothing was attached)."""
    counter: OriginCounter = monitor.origin
    try:
        if isinstance(model, DistributedDataParallel):
            return _install_ddp(model, counter)
        fsdp = imported("torch.distributed.fsdp", "FullyShardedDataParallel") or ()
        if isinstance(model, fsdp):
            return _install_fsdp_wrapper(model, counter)
        sharded = imported("torch.distributed.fsdp", "FSDPModule")
        if sharded is not None and any(isinstance(m, sharded) for m in model.modules()):
            return _install_fully_shard(model, counter, sharded)
        return None
    except Exception as exc:
        logger.warning(
            "gradtel: cannot count each rank's own gradients before the reduction "
            "(the origin rank will not be known): %s: %s",
            type(exc).__name__,
            exc,
        )
        return None


def _install_ddp(ddp: DistributedDataParallel, counter: OriginCounter) -> Undo | None:
    """Register gradtel's hook on ``ddp`` (or attach to the one it has); a hook the application
    registers later becomes the reduction behind gradtel's count (DDP accepts only one hook)."""
    hooks = [hook for hook, _ in getattr(ddp, "_comm_hooks", [])]
    ours = [getattr(ddp, _FEED, None)] + [getattr(hook, _FEED, None) for hook in hooks]
    feed = next((each for each in ours if each is not None), None)
    if feed is None and hooks:
        logger.warning(
            "gradtel: this DDP model already has a communication hook, so gradtel cannot count "
            "each rank's own gradients; register gradtel.ddp_comm_hook(monitor, inner=your_hook) "
            "instead of your hook"
        )
        return None
    if feed is None:
        feed = _Feed()
        # The state and hook that reduce: DDP's own process group, which may be a sub-group
        # (one data-parallel group among pipeline stages or tensor-parallel parts).
        reduction: list[Any] = [ddp.process_group, allreduce_hook]

        def reduce(state: Any, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
            return reduction[1](reduction[0], bucket)  # type: ignore[no-any-return]

        ddp.register_comm_hook(None, _ddp_hook(feed, reduce))

        def register_comm_hook(state: object, hook: CommHook) -> None:
            reduction[:] = [state, hook]

        ddp.register_comm_hook = register_comm_hook  # type: ignore[method-assign]
        setattr(ddp, _FEED, feed)
    return feed.attach(counter)


def _install_fsdp_wrapper(fsdp: "FullyShardedDataParallel", counter: OriginCounter) -> Undo:
    """The older FSDP wrapper: one communication hook on the root serves every unit. Like
    DDP's, a hook the application registers later becomes the reduction behind the count."""
    feed: _Feed | None = getattr(fsdp, _FEED, None)
    if feed is None:
        feed = _fsdp_wrapper_hook(fsdp)
    return feed.attach(counter)


def _fsdp_wrapper_hook(fsdp: "FullyShardedDataParallel") -> _Feed:
    feed = _Feed()
    group = fsdp.process_group or dist.group.WORLD
    reduction: list[Any] = [fsdp_hooks.DefaultState(group), None]  # type: ignore[arg-type]

    def gradtel_origin_hook(
        state: Any, grad: torch.Tensor, output: torch.Tensor | None = None
    ) -> Any:
        counters = feed.counters
        # Without sharding, .grad is all-reduced in place and the next backward adds onto it;
        # the sharded strategies reduce this backward's own unsharded gradient.
        keys = (grad.data_ptr(),) if output is None else ()
        feed.count(counters, grad, keys)  # this rank's flat, unsharded gradient of one unit
        inner_state, inner = reduction
        if inner is not None:
            result = (
                inner(inner_state, grad) if output is None else inner(inner_state, grad, output)
            )
        elif output is None:  # NO_SHARD: an all-reduce
            result = fsdp_hooks.allreduce_hook(inner_state, grad)
        else:
            result = fsdp_hooks.reduce_scatter_hook(inner_state, grad, output)
        feed.reduced(counters, keys, grad)  # FSDP's hooks reduce before they return
        return result

    fsdp.register_comm_hook(None, gradtel_origin_hook)

    def register_comm_hook(state: object, hook: Callable[..., Any]) -> None:
        reduction[:] = [state, hook]

    fsdp.register_comm_hook = register_comm_hook  # type: ignore[method-assign]
    setattr(fsdp, _FEED, feed)
    return feed


class _CountingReduceScatter:
    """A ``fully_shard`` reduce-scatter that counts this rank's gradients, then runs ``inner``."""

    def __init__(self, feed: _Feed, inner: Any) -> None:
        self.feed = feed
        self.inner = inner

    def allocate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner.allocate(*args, **kwargs)  # type: ignore[no-any-return]

    def __call__(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        # Every rank's padded, unsharded gradients of one group, this backward's own.
        self.feed.count(self.feed.counters, input_tensor)
        return self.inner(output_tensor, input_tensor, *args, **kwargs)


_said: set[str] = set()


def _install_fully_shard(
    model: torch.nn.Module, counter: OriginCounter, sharded: "type[FSDPModule]"
) -> Undo | None:
    """``fully_shard``: a counting wrapper around each sharded module's reduce-scatter."""
    if not hasattr(sharded, "set_custom_reduce_scatter"):
        if "fully_shard" not in _said:
            _said.add("fully_shard")
            logger.warning(
                "gradtel: counting each rank's own gradients before fully_shard's reduce-scatter "
                "needs torch >= 2.9 (this is %s); the origin rank will not be known",
                torch.__version__,
            )
        return None
    new, feeds, groups = _Feed(), {}, []
    for module in model.modules():
        if isinstance(module, sharded):
            _keep_counting(module)
            for group in _param_groups(module):
                comm = group._reduce_scatter_comm
                if not isinstance(comm, _CountingReduceScatter):
                    comm = group._reduce_scatter_comm = _CountingReduceScatter(new, comm)
                feeds[id(comm.feed)] = comm.feed
                groups.append(group)
    detach = [feed.attach(counter) for feed in feeds.values()]
    # One rank reduces nothing: torch then skips the reduce-scatter, and there is no origin to find.
    counter.installed = any(getattr(g.mesh_info, "shard_mesh_size", 1) > 1 for g in groups)

    def undo() -> None:
        for each in detach:
            each()

    return undo


def _param_groups(module: "FSDPModule") -> list[Any]:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch without per-parameter meshes: at most one
        groups = [state._fsdp_param_group]
    return [g for g in groups if g is not None]


def _keep_counting(module: "FSDPModule") -> None:
    """Count around whatever reduce-scatter the application or torch sets on ``module`` later:
    torch's setters see (and check) the reduce-scatter as it is, then get gradtel's wrapper back."""
    for name in _REDUCE_SCATTER_SETTERS:
        setter = getattr(module, name, None)
        if setter is None or hasattr(setter, _FEED):
            continue

        def rewrapped(*args: Any, _setter: Callable[..., Any] = setter, **kwargs: Any) -> Any:
            groups = _param_groups(module)
            comms = [g._reduce_scatter_comm for g in groups]
            for group, comm in zip(groups, comms):
                if isinstance(comm, _CountingReduceScatter):
                    group._reduce_scatter_comm = comm.inner
            try:
                return _setter(*args, **kwargs)
            finally:
                for group, comm in zip(groups, comms):
                    if isinstance(comm, _CountingReduceScatter):
                        now = group._reduce_scatter_comm
                        group._reduce_scatter_comm = _CountingReduceScatter(comm.feed, now)

        setattr(rewrapped, _FEED, True)
        setattr(module, name, rewrapped)
