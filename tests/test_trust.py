"""A signal you can trust: never "healthy" without looking, the parameters watched are the
model's, hooks that never go quiet, the right layer and kind, a handled AMP overflow is not
an incident, clipping as a drop-in, and a hot path without hidden costs."""

from __future__ import annotations

import gc
import inspect
import json
import logging
import math
import socket
import time
import urllib.error
import urllib.request
import weakref
from typing import Any

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.profiler import profile

import gradtel
from gradtel import GradMonitor, Status
from gradtel.watch import Snapshot, frame, scrape

from .conftest import sample, samples
from .test_clip_and_sampling import record_collects

NAN, INF = float("nan"), float("inf")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def backward(model: nn.Module) -> None:
    model.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()


# 1. Never "healthy" without having looked ---------------------------------------------


@pytest.mark.parametrize("when", ["before any backward", "after zero_grad(set_to_none=True)"])
def test_nothing_to_scan_is_unknown_counted_and_logged(
    provider: MeterProvider,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    when: str,
) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    if when != "before any backward":
        backward(model)
        torch.optim.SGD(model.parameters(), lr=0.1).zero_grad(set_to_none=True)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        health = monitor.collect()
        monitor.collect()  # the warning is rate-limited
    assert (health.status, health.unscanned, health.scanned) == (Status.UNKNOWN, "no_gradients", 0)
    assert [r.getMessage() for r in caplog.records] == [
        "gradtel: step 1 not scanned: 0 of 6 watched trainable parameters had a gradient; "
        "is collect() called after backward() and before zero_grad()? (status unknown, counted "
        "in gradtel_unscanned_updates_total)"
    ]
    found = samples(registry)
    assert sample(found, "gradtel_unscanned_updates_total", reason="no_gradients") == 2
    assert sample(found, "gradtel_unscanned_updates_total", reason="scan_error") == 0
    assert sample(found, "gradtel_updates_total") == 0
    assert sample(found, "gradtel_update_status") == -1
    backward(model)
    assert monitor.collect().status is Status.HEALTHY
    assert sample(samples(registry), "gradtel_update_status") == 0


def test_a_scan_that_raises_is_unknown_not_healthy(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = nn.Linear(4, 4, device="meta")  # counts cannot be read back from the meta device
    monitor = GradMonitor(model, meter_provider=provider)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    health = monitor.collect()
    assert (health.status, health.unscanned) == (Status.UNKNOWN, "scan_error")
    found = samples(registry)
    assert sample(found, "gradtel_unscanned_updates_total", reason="scan_error") == 1
    assert sample(found, "gradtel_updates_total") == 0
    assert sample(found, "gradtel_errors_total", stage="scan") == 1


def test_healthz_follows_collect_calls_not_scanned_updates(registry: CollectorRegistry) -> None:
    provider = gradtel.prometheus_meter_provider(registry)
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider, sample_every=20)
    backward(model)
    statuses = []
    with gradtel.serve(port=0, registry=registry, stale_after=0.3, exit_grace=0) as server:
        assert server.url is not None
        health_url = server.url.replace("/metrics", "/healthz")
        for _ in range(30):  # 1.5 s of collect() calls every 50 ms: one scan in 20
            monitor.collect()
            time.sleep(0.05)
            try:
                with urllib.request.urlopen(health_url, timeout=5) as response:
                    statuses.append((response.status, json.loads(response.read())["status"]))
            except urllib.error.HTTPError as exc:
                statuses.append((exc.code, json.loads(exc.read())["status"]))
    assert set(statuses) == {(200, "ok")}
    provider.shutdown()


def test_watch_never_says_healthy_without_an_update(registry: CollectorRegistry) -> None:
    thresholds = gradtel.Thresholds()
    with gradtel.serve(port=0, registry=registry, exit_grace=0) as server:
        assert server.url is not None
        empty = frame(server.url, scrape(server.url), None, thresholds, color=False)
        assert (
            empty[1]
            == f"  no gradtel metrics at {server.url}: is this a gradtel endpoint, and is a GradMonitor made?"
        )
        provider = gradtel.prometheus_meter_provider(registry)
        model = Net()
        monitor = GradMonitor(model, meter_provider=provider)
        assert (
            frame(server.url, scrape(server.url), None, thresholds, color=False)[1]
            == "  no update yet"
        )
        monitor.collect()  # no gradient: not scanned
        lines = frame(server.url, scrape(server.url), None, thresholds, color=False)
        assert lines[1] == "  unknown (latest update not scanned; 1 not scanned since start)"
        backward(model)
        monitor.collect()
        assert (
            frame(server.url, scrape(server.url), None, thresholds, color=False)[1] == "  healthy"
        )
        provider.shutdown()
    # Two ranks behind one URL, one of which did not look: not "healthy" either.
    mixed = Snapshot(taken=1.0, updates=5, last_update=1.0, status=0.0, unknown=True)
    assert frame("u", mixed, None, thresholds, color=False)[1].startswith("  unknown")


