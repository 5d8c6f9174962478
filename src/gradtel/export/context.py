"""What gradtel keeps for one prometheus-client registry, in one object.

Everything that serves one registry shares a :class:`Context`: the meter providers that
expose on it and their instruments, what its monitors did lately (what ``/healthz``
reports and the exit wait waits for), the monitors that claim parameters on it, the
endpoints that serve it and their error log. It is found from the registry, the way
prometheus-client passes ``registry=``, with one default for its global ``REGISTRY``;
a test that makes its own ``CollectorRegistry`` gets a fresh context with it.

At exit the contexts' deferred monitors publish their pending updates, before the
endpoints' exit wait and before the reference cycles of a distributed model are collected.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from opentelemetry.metrics import MeterProvider
from prometheus_client import REGISTRY, CollectorRegistry

from .._ratelimit import RateLimitedLog

if TYPE_CHECKING:  # they import this module
    from .endpoint import MetricsServer
    from .telemetry import Instruments

__all__ = [
    "Claimant",
    "Context",
    "Deferred",
    "context",
    "context_of",
    "contexts",
    "flush_at_exit",
    "free_collectives_at_exit",
]

logger = logging.getLogger("gradtel")


class Claimant(Protocol):
    """A monitor, as its context sees it: what it watches."""

    @property
    def parameters(self) -> tuple[Any, ...]: ...


class Deferred(Protocol):
    """A monitor with a deferred read-out, as its context sees it: what it can publish."""

    def flush(self, wait: bool = True) -> None: ...

    def close(self) -> None: ...

    def _forget_pending(self) -> None: ...


class Context:
    """gradtel's state for one prometheus-client registry.

    Args:
        registry: The registry gradtel's metrics are exposed on.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lock = threading.RLock()
        self._registry = weakref.ref(registry)  # a strong one would keep its own key alive
        self.providers: weakref.WeakSet[MeterProvider] = weakref.WeakSet()
        """The meter providers that expose on this registry."""
        self._made: weakref.ref[MeterProvider] | None = None
        self.default_provider: MeterProvider | None = None
        """gradtel's own provider, made on first use for a monitor given none (on the
        global ``REGISTRY``)."""
        self.instruments: weakref.WeakKeyDictionary[MeterProvider, Instruments] = (
            weakref.WeakKeyDictionary()
        )
        """gradtel's instruments on each provider, made once each."""
        self.clock: Callable[[], float] = time.monotonic
        """Monotonic seconds that ``last_collect`` and the ``/healthz`` staleness are
        measured on; replaced before the endpoint starts, if at all."""
        self.last_collect: float | None = None
        """``clock()`` at the latest ``collect()`` call, scanned or not, or None."""
        self.last_unhealthy: float | None = None
        """``time.monotonic()`` of the latest unhealthy update recorded, or of the uncaught
        exception that ends the process: what the exit wait waits to see scraped. None: none."""
        self.pending_errors: dict[str, int] = {}
        """Failures counted before any gradtel meter provider exposed on this registry; the
        first one made for it counts them."""
        self.deferred: weakref.WeakSet[Deferred] = weakref.WeakSet()
        """Monitors with a deferred read-out (``readout="deferred"``)."""
        self.claims: weakref.WeakKeyDictionary[MeterProvider, weakref.WeakSet[Claimant]] = (
            weakref.WeakKeyDictionary()
        )
        """The open monitors by the provider they record into."""
        self.servers: set[MetricsServer] = set()
        """The running endpoints that serve this registry (strong references: an endpoint
        whose ``serve()`` result was dropped must still wait for its last scrape at exit)."""
        self.error_log = RateLimitedLog(logger)
        """The endpoints' failures, logged once a minute per stage."""

    @property
    def made(self) -> MeterProvider | None:
        """The provider :func:`gradtel.prometheus_meter_provider` made for this registry last,
        while it lives: where a failure counted without a monitor goes."""
        return None if self._made is None else self._made()

    @made.setter
    def made(self, provider: MeterProvider) -> None:
        self._made = weakref.ref(provider)

    @property
    def registry(self) -> CollectorRegistry | None:
        """The registry, while it lives."""
        return self._registry()

    def publish(self, wait: bool = False) -> None:
        """Publish the deferred monitors' finished updates (all of them with ``wait``):
        before a scrape, and before the exit wait; first those of dropped monitors."""
        close_dropped(wait)
        for monitor in list(self.deferred):
            monitor.flush(wait)

    def claim(self, monitor: Claimant, provider: MeterProvider) -> None:
        """Let ``monitor`` record its parameters into ``provider``.

        Raises:
            ValueError: another open monitor records one of them there: every count
                would be exported twice.
        """
        mine = {id(p) for p in monitor.parameters}
        with self.lock:
            others = self.claims.setdefault(provider, weakref.WeakSet())
            for other in others:
                if getattr(other, "dropped", False):  # being closed: it records no new update
                    continue
                shared = [p for p in other.parameters if id(p) in mine]
                if shared:
                    raise ValueError(
                        f"another GradMonitor already watches {len(shared)} of these parameters "
                        "and records into the same meter_provider, so every count would be "
                        "exported twice; close() the other monitor first, or give this one its "
                        "own meter_provider (gradtel.prometheus_meter_provider(registry))"
                    )
            others.add(monitor)

    def release(self, monitor: Claimant, provider: MeterProvider) -> None:
        with self.lock:
            self.claims.get(provider, weakref.WeakSet()).discard(monitor)


