"""The HTTP server behind :func:`gradtel.serve`: ``/metrics``, ``/healthz`` and optional TLS.

prometheus-client's WSGI app answers ``/metrics`` (format negotiation,
``name[]`` filtering, compression); this module adds only what an always-on
exporter inside a training process needs:

- *Bounded.* One thread accepts connections and keeps them in a selector
  until a whole request has arrived; one worker thread (``WORKERS``) serves it.
  Idle connections cost a file descriptor, not a thread; at most
  ``MAX_CONNECTIONS`` are kept (the oldest idle one is dropped for a new one),
  an idle one is closed after ``IDLE_TIMEOUT`` seconds, a request still
  arriving after ``REQUEST_TIMEOUT`` seconds is dropped before it reaches the
  worker, and one being served (TLS handshake included) is cut off after as
  long, so slow or hostile clients can neither pin threads nor starve Prometheus.
- ``/healthz`` for Kubernetes probes; TLS with optional client certificates,
  the handshake done by a worker, never by the accept loop.
- Failures inside a request (a scraper that hangs up, a refused handshake, a
  header prometheus-client cannot parse) are counted in
  ``gradtel_errors_total{stage="serve"}`` and logged at most once a minute,
  never raised into training.
"""

from __future__ import annotations

import json
import logging
import queue
import selectors
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import choose_encoder

from .context import Context, context
from .telemetry import count_error

__all__ = ["IDLE_TIMEOUT", "MAX_CONNECTIONS", "REQUEST_TIMEOUT", "WORKERS", "TLSConfig", "start"]

WORKERS = 1
"""Threads that serve requests whose head has fully arrived. One: concurrent
collections contend for the GIL and the instruments' locks with the training
thread (measured under 20 back-to-back scrapers: a training step 10x slower with
one worker, 28x with two, 56x with four), and one scrape takes milliseconds."""
MAX_CONNECTIONS = 256
"""Open connections kept waiting for a request; past this the oldest idle one is closed."""
IDLE_TIMEOUT = 30.0
"""Seconds a connection may stay open without sending a request."""
REQUEST_TIMEOUT = 10.0
"""Seconds from a request's first byte (or a TLS handshake's) to its answer."""
SCRAPER_HEADER = "HTTP_X_PROMETHEUS_SCRAPE_TIMEOUT_SECONDS"
"""Sent by Prometheus and the scrapers built on its code (Grafana Agent/Alloy, vmagent,
the OpenTelemetry Collector's Prometheus receiver), not by curl or ``gradtel watch``."""

logger = logging.getLogger("gradtel")


def _failed(server: _Server, level: int, message: str, *args: object) -> None:
    """A failure in the endpoint: counted every time (in the registry it serves), logged
    once a minute."""
    count_error("serve", server.served)
    context(server.served).error_log.log("serve", level, message, *args)


@dataclass(frozen=True)
class TLSConfig:
    """Certificate and key the endpoint serves with; with ``client_ca``, clients must present
    a certificate signed by it (mutual TLS)."""

    certfile: str
    keyfile: str
    client_ca: str | None = None

    def context(self) -> ssl.SSLContext:
        """The server context; raises ValueError naming the file that cannot be used."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2

        def refuse_passphrase() -> str:
            # Without this, OpenSSL would prompt for a passphrase on the terminal.
            raise ValueError(
                f"tls_key {self.keyfile!r} is protected by a passphrase; gradtel cannot prompt "
                "for it: give an unencrypted key (e.g. `openssl pkey -in KEY -out PLAIN_KEY`)"
            )

        try:
            context.load_cert_chain(self.certfile, self.keyfile, password=refuse_passphrase)
        except ssl.SSLError as exc:
            raise ValueError(
                f"tls_cert {self.certfile!r} and tls_key {self.keyfile!r} must be a PEM "
                f"certificate (chain) and its PEM private key: {exc.reason or exc}"
            ) from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except ssl.SSLError as exc:
                raise ValueError(
                    f"tls_client_ca {self.client_ca!r} must be a PEM CA bundle: {exc.reason or exc}"
                ) from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _head_arrived(conn: socket.socket) -> bool:
    """Whether a whole request head (or an HTTP/0.9 line, or the end of input) is readable."""
    try:
        data = conn.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset: the worker finds out and closes it
    if not data or len(data) >= 65536 or b"\r\n\r\n" in data or b"\n\n" in data:
        return True
    line, newline, _ = data.partition(b"\n")
    return bool(newline) and b" HTTP/" not in line  # HTTP/0.9: the request line is all


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(WSGIServer):
    """A bound WSGI server whose connections are dispatched by :func:`_serve`, not by socketserver."""

    served: Any = None
    """The registry served: the endpoint's own failures are counted in it."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scraper that went away mid-response.
        _failed(
            self,
            logging.WARNING,
            "gradtel: a request to the metrics endpoint from %s failed",
            client_address,
        )


