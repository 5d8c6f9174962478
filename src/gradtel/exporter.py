"""The Prometheus ``/metrics`` endpoint.

prometheus-client's server negotiates the format from the ``Accept`` header:
the classic text format by default, OpenMetrics when Prometheus asks for it.

A NaN often ends a run, and an unhealthy update recorded just before the
process exits must still reach Prometheus. So closing the endpoint, or the
interpreter exiting with it open, waits until a scrape has collected the
latest unhealthy update, for at most ``exit_grace`` seconds. It waits only
when something has scraped this endpoint before: nobody else would come.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import time
from collections.abc import Iterator
from typing import Any, Literal

from prometheus_client import REGISTRY, CollectorRegistry

from . import _checks
from .httpd import TLSConfig, start
from .telemetry import count_error, last_unhealthy_record, launcher_world_size

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_EXIT_GRACE",
    "DEFAULT_STALE_AFTER",
    "DEFAULT_PORT",
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

DEFAULT_EXIT_GRACE = 30.0
"""Seconds the endpoint may stay up at exit for an unscraped unhealthy update:
two scrapes at the common 15 s interval."""

# After the scrape has collected, let its response leave the socket before closing.
_FLUSH_MARGIN = 0.25

logger = logging.getLogger("gradtel")
# Strong references: `gradtel.serve()` is often called without keeping the result,
# and such an endpoint must still wait for its last scrape at exit.
_open_servers: set[MetricsServer] = set()


class _ScrapeWatch:
    """Registry wrapper that notes when scrapes of the endpoint collect."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self.scraped = False
        self.covered_until = float("-inf")
        """``time.monotonic()`` at which the latest completed collection started."""

    def collect(self) -> Iterator[Any]:
        started = time.monotonic()
        yield from self._registry.collect()
        self.covered_until = max(self.covered_until, started)
        self.scraped = True

    def restricted_registry(self, names: Any) -> Any:
        return self._registry.restricted_registry(names)


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
        server: Any = None,
        thread: Any = None,
        watch: _ScrapeWatch | None = None,
        tls: bool = False,
    ) -> None:
        self.addr = addr
        self.port = port
        self.tls = tls
        self.exit_grace = exit_grace
        self._server = server
        self._thread = thread
        self._watch = watch
        if server is not None:
            _open_servers.add(self)
            _close_at_exit()

    @property
    def serving(self) -> bool:
        """Whether the endpoint is up."""
        return self._server is not None

    @property
    def url(self) -> str | None:
        """``http(s)://addr:port/metrics``, or None when not serving."""
        if self.port is None:
            return None
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/metrics"

    @property
    def pending_unhealthy(self) -> bool:
        """An unhealthy update was recorded after the last scrape that collected."""
        return self._unscraped()

    def _unscraped(self) -> bool:
        recorded = last_unhealthy_record()
        return (
            self._watch is not None
            and recorded is not None
            and recorded >= self._watch.covered_until
        )

    def close(self, grace: float | None = None) -> None:
        """Stop serving and free the port. Safe to call more than once.

        If this endpoint has been scraped before and an unhealthy update has
        not been scraped yet, first wait for the next scrape, at most ``grace``
        seconds (default: ``exit_grace``).
        """
        if self._server is None:
            return
        self._wait_for_scrape(self.exit_grace if grace is None else grace)
        server, self._server = self._server, None
        _open_servers.discard(self)
        server.shutdown()
        server.server_close()
        self._thread.join()

    def _wait_for_scrape(self, grace: float) -> None:
        if grace <= 0 or self._watch is None or not self._watch.scraped:
            return
        if not self._unscraped():
            return
        logger.warning(
            "gradtel: keeping %s up for at most %gs until Prometheus scrapes the last "
            "unhealthy update",
            self.url,
            grace,
        )
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not self._unscraped():
                time.sleep(_FLUSH_MARGIN)
                return
            time.sleep(0.05)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self.url if self.serving else "not serving"
        return f"<MetricsServer {state}>"


def _port_from(value: object, source: str) -> int:
    if isinstance(value, str) and source == "GRADTEL_PORT":
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(
                f"GRADTEL_PORT must be an integer from 0 to 65535, got {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{source} must be an int from 0 to 65535, got {value!r} ({type(value).__name__})"
        )
    if not 0 <= value <= 65535:
        raise ValueError(
            f"{source} must be from 0 to 65535 (0 picks a free port), got {value}"
        )
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
        raise ValueError(f"{given} is set but {missing} is not; HTTPS needs both (or $GRADTEL_TLS_*)")
    for name, path in (("tls_cert", cert), ("tls_key", key), ("tls_client_ca", client_ca)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{name} must be a readable PEM file, got {path!r} (no such file)")
    return TLSConfig(cert, key, client_ca)


def _local_rank() -> int:
    """This process's rank on its node in a multi-process run, else 0."""
    if launcher_world_size() <= 1:
        return 0
    local = os.environ.get("LOCAL_RANK", "0")
    if not local.isdigit():
        raise ValueError(f"LOCAL_RANK must be a non-negative integer, got {local!r}")
    return int(local)


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
        exit_grace: At ``close()`` or interpreter exit, wait at most this many
            seconds for Prometheus to scrape an unhealthy update it has not
            seen yet (only when the endpoint has been scraped before). 0 never waits.
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
        TypeError: ``port`` is not an int.
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
    if rank_offset and port:
        port += _local_rank()
        if port > 65535:
            raise ValueError(f"port {port} (base port + LOCAL_RANK) is above 65535; pick a lower port")

    tls = _tls_from(tls_cert, tls_key, tls_client_ca)
    stale_after = _checks.seconds("stale_after", stale_after)
    watch = _ScrapeWatch(REGISTRY if registry is None else registry)
    try:
        server, thread = start(addr, port, watch, tls=tls, stale_after=stale_after)
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
        count_error("serve")
        return MetricsServer(addr, None)
    return MetricsServer(
        addr,
        server.server_port,
        exit_grace=exit_grace,
        server=server,
        thread=thread,
        watch=watch,
        tls=tls is not None,
    )


def _close_open_servers() -> None:
    # Runs while the serving threads are still alive, so a last scrape can come in.
    for server in list(_open_servers):
        server.close()


def _close_at_exit() -> None:
    # Registered when the first endpoint starts: exit handlers run last-in first-out,
    # so this runs before the shutdown hook of a MeterProvider made earlier, which
    # would take the metrics away while the endpoint waits for its last scrape.
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_close_open_servers)
        _exit_hook_registered = True


_exit_hook_registered = False
