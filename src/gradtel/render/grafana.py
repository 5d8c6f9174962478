"""Grafana side of the kit: the dashboard and its provisioning, rendered from the same options.

Built with grafana-foundation-sdk (dashboards as code, pinned to the build
for Grafana 11.6). Count thresholds on the panels come from ``Thresholds``: a
count is coloured warning when ``> warning`` and critical when ``> critical``.
Grafana steps mean "at least this value" and counts are integers, so the
steps sit at ``warning + 1`` and ``critical + 1``.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from ..metrics import (
    ERRORS,
    GRAD_NORM,
    GRAD_NORM_PEAK,
    GRADS_TOTAL,
    INF_GRADS,
    LAST_UPDATE_TIMESTAMP,
    NAN_GRADS,
    SCAN_DURATION,
    SKIPPED_UPDATES,
    UNHEALTHY_UPDATES,
    UNSCANNED_UPDATES,
    UPDATE_GRADS,
    UPDATE_STATUS,
    UPDATES,
)
from .options import NORM_SPIKE_ALERT, KitOptions, duration_seconds

__all__ = [
    "DASHBOARD_UID",
    "DATASOURCE_UID",
    "count_steps",
    "dashboard_json",
    "dashboard_provisioning",
    "datasource_provisioning",
]

DASHBOARD_UID = "gradtel-gradient-health"
DATASOURCE_UID = "gradtel-prometheus"

_DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
_SELECT = 'job=~"$job", instance=~"$instance", rank=~"$rank"'
_LAYERS = _SELECT + ', layer=~"$layer"'
GREEN, ORANGE, RED, GREY = "green", "orange", "red", "text"
_LAST = common_builders.ReduceDataOptions().calcs(["lastNotNull"])


def _steps(*pairs: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=value, color=color) for value, color in pairs])
    )


def count_steps(o: KitOptions) -> dashboard.ThresholdsConfig:
    """Green, then orange above ``warning``, red above ``critical``."""
    t = o.thresholds
    return _steps((None, GREEN), (t.warning + 1, ORANGE), (t.critical + 1, RED))


def _query(
    expr: str, legend: str = "__auto", *, instant: bool = False, table_format: bool = False
) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id("A").datasource(_DATASOURCE)
    if instant:
        q = q.instant()
    if table_format:
        q = q.format(PromQueryFormat.TABLE)
    return q


def _grid(x: int, y: int, w: int, h: int) -> model.GridPos:
    return model.GridPos(x=x, y=y, w=w, h=h)


def _variable(name: str, query: str, label: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .query(query)
        .datasource(_DATASOURCE)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )


def _worst_status(status: str) -> str:
    """The worst of the ranks' statuses: warning or critical if any is, else unknown (-1)
    if any rank could not look, else healthy. A plain max would say healthy beside a rank
    that did not look."""
    return f"max({status}) > 0 or min({status}) < 0 or max({status})"


def _status_panels(o: KitOptions) -> list[Any]:
    stall = duration_seconds(o.stall_after, "stall_after")
    health_mappings: list[
        model.ValueMap | model.RangeMap | model.RegexMap | model.SpecialValueMap
    ] = [
        model.ValueMap(
            {
                "-1": model.ValueMappingResult(text="unknown", color=GREY, index=0),
                "0": model.ValueMappingResult(text="healthy", color=GREEN, index=1),
                "1": model.ValueMappingResult(text="warning", color=ORANGE, index=2),
                "2": model.ValueMappingResult(text="critical", color=RED, index=3),
            }
        )
    ]
    health = (
        stat.Panel()
        .datasource(_DATASOURCE)
        .reduce_options(_LAST)
        .title("Health of the latest update")
        .description(
            "Worst of NaN and Inf in the most recent update, worst of the ranks: 0 healthy, "
            "1 warning, 2 critical; -1 unknown: gradtel could not scan it on a rank (and no "
            "rank is warning or critical), or no update yet."
        )
        .unit("none")
        .with_target(_query(_worst_status(f"{UPDATE_STATUS}{{{_SELECT}}}"), "health", instant=True))
        .thresholds(_steps((None, GREY), (0, GREEN), (1, ORANGE), (2, RED)))
        .mappings(health_mappings)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .grid_pos(_grid(0, 1, 5, 4))
    )
    panels = [health]
    for x, (kind, label) in zip((5, 10), (("nan", "NaN"), ("inf", "Inf"))):
        panels.append(
            stat.Panel()
            .datasource(_DATASOURCE)
            .reduce_options(_LAST)
            .title(f"{label} in the latest update")
            .description(
                f"{label} gradient values in the most recent update, whole model: warning above "
                f"{o.thresholds.warning}, critical above {o.thresholds.critical}."
            )
            .unit("none")
            .with_target(_query(f"sum({UPDATE_GRADS[kind]}{{{_SELECT}}})", label, instant=True))
            .thresholds(count_steps(o))
            .color_mode(common.BigValueColorMode.BACKGROUND)
            .grid_pos(_grid(x, 1, 5, 4))
        )
    panels.append(
        stat.Panel()
        .datasource(_DATASOURCE)
        .reduce_options(_LAST)
        .title("Time since the last update")
        .description(f"Red after {o.stall_after}, when GradtelTrainingStalled fires.")
        .unit("s")
        .with_target(
            _query(f"time() - max({LAST_UPDATE_TIMESTAMP}{{{_SELECT}}})", "since", instant=True)
        )
        .thresholds(_steps((None, GREEN), (stall, RED)))
        .grid_pos(_grid(15, 1, 5, 4))
    )
    panels.append(
        stat.Panel()
        .datasource(_DATASOURCE)
        .reduce_options(_LAST)
        .title("Updates per second")
        .unit("ops")
        .with_target(_query(f"sum(rate({UPDATES}{{{_SELECT}}}[$__rate_interval]))", "updates/s"))
        .grid_pos(_grid(20, 1, 4, 4))
    )
    return panels


def _moved(series: str, window: str) -> str:
    """How much a counter moved in ``window``, counting a series born within it from 0:
    per-layer series appear with their first bad update (``layer_series="on_demand"``).
    Born means no sample in the window before, which a failed scrape does not fake."""
    return f"(increase({series}[{window}]) or ({series} unless last_over_time({series}[{window}] offset {window})))"


def _row(title: str, y: int) -> dashboard.Row:
    return dashboard.Row(title).grid_pos(_grid(0, y, 24, 1))


def _timeseries(
    title: str, unit: str, expr: str, legend: str, grid: model.GridPos, description: str
) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .datasource(_DATASOURCE)
        .title(title)
        .description(description)
        .unit(unit)
        .with_target(_query(expr, legend))
        .grid_pos(grid)
    )


def _dashboard(o: KitOptions) -> dashboard.Dashboard:
    nonfinite = (
        f"sum by (layer) {_moved(f'{NAN_GRADS}{{{_LAYERS}}}', '$__range')}"
        f" + sum by (layer) {_moved(f'{INF_GRADS}{{{_LAYERS}}}', '$__range')}"
    )
    board = (
        dashboard.Dashboard("gradtel: gradient health")
        .uid(DASHBOARD_UID)
        .description(
            "NaN and Inf gradient values per update, layer and rank, from gradtel. "
            f"Rendered by `gradtel render` from Thresholds(warning={o.thresholds.warning}, "
            f"critical={o.thresholds.critical})."
        )
        .tags(["gradtel", "training"])
        .editable()
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(_variable("job", f'label_values({UPDATES}{{job=~".*"}}, job)', "Job"))
        .with_variable(
            _variable("instance", f'label_values({UPDATES}{{job=~"$job"}}, instance)', "Instance")
        )
        .with_variable(
            _variable(
                "rank",
                f'label_values({UPDATES}{{job=~"$job", instance=~"$instance"}}, rank)',
                "Rank",
            )
        )
        .with_variable(
            _variable(
                "layer",
                f'label_values({{__name__=~"{NAN_GRADS}|{INF_GRADS}", {_SELECT}}}, layer)',
                "Layer",
            )
        )
        .with_row(_row("Status", 0))
    )
    for panel in _status_panels(o):
        board = board.with_panel(panel)
    board = board.with_row(_row("Unhealthy updates", 5))
    board = board.with_panel(
        _timeseries(
            "Unhealthy updates by kind and severity",
            "short",
            f"sum by (kind, severity) (increase({UNHEALTHY_UPDATES}{{{_SELECT}}}[$__rate_interval]))",
            "{{kind}} {{severity}}",
            _grid(0, 6, 8, 8),
            "From the counter, so an unhealthy update between two scrapes still shows.",
        )
    )
    for x, (kind, label) in zip((8, 16), (("nan", "NaN"), ("inf", "Inf"))):
        board = board.with_panel(
            _timeseries(
                f"{label} values per layer",
                "short",
                f"sum by (layer) {_moved(f'{GRADS_TOTAL[kind]}{{{_LAYERS}}}', '$__rate_interval')} > 0",
                "{{layer}}",
                _grid(x, 6, 8, 8),
                f"{label} gradient values per layer in each interval; layers with none are hidden.",
            )
        )
    board = board.with_row(_row("Where", 14))
    board = board.with_panel(
        table.Panel()
        .datasource(_DATASOURCE)
        .title("Top layers by non-finite values in the selected range")
        .unit("short")
        .with_target(
            _query(f"topk(10, ({nonfinite}) > 0)", "{{layer}}", instant=True, table_format=True)
        )
        .grid_pos(_grid(0, 15, 12, 8))
    )
    board = board.with_panel(
        _timeseries(
            "Non-finite values by rank",
            "short",
            f"sum by (rank) {_moved(f'{NAN_GRADS}{{{_SELECT}}}', '$__rate_interval')}"
            f" + sum by (rank) {_moved(f'{INF_GRADS}{{{_SELECT}}}', '$__rate_interval')}",
            "rank {{rank}}",
            _grid(12, 15, 12, 8),
            "Which rank produces the non-finite gradients (no rank label: a single process).",
        )
    )
    board = board.with_row(_row("gradtel itself", 23))
    for x, (quantile, name) in zip((0, 6), (("0.5", "p50"), ("0.99", "p99"))):
        board = board.with_panel(
            _timeseries(
                f"Scan duration, {name}",
                "s",
                f"histogram_quantile({quantile}, sum by (le) (rate({SCAN_DURATION}_bucket{{{_SELECT}}}[$__rate_interval])))",
                name,
                _grid(x, 24, 6, 7),
                "Time gradtel spends per update: its own overhead.",
            )
        )
    board = board.with_panel(
        _timeseries(
            "Update rate",
            "ops",
            f"sum(rate({UPDATES}{{{_SELECT}}}[$__rate_interval]))",
            "updates/s",
            _grid(12, 24, 6, 7),
            "Scanned updates per second, next to the overhead.",
        )
    )
    board = board.with_panel(
        _timeseries(
            "Failures inside gradtel",
            "short",
            f"sum by (stage) (increase({ERRORS}{{{_SELECT}}}[$__rate_interval]))",
            "{{stage}}",
            _grid(18, 24, 6, 7),
            "Training went on; see the process log.",
        )
    )
    board = board.with_row(_row("Coverage", 31))
    board = board.with_panel(
        _timeseries(
            "Updates not scanned",
            "short",
            f"sum by (reason) (increase({UNSCANNED_UPDATES}{{{_SELECT}}}[$__rate_interval]))",
            "{{reason}}",
            _grid(0, 32, 12, 7),
            "Due updates gradtel could not look at (GradtelNothingScanned): no_gradients means "
            "collect() ran before backward() or after zero_grad(); scan_error, see the log.",
        )
    )
    board = board.with_panel(
        _timeseries(
            "Updates skipped",
            "short",
            f"sum by (reason) (increase({SKIPPED_UPDATES}{{{_SELECT}}}[$__rate_interval]))",
            "{{reason}}",
            _grid(12, 32, 12, 7),
            "amp_overflow: the GradScaler skipped the step (a few at the start of an fp16 run are "
            "normal; GradtelAmpOverflowSkips fires when it keeps on); policy: gradtel's own skip.",
        )
    )
    board = board.with_row(_row("Alerts", 39))
    board = board.with_panel(
        table.Panel()
        .datasource(_DATASOURCE)
        .title("Firing gradtel alerts")
        .unit("short")
        .with_target(
            _query(
                'ALERTS{alertstate="firing", alertname=~"Gradtel.*", job=~"$job"}',
                "{{alertname}} {{severity}}",
                instant=True,
                table_format=True,
            )
        )
        .grid_pos(_grid(0, 40, 24, 6))
    )
    board = board.with_row(_row("Early warning", 46))
    return board.with_panel(_norm_panel(o))


def _norm_panel(o: KitOptions) -> timeseries.Panel:
    """The gradient norm, its recent peak and the threshold ``GradtelGradNormSpike`` fires above."""
    by_rank = "max by (rank)"
    queries = [
        (f"{by_rank} ({GRAD_NORM}{{{_SELECT}}})", "norm {{rank}}"),
        (f"{by_rank} ({GRAD_NORM_PEAK}{{{_SELECT}}})", "peak {{rank}}"),
        (
            f"{o.spike_factor:g} * {by_rank} (quantile_over_time(0.5, {GRAD_NORM}{{{_SELECT}}}[{o.spike_baseline}]))",
            "spike threshold {{rank}}",
        ),
    ]
    panel = (
        timeseries.Panel()
        .datasource(_DATASOURCE)
        .title("Gradient norm and spike threshold")
        .description(
            f"L2 norm of all gradients, its peak over the last couple of minutes, and "
            f"{o.spike_factor:g} times its median over {o.spike_baseline}: {NORM_SPIKE_ALERT} "
            "fires when the peak crosses the threshold. Exported when the loop clips with "
            "gradtel.clip_grad_norm_ or the monitor has grad_norm=True."
        )
        .unit("none")
        .grid_pos(_grid(0, 47, 24, 8))
    )
    for ref, (expr, legend) in zip("ABC", queries):
        panel = panel.with_target(_query(expr, legend).ref_id(ref))
    return panel


def dashboard_json(o: KitOptions) -> str:
    """The dashboard as Grafana JSON."""
    encoded = JSONEncoder(sort_keys=True, indent=2).encode(_dashboard(o).build())
    # Panel ids in order, so that the file is stable and every id is unique.
    board = json.loads(encoded)
    for number, panel in enumerate(board["panels"], start=1):
        panel["id"] = number
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


def datasource_provisioning(prometheus_url: str) -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus (gradtel)",
                "uid": DATASOURCE_UID,
                "type": "prometheus",
                "access": "proxy",
                "url": prometheus_url,
                "isDefault": True,
                "jsonData": {"timeInterval": "5s"},
            }
        ],
    }


def dashboard_provisioning(path: str) -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "gradtel",
                "folder": "gradtel",
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": True,
                "options": {"path": path},
            }
        ],
    }
