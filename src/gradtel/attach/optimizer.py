"""Collect without editing the training loop: hooks on the optimizer, the AMP scaler or backward.

``scan="step"`` (default) collects once per optimizer update, after the last
micro-batch of gradient accumulation. Without a ``GradScaler`` it counts the
gradients at the end of every backward pass, as backward left them, and
publishes the last count just before ``optimizer.step()``: clipping or other code
between backward and the step cannot change what is counted (torch's clipping
with a non-finite total norm turns every gradient into NaN). With gradient
accumulation that is one scan per micro-batch. With a ``GradScaler`` it
collects right after the scaler unscales the gradients. The scaler case
matters: when gradients overflow, ``scaler.step()`` skips ``optimizer.step()``,
so a step pre-hook alone would never see the very updates that went bad.
Fused optimizers (``AdamW(fused=True)``) unscale inside their own step and the
scaler never calls ``unscale_`` for them: there gradtel collects in the step
pre-hook, on the still-scaled gradients (scaling keeps finite values finite,
so the NaN/Inf counts are the same).

``scan="backward"`` collects at the end of every backward pass instead (each
micro-batch), counting the gradients accumulated so far.
"""

from __future__ import annotations

import functools
import logging
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import torch

from .. import _checks
from .._ratelimit import RateLimitedLog
from ..pipeline.once import OncePerUpdate
from ..pipeline.parameters import registrations, same_objects

__all__ = ["Attachment", "Collector", "at_end_of_backward", "attach", "steps_taken", "summed_loss"]

_log = RateLimitedLog(logging.getLogger("gradtel"))
_trainable = operator.attrgetter("requires_grad")


class Collector(Protocol):
    """What an attachment drives: a :class:`~gradtel.GradMonitor`."""

    @property
    def parameters(self) -> Sequence[torch.nn.Parameter]: ...

    def collect(
        self,
        *,
        scaler: torch.amp.GradScaler | None = None,
        step: int | None = None,
        loss: torch.Tensor | None = None,
    ) -> object: ...

    def _look(self, loss: torch.Tensor | None = None) -> None:
        """Scan the gradients as backward left them, for the next ``collect()``."""

    def _unwatch_passes(self) -> None:
        """No attachment watches the backward passes any more."""

    def _collect_at_step(self, by: int, collect: Callable[[], object]) -> object:
        """``collect()`` for optimizer ``by``'s step, unless collected since the latest pass."""

    _once: OncePerUpdate
    """Which of several collections around a step counts the update."""

    _gradients_scaled: bool
    """For the next ``collect()``: the gradients are still multiplied by the loss scale."""