# 2. The watched parameters are always the model's --------------------------------------


def test_a_replaced_layer_is_counted_in_the_next_update(provider: MeterProvider) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    backward(model)
    monitor.collect()
    model.head = nn.Linear(16, 1)  # a new module, new parameters
    backward(model)
    model.head.weight.grad[0, 0] = NAN
    assert monitor.collect().nan_by_layer == {"head": 1}


def test_a_parameter_unfrozen_later_is_counted(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    model.head.requires_grad_(False)
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    backward(model)
    assert monitor.collect().status is Status.HEALTHY
    # A frozen layer exports no series (a frozen base model would export hundreds).
    assert ("gradtel_nan_grads_total", frozenset({("layer", "head")})) not in samples(registry)
    model.head.requires_grad_(True)
    backward(model)
    model.head.weight.grad[0, 0] = NAN
    assert monitor.collect().nan_by_layer == {"head": 1}
    assert sample(samples(registry), "gradtel_nan_grads_total", layer="head") == 1


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((256, 256), (600, 256)),
        ((300, 256), (600, 256)),
        ((10, 256), (600, 256)),
        ((600, 256), (256, 256)),
    ],
)
def test_a_parameter_resized_in_place_is_counted_whole(
    provider: MeterProvider, before: tuple[int, int], after: tuple[int, int]
) -> None:
    model = nn.Linear(before[1], before[0], bias=False)
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    model.weight.grad = torch.zeros(before)
    assert monitor.collect().status is Status.HEALTHY  # the plan is made for the old size
    model.weight.data = torch.zeros(after)
    model.weight.grad = torch.zeros(after)
    model.weight.grad[-1, -3:] = NAN  # in the part that is new when the tensor grew
    for _ in range(2):
        assert monitor.collect().nan_total == 3


def test_two_monitors_on_the_same_parameters_and_provider_are_refused(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    first = GradMonitor(model, meter_provider=provider)
    with pytest.raises(
        ValueError, match="another GradMonitor already watches 6 of these parameters"
    ):
        GradMonitor(model, meter_provider=provider)
    with pytest.raises(ValueError, match="already watches 2 of these"):
        GradMonitor(model.head.named_parameters(), meter_provider=provider)
    other = gradtel.prometheus_meter_provider(CollectorRegistry())
    GradMonitor(model, meter_provider=other)  # its own series: allowed
    GradMonitor(nn.Linear(2, 2), meter_provider=provider)  # other parameters: allowed
    first.close()
    second = GradMonitor(model, meter_provider=provider)
    backward(model)
    second.collect()
    assert sample(samples(registry), "gradtel_updates_total") == 1
    other.shutdown()


def test_a_dropped_monitor_is_freed_with_its_hooks(provider: MeterProvider) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    ref = weakref.ref(monitor)
    del monitor
    gc.collect()
    assert ref() is None
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    GradMonitor(model, meter_provider=provider)  # its parameters are free again


def test_backward_order_hooks_go_after_the_first_pass_even_without_collect(
    provider: MeterProvider,
) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    for _ in range(200):
        backward(model)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    del monitor


# 3. Hooks never go quiet ---------------------------------------------------------------


def amp_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scale: float = 1.0,
) -> None:
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = scale * model(torch.randn(4, 8)).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def test_a_fused_optimizer_under_a_scaler_is_collected(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    monitor.attach(optimizer, scaler=scaler)
    found = record_collects(monitor)
    weights = [p.detach().clone() for p in model.parameters()]
    amp_step(model, optimizer, scaler, scale=1e3)  # overflows: the fused step skips itself
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    for _ in range(3):
        amp_step(model, optimizer, scaler)
    assert [h.amp_overflow for h in found] == [True, False, False, False]
    found_samples = samples(registry)
    assert sample(found_samples, "gradtel_updates_total") == 4
    assert sample(found_samples, "gradtel_skipped_updates_total", reason="amp_overflow") == 1


def test_a_fused_optimizer_unscaled_by_hand_is_collected_once(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu")
    GradMonitor(model, meter_provider=provider).attach(optimizer, scaler=scaler)
    for _ in range(3):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(4, 8)).pow(2).mean()).backward()
        scaler.unscale_(optimizer)  # to clip, as the AMP recipe does
        scaler.step(optimizer)
        scaler.update()
    assert sample(samples(registry), "gradtel_updates_total") == 3


