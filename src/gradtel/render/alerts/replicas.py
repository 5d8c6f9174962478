"""The replica-drift alert: a DDP rank whose parameters differ from the other replicas' at
the same update, compared in PromQL (no collective in the training process)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...metrics import REPLICA_FINGERPRINT, REPLICA_FINGERPRINT_UPDATE
from ...options import DEFAULT_REPLICA_CHECK_EVERY
from ...pipeline.fingerprint import FINGERPRINT_BITS
from ..options import REPLICA_ALERT, KitOptions
from . import promql
from ._promtool import _check, _more, _notation, _rank, _series
from .alert import Alert, Case

__all__ = ["AGREEMENT", "ALERT", "CHECKS"]

_RUN = "job, run"
_CHECK = "job, run, update"
"""One check of one run: the ranks compared are those that hashed the same update."""

CHECKS = "job_instance_rank_run_update_fingerprint:gradtel_replica_fingerprint:count_values"
"""Recorded: one series per rank and check, labelled with its ``update`` and ``fingerprint``."""
AGREEMENT = "job_instance_rank_run_update_fingerprint:gradtel_replica_agreeing_ranks:ratio"
"""Recorded: per rank and check that every rank of the run has hashed, the share of the
run's ranks that hold this rank's fingerprint (0.5 and below: no majority agrees with it)."""


def _checks(scope: str) -> str:
    """One series per rank and check (either slot), labelled with its ``update`` and
    ``fingerprint``. A rank scraped between the two writes of a check has it in both
    slots: ``group`` counts it once."""
    fingerprints = f"count_values without () ('fingerprint', {REPLICA_FINGERPRINT}{{{scope}}})"
    updates = f"count_values without () ('update', {REPLICA_FINGERPRINT_UPDATE}{{{scope}}})"
    return (
        f"group by ({promql.PROCESS}, update, fingerprint) (\n  {fingerprints}\n"
        f"  * ignoring (fingerprint, update) group_left (update)\n  {updates}\n)"
    )


def _complete(checks: str, scope: str) -> str:
    """Checks that every rank of the run has hashed, by their number of ranks. A rank
    that has not (a late rank, a rank restarted and counting its updates anew) leaves the
    checks of the others incomplete: nothing is compared there. The run's ranks are those
    scraped, not those in ``checks``: a store that serves recorded series back late (vmalert
    over VictoriaMetrics) can show some ranks with no check at all, and the others' check
    would look complete."""
    ranks = f"count by ({_RUN}) (group by ({promql.PROCESS}) ({REPLICA_FINGERPRINT}{{{scope}}}))"
    return f"count by ({_CHECK}) ({checks})\n  == on ({_RUN}) group_left ()\n  {ranks}"


def _agreement(scope: str) -> str:
    """Per rank and complete check, the share of the ranks that hold its fingerprint."""
    checks = f"{CHECKS}{{{scope}}}"
    return (
        f"{checks}\n* on ({_CHECK}, fingerprint) group_left ()\n"
        f"  count by ({_CHECK}, fingerprint) ({checks})\n"
        f"/ on ({_CHECK}) group_left () (\n  {_complete(checks, scope)}\n)"
    )


def _drifted(scope: str) -> list[str]:
    """The ranks, one series per check, whose fingerprint is not the majority's (lines)."""
    share = f"{AGREEMENT}{{{scope}}}"
    return [f"{share} < 0.5", f"and on ({_CHECK})", f"{share} > 0.5"]


def _tied(scope: str) -> str:
    """Complete checks that no fingerprint holds a majority of: two ranks that differ
    (which one drifted, a vote of two cannot tell), or a tie."""
    return f"max by ({_CHECK}) ({AGREEMENT}{{{scope}}}) <= 0.5"


def _description(o: KitOptions) -> str:
    ranks = f"group by ({promql.PROCESS}) ({' '.join(_drifted(promql.RUN_SCOPE))})"
    drifted = promql.query(ranks, *promql.RUN_ARGS)
    return (
        f"{promql.where()}: "
        f'{{{{ with {drifted} }}}}the parameters of {{{{ range $i, $s := sortByLabel "rank" . }}}}'
        "{{ if $i }}, {{ end }}rank {{ $s.Labels.rank }} ({{ $s.Labels.instance }}){{ end }} "
        "differ from those of the majority of ranks at the same update"
        "{{ else }}the ranks' parameters differ at the same update and no majority tells "
        "which rank drifted (2 ranks, or a tie){{ end }}. DDP replicas hold the same bits "
        "after every step: a rank that differs has silent data corruption (a bad GPU or its "
        "memory) or a non-deterministic step of its own. Its NaN may come later; take that "
        "GPU out and resume from a checkpoint saved before the drift."
        + promql.hardware(o, ranks, *promql.RUN_ARGS)
    )


