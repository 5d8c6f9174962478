"""Scale-out reference: Prometheus agents scrape the ranks and remote-write to one central
store that evaluates gradtel's rules, either a central Prometheus with its remote-write
receiver or VictoriaMetrics with vmalert. Same rules, same routing, same page.

The flags that keep the page fast and its text complete are defined here once: the
rendered ``scale-out/README.md`` prints them and gradtel's test stack runs with them.
"""

from __future__ import annotations

from typing import Any

from .options import KitOptions
from .prometheus import scrape_config

__all__ = [
    "AGENT_BATCH_DEADLINE",
    "AGENT_FLAGS",
    "VM_LATENCY_OFFSET",
    "agent_config",
    "agent_flags",
    "central_prometheus_config",
    "central_prometheus_flags",
    "scale_out_readme",
    "victoriametrics_flags",
    "vmalert_flags",
]

AGENT_BATCH_DEADLINE = "1s"
"""How long an agent holds samples before it remote-writes them. One rank's few dozen
series never fill a batch, so Prometheus' default (5 s) would add 5 s to every page."""

VM_LATENCY_OFFSET = "12s"
"""How far back VictoriaMetrics moves a query close to now, so that it reads complete
data. VictoriaMetrics adds new series to its index of the current hour every 10 s, and
gradtel's per-layer series are born with the NaN update: a query closer to now than that
can miss them, and the page would name no layer. Below the default (30 s) all the same."""

CENTRAL_PROMETHEUS_WRITE_URL = "http://central-prometheus:9090/api/v1/write"
VICTORIAMETRICS_WRITE_URL = "http://victoria-metrics:8428/api/v1/write"


AGENT_FLAGS = {2: "--enable-feature=agent", 3: "--agent"}
"""Prometheus' agent mode, by major version: 3.0 replaced the feature flag by ``--agent``,
which 2.x refuses."""


def agent_flags(version: tuple[int, ...] = (3,)) -> list[str]:
    """The flags of a Prometheus agent of ``version`` (``prometheus --version``)."""
    return [AGENT_FLAGS[2] if version[0] < 3 else AGENT_FLAGS[3]]


def central_prometheus_flags() -> list[str]:
    return ["--web.enable-remote-write-receiver"]


def victoriametrics_flags() -> list[str]:
    return [f"-search.latencyOffset={VM_LATENCY_OFFSET}"]


def vmalert_flags(store: str, alertmanager: str, evaluation_interval: str) -> list[str]:
    """vmalert reads from and writes its recording rules' results to ``store`` (a URL)."""
    return [
        f"-datasource.url={store}",
        f"-remoteWrite.url={store}",
        f"-notifier.url={alertmanager}",
        f"-evaluationInterval={evaluation_interval}",
    ]


def agent_config(o: KitOptions, write_url: str = CENTRAL_PROMETHEUS_WRITE_URL) -> dict[str, Any]:
    """An agent's config: the ranks' scrape job of ``prometheus-ranks.yml``, remote-written."""
    ranks = scrape_config(o, ranks=True)
    for job in ranks["scrape_configs"]:
        for discovery in job.get("file_sd_configs", []):
            discovery["files"] = [f"../prometheus/{f}" for f in discovery["files"]]
    return {
        "global": {"scrape_interval": ranks["global"]["scrape_interval"]},
        "scrape_configs": ranks["scrape_configs"],
        "remote_write": [
            {"url": write_url, "queue_config": {"batch_send_deadline": AGENT_BATCH_DEADLINE}}
        ],
    }


def central_prometheus_config(o: KitOptions) -> dict[str, Any]:
    """The central Prometheus: no scraping of its own, gradtel's rules over what agents write."""
    return {
        "global": {"evaluation_interval": o.evaluation_interval},
        "rule_files": ["../prometheus/gradtel-rules.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": ["alertmanager:9093"]}]}]},
    }


def _command(binary: str, flags: list[str]) -> str:
    return " \\\n  ".join([binary, *flags])