def _health(recorded: Context, stale_after: float, started: float) -> tuple[str, bytes]:
    # Liveness of the training loop: any collect() call counts, scanned or
    # sampled out, so that sample_every never makes a healthy job look stale.
    called = recorded.last_collect
    since = recorded.clock() - (started if called is None else max(called, started))
    ok = since <= stale_after
    body = {
        "status": "ok" if ok else "stale",
        "seconds_since_update": round(since, 3),
        "updates_seen": called is not None,
        "stale_after_seconds": stale_after,
    }
    return ("200 OK" if ok else "503 Service Unavailable"), json.dumps(body).encode()


def _app(
    server: _Server, registry: Any, stale_after: float, on_scrape: Callable[[float], None]
) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(registry)
    recorded = context(server.served)
    started = recorded.clock()
    # One collection at a time: concurrent ones contend for the instruments' locks
    # with the training thread's records (measured: 60x slower steps under 20
    # back-to-back scrapers, 9x with this lock). Slow clients still do not wait on
    # each other: reading a request and sending a response happen outside it.
    collecting = threading.Lock()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return route(environ, start_response)
        except Exception as exc:
            _failed(server, logging.ERROR, "gradtel: a /metrics request failed: %r", exc)
            start_response(
                "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
            )
            return [b"gradtel failed to answer this request; see the training log\n"]

    def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/metrics", "/"):
            accept = environ.get("HTTP_ACCEPT", "")
            try:
                choose_encoder(accept)
            except (ValueError, TypeError):  # e.g. "text/plain; version=x.y"
                _failed(
                    server,
                    logging.WARNING,
                    "gradtel: refused a /metrics request with Accept: %r",
                    accept,
                )
                start_response("406 Not Acceptable", [("Content-Type", "text/plain")])
                return [
                    b"gradtel cannot serve this Accept header; ask for text/plain or OpenMetrics\n"
                ]
            recorded.publish()  # deferred read-outs that have finished, first
            with collecting:
                began = time.monotonic()
                body: Iterable[bytes] = metrics(environ, start_response)
            if SCRAPER_HEADER in environ:
                on_scrape(began)  # the whole body is collected by now
            return body
        if path == "/healthz":
            status, health = _health(recorded, stale_after, started)
            start_response(status, [("Content-Type", "application/json")])
            return [health]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"gradtel serves /metrics and /healthz\n"]

    return app


