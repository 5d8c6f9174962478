"""The order in which backward produces the watched gradients: "first bad layer in backward
order" names the layer where backward first met a NaN or Inf."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["BackwardOrder"]


class BackwardOrder:
    """The order in which backward produces the watched gradients, from one complete pass.

    Hooks fire as each gradient is accumulated; at the end of the first pass
    that completes they are removed (no steady cost). A pass that raised (an
    out-of-memory retry) is forgotten at the start of the next one. The hooks
    hold this object, not the monitor, so a dropped monitor is freed.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.rank: list[int] | None = None
        self._count = len(params)
        self._seen: list[int] = []
        self._task: int | None = None
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(i))
            for i, p in enumerate(params)
            if p.requires_grad  # torch refuses hooks on frozen tensors
        ]

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            task = torch._C._current_graph_task_id()
            if task != self._task:  # the first gradient of a new backward pass
                self._task, self._seen = task, []
                torch.autograd.Variable._execution_engine.queue_callback(self._freeze)
            self._seen.append(index)

        return hook

    def _freeze(self) -> None:
        rank = [self._count] * self._count  # never seen: after all seen ones
        for position, index in enumerate(dict.fromkeys(self._seen)):
            rank[index] = position
        self.rank = rank
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def first(self, indices: Sequence[int]) -> int | None:
        """The index, among ``indices``, whose gradient backward made first; None when no
        pass has completed yet."""
        if not indices or self.rank is None:
            return None
        rank = self.rank
        return min(indices, key=lambda index: (rank[index], index))
