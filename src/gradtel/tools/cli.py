"""The ``gradtel`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

_DEPLOY_MODULES = ("yaml", "grafana_foundation_sdk")
"""What ``gradtel render`` and ``gradtel demo --stack`` need beyond the core install."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradtel", description="NaN/Inf gradient telemetry for PyTorch, for Prometheus."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a small model with injected NaN/Inf gradients while serving /metrics",
        description=(
            "Train a small model on synthetic data on the CPU, inject 3 NaN into body.0 on "
            "updates 10, 35, 60... (warning) and 7 Inf into head on updates 20, 45, 70... "
            "(critical), and serve the metrics on a Prometheus endpoint."
        ),
    )
    demo.add_argument("--steps", type=_positive_int, default=300, help="updates to run (300)")
    demo.add_argument(
        "--interval", type=_non_negative_float, default=0.2, help="seconds between updates (0.2)"
    )
    demo.add_argument(
        "--port",
        type=int,
        default=None,
        help="metrics port; 0 picks a free one ($GRADTEL_PORT or 9464)",
    )
    demo.add_argument("--addr", default=None, help="bind address ($GRADTEL_ADDR or 127.0.0.1)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument(
        "--stack",
        nargs="?",
        const="prometheus",
        choices=["prometheus", "agent", "victoriametrics"],
        default=None,
        help="also run Prometheus and Alertmanager (Debian packages prometheus, "
        "prometheus-alertmanager) with the shipped configs and print each page; 'agent' "
        "scrapes through a Prometheus agent into a central Prometheus, 'victoriametrics' "
        "into VictoriaMetrics with vmalert (package victoria-metrics): the scale-out set-up",
    )
    demo.add_argument(
        "--keep-data", type=Path, default=None, help="with --stack: keep configs and data here"
    )

    watch = commands.add_parser(
        "watch",
        help="show the status of gradtel endpoints in the terminal",
        description="Scrape gradtel endpoints and show their status banner, refreshed in place.",
    )
    watch.add_argument(
        "urls",
        nargs="*",
        metavar="URL",
        help="metrics URLs (default http://127.0.0.1:9464/metrics)",
    )
    watch.add_argument(
        "--interval", type=_positive_float, default=1.0, help="seconds between refreshes (1)"
    )
    watch.add_argument("--once", action="store_true", help="show one refresh and exit")
    watch.add_argument("--warning", type=int, default=0, help="warning when a count is > this (0)")
    watch.add_argument(
        "--critical", type=int, default=5, help="critical when a count is > this (5)"
    )

    incidents = commands.add_parser(
        "incidents",
        help="merge the ranks' incident records (GradMonitor(incident_log=...)) into one timeline",
        description=(
            "Print the incidents of every file given, one timeline in step order (then time, "
            "then rank); a file's rotated PATH.1 (its older incidents) is read with it; a line "
            "that is not a record is reported on stderr and skipped."
        ),
    )
    incidents.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="incident files")
    incidents.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="also draw the counts per layer and the gradient norm over steps (needs matplotlib)",
    )

    render = commands.add_parser(
        "render",
        help="write the deploy kit (alert rules, rule tests, Alertmanager, scrape configs, runbook)",
        description=(
            "Render the deploy kit from one set of thresholds. Use the same thresholds as "
            "GradMonitor(thresholds=...) in training."
        ),
    )
    render.add_argument("--out", required=True, help="output folder (e.g. deploy)")
    render.add_argument("--warning", type=int, default=0, help="warning when a count is > this (0)")
    render.add_argument(
        "--critical", type=int, default=5, help="critical when a count is > this (5)"
    )
    render.add_argument(
        "--window", default="10m", help="how long an alert fires after the last bad update (10m)"
    )
    render.add_argument(
        "--stall-after", default="10m", help="no update for this long fires the stall alert (10m)"
    )
    render.add_argument("--job", default="gradtel", help="Prometheus job name (gradtel)")
    render.add_argument(
        "--runbook-url", default=None, help="where the rendered runbook.md is published"
    )
    render.add_argument(
        "--amp-skip-ratio",
        type=float,
        default=0.5,
        help="GradtelAmpOverflowSkips fires above this share of AMP-skipped updates (0.5)",
    )
    render.add_argument(
        "--amp-scale-floor",
        type=float,
        default=None,
        help="GradtelAmpLossScaleCollapsed pages when the AMP loss scale falls below this (1)",
    )
    render.add_argument(
        "--spike-factor",
        type=float,
        default=None,
        help="GradtelGradNormSpike fires when the gradient norm exceeds this many times its median (10)",
    )
    render.add_argument("--spike-baseline", default=None, help="the window of that median (1h)")
    render.add_argument(
        "--spike-history",
        default=None,
        help="norms a rank must have reported for before it is judged (10m)",
    )
    render.add_argument(
        "--targets",
        type=lambda text: text.split(","),
        default=None,
        metavar="HOST:PORT[,...]",
        help="the gradtel endpoints of your training processes that prometheus.yml scrapes (127.0.0.1:9464)",
    )
    render.add_argument(
        "--alertmanager",
        default=None,
        metavar="HOST:PORT",
        help="where Prometheus sends alerts (127.0.0.1:9093)",
    )
    render.add_argument(
        "--pager-url", default=None, metavar="URL", help="webhook of the critical alerts"
    )
    render.add_argument(
        "--chat-url", default=None, metavar="URL", help="webhook of the warning alerts"
    )
    render.add_argument(
        "--scrape-interval", default=None, help="how often Prometheus scrapes the targets (5s)"
    )
    render.add_argument(
        "--evaluation-interval", default=None, help="how often Prometheus evaluates the rules (5s)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradtel`` command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"gradtel {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "render":
            return _render(args)
        if args.command == "incidents":
            from .incidents import run

            return run(args.paths, args.plot)
        if args.command == "watch":
            from ..health import Thresholds
            from .terminal import DEFAULT_URL, watch

            return watch(
                args.urls or [DEFAULT_URL],
                interval=args.interval,
                once=args.once,
                thresholds=Thresholds(warning=args.warning, critical=args.critical),
            )
        from .demo import run_demo

        return run_demo(
            steps=args.steps,
            interval=args.interval,
            port=args.port,
            addr=args.addr,
            seed=args.seed,
            stack=args.stack,
            keep_data=args.keep_data,
        )
    except ModuleNotFoundError as exc:
        if exc.name not in _DEPLOY_MODULES:
            raise
        print(
            f"gradtel {args.command}: needs the deploy extra ({exc.name} is not installed): "
            "pip install 'gradtel[deploy]'",
            file=sys.stderr,
        )
        return 1
    except (OSError, ValueError, TypeError) as exc:
        print(f"gradtel {args.command}: {exc}", file=sys.stderr)
        return 1


def _render(args: argparse.Namespace) -> int:
    from ..health import Thresholds
    from ..render import DEFAULT_RUNBOOK_URL, KitOptions, write_kit

    given = {
        name: getattr(args, name)
        for name in (
            "amp_scale_floor",
            "spike_factor",
            "spike_baseline",
            "spike_history",
            "targets",
            "alertmanager",
            "pager_url",
            "chat_url",
            "scrape_interval",
            "evaluation_interval",
        )
        if getattr(args, name) is not None
    }  # left out: KitOptions' defaults
    options = KitOptions(
        **given,
        thresholds=Thresholds(warning=args.warning, critical=args.critical),
        window=args.window,
        stall_after=args.stall_after,
        job=args.job,
        runbook_url=args.runbook_url or DEFAULT_RUNBOOK_URL,
        amp_skip_ratio=args.amp_skip_ratio,
    )
    for path in write_kit(args.out, options):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