class _Dispatcher:
    """The accept loop, its idle connections, and the workers that serve requests."""

    def __init__(self, server: _Server, tls: ssl.SSLContext | None) -> None:
        self.server = server
        self.tls = tls
        self.selector = selectors.DefaultSelector()
        self.waker, self.wake_sender = socket.socketpair()
        self.waker.setblocking(False)
        self.idle: dict[socket.socket, float] = {}
        self.partial: dict[socket.socket, tuple[float, Any]] = {}
        self.busy: dict[socket.socket, float] = {}
        self.lock = threading.Lock()
        self.requests: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(MAX_CONNECTIONS)
        self.stopping = False
        server.socket.setblocking(False)
        self.selector.register(server.socket, selectors.EVENT_READ, "accept")
        self.selector.register(self.waker, selectors.EVENT_READ, "wake")
        self.workers = [
            threading.Thread(target=self._work, name=f"gradtel-metrics-{i}", daemon=True)
            for i in range(WORKERS)
        ]
        for worker in self.workers:
            worker.start()

    def step(self) -> None:
        """Wait for connections and requests once; hand requests to the workers."""
        # A request still arriving is looked at again soon, not left in the selector
        # (it would stay readable and spin the loop).
        for key, _ in self.selector.select(timeout=0.02 if self.partial else 1.0):
            if key.data == "accept":
                self._accept()
            elif key.data == "wake":
                self.waker.recv(64)
            else:
                conn: socket.socket = key.fileobj  # type: ignore[assignment]
                self.selector.unregister(conn)
                self.idle.pop(conn, None)
                self.partial[conn] = (time.monotonic(), key.data)
        self._dispatch_complete()
        self._expire()

    def _dispatch_complete(self) -> None:
        """Hand the connections whose request has fully arrived to the worker."""
        now = time.monotonic()
        for conn, (since, address) in list(self.partial.items()):
            if self.tls is None and not _head_arrived(conn):
                if now - since > REQUEST_TIMEOUT:  # sent too slowly or never finished
                    del self.partial[conn]
                    self._close(conn)
                continue
            del self.partial[conn]
            try:
                self.requests.put_nowait((conn, address))
            except queue.Full:
                self._close(conn)

    def _accept(self) -> None:
        while True:
            try:
                conn, address = self.server.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _failed(
                    self.server, logging.WARNING, "gradtel: accepting a connection failed: %r", exc
                )
                return
            if len(self.idle) >= MAX_CONNECTIONS:
                oldest = min(self.idle, key=self.idle.__getitem__)
                self.selector.unregister(oldest)
                del self.idle[oldest]
                self._close(oldest)
            self.idle[conn] = time.monotonic()
            self.selector.register(conn, selectors.EVENT_READ, address)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn, since in list(self.idle.items()):
            if now - since > IDLE_TIMEOUT:
                self.selector.unregister(conn)
                del self.idle[conn]
                self._close(conn)
        with self.lock:
            late = [conn for conn, since in self.busy.items() if now - since > REQUEST_TIMEOUT]
        for conn in late:
            try:  # wakes the worker blocked on this slow client; it then closes it
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _work(self) -> None:
        while (item := self.requests.get()) is not None:
            conn, address = item
            request = conn
            self._track(conn)
            try:
                conn.setblocking(True)
                conn.settimeout(REQUEST_TIMEOUT)
                if self.tls is not None:  # the handshake, bounded by the same timeout
                    request = self.tls.wrap_socket(conn, server_side=True)
                    self._track(request, instead_of=conn)
                self.server.finish_request(request, address)
            except Exception:
                self.server.handle_error(request, address)
            finally:
                with self.lock:
                    self.busy.pop(request, None)
                    self.busy.pop(conn, None)
                self._close(request)
                self._close(conn)

    def _track(self, conn: socket.socket, instead_of: socket.socket | None = None) -> None:
        with self.lock:
            since = self.busy.pop(instead_of, None) if instead_of is not None else None
            self.busy[conn] = time.monotonic() if since is None else since

    @staticmethod
    def _close(conn: socket.socket) -> None:
        try:
            conn.close()
        except OSError:
            pass

    def stop(self) -> None:
        """Ask the accept loop to end (it closes the idle connections on its way out)."""
        self.stopping = True
        self.wake_sender.send(b"x")

    def stop_workers(self) -> None:
        """After the accept loop has ended: let the workers finish, close what is left."""
        for _ in self.workers:
            self.requests.put(None)
        for worker in self.workers:
            worker.join(timeout=REQUEST_TIMEOUT)
        while True:
            try:
                item = self.requests.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._close(item[0])

    def close(self) -> None:
        for conn in [*self.idle, *self.partial]:
            self._close(conn)
        self.idle.clear()
        self.partial.clear()
        self.selector.close()
        self.waker.close()
        self.wake_sender.close()


def _serve(server: _Server, dispatcher: _Dispatcher) -> None:
    """The accept loop, restarted if it ever raises: the endpoint outlives its own faults."""
    while not dispatcher.stopping:
        try:
            server.service_actions()
            dispatcher.step()
        except Exception as exc:
            _failed(
                server, logging.ERROR, "gradtel: the metrics endpoint failed (%r) and restarts", exc
            )
            time.sleep(0.1)
    dispatcher.close()


@dataclass
class Running:
    """A started endpoint: its server, accept loop and workers."""

    server: _Server
    dispatcher: _Dispatcher
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def shutdown(self) -> None:
        """Stop accepting, answer nothing more, free the port (fast: no polling interval)."""
        self.dispatcher.stop()
        self.thread.join()
        self.dispatcher.stop_workers()
        self.server.server_close()

    def close_in_child(self) -> None:
        """In a forked child: let go of the parent's sockets (the threads did not come along)."""
        self.server.socket.close()
        self.dispatcher.close()


def start(
    addr: str,
    port: int,
    registry: Any,
    *,
    served: CollectorRegistry,
    tls: TLSConfig | None,
    stale_after: float,
    on_scrape: Callable[[float], None],
) -> Running:
    """Bind and serve ``registry`` (a view of ``served``) in daemon threads.

    Raises:
        OSError: the address cannot be bound.
        ValueError: a TLS file cannot be used (no socket is left listening).
    """
    context = tls.context() if tls is not None else None  # before binding: nothing to undo
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(_Server):
        address_family = family
        # Connections wait in the selector, not in the kernel's backlog.
        request_queue_size = 128

    server = Server((addr, port), _Handler)
    server.served = served
    server.set_app(_app(server, registry, stale_after, on_scrape))
    dispatcher = _Dispatcher(server, context)
    thread = threading.Thread(
        target=_serve, args=(server, dispatcher), name="gradtel-metrics", daemon=True
    )
    thread.start()
    return Running(server, dispatcher, thread)
