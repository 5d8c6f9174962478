"""Which parameters a monitor watches: a model's named parameters, and torch's module and
parameter registration hooks, which tell a monitor that its model changed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["named_parameters", "registrations", "watch_registrations"]


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