class Attachment:
    """What :func:`attach` installed; ``remove()`` takes it all away."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    @property
    def installed(self) -> bool:
        """Whether anything is left to remove."""
        return bool(self._undo)

    def remove(self) -> None:
        """Undo every step, once: a step that fails leaves the others to run, then raises."""
        undo, self._undo = self._undo, []
        failed: Exception | None = None
        for step in reversed(undo):
            try:
                step()
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed


# Which monitors are attached to which optimizer: attaching twice would count
# every update twice.
_attached: weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.WeakSet[Collector]] = (
    weakref.WeakKeyDictionary()
)


# The monitors attached with scan="backward": each backward pass is theirs to collect once.
_every_backward: weakref.WeakSet[Collector] = weakref.WeakSet()


def attach(
    monitor: Collector,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    scan: Literal["step", "backward"] = "step",
    step: Callable[[], int] | None = None,
    loss: Callable[[], torch.Tensor | None] | None = None,
) -> Attachment:
    """Make ``monitor.collect()`` run by itself; see :meth:`GradMonitor.attach`."""
    for name, given in (("step", step), ("loss", loss)):
        if given is not None and not callable(given):
            raise TypeError(
                f"{name} must be a function that returns this update's {name} "
                f"(for example {name}=lambda: {'iter_num' if name == 'step' else 'loss'}) or None, "
                f"got {given!r} ({type(given).__name__})"
            )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {optimizer!r} ({type(optimizer).__name__})"
        )
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {scaler!r}")
    _checks.choice("scan", scan, ("step", "backward"))
    monitors = _attached.setdefault(optimizer, weakref.WeakSet())
    if monitor in monitors:
        raise ValueError(
            "this monitor is already attached to this optimizer, and a second attach() would "
            "count every update twice; remove() the first attachment, or attach once with both "
            "scaler= and scan= as needed"
        )
    if monitor in _every_backward or (scan == "backward" and _Passes.live(monitor)):
        raise ValueError(
            'this monitor already collects after every backward pass (attach(scan="backward")) '
            "or at another optimizer's step, and this attach() would count those updates "
            'again; one attach(scan="backward") serves every optimizer of the model, or '
            'attach each optimizer with scan="step"'
        )
    monitors.add(monitor)
    attachment = Attachment()
    attachment._undo.append(lambda: monitors.discard(monitor))
    if loss is None and scaler is not None and scaler.is_enabled():
        # The loss the scaler scales, read with the update: a NaN loss makes NaN gradients
        # that the scaler would skip as an overflow, and it is no overflow.
        scaled = _ScaledLoss()
        _ScalerTap.on(scaler, "scale", scaled.add, attachment)
        loss = scaled
    # The step an update makes: the optimizer's steps taken so far (a resumed optimizer
    # carries its count in its state), plus this one.
    taken = [steps_taken(optimizer)]

    def count_step(*args: Any) -> None:
        taken[0] += 1
        monitor._once.stepped(id(optimizer))

    def resumed(opt: torch.optim.Optimizer) -> None:
        taken[0] = steps_taken(opt)

    attachment._undo.append(optimizer.register_step_post_hook(count_step).remove)
    attachment._undo.append(optimizer.register_load_state_dict_post_hook(resumed).remove)
    if scan == "backward":
        _every_backward.add(monitor)
        attachment._undo.append(lambda: _every_backward.discard(monitor))
        collect = _Stepped(monitor, taken, step, None, optimizer, loss)
        attachment._undo.append(monitor._unwatch_passes)
        unscaled = scaler is None or not scaler.is_enabled()  # at the end of backward: scaled
        hooks = _EndsOfBackward(monitor, lambda: collect(scaler=scaler, scaled=not unscaled))
        attachment._undo.append(hooks.remove)
        _check_at_step(hooks, optimizer, attachment, scaler)
        return attachment
    looks = scaler is None or not scaler.is_enabled()
    passes = _Passes.of(monitor, attachment, looks, loss)
    collect = _Stepped(monitor, taken, step, passes, optimizer)
    if not looks:
        _around_scaler(collect, scaler, optimizer, attachment)  # type: ignore[arg-type]
        _check_at_step(passes.hooks, optimizer, attachment, scaler)
        return attachment

    def before_step(
        opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # With a closure (LBFGS), backward runs inside step(): collect after its first call.
        # (``args`` starts with the optimizer itself.)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            collect()
            return None
        called = [False]

        def collecting_closure() -> Any:
            result = closure()
            if not called[0]:
                called[0] = True
                collect()
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": collecting_closure}
        return (args[0], collecting_closure, *args[2:]), kwargs

    attachment._undo.append(optimizer.register_step_pre_hook(before_step).remove)
    _check_at_step(passes.hooks, optimizer, attachment, scaler)
    return attachment


def _check_at_step(
    hooks: _EndsOfBackward,
    optimizer: torch.optim.Optimizer,
    attachment: Attachment,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Check ``hooks`` at every step too, after it collects: a model whose root module is
    never called (its submodules are) gets the hooks of a new head at the next step, or
    at the scaler's ``unscale_``, which runs also when the scaler skips the step."""
    attachment._undo.append(optimizer.register_step_pre_hook(lambda *args: hooks.check()).remove)
    if scaler is not None and scaler.is_enabled():
        _ScalerTap.on(
            scaler, "unscale_", lambda opt: hooks.check() if opt is optimizer else None, attachment
        )


