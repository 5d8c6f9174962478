"""Which parameters a monitor watches: a model's named parameters, their layer labels and
gradients, and torch's module and parameter registration hooks, which tell a monitor
that its model changed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._imported import imported
from .layers import assign_layers, distinct
from .order import BackwardOrder
from .scan import countable_values

__all__ = [
    "Gradients",
    "Watched",
    "named_parameters",
    "registrations",
    "same_objects",
    "watch_registrations",
]

_PLAIN_DTYPES = {
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128
}  # fmt: skip


def same_objects(a: Sequence[object], b: Sequence[object]) -> bool:
    """The same objects, one by one (identity: ``==`` on tensors compares their elements)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@dataclass(frozen=True)
class Gradients:
    """The countable gradients of one update."""

    values: list[torch.Tensor]
    present: tuple[int, ...]
    """The watched parameters' positions of ``values``."""
    skipped: int
    """Watched parameters left out: frozen, or no gradient."""
    dense: bool
    """All strided (sparse gradients change size every update)."""


class Watched:
    """The watched parameters: their layer labels, the order backward makes their
    gradients in, and their gradients as the scan counts them.

    A parameter FSDP flattened several into (``use_orig_params=False``) is watched once
    per parameter of this rank's shard, each the span of the flat gradient it holds, so
    that its counts go to the layers it was made of."""

    def __init__(
        self, named: list[tuple[str, torch.nn.Parameter]], max_layers: int, depth: int | None
    ) -> None:
        self._given = tuple(p for _, p in named)
        spread = [(name, p, span) for n, p in named for name, span in _flattened_into(n, p)]
        self.params = tuple(p for _, p, _ in spread)
        self.spans = tuple(span for _, _, span in spread)
        """Per watched parameter, the span of a flat parameter's gradient it is, or None."""
        self.labels = assign_layers((n for n, _, _ in spread), max_layers=max_layers, depth=depth)
        self.layers = tuple(distinct(self.labels))
        self.order = BackwardOrder(self.params)
        # Gradients of these dtypes are counted as they are when strided.
        dtensor = imported("torch.distributed.tensor", "DTensor") or ()
        self._plain = [
            p.dtype in _PLAIN_DTYPES and not isinstance(p, dtensor) and span is None
            for p, span in zip(self.params, self.spans)
        ]
        self._all_plain = all(self._plain)
        self.everyone = tuple(range(len(self.params)))
        self._first_trained: torch.Tensor | None = None
        self._layer_slots: tuple[tuple[int, ...], torch.Tensor, tuple[str, ...]] | None = None

    def same(self, named: list[tuple[str, torch.nn.Parameter]]) -> bool:
        """Whether ``named`` holds exactly these parameters."""
        return same_objects([p for _, p in named], self._given)

    def first_grad(self) -> torch.Tensor | None:
        """The gradient of the first watched parameter that trains (a model's first layers
        are often frozen, with none), or of the first one."""
        kept = self._first_trained
        if kept is None or not kept.requires_grad:
            trained = (p for p in self.params if p.requires_grad)
            kept = self._first_trained = next(trained, self.params[0] if self.params else None)
        return None if kept is None else kept.grad

    def trainable_layers(self) -> list[str]:
        return distinct([label for label, p in zip(self.labels, self.params) if p.requires_grad])

    def gather(self, cannot_count: Callable[[Exception], None]) -> Gradients:
        """This update's countable gradients; ``cannot_count`` hears of each one that is not."""
        params = self.params
        grads = [p.grad for p in params]
        strided = torch.strided
        # The usual update: every watched parameter has a plain dense gradient.
        # (Never `None in grads`: it compares each tensor with None elementwise.)
        if self._all_plain and all(
            g is not None and g.layout is strided and p.requires_grad for g, p in zip(grads, params)
        ):
            return Gradients(grads, self.everyone, 0, True)  # type: ignore[arg-type]
        values: list[torch.Tensor] = []
        present: list[int] = []
        skipped = 0
        dense = True
        for index, (param, grad) in enumerate(zip(params, grads)):
            if grad is None or not param.requires_grad:
                skipped += 1
                continue
            if self._plain[index] and grad.layout is strided:
                countable: torch.Tensor | None = grad
            else:
                dense = dense and grad.layout is strided
                countable = countable_values(grad)
                span = self.spans[index]
                if countable is not None and span is not None:  # one of a flat parameter's
                    countable = countable.reshape(-1)[span[0] : span[1]]
            if countable is None:
                skipped += 1
                cannot_count(
                    TypeError(
                        f"cannot count a {grad.layout} {grad.dtype} gradient in {self.labels[index]}"
                    )
                )
                continue
            values.append(countable)
            present.append(index)
        return Gradients(values, tuple(present), skipped, dense)

    def layer_slots(
        self, present: tuple[int, ...], device: torch.device
    ) -> tuple[torch.Tensor, tuple[str, ...]]:
        """The layer of each ``present`` gradient as an index tensor on ``device``, and the
        layers: kept from update to update, so no host-to-device copy per update."""
        kept = self._layer_slots
        if kept is None or kept[0] is not present or kept[1].device != device:
            names: dict[str, int] = {}
            slots = [names.setdefault(self.labels[i], len(names)) for i in present]
            kept = self._layer_slots = (present, torch.tensor(slots, device=device), tuple(names))
        return kept[1], kept[2]


