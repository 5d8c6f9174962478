"""The incident record: one JSON line per update that went wrong, in a file of each rank's
own, to read after the run without Prometheus (``gradtel incidents``).

An *incident* is a concluded update that is unhealthy (warning or critical), that the AMP
``GradScaler`` skipped for overflow, or that was due but not looked at (``unscanned``:
no gradients, or the scan failed). An update ``sample_every`` leaves out is no incident:
it was not due, and a line for each would drown the ones that matter. Healthy updates
write nothing.

The file is capped: past :data:`MAX_BYTES` it is renamed ``PATH.1`` (the previous
``PATH.1`` is dropped) and a new one begun, so a rank keeps at most twice that.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

from ..health import GradHealth, Status
from .ranks import process_attributes, run_id

__all__ = [
    "ENV_VAR",
    "MAX_BYTES",
    "RANK_PLACEHOLDER",
    "IncidentLog",
    "check_path",
    "incident",
    "rank_path",
    "rotated_path",
]

ENV_VAR = "GRADTEL_INCIDENT_LOG"
"""Turns the record on for every monitor (every rank) given no ``incident_log``."""
MAX_BYTES = 10 * 2**20
"""Size past which a rank's file is rotated to ``PATH.1``: at most 2 × 10 MiB per rank."""
RANK_PLACEHOLDER = "{rank}"
"""Replaced by the process's rank (0 outside a distributed run) in ``incident_log``."""


def rotated_path(path: Path) -> Path:
    """Where the older incidents of ``path`` are once it was rotated: ``PATH.1``."""
    return path.with_name(f"{path.name}.1")


def check_path(argument: str, value: object) -> str | None:
    """``value`` as a path text, or None (off).

    Raises:
        TypeError: not a str or ``os.PathLike`` of str.
        ValueError: empty, or a ``{...}`` placeholder other than ``{rank}``.

    >>> check_path("incident_log", "runs/{step}.jsonl")
    Traceback (most recent call last):
    ValueError: incident_log may hold no placeholder but {rank}, got 'runs/{step}.jsonl'
    """
    if value is None:
        return None
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        raise TypeError(
            f"{argument} must be a file path (str or os.PathLike) or None, "
            f"got {value!r} ({type(value).__name__})"
        )
    if not text.strip():
        raise ValueError(f"{argument} must be a file path such as 'incidents.jsonl', got {text!r}")
    if "{" in text.replace(RANK_PLACEHOLDER, "") or "}" in text.replace(RANK_PLACEHOLDER, ""):
        raise ValueError(f"{argument} may hold no placeholder but {RANK_PLACEHOLDER}, got {text!r}")
    return text


def rank_path(path: str, rank: str | None) -> Path:
    """This rank's own file: ``{rank}`` replaced by the rank; without the placeholder, one
    rank of several inserts ``.rank<N>`` before the extension
    (``incidents.jsonl`` → ``incidents.rank1.jsonl``); a single process writes ``path``.

    >>> str(rank_path("incidents.jsonl", "1")), str(rank_path("r{rank}/i.jsonl", None))
    ('incidents.rank1.jsonl', 'r0/i.jsonl')
    """
    if RANK_PLACEHOLDER in path:
        return Path(path.replace(RANK_PLACEHOLDER, rank or "0"))
    found = Path(path)
    if rank is None:
        return found
    return found.with_name(f"{found.stem}.rank{rank}{found.suffix}")


def incident(
    health: GradHealth,
    action: str | None,
    timestamp: float,
    identity: dict[str, Any],
    last_finite_norm: float | None = None,
    update: int | None = None,
) -> dict[str, Any]:
    """The record of one incident, as it is written (no NaN or Infinity: JSON has none).
    ``last_finite_norm``: the gradient norm of the latest earlier update where it was finite.
    ``update``: the monitor's own count of updates, which orders a process's incidents
    whatever the steps do (a rollback to an earlier checkpoint numbers steps again)."""
    local_known = health.local_nan_total is not None
    return {
        "step": health.step,
        "update": update,
        "time": round(timestamp, 3),
        **identity,
        "status": health.status.value,
        "amp_overflow": health.amp_overflow,
        "unscanned": health.unscanned,
        "nan": health.nan_total,
        "inf": health.inf_total,
        "nan_by_layer": dict(health.nan_by_layer),
        "inf_by_layer": dict(health.inf_by_layer),
        "first_bad_layer": health.first_bad_layer,
        "origin": health.originated_here if local_known else None,
        "loss_finite": health.loss_finite,
        "grad_norm": _finite(health.grad_norm),
        "last_finite_grad_norm": last_finite_norm,
        "action": action,
    }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class IncidentLog:
    """Writes this rank's incidents to ``path``, one JSON line each.

    Args:
        path: The file, this rank's own (see :func:`rank_path`); its folder is made if
            missing. Opened on the first incident.
        on_error: Told of a failure to write, which :meth:`write` does not raise itself
            (the monitor's ``on_error`` decides whether training sees it).
        max_bytes: Size past which the file is rotated (see :data:`MAX_BYTES`).
    """

    def __init__(
        self, path: Path, *, on_error: Callable[[Exception], None], max_bytes: int = MAX_BYTES
    ) -> None:
        self.path = path
        # The standard library's rotation, used as a plain handler: no logger, so nothing
        # propagates to the application's logging and two monitors never share one.
        self._handler = _Handler(path, max_bytes, on_error)
        self._on_error = on_error
        self._last_finite_norm: float | None = None
        attributes = process_attributes()
        self._identity = {
            "run": run_id(),
            "rank": int(attributes.get("rank", "0")),
            "host": socket.gethostname(),
        }

    @classmethod
    def open(
        cls, option: str | None, *, on_error: Callable[[Exception], None]
    ) -> IncidentLog | None:
        """The record ``incident_log=option`` asks for, else the one ``$GRADTEL_INCIDENT_LOG``
        asks for (empty: off), else None.

        Raises:
            TypeError, ValueError: ``$GRADTEL_INCIDENT_LOG`` holds a bad placeholder.
        """
        path = (
            option if option is not None else check_path(ENV_VAR, os.environ.get(ENV_VAR) or None)
        )
        if path is None:
            return None
        return cls(rank_path(path, process_attributes().get("rank")), on_error=on_error)

    def write(
        self, health: GradHealth, action: str | None, timestamp: float, update: int | None = None
    ) -> None:
        """Write ``health``'s line if it is an incident; ``action`` is what the policy did,
        ``update`` the monitor's count of updates. Every concluded update comes here: a
        healthy one leaves its gradient norm, the last one before an incident, whose own
        norm is seldom finite."""
        last_norm = self._last_finite_norm
        if health.grad_norm is not None and math.isfinite(health.grad_norm):
            self._last_finite_norm = health.grad_norm
        if health.status is Status.HEALTHY:
            return
        try:
            found = incident(health, action, timestamp, self._identity, last_norm, update)
            line = json.dumps(found, allow_nan=False)
        except (TypeError, ValueError) as exc:  # a value JSON cannot hold: say so, write nothing
            self._on_error(exc)
            return
        self._handler.handle(logging.makeLogRecord({"msg": line}))  # its failures: on_error

    def close(self) -> None:
        self._handler.close()


class _Handler(RotatingFileHandler):
    """A rotating file whose failures go to ``on_error`` instead of a traceback on stderr."""

    def __init__(self, path: Path, max_bytes: int, on_error: Callable[[Exception], None]) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=1, encoding="utf-8", delay=True)
        self._on_error = on_error

    def _open(self) -> io.TextIOWrapper:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        self._on_error(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