def rules(o: KitOptions) -> list[dict[str, Any]]:
    """The recorded series the alert reads, then the alert."""
    sel = o.job_selector
    return [
        # In the alert's group, before it: rules of a group run in order, at one time, so
        # the alert reads what they recorded from the same scrapes.
        {"record": CHECKS, "expr": _checks(sel)},
        {"record": AGREEMENT, "expr": _agreement(sel)},
        {
            "alert": REPLICA_ALERT,
            # No for: two checks in a row that differ are one hard fact, like a NaN update.
            "expr": (
                promql.per_run(
                    f"group by ({promql.PROCESS}) (", *(f"  {line}" for line in _drifted(sel)), ")"
                )
                + "\nor\n"
                + promql.per_run(_tied(sel))
            ),
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "A data-parallel replica drifted from the others",
                "description": _description(o),
                "runbook_url": o.runbook(REPLICA_ALERT),
            },
        },
    ]


Check = tuple[int, int] | None
"""A rank's latest replica check at a minute: (update, fingerprint); None: not scraped."""


def _replica_series(
    labels: str, history: Sequence[Check], torn: Sequence[int] = ()
) -> list[dict[str, str]]:
    """A rank's four replica series, scraped once a minute, from its latest check by minute
    (None: not scraped; a staleness marker at the first such minute, as after a failed
    scrape or the process's end). The previous slot holds the check before the latest one
    of the same process, as gradtel exports them. ``torn``: minutes of a new check whose
    scrape fell between its two writes, and so shows the check before in both slots."""
    history = [history[m - 1] if m in torn else c for m, c in enumerate(history)]
    slots: dict[str, list[Check]] = {"latest": [], "previous": []}
    before: Check = None
    for minute, check in enumerate(history):
        last = history[minute - 1] if minute else None
        if last is not None and check not in (None, last):
            before = last
        slots["latest"].append(check)
        slots["previous"].append(check if minute in torn else before if check else None)
    series = []
    for slot, checks in slots.items():
        for metric, part in ((REPLICA_FINGERPRINT_UPDATE, 0), (REPLICA_FINGERPRINT, 1)):
            samples: list[float | str] = []
            for minute, c in enumerate(checks):
                if c is not None:
                    samples.append(float(c[part]))
                else:  # a staleness marker ends a series that was there a minute before
                    samples.append("stale" if minute and checks[minute - 1] else "_")
            if any(isinstance(s, float) for s in samples):
                series.append(_series(metric, _more(labels, slot=slot), _notation(samples)))
    return series


def _history(minutes: int, *, ahead: int = 0, drift_from: int | None = None) -> list[Check]:
    """A rank checking every 2 minutes, update 1 at minute 0, 101 at minute 2...: the same
    fingerprints on every rank, unless it drifted at check ``drift_from`` and on. ``ahead``:
    it is scraped that many minutes earlier after each check than the others."""
    history: list[Check] = []
    for minute in range(minutes):
        k = (minute + ahead) // 2
        drifted = drift_from is not None and k >= drift_from
        # 52-bit fingerprints, as gradtel exports them; a drifted one differs in the lowest bit.
        fingerprint = (1 << FINGERPRINT_BITS) - 2 - 2 * k
        history.append((1 + 100 * k, fingerprint | 1 if drifted else fingerprint))
    return history


def _fired(o: KitOptions, ranks: str) -> dict[str, Any]:
    return {
        "exp_labels": {"job": o.job, "severity": "critical"},
        "exp_annotations": {
            "summary": "A data-parallel replica drifted from the others",
            "description": (
                f"{o.job}: the parameters of {ranks} differ from those of the majority of "
                "ranks at the same update. DDP replicas hold the same bits after every step: "
                "a rank that differs has silent data corruption (a bad GPU or its memory) or a "
                "non-deterministic step of its own. Its NaN may come later; take that GPU out "
                "and resume from a checkpoint saved before the drift."
            ),
            "runbook_url": o.runbook(REPLICA_ALERT),
        },
    }


def _no_majority(o: KitOptions) -> dict[str, Any]:
    alert = _fired(o, "")
    alert["exp_annotations"]["description"] = alert["exp_annotations"]["description"].replace(
        "the parameters of  differ from those of the majority of ranks at the same update",
        "the ranks' parameters differ at the same update and no majority tells which rank "
        "drifted (2 ranks, or a tie)",
    )
    return alert


