"""The runbook the alerts link to: one section (anchor) per alert."""

from __future__ import annotations

from ..metrics import UNHEALTHY_UPDATES, UPDATE_INF_GRADS, UPDATE_NAN_GRADS, UPDATE_STATUS, UPDATES
from .alerts import ALERTS
from .alerts.unhealthy import band_text
from .options import (
    AMP_COLLAPSE_ALERT,
    AMP_SKIPS_ALERT,
    REPLICA_ALERT,
    STALLED_ALERT,
    KitOptions,
)

__all__ = ["runbook"]


def runbook(o: KitOptions) -> str:
    """Markdown runbook for the alerts rendered from ``o``."""
    t = o.thresholds
    intro = f"""# gradtel runbook

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
warning of the same alert, job, run and kind (never another alert's: a critical
{REPLICA_ALERT} leaves {STALLED_ALERT} to notify), and {AMP_COLLAPSE_ALERT}
inhibits {AMP_SKIPS_ALERT} of its run. An unhealthy-update
alert fires {o.settle} after Prometheus first sees the update (one scrape and one
evaluation interval: every rank's scrape of it is in, and the page counts them all),
keeps firing for {o.window} after the last unhealthy update, then resolves. Failed
scrapes, Prometheus restarts and restarts of the training never page again for an
old update.

Useful queries (Prometheus or Grafana Explore):

- which layers, now: `topk(5, {UPDATE_NAN_GRADS} + {UPDATE_INF_GRADS})`
- which layers, over the window:
  `topk(5, job_instance_rank_layer:gradtel_nonfinite_grads:increase{o.window})`
- which rank: `sum by (rank) (increase({UNHEALTHY_UPDATES}[{o.window}]))`
- since when: `{UPDATE_STATUS}` and `increase({UPDATES}[5m])`
"""
    return "\n".join([intro, *(alert.runbook(o) for alert in ALERTS)])