def test_removing_one_of_two_monitors_on_a_scaler_keeps_the_other() -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    registries = [CollectorRegistry(), CollectorRegistry()]
    providers = [gradtel.prometheus_meter_provider(r) for r in registries]
    monitors = [GradMonitor(model, meter_provider=p) for p in providers]
    attachments = [m.attach(optimizer, scaler=scaler) for m in monitors]
    amp_step(model, optimizer, scaler)
    attachments[0].remove()
    amp_step(model, optimizer, scaler)
    attachments[1].remove()
    amp_step(model, optimizer, scaler)
    counts = [sample(samples(r), "gradtel_updates_total") for r in registries]
    assert counts == [1, 2]
    assert "unscale_" not in vars(scaler)  # the scaler is as it was
    for p in providers:
        p.shutdown()


def test_attaching_twice_to_one_optimizer_is_refused(provider: MeterProvider) -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = GradMonitor(model, meter_provider=provider)
    attachment = monitor.attach(optimizer)
    with pytest.raises(ValueError, match="already attached to this optimizer"):
        monitor.attach(optimizer, scaler=torch.amp.GradScaler("cpu"))
    attachment.remove()
    monitor.attach(optimizer, scan="backward").remove()  # free again after remove()


class FailsOnce(torch.autograd.Function):
    failed = False

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if not FailsOnce.failed:
            FailsOnce.failed = True
            raise torch.OutOfMemoryError("simulated out of memory")
        return grad


def test_scan_backward_resumes_after_a_backward_that_raised(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    monitor.attach(torch.optim.SGD(model.parameters(), lr=0.01), scan="backward")

    def step() -> None:
        model.zero_grad()
        # The head's gradient comes first; the failure comes on the way to the body.
        hidden = FailsOnce.apply(torch.relu(model.body(torch.randn(4, 8))))
        model.head(hidden).pow(2).mean().backward()

    with pytest.raises(torch.OutOfMemoryError):
        step()
    for _ in range(3):
        step()
    assert sample(samples(registry), "gradtel_updates_total") == 3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lightning_model_built_in_configure_model(
    provider: MeterProvider, registry: CollectorRegistry, tmp_path: Any
) -> None:
    import lightning.pytorch as pl

    from gradtel.integrations.lightning import GradtelCallback

    class Late(pl.LightningModule):
        def configure_model(self) -> None:
            if not hasattr(self, "layer"):
                self.layer = nn.Linear(8, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randn(32, 1))
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[GradtelCallback(serve_metrics=False, meter_provider=provider, layer_series="all")],
    )  # fmt: skip
    trainer.fit(Late(), torch.utils.data.DataLoader(data, batch_size=8))
    found = samples(registry)
    assert sample(found, "gradtel_updates_total") == 3
    assert sample(found, "gradtel_nan_grads_total", layer="layer") == 0


# 4. The right layer, the right kind ----------------------------------------------------


def test_first_bad_layer_per_kind(provider: MeterProvider, registry: CollectorRegistry) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    backward(model)
    model.body[0].weight.grad[0, :3] = NAN
    model.head.weight.grad[0, :7] = INF
    health = monitor.collect()
    assert (health.first_nan_layer, health.first_inf_layer) == ("body.0", "head")
    assert health.first_bad_layer == "head"  # backward reaches the head first
    backward(model)
    monitor.collect()  # healthy: the next NaN starts a new run of NaN updates
    backward(model)
    model.body[2].weight.grad[0, 0] = NAN  # a later NaN update elsewhere
    monitor.collect()
    found = samples(registry)
    assert sample(found, "gradtel_first_bad_layer", kind="nan", layer="body.0") == 1
    assert sample(found, "gradtel_first_bad_layer", kind="inf", layer="head") == 1
    assert sample(found, "gradtel_first_bad_layer", kind="nan", layer="body.2") == 3


