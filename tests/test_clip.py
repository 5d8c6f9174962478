"""gradtel.clip_grad_norm_: torch's clipping, bit for bit, with the update's health from the
same pass."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel
from gradtel import GradMonitor, Status

from .conftest import Net, absent, net_backward, sample, samples
from .test_scan import ReadOuts, profiled_ops

NAN, INF = float("nan"), float("inf")


def record_collects(monitor: GradMonitor) -> list[gradtel.GradHealth]:
    """Keep every GradHealth that ``monitor.collect`` returns from now on."""
    found: list[gradtel.GradHealth] = []
    original = monitor.collect

    def recording_collect(**kwargs: object) -> gradtel.GradHealth:
        found.append(original(**kwargs))  # type: ignore[arg-type]
        return found[-1]

    monitor.collect = recording_collect  # type: ignore[method-assign]
    return found


def model_with_grads(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 300), nn.ReLU(), nn.Linear(300, 300), nn.Linear(300, 2))
    model(torch.randn(16, 8)).pow(2).sum().backward()
    return model


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clipping_matches_torch(provider: MeterProvider, norm_type: float) -> None:
    ours = model_with_grads()
    theirs = copy.deepcopy(ours)
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        reference.grad = mine.grad.clone()
    monitor = GradMonitor(ours, meter_provider=provider)
    total = gradtel.clip_grad_norm_(ours.parameters(), 0.5, norm_type, monitor=monitor)
    expected = nn.utils.clip_grad_norm_(theirs.parameters(), 0.5, norm_type)
    torch.testing.assert_close(total, expected)
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine.grad, reference.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipping_is_bit_for_bit_torch_s_and_skips_a_multiply_by_one(
    provider: MeterProvider, dtype: torch.dtype
) -> None:
    reference = model_with_grads().to(dtype)
    for p in reference.parameters():
        p.grad = p.grad.to(dtype)
    total = nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()
    # Around the edge where torch's coefficient reaches 1, in the dtype's own rounding.
    for max_norm in (
        0.5 * total,
        total,
        total * (1 + 1e-7),
        total + 1e-6,
        total * 1.004,
        total * 1.05,
        2 * total,
        INF,
    ):
        ours, theirs = copy.deepcopy(reference), copy.deepcopy(reference)
        for model in (ours, theirs):
            for p, q in zip(model.parameters(), reference.parameters()):
                p.grad = q.grad.clone()
        versions = [p.grad._version for p in ours.parameters()]
        monitor = GradMonitor(ours, meter_provider=provider)
        got = gradtel.clip_grad_norm_(ours.parameters(), max_norm, monitor=monitor)
        expected = nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
        assert torch.equal(got, expected)
        for mine, torchs in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(mine.grad, torchs.grad), max_norm
        if max_norm >= 1.05 * total:  # clearly under max_norm: not multiplied at all
            assert [p.grad._version for p in ours.parameters()] == versions
        monitor.close()


def test_counts_are_taken_before_clipping_spreads_nan(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = model_with_grads()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore", on_critical="ignore")
    model[2].weight.grad[0, :3] = NAN
    model[3].bias.grad[1] = -INF
    total = gradtel.clip_grad_norm_(model.parameters(), 1.0, monitor=monitor)
    assert torch.isnan(total)
    found = samples(registry)
    assert sample(found, "gradtel_update_nan_grads", layer="2") == 3
    assert sample(found, "gradtel_update_inf_grads", layer="3") == 1
    absent(found, "gradtel_update_nan_grads", layer="0")
    # torch's clipping with a NaN total norm then makes every gradient NaN.
    assert torch.isnan(model[0].weight.grad).all()


def test_skip_policy_clears_gradients_and_nothing_is_clipped(provider: MeterProvider) -> None:
    model = model_with_grads()
    monitor = GradMonitor(model, meter_provider=provider, on_critical="skip")
    model[0].weight.grad[:2] = INF  # 16 Inf: critical
    total = gradtel.clip_grad_norm_(model.parameters(), 1.0, monitor=monitor)
    assert total.item() == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_error_if_nonfinite_raises_after_recording(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = model_with_grads()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    model[3].weight.grad[0, 0] = NAN
    with pytest.raises(RuntimeError, match="gradtel has counted the non-finite values per layer"):
        gradtel.clip_grad_norm_(model.parameters(), 1.0, monitor=monitor, error_if_nonfinite=True)
    assert sample(samples(registry), "gradtel_nan_grads_total", layer="3") == 1


def test_clipping_a_subset_still_scans_every_watched_gradient(provider: MeterProvider) -> None:
    model = model_with_grads()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    model[0].bias.grad[4] = NAN  # not among the clipped parameters
    found = record_collects(monitor)
    gradtel.clip_grad_norm_(model[3].parameters(), 1.0, monitor=monitor)
    assert [dict(h.nan_by_layer) for h in found] == [{"0": 1}]


def test_healthy_clipping_adds_one_read_out_and_no_pass_over_gradients(
    provider: MeterProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_with_grads()
    monitor = GradMonitor(model, meter_provider=provider)
    sums: list[str] = []
    original_sum = torch.Tensor.sum
    monkeypatch.setattr(
        torch.Tensor, "sum", lambda t, *a, **k: sums.append("sum") or original_sum(t, *a, **k)
    )
    read_outs = ReadOuts(monkeypatch)
    gradtel.clip_grad_norm_(model.parameters(), 1.0, monitor=monitor)
    assert read_outs.calls == ["tolist"]
    assert sums == []  # the scan reused clipping's norms


def test_sparse_gradients_are_collected_before_torch_clips_them_or_refuses_to(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    embed = nn.Embedding(50, 4, sparse=True)
    monitor = GradMonitor(embed, meter_provider=provider, on_warning="ignore")
    embed(torch.tensor([1, 2])).sum().backward()
    embed.weight.grad._values()[0, 0] = NAN
    theirs = copy.deepcopy(embed)
    theirs.weight.grad = embed.weight.grad.clone()
    try:  # torch before 2.14 cannot clip sparse gradients; later ones can
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        refused: type[Exception] | None = None
    except NotImplementedError:
        refused = NotImplementedError
    if refused is None:
        gradtel.clip_grad_norm_(embed.parameters(), 1.0, monitor=monitor)
        assert torch.equal(
            embed.weight.grad.to_dense().isnan(), theirs.weight.grad.to_dense().isnan()
        )
    else:
        with pytest.raises(refused):
            gradtel.clip_grad_norm_(embed.parameters(), 1.0, monitor=monitor)
    assert sample(samples(registry), "gradtel_nan_grads_total", layer=gradtel.ROOT_LAYER) == 1


def test_clipping_with_a_parameter_frozen_after_the_monitor_was_made(
    provider: MeterProvider,
) -> None:
    model = model_with_grads()
    monitor = GradMonitor(model, meter_provider=provider, on_warning="ignore")
    model[0].bias.requires_grad_(False)  # keeps its gradient, but is no longer trained
    model[3].weight.grad[1, 7] = NAN
    found = record_collects(monitor)
    gradtel.clip_grad_norm_(model.parameters(), 1.0, monitor=monitor)
    assert [(dict(h.nan_by_layer), h.skipped) for h in found] == [({"3": 1}, 1)]


@pytest.mark.parametrize("readout", ["sync", "deferred"])
@pytest.mark.parametrize("max_norm", [1e9, 0.5])
def test_clipping_a_model_with_a_frozen_layer_gives_the_updates_norm(
    registry: CollectorRegistry, provider: MeterProvider, readout: str, max_norm: float
) -> None:
    """Fine-tuning with a frozen layer (no gradient there): ``clip_grad_norm_(model.parameters())``
    took the trained parameters for a subset, and exported no gradient norm at all."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(8, 300), nn.ReLU(), nn.Linear(300, 300), nn.Linear(300, 2))
    ours[0].requires_grad_(False)
    ours(torch.randn(16, 8)).pow(2).sum().backward()
    theirs = copy.deepcopy(ours)
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        reference.grad = None if mine.grad is None else mine.grad.clone()
    monitor = GradMonitor(ours, meter_provider=provider, readout=readout)  # type: ignore[arg-type]
    published: list[gradtel.GradHealth] = []
    monitor.subscribe(published.append)
    total = gradtel.clip_grad_norm_(ours.parameters(), max_norm, monitor=monitor)
    expected = nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    torch.testing.assert_close(total, expected)
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine.grad, reference.grad)
    monitor.flush()
    assert [h.grad_norm for h in published] == [pytest.approx(float(expected), rel=1e-5)]
    assert sample(samples(registry), "gradtel_grad_norm") == pytest.approx(
        float(expected), rel=1e-5
    )


