"""The disagreeing-rank alert: one rank's own gradient norm stands far from the other ranks'.

The ranks of a data-parallel run train the same weights on different batches: their
own gradient norms, before the reduction, differ by the data's noise. A GPU that bends
values (silent data corruption) rarely makes a NaN; it makes one rank's gradients stand
out, while the others agree. The median of the ranks is the robust reference: one bad
rank does not move it, as long as there are at least three."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...metrics import DEVICE_INFO, LOCAL_GRAD_NORM, START_TIME, Metric
from ..options import DISAGREE_ALERT, NORM_SPIKE_ALERT, KitOptions, duration_seconds
from . import promql
from ._promtool import (
    GAP,
    GPU,
    PCI,
    Value,
    _check,
    _device,
    _life,
    _lives,
    _minutes,
    _rank,
    _scrapes,
    _series,
)
from .alert import Alert, Case

__all__ = ["ALERT"]

MIN_RANKS = 3
"""The median of two ranks is their mean: it cannot tell which of the two is wrong."""


def _norms(o: KitOptions, scope: str) -> str:
    """Each rank's own gradient norm: its median over ``disagree_for``, which one odd batch,
    a failed scrape or the ranks' scrapes being spread over the interval do not move."""
    return f"quantile_over_time(0.5, {LOCAL_GRAD_NORM}{{{scope}}}[{o.disagree_for}])"


def _outliers(o: KitOptions, scope: str) -> list[str]:
    """The ranks whose norm stands more than ``disagree_factor`` times above or below the
    median of their run's ranks, valued by their ratio to it; in runs of at least
    ``MIN_RANKS`` ranks, of processes older than ``disagree_for`` (a job's, or a restarted
    rank's, first norms)."""
    norms, run = _norms(o, scope), promql.INCIDENT
    ratio = f"({norms} / on ({run}) group_left () quantile by ({run}) (0.5, {norms}))"
    factor = o.disagree_factor
    age = duration_seconds(o.disagree_for, "disagree_for")
    return [
        f"(({ratio} > {factor:g}) or ({ratio} < {1 / factor:g}))",
        f"and on ({run}) (count by ({run}) ({norms}) >= {MIN_RANKS})",
        f"and on ({promql.PROCESS}) ({promql.started(o, scope)} < time() - {age})",
    ]


def _rule(o: KitOptions) -> dict[str, Any]:
    ranks = promql.query(f"count({_norms(o, promql.RUN_SCOPE)})", *promql.RUN_ARGS)
    return {
        "alert": DISAGREE_ALERT,
        "expr": promql.per_run(*_outliers(o, o.job_selector)),
        # A state, not an event: the rank must stay apart, not wander off for a batch.
        "for": o.disagree_for,
        "labels": {"severity": "critical"},
        "annotations": {
            "summary": "One rank's gradients disagree with the other ranks'",
            "description": (
                f"{promql.where()}: the norm of a rank's own gradients, before the cross-rank "
                f"reduction, stood more than {o.disagree_factor:g} times away from the median "
                f"of the run's {{{{ with {ranks} }}}}{{{{ . | first | value }}}}{{{{ end }}}} "
                f"ranks for {o.disagree_for}: "
                + promql.targets(
                    " ".join(_outliers(o, promql.RUN_SCOPE)),
                    *promql.RUN_ARGS,
                    then=' at {{ $s.Value | printf "%.3g" }} times the median',
                )
                + "."
                + promql.hardware(o, " ".join(_outliers(o, promql.RUN_SCOPE)), *promql.RUN_ARGS)
                + " The ranks train the same weights on different data: one that stays apart "
                "while the others agree points at its GPU (silent data corruption) or its "
                "data shard. Check the GPU's XID, ECC and row-remap counters (runbook), and "
                "keep the checkpoints from before it."
            ),
            "runbook_url": o.runbook(DISAGREE_ALERT),
        },
    }


def _page(
    o: KitOptions, ranks: int, outliers: str, run: str = "", hardware: str = ""
) -> dict[str, Any]:
    """The page, naming ``outliers`` (as the description lists them)."""
    return {
        "exp_labels": {"job": o.job, "severity": "critical", **({"run": run} if run else {})},
        "exp_annotations": {
            "summary": "One rank's gradients disagree with the other ranks'",
            "description": (
                f"{o.job}{f' run {run}' if run else ''}: the norm of a rank's own gradients, "
                f"before the cross-rank reduction, stood more than {o.disagree_factor:g} times "
                f"away from the median of the run's {ranks} ranks for {o.disagree_for}: "
                f"{outliers}.{hardware} The ranks train the same weights on different data: one that "
                "stays apart while the others agree points at its GPU (silent data corruption) "
                "or its data shard. Check the GPU's XID, ECC and row-remap counters (runbook), "
                "and keep the checkpoints from before it."
            ),
            "runbook_url": o.runbook(DISAGREE_ALERT),
        },
    }


Norm = Callable[[int], float]
"""A rank's norm by minute."""


def _steady(value: float = 1.0) -> Norm:
    return lambda minute: value