def test_first_bad_layer_names_where_the_values_started_not_where_they_spread(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    # Nothing skips the Inf update: the next update's Inf is met first in body.2. A page
    # sent after it must still say that the Inf started in head, at update 1.
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    backward(model)
    model.head.weight.grad[0, :7] = INF
    monitor.collect()
    backward(model)
    model.body[2].weight.grad[0, :14] = INF
    model.body[0].weight.grad[0, :2] = NAN  # the first NaN update: a run of its own kind
    health = monitor.collect()
    assert health.first_inf_layer == "body.2"  # the update's own answer is unchanged
    found = samples(registry)
    assert sample(found, "gradtel_first_bad_layer", kind="inf", layer="head") == 1
    assert not [
        key
        for key in found
        if key[0] == "gradtel_first_bad_layer" and ("layer", "body.2") in key[1]
    ]
    assert sample(found, "gradtel_first_bad_layer", kind="nan", layer="body.0") == 2


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


# 5. A handled AMP overflow is not an incident ------------------------------------------


def test_an_overflow_the_scaler_skips_is_not_an_unhealthy_update(
    provider: MeterProvider, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    monitor = GradMonitor(model, meter_provider=provider, on_critical="raise")
    monitor.attach(optimizer, scaler=scaler)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        amp_step(model, optimizer, scaler, scale=1e3)  # no raise: the scaler handles it
        amp_step(model, optimizer, scaler)
    assert caplog.records == []
    found = samples(registry)
    assert sample(found, "gradtel_skipped_updates_total", reason="amp_overflow") == 1
    assert sample(found, "gradtel_updates_total") == 2
    for kind in ("nan", "inf"):
        for severity in ("warning", "critical"):
            assert (
                sample(found, "gradtel_unhealthy_updates_total", kind=kind, severity=severity) == 0
            )
        assert (
            sum(v for (name, _), v in found.items() if name == f"gradtel_{kind}_grads_total") == 0
        )
    assert sample(found, "gradtel_update_status") == 0


def test_collect_with_a_scaler_by_hand(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    backward(model)
    model.head.weight.grad[0, 0] = INF
    health = monitor.collect(scaler=torch.amp.GradScaler("cpu"))
    assert health.amp_overflow and health.inf_total == 1
    assert not monitor.collect(scaler=torch.amp.GradScaler("cpu", enabled=False)).amp_overflow
    with pytest.raises(
        TypeError, match=r"scaler must be a torch.amp.GradScaler or None, got 'yes' \(str\)"
    ):
        monitor.collect(scaler="yes")  # type: ignore[arg-type]


# 6. Clipping is a drop-in that never misses --------------------------------------------


def test_clip_takes_torchs_signature() -> None:
    ours = list(inspect.signature(gradtel.clip_grad_norm_).parameters.values())
    theirs = list(inspect.signature(torch.nn.utils.clip_grad_norm_).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
        (p.name, p.kind, p.default) for p in theirs
    ]
    # Then gradtel's own, keyword-only: the monitor, and what collect() takes.
    assert [(p.name, p.kind) for p in ours[len(theirs) :]] == [
        (name, inspect.Parameter.KEYWORD_ONLY) for name in ("monitor", "scaler", "loss", "step")
    ]


def test_clip_positional_error_if_nonfinite_and_no_gradients(provider: MeterProvider) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider, on_critical="ignore")
    total = gradtel.clip_grad_norm_(model.parameters(), 1.0, monitor=monitor)
    assert torch.equal(total, torch.tensor(0.0))  # no gradient yet: torch's answer, no error
    backward(model)
    model.head.weight.grad.fill_(NAN)
    with pytest.raises(RuntimeError, match="non-finite"):
        gradtel.clip_grad_norm_(model.parameters(), 1.0, 2.0, True, False, monitor=monitor)


@pytest.mark.parametrize("norm_type", [0.0, -1.0, -INF, 0.5, 2.0, INF])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_clip_never_misses_a_non_finite_value(
    provider: MeterProvider, norm_type: float, bad: float
) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    backward(model)
    model.head.weight.grad[0, 0] = bad
    found = record_collects(monitor)
    gradtel.clip_grad_norm_(model.parameters(), 1.0, norm_type, monitor=monitor)
    assert found[0].status is Status.WARNING
    assert (found[0].nan_total, found[0].inf_total) == ((1, 0) if bad != bad else (0, 1))


@pytest.mark.parametrize(
    ("norms", "error", "message"),
    [
        (
            torch.ones(2),
            ValueError,
            r"norms must be a 1-D tensor with one norm per watched parameter \(6, .*got a tensor of shape \(2,\)",
        ),
        (torch.ones(6, 1), ValueError, r"got a tensor of shape \(6, 1\)"),
        ([1.0] * 6, TypeError, r"norms must be .* got list"),
        ({"head.weight": 1.0}, TypeError, r"got dict"),
    ],
)
def test_bad_norms_are_refused(
    provider: MeterProvider, norms: object, error: type, message: str
) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    backward(model)
    with pytest.raises(error, match=message):
        monitor.collect(norms=norms)  # type: ignore[arg-type]


# 7. A hot path with no hidden costs ----------------------------------------------------


def profiled_ops(work: Any) -> list[str]:
    with profile() as prof:
        work()
    return [event.name for event in prof.events()]


def test_a_healthy_collect_reads_nothing_to_the_host_but_its_flags(provider: MeterProvider) -> None:
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(20)])  # 20 tiny bias tensors
    monitor = GradMonitor(model, meter_provider=provider)
    model(torch.randn(4, 32)).sum().backward()
    monitor.collect()
    ops = profiled_ops(monitor.collect)
    assert "aten::_local_scalar_dense" not in ops and "aten::item" not in ops


