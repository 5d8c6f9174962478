"""Where this process stands in a distributed run: its rank, local rank, world size and run,
from ``torch.distributed`` when it is initialised, else from the variables that torchrun
(and most launchers) set. Every gradtel log line of a rank starts with ``rank N:``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["every_rank", "launcher_world_size", "local_rank", "process_attributes", "run_id"]


def launcher_world_size() -> int:
    """``WORLD_SIZE`` as torchrun and most launchers set it; 1 when absent or empty.

    Raises:
        ValueError: ``WORLD_SIZE`` is set but not a positive integer.
    """
    text = os.environ.get("WORLD_SIZE", "").strip()
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise ValueError(
            f"WORLD_SIZE must be a positive integer, as torchrun sets it, got {text!r}; "
            "fix or unset it"
        )
    return int(text)


def local_rank() -> int:
    """This process's rank on its node in a multi-process run, else 0.

    Raises:
        ValueError: ``LOCAL_RANK`` (or ``WORLD_SIZE``) is set but malformed.
    """
    if launcher_world_size() <= 1:
        return 0
    local = os.environ.get("LOCAL_RANK", "0")
    if not local.isdigit():
        raise ValueError(f"LOCAL_RANK must be a non-negative integer, got {local!r}")
    return int(local)


def run_id() -> str | None:
    """The training run this process belongs to: ``$GRADTEL_RUN``, else torchrun's
    ``$TORCHELASTIC_RUN_ID`` (unless it is torchrun's placeholder ``none``), else None.
    The alerts page once per run, whatever its number of ranks."""
    for name in ("GRADTEL_RUN", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(name, "").strip()
        if value and value != "none":
            return value
    return None


def process_attributes() -> dict[str, str]:
    """Labels every series of this process carries: ``run`` when the launcher names the run
    (see :func:`run_id`), ``rank`` when distributed with world size > 1.

    Raises:
        ValueError: ``WORLD_SIZE`` or ``RANK`` is set but malformed.
    """
    run = run_id()
    return {"run": run, **_rank()} if run is not None else _rank()


def _rank() -> dict[str, str]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            return {"rank": str(dist.get_rank())}
        return {}
    if launcher_world_size() > 1:
        rank = os.environ.get("RANK", "").strip()
        if not rank:
            return {}
        if not rank.isdigit():
            raise ValueError(
                f"RANK must be a non-negative integer, as torchrun sets it, got {rank!r}"
            )
        return {"rank": rank}
    return {}


class _RankPrefix(logging.Filter):
    """In a distributed run every gradtel log line starts with ``rank N:``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            rank = process_attributes().get("rank")
        except ValueError:  # a malformed launcher variable: reported where it is used
            rank = None
        if rank is not None and not getattr(record, "gradtel_rank", None):
            record.msg = f"rank {rank}: {record.msg}"
            record.gradtel_rank = rank
        return True


logging.getLogger("gradtel").addFilter(_RankPrefix())


def every_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank of the default process group: a collective that
    every rank must call; ``flag`` itself outside a distributed run."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    falsified = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(falsified, op=dist.ReduceOp.MAX)
    if not on_gpu:
        _released(falsified)
    return not falsified.item()


def _released(tensor: torch.Tensor, timeout: float = 1.0) -> None:
    """Wait until gloo's worker thread has let go of ``tensor``, which it does only once it
    holds the GIL: a process that exits first aborts there ("terminate called without an
    active exception") instead of exiting 0."""
    deadline = time.monotonic() + timeout
    while tensor._use_count() > 1 and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.0001)  # lets that thread take the GIL
