"""Options of the rendered deploy kit, and the YAML writer every file uses."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..health import Thresholds

__all__ = [
    "ALERT_NAMES",
    "AMP_COLLAPSE_ALERT",
    "AMP_SKIPS_ALERT",
    "AMP_SKIPS_FOR",
    "CRASH_ALERT",
    "DEFAULT_RUNBOOK_URL",
    "DISAGREE_ALERT",
    "DOWN_ALERT",
    "KINDS",
    "NORM_SPIKE_ALERT",
    "NOTHING_SCANNED_ALERT",
    "REPLICA_ALERT",
    "STALLED_ALERT",
    "KitOptions",
    "dump_yaml",
    "duration_seconds",
    "duration_text",
    "header",
]

DEFAULT_RUNBOOK_URL = "https://github.com/gradtel/gradtel/blob/main/deploy/prometheus/runbook.md"

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_TARGET = re.compile(
    r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$"
)
"""``host:port``, ``[ipv6]:port``: a scrape target as Prometheus takes it."""
_URL = re.compile(r"^https?://[^\s/]+\S*$")
KINDS = {"nan": "NaN", "inf": "Inf"}
"""``kind`` label values and how texts name them."""
ALERT_NAMES = {"nan": "GradtelNaNGradients", "inf": "GradtelInfGradients"}
DOWN_ALERT = "GradtelExporterDown"
STALLED_ALERT = "GradtelTrainingStalled"
NOTHING_SCANNED_ALERT = "GradtelNothingScanned"
AMP_SKIPS_ALERT = "GradtelAmpOverflowSkips"
AMP_COLLAPSE_ALERT = "GradtelAmpLossScaleCollapsed"
CRASH_ALERT = "GradtelTrainingCrashed"
NORM_SPIKE_ALERT = "GradtelGradNormSpike"
REPLICA_ALERT = "GradtelReplicaDrifted"
DISAGREE_ALERT = "GradtelRankDisagrees"
AMP_SKIPS_FOR = "5m"
"""How long the AMP skip ratio must stay high: the first-steps overflows of
every fp16 run last seconds, a collapsing loss scale does not stop."""


def duration_seconds(text: str, argument: str = "duration") -> int:
    """Seconds in a Prometheus duration such as ``10m`` or ``1h30m``.

    >>> duration_seconds("1h30m")
    5400
    """
    found = _DURATION.match(text) if isinstance(text, str) else None
    if not text or found is None or not any(found.groups()):
        raise ValueError(
            f"{argument} must be a Prometheus duration such as '90s', '10m' or '1h30m', got {text!r}"
        )
    days, hours, minutes, seconds = (int(g or 0) for g in found.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total == 0:
        raise ValueError(f"{argument} must be longer than 0, got {text!r}")
    return total


def duration_text(seconds: int) -> str:
    """A Prometheus duration for whole seconds.

    >>> duration_text(90), duration_text(600)
    ('1m30s', '10m')
    """
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}h" * bool(hours) + f"{minutes}m" * bool(minutes) + f"{secs}s" * bool(secs)
    return text or "0s"


@dataclass(frozen=True)
class KitOptions:
    """What the rendered kit is made of.

    Args:
        thresholds: The health bands (must equal the monitors' ``thresholds``).
        window: How long an unhealthy-update alert keeps firing after the last
            unhealthy update; also the look-back of the recording rules.
        stall_after: No new update for this long while the target is up fires
            ``GradtelTrainingStalled``.
        job: Prometheus ``job`` label of the gradtel scrape job.
        runbook_url: Address of the rendered ``runbook.md``; alerts link to
            its anchors.
        amp_skip_ratio: ``GradtelAmpOverflowSkips`` fires when more than this
            share of the updates in ``window`` were skipped by the AMP
            ``GradScaler`` for overflow, for ``AMP_SKIPS_FOR`` (0 < ratio < 1).
        amp_scale_floor: ``GradtelAmpLossScaleCollapsed`` pages when the AMP
            ``GradScaler``'s loss scale (``gradtel_amp_loss_scale``) falls below
            this (> 0). The default, 1, is the floor of DeepSpeed's and
            Megatron-LM's dynamic loss scalers; a healthy fp16 run settles far
            above it (``GradScaler`` starts at 65,536), a diverged one, whose
            every update overflows, halves it at each update down to 0.
        spike_factor: ``GradtelGradNormSpike`` fires when the gradient norm's
            recent peak (``gradtel_grad_norm_peak``) exceeds this many times
            its median over ``spike_baseline`` (> 1).
        spike_baseline: The trailing window of that median.
        spike_history: How long a process must have run, and reported norms,
            before the spike alert looks at it: the first minutes of a job
            have no history, and their norms fall fast.
        disagree_factor: ``GradtelRankDisagrees`` pages when one rank's own gradient
            norm (``gradtel_local_grad_norm``) stays more than this many times above, or
            below, the median of its run's ranks (> 1).
        disagree_for: How long it must stay so: each rank's norm is its median over
            this window, the alert's ``for`` is as long, and a process younger than it
            is not judged.
        scrape_interval: How often Prometheus scrapes the ranks.
        evaluation_interval: How often it evaluates the rules. With the scrape
            interval, it sets how long an unhealthy update waits before it
            pages (:attr:`settle`).
        targets: ``host:port`` of the training processes' gradtel endpoints
            that ``prometheus/prometheus.yml`` scrapes.
        alertmanager: ``host:port`` of the Alertmanager that Prometheus sends to.
        pager_url: Webhook that critical alerts go to (``alertmanager.yml``).
        chat_url: Webhook that warning alerts go to.
    """

    thresholds: Thresholds = field(default_factory=Thresholds)
    window: str = "10m"
    stall_after: str = "10m"
    job: str = "gradtel"
    runbook_url: str = DEFAULT_RUNBOOK_URL
    amp_skip_ratio: float = 0.5
    amp_scale_floor: float = 1.0
    spike_factor: float = 10.0
    spike_baseline: str = "1h"
    spike_history: str = "10m"
    disagree_factor: float = 10.0
    disagree_for: str = "2m"
    scrape_interval: str = "5s"
    evaluation_interval: str = "5s"
    targets: Sequence[str] = ("127.0.0.1:9464",)
    alertmanager: str = "127.0.0.1:9093"
    pager_url: str = "http://127.0.0.1:9095/pager"
    chat_url: str = "http://127.0.0.1:9095/chat"

    def __post_init__(self) -> None:
        if not isinstance(self.thresholds, Thresholds):
            raise TypeError(f"thresholds must be a gradtel.Thresholds, got {self.thresholds!r}")
        duration_seconds(self.window, "window")
        duration_seconds(self.stall_after, "stall_after")
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_:.-]*", self.job or ""):
            raise ValueError(
                f"job must be a plain Prometheus job name such as 'gradtel', got {self.job!r}"
            )
        if not re.match(r"^https?://\S+$", self.runbook_url or ""):
            raise ValueError(f"runbook_url must be an http(s) URL, got {self.runbook_url!r}")
        ratio = self.amp_skip_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ValueError(
                f"amp_skip_ratio must be a number between 0 and 1 (exclusive), got {ratio!r}"
            )
        floor = self.amp_scale_floor
        if (
            isinstance(floor, bool)
            or not isinstance(floor, (int, float))
            or not 0 < floor < math.inf
        ):
            raise ValueError(f"amp_scale_floor must be a finite number above 0, got {floor!r}")
        factor = self.spike_factor
        if (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not 1 < factor < math.inf
        ):
            raise ValueError(f"spike_factor must be a finite number above 1, got {factor!r}")
        baseline = duration_seconds(self.spike_baseline, "spike_baseline")
        if duration_seconds(self.spike_history, "spike_history") >= baseline:
            raise ValueError(
                f"spike_history must be shorter than spike_baseline ({self.spike_baseline!r}), "
                f"got {self.spike_history!r}"
            )
        factor = self.disagree_factor
        if (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not 1 < factor < math.inf
        ):
            raise ValueError(f"disagree_factor must be a finite number above 1, got {factor!r}")
        duration_seconds(self.disagree_for, "disagree_for")
        scrape = duration_seconds(self.scrape_interval, "scrape_interval")
        duration_seconds(self.evaluation_interval, "evaluation_interval")
        # increase() over the window, and the last update time read through half the stall
        # time, must find samples across a failed scrape: else the alerts cannot fire (and
        # a stall time under 2s renders a range of 0s, which fails the whole rules file).
        for name in ("window", "stall_after"):
            if duration_seconds(getattr(self, name), name) < 4 * scrape:
                raise ValueError(
                    f"{name} must span at least 4 scrape intervals ({duration_text(4 * scrape)} "
                    f"with scrape_interval {self.scrape_interval!r}), got {getattr(self, name)!r}"
                )
        if (
            isinstance(self.targets, str)
            or not isinstance(self.targets, Sequence)
            or not self.targets
        ):
            raise ValueError(
                f"targets must be a list of 'host:port' strings such as ['node-1:9464'], got {self.targets!r}"
            )
        for name, target in (
            *(("targets", t) for t in self.targets),
            ("alertmanager", self.alertmanager),
        ):
            found = _TARGET.match(target) if isinstance(target, str) else None
            if found is None or not 0 < int(found.group(1)) < 65536:
                raise ValueError(
                    f"{name} must be 'host:port' with a port from 1 to 65535, such as 'node-1:9464' "
                    f"(no scheme, no path), got {target!r}"
                )
        object.__setattr__(self, "targets", tuple(self.targets))
        for name in ("pager_url", "chat_url"):
            url = getattr(self, name)
            if not isinstance(url, str) or not _URL.match(url):
                raise ValueError(
                    f"{name} must be an http(s) webhook URL such as 'https://pager.example/hook', got {url!r}"
                )

    def check_tested(self) -> None:
        """Raise ValueError for options the rendered rule tests are not written for: their
        cases step a minute at a time and bridge gaps of minutes (the rules themselves hold
        for any options that :class:`KitOptions` accepts)."""
        stall = duration_seconds(self.stall_after)
        ranges = (
            ("window", duration_seconds(self.window) >= 300, "at least 5m"),
            (
                "stall_after",
                stall >= 180 and stall % 60 == 0,
                "a whole number of minutes, at least 3m",
            ),
            ("spike_baseline", duration_seconds(self.spike_baseline) >= 240, "at least 4m"),
            ("disagree_for", duration_seconds(self.disagree_for) > 60, "longer than 1m"),
            (
                "scrape_interval",
                duration_seconds(self.settle) < 60,
                f"under 1m with evaluation_interval {self.evaluation_interval!r} added",
            ),
        )
        for name, tested, allowed in ranges:
            if not tested:
                raise ValueError(
                    f"{name} must be {allowed} (what the kit's rule tests are written for), "
                    f"got {getattr(self, name)!r}"
                )

    @property
    def job_selector(self) -> str:
        return f'job="{self.job}"'

    @property
    def settle(self) -> str:
        """The ``for:`` of the unhealthy-update alerts: one scrape interval and one
        evaluation interval, after which every rank's scrape of an update is in."""
        return duration_text(
            duration_seconds(self.scrape_interval) + duration_seconds(self.evaluation_interval)
        )

    def runbook(self, alert: str) -> str:
        return f"{self.runbook_url}#{alert.lower()}"


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so PromQL and templates stay readable."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(header: str, data: Any) -> str:
    # Wide lines: a folded alert template is harder to read than a long one.
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=100_000, allow_unicode=True)
    return header + body


def header(o: KitOptions, what: str) -> str:
    t = o.thresholds
    return (
        f"# {what}\n"
        f"# Rendered by `gradtel render` from Thresholds(warning={t.warning}, critical={t.critical}),\n"
        f"# window={o.window}, stall_after={o.stall_after}, job={o.job}, "
        f"amp_skip_ratio={o.amp_skip_ratio:g}. Do not edit by hand:\n"
        "# re-render with `gradtel render --out DIR` and your own options instead.\n"
    )
