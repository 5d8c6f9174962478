"""The Prometheus ``/metrics`` endpoint.

prometheus-client's server negotiates the format from the ``Accept`` header:
the classic text format by default, OpenMetrics when Prometheus asks for it.

A NaN often ends a run, and an unhealthy update recorded just before the
process exits must still reach Prometheus. So closing the endpoint, the
interpreter exiting with it open, or a SIGTERM (what Kubernetes, Slurm and
torchrun send) waits until a Prometheus scrape has collected the latest
unhealthy update, for at most ``exit_grace`` seconds. A process that dies from an
uncaught exception while gradtel serves counts it first
(``gradtel_training_exceptions_total{type,gradients}``, by a chained ``sys.excepthook`` that
passes the exception on unchanged) and waits for that scrape too. An endpoint that no
Prometheus has scraped yet waits only until it has been up for ``exit_grace`` (a run
that fails at its first update still gets its first scrape; after that long unscraped,
nobody would come). Only a Prometheus scrape ends the wait: ``curl`` or ``gradtel
watch`` do not.
The first Ctrl-C during the wait ends it.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType, TracebackType
from typing import Any, Literal

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric

from .. import _checks
from .context import Context, context, contexts
from .httpd import Running, TLSConfig, start
from .ranks import local_rank
from .telemetry import count_error, count_exception

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_EXIT_GRACE",
    "DEFAULT_PORT",
    "DEFAULT_STALE_AFTER",
    "MetricsServer",
    "PortInUseError",
    "serve",
]

DEFAULT_PORT = 9464
"""The port OpenTelemetry's Prometheus exporter uses by convention."""
DEFAULT_ADDR = "127.0.0.1"
"""Loopback only: exposing metrics beyond the host is an explicit choice (``addr="0.0.0.0"``)."""

DEFAULT_STALE_AFTER = 600.0
"""Seconds without an update after which ``/healthz`` reports the process stale."""

DEFAULT_EXIT_GRACE = 20.0
"""Seconds the endpoint may stay up at exit for an unscraped unhealthy update: more
than one scrape at the common 15 s interval, and inside Kubernetes' default 30 s
between SIGTERM and SIGKILL."""

# After the scrape has collected, let its response leave the socket before closing.
_FLUSH_MARGIN = 0.25

logger = logging.getLogger("gradtel")
_interrupted = threading.Event()
"""Set by a Ctrl-C during an exit wait: no later wait in this process starts."""


class _Filtered:
    """A registry view for prometheus-client's WSGI app whose ``name[]`` filter keeps
    the samples named, also of collectors that describe no names up front (OpenTelemetry's)."""

    def __init__(self, registry: CollectorRegistry, names: Iterable[str] | None = None) -> None:
        self._registry = registry
        self._names = None if names is None else set(names)

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if self._names is None:
                yield family
                continue
            kept = [s for s in family.samples if s.name in self._names]
            if kept:
                filtered = Metric(family.name, family.documentation, family.type, family.unit)
                filtered.samples = kept
                yield filtered

    def restricted_registry(self, names: Iterable[str]) -> _Filtered:
        return _Filtered(self._registry, names)


class PortInUseError(OSError):
    """The endpoint's port is taken by another process."""


