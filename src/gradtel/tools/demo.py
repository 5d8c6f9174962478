"""``gradtel demo``: a small model trained on synthetic data, with injected NaN/Inf.

Injection schedule, repeating every 25 updates (update numbers from 1):

========  ===========================  ==========================
update    injected into the gradients  status
========  ===========================  ==========================
10, 35…   3 NaN in ``body.0``           warning (0 < 3 <= 5)
20, 45…   7 Inf in ``head``             critical (7 > 5)
others    nothing                      healthy
========  ===========================  ==========================

The monitor runs with ``on_warning="skip"`` and ``on_critical="skip"``, so a
bad update never reaches the weights and training stays healthy in between.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch
from torch import nn

from ..export.endpoint import serve
from ..monitor import GradMonitor
from .banner import progress_bar, status_line

if TYPE_CHECKING:
    from .stack import Stack

__all__ = ["SCHEDULE", "SCHEDULE_PERIOD", "DemoNet", "Injection", "injection_for", "run_demo"]

SCHEDULE_PERIOD = 25


@dataclass(frozen=True)
class Injection:
    """Non-finite values written into one layer's weight gradient."""

    layer: str
    nan: int = 0
    inf: int = 0


SCHEDULE = {10: Injection("body.0", nan=3), 20: Injection("head", inf=7)}
"""Injections by update number within each period of ``SCHEDULE_PERIOD`` updates."""


def injection_for(update: int) -> Injection | None:
    """The injection of update ``update`` (counted from 1), if any.

    >>> injection_for(10), injection_for(11)
    (Injection(layer='body.0', nan=3, inf=0), None)
    >>> injection_for(45)
    Injection(layer='head', nan=0, inf=7)
    """
    return SCHEDULE.get(update % SCHEDULE_PERIOD)


class DemoNet(nn.Module):
    """A small regression MLP whose layers are ``embed``, ``body.0``, ``body.2`` and ``head``."""

    def __init__(self, features: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(features, hidden)
        self.body = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.body(torch.relu(self.embed(x)))))
        return out


def _inject(model: nn.Module, injection: Injection) -> None:
    layer = model.get_submodule(injection.layer)
    assert isinstance(layer, nn.Linear) and layer.weight.grad is not None  # backward just ran
    flat = layer.weight.grad.view(-1)
    flat[: injection.nan] = float("nan")
    flat[injection.nan : injection.nan + injection.inf] = float("inf")


class _Terminal:
    """One live status line on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty()
        self.color = self.live and "NO_COLOR" not in os.environ

    def show(self, text: str) -> None:
        if self.live:
            self.out.write("\r\033[K" + text)
            self.out.flush()

    def say(self, text: str) -> None:
        self.out.write(("\r\033[K" if self.live else "") + text + "\n")
        self.out.flush()


class _SayHandler(logging.Handler):
    def __init__(self, terminal: _Terminal) -> None:
        super().__init__(logging.WARNING)
        self.terminal = terminal

    def emit(self, record: logging.LogRecord) -> None:
        self.terminal.say(self.format(record))


class _Stopped(BaseException):
    """SIGTERM or SIGHUP: stop like Ctrl-C, cleaning up everything the demo started.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""


def _stop_on(signum: int, frame: object) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    raise _Stopped(signal.Signals(signum).name)


STACKS: dict[str, dict[str, object]] = {
    "prometheus": {},
    "agent": {"agent": True},
    "victoriametrics": {"agent": True, "store": "victoriametrics"},
}
"""The ``--stack`` set-ups: arguments of :class:`~gradtel.tools.stack.Stack`."""


