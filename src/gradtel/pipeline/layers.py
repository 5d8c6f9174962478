"""Layer naming: a parameter's name becomes the ``layer`` label of its series.

The label is the module path that owns the parameter, in the user's own terms
(the path components wrappers insert are dropped), optionally truncated to a
depth; past ``max_layers`` distinct labels every further layer is folded into
one overflow label so that a huge model cannot explode Prometheus cardinality.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .. import _checks

__all__ = [
    "DEFAULT_MAX_LAYERS",
    "OVERFLOW_LAYER",
    "ROOT_LAYER",
    "WRAPPER_COMPONENTS",
    "assign_layers",
    "layer_name",
]

ROOT_LAYER = "(root)"
"""Label of parameters registered directly on the model's root module."""

OVERFLOW_LAYER = "(other)"
"""Label that aggregates every layer past ``max_layers``."""

DEFAULT_MAX_LAYERS = 1000
"""Default bound on distinct ``layer`` labels (plus one overflow label)."""

WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
"""Path components that ``torch.compile``, FSDP and activation checkpointing insert."""

DATA_PARALLEL_PREFIX = "module."
"""What DistributedDataParallel and DataParallel put before every parameter name."""


def layer_name(param_name: str, depth: int | None = None) -> str:
    """Return the ``layer`` label of a parameter.

    Args:
        param_name: Dotted parameter name as given by ``Module.named_parameters()``.
        depth: Keep at most this many leading components of the module path
            (``None`` keeps all of them).

    Returns:
        The owning module's path, or ``"(root)"`` for a parameter of the root module.

    Raises:
        TypeError: ``param_name`` is not a str, or ``depth`` is not an int or None.
        ValueError: ``depth`` is smaller than 1.

    >>> layer_name("encoder.layers.0.attn.q_proj.weight")
    'encoder.layers.0.attn.q_proj'
    >>> layer_name("encoder.layers.0.attn.q_proj.weight", depth=3)
    'encoder.layers.0'
    >>> layer_name("bias")
    '(root)'
    >>> layer_name("_orig_mod.layers.0._fsdp_wrapped_module.attn.weight")
    'layers.0.attn'
    """
    if not isinstance(param_name, str):
        raise TypeError(
            f"param_name must be a parameter name (str) such as 'encoder.fc.weight', "
            f"got {param_name!r} ({type(param_name).__name__})"
        )
    _checks.positive_int("layer_depth", depth, allow_none=True)
    module_path = _without_wrappers(param_name).rpartition(".")[0]
    if not module_path:
        return ROOT_LAYER
    if depth is not None:
        module_path = ".".join(module_path.split(".")[:depth])
    return module_path


def assign_layers(
    param_names: Iterable[str],
    *,
    max_layers: int = DEFAULT_MAX_LAYERS,
    depth: int | None = None,
) -> list[str]:
    """Label each parameter, folding the middle layers past ``max_layers`` into ``"(other)"``.

    Layers are taken in order of first appearance (the order of
    ``named_parameters()``, i.e. module registration order). Past
    ``max_layers``, the first half and the last half keep their own labels and
    the layers between them fold: the input end and the output end, where
    backward starts and where a NaN is first seen, are never folded. When every
    name starts with ``module.`` (a DDP or DataParallel wrapper, possibly inside
    ``torch.compile``), that prefix is dropped too.

    Args:
        param_names: Parameter names, in model order.
        max_layers: How many distinct layer labels to keep.
        depth: Module path truncation, as in :func:`layer_name`.

    Returns:
        One label per name, in the same order.

    Raises:
        TypeError: ``max_layers`` or ``depth`` is not an int.
        ValueError: ``max_layers`` or ``depth`` is smaller than 1.

    >>> assign_layers(["a.weight", "a.bias", "b.weight", "c.weight", "d.weight"], max_layers=2)
    ['a', 'a', '(other)', '(other)', 'd']
    >>> assign_layers(["_orig_mod.module.fc.weight", "_orig_mod.module.bias"])
    ['fc', '(root)']
    """
    _checks.positive_int("max_layers", max_layers)
    _checks.positive_int("layer_depth", depth, allow_none=True)
    names = [_without_wrappers(name) for name in param_names]
    while names and all(n.startswith(DATA_PARALLEL_PREFIX) for n in names):
        names = [n[len(DATA_PARALLEL_PREFIX) :] for n in names]
    labels = [layer_name(name, depth) for name in names]
    order = distinct(labels)
    if len(order) <= max_layers:
        return labels
    head = (max_layers + 1) // 2
    kept = set(order[:head]) | set(order[len(order) - (max_layers - head) :])
    return [label if label in kept else OVERFLOW_LAYER for label in labels]


def _without_wrappers(param_name: str) -> str:
    parts = param_name.split(".")
    if WRAPPER_COMPONENTS.isdisjoint(parts):
        return param_name
    return ".".join(p for p in parts if p not in WRAPPER_COMPONENTS)


def distinct(labels: Sequence[str]) -> list[str]:
    """Distinct labels in order of first appearance."""
    return list(dict.fromkeys(labels))