def test_clipping_passes_the_scaler_the_loss_and_the_step_to_collect(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    monitor = gradtel.GradMonitor(model, meter_provider=provider)
    for step, bad in ((76, "overflow"), (77, "loss")):
        optimizer.zero_grad()
        loss = model(torch.randn(2, 4)).sum() * (float("nan") if bad == "loss" else 1.0)
        scaler.scale(loss).backward()
        model[0].weight.grad[0, 0] = float("inf")  # the scaled gradients overflow
        scaler.unscale_(optimizer)
        gradtel.clip_grad_norm_(
            model.parameters(), 1.0, monitor=monitor, scaler=scaler, loss=loss, step=step
        )
        scaler.step(optimizer)
        scaler.update()
    found = samples(registry)
    assert sample(found, "gradtel_skipped_updates_total", reason="amp_overflow") == 1  # step 76
    assert sample(found, "gradtel_nonfinite_loss_updates_total") == 1  # step 77: not an overflow
    assert sample(found, "gradtel_last_unhealthy_step", kind="nan") == 77


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
    net_backward(model)
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
    net_backward(model)
    model.head.weight.grad[0, 0] = bad
    found = record_collects(monitor)
    gradtel.clip_grad_norm_(model.parameters(), 1.0, norm_type, monitor=monitor)
    assert found[0].status is Status.WARNING
    assert (found[0].nan_total, found[0].inf_total) == ((1, 0) if bad != bad else (0, 1))


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


@pytest.mark.parametrize("readout", ["sync", "deferred"])
@pytest.mark.parametrize("sample_every", [1, 2])
@pytest.mark.parametrize("frozen", [True, False])
def test_clipping_goes_on_when_a_layer_is_added_in_training(
    provider: MeterProvider,
    registry: CollectorRegistry,
    sample_every: int,
    frozen: bool,
    readout: str,
) -> None:
    """The norms clipping computed are for the parameters watched before the layer came: the
    refresh inside collect() scans the gradients instead, and training never sees an error."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    monitor = GradMonitor(
        model,
        meter_provider=provider,
        sample_every=sample_every,
        on_error="raise",
        readout=readout,  # type: ignore[arg-type]
    )
    collected = record_collects(monitor)
    for step in range(4):
        if step == 1:
            model.add_module("extra", nn.Linear(1, 1).requires_grad_(not frozen))
        model.zero_grad()
        model[1](model[0](torch.ones(2, 4))).sum().backward()
        model[1].weight.grad[0, 0] = NAN
        total = gradtel.clip_grad_norm_(model.parameters(), 1.0, monitor=monitor)
        assert torch.isnan(total)
    assert "extra" in monitor.layers
    monitor.flush()
    scanned = [step % sample_every == 0 for step in range(4)]
    if readout == "sync":
        assert [h.nan_total for h in collected] == [int(s) for s in scanned]
    # Either way, every scanned update's NaN is counted.
    assert sample(
        samples(registry), "gradtel_unhealthy_updates_total", kind="nan", severity="warning"
    ) == sum(scanned)
