"""How an update's counts reach the host: at once (``readout="sync"``), or when they are
ready (``readout="deferred"``), so that a healthy update never blocks the training thread.

With the deferred read-out on an accelerator, ``collect()`` queues an exact count of
every gradient's NaN and ±Inf values on the device (about three passes over gradient
memory instead of the sync scan's one) and copies the small result into pinned host
memory without blocking (an event marks the copy done on CUDA). The counts are taken
as backward left the gradients: clipping or zeroing them after ``collect()`` changes
nothing, and no gradient is kept alive for the read-out. On the CPU the work is done
when it is queued, so the update is scanned and read at once, as with ``"sync"``.

Either way the update is *published* (recorded, logged, returned by ``collect()``)
at the first of: the next ``collect()`` (sampled out or not), a Prometheus scrape
of the endpoint, ``monitor.flush()``, :attr:`GradMonitor.healthy`,
``allow_checkpoint()``, ``monitor.close()`` or the interpreter's exit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any, Literal, Protocol, TypeVar, get_args

import torch

__all__ = [
    "READOUTS",
    "HostCopy",
    "Pending",
    "Readout",
    "completes_when_queued",
]

Readout = Literal["sync", "deferred"]
READOUTS: tuple[str, ...] = get_args(Readout)


def completes_when_queued(tensor: torch.Tensor) -> bool:
    """Whether work on ``tensor``'s device is done by the time it is queued (the CPU): its
    read-out costs no wait, so a deferred update is counted and read at once."""
    return tensor.device.type == "cpu"


class HostCopy:
    """A small device tensor on its way to the host without blocking the caller.

    On CUDA: a non-blocking copy into pinned memory, and an event recorded after it.
    Elsewhere the work is done once it is queued, so the tensor itself is the copy.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: Any = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            # On the stream the copy runs on, that of the tensor's device (not the current
            # device's: an event there could say "done" before the copy is).
            self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor

    def ready(self) -> bool:
        """Whether :meth:`read` would return at once."""
        return self._event is None or bool(self._event.query())

    def read(self) -> list[Any]:
        """The values, waiting for the copy if it is not done yet."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class _Readable(Protocol):
    def ready(self) -> bool: ...


R = TypeVar("R", bound=_Readable)


class Pending(deque[R]):
    """Updates whose deferred read-out is not published yet, oldest first."""

    def take(self, wait: bool) -> Iterator[R]:
        """Take the updates to publish, in order: all of them with ``wait``, else those
        whose read-out is done, up to the first that is not (order is kept)."""
        while self and (wait or self[0].ready()):
            yield self.popleft()