class MetricsServer:
    """A running (or failed) ``/metrics`` endpoint; returned by :func:`serve`.

    Attributes:
        addr: The address it was asked to bind.
        port: The bound port (the real one when 0 was asked), or ``None`` when
            the endpoint could not start and ``on_error="warn"`` kept training going.
    """

    def __init__(
        self,
        addr: str,
        port: int | None,
        *,
        exit_grace: float = DEFAULT_EXIT_GRACE,
        tls: bool = False,
        recorded: Context | None = None,
    ) -> None:
        self.addr = addr
        self.port = port
        self.tls = tls
        self.exit_grace = exit_grace
        self._running: Running | None = None
        self._scraped = False
        self._started = time.monotonic()
        self._recorded = context() if recorded is None else recorded
        """What the monitors recording into the served registry did: the exit wait's subject."""
        self._covered_until = float("-inf")
        """``time.monotonic()`` at which the latest completed Prometheus scrape started."""
        self._lock = threading.Lock()

    def _on_scrape(self, started: float) -> None:
        """A Prometheus scrape that started at ``started`` has collected everything."""
        self._covered_until = max(self._covered_until, started)
        self._scraped = True

    @property
    def serving(self) -> bool:
        """Whether the endpoint is up."""
        return self._running is not None

    @property
    def url(self) -> str | None:
        """``http(s)://addr:port/metrics``, or None when not serving."""
        if self.port is None:
            return None
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/metrics"

    @property
    def pending_unhealthy(self) -> bool:
        """An unhealthy update was recorded after the last Prometheus scrape that collected."""
        return self._pending()

    def _pending(self) -> bool:
        recorded = self._recorded.last_unhealthy
        return recorded is not None and recorded >= self._covered_until

    def close(self, grace: float | None = None) -> None:
        """Stop serving and free the port. Safe to call more than once.

        If a Prometheus has scraped this endpoint before and an unhealthy
        update has not been scraped yet, first wait for the next scrape, at
        most ``grace`` seconds (default: ``exit_grace``). A Ctrl-C ends the wait.

        Raises:
            ValueError: ``grace`` is not a number of seconds >= 0.
        """
        grace = self.exit_grace if grace is None else _checks.seconds("grace", grace, zero_ok=True)
        with self._lock:
            if self._running is None:
                return
            self._recorded.publish(wait=True)  # what a deferred read-out still holds
            self._wait_for_scrape(grace)
            running, self._running = self._running, None
        self._recorded.servers.discard(self)
        running.shutdown()

    def _wait_for_scrape(self, grace: float) -> None:
        if not self._scraped:  # Prometheus may not have had its first chance yet
            grace = min(grace, self._started + self.exit_grace - time.monotonic())
        if grace <= 0 or not self._pending() or _interrupted.is_set():
            return
        logger.warning(
            "gradtel: keeping %s up for at most %.3gs until Prometheus scrapes the last "
            "unhealthy update (Ctrl-C ends the wait)",
            self.url,
            grace,
        )
        deadline = time.monotonic() + grace
        try:
            while time.monotonic() < deadline:
                if not self._pending():
                    time.sleep(_FLUSH_MARGIN)
                    return
                time.sleep(0.05)
        except KeyboardInterrupt:
            _interrupted.set()
            logger.warning(
                "gradtel: exit wait ended by Ctrl-C; the last unhealthy update may be unscraped"
            )

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self.url if self.serving else "not serving"
        return f"<MetricsServer {state}>"


def _port_from(value: object, source: str) -> int:
    if isinstance(value, str) and source == "GRADTEL_PORT":
        if not re.fullmatch(r"\s*-?[0-9]+\s*", value):  # no "+80", "0_0" or "8e3"
            raise ValueError(
                f"GRADTEL_PORT must be an integer from 0 to 65535, got {value!r} (digits only; 0 "
                "picks a free port)"
            )
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{source} must be an int from 0 to 65535, got {value!r} ({type(value).__name__})"
        )
    if not 0 <= value <= 65535:
        raise ValueError(f"{source} must be from 0 to 65535 (0 picks a free port), got {value}")
    return value


def _addr_from(value: object, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{source} must be a non-empty host address such as '127.0.0.1' or '0.0.0.0', "
            f"got {value!r}"
        )
    return value.strip()