def cases(o: KitOptions, case: Case) -> None:
    minutes = 14
    drift = 3  # the check at minute 6
    rank3 = "rank 3 (trainer-3:9464)"

    def ranks(count: int, **by_rank: list[Check]) -> list[dict[str, str]]:
        return [
            s
            for r in range(count)
            for s in _replica_series(
                _rank(o, r), by_rank.get(f"r{r}", _history(minutes, ahead=int(r == 0)))
            )
        ]

    case(
        f"{REPLICA_ALERT} fires once naming the rank that drifted, while checks go on",
        ranks(4, r3=_history(minutes, drift_from=drift)),
        [_check(5, REPLICA_ALERT)]
        + [_check(m, REPLICA_ALERT, _fired(o, rank3)) for m in range(2 * drift, minutes)],
    )

    # At minute 5 rank 0 alone has check 301; at minute 6 every rank has, rank 3 drifted.
    # The fingerprints of checks 0, 1, 2... as the healthy ranks and the drifted one hash them.
    same = [c[1] for c in _history(minutes)[::2] if c is not None]
    drifted = [c[1] for c in _history(minutes, drift_from=drift)[::2] if c is not None]

    def agreeing(*shares: tuple[int, int, int, float]) -> list[dict[str, Any]]:
        return [
            {
                "labels": AGREEMENT + _more(_rank(o, r), update=str(u), fingerprint=str(f)),
                "value": v,
            }
            for r, u, f, v in shares
        ]

    case(
        f"{REPLICA_ALERT} records, per rank and check every rank has hashed, the share of the "
        "ranks that hold its fingerprint",
        ranks(4, r3=_history(minutes, drift_from=drift)),
        [_check(6, REPLICA_ALERT, _fired(o, rank3))],
        recorded=[
            {
                "expr": AGREEMENT,
                "eval_time": "5m",
                "exp_samples": agreeing(*((r, 201, same[2], 1.0) for r in range(4))),
            },
            {
                "expr": AGREEMENT,
                "eval_time": "6m",
                "exp_samples": agreeing(
                    *((r, 201, same[2], 1.0) for r in range(4)),
                    *((r, 301, same[3], 0.75) for r in range(3)),
                    (3, 301, drifted[3], 0.25),
                ),
            },
        ],
    )
    # Ranks 0 and 3 are scraped first after each check: at minute 5 the two alone have the
    # check that rank 3 drifted at, and no majority; a page now could not name rank 3.
    case(
        f"{REPLICA_ALERT} waits for every rank's scrape of a check before it compares them",
        ranks(4, r3=_history(minutes, ahead=1, drift_from=drift)),
        [_check(2 * drift - 1, REPLICA_ALERT), _check(2 * drift, REPLICA_ALERT, _fired(o, rank3))],
    )
    case(
        f"{REPLICA_ALERT} does not fire when ranks are scraped on either side of a check",
        ranks(4),
        [_check(m, REPLICA_ALERT) for m in range(minutes)],
    )
    failed = _history(minutes)
    failed[9] = None  # a failed scrape of rank 1: the other three still have a majority
    case(
        f"{REPLICA_ALERT} names the drifted rank through another rank's failed scrape",
        ranks(4, r1=failed, r3=_history(minutes, drift_from=drift)),
        [_check(m, REPLICA_ALERT, _fired(o, rank3)) for m in (8, 9, 10)],
    )
    case(
        f"{REPLICA_ALERT} counts once a rank scraped between the two writes of a check",
        [
            *_replica_series(_rank(o, 0), _history(minutes, ahead=1)),
            *_replica_series(_rank(o, 1), _history(minutes), torn=(8,)),
            *_replica_series(_rank(o, 2), _history(minutes)),
            *_replica_series(_rank(o, 3), _history(minutes, drift_from=drift)),
        ],
        [_check(m, REPLICA_ALERT, _fired(o, rank3)) for m in (7, 8, 9)],
    )
    # vmalert reads the checks it recorded back through the store, which serves a new series
    # some seconds late: at minute 3 ranks 0 and 2 show no check at all (their check of
    # update 1 ended, that of update 101 is not served yet), ranks 1 and 3 the new one, in
    # which rank 3 drifted. Every rank is scraped all along. (No update series: the checks
    # below are those the rules read back, and the rules record none of their own.)
    served = {0: 4, 1: 3, 2: 4, 3: 3}  # the minute each rank's check of update 101 shows
    ending = "1x2 stale"  # each rank's check of update 1, until minute 3
    case(
        f"{REPLICA_ALERT} counts the ranks scraped, not those whose checks the store serves yet",
        [
            *(_series(REPLICA_FINGERPRINT, _rank(o, r), f"{same[1]}x5") for r in range(4)),
            *(
                _series(CHECKS, _more(_rank(o, r), update="1", fingerprint=str(same[0])), ending)
                for r in range(4)
            ),
            *(
                _series(
                    CHECKS,
                    _more(_rank(o, r), update="101", fingerprint=str(same[1] | (r == 3))),
                    f"_x{minute} 1x{5 - minute}",
                )
                for r, minute in served.items()
            ),
        ],
        [_check(3, REPLICA_ALERT), _check(4, REPLICA_ALERT, _fired(o, rank3))],
    )
    # Rank 3 restarts alone: it counts its updates from 1 again, with other weights.
    restarted: list[Check] = [*_history(8), None]
    restarted += [(1 + 100 * k, 7_000 + k) for k in range(minutes - 9)]
    case(
        f"{REPLICA_ALERT} does not fire when a rank restarts",
        ranks(4, r3=restarted),
        [_check(m, REPLICA_ALERT) for m in range(minutes)],
    )
    # A job's ranks are scraped first one after another.
    late: dict[str, list[Check]] = {
        f"r{r}": [*([None] * r), *_history(minutes)[r:]] for r in range(4)
    }
    case(
        f"{REPLICA_ALERT} does not fire at job start",
        ranks(4, **late),
        [_check(m, REPLICA_ALERT) for m in range(6)],
    )
    # Two runs on one Prometheus: the same updates, their own weights.
    other: list[Check] = [(c[0], c[1] + 50_000) for c in _history(minutes) if c is not None]
    case(
        f"{REPLICA_ALERT} does not fire for two runs on one Prometheus",
        [
            s
            for run, history in (("a", _history(minutes)), ("b", other))
            for r in range(3)
            for s in _replica_series(_rank(o, r, run=run), history)
        ],
        [_check(m, REPLICA_ALERT) for m in range(minutes)],
    )
    two = [
        s
        for r, history in enumerate((_history(minutes), _history(minutes, drift_from=drift)))
        for s in _replica_series(_rank(o, r), history)
    ]
    case(
        f"{REPLICA_ALERT} fires without naming a rank when one of 2 ranks drifts",
        two,
        [_check(5, REPLICA_ALERT), _check(2 * drift, REPLICA_ALERT, _no_majority(o))],
    )


