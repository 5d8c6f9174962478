"""The replica fingerprint: exact (equal for equal bits, different for one ulp) in every
dtype, mixed over many tensors so that swapped tensors show; the option that sets it; what a
DistributedDataParallel monitor exports, in a real (fake-backend) process group of 4."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.testing._internal.distributed.fake_pg import FakeStore

import gradtel
from gradtel import GradMonitor
from gradtel.metrics import REPLICA_FINGERPRINT, REPLICA_FINGERPRINT_UPDATE
from gradtel.options import DEFAULT_REPLICA_CHECK_EVERY
from gradtel.pipeline.fingerprint import FINGERPRINT_BITS, fingerprint

from .conftest import net

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]


def tensors(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(shape).to(dtype) for shape in ((64, 32), (32,), (3, 5, 7), (1,))]


def one_ulp_up(tensor: torch.Tensor, index: int) -> torch.Tensor:
    """``tensor`` with the element at flat ``index`` one ulp larger (its bit pattern + 1)."""
    changed = tensor.clone()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[changed.element_size()]
    changed.view(-1).view(ints)[index] += 1
    return changed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_bits_give_equal_fingerprints_and_one_ulp_anywhere_a_different_one(
    dtype: torch.dtype,
) -> None:
    replica = tensors(dtype)
    expected = fingerprint(replica)
    assert fingerprint([t.clone() for t in replica]) == expected
    assert 0 <= expected < 2**FINGERPRINT_BITS
    for which, tensor in enumerate(replica):
        for index in (0, tensor.numel() // 2, tensor.numel() - 1):
            drifted = list(replica)
            drifted[which] = one_ulp_up(tensor, index)
            assert fingerprint(drifted) != expected, (which, index)


def test_many_tensors_are_combined_by_position_so_that_swapped_tensors_show() -> None:
    torch.manual_seed(1)
    many = [torch.randn(16) for _ in range(300)]
    expected = fingerprint(many)
    for i, j in ((0, 1), (0, 299), (150, 151)):
        swapped = list(many)
        swapped[i], swapped[j] = many[j], many[i]
        assert fingerprint(swapped) != expected, (i, j)
    # A value moved from one tensor to another is a change too.
    moved = [t.clone() for t in many]
    moved[7][3], moved[8][3] = many[8][3], many[7][3]
    assert fingerprint(moved) != expected


def test_a_fingerprint_survives_a_float64_sample_exactly() -> None:
    value = fingerprint(tensors())
    assert int(float(value)) == value


def test_non_contiguous_tensors_are_hashed_by_their_values() -> None:
    square = torch.randn(8, 8)
    assert fingerprint([square.t()]) == fingerprint([square.t().contiguous()])


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (
            -1,
            ValueError,
            r"replica_check_every must be >= 0 \(0 or None: no replica check\), got -1",
        ),
        (
            2.5,
            TypeError,
            r"replica_check_every must be an int >= 0 \(0 or None: no replica check\), got 2.5 \(float\)",
        ),
        (
            True,
            TypeError,
            r"replica_check_every must be an int >= 0 \(0 or None: no replica check\), got True \(bool\)",
        ),
    ],
)
def test_bad_replica_check_every(value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        GradMonitor(nn.Linear(2, 2), replica_check_every=value)  # type: ignore[arg-type]


def test_the_replica_check_is_on_by_default_and_0_or_none_turns_it_off() -> None:
    assert GradMonitor(nn.Linear(2, 2)).options.replica_check == DEFAULT_REPLICA_CHECK_EVERY
    for off in (0, None):
        assert GradMonitor(nn.Linear(2, 2), replica_check_every=off).options.replica_check is None


@pytest.fixture
def four_ranks() -> Iterator[None]:
    """This process as rank 1 of 4, on torch's fake backend (collectives do nothing)."""
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        yield
    finally:
        dist.destroy_process_group()


def replica_series(registry: CollectorRegistry) -> dict[tuple[str, str], int]:
    """``(metric, slot) -> value`` of the replica series, as scraped."""
    text = generate_latest(registry).decode()
    return {
        (s.name, s.labels["slot"]): int(s.value)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name in (REPLICA_FINGERPRINT.name, REPLICA_FINGERPRINT_UPDATE.name)
    }


def update(model: nn.Module, monitor: GradMonitor, optimizer: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    monitor.collect()
    optimizer.step()


@pytest.mark.usefixtures("four_ranks")
def test_a_ddp_rank_exports_the_latest_two_checks_every_n_updates(
    registry: CollectorRegistry,
) -> None:
    model = DistributedDataParallel(net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(
        model,
        meter_provider=gradtel.prometheus_meter_provider(registry),
        replica_check_every=3,
        sample_every=2,  # a sampled-out update is checked all the same
    )
    # Checked in collect(), before the step: the parameters the previous step left.
    before = {}
    try:
        for n in range(1, 8):
            before[n] = fingerprint(list(model.parameters()))
            update(model, monitor, optimizer)
            if n == 1:  # the weights DDP broadcast
                assert replica_series(registry) == {
                    (REPLICA_FINGERPRINT_UPDATE.name, "latest"): 1,
                    (REPLICA_FINGERPRINT.name, "latest"): before[1],
                }
        assert len(set(before.values())) == 7  # every step changed the weights
        assert replica_series(registry) == {
            (REPLICA_FINGERPRINT_UPDATE.name, "latest"): 7,
            (REPLICA_FINGERPRINT.name, "latest"): before[7],
            (REPLICA_FINGERPRINT_UPDATE.name, "previous"): 4,  # sampled out, checked
            (REPLICA_FINGERPRINT.name, "previous"): before[4],
        }
    finally:
        monitor.close()


@pytest.mark.usefixtures("four_ranks")
def test_the_check_is_off_for_a_model_that_is_not_ddp_and_says_so_once(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gradtel")
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(model, meter_provider=gradtel.prometheus_meter_provider(registry))
    try:
        for _ in range(3):
            update(model, monitor, optimizer)
        assert replica_series(registry) == {}
        said = [r.getMessage() for r in caplog.records if "replica check off" in r.getMessage()]
        assert said == [
            "rank 1: gradtel: replica check off: it compares the parameters of DistributedDataParallel "
            "replicas, and this model is a Sequential (FSDP shards and model-parallel parts "
            "differ by design)"
        ]
    finally:
        monitor.close()


def test_a_single_process_exports_no_replica_series(registry: CollectorRegistry) -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(
        model, meter_provider=gradtel.prometheus_meter_provider(registry), replica_check_every=1
    )
    try:
        update(model, monitor, optimizer)
        assert replica_series(registry) == {}
    finally:
        monitor.close()


def test_scalars_and_the_wrap_of_a_sum_past_its_width_are_exact() -> None:
    # Bit patterns near the top of int64 wrap when summed: a wrapped sum is still exact.
    large = torch.full((1000,), -1e300, dtype=torch.float64)
    scalar = torch.tensor(0.5)
    expected = fingerprint([large, scalar])
    assert fingerprint([large.clone(), scalar.clone()]) == expected
    assert fingerprint([one_ulp_up(large, 999), scalar]) != expected
    assert fingerprint([large, torch.nextafter(scalar, torch.tensor(1.0))]) != expected


def test_a_complex_parameter_is_hashed_by_its_parts() -> None:
    z = torch.randn(8, dtype=torch.complex128)
    moved = z.clone()
    moved[3] = complex(moved[3].real.item(), math.nextafter(moved[3].imag.item(), math.inf))
    assert fingerprint([z]) == fingerprint([z.clone()])
    assert fingerprint([z]) != fingerprint([moved])