def _tls_from(cert: str | None, key: str | None, client_ca: str | None) -> TLSConfig | None:
    cert = cert if cert is not None else os.environ.get("GRADTEL_TLS_CERT")
    key = key if key is not None else os.environ.get("GRADTEL_TLS_KEY")
    client_ca = client_ca if client_ca is not None else os.environ.get("GRADTEL_TLS_CLIENT_CA")
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError(
                f"tls_client_ca ({client_ca!r}) needs tls_cert and tls_key: mutual TLS is TLS first"
            )
        return None
    if cert is None or key is None:
        given, missing = ("tls_cert", "tls_key") if key is None else ("tls_key", "tls_cert")
        raise ValueError(
            f"{given} is set but {missing} is not; HTTPS needs both (or $GRADTEL_TLS_*)"
        )
    for name, path in (("tls_cert", cert), ("tls_key", key), ("tls_client_ca", client_ca)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{name} must be a readable PEM file, got {path!r} (no such file)")
    return TLSConfig(cert, key, client_ca)


def serve(
    port: int | None = None,
    addr: str | None = None,
    *,
    registry: CollectorRegistry | None = None,
    on_error: Literal["warn", "raise"] = "warn",
    exit_grace: float = DEFAULT_EXIT_GRACE,
    rank_offset: bool = True,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
    stale_after: float = DEFAULT_STALE_AFTER,
) -> MetricsServer:
    """Serve Prometheus ``/metrics`` from a background thread.

    Args:
        port: TCP port; ``0`` picks a free one (see ``server.port``). Default:
            ``$GRADTEL_PORT`` if set, else 9464.
        addr: Bind address. Default: ``$GRADTEL_ADDR`` if set, else ``127.0.0.1``.
            Use ``"0.0.0.0"`` (or ``"::"``) to be scraped from other hosts,
            e.g. by Prometheus in a Kubernetes pod.
        registry: prometheus-client registry to serve; defaults to the global
            ``REGISTRY``, where gradtel's own meter provider exports.
        on_error: ``"warn"`` (default) logs a failure to start (a port in use,
            say) and counts it in ``gradtel_errors_total{stage="serve"}``, and
            training goes on without an endpoint; ``"raise"`` raises it.
        rank_offset: In a multi-process run (``WORLD_SIZE`` > 1, as torchrun
            sets it), serve on ``port + LOCAL_RANK`` so that every rank of a
            node has its own endpoint. ``False`` uses ``port`` as given. A
            ``port`` of 0 picks a free port on every rank.
        exit_grace: At ``close()``, interpreter exit or SIGTERM, wait at most
            this many seconds (default 20) for Prometheus to scrape an
            unhealthy update it has not seen yet (only when a Prometheus has
            scraped the endpoint before). 0 never waits. SIGTERM gets the wait
            only while the application has no SIGTERM handler of its own.
        tls_cert: PEM certificate (chain) to serve HTTPS with; default
            ``$GRADTEL_TLS_CERT``. Needs ``tls_key``.
        tls_key: Its PEM private key; default ``$GRADTEL_TLS_KEY``.
        tls_client_ca: PEM CA bundle; when set (or ``$GRADTEL_TLS_CLIENT_CA``),
            clients must present a certificate it signed (mutual TLS).
        stale_after: ``/healthz`` answers 503 when no update was recorded for
            this many seconds (since start, before the first one). Default 600.

    Returns:
        A :class:`MetricsServer`; ``close()`` it when done.

    Raises:
        TypeError: ``port`` is not an int, ``registry`` not a ``CollectorRegistry``,
            or ``rank_offset`` not a bool.
        ValueError: ``port`` out of 0..65535, ``addr`` empty, malformed
            ``GRADTEL_PORT``/``GRADTEL_ADDR``, an unknown ``on_error`` or a
            negative ``exit_grace``.
        PortInUseError: the port is taken and ``on_error="raise"``.
        OSError: the endpoint cannot start otherwise and ``on_error="raise"``.

    >>> server = serve(port=0)
    >>> server.serving, server.port > 0
    (True, True)
    >>> server.close()
    """
    _checks.on_error(on_error)
    exit_grace = _checks.seconds("exit_grace", exit_grace, zero_ok=True)
    if registry is not None and not isinstance(registry, CollectorRegistry):
        raise TypeError(
            "registry must be a prometheus_client.CollectorRegistry or None (the global "
            f"REGISTRY), got {registry!r} ({type(registry).__name__})"
        )
    _checks.flag("rank_offset", rank_offset)
    if port is None:
        env = os.environ.get("GRADTEL_PORT")
        port = DEFAULT_PORT if env is None else _port_from(env, "GRADTEL_PORT")
    else:
        port = _port_from(port, "port")
    if addr is None:
        env = os.environ.get("GRADTEL_ADDR")
        addr = DEFAULT_ADDR if env is None else _addr_from(env, "GRADTEL_ADDR")
    else:
        addr = _addr_from(addr, "addr")
    rank_on_node = local_rank()  # checks the launcher's variables even when unused
    if rank_offset and port:
        port += rank_on_node
        if port > 65535:
            raise ValueError(
                f"port {port} (base port + LOCAL_RANK) is above 65535; pick a lower port"
            )

    tls = _tls_from(tls_cert, tls_key, tls_client_ca)
    stale_after = _checks.seconds("stale_after", stale_after)
    served = REGISTRY if registry is None else registry
    server = MetricsServer(
        addr, None, exit_grace=exit_grace, tls=tls is not None, recorded=context(served)
    )
    try:
        running = start(
            addr,
            port,
            _Filtered(served),
            served=served,
            tls=tls,
            stale_after=stale_after,
            on_scrape=server._on_scrape,
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            error: OSError = PortInUseError(
                exc.errno,
                f"gradtel cannot serve /metrics: port {port} on {addr} is already in use; "
                "pick another with port= or GRADTEL_PORT, or port=0 for a free one",
            )
        else:
            error = OSError(exc.errno, f"gradtel cannot serve /metrics on {addr}:{port}: {exc}")
        if on_error == "raise":
            raise error from exc
        logger.error("%s; training continues without a metrics endpoint", error.strerror)
        count_error("serve", served)
        return server
    server.port = running.port
    server._running = running
    server._recorded.servers.add(server)
    _close_at_exit()
    return server


def _open_servers() -> list[MetricsServer]:
    return [server for served in contexts() for server in list(served.servers)]


def _close_open_servers() -> None:
    # Runs while the serving threads are still alive, so a last scrape can come in.
    for server in _open_servers():
        server.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM with gradtel's endpoints open: the exit grace, then the default action."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    try:
        _close_open_servers()
    finally:
        os.kill(os.getpid(), signal.SIGTERM)


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker) must not hold the listening sockets: after
    # close() they would still accept connections that nobody answers, and the port
    # could not be served again.
    for server in _open_servers():
        if server._running is not None:
            server._running.close_in_child()
    for served in contexts():
        served.servers.clear()


def _close_at_exit() -> None:
    # Registered when the first endpoint starts: exit handlers run last-in first-out,
    # so this runs before the shutdown hook of a MeterProvider made earlier, which
    # would take the metrics away while the endpoint waits for its last scrape.
    global _exit_hooks_installed
    if _exit_hooks_installed:
        return
    _exit_hooks_installed = True
    atexit.register(_close_open_servers)
    os.register_at_fork(after_in_child=_forget_in_child)
    sys.excepthook = _recording_crashes(sys.excepthook)
    # SIGTERM gets the same grace, unless the application handles SIGTERM itself
    # (then its handler decides; gradtel never replaces it).
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)


_exit_hooks_installed = False


def _recording_crashes(previous: Callable[..., Any]) -> Callable[..., Any]:
    """``sys.excepthook`` that counts the uncaught exception ending training, then hands it
    to ``previous`` unchanged; the exit wait then holds the endpoint for its scrape."""

    def excepthook(
        kind: type[BaseException], value: BaseException, traceback: TracebackType | None
    ) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            try:
                count_exception(kind)
            except Exception as exc:
                logger.error("gradtel could not count the uncaught exception: %r", exc)
        previous(kind, value, traceback)

    return excepthook
