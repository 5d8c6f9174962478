"""``gradtel incidents``: the ranks' incident records (``GradMonitor(incident_log=...)``)
merged into one timeline, in step order (then time, then rank), and optionally drawn."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from ..export.incidents import rotated_path

__all__ = [
    "OTHER_LAYERS",
    "Timeline",
    "legend_layers",
    "plot",
    "read",
    "run",
    "table",
    "with_rotated",
]

_COLUMNS = ("step", "time (UTC)", "rank", "host", "status", "NaN", "Inf", "first bad layer")
_MORE = ("update", "origin", "loss", "norm", "action", "layers")

OTHER_LAYERS = "other layers"
"""The plot's legend name for the layers past its top ten."""

_NEEDED = ("step", "time", "rank", "status", "nan", "inf")
"""Fields a line must hold to be placed on the timeline."""


@dataclass
class Timeline:
    """The incidents of every file in timeline order, and the lines that were not incidents."""

    incidents: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read(paths: Iterable[Path]) -> Timeline:
    """Every incident of ``paths``, in step, time, rank order; a line that is not a
    record is left out and described in ``problems``.

    Raises:
        OSError: a file cannot be read.
    """
    found = Timeline()
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                parsed = _parsed(line)
                if isinstance(parsed, str):
                    found.problems.append(f"{path}:{number}: skipped, {parsed}")
                else:
                    found.incidents.append(parsed)
    found.incidents.sort(key=lambda r: (r["step"], r["time"], r["rank"]))
    return found


def _parsed(line: str) -> dict[str, Any] | str:
    """The record on ``line``, or what is wrong with it."""
    try:
        record = json.loads(line)
    except ValueError as exc:
        return f"not JSON ({exc})"
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [name for name in _NEEDED if name not in record]
    if missing:
        return f"no {', '.join(missing)}"
    if not all(isinstance(record[n], (int, float)) for n in ("step", "time", "rank")):
        return "step, time and rank must be numbers"
    return record


def table(incidents: Sequence[dict[str, Any]], out: TextIO) -> None:
    """Write the timeline as an aligned text table, one incident a row."""
    rows = [[*_COLUMNS, *_MORE]] + [_row(r) for r in incidents]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")


