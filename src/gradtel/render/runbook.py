"""The runbook the alerts link to: one section (anchor) per alert."""

from __future__ import annotations

from .options import ALERT_NAMES, DOWN_ALERT, STALLED_ALERT, KitOptions
from .prometheus import band_text

__all__ = ["runbook"]


def runbook(o: KitOptions) -> str:
    """Markdown runbook for the alerts rendered from ``o``."""
    t = o.thresholds
    sections = [
        f"""# gradtel runbook

Rendered by `gradtel render` from Thresholds(warning={t.warning}, critical={t.critical}),
window={o.window}, stall_after={o.stall_after}, job={o.job}.

Per update, gradtel counts NaN and ±Inf gradient values over the whole model and
judges each kind apart:

| severity | per-update count | meaning |
|----------|------------------|---------|
| healthy  | at most {t.warning} | no numerical instability |
| warning  | {band_text(o, "warning")} | minor NaN/Inf presence: watch closely |
| critical | {band_text(o, "critical")} | training integrity compromised |

Warning alerts go to chat, critical ones page; a critical alert inhibits the
warning alert of the same job, instance, rank and kind. An unhealthy-update
alert keeps firing for {o.window} after the last unhealthy update, then resolves.

Useful queries (Prometheus or Grafana Explore):

- which layers, now: `topk(5, gradtel_update_nan_grads + gradtel_update_inf_grads)`
- which layers, over the window:
  `topk(5, job_instance_rank_layer:gradtel_nonfinite_grads:increase{o.window})`
- which rank: `sum by (rank) (increase(gradtel_unhealthy_updates_total[{o.window}]))`
- since when: `gradtel_update_status` and `increase(gradtel_updates_total[5m])`
""",
    ]
    for kind, label in (("nan", "NaN"), ("inf", "Inf")):
        other = (
            "NaN usually starts in one layer and spreads backward: the layer *closest "
            "to the output* among those listed is often where it began. A NaN loss makes "
            "every gradient NaN at once."
            if kind == "nan"
            else "Inf means overflow: activations or gradients exceeded the dtype's range "
            "(65504 in fp16). Under AMP a few Inf updates are expected while the loss "
            "scale settles; a steady stream is not."
        )
        sections.append(
            f"""## {ALERT_NAMES[kind]}

**Meaning.** At least one update in the last {o.window} had {label} values in its
gradients: `severity="warning"` for {band_text(o, "warning")} values in one update,
`severity="critical"` for {band_text(o, "critical")}. {other}

**Look first at**

1. *Which layers*: the alert description lists the top layers; the
   `gradtel_update_{kind}_grads` gauges show the latest update per layer.
2. *Which rank*: the `rank` label. One rank alone points at its data shard or its
   hardware; all ranks at once point at the model or the learning rate.
3. *Loss scale* (AMP): a collapsing `GradScaler` scale means repeated overflow.
4. *Learning rate*: did a warm-up end or a schedule step just before?
5. *The data batch*: log the batch indices of the update (`GradHealth.step`)
   and replay them; a corrupt sample or a label out of range is a common cause.

**Do**

- Warning: watch the trend. If it repeats, lower the learning rate, enable
  gradient clipping, or check the layers named.
- Critical: stop or roll back the run to the last healthy checkpoint before
  the weights are damaged, unless `on_critical="skip"` already keeps these
  updates from reaching the optimizer (check `gradtel_unhealthy_updates_total`
  against `gradtel_updates_total`: skipping most updates is not training).
- Fix the cause (data, learning rate, precision, an unstable op such as a
  `log` or `sqrt` of a non-positive value, a division by zero) and resume.
""",
        )
    sections.append(
        f"""## {DOWN_ALERT}

**Meaning.** Prometheus could not scrape a gradtel endpoint for 5 minutes
(`up == 0`), or no target of job `{o.job}` is scraped at all. While this fires,
unhealthy updates of that process cannot page.

**Look first at** the training process (did it exit, crash, or get OOM-killed?),
its log for `gradtel cannot serve /metrics` (a port in use: see
`gradtel_errors_total{{stage="serve"}}` on another endpoint), and the scrape
target list in Prometheus (`/targets`).

**Do** restart the run or fix the endpoint (port, bind address: gradtel binds
`127.0.0.1` unless told `addr="0.0.0.0"`, which a Kubernetes pod needs).
Training that ended on purpose also fires this alert: silence it, or remove
ended targets from discovery.
""",
    )
    sections.append(
        f"""## {STALLED_ALERT}

**Meaning.** The endpoint is up but no update has been scanned for more than
{o.stall_after}: `time() - gradtel_last_update_timestamp_seconds` is too large.

**Look first at** whether the process still uses CPU/GPU (a hang in a collective
operation waiting for another rank, a data loader stuck on I/O), whether another
rank is down (`{DOWN_ALERT}`), and whether `collect()` is still called (a code
path that skips it, an evaluation phase longer than {o.stall_after}).

**Do** take a stack dump (`py-spy dump --pid PID`), restart the stuck rank or
the job, or raise `stall_after` when long evaluation phases are normal.
""",
    )
    return "\n".join(sections)
