"""The runbook the alerts link to: one section (anchor) per alert."""

from __future__ import annotations

from ..metrics import (
    AMP_LOSS_SCALE,
    ERRORS,
    GRAD_NORM,
    GRAD_NORM_PEAK,
    LAST_UNHEALTHY_STEP,
    LAST_UPDATE_TIMESTAMP,
    SKIPPED_UPDATES,
    TRAINING_EXCEPTIONS,
    UNHEALTHY_UPDATES,
    UNSCANNED_UPDATES,
    UPDATE_GRADS,
    UPDATE_INF_GRADS,
    UPDATE_NAN_GRADS,
    UPDATE_STATUS,
    UPDATES,
)
from .options import (
    ALERT_NAMES,
    AMP_COLLAPSE_ALERT,
    AMP_SKIPS_ALERT,
    AMP_SKIPS_FOR,
    CRASH_ALERT,
    DOWN_ALERT,
    NORM_SPIKE_ALERT,
    NOTHING_SCANNED_ALERT,
    STALLED_ALERT,
    KitOptions,
)
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
warning alert of the same job, run and kind. An unhealthy-update
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
   `{UPDATE_GRADS[kind]}` gauges show the latest update per layer.
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
  updates from reaching the optimizer (check `{UNHEALTHY_UPDATES}`
  against `{UPDATES}`: skipping most updates is not training).
- Fix the cause (data, learning rate, precision, an unstable op such as a
  `log` or `sqrt` of a non-positive value, a division by zero) and resume.
""",
        )
    sections.append(
        f"""## {CRASH_ALERT}

**Meaning.** An uncaught exception ended a training process while gradtel served
its metrics: gradtel counted it by type and by whether NaN or Inf gradients came
before it (`{TRAINING_EXCEPTIONS}{{type=...,gradients=...}}`), and kept the
endpoint up until Prometheus scraped it. The description names the exception,
the targets (and ranks) it ended, and, when NaN or Inf gradients came before, the
latest step with them of each kind (`{LAST_UNHEALTHY_STEP}`).
`severity="critical"` (`gradients="unhealthy"` on any target of the run): the
weights had taken an unhealthy update, or the process's latest scanned update
was unhealthy: the exception is likely their consequence (a policy that samples
from NaN logits, a loss that checks its input, `on_critical="raise"`).
`severity="warning"`: gradtel saw no unhealthy update (AMP overflows the
`GradScaler` skipped are not; the loss scale alert covers those), or none yet,
so the crash has another cause. The crash's own series holds this as the
process saw it when it died: a process restarted on the same labels does not
change the severity (the step named is the latest unhealthy one on those labels
in the window, which can be the new process's). One page per crash: a crash stays in
the window for {o.window}, and failed scrapes and gaps do not page it again. The
alert is one per run: a restarted process that crashes again while it still
fires (a crash loop) joins it without a new page; after it resolves, a new crash
pages anew.

**Look first at** the process's traceback in its log (gradtel passes the
exception on unchanged), the step named in the page against your own logs, and
whether other ranks died with it ({DOWN_ALERT} follows for their endpoints).

**Do**, when critical: resume from the last checkpoint *before* the step named,
not the latest, and treat the NaN first ({ALERT_NAMES["nan"]}, {ALERT_NAMES["inf"]}).
When warning: fix what the traceback says (data, out of memory, a bug) and
resume from the latest checkpoint.
""",
    )
    sections.append(
        f"""## {DOWN_ALERT}

**Meaning.** Prometheus could not scrape a gradtel endpoint for 5 minutes
(`up == 0`), or no target of job `{o.job}` is scraped at all. While this fires,
unhealthy updates of that process cannot page.

**Look first at** the training process (did it exit, crash, or get OOM-killed?),
its log for `gradtel cannot serve /metrics` (a port in use: see
`{ERRORS}{{stage="serve"}}` on another endpoint), and the scrape
target list in Prometheus (`/targets`).

**Do** restart the run or fix the endpoint (port, bind address: gradtel binds
`127.0.0.1` unless told `addr="0.0.0.0"`, which a Kubernetes pod needs).
Training that ended on purpose also fires this alert: silence it, or remove
ended targets from discovery.
""",
    )
    sections.append(
        f"""## {STALLED_ALERT}

**Meaning.** The endpoint is up but `collect()` has not been called (no
update, scanned or not) for more than {o.stall_after}:
`time() - {LAST_UPDATE_TIMESTAMP}` is too large. A target not scraped for
half that time is down ({DOWN_ALERT}), not stalled.

**Look first at** whether the process still uses CPU/GPU (a hang in a collective
operation waiting for another rank, a data loader stuck on I/O), whether another
rank is down (`{DOWN_ALERT}`), and whether `collect()` is still called (a code
path that skips it, an evaluation phase longer than {o.stall_after}).

**Do** take a stack dump (`py-spy dump --pid PID`), restart the stuck rank or
the job, or raise `stall_after` when long evaluation phases are normal.
""",
    )
    sections.append(
        f"""## {NOTHING_SCANNED_ALERT}

