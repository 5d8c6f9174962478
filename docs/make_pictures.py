"""Regenerate docs/dashboard.png, docs/watch.txt and docs/incidents.png from live data.

Runs `gradtel demo` scraped by a real Prometheus (Debian package), executes the
committed dashboard's own panel queries, and draws the main panels with
matplotlib: a rendering of the dashboard's queries, not a Grafana screenshot
(no Grafana server runs on the machines gradtel is built on). Then captures one
`gradtel watch` screen from a pseudo-terminal. Then runs docs/incident_job.py, a 2-rank
torchrun job with `GRADTEL_INCIDENT_LOG` set, and draws its records with
`gradtel incidents --plot`.

    .venv/bin/pip install matplotlib && .venv/bin/python docs/make_pictures.py
    .venv/bin/python docs/make_pictures.py incidents    # docs/incidents.png only
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gradtel.tools.stack import Stack, StackTimings, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BOARD = json.loads((ROOT / "deploy/grafana/dashboards/gradtel.json").read_text())
SECONDS = 90


def substitute(expr: str, instance: str) -> str:
    values = {"job": "gradtel", "instance": instance, "rank": ".*", "layer": ".*", "__rate_interval": "4s", "__range": f"{SECONDS}s"}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def query(stack: Stack, expr: str, instance: str, *, instant: bool) -> list[dict]:
    now = time.time()
    params = {"query": substitute(expr, instance)}
    if instant:
        path = "query"
        params["time"] = str(now)
    else:
        path = "query_range"
        params.update(start=str(now - SECONDS), end=str(now), step="1")
    with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/{path}?{urllib.parse.urlencode(params)}") as r:
        return json.load(r)["data"]["result"]


def panel(title: str) -> dict:
    return next(p for p in BOARD["panels"] if p["title"] == title)


def draw(stack: Stack, instance: str) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    fig.suptitle(
        "Rendering of the gradtel dashboard's panel queries (matplotlib, not Grafana), on live data from `gradtel demo`",
        fontsize=12,
    )
    stats = axes[0][0]
    stats.axis("off")
    stats.set_title("Status row")
    for row, title in enumerate(["Health of the latest update", "NaN in the latest update", "Inf in the latest update", "Time since the last update", "Updates per second"]):
        p = panel(title)
        result = query(stack, p["targets"][0]["expr"], instance, instant=p["targets"][0].get("instant", False))
        value = float(result[0]["value"][1] if "value" in result[0] else result[0]["values"][-1][1]) if result else float("nan")
        steps = p["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [{"value": None, "color": "green"}])
        color = [s["color"] for s in steps if s["value"] is None or value >= s["value"]][-1]
        unit = p["fieldConfig"]["defaults"]["unit"]
        text = {0: "healthy", 1: "warning", 2: "critical"}.get(int(value), "?") if title.startswith("Health") else f"{value:.2f} {unit}".replace(" none", "")
        stats.text(0.0, 0.85 - row * 0.2, title, fontsize=10, transform=stats.transAxes)
        stats.text(0.75, 0.85 - row * 0.2, text, fontsize=11, weight="bold", transform=stats.transAxes,
                   bbox={"facecolor": {"green": "#73bf69", "orange": "#ff9830", "red": "#f2495c"}[color], "alpha": 0.8})
    for ax, title in zip(
        [axes[0][1], axes[0][2], axes[1][0], axes[1][2]],
        ["Unhealthy updates by kind and severity", "NaN values per layer", "Inf values per layer", "Scan duration, p99"],
    ):
        p = panel(title)
        for series in query(stack, p["targets"][0]["expr"], instance, instant=False):
            times = [float(t) - time.time() for t, _ in series["values"]]
            legend = re.sub(r"\{\{(\w+)\}\}", lambda m: series["metric"].get(m.group(1), ""), p["targets"][0]["legendFormat"])
            ax.plot(times, [float(v) for _, v in series["values"]], label=legend, drawstyle="steps-post")
        ax.set_title(title)
        ax.set_xlabel("seconds ago")
        ax.set_ylabel(p["fieldConfig"]["defaults"]["unit"])
        ax.legend(fontsize=8, loc="upper left")
    top = panel("Top layers by non-finite values in the selected range")
    rows = query(stack, top["targets"][0]["expr"], instance, instant=True)
    ax = axes[1][1]
    names = [r["metric"]["layer"] for r in rows]
    ax.barh(names, [float(r["value"][1]) for r in rows], color="#f2495c")
    ax.set_title(f"Top layers by non-finite values, last {SECONDS}s")
    fig.tight_layout()
    fig.savefig(ROOT / "docs/dashboard.png", dpi=80)


def capture_watch(url: str) -> str:
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "gradtel.tools.cli", "watch", url, "--interval", "0.1"], stdout=slave, stderr=slave)
    os.close(slave)
    screen = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            screen += os.read(master, 65536).decode(errors="replace")
        frames = screen.split("\033[H\033[2J")
        if len(frames) > 2 and "NaN:3" in frames[-2]:
            process.terminate()
            process.wait()
            os.close(master)
            return re.sub(r"\033\[[0-9;]*m", "", frames[-2]).replace("\r", "")
    raise RuntimeError("no warning frame seen")


def incidents_picture() -> None:
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "GRADTEL_INCIDENT_LOG": f"{folder}/incidents.jsonl", "GRADTEL_RUN": "docs-example"}
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), str(ROOT / "docs/incident_job.py")],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        files = sorted(Path(folder).glob("incidents.rank*.jsonl"))
        subprocess.run(
            [sys.executable, "-m", "gradtel.tools.cli", "incidents", *map(str, files), "--plot", str(ROOT / "docs/incidents.png")],
            check=True,
        )


def main() -> None:
    if sys.argv[1:] == ["incidents"]:
        incidents_picture()
        return
    port = free_port()
    instance = f"127.0.0.1:{port}"
    demo = subprocess.Popen([sys.executable, "-m", "gradtel.tools.cli", "demo", "--port", str(port), "--interval", "0.1", "--steps", "100000"], stdout=subprocess.DEVNULL)
    try:
        with Stack([instance], timings=StackTimings("1s", "1s", "5s", "5s")) as stack:
            time.sleep(SECONDS)
            draw(stack, instance)
            (ROOT / "docs/watch.txt").write_text(capture_watch(f"http://{instance}/metrics"))
    finally:
        demo.terminate()
        demo.wait()
    incidents_picture()
    print("wrote docs/dashboard.png, docs/watch.txt and docs/incidents.png")


if __name__ == "__main__":
    main()