class _EndsOfBackward:
    """``callback`` at the end of every backward pass through a monitor's watched parameters,
    kept on the parameters that train: before each forward pass, a layer replaced or a
    parameter unfrozen since the hooks were made is watched and hooked too."""

    def __init__(self, monitor: Collector, callback: Callable[[], object]) -> None:
        self.monitor, self.callback = monitor, callback
        self._armed = Attachment()
        self._armed_for: tuple[torch.Tensor, ...] = ()
        self._frozen: list[torch.Tensor] = []
        self._watching = Attachment()
        self.renew()
        module = getattr(monitor, "_module", None)
        if isinstance(module, torch.nn.Module):
            self._watching._undo.append(module.register_forward_pre_hook(self.rearm).remove)

    def renew(self) -> None:
        """Watch what the model holds now (the user may have refreshed already) and hook it."""
        self._registrations = registrations()
        refresh = getattr(self.monitor, "refresh", None)
        if refresh is not None:
            refresh()
        params = tuple(self.monitor.parameters)
        if self._armed.installed and same_objects(params, self._armed_for) and not self.unfrozen():
            return
        self._armed.remove()
        # The parameters hold their hooks where the cycle collector cannot follow them:
        # through a strong reference, a dropped monitor and its model would never be freed.
        alive = weakref.WeakMethod(self._ended)
        self._armed = at_end_of_backward(params, lambda: (ended := alive()) and ended())
        self._armed_for = params
        self._frozen = [p for p in params if not p.requires_grad]

    def _ended(self) -> object:
        return self.callback()

    def unfrozen(self) -> bool:
        """Whether a parameter frozen when the hooks were made trains now (it has none)."""
        return any(map(_trainable, self._frozen))

    def check(self) -> None:
        """Hook what trains now if a layer was replaced or a parameter unfrozen since."""
        if self._registrations != registrations() or self.unfrozen():
            self.renew()

    def rearm(self, *args: Any) -> None:
        """Before a forward pass of the model (one without grad, an evaluation, makes no
        gradients: it need not look)."""
        if torch.is_grad_enabled():
            self.check()

    def remove(self) -> None:
        self._armed.remove()
        self._watching.remove()


class _Passes:
    """The backward passes through one monitor's parameters, shared by its attachments:
    without an enabled scaler each pass ends with a look at the gradients as backward left
    them (``monitor._look``); the losses of an update's micro-batches are summed (a NaN in
    any of them stays NaN); and the monitor is told when each pass ends, so that it collects
    an update once: by the first optimizer to step after it, however many share the model,
    or by the user's ``collect()`` or ``gradtel.clip_grad_norm_`` around the step."""

    # Held weakly both ways: the attachments hold the passes, and the monitor its attachments.
    _of: weakref.WeakKeyDictionary[Any, weakref.ref[_Passes]] = weakref.WeakKeyDictionary()

    def __init__(self, monitor: Collector) -> None:
        self.monitor = monitor
        self.looks = False
        self.loss_fns: list[Callable[[], torch.Tensor | None]] = []
        """The losses the attachments read, given or tapped; the latest one is read."""
        self.loss: torch.Tensor | None = None
        self.users = 0
        if not monitor._once.watched:  # gradients given before any pass: an update
            monitor._once.pass_ended()
        self.hooks = _EndsOfBackward(monitor, self._ended)

    @classmethod
    def live(cls, monitor: Collector) -> bool:
        """Whether ``monitor`` has an attachment with ``scan="step"``."""
        kept = cls._of.get(monitor)
        return kept is not None and kept() is not None

    @classmethod
    def of(
        cls,
        monitor: Collector,
        attachment: Attachment,
        looks: bool,
        loss: Callable[[], torch.Tensor | None] | None,
    ) -> _Passes:
        kept = cls._of.get(monitor)
        passes = None if kept is None else kept()
        if passes is None:
            passes = cls(monitor)
            cls._of[monitor] = weakref.ref(passes)
        else:
            passes.hooks.renew()
        passes.users += 1
        passes.looks = passes.looks or looks
        if loss is not None:
            passes.loss_fns.append(loss)
            attachment._undo.append(lambda: passes.loss_fns.remove(loss))
        attachment._undo.append(passes.release)
        return passes

    def _ended(self) -> None:
        self.monitor._once.pass_ended()
        if self.loss_fns:
            self.loss = _with_loss(self.loss, self.loss_fns[-1])
        if self.looks:
            self.monitor._look(self.loss)

    def take_loss(self) -> torch.Tensor | None:
        loss, self.loss = self.loss, None
        return loss

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.hooks.remove()
            self._of.pop(self.monitor, None)
            self.monitor._unwatch_passes()  # and its look of a pass no step collected


def summed_loss(total: torch.Tensor | None, loss: object) -> torch.Tensor | None:
    """The losses of an update's micro-batches so far, summed on the device (no host read):
    the sum is non-finite when any of them was."""
    if not isinstance(loss, torch.Tensor):
        loss = None if loss is None else torch.as_tensor(loss, dtype=torch.float64)
    if loss is None:
        return total
    loss = loss.detach().double().sum()
    return loss if total is None else total + loss.to(total.device)