**Meaning.** Updates keep arriving (`collect()` is called) but in the last
{o.window} not one was scanned: gradtel is blind, and a NaN would not page.
Each such update is counted in `{UNSCANNED_UPDATES}{{reason=...}}`,
reports status `unknown` (`{UPDATE_STATUS} == -1`) and is not in
`{UPDATES}`.

**Look first at** the `reason` (the "Updates not scanned" panel):

- `no_gradients`: no watched parameter had a gradient when `collect()` ran. It
  runs before `backward()`, or after `optimizer.zero_grad()` (gradients set to
  `None`), or on a model other than the one trained. The process log says
  "0 of N watched trainable parameters had a gradient".
- `scan_error`: gradtel failed to count (see `{ERRORS}{{stage="scan"}}`
  and the log line `gradtel scan failed`), e.g. gradients of a kind it cannot
  read (meta or MKLDNN tensors).

**Do** move `collect()` between `backward()` and `optimizer.step()` (or use
`monitor.attach(optimizer)`), or fix what the scan error names.
""",
    )
    sections.extend(
        (
            f"""## {AMP_SKIPS_ALERT}

**Meaning.** More than {o.amp_skip_ratio:.0%} of the updates in the last
{o.window} overflowed and the AMP `GradScaler` skipped their optimizer step, and
this went on for {AMP_SKIPS_FOR}. The first few overflows of every fp16 run are
the scaler finding its loss scale and do not page: they are counted in
`{SKIPPED_UPDATES}{{reason="amp_overflow"}}`, not as unhealthy
updates. A share that stays high means the loss scale keeps halving: the model
is barely training and will soon produce real NaN.

**Look first at** the scaler's scale (`scaler.get_scale()` in your logs), the
learning rate, and the layers named by the overflowing updates (the
`GradHealth` that `collect()` returns has them; gradtel logs them at DEBUG).

**Do** lower the learning rate, clip gradients, move unstable ops (softmax,
norms, losses) to fp32 or bf16, or restart from the last healthy checkpoint.
""",
            f"""## {AMP_COLLAPSE_ALERT}

**Meaning.** The AMP `GradScaler`'s loss scale (`{AMP_LOSS_SCALE}`) fell below
{o.amp_scale_floor:g} in the last {o.window}. The scaler halves its scale at every update whose
gradients overflow and skips that update's step; it doubles it after a run of
good updates. A healthy fp16 run halves it a few times in its first steps and
settles far above {o.amp_scale_floor:g} (it starts at 65,536). Below it, nearly every update
overflows: the weights have diverged (a NaN loss makes every update overflow,
down to a scale of 0) and training has stopped learning, even though each
overflow is "handled". DeepSpeed and Megatron-LM stop a run at a scale of 1.
It keeps firing for {o.window} after the lowest scale, then resolves; a restart
with a healthy scale does not page again.

**Look first at** the loss (NaN or Inf since when?), `{AMP_LOSS_SCALE}` over
time (a sudden fall is a divergence, a slow slide is overflow outpacing the
scaler's growth), `{SKIPPED_UPDATES}{{reason="amp_overflow"}}`, and the
learning rate and data around the step where the scale began to fall.

**Do** stop the run: every step is skipped, and checkpoints saved now hold no
progress (or NaN). Resume from the last checkpoint before the fall with a lower
learning rate, gradient clipping, or the unstable ops (softmax, norms, losses)
in fp32 or bf16. This critical alert inhibits the warnings of the same run
that carry no `kind`, {AMP_SKIPS_ALERT} among them.
""",
            f"""## {NORM_SPIKE_ALERT}

**Meaning.** The L2 norm of the gradients (`{GRAD_NORM}`) rose above
{o.spike_factor:g} times its median over the last {o.spike_baseline}. The alert
reads `{GRAD_NORM_PEAK}`, the largest norm of the last couple of minutes, so a
spike at one step between two scrapes is not missed. A process must have run
for {o.spike_history}, with norms as long, before it is judged: the first minutes of
a job (or of a restarted rank) have no baseline, and their norms fall fast. Slow growth and noise are not spikes.
Norm spikes often come before loss spikes, divergence and NaN gradients: this
is the warning before the page. The norm is exported when the training loop
clips with `gradtel.clip_grad_norm_` or the monitor has `grad_norm=True`.

**Look first at**
- the data batch of that step: a corrupt, duplicated or extreme sample (log the
  batch indices around the spike);
- the learning-rate schedule: the end of warm-up, a restart, a jump;
- the loss scale with fp16 (`scaler.get_scale()`): a scale that just grew;
- one rank alone: `topk(3, {GRAD_NORM_PEAK}{{job="{o.job}"}})` by rank; under FSDP
  each rank has its own shard's norm.

**Do** nothing if it stays one spike and the loss recovers. If spikes repeat,
clip gradients (or lower the clip threshold), lower the learning rate, or skip
the offending batches. Keep the last checkpoint from before the spike out of
rotation: if NaN gradients follow, it is the one to resume from.
""",
        )
    )
    return "\n".join(sections)
