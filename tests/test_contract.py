"""The metric contract (``gradtel.metrics``) pinned against a real scrape of a real monitor:
every metric in the table is served with its type, help and labels, and nothing else is."""

from __future__ import annotations

from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradtel
from gradtel import metrics

from .conftest import scrape
from .test_distributed import one_rank_group  # noqa: F401 (a fixture)

README = Path(__file__).resolve().parent.parent / "README.md"
CLOSED_SETS = {
    metrics.ERRORS: ("stage", metrics.ERROR_STAGES),
    metrics.SKIPPED_UPDATES: ("reason", metrics.SKIP_REASONS),
    metrics.UNSCANNED_UPDATES: ("reason", metrics.UNSCANNED_REASONS),
    metrics.ORIGIN_UPDATES: ("kind", metrics.KINDS),
    metrics.REPLICA_FINGERPRINT: ("slot", metrics.REPLICA_SLOTS),
    metrics.REPLICA_FINGERPRINT_UPDATE: ("slot", metrics.REPLICA_SLOTS),
}


def served(registry: CollectorRegistry) -> str:
    """A scrape after updates that make every series exist: NaN and Inf, a NaN loss, the norm,
    an AMP scaler, a refused checkpoint, an uncaught exception; DDP (in a one-rank group) for
    this rank's own norm before the reduction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    monitor = gradtel.GradMonitor(
        ddp,
        meter_provider=gradtel.prometheus_meter_provider(registry),
        on_critical="ignore",
        grad_norm=True,
        layer_norms=True,
    )
    ddp(torch.randn(4, 4)).sum().backward()
    monitor.collect()  # a healthy update: the norm gauges have a finite value
    model.zero_grad()
    x = torch.randn(4, 4)
    x[0, 0] = float("nan")
    loss = model(x).sum()
    loss.backward()
    model[2].bias.grad[0] = float("inf")
    monitor.collect(loss=loss)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(4, 4)).sum()).backward()
    scaler.unscale_(torch.optim.SGD(model.parameters()))
    monitor.collect(scaler=scaler)  # the loss scale gauge
    monitor.allow_checkpoint()
    gradtel.export.telemetry.count_exception(RuntimeError)  # what the chained sys.excepthook does
    for update in (1, 101):  # what two replica checks of a DDP rank record
        monitor._telemetry.record_fingerprint(update, 2**52 - update)
    server = gradtel.serve(port=0, registry=registry, exit_grace=0)
    try:
        assert server.url is not None
        return scrape(server.url)
    finally:
        server.close()
        monitor.close()


def test_every_metric_of_the_contract_is_served_as_the_table_says(
    one_rank_group: None,  # noqa: F811
    registry: CollectorRegistry,
) -> None:
    families = {
        f.name: f
        for f in text_string_to_metric_families(served(registry))
        if f.name.startswith("gradtel_")
    }
    for metric in metrics.METRICS:
        # The parser names a counter's family without its ``_total``.
        family = families.pop(metric.name.removesuffix("_total"), None)
        assert family is not None, f"{metric.name} is not served"
        assert (family.type, family.documentation) == (metric.type, metric.help), metric.name
        labels = (
            {k for s in family.samples for k in s.labels} - set(metrics.PROCESS_LABELS) - {"le"}
        )
        assert labels == set(metric.labels), metric.name
        if metric in CLOSED_SETS:
            label, values = CLOSED_SETS[metric]
            assert sorted(s.labels[label] for s in family.samples) == sorted(values), metric.name
    assert families == {}, f"served but not in gradtel.metrics: {sorted(families)}"


def test_the_readme_names_every_metric() -> None:
    text = README.read_text()
    assert [m.name for m in metrics.METRICS if f"`{m.name}`" not in text] == []