def _from(minute: int, before: Norm, after: Norm) -> Norm:
    """``before`` until ``minute``, then ``after``."""
    return lambda m: before(m) if m < minute else after(m)


def _noise(rank: int) -> Norm:
    """Per-rank data noise within 3x: a rank's batches differ from the others'."""
    return lambda minute: (1.0, 3.0, 1.5, 2.0, 1.2)[(minute + rank) % 5]


def _process(norm: Norm, first: int = 0, gone: int | None = None) -> dict[Metric, Value]:
    """One process's series from its first scrape: its norm and its start time."""
    return {LOCAL_GRAD_NORM: _life(norm, first, gone), START_TIME: _life(first * 60, first, gone)}


def _scraped(
    labels: str, *lives: dict[Metric, Value], minutes: int, **how: Any
) -> list[dict[str, str]]:
    """The series of the processes with ``labels``, one after another (restarts)."""
    return [
        _series(metric, labels, _scrapes(minutes, _lives(*(lf[metric] for lf in lives)), **how))  # type: ignore[arg-type]
        for metric in lives[0]
    ]


def _run(
    o: KitOptions, norms: list[Norm], minutes: int, run: str = "", **how: Any
) -> list[dict[str, str]]:
    """A run whose rank ``r`` has the norms ``norms[r]``, every process started at 0."""
    extra = {"run": run} if run else {}
    return [
        s
        for rank, norm in enumerate(norms)
        for s in _scraped(_rank(o, rank, **extra), _process(norm), minutes=minutes, **how)
    ]


def _behaviours(o: KitOptions, case: Case) -> None:
    """A bad rank pages; data noise, a job's start, two ranks and a spike of every rank do not."""
    held = _minutes(duration_seconds(o.disagree_for, "disagree_for"))
    bad = 5 * o.disagree_factor  # a rank whose gradients are 5 times past the factor
    at = 2 * held + 5  # well past the start of the job
    minutes = at + 2 * held + 10
    fired = at + 2 * held  # the rank's median is past the factor, then for as long
    corrupt = _from(at, _steady(), _steady(bad))
    four = [_steady(), _steady(), corrupt, _steady()]
    case(
        f"{DISAGREE_ALERT} fires when one of 4 ranks' norm stays {bad:g}x the median, naming its rank, host and GPU",
        _run(o, four, minutes) + [_device(o, r, minutes, gpu=r == 2) for r in range(4)],
        [
            _check(at, DISAGREE_ALERT),
            _check(at + 1, DISAGREE_ALERT),
            _check(
                fired,
                DISAGREE_ALERT,
                _page(
                    o,
                    4,
                    f"trainer-2:9464 (rank 2) at {bad:g} times the median",
                    hardware=f" Hardware: trainer-2:9464 (rank 2) on host node-1, {GPU} (PCI {PCI}).",
                ),
            ),
        ],
    )
    case(
        f"{DISAGREE_ALERT} fires for a rank whose norm collapses, without device info (an older gradtel)",
        _run(o, [_steady(), _steady(), _from(at, _steady(), _steady(1 / bad)), _steady()], minutes),
        [
            _check(
                fired,
                DISAGREE_ALERT,
                _page(o, 4, f"trainer-2:9464 (rank 2) at {1 / bad:g} times the median"),
            )
        ],
    )
    case(
        f"{DISAGREE_ALERT} does not fire on per-rank data noise within 3x",
        _run(o, [_noise(r) for r in range(4)], minutes),
        [_check(m, DISAGREE_ALERT) for m in range(0, minutes, 2)],
    )
    case(
        f"{DISAGREE_ALERT} does not fire when every rank's norm moves together",
        _run(o, [_from(at, _steady(), _steady(bad))] * 4, minutes),
        [_check(m, DISAGREE_ALERT) for m in range(at - 1, minutes, 2)],
    )
    # The median of two is their mean: neither rank can be told as the wrong one.
    case(
        f"{DISAGREE_ALERT} does not fire with 2 ranks, however far apart",
        _run(o, [_steady(bad), _steady()], minutes),
        [_check(m, DISAGREE_ALERT) for m in range(0, minutes, 2)],
    )
    case(
        f"{DISAGREE_ALERT} does not fire at job start",
        _run(
            o, [_steady(), _steady(), _from(held + 1, _steady(bad), _steady()), _steady()], minutes
        ),
        [_check(m, DISAGREE_ALERT) for m in range(minutes)],
    )
    # Two runs on one Prometheus: each is its own reference, and one's rank pages alone.
    case(
        f"{DISAGREE_ALERT} compares the ranks of one run only, with two runs on one Prometheus",
        _run(o, [_steady()] * 3, minutes, run="a")
        + _run(
            o, [_steady(bad)] * 2 + [_from(at, _steady(bad), _steady(bad * bad))], minutes, run="b"
        ),
        [
            _check(at - 1, DISAGREE_ALERT),
            _check(
                fired,
                DISAGREE_ALERT,
                _page(o, 3, f"trainer-2:9464 (rank 2) at {bad:g} times the median", run="b"),
            ),
        ],
    )


