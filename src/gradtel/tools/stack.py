"""A local Prometheus (or VictoriaMetrics) + Alertmanager + webhook receiver on loopback,
from the rendered kit, optionally fed by a Prometheus agent.

Used by ``gradtel demo --stack`` and by the end-to-end tests: real processes
started from ``PATH`` with their own config and data folders under one
temporary directory, and stopped by their PIDs.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import yaml

from ..render import KitOptions, render_kit, scale_out

__all__ = [
    "Page",
    "Stack",
    "StackTimings",
    "ToolMissingError",
    "WebhookReceiver",
    "find_tool",
    "free_port",
    "free_ports",
    "prometheus_version",
]

INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"
VICTORIAMETRICS_HINT = "apt-get install -y --no-install-recommends victoria-metrics"


class ToolMissingError(FileNotFoundError):
    """A Prometheus or Alertmanager binary is not on PATH."""


def find_tool(*names: str, hint: str = INSTALL_HINT) -> str:
    """Path of the first of ``names`` found on PATH."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise ToolMissingError(
        f"{' or '.join(names)} not found on PATH; on Debian/Ubuntu: `sudo {hint}`"
    )


def prometheus_version(binary: str) -> tuple[int, ...]:
    """The version of a Prometheus binary, from ``binary --version``: flags differ between
    2.x and 3.x (the agent mode)."""
    said = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", said.stdout + said.stderr)
    if found is None:
        raise RuntimeError(f"cannot tell the version of {binary}: {said.stdout + said.stderr!r}")
    return tuple(int(part) for part in found.groups())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server about to start (see :func:`free_ports`)."""
    return free_ports(1)


def free_ports(count: int) -> int:
    """A port P such that P .. P + count - 1 are free on 127.0.0.1 now, picked below the
    kernel's ephemeral range: outgoing connections and ``bind(0)`` take their ports from
    that range, so none of them can take P between this pick and the server's own bind
    (a port that ``bind(0)`` picked could be, on a busy machine). Where the range leaves no
    room below it, P is picked among all ports from 10000 up, as free now.

    Raises:
        OSError: no free ports found in 100 tries.
    """
    low, high = 10_000, _ephemeral_start()
    if high - count <= low:  # the range starts too low: any free ports will do
        high = 65_536
    for _ in range(100):
        base = random.randrange(low, high - count + 1)
        probes: list[socket.socket] = []
        try:
            for offset in range(count):
                probes.append(socket.socket())
                probes[-1].bind(("127.0.0.1", base + offset))
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise  # out of file descriptors, say: no other port would do better
            continue
        finally:
            for probe in probes:
                probe.close()
        return base
    raise OSError(errno.EADDRINUSE, f"no {count} consecutive free ports on 127.0.0.1")


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's; 32768 where it cannot tell)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass(frozen=True)
class Page:
    """One alert as a webhook receiver got it from Alertmanager."""

    receiver: str
    """The URL path it arrived on: ``pager`` or ``chat``."""
    status: str
    alertname: str
    severity: str
    labels: dict[str, str]
    description: str
    received: float
    """``time.time()`` of arrival."""

    def __str__(self) -> str:
        return (
            f"[{self.receiver}] {self.status} {self.severity} {self.alertname}: {self.description}"
        )


class WebhookReceiver:
    """An HTTP server that takes Alertmanager webhook notifications and keeps their alerts."""

    def __init__(self, on_page: Callable[[Page], None] | None = None) -> None:
        self.pages: list[Page] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                now = time.time()
                path = self.path.strip("/")
                for alert in body.get("alerts", []):
                    labels = alert.get("labels", {})
                    receiver._add(
                        Page(
                            receiver=path,
                            status=alert.get("status", ""),
                            alertname=labels.get("alertname", ""),
                            severity=labels.get("severity", ""),
                            labels=labels,
                            description=alert.get("annotations", {}).get("description", ""),
                            received=now,
                        ),
                        on_page,
                    )
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_port
        # A short poll interval: close() waits for the loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def _add(self, page: Page, on_page: Callable[[Page], None] | None) -> None:
        with self._lock:
            self.pages.append(page)
        if on_page is not None:
            on_page(page)

    def url(self, receiver: str) -> str:
        return f"http://127.0.0.1:{self.port}/{receiver}"

    def firing(self, receiver: str | None = None) -> list[Page]:
        with self._lock:
            return [
                p
                for p in self.pages
                if p.status == "firing" and (receiver is None or p.receiver == receiver)
            ]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


_KIT = KitOptions()


@dataclass(frozen=True)
class StackTimings:
    """Intervals of the stack; the defaults are the shipped kit's. Prometheus and vmalert
    run with their own default resend delays, as a user's do."""

    scrape_interval: str = _KIT.scrape_interval
    evaluation_interval: str = _KIT.evaluation_interval
    group_wait: str = "10s"
    group_interval: str = "1m"


