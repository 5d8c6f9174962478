"""The vocabulary of the ``promtool test rules`` cases: series, samples by minute, checks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from ...metrics import DEVICE_INFO, GRADS_TOTAL, START_TIME, UNHEALTHY_UPDATES, Metric
from ..options import KitOptions, duration_seconds

INSTANCE = "trainer-0:9464"


def _minutes(seconds: int) -> int:
    return math.ceil(seconds / 60)


def _labels(o: KitOptions, **extra: str) -> str:
    labels = {"job": o.job, "instance": INSTANCE, **extra}
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _series(metric: Metric | str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{metric}{labels}", "values": values}


def _band(o: KitOptions, kind: str, severity: str, values: str) -> dict[str, str]:
    return _series(UNHEALTHY_UPDATES, _labels(o, kind=kind, severity=severity), values)


def _layer(o: KitOptions, kind: str, layer: str, values: str) -> dict[str, str]:
    return _series(GRADS_TOTAL[kind], _labels(o, layer=layer), values)


def _steps(before: int, value: int, after: int) -> str:
    """``before`` samples of 0, then ``after`` samples of ``value``: one jump between two scrapes."""
    return f"0x{before - 1} {value}x{after - 1}"


def _check(at: int, alert: str, *expected: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": f"{at}m", "alertname": alert, "exp_alerts": list(expected)}


def _fired(o: KitOptions, minute: int) -> int:
    """When an unhealthy-update alert first seen at ``minute`` fires: at the first evaluation
    its ``for`` later."""
    return minute + _minutes(duration_seconds(o.settle))


Value = float | str | None | Callable[[int], float | str | None]
"""A sample by minute: a number, ``"stale"`` (a staleness marker) or None (no sample)."""


def _life(
    value: Value, first: int = 0, gone: int | None = None
) -> Callable[[int], float | str | None]:
    """A series of one process: ``value`` (or ``value(minute)``) from its first scrape; a
    staleness marker at ``gone``, the first scrape after it ended; nothing else."""

    def at(minute: int) -> float | str | None:
        if minute < first or (gone is not None and minute > gone):
            return None
        if minute == gone:
            return "stale"
        return value(minute) if callable(value) else value

    return at


def _lives(*lives: Callable[[int], float | str | None]) -> Callable[[int], float | str | None]:
    """One series across restarts of processes with the same labels."""
    return lambda minute: next((v for v in (life(minute) for life in lives) if v is not None), None)


def _count(*updates: int, by: int = 1) -> Callable[[int], int]:
    """A counter that counts ``by`` at each of ``updates`` (minutes)."""
    return lambda minute: by * sum(minute >= u for u in updates)


def _scrapes(
    minutes: int, value: Value, *, failed: Sequence[int] = (), gaps: Sequence[int] = ()
) -> str:
    """promtool's notation of a series scraped once a minute: a staleness marker at a failed
    scrape, no sample in a gap (Prometheus down)."""
    samples = []
    for minute in range(minutes):
        sample = value(minute) if callable(value) else value
        if minute in gaps or sample is None:
            sample = "_"
        elif minute in failed:
            sample = "stale"
        samples.append(sample)
    return _notation(samples)


def _number(value: float) -> str:
    """A sample as promtool reads it back exactly: an integer in full (a 52-bit fingerprint
    would lose its low digits to ``%g``), anything else in ``%g``."""
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else f"{value:g}"


def _notation(samples: list[float | str]) -> str:
    words = []
    for sample, run in itertools.groupby(samples):
        n = len(list(run))
        if sample == "stale":
            words += ["stale"] * n
        elif sample == "_":
            words.append(f"_x{n}")
        else:
            words.append(_number(float(sample)) + f"x{n - 1}" * (n > 1))
    return " ".join(words)


def _rank(o: KitOptions, rank: int, **extra: str) -> str:
    """The labels of rank ``rank``'s target."""
    return _labels(o, rank=str(rank), **extra).replace(INSTANCE, f"trainer-{rank}:9464")


GPU = "GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52"
"""A GPU's identity in the cases, as dcgm-exporter prints it."""
PCI = "00000000:3B:00.0"


def _gpu(rank: int) -> str:
    """The GPU of rank ``rank``'s process: :data:`GPU` for rank 2, its own otherwise."""
    return GPU if rank == 2 else GPU[:-1] + str(rank)


def _device(o: KitOptions, rank: int, minutes: int, gpu: bool = True) -> dict[str, str]:
    """``gradtel_device_info`` of rank ``rank``'s process, on host ``node-<rank // 2>``: on
    its GPU (:func:`_gpu`), or on the CPU."""
    where = f'device="cuda:0",gpu_uuid="{_gpu(rank)}",pci_bus_id="{PCI}"' if gpu else 'device="cpu"'
    labels = _rank(o, rank)[:-1] + f',host="node-{rank // 2}",{where}}}'
    return _series(DEVICE_INFO, labels, f"1x{minutes}")


def _more(labels: str, **extra: str) -> str:
    """``labels`` with ``extra``."""
    return labels[:-1] + "".join(f',{k}="{v}"' for k, v in extra.items()) + "}"


LOOKBACK = 5
"""Prometheus' default lookback (minutes): an instant lookup finds no sample older than that."""
GAP = LOOKBACK + 3
"""A Prometheus gap (a restart, an outage) in which instant lookups find nothing for minutes."""
OUTAGE = 3
"""Minutes of failed scrapes: a staleness marker, then no sample until a scrape succeeds."""


def _incident(
    o: KitOptions,
    kind: str,
    severity: str,
    minutes: int,
    update: int,
    *,
    failed: Sequence[int] = (),
    gaps: Sequence[int] = (),
    labels: str | None = None,
) -> list[dict[str, str]]:
    """A process scraped from minute 0 with one unhealthy update, at ``update``; its layer
    ``head`` (7 values) gets its series with it, as per-layer series are born on demand."""
    labels = _labels(o) if labels is None else labels
    scrape = lambda value: _scrapes(minutes, value, failed=failed, gaps=gaps)  # noqa: E731
    return [
        _series(
            UNHEALTHY_UPDATES, _more(labels, kind=kind, severity=severity), scrape(_count(update))
        ),
        _series(START_TIME, labels, scrape(0)),
        _series(GRADS_TOTAL[kind], _more(labels, layer="head"), scrape(_life(7, first=update))),
    ]