def run_demo(
    *,
    steps: int = 300,
    interval: float = 0.2,
    port: int | None = None,
    addr: str | None = None,
    seed: int = 0,
    stack: str | None = None,
    keep_data: Path | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Train the demo model for ``steps`` updates while serving ``/metrics``.

    With ``stack``, also run Prometheus and Alertmanager from ``PATH`` with
    the shipped rules and routing on loopback ports, and print each page a
    built-in webhook receiver gets. Their config and data live in a temporary
    folder removed at the end, or in ``keep_data``. ``stack`` is one of
    :data:`STACKS`: ``"prometheus"`` scrapes the demo itself; ``"agent"`` and
    ``"victoriametrics"`` run the kit's scale-out set-up (a Prometheus agent
    remote-writing to a central Prometheus, or to VictoriaMetrics with vmalert).

    Returns:
        The process exit code: 0, also when stopped with Ctrl-C.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # Prometheus and Alertmanager must not outlive the demo when a terminal
        # closes (SIGHUP) or a supervisor stops it (SIGTERM).
        previous = {sig: signal.signal(sig, _stop_on) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(steps, interval, port, addr, seed, stack, keep_data, out)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(
    steps: int,
    interval: float,
    port: int | None,
    addr: str | None,
    seed: int,
    stack: str | None,
    keep_data: Path | None,
    out: TextIO,
) -> int:
    torch.manual_seed(seed)
    terminal = _Terminal(out)

    server = serve(port=port, addr=addr, on_error="raise")
    local: Stack | None = None
    handler = _SayHandler(terminal)
    gradtel_logger = logging.getLogger("gradtel")
    unhealthy = 0
    finished = False
    # One try from here on: a SIGTERM or Ctrl-C at any point stops what was started.
    try:
        if stack is not None:
            from .stack import Stack  # the deploy extra: only --stack needs it

            if stack not in STACKS:
                raise ValueError(f"stack must be one of {', '.join(STACKS)} or None, got {stack!r}")
            local = Stack(
                [f"127.0.0.1:{server.port}"],
                on_page=lambda page: terminal.say(f"PAGE {page}"),
                keep_data=keep_data,
                **STACKS[stack],  # type: ignore[arg-type]
            ).__enter__()
        gradtel_logger.addHandler(handler)
        gradtel_logger.propagate = False
        model = DemoNet()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        monitor = GradMonitor(model, on_warning="skip", on_critical="skip", grad_norm=True)
        inputs = torch.randn(256, 16)
        targets = inputs @ torch.randn(16, 1) + 0.1 * torch.randn(256, 1)
        terminal.say(f"gradtel demo: serving {server.url}")
        if local is not None:
            store = "Prometheus {}/alerts" if local.store == "prometheus" else "VictoriaMetrics {}"
            via = " behind a Prometheus agent" if local.agent else ""
            terminal.say(
                f"{store.format(local.prometheus_url)}{via} and Alertmanager {local.alertmanager_url} "
                f"run with the shipped rules and routing; pages print here (data in {local.root})"
            )
        terminal.say(
            f"training {steps} updates, one every {interval:g}s; NaN/Inf injected on updates "
            f"10 and 20 of every {SCHEDULE_PERIOD} (Ctrl-C stops)"
        )
        for update in range(1, steps + 1):
            batch = torch.randint(0, len(inputs), (32,))
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
            loss.backward()
            injection = injection_for(update)
            if injection is not None:
                _inject(model, injection)
            health = monitor.collect()
            optimizer.step()
            unhealthy += health.status.level > 0
            line = (
                f"update {update:>{len(str(steps))}}/{steps} {progress_bar(update, steps)} "
                f"{status_line(health, color=terminal.color)} unhealthy so far={unhealthy} "
                f"loss={loss.item():.4f}"
            )
            terminal.show(line)
            if not terminal.live and (update % 50 == 0 or update == steps):
                terminal.say(line)
            time.sleep(interval)
        terminal.say(
            f"done: {steps} updates, {unhealthy} unhealthy, each kept from the optimizer by gradtel"
        )
        finished = True
    except _Stopped as stopped:
        terminal.say(f"stopped by {stopped}")
    except KeyboardInterrupt:
        terminal.say("stopped by Ctrl-C")
    finally:
        # A normal end waits for Prometheus to scrape the last unhealthy update.
        server.close(grace=None if finished else 0)
        if local is not None:
            local.stop()
        gradtel_logger.removeHandler(handler)
        gradtel_logger.propagate = True
    return 0
