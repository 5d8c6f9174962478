"""The Prometheus ``/metrics`` endpoint.

prometheus-client's server negotiates the format from the ``Accept`` header:
the classic text format by default, OpenMetrics when Prometheus asks for it.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Literal

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from .telemetry import count_error

__all__ = ["DEFAULT_ADDR", "DEFAULT_PORT", "MetricsServer", "PortInUseError", "serve"]

DEFAULT_PORT = 9464
"""The port OpenTelemetry's Prometheus exporter uses by convention."""
DEFAULT_ADDR = "127.0.0.1"
"""Loopback only: exposing metrics beyond the host is an explicit choice (``addr="0.0.0.0"``)."""

logger = logging.getLogger("gradtel")


class PortInUseError(OSError):
    """The endpoint's port is taken by another process."""


class MetricsServer:
    """A running (or failed) ``/metrics`` endpoint; returned by :func:`serve`.

    Attributes:
        addr: The address it was asked to bind.
        port: The bound port (the real one when 0 was asked), or ``None`` when
            the endpoint could not start and ``on_error="warn"`` kept training going.
    """

    def __init__(self, addr: str, port: int | None, server: object = None, thread: object = None):
        self.addr = addr
        self.port = port
        self._server = server
        self._thread = thread

    @property
    def serving(self) -> bool:
        """Whether the endpoint is up."""
        return self._server is not None

    @property
    def url(self) -> str | None:
        """``http://addr:port/metrics``, or None when not serving."""
        if self.port is None:
            return None
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port. Safe to call more than once."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._thread.join()  # type: ignore[attr-defined]

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


def serve(
    port: int | None = None,
    addr: str | None = None,
    *,
    registry: CollectorRegistry | None = None,
    on_error: Literal["warn", "raise"] = "warn",
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

    Returns:
        A :class:`MetricsServer`; ``close()`` it when done.

    Raises:
        TypeError: ``port`` is not an int.
        ValueError: ``port`` out of 0..65535, ``addr`` empty, malformed
            ``GRADTEL_PORT``/``GRADTEL_ADDR``, or an unknown ``on_error``.
        PortInUseError: the port is taken and ``on_error="raise"``.
        OSError: the endpoint cannot start otherwise and ``on_error="raise"``.

    >>> server = serve(port=0)
    >>> server.serving, server.port > 0
    (True, True)
    >>> server.close()
    """
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
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

    try:
        server, thread = start_http_server(
            port, addr=addr, registry=REGISTRY if registry is None else registry
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
        count_error("serve")
        return MetricsServer(addr, None)
    return MetricsServer(addr, server.server_port, server, thread)
