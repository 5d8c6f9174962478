"""``attach()`` in the loop shapes real training scripts have: clipping between backward
and ``optimizer.step()``, and the AMP shape with a scaler that is disabled (fp32/bf16).
Small copy-free stand-ins: a GPT-like block and a PPO-like actor-critic."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel

from .conftest import sample, samples


class Block(nn.Module):
    """A GPT-like model: embedding, one attention-shaped and one MLP-shaped block, head."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(32, 16)
        self.c_attn = nn.Linear(16, 48)
        self.c_proj = nn.Linear(48, 16)
        self.c_fc = nn.Linear(16, 64)
        self.mlp_proj = nn.Linear(64, 16)
        self.ln_f = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        x = x + self.c_proj(torch.relu(self.c_attn(x)))
        x = x + self.mlp_proj(torch.relu(self.c_fc(x)))
        return self.lm_head(self.ln_f(x))


class ActorCritic(nn.Module):
    """A PPO-like agent: separate actor and critic heads."""

    def __init__(self) -> None:
        super().__init__()
        self.actor = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
        self.critic = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))

    def loss(self, obs: torch.Tensor) -> torch.Tensor:
        logits, value = self.actor(obs), self.critic(obs)
        return -torch.log_softmax(logits, -1)[:, 0].mean() + value.pow(2).mean()


def truth(model: nn.Module) -> tuple[Counter[str], Counter[str], float]:
    nan: Counter[str] = Counter()
    inf: Counter[str] = Counter()
    for name, p in model.named_parameters():
        assert p.grad is not None
        nan[name.rpartition(".")[0]] += int(torch.isnan(p.grad).sum())
        inf[name.rpartition(".")[0]] += int(torch.isinf(p.grad).sum())
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    return +nan, +inf, norm


def loss_of(model: nn.Module) -> torch.Tensor:
    if isinstance(model, Block):
        ids = torch.randint(0, 32, (2, 8))
        return nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    assert isinstance(model, ActorCritic)
    return model.loss(torch.randn(8, 4))


@pytest.mark.parametrize("shape", ["clip before step", "AMP shape, scaler disabled"])
@pytest.mark.parametrize("make", [Block, ActorCritic], ids=["GPT-like", "PPO-like"])
def test_attach_counts_the_gradients_as_backward_left_them_not_as_clipping_made_them(
    provider: MeterProvider, registry: CollectorRegistry, shape: str, make: type[nn.Module]
) -> None:
    torch.manual_seed(0)
    model = make()
    bad = model.c_attn if isinstance(model, Block) else model.actor[0]
    bad_layer = "c_attn" if isinstance(model, Block) else "actor.0"

    def diverge(param: torch.Tensor) -> None:  # backward itself makes 3 NaN and 5 Inf here
        if poison:
            assert param.grad is not None
            param.grad.view(-1)[:3] = float("nan")
            param.grad.view(-1)[3:8] = float("inf")

    poison = False
    bad.weight.register_post_accumulate_grad_hook(diverge)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    monitor = gradtel.GradMonitor(model, meter_provider=provider, grad_norm=True)
    monitor.attach(optimizer, scaler=scaler if shape.startswith("AMP") else None)
    seen = []
    for step in range(1, 4):
        poison = step == 3
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model) * (1000.0 if step == 2 else 1.0)  # step 2: a large, healthy norm
        if shape.startswith("AMP"):
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            seen.append(truth(model))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            seen.append(truth(model))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        if step == 2:
            found = samples(registry)
            assert seen[1][2] > 10  # clipped to 1.0 afterwards: gradtel keeps the norm before
            assert sample(found, "gradtel_grad_norm") == pytest.approx(seen[1][2], rel=1e-5)
    nan, inf, _ = seen[2]
    assert (dict(nan), dict(inf)) == ({bad_layer: 3}, {bad_layer: 5})
    found = samples(registry)
    for kind, counts in (("nan", nan), ("inf", inf)):
        for layer in (
            ("c_attn", "c_proj", "lm_head")
            if isinstance(model, Block)
            else ("actor.0", "actor.2", "critic.0")
        ):
            got = found.get((f"gradtel_{kind}_grads_total", frozenset({("layer", layer)})), 0.0)
            assert got == counts[layer], (kind, layer)
        assert sample(found, "gradtel_first_bad_layer", kind=kind, layer=bad_layer) == 3
        assert (
            sample(found, "gradtel_unhealthy_updates_total", kind=kind, severity="warning") == 1
        )  # 3 and 5


def nan_from_backward(param: torch.Tensor, when: list[bool]) -> None:
    """Make backward itself leave 2 NaN in ``param``'s gradient while ``when[0]``."""

    def hook(p: torch.Tensor) -> None:
        if when[0]:
            assert p.grad is not None
            p.grad.view(-1)[:2] = float("nan")

    param.register_post_accumulate_grad_hook(hook)