Store = Literal["prometheus", "victoriametrics"]


@dataclass
class Stack:
    """A store that evaluates the rendered rules, Alertmanager and a webhook receiver on
    loopback, with the ranks at ``targets`` scraped directly or through a Prometheus agent.

    Args:
        targets: ``host:port`` of gradtel endpoints to scrape.
        options: Kit options the configs are rendered from, with the scrape and
            evaluation intervals of ``timings``.
        timings: Scrape, evaluation and grouping intervals.
        on_page: Called with each alert the webhook receiver gets.
        keep_data: Keep the config and data folders here instead of a
            temporary folder removed on :meth:`stop`.
        scrape: Extra settings of the gradtel scrape job (``scheme``, ``tls_config``, ...).
        store: Where the samples go and the rules run: ``"prometheus"``, or
            ``"victoriametrics"`` (VictoriaMetrics with vmalert; needs ``agent``
            to scrape ``targets``).
        agent: Scrape ``targets`` with a Prometheus in agent mode that
            remote-writes to the store (the kit's ``scale-out/`` set-up).
        also_write: More remote-write URLs for the agent (another stack's
            :attr:`write_url`), so that one agent feeds several stores.
        prometheus: The Prometheus binary (2.x or 3.x) of the store and the agent;
            ``prometheus`` on ``PATH`` when not given.
    """

    targets: Sequence[str]
    options: KitOptions = field(default_factory=KitOptions)
    timings: StackTimings = field(default_factory=StackTimings)
    on_page: Callable[[Page], None] | None = None
    keep_data: Path | None = None
    scrape: dict[str, Any] = field(default_factory=dict)
    store: Store = "prometheus"
    agent: bool = False
    also_write: Sequence[str] = ()
    prometheus: str | None = None

    def __post_init__(self) -> None:
        if self.store not in ("prometheus", "victoriametrics"):
            raise ValueError(f"store must be 'prometheus' or 'victoriametrics', got {self.store!r}")
        if self.store == "victoriametrics" and self.targets and not self.agent:
            raise ValueError("store='victoriametrics' scrapes through an agent: pass agent=True")
        if self.also_write and not self.agent:
            raise ValueError("also_write is where the agent writes too: pass agent=True")
        if self.store == "prometheus" or self.agent:
            self.prometheus_bin = self.prometheus or find_tool("prometheus")
        if self.store == "victoriametrics":
            self.victoriametrics_bin = find_tool("victoria-metrics", hint=VICTORIAMETRICS_HINT)
            self.vmalert_bin = find_tool("vmalert", hint=VICTORIAMETRICS_HINT)
        self.alertmanager_bin = find_tool("prometheus-alertmanager", "alertmanager")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.receiver: WebhookReceiver | None = None
        self.store_port = free_port()
        self.alertmanager_port = free_port()
        self.root = Path(self.keep_data or tempfile.mkdtemp(prefix="gradtel-stack-"))

    @property
    def prometheus_url(self) -> str:
        """The store's query API (Prometheus, or VictoriaMetrics' Prometheus-compatible one)."""
        return f"http://127.0.0.1:{self.store_port}"

    @property
    def write_url(self) -> str:
        """The store's remote-write endpoint."""
        return f"{self.prometheus_url}/api/v1/write"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    def start(self, timeout: float = 60) -> Stack:
        """Write the configs, start the receiver, Alertmanager, the store and the agent,
        and wait until they are ready. When a part fails to start, everything started is
        stopped before the error is raised: no process is left behind."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.receiver = WebhookReceiver(self.on_page)
        t = self.timings
        kit = render_kit(
            dataclasses.replace(
                self.options,
                scrape_interval=t.scrape_interval,
                evaluation_interval=t.evaluation_interval,
            )
        )
        config = self.root / "config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "gradtel-rules.yml").write_text(kit["prometheus/gradtel-rules.yml"])
        (config / "alertmanager.yml").write_text(self._alertmanager_config(kit))
        self._spawn(
            "alertmanager",
            [
                self.alertmanager_bin,
                f"--config.file={config / 'alertmanager.yml'}",
                f"--storage.path={self.root / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
                "--cluster.listen-address=",
            ],
        )
        ready = {"alertmanager": self.alertmanager_url + "/-/ready"}
        if self.store == "prometheus":
            self._start_prometheus(kit, config)
            ready["prometheus"] = self.prometheus_url + "/-/ready"
        else:
            self._start_victoriametrics(config)
            ready["victoria-metrics"] = self.prometheus_url + "/health"
            ready["vmalert"] = f"http://127.0.0.1:{self._vmalert_port}/health"
        if self.agent:
            agent_port = free_port()
            (config / "agent.yml").write_text(self._agent_config(kit))
            self._spawn(
                "agent",
                [
                    self.prometheus_bin,
                    f"--config.file={config / 'agent.yml'}",
                    *scale_out.agent_flags(prometheus_version(self.prometheus_bin)),
                    f"--storage.agent.path={self.root / 'agent-data'}",
                    f"--web.listen-address=127.0.0.1:{agent_port}",
                ],
            )
            ready["agent"] = f"http://127.0.0.1:{agent_port}/-/ready"
        for name, url in ready.items():
            self._wait_ready(name, url, timeout)

    def _start_prometheus(self, kit: dict[str, str], config: Path) -> None:
        if self.agent:  # the central Prometheus: the agent's samples arrive by remote write
            rendered = kit["scale-out/central-prometheus.yml"]
            flags = scale_out.central_prometheus_flags()
        else:
            rendered, flags = kit["prometheus/prometheus.yml"], []
        (config / "prometheus.yml").write_text(self._prometheus_config(rendered))
        self._spawn(
            "prometheus",
            [
                self.prometheus_bin,
                f"--config.file={config / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.root / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.store_port}",
                *flags,
            ],
        )

    def _start_victoriametrics(self, config: Path) -> None:
        self._vmalert_port = free_port()
        self._spawn(
            "victoria-metrics",
            [
                self.victoriametrics_bin,
                f"-storageDataPath={self.root / 'victoria-metrics-data'}",
                f"-httpListenAddr=127.0.0.1:{self.store_port}",
                *scale_out.victoriametrics_flags(),
            ],
        )
        self._spawn(
            "vmalert",
            [
                self.vmalert_bin,
                f"-rule={config / 'gradtel-rules.yml'}",
                f"-httpListenAddr=127.0.0.1:{self._vmalert_port}",
                *scale_out.vmalert_flags(
                    self.prometheus_url, self.alertmanager_url, self.timings.evaluation_interval
                ),
            ],
        )

    def _alertmanager_config(self, kit: dict[str, str]) -> str:
        assert self.receiver is not None
        config = yaml.safe_load(kit["prometheus/alertmanager.yml"])
        config["route"]["group_wait"] = self.timings.group_wait
        config["route"]["group_interval"] = self.timings.group_interval
        for receiver in config["receivers"]:
            for webhook in receiver["webhook_configs"]:
                webhook["url"] = self.receiver.url(receiver["name"])
        return yaml.safe_dump(config, sort_keys=False)

    def _prometheus_config(self, rendered: str) -> str:
        config = yaml.safe_load(rendered)
        config["rule_files"] = ["gradtel-rules.yml"]
        config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [
            f"127.0.0.1:{self.alertmanager_port}"
        ]
        if not self.agent:
            self._scrape_targets(config)
        return yaml.safe_dump(config, sort_keys=False)

    def _agent_config(self, kit: dict[str, str]) -> str:
        config = yaml.safe_load(kit["scale-out/prometheus-agent.yml"])
        self._scrape_targets(config)
        queue = config["remote_write"][0]["queue_config"]
        config["remote_write"] = [
            {"url": url, "queue_config": queue} for url in (self.write_url, *self.also_write)
        ]
        return yaml.safe_dump(config, sort_keys=False)

    def _scrape_targets(self, config: dict[str, Any]) -> None:
        job = config["scrape_configs"][0]
        job["static_configs"] = [{"targets": list(self.targets)}]
        job.pop("file_sd_configs", None)
        job.update(self.scrape)

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _wait_ready(self, name: str, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited at start:\n{self.log(name)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {timeout:g}s:\n{self.log(name)}")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Run an instant query on the stack's store."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            result: list[dict[str, Any]] = json.load(response)["data"]["result"]
            return result

    def stop(self) -> None:
        """Stop every process by its PID and remove the temporary folder; safe to call
        again, and after a failed :meth:`start`."""
        # Last started first: an agent stops before the store it writes to, which it would
        # otherwise keep retrying until its flush deadline.
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.receiver is not None:
            self.receiver.close()
        if self.keep_data is None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