def _with_loss(
    total: torch.Tensor | None, loss: Callable[[], torch.Tensor | None]
) -> torch.Tensor | None:
    """``total`` plus the loss the user's ``attach(loss=...)`` returns now; ``total`` when it fails."""
    try:
        return summed_loss(total, loss())
    except Exception as exc:
        _log.log(
            "loss", logging.ERROR, "gradtel: attach(loss=...) failed, the loss is not read: %r", exc
        )
        return total


def steps_taken(optimizer: torch.optim.Optimizer) -> int:
    """The steps ``optimizer`` has taken, as its state counts them (Adam's ``step``, for
    one): 0 for an optimizer that keeps no count (plain SGD). Read once, when attached or
    resumed (on a GPU a capturable count is a host read)."""
    counts = [state["step"] for state in optimizer.state.values() if "step" in state]
    return max((int(c) for c in counts), default=0)


class _Stepped:
    """``monitor.collect()`` with the step an update makes (the user's, or one past the
    optimizer's steps taken) and the user's loss, if given: the one its backward passes
    summed, or, collected at the end of each backward pass (no ``passes``), this one's."""

    def __init__(
        self,
        monitor: Collector,
        taken: list[int],
        step: Callable[[], int] | None,
        passes: _Passes | None,
        optimizer: torch.optim.Optimizer | None = None,
        loss: Callable[[], torch.Tensor | None] | None = None,
    ) -> None:
        self.monitor, self.taken, self.step = monitor, taken, step
        self.passes, self.optimizer, self.loss = passes, optimizer, loss

    def __call__(self, scaler: torch.amp.GradScaler | None = None, scaled: bool = False) -> object:
        monitor = self.monitor
        if self.passes is not None:  # at the step
            loss = self.passes.take_loss()
        else:  # at the end of each backward pass: an update of its own
            monitor._once.pass_ended()
            loss = None if self.loss is None else _with_loss(None, self.loss)
        by = id(self.optimizer)
        return monitor._collect_at_step(by, lambda: self._collect(scaler, scaled, loss))

    def _collect(
        self, scaler: torch.amp.GradScaler | None, scaled: bool, loss: torch.Tensor | None
    ) -> object:
        step = self.taken[0] + 1
        if self.step is not None:
            try:
                step = operator.index(self.step())  # an int, a NumPy integer, an integer tensor
            except Exception as exc:
                _log.log(
                    "step", logging.ERROR,
                    "gradtel: attach(step=...) gave no whole number (%r); numbering by the "
                    "optimizer's steps instead", exc,
                )  # fmt: skip
        self.monitor._gradients_scaled = scaled
        return self.monitor.collect(scaler=scaler, step=step, loss=loss)