_contexts: weakref.WeakKeyDictionary[CollectorRegistry, Context] = weakref.WeakKeyDictionary()
"""The one piece of module state: each registry's context, made on first use."""
_lock = threading.Lock()


def context(registry: CollectorRegistry | None = None) -> Context:
    """The :class:`Context` of ``registry`` (default: prometheus-client's global ``REGISTRY``)."""
    target = REGISTRY if registry is None else registry
    with _lock:
        found = _contexts.get(target)
        if found is None:
            found = _contexts[target] = Context(target)
        return found


def context_of(meter_provider: MeterProvider) -> Context:
    """The context of the registry ``meter_provider`` exposes on. A provider that
    :func:`gradtel.prometheus_meter_provider` did not make is taken to feed the global
    ``REGISTRY``, where the OpenTelemetry Prometheus reader registers by default."""
    for found in contexts():
        if meter_provider in found.providers:
            return found
    return context()


def contexts() -> Iterable[Context]:
    """Every registry's context, made so far."""
    with _lock:
        return list(_contexts.values())


# Deferred monitors dropped with updates still to publish (a last NaN). A finalizer runs
# wherever the last reference goes, maybe inside a lock that publishing takes, so it only
# queues the monitor and wakes a gradtel thread (a SimpleQueue may be fed from one), which
# closes it: that publishes the updates. A monitor leaves the queue only under _closing,
# so a publish that waits (an endpoint's close, the exit) also waits for one being closed.
_dropped: queue.SimpleQueue[Deferred] = queue.SimpleQueue()
_wakeup: queue.SimpleQueue[None] = queue.SimpleQueue()
_closing = threading.RLock()
_closer: list[threading.Thread] = []


def close_when_dropped(monitor: Deferred) -> None:
    """Have a dropped ``monitor`` closed soon, off its finalizer's thread."""
    _dropped.put(monitor)
    _wakeup.put(None)


def close_dropped(wait: bool = False) -> None:
    """Close the dropped monitors queued so far, here; with ``wait``, also wait for those
    the gradtel thread is closing (without, leave them to it)."""
    if not _closing.acquire(blocking=wait):
        return
    try:
        while True:
            try:
                monitor = _dropped.get_nowait()
            except queue.Empty:
                return
            try:
                monitor.close()
            except Exception as exc:  # a "raise" policy: the update is recorded before it acts
                logger.debug("gradtel: a dropped monitor's last update: %r", exc)
    finally:
        _closing.release()


def _close_dropped_forever() -> None:
    while True:
        _wakeup.get()
        close_dropped(wait=True)


# At exit: every context's deferred monitors publish what they hold.


def _flush_all() -> None:
    for served in contexts():
        served.publish(wait=True)
    close_dropped(wait=True)  # with no context left to publish


def flush_at_exit() -> None:
    """Publish the deferred monitors' pending updates when the interpreter exits, or soon
    after one is dropped."""
    # Registered with the first such monitor, not at import: exit handlers run last-in
    # first-out, so this runs before the shutdown hook of a MeterProvider made earlier.
    atexit.unregister(_flush_all)  # once
    atexit.register(_flush_all)
    if not _closer:
        os.register_at_fork(after_in_child=_forget_in_child)
    if not (_closer and _closer[0].is_alive()):  # none yet, or this is a forked child
        _closer[:] = [threading.Thread(target=_close_dropped_forever, name="gradtel-closer")]
        _closer[0].daemon = True
        _closer[0].start()


def _forget_in_child() -> None:
    # A forked child's copies of the parent's pending updates are the parent's to publish;
    # the monitors go on publishing what the child makes.
    global _closing
    _closing = threading.RLock()  # the parent's thread that held it is not in the child
    for served in contexts():
        for monitor in list(served.deferred):
            monitor._forget_pending()
    while not _dropped.empty():
        _dropped.get_nowait()


def free_collectives_at_exit() -> None:
    """In a distributed run, collect reference cycles when the interpreter begins to exit.

    A gloo work item holds Python objects (the thread-local state it was queued with); its
    worker thread drops them once it holds the GIL. One still held when the interpreter
    finalizes aborts the process (``terminate called without an active exception``), with
    or without gradtel; the cycles of a DDP or FSDP model keep such items alive until then.
    Collected in an exit handler, they are freed while the worker threads can still run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(_publish_then_collect)  # once, however many monitors
        atexit.register(_publish_then_collect)


def _publish_then_collect() -> None:
    # Publish first: a deferred monitor that only a cycle holds is freed by the collection.
    _flush_all()
    gc.collect()
