"""The Grafana dashboard, checked without a Grafana server: structure, conventions, and
every panel query run against a live Prometheus that scraped a real `gradtel demo`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradtel import Thresholds
from gradtel.render.grafana import DASHBOARD_UID, DATASOURCE_UID
from gradtel.tools.stack import Stack, StackTimings, free_port

from .conftest import require_tool
from .prometheus_versions import VERSIONS, bin_folder

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
BOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "gradtel.json").read_text())
PANELS = [p for p in BOARD["panels"] if p["type"] != "row"]
VARIABLES = {v["name"]: v for v in BOARD["templating"]["list"]}
BUILTINS = {"__rate_interval", "__range", "__interval"}


def targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in PANELS for target in panel["targets"]]


def test_dashboard_model() -> None:
    assert BOARD["uid"] == DASHBOARD_UID
    assert BOARD["title"] == "gradtel: gradient health"
    assert BOARD["refresh"] == "10s" and BOARD["time"] == {"from": "now-1h", "to": "now"}
    assert BOARD["schemaVersion"] >= 39
    assert VARIABLES["datasource"]["type"] == "datasource"
    assert VARIABLES["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "rank", "layer"):
        variable = VARIABLES[name]
        assert variable["type"] == "query" and variable["query"].startswith("label_values(")
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variable["includeAll"] and variable["allValue"] == ".*"


def test_panel_ids_are_unique_and_the_grid_does_not_overlap() -> None:
    ids = [p["id"] for p in BOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in BOARD["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_every_panel_has_a_unit_and_the_datasource_variable() -> None:
    for panel in PANELS:
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    assert "${DS_" not in json.dumps(BOARD)


def test_every_variable_used_is_defined() -> None:
    for panel, target in targets():
        for name in re.findall(r"\$\{?(\w+)", target["expr"]):
            assert name in VARIABLES or name in BUILTINS, (panel["title"], name)
    for variable in VARIABLES.values():
        for name in re.findall(
            r"\$\{?(\w+)",
            variable.get("query", "") if isinstance(variable.get("query"), str) else "",
        ):
            assert name in VARIABLES, (variable["name"], name)


def test_count_thresholds_equal_the_thresholds() -> None:
    t = Thresholds()
    for kind in ("NaN", "Inf"):
        panel = next(p for p in PANELS if p["title"] == f"{kind} in the latest update")
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [(s["value"], s["color"]) for s in steps] == [
            (None, "green"),
            (t.warning + 1, "orange"),
            (t.critical + 1, "red"),
        ]


def test_queries_follow_the_conventions() -> None:
    counter = re.compile(r"(\w+_(?:total|bucket))\{[^}]*\}(\[[^\]]*\])?")
    for panel, target in targets():
        expr = target["expr"]
        if not expr.startswith("ALERTS"):
            for label in ("job", "instance", "rank"):
                assert f'{label}=~"${label}"' in expr, (panel["title"], label)
        for match in counter.finditer(expr):
            before, after = expr[: match.start()], expr[match.end() :]
            # The one exception: a series born within the window (no sample in the window
            # before) counts from 0, `(increase(X[w]) or (X unless last_over_time(X[w] offset w)))`.
            if match.group(2) is None:
                assert after.startswith(" unless last_over_time("), (panel["title"], match.group(0))
                assert re.search(
                    r"increase\(" + re.escape(match.group(0)) + r"\[\$__\w+\]\) or \($", before
                )
                continue
            if before.endswith(" unless last_over_time("):
                assert re.match(r" offset \$__(rate_interval|range)\)", after), (
                    panel["title"],
                    match.group(0),
                )
                continue
            assert re.search(r"(rate|increase)\($", before), (panel["title"], match.group(1))
            assert match.group(2) in ("[$__rate_interval]", "[$__range]"), (
                panel["title"],
                match.group(0),
            )


@pytest.mark.parametrize("version", VERSIONS)
def test_health_says_unknown_when_a_rank_could_not_look(version: str, tmp_path: Path) -> None:
    """The health panel's query, run by promtool on the ranks' statuses: the worst one, and
    unknown rather than healthy when a rank did not look."""
    panel = next(p for p in PANELS if p["title"] == "Health of the latest update")
    (target,) = panel["targets"]
    (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
    shown = {  # the ranks' gradtel_update_status -> what the panel shows
        (0, -1): "unknown", (-1,): "unknown", (0, 0): "healthy", (0,): "healthy",
        (1, -1): "warning", (-1, 2, 0): "critical", (2, 1): "critical",
    }  # fmt: skip
    texts = {text["text"]: int(value) for value, text in mapping["options"].items()}
    tests = [
        {
            "name": f"ranks at {statuses}",
            "interval": "1m",
            "input_series": [
                {
                    "series": f'gradtel_update_status{{job="gradtel",instance="n:{9464 + r}",rank="{r}"}}',
                    "values": f"{status}x3",
                }
                for r, status in enumerate(statuses)
            ],
            "promql_expr_test": [
                {
                    "expr": substitute(target["expr"], ".*"),
                    "eval_time": "2m",
                    "exp_samples": [{"labels": "{}", "value": texts[text]}],
                }
            ],
        }
        for statuses, text in shown.items()
    ]
    (tmp_path / "health.test.yml").write_text(yaml.safe_dump({"rule_files": [], "tests": tests}))
    promtool = bin_folder(version) / "promtool"
    tested = subprocess.run(
        [promtool, "test", "rules", "health.test.yml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_provisioning_and_compose_are_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    mounts: dict[str, Path] = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            host, container = volume.split(":")[:2]
            assert (DEPLOY / host).exists(), host
            mounts[container] = DEPLOY / host

    def inside(container_path: str) -> Path:
        for target, host in mounts.items():
            if container_path == target or container_path.startswith(target + "/"):
                return host / container_path[len(target) :].lstrip("/")
        raise AssertionError(f"{container_path} is not mounted")

    for service in services.values():
        for argument in service.get("command", []):
            if argument.startswith("--config.file="):
                assert inside(argument.split("=", 1)[1]).is_file(), argument

    def port(service: str) -> int:
        return int(services[service]["ports"][0].split(":")[1])

    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/gradtel.yml").read_text()
    )
    source = datasource["datasources"][0]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{port('prometheus')}"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/gradtel.yml").read_text())
    assert inside(provider["providers"][0]["options"]["path"]) == DEPLOY / "grafana" / "dashboards"
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus-compose.yml").read_text())
    assert scrape["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        f"alertmanager:{port('alertmanager')}"
    ]
    assert port("grafana") == 3000


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[Stack, str]]:
    """A real `gradtel demo` (injection schedule) scraped every second by a real Prometheus."""
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    port = free_port()
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gradtel.tools.cli",
            "demo",
            "--port",
            str(port),
            "--interval",
            "0.05",
            "--steps",
            "100000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    instance = f"127.0.0.1:{port}"
    stack = Stack([instance], timings=StackTimings("1s", "1s", "5s", "5s"))
    try:
        stack.start()
        # Poll until every panel can have data: both kinds' alerts fire, and the rate
        # windows (4 s) hold several scrapes.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            firing = {a["metric"]["alertname"] for a in stack.query('ALERTS{alertstate="firing"}')}
            scrapes = stack.query(
                f'count_over_time(gradtel_updates_total{{instance="{instance}"}}[1m])'
            )
            if (
                {"GradtelNaNGradients", "GradtelInfGradients"} <= firing
                and scrapes
                and float(scrapes[0]["value"][1]) >= 5
            ):
                break
            time.sleep(0.5)
        yield stack, instance
    finally:
        demo.terminate()
        demo.communicate(timeout=30)
        stack.stop()


SHARES_LIVE = pytest.mark.xdist_group("dashboard-live")
"""On one pytest-xdist worker (``--dist loadgroup``), which starts the live stack once."""


def substitute(expr: str, instance: str) -> str:
    values = {
        "job": "gradtel",
        "instance": instance,
        "rank": ".*",  # All: one process has no rank label
        "layer": ".*",
        "__rate_interval": "4s",  # Grafana: 4 x the 1 s scrape interval
        "__range": "60s",
    }
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def api(stack: Stack, path: str, **params: str) -> Any:
    url = f"{stack.prometheus_url}/api/v1/{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.slow
@SHARES_LIVE
def test_every_panel_query_returns_data_from_a_live_prometheus(live: tuple[Stack, str]) -> None:
    stack, instance = live
    now = time.time()
    empty = []
    for panel, target in targets():
        expr = substitute(target["expr"], instance)
        if target.get("instant"):
            data = api(stack, "query", query=expr, time=str(now))
        else:
            data = api(
                stack, "query_range", query=expr, start=str(now - 60), end=str(now), step="1"
            )
        if not data["result"]:
            empty.append((panel["title"], expr))
    assert not empty, f"panels without data: {empty}"


@pytest.mark.slow
@SHARES_LIVE
def test_every_variable_query_finds_the_demo(live: tuple[Stack, str]) -> None:
    stack, instance = live

    def values(name: str) -> list[str]:
        found = re.match(r"label_values\((.*), (\w+)\)$", VARIABLES[name]["query"])
        assert found, VARIABLES[name]["query"]
        selector = substitute(found.group(1), instance)
        return list(api(stack, f"label/{found.group(2)}/values", **{"match[]": selector}))

    assert values("job") == ["gradtel"]
    assert values("instance") == [instance]
    assert values("layer") == ["body.0", "head"]  # on demand: the layers that had NaN or Inf
    assert values("rank") == []  # a single process has no rank label; "All" still matches it


def test_the_docs_list_every_panel_with_its_query() -> None:
    readme = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    for panel, target in targets():
        assert f"| {panel['title']} ({panel['type']}) |" in readme, panel["title"]
        assert target["expr"].replace("|", "\\|") in readme, panel["title"]
