"""Exact NaN/Inf counting against a straightforward element-by-element reference, and a
hot path without hidden costs: no host reads but the flags, no copies, no autograd graph."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.profiler import profile

import gradtel
from gradtel import GradMonitor
from gradtel.pipeline.scan import CHUNK, Scanner, count_nonfinite, countable_values

from .conftest import Net

NAN, INF = float("nan"), float("inf")
REAL = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
COMPLEX = [torch.complex64, torch.complex128]


def reference(tensor: torch.Tensor) -> tuple[int, int]:
    """Count element by element in Python: NaN if any part is NaN, else Inf if any part is Inf."""
    nan = inf = 0
    for value in tensor.detach().reshape(-1).to(torch.complex128).tolist():
        parts = (value.real, value.imag)
        if any(math.isnan(p) for p in parts):
            nan += 1
        elif any(math.isinf(p) for p in parts):
            inf += 1
    return nan, inf


@st.composite
def gradients(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(REAL + COMPLEX))
    shape = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    numel = math.prod(shape)
    tensor = torch.randn(shape, dtype=dtype)
    flat = tensor.view(-1)
    # A huge finite value sums past its dtype's range (fp32's, or fp16's largest).
    huge = min(1e38, torch.finfo(tensor.real.dtype if dtype in COMPLEX else dtype).max)
    specials = st.sampled_from([NAN, INF, -INF, huge])
    for index in draw(st.lists(st.integers(0, max(numel - 1, 0)), max_size=8)) if numel else []:
        value = draw(specials)
        if dtype in COMPLEX:
            flat[index] = complex(value, 0) if draw(st.booleans()) else complex(0, value)
        else:
            flat[index] = value
    if draw(st.booleans()) and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)  # non-contiguous gradients count the same
    return tensor


@settings(max_examples=300, deadline=None)
@given(st.lists(gradients(), min_size=1, max_size=6))
def test_counts_match_reference(tensors: list[torch.Tensor]) -> None:
    expected = {i: reference(t) for i, t in enumerate(tensors) if reference(t) != (0, 0)}
    assert count_nonfinite(tensors) == expected


def fast_reference(tensor: torch.Tensor) -> tuple[int, int]:
    """The same rule with plain torch ops in double precision, for large tensors."""
    wide = tensor.to(torch.complex128 if tensor.is_complex() else torch.float64)
    nan = int(torch.isnan(wide).sum())
    return nan, int((~torch.isfinite(wide)).sum()) - nan


@settings(max_examples=40, deadline=None)
@given(
    numel=st.integers(CHUNK - 2, 3 * CHUNK + 7),
    dtype=st.sampled_from(
        [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64]
    ),
    specials=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from([NAN, INF, -INF])), max_size=12
    ),
    nan_in_tail=st.booleans(),
    transposed=st.booleans(),
)
def test_large_tensors_are_counted_exactly_chunk_by_chunk(
    numel: int,
    dtype: torch.dtype,
    specials: list[tuple[float, float]],
    nan_in_tail: bool,
    transposed: bool,
) -> None:
    tensor = torch.randn(numel, dtype=dtype)
    for where, value in specials:
        tensor[int(where * numel)] = value
    if nan_in_tail:
        tensor[-1] = NAN
    if transposed and numel % 2 == 0:
        tensor = tensor.view(2, numel // 2).t()  # non-contiguous
    small = torch.randn(10, dtype=dtype)
    expected = {
        i: fast_reference(t) for i, t in enumerate([small, tensor]) if fast_reference(t) != (0, 0)
    }
    assert count_nonfinite([small, tensor]) == expected


def test_a_reused_plan_counts_each_update_afresh() -> None:
    scanner = Scanner()
    first = [torch.randn(3 * CHUNK), torch.randn(7)]
    first[0][CHUNK + 5] = INF
    assert scanner.count(first, slots=(0, 1)) == {0: (0, 1)}
    second = [torch.randn(3 * CHUNK), torch.randn(7)]
    second[1][2] = NAN
    second[0][-1] = NAN
    assert scanner.count(second, slots=(0, 1)) == {0: (1, 0), 1: (1, 0)}
    assert scanner.count([torch.ones(5)], slots=(2,)) == {}


def test_healthy_is_empty_and_false_alarms_count_zero() -> None:
    # Finite values whose sum overflows are flagged, then counted exactly as zero.
    huge = torch.full((4,), 3e38)
    assert count_nonfinite([torch.ones(3), huge, torch.zeros(0)]) == {}


def test_half_precision_sums_do_not_overflow_into_false_counts() -> None:
    grad = torch.full((100,), 60000.0, dtype=torch.float16)  # fp16 sum would be inf
    grad[3] = NAN
    assert count_nonfinite([grad]) == {0: (1, 0)}


def test_complex_element_with_nan_and_inf_parts_counts_as_nan() -> None:
    grad = torch.tensor([complex(INF, NAN), complex(1, INF), complex(-INF, 0), 1 + 1j])
    assert count_nonfinite([grad]) == {0: (1, 2)}


def test_counts_beyond_float32_precision_are_exact() -> None:
    # 2**24 + 3 cannot be held by a float32 count (the original design's .sum().float()).
    grad = torch.full((2**24 + 3,), NAN)
    assert count_nonfinite([grad]) == {0: (2**24 + 3, 0)}


def test_sparse_gradients_count_the_values_of_the_gradient_they_sum_to() -> None:
    coo = torch.sparse_coo_tensor(
        [[0, 0, 5, 7, 7, 7]], [INF, -INF, 1.0, NAN, 2.0, NAN], (10,), check_invariants=True
    )  # uncoalesced, as an embedding's gradient is when a token repeats
    csr = torch.tensor([[0.0, INF], [NAN, 0.0]]).to_sparse_csr()
    values = [countable_values(coo), countable_values(csr)]
    assert all(v is not None for v in values)
    dense = coo.to_dense()  # the gradient the optimizer applies
    reference = (int(dense.isnan().sum()), int(dense.isinf().sum()))
    assert reference == (2, 0)  # Inf + -Inf is one NaN; NaN, 2 and NaN at index 7 are one
    assert count_nonfinite(values) == {0: reference, 1: (1, 1)}  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_gradients_are_widened(dtype: torch.dtype) -> None:
    grad = torch.tensor([1.0, NAN, 2.0]).to(dtype)
    values = countable_values(grad)
    assert values is not None and values.dtype == torch.float32
    assert count_nonfinite([values]) == {0: (1, 0)}


def test_uncountable_kinds_are_refused() -> None:
    assert countable_values(torch.ones(3, dtype=torch.int64)) is None


class ReadOuts:
    """Counts every way a tensor's data can reach the host as Python values."""

    METHODS = ("tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))
        original_to = torch.Tensor.to

        def counting_to(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            moved = original_to(tensor, *args, **kwargs)
            if moved.device.type == "cpu" and tensor.device.type != "cpu":
                self.calls.append("to")
            return moved

        monkeypatch.setattr(torch.Tensor, "to", counting_to)

    def _counting(self, name: str, original: object) -> object:
        def counted(*args: object, **kwargs: object) -> object:
            self.calls.append(name)
            return original(*args, **kwargs)  # type: ignore[operator]

        return counted


def test_a_read_out_comes_back_as_values_and_leaves_the_scanner_as_it_was() -> None:
    """The scanner keeps plans, never the results of a count: two updates read out in
    either order (a deferred one after the next one's) cannot see each other's values."""
    scanner = Scanner()
    first = [torch.tensor([1.0, float("nan")]), torch.ones(3)]
    second = [torch.ones(2), torch.tensor([float("inf"), 1.0, 1.0])]
    early = scanner.launch(first, (0, 1), also=[torch.tensor([7.0])])
    late = scanner.launch(second, (0, 1), also=[torch.tensor([9.0])])
    kept = dict(vars(scanner))
    read_late, waited = scanner.read(late)
    read_early, _ = scanner.read(early)
    assert scanner.finish(second, late, read_late) == {1: (0, 1)}
    assert scanner.finish(first, early, read_early) == {0: (1, 0)}
    assert (read_early[-early.also :], read_late[-late.also :], waited) == ([7.0], [9.0], 0.0)
    assert vars(scanner) == kept


@pytest.mark.parametrize("bad_tensors", [0, 1, 10])
def test_one_read_out_per_phase_whatever_the_number_of_tensors(
    monkeypatch: pytest.MonkeyPatch, bad_tensors: int
) -> None:
    tensors = [torch.randn(64 if i % 3 else 2 * CHUNK + 1, dtype=REAL[i % 4]) for i in range(200)]
    for i in range(bad_tensors):
        tensors[i * 7][i] = NAN
    read_outs = ReadOuts(monkeypatch)
    counts = count_nonfinite(tensors)
    assert len(counts) == bad_tensors
    # One read-out decides healthy; an unhealthy update adds one for the exact counts,
    # and one to find the bad tensors of flagged batches of small tensors.
    small_ones_bad = any(i * 7 % 3 for i in range(bad_tensors))
    assert read_outs.calls == ["tolist"] * (1 if bad_tensors == 0 else 3 if small_ones_bad else 2)


@pytest.mark.parametrize("bad", [[], [0], [299], [5, 6], [17, 250, 251, 299]])
def test_one_flag_for_all_small_tensors_is_narrowed_down_level_by_level(
    monkeypatch: pytest.MonkeyPatch, bad: list[int]
) -> None:
    import gradtel.pipeline.scan

    # On CUDA one fused check flags every small tensor of a device and dtype: the same
    # plan, here on the CPU.
    monkeypatch.setattr(gradtel.pipeline.scan, "_batch_size", lambda device, small: small)
    tensors = [torch.randn(64) for _ in range(300)]
    expected = {}
    for k, i in enumerate(bad):
        tensors[i][k] = NAN if k % 2 else INF
        expected[i] = (k % 2, 1 - k % 2)
    assert Scanner().launch(tensors).result.numel() == 1
    read_outs = ReadOuts(monkeypatch)
    assert count_nonfinite(tensors) == expected
    # Healthy: one read-out. Unhealthy: batches of 16, then tensors, then the counts.
    assert read_outs.calls == ["tolist"] * (4 if bad else 1)


def test_a_plan_is_made_anew_when_the_tensors_change_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradtel.pipeline.scan

    plans: list[int] = []
    original = gradtel.pipeline.scan._assemble
    monkeypatch.setattr(
        gradtel.pipeline.scan,
        "_assemble",
        lambda entries: plans.append(len(entries)) or original(entries),
    )
    scanner = Scanner()
    tensors = [torch.randn(3 * CHUNK), torch.randn(100)]
    assert scanner.count(tensors, slots=(0, 1)) == {}
    assert scanner.count(tensors, slots=(0, 1)) == {}
    assert plans == [2]  # reused
    moved = [t.to(torch.bfloat16) for t in tensors]  # as after model.to(torch.bfloat16)
    moved[1][5] = INF
    assert scanner.count(moved, slots=(0, 1)) == {1: (0, 1)}
    assert plans == [2, 2]  # made anew: a plan's groups belong to one device and dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_fused_check_writes_every_value_back_unchanged(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    small = [torch.randn(n).to(dtype) for n in (3, 100, 4096)]
    info = torch.finfo(dtype)
    small[0].copy_(
        torch.tensor([-0.0, info.tiny / 4, -info.max], dtype=dtype)
    )  # signed zero, subnormal, extreme
    small.append(torch.randn(8, 8).to(dtype).t())  # non-contiguous
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[small[0].element_size()]
    bits = [t.view(as_int).clone() for t in small]
    assert count_nonfinite(small) == {}
    small[2][7] = NAN
    assert count_nonfinite(small) == {2: (1, 0)}
    small[2][7] = bits[2].view(dtype)[7]
    for tensor, before in zip(small, bits):
        assert torch.equal(tensor.view(before.dtype), before)  # bit for bit


def test_gradients_in_an_autograd_graph_are_only_read() -> None:
    tensors = [torch.randn(50, requires_grad=True) * 1 for _ in range(3)]  # non-leaf, in a graph
    tensors[1].data[4] = INF
    versions = [t._version for t in tensors]
    assert count_nonfinite(tensors) == {1: (0, 1)}
    assert [t._version for t in tensors] == versions  # never written: a later backward still works


def test_results_of_several_devices_are_gathered_on_the_accelerator() -> None:
    from gradtel.pipeline.scan import _on_one_device, stacked

    # A copy to the CPU that does not block can be read before it lands (a CUDA flag
    # would read as healthy): results meet on the accelerator, whichever comes first.
    # "meta" stands in for a CUDA device, which this test cannot assume.
    gathered = _on_one_device([torch.zeros(2), torch.zeros(3, device="meta"), torch.zeros(1)])
    assert gathered.device.type == "meta"
    assert gathered.shape == (6,)
    norms = stacked([torch.ones(()), torch.ones((), device="meta")])  # clipping's per-tensor norms
    assert norms.device.type == "meta" and norms.shape == (2,)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_exact_counts_launched_at_once_equal_the_two_phase_count(data: st.DataObject) -> None:
    shapes = [(3, 5), (CHUNK + 7,), (0,), (4, 4, 4), (1,), (2 * CHUNK,)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64]
    values = []
    for _ in range(data.draw(st.integers(1, 6))):
        tensor = torch.randn(data.draw(st.sampled_from(shapes))).to(
            data.draw(st.sampled_from(dtypes))
        )
        if tensor.dim() == 2 and data.draw(st.booleans()):
            tensor = tensor.t()  # not contiguous
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.t().view(-1)
        for _ in range(data.draw(st.integers(0, 4)) if tensor.numel() else 0):
            flat[data.draw(st.integers(0, tensor.numel() - 1))] = data.draw(
                st.sampled_from([float("nan"), float("inf"), -float("inf")])
            )
        values.append(tensor)
    scanner = Scanner()
    launched = scanner.launch_exact(values, [torch.tensor([3.0])])
    read = launched.result.tolist()
    assert scanner.finish(values, launched, read) == count_nonfinite(values)
    assert read[-launched.also :] == [3.0]


def test_a_healthy_collect_reads_nothing_to_the_host_but_its_flags(provider: MeterProvider) -> None:
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(20)])  # 20 tiny bias tensors
    monitor = GradMonitor(model, meter_provider=provider)
    model(torch.randn(4, 32)).sum().backward()
    monitor.collect()
    ops = profiled_ops(monitor.collect)
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
    import gradtel.pipeline.scan

    experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(8)])
    monitor = GradMonitor(experts, meter_provider=provider, on_warning="ignore")
    made: list[int] = []
    original = gradtel.pipeline.scan._entry
    monkeypatch.setattr(gradtel.pipeline.scan, "_entry", lambda t: made.append(1) or original(t))
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