def _histories(o: KitOptions, case: Case) -> None:
    """The alert through failed scrapes, gaps, restarts and late ranks."""
    held = _minutes(duration_seconds(o.disagree_for, "disagree_for"))
    bad = 5 * o.disagree_factor
    at = 2 * held + 5
    minutes = at + 2 * held + 10
    fired = at + 2 * held
    corrupt = _from(at, _steady(), _steady(bad))
    page = _page(o, 4, f"trainer-2:9464 (rank 2) at {bad:g} times the median")
    four = [_steady(), _steady(), corrupt, _steady()]
    case(
        f"{DISAGREE_ALERT} keeps firing when the rank's scrapes fail",
        _run(o, four, minutes, failed=(fired + 1,)),
        [_check(fired, DISAGREE_ALERT, page), _check(fired + 1, DISAGREE_ALERT, page)],
    )
    down = range(fired + 2, fired + 2 + GAP)
    case(
        f"{DISAGREE_ALERT} does not fire during a Prometheus gap of {GAP}m, and fires again after it while the rank stays apart",
        _run(o, four, down.stop + 2 * held + 3, gaps=down),
        [
            _check(fired, DISAGREE_ALERT, page),
            _check(down.stop - 1, DISAGREE_ALERT),
            _check(down.stop + 2 * held + 2, DISAGREE_ALERT, page),
        ],
    )
    # A restarted rank, or one that joins late, starts with norms of its own: not judged
    # until it is older than disagree_for.
    gone = at
    first = gone + 1
    young = _from(first + held + 1, _steady(bad), _steady())
    case(
        f"{DISAGREE_ALERT} does not fire when a rank restarts with norms apart at first",
        _run(o, [_steady(), _steady(), _steady()], minutes)
        + _scraped(
            _rank(o, 3), _process(_steady(), 0, gone), _process(young, first), minutes=minutes
        ),
        [_check(m, DISAGREE_ALERT) for m in range(minutes)],
    )
    case(
        f"{DISAGREE_ALERT} does not fire when a rank joins late with norms apart at first",
        _run(o, [_steady(), _steady(), _steady()], minutes)
        + _scraped(_rank(o, 3), _process(young, first), minutes=minutes),
        [_check(m, DISAGREE_ALERT) for m in range(minutes)],
    )


def rules(o: KitOptions) -> list[dict[str, Any]]:
    return [_rule(o)]


def cases(o: KitOptions, case: Case) -> None:
    _behaviours(o, case)
    _histories(o, case)


def runbook(o: KitOptions) -> str:
    sel = f'job="{o.job}"'
    return f"""## {DISAGREE_ALERT}

**Meaning.** One rank's own gradients, before the cross-rank reduction
(`{LOCAL_GRAD_NORM}`), have had an L2 norm more than {o.disagree_factor:g} times
above or below the median of its run's ranks for {o.disagree_for}. The ranks of a
data-parallel run train the same weights on different batches, so their norms differ
by the data's noise, a few times at most; a GPU that corrupts values silently bends
one rank's gradients long before anything becomes NaN, and after the all-reduce
every rank trains on them. The page names the rank, its instance, its host and its
GPU (`{DEVICE_INFO}`).

It needs at least {MIN_RANKS} ranks: the median of two is their mean, and it cannot
tell which of the two is wrong (compare them by hand, or against an earlier run).
It is silent when every rank moves together (a spike of the whole run is
`{NORM_SPIKE_ALERT}`'s business), in a process's first {o.disagree_for}, and
for a rank that is off for a batch or two. It cannot see corruption that bends every
rank alike, nor a bad GPU whose error stays within the data's noise; under FSDP each
rank's norm is of the gradients it hands to the reduce-scatter, every rank's own.

**Tell hardware from training.** Join the rank's GPU with dcgm-exporter's counters
(its `UUID`, `pci_bus_id` and `Hostname` labels):

```promql
# XID errors of the GPUs of this job's ranks (the last XID code, 0 when none).
DCGM_FI_DEV_XID_ERRORS
  * on (UUID) group_left (rank, instance)
    label_replace(gradtel_device_info{{{sel}}}, "UUID", "$1", "gpu_uuid", "(.+)")

# Double-bit ECC errors and failed row remaps of the same GPUs.
(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL or DCGM_FI_DEV_ROW_REMAP_FAILURE)
  * on (pci_bus_id, Hostname) group_left (rank, instance)
    label_replace(gradtel_device_info{{{sel}}}, "Hostname", "$1", "host", "(.+)")
```

In Kubernetes `host` is the pod's hostname, not the node's: join on `UUID` there.
Non-zero XID 48/63/64/79/94/95, double-bit ECC errors or a failed row remap: the GPU
is bad. None of them, and the rank's data shard is unusual (one long sequence, a
corrupt file): it is the data; the norms of the other ranks, which agree, are the
reference.

**Do** stop the job, drain the host (or exclude the GPU), and resume from a
checkpoint from before the rank went apart: the reduced gradients carried its error
to every rank. Run the GPU's diagnostics (`dcgmi diag -r 3`) before it comes back.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
