"""Layer labels from parameter names, and the cardinality bound."""

from __future__ import annotations

import pytest

from gradtel.layers import OVERFLOW_LAYER, ROOT_LAYER, assign_layers, layer_name


@pytest.mark.parametrize(
    ("name", "depth", "label"),
    [
        ("encoder.layers.0.attn.q_proj.weight", None, "encoder.layers.0.attn.q_proj"),
        ("encoder.layers.0.attn.q_proj.weight", 1, "encoder"),
        ("encoder.layers.0.attn.q_proj.weight", 3, "encoder.layers.0"),
        ("encoder.layers.0.attn.q_proj.weight", 99, "encoder.layers.0.attn.q_proj"),
        ("scale", None, ROOT_LAYER),
        ("scale", 2, ROOT_LAYER),
    ],
)
def test_layer_name(name: str, depth: int | None, label: str) -> None:
    assert layer_name(name, depth) == label


def test_layers_past_the_bound_fold_into_overflow() -> None:
    names = [f"blocks.{i}.weight" for i in range(5)] + ["blocks.0.bias", "head.weight"]
    labels = assign_layers(names, max_layers=3)
    # Both ends keep their labels: the output end is where backward starts.
    assert labels == [
        "blocks.0", "blocks.1", OVERFLOW_LAYER, OVERFLOW_LAYER, OVERFLOW_LAYER, "blocks.0", "head"
    ]  # fmt: skip


def test_depth_groups_before_the_bound_applies() -> None:
    names = [f"blocks.{i}.mlp.weight" for i in range(4)]
    assert assign_layers(names, max_layers=1, depth=1) == ["blocks"] * 4


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_layers": 0}, ValueError, r"max_layers must be >= 1, got 0"),
        ({"max_layers": 2.0}, TypeError, r"max_layers must be a positive int, got 2.0 \(float\)"),
        ({"depth": 0}, ValueError, r"layer_depth must be >= 1, got 0"),
        ({"depth": "1"}, TypeError, r"layer_depth must be a positive int or None, got '1' \(str\)"),
    ],
)
def test_bad_options(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        assign_layers(["a.weight"], **kwargs)