def profiled_ops(work: Any) -> list[str]:
    with profile() as prof:
        work()
    return [event.name for event in prof.events()]


@pytest.mark.parametrize("complex_dtype", [False, True])
def test_exact_counts_of_one_piece_split_nan_from_inf(complex_dtype: bool) -> None:
    from gradtel.pipeline.scan import nan_and_inf

    values = torch.tensor([NAN, INF, -INF, 1.0, NAN, 0.0])
    if complex_dtype:
        values = torch.complex(values, torch.tensor([0.0, 0.0, NAN, 0.0, INF, INF]))
        assert nan_and_inf(values).tolist() == [3, 2]  # a NaN part makes the element NaN
    else:
        assert nan_and_inf(values).tolist() == [2, 2]


def test_several_batches_some_in_an_autograd_graph_are_flagged_each_on_its_own() -> None:
    from gradtel.pipeline.scan import BATCH, _fused_flags

    tensors = [torch.randn(8) for _ in range(3 * BATCH)]
    graph = torch.randn(8, requires_grad=True) * 2  # part of a graph: read, never written
    tensors[BATCH] = graph
    tensors[2 * BATCH + 1][3] = NAN
    batches = tuple(tuple(range(b, b + BATCH)) for b in range(0, 3 * BATCH, BATCH))
    assert _fused_flags(tensors, batches).tolist() == [0, 0, 1]
    graph.detach()[0] = INF
    assert _fused_flags(tensors, batches).tolist() == [0, 1, 1]
    assert _fused_flags(tensors, batches[:1]).tolist() == [0]
