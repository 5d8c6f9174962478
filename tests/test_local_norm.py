"""Each rank's own gradient norm before the cross-rank reduction (``gradtel_local_grad_norm``)
and the host and device a process trains on (``gradtel_device_info``), on a real one-rank
gloo group; the CUDA labels' formats as nvidia-smi and dcgm-exporter print them."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import gradtel
from gradtel.attach import origin
from gradtel.attach.origin import OriginCounter
from gradtel.export.device import device_labels, gpu_uuid, pci_bus_id

from .conftest import absent, net, sample, samples
from .test_distributed import one_rank_group, torchrun  # noqa: F401 (a fixture)


def reference_norm(model: nn.Module) -> float:
    """The plain L2 norm of every parameter's gradient, as the test computes it."""
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))


def test_the_local_norm_is_the_norm_of_this_ranks_own_gradients(
    one_rank_group: None,  # noqa: F811
    provider: MeterProvider,
    registry: CollectorRegistry,
) -> None:
    # Small buckets: the norm adds up over several reductions.
    ddp = nn.parallel.DistributedDataParallel(net(), bucket_cap_mb=1e-4)
    monitor = gradtel.GradMonitor(ddp, meter_provider=provider, on_critical="ignore")
    for scale in (1.0, 50.0):
        ddp.zero_grad()
        (scale * ddp(torch.randn(8, 4)).sum()).backward()
        # One rank: the reduced gradients are its own.
        expected = reference_norm(ddp)
        health = monitor.collect()
        assert health.local_grad_norm == pytest.approx(expected, rel=1e-6)
        assert sample(samples(registry), "gradtel_local_grad_norm") == pytest.approx(
            expected, rel=1e-6
        )


def test_attached_the_local_norm_is_of_each_updates_own_gradients(
    one_rank_group: None,  # noqa: F811
    provider: MeterProvider,
) -> None:
    """``attach(optimizer)`` publishes the look it took at the end of backward: the update
    was never ended for the origin counter, whose next updates' buckets then counted as
    reduced already (a local norm of 0, and this rank's own NaN lost)."""
    ddp = nn.parallel.DistributedDataParallel(net(), bucket_cap_mb=1e-4)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.0)
    monitor = gradtel.GradMonitor(ddp, meter_provider=provider, on_critical="ignore")
    monitor.attach(optimizer)
    published: list[gradtel.GradHealth] = []
    monitor.subscribe(published.append)
    expected = []
    for _ in range(3):
        optimizer.zero_grad()
        ddp(torch.randn(8, 4)).sum().backward()
        expected.append(reference_norm(ddp))  # one rank: the reduced gradients are its own
        optimizer.step()
    assert [h.local_grad_norm for h in published] == pytest.approx(expected, rel=1e-6)


def test_under_a_grad_scaler_the_local_norm_is_of_the_unscaled_gradients(
    one_rank_group: None,  # noqa: F811
    provider: MeterProvider,
) -> None:
    """The reduction runs in backward, on gradients still multiplied by the loss scale: the
    local norm was the scale (1024) times this rank's own."""
    ddp = nn.parallel.DistributedDataParallel(net(), bucket_cap_mb=1e-4)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.0)
    monitor = gradtel.GradMonitor(ddp, meter_provider=provider)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(ddp(torch.randn(8, 4)).sum()).backward()
    scaler.unscale_(optimizer)
    expected = reference_norm(ddp)  # one rank: the reduced gradients are its own
    assert monitor.collect(scaler=scaler).local_grad_norm == pytest.approx(expected, rel=1e-6)


def test_with_no_sync_the_local_norm_is_of_the_accumulated_gradients(
    one_rank_group: None,  # noqa: F811
    provider: MeterProvider,
) -> None:
    ddp = nn.parallel.DistributedDataParallel(net())
    monitor = gradtel.GradMonitor(ddp, meter_provider=provider)
    with ddp.no_sync():
        ddp(torch.randn(8, 4)).sum().backward()
    ddp(torch.randn(8, 4)).sum().backward()  # the one reduction, of both micro-batches
    expected = reference_norm(ddp)
    assert monitor.collect().local_grad_norm == pytest.approx(expected, rel=1e-6)


def test_a_nan_keeps_the_last_finite_local_norm_and_counts_the_origin(
    one_rank_group: None,  # noqa: F811
    provider: MeterProvider,
    registry: CollectorRegistry,
) -> None:
    ddp = nn.parallel.DistributedDataParallel(net())
    monitor = gradtel.GradMonitor(ddp, meter_provider=provider, on_critical="ignore")
    ddp(torch.randn(8, 4)).sum().backward()
    finite = monitor.collect().local_grad_norm
    ddp.zero_grad()
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    ddp(x).sum().backward()
    health = monitor.collect()
    assert health.originated_here and health.local_grad_norm is not None
    assert math.isnan(health.local_grad_norm)
    assert sample(samples(registry), "gradtel_local_grad_norm") == finite


