"""Layer labels from parameter names, and the cardinality bound."""

from __future__ import annotations

import gc
import socket

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from torch import nn

import gradtel
from gradtel import GradMonitor
from gradtel.pipeline.layers import OVERFLOW_LAYER, ROOT_LAYER, assign_layers, layer_name

from .conftest import Net


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


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_labels_are_the_users_module_paths_whatever_the_wrapper(provider: MeterProvider) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    expected = ("body.0", "body.2", "head")
    wrapped = [
        nn.DataParallel(Net()),
        torch.compile(Net()),
        torch.compile(nn.DataParallel(Net())),
    ]
    checkpointed = Net()
    checkpointed.body = checkpoint_wrapper(checkpointed.body)
    wrapped.append(checkpointed)
    for model in wrapped:
        assert GradMonitor(model, meter_provider=provider).layers == expected, model
        assert GradMonitor(model.named_parameters(), meter_provider=provider).layers == expected
        gc.collect()
    assert gradtel.layer_name("layers.0._fsdp_wrapped_module.attn.weight") == "layers.0.attn"

    with socket.socket() as probe:  # a free port for the one-rank group's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(Net())
        assert GradMonitor(ddp, meter_provider=provider).layers == expected
    finally:
        dist.destroy_process_group()
