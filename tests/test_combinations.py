"""Every combination of the options users mix, against a plain count made by the test.

Each case trains a tiny model for a few updates with one combination of: read-out
(sync, deferred on the CPU, deferred as on an accelerator), clipping (none, torch's
after ``collect()``, ``gradtel.clip_grad_norm_``), ``sample_every`` (1, 3), an enabled
``GradScaler`` (none, or one whose scaled gradients overflow), the way gradtel is
called (``collect()``, ``attach()``), ``zero_grad(set_to_none=...)`` and gradient
accumulation (1 or 2 micro-batches). NaN and Inf are injected at random places and
updates (seeded). Every health ``collect()`` returns and every exported series is
checked against what the test itself counted in the gradients at the collection
point. A failure prints the combination and the seed to rerun it alone.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel
from gradtel import GradHealth, Status, Thresholds

from .conftest import Samples, samples

LAYERS = ("0", "2", "4")  # in model order; backward produces them in reverse
UPDATES = 7


@dataclass(frozen=True)
class Case:
    readout: str  # "sync", "deferred" (the CPU), "queued" (deferred, as on an accelerator)
    clip: str  # "none", "torch" (after collect(), or before step() when attached), "gradtel"
    sample_every: int
    scaler: bool
    path: str  # "collect", "attach"
    set_to_none: bool
    accumulation: int

    def __str__(self) -> str:
        return (
            f"readout={self.readout} clip={self.clip} sample_every={self.sample_every} "
            f"scaler={self.scaler} path={self.path} set_to_none={self.set_to_none} "
            f"accumulation={self.accumulation}"
        )


def cases() -> list[Case]:
    found = []
    for combo in itertools.product(
        ("sync", "deferred", "queued"), ("none", "torch", "gradtel"), (1, 3), (False, True),
        ("collect", "attach"), (True, False), (1, 2),
    ):  # fmt: skip
        found.append(Case(*combo))
    return found


CASES = cases()


def reference(model: nn.Module) -> tuple[Counter[str], Counter[str]]:
    """NaN and Inf per layer in the gradients as they are now, counted plainly."""
    nan: Counter[str] = Counter()
    inf: Counter[str] = Counter()
    for name, p in model.named_parameters():
        if p.grad is not None:
            layer = name.rpartition(".")[0]
            nan[layer] += int(torch.isnan(p.grad).sum())
            inf[layer] += int(torch.isinf(p.grad).sum())
    return +nan, +inf


class Injector:
    """Puts a few NaN or ±Inf values (sometimes past the critical threshold) into random
    gradients during the backward passes it is armed for, as backward itself would."""

    def __init__(self, model: nn.Module, rng: random.Random) -> None:
        self.rng, self.plan = rng, {}
        params = list(model.parameters())
        for p in params:
            p.register_post_accumulate_grad_hook(self._hook)
        self.params = params

    def arm(self) -> None:
        """Plan the values for the next backward pass, or nothing (60% of passes)."""
        self.plan = {}
        if self.rng.random() < 0.4:
            for _ in range(self.rng.choice((1, 1, 2, 7))):
                p = self.rng.choice(self.params)
                value = self.rng.choice((float("nan"), float("inf"), -float("inf")))
                self.plan.setdefault(id(p), []).append((self.rng.randrange(p.numel()), value))

    def _hook(self, param: torch.Tensor) -> None:
        assert param.grad is not None
        for index, value in self.plan.pop(id(param), []):
            param.grad.view(-1)[index] = value


@dataclass
class Expected:
    """The series the test expects, summed from its own counts."""

    grads: Counter[tuple[str, str]]
    unhealthy: Counter[tuple[str, str]]
    updates: int = 0
    amp_skips: int = 0


def expect(expected: Expected, nan: Counter[str], inf: Counter[str], overflow: bool) -> None:
    """Add one scanned update to ``expected``: an overflow the scaler skips, or its counts."""
    expected.updates += 1
    if overflow:
        expected.amp_skips += 1
        return
    for kind, counts in (("nan", nan), ("inf", inf)):
        for layer, n in counts.items():
            expected.grads[(kind, layer)] += n
        band = Thresholds().classify(sum(counts.values()))
        if band is not Status.HEALTHY:
            expected.unhealthy[(kind, band.value)] += 1


def check_health(health: GradHealth, nan: Counter[str], inf: Counter[str], overflow: bool) -> None:
    got = (dict(health.nan_by_layer), dict(health.inf_by_layer))
    assert got == (dict(nan), dict(inf)), (
        f"step {health.step}: counted {got}, expected {(dict(nan), dict(inf))}"
    )
    assert health.amp_overflow == overflow, (
        f"step {health.step}: amp_overflow={health.amp_overflow}"
    )
    # Backward produces the layers last to first: the first bad one is the last in model order.
    for kind, counts, first in (
        ("NaN", nan, health.first_nan_layer),
        ("Inf", inf, health.first_inf_layer),
    ):
        want = max(counts, key=LAYERS.index) if counts else None
        assert first == want, f"step {health.step}: first {kind} layer {first}, expected {want}"


def check_series(found: Samples, expected: Expected, layers: tuple[str, ...] = LAYERS) -> None:
    def value(name: str, **labels: str) -> float:
        return found.get((name, frozenset(labels.items())), 0.0)

    for kind in ("nan", "inf"):
        for layer in layers:
            got = value(f"gradtel_{kind}_grads_total", layer=layer)
            assert got == expected.grads[(kind, layer)], (
                f"{kind} in {layer}: {got}, expected {expected.grads[(kind, layer)]}"
            )
        for severity in ("warning", "critical"):
            got = value("gradtel_unhealthy_updates_total", kind=kind, severity=severity)
            want = expected.unhealthy[(kind, severity)]
            assert got == want, f"{kind} {severity} updates: {got}, expected {want}"
    assert value("gradtel_updates_total") == expected.updates, "updates_total"
    got = value("gradtel_skipped_updates_total", reason="amp_overflow")
    assert got == expected.amp_skips, f"amp_overflow skips: {got}, expected {expected.amp_skips}"


def start(
    readout: str, seed: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[random.Random, CollectorRegistry, MeterProvider]:
    """The seeded random source, and a fresh registry and provider; ``"queued"`` makes the
    monitor read out as on a device whose work is queued (a GPU's)."""
    torch.manual_seed(seed)
    if readout == "queued":
        monkeypatch.setattr("gradtel.pipeline.update.completes_when_queued", lambda tensor: False)
    registry = CollectorRegistry()
    return random.Random(seed), registry, gradtel.prometheus_meter_provider(registry)


def run_all(
    cases: list[Case] | list[FrameworkCase],
    run: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run every case, each with its own seed; fail with the failing cases, one a line."""
    failures = []
    for index, case in enumerate(cases):
        with monkeypatch.context() as patch:
            try:
                run(case, seed=index, monkeypatch=patch)
            except AssertionError as exc:
                failures.append(f"seed={index} {case}: {str(exc).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {len(cases)} combinations failed:\n" + "\n".join(
        failures[:20]
    )


def run(case: Case, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng, registry, provider = start(case.readout, seed, monkeypatch)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if case.scaler else None
    monitor = gradtel.GradMonitor(
        model,
        meter_provider=provider,
        readout="sync" if case.readout == "sync" else "deferred",
        sample_every=case.sample_every,
        on_warning="ignore",
        on_critical="ignore",
    )
    seen: dict[int, tuple[Counter[str], Counter[str], bool]] = {}  # by step, as collect() saw it
    at_collection: list[tuple[Counter[str], Counter[str]]] = []
    if case.path == "attach":
        monitor.attach(optimizer, scaler=scaler)
        # With a scaler, attach() collects when it unscales: the gradients as they are then.
        monitor.collect = _spy(monitor.collect, model, at_collection)  # type: ignore[method-assign]
    expected = Expected(Counter(), Counter())
    injector = Injector(model, rng)
    healths: list[GradHealth] = []
    try:
        for update in range(1, UPDATES + 1):
            optimizer.zero_grad(set_to_none=case.set_to_none)
            for _ in range(case.accumulation):
                loss = model(torch.randn(3, 4)).pow(2).mean()
                injector.arm()
                (loss if scaler is None else scaler.scale(loss)).backward()
            if case.path == "attach" and scaler is None:
                nan, inf = reference(model)  # attach() counts the gradients as backward left them
                clip(
                    case, model, monitor, scaler, update
                )  # the usual loop: between backward and step
                step(optimizer, scaler)
            elif case.path == "attach":
                if case.clip != "none":  # clipping under AMP unscales first: gradtel collects there
                    scaler.unscale_(optimizer)
                    clip(case, model, monitor, scaler, update)
                step(optimizer, scaler)
                nan, inf = at_collection[-1]
            else:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                nan, inf = reference(model)
                if case.clip == "gradtel":
                    gradtel.clip_grad_norm_(
                        model.parameters(), 1.0, monitor=monitor, scaler=scaler, step=update
                    )
                else:
                    healths.append(monitor.collect(scaler=scaler, step=update))
                    if case.clip == "torch":
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                step(optimizer, scaler)
            if scaler is not None:
                scaler.update()
            overflow = scaler is not None and bool(nan or inf)
            if (update - 1) % case.sample_every == 0:
                seen[update] = (nan, inf, overflow)
                expect(expected, nan, inf, overflow)
        monitor.flush()
        for health in healths:
            if health.step in seen and not health.pending:
                check_health(health, *seen[health.step])
            elif health.step not in seen:
                assert health.status is Status.UNKNOWN and not health.sampled, (
                    f"step {health.step} sampled out"
                )
        check_series(samples(registry), expected)
    finally:
        monitor.close()
        provider.shutdown()


def clip(
    case: Case,
    model: nn.Module,
    monitor: gradtel.GradMonitor,
    scaler: torch.amp.GradScaler | None,
    update: int,
) -> None:
    """Clipping as the case asks, beside ``attach()``: gradtel's collects the update only
    when ``attach()`` has not (it repeats its health then)."""
    if case.clip == "torch":
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    elif case.clip == "gradtel":
        gradtel.clip_grad_norm_(
            model.parameters(), 1.0, monitor=monitor, scaler=scaler, step=update
        )


def step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)


def _spy(collect, model, at_collection):  # type: ignore[no-untyped-def]
    def spied(*args, **kwargs):  # type: ignore[no-untyped-def]
        at_collection.append(reference(model))
        return collect(*args, **kwargs)

    return spied


def test_every_combination_publishes_what_a_plain_count_finds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_all(CASES, run, monkeypatch)


@dataclass(frozen=True)
class FrameworkCase:
    readout: str
    scaler: bool
    accumulation: int
    sample_every: int

    def __str__(self) -> str:
        return (
            f"Lightning readout={self.readout} scaler={self.scaler} "
            f"accumulate_grad_batches={self.accumulation} sample_every={self.sample_every} clip=1.0"
        )


FRAMEWORK_CASES = [
    FrameworkCase(*combo)
    for combo in itertools.product(("sync", "queued"), (False, True), (1, 2), (1, 3))
]


def run_lightning(case: FrameworkCase, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import MixedPrecision

    from gradtel.integrations.lightning import GradtelCallback

    rng, registry, provider = start(case.readout, seed, monkeypatch)
    expected = Expected(Counter(), Counter())
    collected = [0]

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
            )

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).pow(2).mean()

        def on_before_backward(self, loss: torch.Tensor) -> None:
            injector.arm()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Reference(pl.Callback):
        """Counts what gradtel's callback is about to count (it runs first)."""

        def on_before_optimizer_step(
            self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: object
        ) -> None:
            collected[0] += 1
            if (collected[0] - 1) % case.sample_every == 0:
                nan, inf = reference(module)
                expect(expected, nan, inf, overflow=case.scaler and bool(nan or inf))

    callback = GradtelCallback(
        serve_metrics=False, meter_provider=provider, sample_every=case.sample_every,
        readout="sync" if case.readout == "sync" else "deferred", on_warning="ignore", on_critical="ignore",
    )  # fmt: skip
    module = Tiny()
    injector = Injector(module.net, rng)
    plugins = (
        [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=4.0))]
        if case.scaler
        else []
    )
    trainer = pl.Trainer(
        max_steps=UPDATES, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
        accumulate_grad_batches=case.accumulation, plugins=plugins, callbacks=[Reference(), callback],
    )  # fmt: skip
    data = torch.utils.data.TensorDataset(torch.randn(3 * UPDATES * case.accumulation, 4))
    try:
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=3))
        check_series(samples(registry), expected, layers=tuple(f"net.{layer}" for layer in LAYERS))
    finally:
        provider.shutdown()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_lightning_callback_in_combination_publishes_what_a_plain_count_finds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_all(FRAMEWORK_CASES, run_lightning, monkeypatch)
