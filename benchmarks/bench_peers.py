"""What an always-on gradient check costs per training step, gradtel next to what users run
today, in one process, methods interleaved, medians over repeated runs.

Run from a checkout (the peers are in the ``bench`` extra):

    bash scripts/setup.sh bench && .venv/bin/python benchmarks/bench_peers.py [--quick] [--device cuda]

Three workloads, each with real gradients of its shape: 300 x Linear(128) (600
small tensors), a GPT-2-small-shaped transformer in fp32, and 6 x Conv2d(64) in
channels_last. Checks that read the gradients after backward are timed on those
gradients; checks that hook into the step (``wandb.watch``, ``detect_anomaly``)
are timed as a forward and backward pass with the check minus one without.
Prints the cost table, a capability table and one PASS/FAIL line per target.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import measure_all, original_per_layer
from models import GPT2Small, many_linears

import gradtel

COLUMNS = {
    "gradtel": "gradtel `collect()`",
    "gradtel deferred": 'gradtel `collect()`, `readout="deferred"`',
    "gradtel unhealthy": "gradtel `collect()`, a NaN in one layer's gradient",
    "scaler": "GradScaler's fused non-finite check (a yes/no flag)",
    "scaler step": "GradScaler as a step runs it (`unscale_`, its flag read, `update`)",
    "floor": "one `.sum()` over all gradient memory",
    "clip": "torch `clip_grad_norm_(error_if_nonfinite=True)`, norm under `max_norm`",
    "gradtel clip": "`gradtel.clip_grad_norm_`, norm under `max_norm`",
    "clip active": "torch `clip_grad_norm_(error_if_nonfinite=True)`, norm above `max_norm`",
    "gradtel clip active": "`gradtel.clip_grad_norm_`, norm above `max_norm`",
    "lightning": "Lightning `grad_norm`",
    "seed": "per-layer `.item()` (gradtel's seed)",
    "wandb": '`wandb.watch(log="gradients")`, offline',
    "tensorboard": "TensorBoard histograms every step",
    "anomaly": "`detect_anomaly`",
}
CAPABILITIES = [
    # tool, NaN counted, Inf apart, per layer, per rank, exported for alerts
    ("gradtel", "yes", "yes", "yes", "yes, and the rank it started on", "Prometheus, OTLP"),
    ("GradScaler check, alone or as a step runs it", "no (one flag)", "no", "no", "no", "no"),
    ("torch clipping, `error_if_nonfinite`", "no (raises)", "no", "no", "no", "no"),
    ("Lightning `grad_norm`", "no (NaN norm)", "no", "per parameter norm", "no", "logger"),
    ("`wandb.watch`", "no (histograms)", "no", "per parameter", "per run", "W&B"),
    ("TensorBoard histograms", "no", "no", "per parameter", "no", "event files"),
    ("`detect_anomaly`", "no (raises at the op)", "no", "the op", "no", "no"),
]


def conv_net() -> nn.Module:
    return nn.Sequential(*[nn.Conv2d(64, 64, 3, padding=1) for _ in range(6)]).to(
        memory_format=torch.channels_last
    )


def workloads(
    quick: bool, device: torch.device
) -> dict[str, tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]]:
    tokens = 16 if quick else 64
    return {
        "300 x Linear(128)": (
            many_linears().to(device),
            lambda m: m(torch.randn(32, 128, device=device)).square().mean(),
        ),
        "GPT-2-small shape, fp32": (
            GPT2Small().to(device),
            lambda m: (
                m(torch.randint(0, 50257, (1, tokens), device=device)).float().square().mean()
            ),
        ),
        "6 x Conv2d(64), channels_last": (
            conv_net().to(device),
            lambda m: (
                m(torch.randn(4, 64, 16, 16, device=device).to(memory_format=torch.channels_last))
                .square()
                .mean()
            ),
        ),
    }


def synced(
    methods: dict[str, Callable[[], object]], device: torch.device
) -> dict[str, Callable[[], object]]:
    """On a GPU, time each method until its device work is done, not only its launch."""
    if device.type != "cuda":
        return methods

    def wait_for(work: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            result = work()
            torch.cuda.synchronize()
            return result

        return run

    return {name: wait_for(work) for name, work in methods.items()}


def provider() -> object:
    return gradtel.prometheus_meter_provider(CollectorRegistry())


def gradient_checks(model: nn.Module) -> dict[str, Callable[[], object]]:
    """Checks that read the gradients already there, after backward."""
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    numel = sum(g.numel() for g in grads)
    device = grads[0].device
    buffer = torch.randn(numel, device=device)
    found_inf, inv_scale = torch.zeros(1, device=device), torch.ones(1, device=device)
    sync = gradtel.GradMonitor(model, meter_provider=provider())
    deferred = gradtel.GradMonitor(model, meter_provider=provider(), readout="deferred")
    clipping = gradtel.GradMonitor(model, meter_provider=provider())
    ignoring = gradtel.GradMonitor(
        model, meter_provider=provider(), on_warning="ignore", on_critical="ignore"
    )
    # One NaN in the middle parameter's gradient, put back before each call and taken
    # out after it, so that every other method times healthy gradients.
    middle = grads[len(grads) // 2]
    spot = middle[(0,) * middle.dim()]  # a view of one element, whatever the layout
    kept = spot.clone()
    nan = torch.full_like(kept, float("nan"))
    # Half the norm: every call multiplies the gradients (after the first they stay at that norm).
    below = 0.5 * nn.utils.get_total_norm(grads).item()

    def scaler() -> bool:
        # GradScaler.unscale_'s check, then the flag its step reads.
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        return bool(found_inf.item())

    optimizer = torch.optim.SGD(params, lr=0.0)  # never stepped: only the scaler's check is timed
    grad_scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)
    grad_scaler.scale(torch.ones((), device=device))  # as a step scales its loss first

    def scaler_step() -> bool:
        # What scaler.unscale_(optimizer) and scaler.step(optimizer) do about non-finite
        # values, without the optimizer's own step.
        grad_scaler.unscale_(optimizer)
        found = sum(v.item() for v in grad_scaler._found_inf_per_device(optimizer).values())
        grad_scaler.update()
        return bool(found)

    def bare() -> bool:
        # The least any check after backward costs: find the gradients, run GradScaler's
        # kernel on them, read its flag. Not a column: the floor under the first target.
        torch._amp_foreach_non_finite_check_and_unscale_(
            [p.grad for p in params], found_inf, inv_scale
        )
        return bool(found_inf.item())

    def unhealthy() -> object:
        spot.copy_(nan)
        health = ignoring.collect()
        spot.copy_(kept)
        return health

    def lightning() -> object:
        from lightning.pytorch.utilities import grad_norm

        return {k: float(v) for k, v in grad_norm(model, norm_type=2).items()}  # as logged

    return {
        "gradtel": sync.collect,
        "gradtel deferred": deferred.collect,
        "gradtel unhealthy": unhealthy,
        "scaler": scaler,
        "scaler step": scaler_step,
        "bare": bare,
        "floor": buffer.sum,
        "clip": lambda: nn.utils.clip_grad_norm_(params, 1e9, error_if_nonfinite=True),
        "gradtel clip": lambda: gradtel.clip_grad_norm_(
            params, 1e9, error_if_nonfinite=True, monitor=clipping
        ),
        "clip active": lambda: nn.utils.clip_grad_norm_(params, below, error_if_nonfinite=True),
        "gradtel clip active": lambda: gradtel.clip_grad_norm_(
            params, below, error_if_nonfinite=True, monitor=clipping
        ),
        "lightning": lightning,
        "seed": original_per_layer(model),
    }


def step_checks(
    model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor], logdir: str
) -> dict[str, Callable[[], object]]:
    """A forward and backward pass without a check, and with each check that hooks into it."""
    import wandb
    from torch.utils.tensorboard import SummaryWriter

    def step(m: nn.Module) -> torch.Tensor:
        m.zero_grad(set_to_none=True)
        loss = loss_of(m)
        loss.backward()
        return loss.detach()

    watched = copy.deepcopy(model)
    run = wandb.init(mode="offline", dir=logdir, project="gradtel-bench", reinit="finish_previous")
    run.watch(watched, log="gradients", log_freq=1)
    writer = SummaryWriter(logdir)
    tb_step = [0]

    def with_wandb() -> None:
        run.log({"loss": step(watched).item()})

    def with_tensorboard() -> None:
        loss = step(model)
        tb_step[0] += 1
        for name, p in model.named_parameters():
            writer.add_histogram(name, p.grad, tb_step[0])
        writer.add_scalar("loss", loss.item(), tb_step[0])

    def with_anomaly() -> None:
        with torch.autograd.detect_anomaly():
            step(model).item()

    def plain() -> None:
        step(model).item()

    return {
        "step": plain,
        "wandb": with_wandb,
        "tensorboard": with_tensorboard,
        "anomaly": with_anomaly,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="few repetitions: a smoke run, not a measurement"
    )
    parser.add_argument(
        "--device", default="cpu", help="where the models train: cpu (default) or cuda"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(2)
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", "Anomaly Detection has been enabled")
    repeats, step_repeats = (3, 2) if args.quick else (25, 7)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    print(
        f"torch {torch.__version__}, {where}; extra ms per training step, "
        f"median of {repeats} (hooked checks: {step_repeats}) interleaved runs\n"
    )
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as logdir:
        for name, (model, loss_of) in workloads(args.quick, device).items():
            torch.manual_seed(0)
            loss_of(model).backward()
            timing = measure_all(synced(gradient_checks(model), device), repeats)
            hooked = measure_all(
                synced(step_checks(model, loss_of, logdir), device), step_repeats, warmup=1
            )
            base = hooked.pop("step").median
            rows[name] = {k: v.median * 1e3 for k, v in timing.items()}
            rows[name].update({k: max(0.0, v.median - base) * 1e3 for k, v in hooked.items()})
            print(f"measured {name}", file=sys.stderr)
    print("| workload | " + " | ".join(COLUMNS.values()) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3g}" for k in COLUMNS) + " |")
    print("\n| tool | NaN counted | Inf apart | per layer | per rank | exported |")
    print("|---|---|---|---|---|---|")
    for line in CAPABILITIES:
        print("| " + " | ".join(line) + " |")
    print()
    for name, row in rows.items():
        targets = [
            ("healthy collect() / GradScaler check", row["gradtel"] / row["scaler"], 1.0),
            (
                "healthy collect() / the least a check can cost (finding the gradients + "
                "GradScaler's check + reading its flag)",
                row["gradtel"] / row["bare"],
                1.0,
            ),
            (
                "unhealthy collect() (a NaN in one layer) / healthy collect()",
                row["gradtel unhealthy"] / row["gradtel"],
                1.3,
            ),
        ]
        if name.startswith("GPT-2"):  # large tensors: the cost is reading gradient memory
            targets.append(
                (
                    "healthy collect() / one .sum() over gradient memory",
                    row["gradtel"] / row["floor"],
                    1.1,
                )
            )
        for what, value, limit in (
            *targets,
            (
                "gradtel.clip_grad_norm_ / torch clip_grad_norm_, norm under max_norm",
                row["gradtel clip"] / row["clip"],
                1.1,
            ),
            (
                "gradtel.clip_grad_norm_ / torch clip_grad_norm_, norm above max_norm",
                row["gradtel clip active"] / row["clip active"],
                1.1,
            ),
        ):
            ok = value <= limit
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {what} = {value:.2f} (target <= {limit})")
        print(
            f"      {name}: the least a check can cost, finding the gradients + GradScaler's "
            f"check + reading its flag = {row['bare'] / row['scaler']:.2f} x the check; "
            f"healthy collect() / GradScaler as a step runs it = {row['gradtel'] / row['scaler step']:.2f}"
        )
    if args.quick:
        print("(--quick: few repetitions; the targets mean something only in a full run)")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    sys.exit(code)