@pytest.mark.parametrize("optimizer", ["SGD with a closure", "LBFGS"])
def test_attach_collects_after_the_backward_inside_a_closure(
    provider: MeterProvider, registry: CollectorRegistry, optimizer: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    bad = [False]
    nan_from_backward(model[2].weight, bad)
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=1e-3)
        if optimizer.startswith("SGD")
        else torch.optim.LBFGS(model.parameters(), max_iter=3)
    )
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, on_warning="skip", on_critical="skip"
    )
    monitor.attach(opt, step=lambda: step)
    x = torch.randn(8, 4)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    for step in range(1, 5):
        bad[0] = step == 3
        opt.step(closure)
    found = samples(registry)
    assert sample(found, "gradtel_nan_grads_total", layer="2") == 2  # the update of step 3, once
    assert sample(found, "gradtel_last_unhealthy_step", kind="nan") == 3
    assert sample(found, "gradtel_updates_total") == 4
    assert sample(found, "gradtel_unscanned_updates_total", reason="no_gradients") == 0


def test_one_update_per_iteration_with_two_optimizers_over_one_model(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    bad = [False]
    nan_from_backward(model[0].weight, bad)
    body = torch.optim.SGD(model[0].parameters(), lr=1e-3)  # as Muon takes the matrices
    head = torch.optim.AdamW(model[2].parameters(), lr=1e-3)
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, grad_norm=True, on_warning="skip", on_critical="skip"
    )
    monitor.attach(body)
    monitor.attach(head)
    norms = []
    for iteration in range(3):
        bad[0] = iteration == 1
        body.zero_grad()
        head.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        body.step()
        head.step()
        if iteration != 1:
            assert sample(samples(registry), "gradtel_grad_norm") == pytest.approx(
                norms[-1], rel=1e-5
            )
    found = samples(registry)
    assert sample(found, "gradtel_updates_total") == 3
    assert sample(found, "gradtel_nan_grads_total", layer="0") == 2  # before clipping, once


@pytest.mark.parametrize("attach_again", [True, False])
def test_a_replaced_head_is_counted_before_clipping(
    provider: MeterProvider, registry: CollectorRegistry, attach_again: bool
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    monitor = gradtel.GradMonitor(
        model, meter_provider=provider, grad_norm=True, on_warning="ignore"
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    attachment = monitor.attach(optimizer)
    model[2] = nn.Linear(8, 2)  # the fine-tune switch: a new head, a frozen body
    model[0].requires_grad_(False)
    bad = [False]
    nan_from_backward(model[2].weight, bad)
    if attach_again:
        attachment.remove()
        optimizer = torch.optim.SGD(model[2].parameters(), lr=1e-3)
        monitor.attach(optimizer)
    else:
        optimizer.add_param_group({"params": model[2].parameters()})
    for step in range(3):
        bad[0] = step == 1
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in model[2].parameters()]))
        torch.nn.utils.clip_grad_norm_(model[2].parameters(), 0.01)
        optimizer.step()
        if step != 1:
            assert sample(samples(registry), "gradtel_grad_norm") == pytest.approx(norm, rel=1e-5)
    assert (
        sample(samples(registry), "gradtel_nan_grads_total", layer="2") == 2
    )  # not the 16 of clipping


def test_gradients_replaced_after_backward_are_counted_as_the_optimizer_gets_them(
    provider: MeterProvider, registry: CollectorRegistry
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = gradtel.GradMonitor(model, meter_provider=provider, on_warning="skip")
    monitor.attach(optimizer)
    model(torch.randn(3, 4)).sum().backward()
    computed = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    optimizer.zero_grad(set_to_none=True)  # dropped, then new gradients are assigned
    for p, g in zip(model.parameters(), computed):
        p.grad = g
    model[0].weight.grad[0, 0] = float("nan")  # type: ignore[index]
    optimizer.step()
    assert sample(samples(registry), "gradtel_nan_grads_total", layer="0") == 1
    assert not monitor.healthy or model[0].weight.grad is None  # skipped: the step changed nothing


@pytest.mark.parametrize(
    ("step", "loss"),
    [
        (lambda: __import__("numpy").int64(7), None),
        (lambda: torch.tensor(7), None),
        (lambda: 7, lambda: 0.5),  # a float loss, as loss.item() gives
        (lambda: 7, lambda: {}["not set yet"]),  # raises: logged, training goes on
        (lambda: "seven", None),  # not a whole number: logged, the optimizer's count is used
    ],
)
def test_what_step_and_loss_give_never_breaks_training(
    provider: MeterProvider, registry: CollectorRegistry, step: object, loss: object
) -> None:
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = gradtel.GradMonitor(model, meter_provider=provider)
    monitor.attach(optimizer, step=step, loss=loss)  # type: ignore[arg-type]
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert sample(samples(registry), "gradtel_updates_total") == 1
