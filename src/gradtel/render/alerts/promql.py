"""The PromQL and Go-template fragments the alert rules and their descriptions share, each
written once: the labels of a run and of a process, this run's series in a description's
query, a process's start, a counter series born non-zero, a gauge as it stands."""

from __future__ import annotations

from ...metrics import DEVICE_INFO, DEVICE_LABELS, START_TIME, Metric
from ..options import KitOptions, duration_seconds

__all__ = [
    "INCIDENT",
    "KIND_ARGS",
    "PROCESS",
    "RUN_ARGS",
    "RUN_SCOPE",
    "as_it_stands",
    "born_non_zero",
    "counted",
    "hardware",
    "held",
    "new_or_increased",
    "on_device",
    "per_run",
    "query",
    "run_series",
    "started",
    "targets",
    "where",
    "young",
]

INCIDENT = "job, run"
"""The labels of one training run: every alert is one per run, whatever its number of
ranks (``run`` is set by gradtel from ``GRADTEL_RUN`` or torchrun's run id, if any)."""

PROCESS = "job, instance, rank, run"
"""The labels of one training process, as the rules join its series on them."""

_RUN = '(or $labels.run "")'
"""The alert's ``run`` label as a string: vmalert gives ``nil`` for a missing label, and
``printf "%q"`` would print that as ``%!q(<nil>)``; Prometheus gives ``""``."""
RUN_SCOPE = "job=%[1]q,run=%[2]q"
"""The selector of the alert's run, in a template query; its arguments are :data:`RUN_ARGS`,
and ``%[3]q`` is the alert's ``kind`` where the query passes it."""
RUN_ARGS = ("$labels.job", _RUN)
KIND_ARGS = (*RUN_ARGS, "$labels.kind")


def per_run(*lines: str, by: str = "") -> str:
    """One series per run (and per ``by``), valued by how many series the expression of
    ``lines`` (one a line) has there: every alert is one per run, whatever its ranks."""
    labels = f"{INCIDENT}, {by}" if by else INCIDENT
    return f"count by ({labels}) (\n  " + "\n  ".join(lines) + "\n)"


def query(template: str, *args: str) -> str:
    """A Go-template ``query`` call: ``template`` with a printf verb for each of ``args``
    (``%[i]q`` for the i-th, where a query uses one several times)."""
    return f'query (printf "{template}" {" ".join(args)})'


def run_series(metric: Metric | str, *, kind: bool = False) -> str:
    """``metric`` of the alert's run (and of its ``kind``), in a template query."""
    return f"{metric}{{{RUN_SCOPE}{',kind=%[3]q' if kind else ''}}}"


def on_device(o: KitOptions, series: str, scope: str, within: str = "") -> str:
    """``series`` of the processes that export ``gradtel_device_info``, with its labels (the
    host and GPU), joined on the process labels. The info is read back over the window (or
    ``within``): a process that died still names its hardware; ``topk`` keeps one per
    process."""
    info = (
        f"topk by ({PROCESS}) (1, last_over_time({DEVICE_INFO}{{{scope}}}[{within or o.window}]))"
    )
    return f"{series} * on ({PROCESS}) group_left ({', '.join(DEVICE_LABELS)}) {info}"


def hardware(o: KitOptions, series: str, *args: str, within: str = "") -> str:
    """ " Hardware: trainer-2:9464 (rank 2) on host node-1, GPU-... (PCI ...)." for the
    targets (at most 10) a query returns whose processes export their device info (read
    back over the window, or ``within``); nothing for a process that does not (an older
    gradtel). The first of ``args`` is the job."""
    named = query(on_device(o, f"topk(10, {series})", "job=%[1]q", within), *args)
    return (
        f'{{{{ with {named} }}}} Hardware: {{{{ range $i, $s := sortByLabel "instance" . }}}}'
        "{{ if $i }}, {{ end }}"
        "{{ $s.Labels.instance }}{{ with $s.Labels.rank }} (rank {{ . }}){{ end }}"
        "{{ with $s.Labels.host }} on host {{ . }}{{ end }}"
        "{{ with $s.Labels.gpu_uuid }}, {{ . }}{{ end }}"
        "{{ with $s.Labels.pci_bus_id }} (PCI {{ . }}){{ end }}"
        "{{ end }}.{{ end }}"
    )


def where() -> str:
    """The job and run an alert is about, as its description starts."""
    return "{{ $labels.job }}{{ with $labels.run }} run {{ . }}{{ end }}"