def _row(r: dict[str, Any]) -> list[str]:
    # To the millisecond, as recorded: the incidents of one second stay apart.
    stamp = datetime.fromtimestamp(r["time"], UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    status = "amp_skipped" if r.get("amp_overflow") else str(r["status"])
    if r.get("unscanned"):
        status += f" ({r['unscanned']})"
    layers = _layer_counts(r)
    return [
        str(r["step"]),
        stamp,
        str(r["rank"]),
        str(r.get("host") or "-"),
        status,
        str(r["nan"]),
        str(r["inf"]),
        str(r.get("first_bad_layer") or "-"),
        str(r.get("update") or "-"),
        _known(r.get("origin"), "here", "elsewhere"),
        _known(r.get("loss_finite"), "finite", "NON-FINITE"),
        "-" if r.get("grad_norm") is None else f"{r['grad_norm']:.4g}",
        str(r.get("action") or "-"),
        " ".join(f"{layer}={n}" for layer, n in sorted(layers.items(), key=lambda i: -i[1])),
    ]


def _known(flag: object, yes: str, no: str) -> str:
    return "-" if flag is None else yes if flag else no


def plot(incidents: Sequence[dict[str, Any]], target: Path) -> None:
    """Draw the non-finite counts per layer (top, log scale) and the gradient norm (bottom)
    over steps into ``target`` (a PNG): one colour per layer (the ten with the most
    values, the others silver as "other layers"), one marker shape per rank, a black edge
    where the incident originated on that rank.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display the machine has
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ranks = sorted({r["rank"] for r in incidents})
    markers = dict(zip(ranks, "os^Dv<>phX*" * (len(ranks) // 11 + 1)))
    legend = legend_layers(incidents)
    layers = list(dict.fromkeys(legend.values()))  # most values first, "other layers" last
    palette = [f"C{i}" for i in range(10) if i != 7] + ["navy"]  # C7 is grey
    colours = {OTHER_LAYERS: "silver", **dict(zip(layers, palette))}
    steps = [r["step"] for r in incidents] or [0]
    span = max(max(steps) - min(steps), 10)
    fig, (counts, norms) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    labelled: set[str] = set()
    for index, rank in enumerate(ranks):
        mine = [r for r in incidents if r["rank"] == rank]
        # Ranks side by side around their step: after an all-reduce they report alike.
        nudge = 0.012 * span * (index - (len(ranks) - 1) / 2)
        for layer in layers:
            found = [(r, n) for r in mine if (n := _grouped(r, legend).get(layer))]
            if found:
                counts.scatter(
                    [r["step"] + nudge for r, _ in found],
                    [n for _, n in found],
                    marker=markers[rank],
                    color=colours[layer],
                    edgecolors=["black" if r.get("origin") else "none" for r, _ in found],
                    # One entry per layer; the ranks' markers have their own.
                    label=layer if layer not in labelled else "_nolegend_",
                )
                labelled.add(layer)
        for key, fill, what in (
            ("grad_norm", True, "norm"),
            ("last_finite_grad_norm", False, "last finite norm before"),
        ):
            points = [(r["step"] + nudge, r[key]) for r in mine if r.get(key) is not None]
            if points:
                norms.scatter(
                    *zip(*points),
                    marker=markers[rank],
                    facecolors=f"C{index % 10}" if fill else "none",
                    edgecolors=f"C{index % 10}",
                    label=f"rank {rank}: {what}",
                )
    if len(ranks) > 1:
        for rank in ranks:  # the markers' key, apart from the layers' colours
            counts.scatter([], [], marker=markers[rank], color="none", edgecolors="black",
                           label=f"rank {rank}")  # fmt: skip
    runs = sorted({str(r.get("run")) for r in incidents if r.get("run")})
    fig.suptitle("gradtel incidents" + (f" of {', '.join(runs)}" if runs else ""))
    counts.set_yscale("log")
    counts.set_ylabel("NaN + Inf values")
    counts.set_title("per layer and rank; black edge: originated on that rank", fontsize=9)
    norms.set_ylabel("gradient L2 norm")
    norms.set_xlabel("training step")
    norms.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (counts, norms):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(target, dpi=80)
    plt.close(fig)


def legend_layers(incidents: Sequence[dict[str, Any]], keep: int = 10) -> dict[str, str]:
    """Each layer of ``incidents`` and the name the plot's legend gives it: the ``keep``
    layers with the most non-finite values keep theirs, most first; the others (a NaN
    spreads to every layer in backward) are :data:`OTHER_LAYERS`, so the legend stays
    readable."""
    totals: dict[str, int] = {}
    for record in incidents:
        for layer, n in _layer_counts(record).items():
            totals[layer] = totals.get(layer, 0) + n
    ranked = sorted(totals, key=lambda layer: (-totals[layer], layer))
    return {layer: layer if i < keep else OTHER_LAYERS for i, layer in enumerate(ranked)}


def _grouped(record: dict[str, Any], legend: dict[str, str]) -> dict[str, int]:
    """The record's counts per legend name."""
    found: dict[str, int] = {}
    for layer, n in _layer_counts(record).items():
        found[legend[layer]] = found.get(legend[layer], 0) + n
    return found


def _layer_counts(record: dict[str, Any]) -> dict[str, int]:
    found: dict[str, int] = {}
    for kind in ("nan_by_layer", "inf_by_layer"):
        for layer, n in (record.get(kind) or {}).items():
            found[layer] = found.get(layer, 0) + n
    return found


def with_rotated(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """``paths``, each preceded by the file it was rotated to (``PATH.1``, its older
    incidents) when that exists and is not given too; and those rotated files."""
    every: list[Path] = []
    rotated: list[Path] = []
    for path in paths:
        older = rotated_path(path)
        if older not in paths and older not in rotated and older.is_file():
            rotated.append(older)
            every.append(older)
        every.append(path)
    return every, rotated


def run(paths: Sequence[Path], plot_to: Path | None, out: TextIO | None = None) -> int:
    """``gradtel incidents``: print the timeline (with the rotated ``PATH.1`` of each
    ``PATH``), report skipped lines on stderr, and draw it with ``plot_to``. Returns the
    exit code (1: matplotlib missing for ``--plot``)."""
    paths, rotated = with_rotated(paths)
    if rotated:
        print(
            f"gradtel incidents: also reading the older incidents of {', '.join(map(str, rotated))}",
            file=sys.stderr,
        )
    timeline = read(paths)
    for problem in timeline.problems:
        print(f"gradtel incidents: {problem}", file=sys.stderr)
    table(timeline.incidents, sys.stdout if out is None else out)
    if plot_to is None:
        return 0
    try:
        plot(timeline.incidents, plot_to)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("matplotlib"):
            raise
        print(
            "gradtel incidents: --plot needs matplotlib: pip install 'gradtel[plot]'",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {plot_to}", file=sys.stderr)
    return 0
