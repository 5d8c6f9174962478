"""The HTTP server behind :func:`gradtel.serve`: ``/metrics``, ``/healthz`` and optional TLS.

A thread per request, like prometheus-client's own server, plus what an
always-on exporter needs: a health route for Kubernetes probes, TLS with
optional client certificates, and failures inside a request (a scraper that
hangs up mid-response, a refused handshake) logged at most once a minute and
counted in ``gradtel_errors_total{stage="serve"}``, never raised into training.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app

from ._ratelimit import RateLimitedLog
from .telemetry import count_error, last_collect

__all__ = ["TLSConfig", "start"]

logger = logging.getLogger("gradtel")
_error_log = RateLimitedLog(logger)


def _failed(level: int, message: str, *args: object) -> None:
    """A failure in the endpoint: counted every time, logged once a minute."""
    count_error("serve")
    _error_log.log("serve", level, message, *args)


@dataclass(frozen=True)
class TLSConfig:
    """Certificate and key the endpoint serves with; with ``client_ca``, clients must present
    a certificate signed by it (mutual TLS)."""

    certfile: str
    keyfile: str
    client_ca: str | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.certfile, self.keyfile)
        if self.client_ca is not None:
            context.load_verify_locations(cafile=self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops connections under concurrent
    # scrapers, which then wait for a TCP retry (a second or more).
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scraper that went away or a failed handshake.
        _failed(logging.WARNING, "gradtel: a request to the metrics endpoint from %s failed", client_address)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _health(stale_after: float, started: float) -> tuple[str, bytes]:
    # Liveness of the training loop: any collect() call counts, scanned or
    # sampled out, so that sample_every never makes a healthy job look stale.
    called = last_collect()
    since = time.monotonic() - (started if called is None else max(called, started))
    ok = since <= stale_after
    body = {
        "status": "ok" if ok else "stale",
        "seconds_since_update": round(since, 3),
        "updates_seen": called is not None,
        "stale_after_seconds": stale_after,
    }
    return ("200 OK" if ok else "503 Service Unavailable"), json.dumps(body).encode()


def _app(collector: Any, stale_after: float) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(collector)
    started = time.monotonic()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/metrics", "/"):
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            status, body = _health(stale_after, started)
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"gradtel serves /metrics and /healthz\n"]

    return app


def _serve(server: _Server) -> None:
    """serve_forever, restarted if it ever raises: the endpoint outlives its own faults."""
    while True:
        try:
            server.serve_forever()
            return  # shutdown() asked for it
        except Exception as exc:  # noqa: BLE001 (counted, logged, restarted)
            _failed(logging.ERROR, "gradtel: the metrics endpoint failed (%r) and restarts", exc)
            time.sleep(0.1)


def start(
    addr: str, port: int, collector: Any, *, tls: TLSConfig | None, stale_after: float
) -> tuple[_Server, threading.Thread]:
    """Bind and serve in a daemon thread; raises OSError when the address cannot be bound."""
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(_Server):
        address_family = family

    server = Server((addr, port), _QuietHandler)
    server.set_app(_app(collector, stale_after))
    if tls is not None:
        # The handshake runs in the request's own thread, not in the accept loop,
        # so a slow or refused client never holds up other scrapes.
        server.socket = tls.context().wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
    thread = threading.Thread(target=_serve, args=(server,), name="gradtel-metrics", daemon=True)
    thread.start()
    return server, thread