class _ScalerTap:
    """A method of a ``GradScaler`` (``unscale_``, ``scale``), then every attached monitor's
    callback with its argument: one per scaler and method, kept in the scaler itself (as
    that method, or inside another's wrapper of it), so a dropped scaler goes with its
    model and monitor. A pickled or copied scaler runs its class's method, without the
    monitors."""

    def __init__(self, scaler: torch.amp.GradScaler, name: str) -> None:
        self.scaler, self.name = scaler, name
        self.original = getattr(scaler, name)  # the class's method, or another's wrapper of it
        self.callbacks: list[Callable[[Any], None]] = []
        setattr(scaler, name, self)
        _taps.setdefault(scaler, {})[name] = weakref.ref(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.original(*args, **kwargs)
        argument = args[0] if args else next(iter(kwargs.values()), None)
        for callback in list(self.callbacks):
            callback(argument)
        return result

    def __reduce__(self) -> tuple[Any, ...]:
        return (functools.partial, (getattr(type(self.scaler), self.name), self.scaler))

    @staticmethod
    def on(
        scaler: torch.amp.GradScaler,
        name: str,
        callback: Callable[[Any], None],
        attachment: Attachment,
    ) -> None:
        """Call ``callback`` after every ``scaler.<name>``, until ``attachment`` is removed."""
        kept = _taps.get(scaler, {}).get(name)
        tap = (kept() if kept is not None else None) or _ScalerTap(scaler, name)
        tap.callbacks.append(callback)

        def untap() -> None:
            tap.callbacks.remove(callback)
            if tap.callbacks or scaler.__dict__.get(name) is not tap:
                return  # still used, or inside another's wrapper: it stays, passing through
            original = tap.original
            if getattr(original, "__self__", None) is scaler:
                delattr(scaler, name)  # the class's own method again
            else:
                setattr(scaler, name, original)
            _taps.get(scaler, {}).pop(name, None)

        attachment._undo.append(untap)


# Each scaler's taps by method, to share: weak both ways, as the scaler holds its taps.
_taps: weakref.WeakKeyDictionary[torch.amp.GradScaler, dict[str, weakref.ref[_ScalerTap]]] = (
    weakref.WeakKeyDictionary()
)


class _ScaledLoss:
    """The loss a ``GradScaler`` scaled last, read at the end of the backward pass through
    the monitor's parameters that follows: the update's loss when the user gives none, so
    that a NaN loss is not taken for an overflow. A loss scaled for another model (a
    scaler shared by a GAN's two) leads to no such pass: the next one replaces it."""

    def __init__(self) -> None:
        self.latest: torch.Tensor | None = None

    def add(self, outputs: object) -> None:
        self.latest = _summed(outputs)

    def __call__(self) -> torch.Tensor | None:
        latest, self.latest = self.latest, None
        return latest


def _summed(outputs: object) -> torch.Tensor | None:
    """The tensors ``GradScaler.scale`` takes (one, or an iterable of them, nested), summed."""
    if isinstance(outputs, torch.Tensor):
        return summed_loss(None, outputs)
    total = None
    if isinstance(outputs, (list, tuple)):
        for output in outputs:
            total = summed_loss(total, _summed(output))
    return total


def _around_scaler(
    collect: _Stepped,
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    attachment: Attachment,
) -> None:
    unscaled = [False]  # collected after unscale_ since the last step

    def after_unscale(opt: torch.optim.Optimizer) -> None:
        if opt is optimizer:
            collect(scaler=scaler)
            unscaled[0] = True

    def before_step(*args: Any) -> None:
        # A fused optimizer's step unscales by itself: the scaler called no unscale_.
        if not unscaled[0]:
            collect(scaler=scaler, scaled=True)
        unscaled[0] = False

    _ScalerTap.on(scaler, "unscale_", after_unscale, attachment)
    attachment._undo.append(optimizer.register_step_pre_hook(before_step).remove)


def at_end_of_backward(
    params: Sequence[torch.Tensor], callback: Callable[[], object]
) -> Attachment:
    """Run ``callback`` once at the end of every backward pass that reaches ``params``.

    A pass that raised (an out-of-memory retry) never reaches its end; the next
    pass is told apart by autograd's graph task id and gets its callback.

    ``callback`` runs after the callbacks others queue during the pass: DDP queues, when
    its last bucket is ready, the one that waits for the all-reduce and writes the reduced
    gradients back, which every rank then holds and the optimizer steps with.

    A backward pass run inside a node of another (reentrant activation checkpointing
    recomputes a block and runs its backward there) is part of the outer pass: the
    callback runs once, at the end of the outermost.
    """
    queued: set[int] = set()
    """The graph tasks whose end is queued."""

    def look() -> None:
        callback()

    queue = torch.autograd.Variable._execution_engine.queue_callback

    def ended(task: int) -> Callable[[], None]:
        def end_of_backward() -> None:
            node: Any = torch._C._current_autograd_node()  # None outside any node
            if node is not None:  # a pass inside another's node: the outer one goes on
                queued.discard(task)
                node.register_hook(arm)  # runs in the outer pass, after this node
                return
            queued.clear()  # and forget the passes that raised
            # Queued at the pass's first gradient, so ahead of DDP's: queue the look
            # behind it. (Autograd runs the callbacks that callbacks queue, before
            # backward() returns.)
            queue(look)

        return end_of_backward

    def arm(*args: Any) -> None:
        # The first gradient of a backward pass queues one callback for its end.
        task = torch._C._current_graph_task_id()
        if task not in queued:
            queued.add(task)
            queue(ended(task))

    attachment = Attachment()
    attachment._undo.extend(
        p.register_post_accumulate_grad_hook(arm).remove for p in params if p.requires_grad
    )
    return attachment