def targets(series: str, *args: str, then: str = "") -> str:
    """A comma-separated list of the instances (and ranks) a query returns, at most 10;
    ``then``: what follows each, from its series ``$s``."""
    return (
        f'{{{{ range $i, $s := sortByLabel "instance" ({query(f"topk(10, {series})", *args)}) }}}}'
        "{{ if $i }}, {{ end }}"
        "{{ $s.Labels.instance }}{{ with $s.Labels.rank }} (rank {{ . }}){{ end }}"
        + then
        + "{{ end }}"
    )


def started(o: KitOptions, scope: str) -> str:
    """When each process started, through failed scrapes and gaps shorter than the window."""
    return f"last_over_time({START_TIME}{{{scope}}}[{o.window}])"


def young(o: KitOptions, scope: str) -> str:
    """Processes younger than the window (to join ``on (PROCESS)``): they hold counts of the
    window alone. Their start time tells them from an old process seen again after a failed
    scrape or a gap."""
    return f"{started(o, scope)} > time() - {duration_seconds(o.window)}"


def held(o: KitOptions, series: str) -> str:
    """Series above 0 at their last sample in the window, through failed scrapes and gaps."""
    return f"last_over_time({series}[{o.window}]) > 0"


def born_non_zero(o: KitOptions, series: str, scope: str) -> str:
    """Series of a process younger than the window, above 0: a process's first scrape may
    already be above 0, which increase() cannot see, and so may a restart whose first value
    equals the last one of the process it replaced."""
    return f"{held(o, series)} and on ({PROCESS}) {young(o, scope)}"


def counted(
    o: KitOptions,
    series: str,
    scope: str,
    *,
    on_demand: bool = False,
    per_process: bool = False,
    exact: bool = False,
) -> list[str]:
    """The branches of :func:`new_or_increased`."""
    w = o.window
    branches = [born_non_zero(o, series, scope)]
    if on_demand:
        # Born in an old process (a layer's first NaN): no sample in the window before.
        # A gap longer than the window hides that sample, and the series reads as new.
        before = f"last_over_time({series}[{w}] offset {w})"
        if per_process:
            # Born as its process ends (a crash): a sample in the window before is this
            # one only if it came from the process of now, and a process replaced since
            # (a restart) crashed anew, however old it is.
            before += f" and on ({PROCESS}) min_over_time({START_TIME}{{{scope}}}[{w}] offset {w}) == on ({PROCESS}) {started(o, scope)}"
        branches.append(f"{held(o, series)} unless ({before})")
    # max - min is exact where increase() would extrapolate; a restart is a young process.
    moved = (
        f"max_over_time({series}[{w}]) - min_over_time({series}[{w}])"
        if exact
        else f"increase({series}[{w}])"
    )
    return branches + [f"{moved} > 0"]


def new_or_increased(o: KitOptions, series: str, scope: str, **how: bool) -> str:
    """Series of a counter that counted in the window, valued by how much: whatever scrapes
    failed or gaps Prometheus had, only an update counted in the window makes one.
    ``scope`` selects the processes of ``series``; ``on_demand`` for a per-layer counter
    born with its first count, ``per_process`` for one born as its process ends, ``exact``
    for counts rather than extrapolated increases."""
    return "(" + " or ".join(f"({b})" for b in counted(o, series, scope, **how)) + ")"


def as_it_stands(o: KitOptions, series: str, *, per_process: bool = False) -> str:
    """A gauge of incident steps as its series stand, above 0: reset_health() set an older
    incident's to 0, and a step after a rollback may be lower than the older one's. Where
    none is scraped now (the processes are gone, or their scrape failed), their last values:
    of each process's labels the series sampled last, as a dead process's stay in the window
    after a restart on the same labels. ``per_process``: the last values of each process not
    scraped now, even while others are (a gauge whose ranks differ). The subquery steps by
    the scrape interval, so as to see a series that lived for one scrape."""
    sampled = f"max_over_time(timestamp({series})[{o.window}:{o.scrape_interval}])"
    newest = f"{sampled} == on ({PROCESS}) group_left () max by ({PROCESS}) ({sampled})"
    scraped = f"on ({PROCESS}) {series}" if per_process else f"on () ({series} > 0)"
    return f"(({series} > 0) or ({held(o, series)} and ({newest}) unless {scraped}))"
