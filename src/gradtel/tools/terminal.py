"""``gradtel watch``: a terminal view of one or several gradtel endpoints.

Each refresh scrapes every endpoint and shows the status banner of the
original design (``NaN:X``/``Inf:Y`` only when above 0: red bold above the
warning threshold, red bold reverse above critical), the update rate, the time
since the last update, unhealthy updates since the previous refresh and since
start, and the top layers. An endpoint that cannot be reached is said so and
retried at the next refresh.
"""

from __future__ import annotations

import http.client
import re
import shutil
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

from .. import metrics as m
from ..health import Status, Thresholds
from .banner import styled_count

__all__ = ["DEFAULT_URL", "Snapshot", "fit", "frame", "scrape", "watch"]

DEFAULT_URL = "http://127.0.0.1:9464/metrics"
_BANDS = [(kind, severity) for kind in m.KINDS for severity in m.SEVERITIES]


@dataclass
class Snapshot:
    """What one scrape of a gradtel endpoint says."""

    taken: float
    updates: float = 0.0
    last_update: float = 0.0
    latest: dict[str, dict[str, float]] = field(default_factory=lambda: {"nan": {}, "inf": {}})
    totals: dict[str, dict[str, float]] = field(default_factory=lambda: {"nan": {}, "inf": {}})
    bands: dict[tuple[str, str], float] = field(default_factory=dict)
    unscanned: float = 0.0
    status: float | None = None
    """Worst ``gradtel_update_status`` over the ranks; None: no gradtel metrics at all."""
    unknown: bool = False
    """Some rank's latest due update was not scanned (``gradtel_update_status`` -1)."""


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    """Scrape and parse one endpoint (summing over ranks when several share it)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    snap = Snapshot(taken=time.time())
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == m.UPDATES.name:
                snap.updates += value
            elif name == m.UNSCANNED_UPDATES.name:
                snap.unscanned += value
            elif name == m.UPDATE_STATUS.name:
                snap.status = value if snap.status is None else max(snap.status, value)
                snap.unknown = snap.unknown or value < 0
            elif name == m.LAST_UPDATE_TIMESTAMP.name:
                snap.last_update = max(snap.last_update, value)
            elif name == m.UNHEALTHY_UPDATES.name:
                key = (labels["kind"], labels["severity"])
                snap.bands[key] = snap.bands.get(key, 0.0) + value
            for kind in m.KINDS:
                if name == m.UPDATE_GRADS[kind].name:
                    layers = snap.latest[kind]
                    layers[labels["layer"]] = layers.get(labels["layer"], 0.0) + value
                elif name == m.GRADS_TOTAL[kind].name:
                    layers = snap.totals[kind]
                    layers[labels["layer"]] = layers.get(labels["layer"], 0.0) + value
    return snap


def _top(counts: dict[str, dict[str, float]], k: int = 3) -> str:
    merged: dict[str, float] = {}
    for layers in counts.values():
        for layer, n in layers.items():
            merged[layer] = merged.get(layer, 0.0) + n
    top = sorted(
        ((n, layer) for layer, n in merged.items() if n > 0), key=lambda item: (-item[0], item[1])
    )
    return ", ".join(f"{layer} ({n:g})" for n, layer in top[:k]) or "none"


def frame(
    url: str,
    snap: Snapshot | None,
    previous: Snapshot | None,
    thresholds: Thresholds,
    *,
    color: bool,
    error: str | None = None,
    retrying: bool = True,
) -> list[str]:
    """The lines shown for one endpoint; ``error`` says why there is no ``snap``."""
    if snap is None:
        return [f"{url}", f"  {error}" + ("; retrying" if retrying else "")]
    if snap.status is None:
        return [
            url,
            f"  no gradtel metrics at {url}: is this a gradtel endpoint, and is a GradMonitor made?",
        ]
    if not snap.updates and not snap.unscanned:
        return [url, "  no update yet"]
    nan = int(sum(snap.latest["nan"].values()))
    inf = int(sum(snap.latest["inf"].values()))
    banner = [
        styled_count(label, count, thresholds.classify(count), color=color)
        for label, count in (("NaN", nan), ("Inf", inf))
        if count > 0
    ]
    status = max((thresholds.classify(nan), thresholds.classify(inf)), key=lambda s: s.level)
    if status is Status.HEALTHY and snap.unknown:  # a rank did not look: never say healthy
        status = Status.UNKNOWN
    line = " ".join(banner + [status.value])
    if status is Status.UNKNOWN:
        line += f" (latest update not scanned; {snap.unscanned:g} not scanned since start)"
    rate = ""
    if previous is not None and snap.taken > previous.taken:
        rate = f" ({(snap.updates - previous.updates) / (snap.taken - previous.taken):.1f}/s)"
    since = f"{snap.taken - snap.last_update:.1f}s ago" if snap.last_update else "none yet"
    new = {
        band: snap.bands.get(band, 0.0) - (previous.bands.get(band, 0.0) if previous else 0.0)
        for band in _BANDS
    }
    recent = sum(n for n in new.values() if n > 0)
    bands = ", ".join(
        f"{kind} {severity} {snap.bands.get((kind, severity), 0):g}" for kind, severity in _BANDS
    )
    return [
        url,
        f"  {line}",
        f"  updates {snap.updates:g}{rate}, last update {since}",
        f"  unhealthy updates since the last refresh: {recent:g}; since start: {bands}",
        f"  top layers, latest update: {_top(snap.latest)}; since start: {_top(snap.totals)}",
    ]


_STYLE = re.compile(r"\033\[[0-9;]*m")
_FIELD_END = re.compile(r"(?<=[;,]) ")


def fit(line: str, width: int, indent: str = "    ") -> list[str]:
    """``line`` broken into lines of at most ``width`` visible characters: between
    fields (after "; " or ", ") where it can, else between words, never inside one.

    >>> fit("  updates 5; since start: nan warning 0, nan critical 1", 34)
    ['  updates 5;', '    since start: nan warning 0,', '    nan critical 1']
    """
    if len(_STYLE.sub("", line)) <= width:
        return [line]
    lines: list[str] = []
    for chunk in _FIELD_END.split(line):
        joined = f"{lines[-1]} {chunk}" if lines else chunk
        if lines and len(_STYLE.sub("", joined)) <= width:
            lines[-1] = joined
        else:
            lines.append(chunk if not lines else indent + chunk)
    return [
        piece
        for part in lines
        for piece in textwrap.wrap(
            part, width, initial_indent="", subsequent_indent=indent,
            break_long_words=False, break_on_hyphens=False, drop_whitespace=False,
        ) or [part]
    ]  # fmt: skip


def watch(
    urls: list[str],
    *,
    interval: float = 1.0,
    once: bool = False,
    thresholds: Thresholds = Thresholds(),
    out: TextIO = sys.stdout,
) -> int:
    """Refresh the view every ``interval`` seconds until Ctrl-C (or once).

    Returns:
        The exit code: 0, or 1 when ``once`` and an endpoint was unreachable or served
        no Prometheus metrics.
    """
    live = out.isatty()
    color = live
    previous: dict[str, Snapshot] = {}
    try:
        while True:
            lines = [
                "gradtel watch" if once else f"gradtel watch, every {interval:g}s (Ctrl-C stops)",
                "",
            ]
            failed = False
            for url in urls:
                snap: Snapshot | None = None
                try:
                    snap, error = scrape(url), None
                except urllib.error.HTTPError as exc:  # it answered, with an error
                    error = f"HTTP {exc.code} {exc.reason} from {url}"
                except OSError as exc:
                    error = f"unreachable ({getattr(exc, 'reason', exc)})"
                except (ValueError, http.client.HTTPException) as exc:  # not metrics, or not HTTP
                    error = f"no Prometheus metrics at {url} ({type(exc).__name__}: {exc})"
                failed = failed or snap is None
                lines += frame(
                    url, snap, previous.get(url), thresholds,
                    color=color, error=error, retrying=not once,
                )  # fmt: skip
                if snap is not None:
                    previous[url] = snap
            width = shutil.get_terminal_size().columns
            lines = [piece for line in lines for piece in fit(line, width)]
            out.write(("\033[H\033[2J" if live else "") + "\n".join(lines) + "\n")
            out.flush()
            if once:
                return 1 if failed else 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