class BucketReads(TorchDispatchMode):
    """The torch operations that read ``bucket``'s memory (through any view of it)."""

    def __init__(self, bucket: torch.Tensor) -> None:
        super().__init__()
        self.memory, self.ops = bucket.untyped_storage().data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if not func.is_view and any(
            isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.memory
            for a in tree_leaves((args, kwargs))
        ):
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **kwargs)


def test_a_healthy_cpu_bucket_is_read_once_for_its_counts_and_its_norm() -> None:
    # The counts come from the norm's pass: a finite norm means no NaN and no Inf.
    bucket = torch.randn(10_000)
    counter = OriginCounter()
    with BucketReads(bucket) as reads:
        counter.add(bucket)
    assert reads.ops == ["dot"]
    values = counter.take()
    assert values is not None
    assert values[:2].tolist() == [0.0, 0.0]
    assert values[2].item() == pytest.approx(float(bucket.double().square().sum()), rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    size=st.integers(1, 3000),
    spots=st.lists(
        st.tuples(
            st.floats(0, 1, exclude_max=True),
            st.sampled_from(["nan", "inf", "-inf", "huge", "subnormal"]),
        ),
        max_size=8,
    ),
)
def test_the_counts_and_the_norm_from_one_pass_are_exact(
    dtype: torch.dtype, size: int, spots: list[tuple[float, str]]
) -> None:
    bucket = torch.randn(size).to(dtype)
    for where, kind in spots:
        big, tiny = torch.finfo(dtype).max, torch.finfo(dtype).smallest_normal / 4
        value = {"huge": big, "subnormal": tiny}.get(kind) or float(kind)
        bucket[int(where * size)] = value  # "huge" overflows the sum of squares: a false flag
    counter = OriginCounter()
    counter.add(bucket)
    values = counter.take()
    assert values is not None
    nan = int(bucket.isnan().sum())
    assert values[:2].tolist() == [nan, int(bucket.isinf().sum())]
    if nan == 0 and not bucket.isinf().any():
        # Squares that overflow the bucket's own sum are summed again in float64.
        expected = float(bucket.double().square().sum())
        assert values[2].item() == pytest.approx(expected, rel=1e-2)
    else:
        assert not math.isfinite(values[2].item())


@pytest.mark.parametrize("threads", [1, 2])  # torchrun gives each rank one thread
def test_the_local_norm_of_a_large_bucket_stays_close_to_a_float64_sum(threads: int) -> None:
    # One float32 sum over 2^24 values of 1e-3 drifts by 7e-4 (dot) to 2e-2 (vector_norm).
    bucket = torch.full((1 << 24,), 1e-3)
    kept = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        counter = OriginCounter()
        counter.add(bucket)
        values = counter.take()
    finally:
        torch.set_num_threads(kept)
    assert values is not None
    expected = float(bucket.double().square().sum())
    assert values[2].item() == pytest.approx(expected, rel=2e-4)


def test_a_bucket_of_many_chunks_is_summed_and_counted_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(origin, "SQUARES_CHUNK", 1000)
    bucket = torch.randn(10_007, dtype=torch.float64)
    counter = OriginCounter()
    counter.add(bucket)
    healthy = counter.take()
    assert healthy is not None
    assert healthy[2].item() == pytest.approx(float(bucket.square().sum()), rel=1e-12)
    bucket[10_005] = float("-inf")  # in the last, shorter chunk
    counter.add(bucket)
    unhealthy = counter.take()
    assert unhealthy is not None
    assert unhealthy[:2].tolist() == [0.0, 1.0]
    assert unhealthy[2].item() == math.inf


def test_a_float8_bucket_is_counted_on_every_path() -> None:
    bucket = torch.tensor([1.0, float("nan"), float("inf"), 2.0]).to(torch.float8_e5m2)
    counter = OriginCounter()
    counter.add(bucket, keys=("b",))
    counter.reduced(("b",), torch.tensor(False))
    counter.add(bucket, keys=("b",))  # accumulated onto a reduction that left it finite
    values = counter.take()
    assert values is not None
    assert values[:2].tolist() == [2.0, 2.0]


class ComplexNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(100, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The gradient is x itself: no complex product makes a NaN part of an Inf.
        return (torch.view_as_real(self.weight) * torch.view_as_real(x)).sum()


@pytest.mark.parametrize(
    ("bad", "nan", "inf"),
    [
        (complex(float("nan"), float("nan")), 1, 0),  # one NaN value, not one per part
        (complex(float("nan"), float("-inf")), 1, 0),  # a NaN part makes it NaN
        (complex(0, float("inf")), 0, 1),
    ],
)
def test_a_complex_gradient_counts_each_value_once_before_the_reduction(
    one_rank_group: None,  # noqa: F811
    provider: MeterProvider,
    bad: complex,
    nan: int,
    inf: int,
) -> None:
    # DDP reduces a complex bucket as its real view, two floats per value.
    ddp = nn.parallel.DistributedDataParallel(ComplexNet())
    monitor = gradtel.GradMonitor(ddp, meter_provider=provider, on_critical="ignore")
    x = torch.full((100,), 0.5, dtype=torch.complex64)
    x[3] = bad
    ddp(x).backward()
    grad = ddp.module.weight.grad
    assert grad is not None
    nan_parts = grad.real.isnan() | grad.imag.isnan()
    assert (int(nan_parts.sum()), int((grad.isinf() & ~nan_parts).sum())) == (nan, inf)
    health = monitor.collect()
    assert (health.local_nan_total, health.local_inf_total) == (nan, inf)
    assert (health.nan_total, health.inf_total) == (nan, inf)


def test_a_single_process_exports_no_local_norm(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    model = net()
    monitor = gradtel.GradMonitor(model, meter_provider=provider)
    model(torch.randn(8, 4)).sum().backward()
    assert monitor.collect().local_grad_norm is None
    absent(samples(registry), "gradtel_local_grad_norm")


def test_a_process_on_the_cpu_names_its_host_alone(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    gradtel.GradMonitor(net(), meter_provider=provider)
    found = samples(registry)
    info = {
        dict(labels)["host"]: value
        for (name, labels), value in found.items()
        if name == "gradtel_device_info"
    }
    assert info == {socket.gethostname(): 1}
    assert (
        sample(
            found,
            "gradtel_device_info",
            host=socket.gethostname(),
            device="cpu",
            gpu_uuid="",
            pci_bus_id="",
        )
        == 1
    )
    assert device_labels(torch.device("cpu"))["device"] == "cpu"


def test_gpu_labels_are_printed_as_dcgm_exporter_prints_them() -> None:
    assert gpu_uuid("604ac76c-d9cf-fef3-62e9-d92044ab6e52") == (
        "GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52"
    )
    assert gpu_uuid("GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52").count("GPU-") == 1
    assert pci_bus_id(0, 0x3B, 0) == "00000000:3B:00.0"
    assert pci_bus_id(1, 0xBD, 0x1F) == "00000001:BD:1F.0"
    with pytest.raises(ValueError):
        gpu_uuid("not a uuid")


def test_a_healthy_distributed_rank_adds_two_series_whatever_the_model(
    one_rank_group: None,  # noqa: F811
) -> None:
    def healthy_series(distributed: bool) -> int:
        registry = CollectorRegistry()
        model: nn.Module = nn.Sequential(*[nn.Linear(2, 2) for _ in range(700)])
        if distributed:
            model = nn.parallel.DistributedDataParallel(model)
        monitor = gradtel.GradMonitor(
            model, meter_provider=gradtel.prometheus_meter_provider(registry)
        )
        model(torch.randn(4, 2)).sum().backward()
        assert monitor.collect().status is gradtel.Status.HEALTHY
        return len([key for key in samples(registry) if key[0].startswith("gradtel_")])

    single, rank = healthy_series(False), healthy_series(True)
    # gradtel_device_info in both; gradtel_local_grad_norm on the rank alone.
    assert rank == single + 1 <= 200


@pytest.mark.slow
def test_in_a_3_rank_job_each_rank_exports_the_norm_of_its_own_gradients() -> None:
    run = torchrun("local_norm_trainer.py", ranks=3)
    assert run.returncode == 0, run.stderr[-3000:]
    said = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert sorted((s["scenario"], s["rank"]) for s in said) == [
        (scenario, rank)
        for scenario in ("each", "no_sync", "plain", "subgroup")
        for rank in range(3)
    ]
    for one in said:
        for update in one["updates"]:
            assert update["local"] == pytest.approx(update["own"], rel=1e-5), one
    # DDP over a group of one rank: gradtel's hook reduces over that group, not the world.
    for one in said:
        if one["scenario"] == "subgroup":
            assert all(u["apart"] < 1e-6 for u in one["updates"]), one
            assert one["replica_check"] is None, one
        else:
            assert one["replica_check"] == 250, one
    # The ranks' own norms differ (each its own data); the reduced gradients do not.
    firsts = {s["updates"][0]["local"] for s in said if s["scenario"] == "plain"}
    assert len(firsts) == 3