def test_a_healthy_clip_that_must_raise_on_nonfinite_reads_the_host_once(
    provider: MeterProvider,
) -> None:
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
    monitor = GradMonitor(model, meter_provider=provider)
    model(torch.randn(4, 32)).sum().backward()

    def clip() -> None:
        gradtel.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True, monitor=monitor)

    clip()
    ops = profiled_ops(clip)
    # The total norm rides along with the flags: no second host read to decide whether to raise.
    assert "aten::_local_scalar_dense" not in ops and "aten::item" not in ops


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_non_contiguous_gradients_are_counted_without_copies(
    provider: MeterProvider, layout: str
) -> None:
    if layout == "transposed":
        param = nn.Parameter(torch.zeros(2048, 512).t())
    else:
        param = nn.Parameter(
            torch.zeros(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)
        )
    monitor = GradMonitor([("conv.weight", param)], meter_provider=provider, on_critical="ignore")
    param.grad = torch.zeros_like(param)
    assert not param.grad.is_contiguous()
    for healthy in (True, False):
        if not healthy:
            param.grad.fill_(NAN)
        with profile(record_shapes=True) as prof:
            monitor.collect()
        copied = [
            math.prod(event.input_shapes[0])
            for event in prof.events()
            if event.name in ("aten::copy_", "aten::clone", "aten::contiguous")
            and event.input_shapes
        ]
        assert max(copied, default=0) < 1024, (
            healthy,
            copied,
        )  # small results only, never the gradient
    assert monitor.collect().nan_total == param.numel()


def test_plans_are_made_once_per_parameter_when_the_gradient_set_changes(
    provider: MeterProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradtel.scan

    experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(8)])
    monitor = GradMonitor(experts, meter_provider=provider, on_warning="ignore")
    made: list[int] = []
    original = gradtel.scan._entry
    monkeypatch.setattr(gradtel.scan, "_entry", lambda t: made.append(1) or original(t))
    for step in range(16):  # like a mixture of experts: two experts get gradients per step
        experts.zero_grad(set_to_none=True)
        chosen = [step % 8, (step * 3 + 1) % 8]
        sum(experts[i](torch.randn(2, 8)).sum() for i in set(chosen)).backward()
        if step == 15:
            experts[chosen[0]].weight.grad[0, 0] = NAN
        health = monitor.collect()
    assert health.nan_by_layer == {str(chosen[0]): 1}
    assert len(made) == 16  # each of the 16 parameters planned once


class GradModeSeen(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.modes: set[bool] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is not torch._C._set_grad_enabled:  # entering no_grad itself
            self.modes.add(torch.is_grad_enabled())
        return func(*args, **(kwargs or {}))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_scan_and_clip_build_no_autograd_graph(provider: MeterProvider) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    model(torch.randn(4, 8)).pow(2).mean().backward(
        create_graph=True
    )  # gradients that require grad
    model.head.weight.grad.data[0, 0] = NAN
    assert model.head.weight.grad.requires_grad
    for work in (
        monitor.collect,
        lambda: gradtel.clip_grad_norm_(model.parameters(), 1.0, monitor=monitor),
    ):
        with GradModeSeen() as seen:
            work()
        assert seen.modes == {False}