def runbook(o: KitOptions) -> str:
    return f"""## {REPLICA_ALERT}

**Meaning.** Under DistributedDataParallel every rank holds the same parameters,
bit for bit, after each optimizer step. Every `replica_check_every` updates
(default {DEFAULT_REPLICA_CHECK_EVERY}) each rank hashes its parameters exactly (`{REPLICA_FINGERPRINT}`,
for the update in `{REPLICA_FINGERPRINT_UPDATE}`) and the rules compare the
ranks' hashes of the same update, once every rank has hashed it. Two recording
rules in the alert's group, evaluated before it, hold the steps:

- `{CHECKS}`:
  one series per rank and check, labelled with its `update` and `fingerprint`;
- `{AGREEMENT}`:
  for each check that every rank of the run has hashed, the share of the ranks that
  hold this rank's fingerprint.

A rank below 0.5 where another is above 0.5 has drifted: silent data corruption on
its GPU (a flipped bit in memory or in a kernel's result), with no NaN yet. With 2
ranks (or a tie) no rank is above 0.5 and no majority tells which rank drifted: the
page says so and names none.

**Look first at**
- `{AGREEMENT}{{{o.job_selector}}} < 1`:
  every rank of the checks that disagree, with its fingerprint, by update;
- the rank and instance the page names; its GPU's ECC and Xid errors (`nvidia-smi -q -d ECC`,
  `dmesg | grep -i xid`, dcgm-exporter's `DCGM_FI_DEV_XID_ERRORS`);
- whether it repeats on the same GPU after a restart: then the hardware is bad;
- code that makes one rank's step differ on purpose (a rank-dependent optimizer
  step, a non-deterministic kernel in a custom update, parameters changed outside the
  optimizer on one rank): the check assumes none.

**Do** drain that GPU (or node) and resume from a checkpoint saved before the
drift (the last one before the update the page's check belongs to). Training on
keeps a corrupted replica: its gradients enter every all-reduce.
"""


ALERT = Alert(rules=rules, cases=cases, runbook=runbook)