def _flattened_into(
    name: str, param: torch.nn.Parameter
) -> list[tuple[str, tuple[int, int] | None]]:
    """``param``'s name, or, for FSDP's ``FlatParameter``, the names of the parameters of this
    rank's shard it holds and the span of its gradient each one takes."""
    fqns, shard = getattr(param, "_fqns", None), getattr(param, "_shard_param_infos", None)
    if fqns is None or shard is None:
        return [(name, None)]
    unit = name.rpartition(".")[0]  # the FSDP unit's path: its parameters' names are under it
    return [
        (
            f"{unit}.{fqn}" if unit else fqn,
            (info.offset_in_shard, info.offset_in_shard + info.numel_in_shard),
        )
        for fqn, info in zip(fqns, shard)
        if info.in_shard
    ]


def named_parameters(model: object) -> list[tuple[str, torch.nn.Parameter]]:
    if isinstance(model, torch.nn.Module):
        return list(model.named_parameters())
    if (
        model is None
        or isinstance(model, (str, bytes, torch.Tensor))
        or not isinstance(model, Iterable)
    ):
        raise TypeError(
            "model must be a torch.nn.Module or an iterable of (name, Parameter) pairs, "
            f"got {model!r} ({type(model).__name__})"
        )
    pairs = []
    seen: set[int] = set()
    for item in model:
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        ):
            raise TypeError(
                "model must yield (name, Parameter) pairs such as Module.named_parameters() "
                f"gives, got an item {item!r}"
            )
        if id(item[1]) not in seen:  # tied parameters are watched once
            seen.add(id(item[1]))
            pairs.append(item)
    return pairs


# Bumped by torch's global registration hooks whenever any module gets a new
# submodule or parameter (`net.b = nn.Linear(...)`): a monitor compares it with
# the value at its last refresh, so a replaced layer is watched from the very
# next update without walking the model on every update.
_registrations = [0]
_registration_hooks: list[Any] = []


def _note_registration(*args: object) -> None:
    _registrations[0] += 1


def registrations() -> int:
    """How many submodules and parameters have been registered on any module so far."""
    return _registrations[0]


def watch_registrations() -> None:
    """Install the counting hooks, once per process."""
    if not _registration_hooks:
        from torch.nn.modules import module

        _registration_hooks.append(
            module.register_module_module_registration_hook(_note_registration)
        )
        _registration_hooks.append(
            module.register_module_parameter_registration_hook(_note_registration)
        )