def scale_out_readme(o: KitOptions) -> str:
    agent = _command(
        "prometheus",
        ["--config.file=prometheus-agent.yml", *agent_flags(), "--storage.agent.path=agent-data"],
    )
    central = _command(
        "prometheus",
        [
            "--config.file=central-prometheus.yml",
            *central_prometheus_flags(),
            "--storage.tsdb.path=data",
        ],
    )
    victoria = _command("victoria-metrics", ["-storageDataPath=vm-data", *victoriametrics_flags()])
    vmalert = _command(
        "vmalert",
        [
            "-rule=../prometheus/gradtel-rules.yml",
            *vmalert_flags(
                "http://victoria-metrics:8428", "http://alertmanager:9093", o.evaluation_interval
            ),
        ],
    )
    return f"""# Many ranks: agents, and one central store that evaluates the rules

Rendered by `gradtel render`; job `{o.job}`, window {o.window}. One Prometheus that
scrapes every rank and evaluates gradtel's rules is enough for a few hundred ranks
(see docs/many-ranks.md for the numbers). Past that, or when the ranks
live in several clusters, split scraping from evaluation with the engines you
already run, not a home-made aggregator:

```
ranks (/metrics) --scrape--> Prometheus agents --remote write--> central store --> Alertmanager
                              (one per node group)                (rules)            (one page)
```

The rules, the routing (`../prometheus/gradtel-rules.yml`,
`../prometheus/alertmanager.yml`) and therefore the page are the same as with
one Prometheus: every alert is one per job and run, counted over all ranks.

## Agents

`prometheus-agent.yml` scrapes the ranks (static targets and file discovery,
as `../prometheus/prometheus-ranks.yml`) and remote-writes everything. Give
each agent its share of the targets.

```
{agent}
```

`{AGENT_FLAGS[3]}` is Prometheus 3.x's agent mode; Prometheus 2.x (Debian 12's 2.42) takes
`{AGENT_FLAGS[2]}` instead, which 3.0 removed.

`batch_send_deadline: {AGENT_BATCH_DEADLINE}` in its `remote_write`: a rank's few dozen series
never fill a batch, and the default deadline (5 s) would add 5 s to every page.

## Central store, either

### A central Prometheus with the remote-write receiver

```
{central}
```

`central-prometheus.yml` scrapes nothing itself; it evaluates the rules every
{o.evaluation_interval} and sends to Alertmanager. Its default resend delay (1m) is fine: an
unhealthy-update alert fires {o.settle} after it is first seen, once every rank's scrape
(and the agents' {AGENT_BATCH_DEADLINE} batch) is in, so its first notification is complete.

### VictoriaMetrics and vmalert

Point the agents' `remote_write` at `{VICTORIAMETRICS_WRITE_URL}`, then:

```
{victoria}

{vmalert}
```

- `-search.latencyOffset={VM_LATENCY_OFFSET}`: VictoriaMetrics moves a query closer than this to
  now back by this much, so that it reads complete data. It must cover the agents'
  batch deadline and VictoriaMetrics' own 10 s refresh of its index of the current
  hour's series: gradtel's per-layer series are born with the NaN update, and a
  query that cannot see them yet gives a page that names no layer ("none in the
  counters yet"). The default, 30 s, would add 30 s to every page.
- `-remoteWrite.url`: where vmalert writes the results of gradtel's recording rules.
- `-evaluationInterval={o.evaluation_interval}`: as the rules' own interval (vmalert's default is 1m).

## Kubernetes

With the Prometheus Operator, the `PodMonitor` and `PrometheusRule` of
`../kubernetes/` select the training pods and carry the same rules. For large
jobs, shard scraping (`spec.shards` of the `Prometheus` resource, or
`PrometheusAgent` resources remote-writing to one store) and evaluate the
rules once, centrally: a sharded Prometheus that evaluates rules sees only its
shard of the ranks, and would page once per shard.
"""
