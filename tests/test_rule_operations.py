"""The rule tests catch what they were written for: rules rendered with a known defect fail
exactly the histories that show it (a failed scrape, a Prometheus gap, a restart, a rollback,
the ranks' scrapes of one update spread over a scrape interval), on Prometheus 2.x and 3.x alike."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from gradtel.metrics import FIRST_BAD_LAYER, REPLICA_FINGERPRINT, REPLICA_FINGERPRINT_UPDATE
from gradtel.render import KitOptions, write_kit
from gradtel.render.alerts import (
    amp_collapse,
    amp_skips,
    crash,
    promql,
    replicas,
    stalled,
    unhealthy,
)
from gradtel.render.options import duration_seconds, duration_text

from .prometheus_versions import VERSIONS, bin_folder

# One worker runs every promtool of this module: the fixture that runs them all is per worker.
pytestmark = pytest.mark.xdist_group("rule-operations")

COUNTED = promql.counted
AS_IT_STANDS = promql.as_it_stands
SKIPPING = amp_skips._skipping


def _born_where_the_offset_finds_nothing(
    o: KitOptions, series: str, scope: str, **how: bool
) -> list[str]:
    """The "series born non-zero" condition that a staleness marker or a gap satisfies."""
    moved = COUNTED(o, series, scope, **how)[-1]
    return [f"last_over_time({series}[{o.window}]) > 0 unless {series} offset {o.window}", moved]


def _highest_first_bad_step(o: KitOptions) -> str:
    """The first bad layer with the highest step in the window: an older incident's after a rollback."""
    query = promql.query(
        f"topk(1, max by (layer) (max_over_time({FIRST_BAD_LAYER}{{{promql.RUN_SCOPE},kind=%[3]q}}[{o.window}])))",
        *promql.KIND_ARGS,
    )
    return (
        f"{{{{ with {query} }}}}{{{{ with index . 0 }}}} First bad layer in backward order: "
        "{{ .Labels.layer }}, at step {{ .Value }}.{{ end }}{{ end }}"
    )


def _last_values_of_any_process(o: KitOptions) -> str:
    """The first bad layer as the series stand, else the last values of every process in the window."""
    series = f"{FIRST_BAD_LAYER}{{{promql.RUN_SCOPE},kind=%[3]q}}"
    now = f"({series} > 0)"
    latest = f"(last_over_time({series}[{o.window}]) > 0 unless on () {now})"
    query = promql.query(f"topk(1, max by (layer) ({now} or {latest}))", *promql.KIND_ARGS)
    return (
        f"{{{{ with {query} }}}}{{{{ with index . 0 }}}} First bad layer in backward order: "
        "{{ .Labels.layer }}, at step {{ .Value }}.{{ end }}{{ end }}"
    )


def _any_non_finite_loss_in_the_window(o: KitOptions) -> str:
    """The loss clause when any update in the window had a non-finite loss, the first or a later one."""
    series = f"gradtel_nonfinite_loss_updates_total{{{promql.RUN_SCOPE}}}"
    query = promql.query(promql.new_or_increased(o, series, promql.RUN_SCOPE), *promql.RUN_ARGS)
    return f"{{{{ with {query} }}}} The loss was already non-finite: it entered in the forward pass.{{{{ end }}}}"


def _lowest_scale_in_the_window(o: KitOptions, selector: str) -> str:
    """A collapse as a state: the lowest loss scale of the window below the floor."""
    return (
        f"min_over_time(gradtel_amp_loss_scale{{{selector}}}[{o.window}]) < {o.amp_scale_floor:g}"
    )


def _loss_by_the_share_of_unhealthy_updates(o: KitOptions) -> str:
    """The loss clause when every unhealthy update in the window had a non-finite loss."""
    scope = promql.RUN_SCOPE
    loss = promql.new_or_increased(
        o, f"gradtel_nonfinite_loss_updates_total{{{scope}}}", scope, exact=True
    )
    unhealthy = promql.new_or_increased(
        o, f"gradtel_unhealthy_updates_total{{{scope}}}", scope, exact=True
    )
    query = promql.query(
        f"{loss} >= on ({promql.PROCESS}) sum by ({promql.PROCESS}) {unhealthy}",
        *promql.RUN_ARGS,
    )
    return f"{{{{ with {query} }}}} The loss was already non-finite: it entered in the forward pass.{{{{ end }}}}"


def _last_values_only_when_no_process_is_scraped(o: KitOptions, series: str, **_: bool) -> str:
    """The last values of every process only when no process has a series above 0 now, for the loss too."""
    return AS_IT_STANDS(o, series)


def _last_values_of_each_process_not_scraped(o: KitOptions, series: str, **_: bool) -> str:
    """The last values of each process not scraped now, for the first bad layer too: a dead pod's."""
    return AS_IT_STANDS(o, series, per_process=True)


def _sampled_at_the_evaluation_interval(
    o: KitOptions, series: str, per_process: bool = False
) -> str:
    """The series sampled last, seen by a subquery that steps by the evaluation interval."""
    return AS_IT_STANDS(o, series, per_process=per_process).replace(
        f"[{o.window}:{o.scrape_interval}]", f"[{o.window}:]"
    )


def _any_incident_that_began_with_one(o: KitOptions) -> str:
    """The loss clause when any incident of the alert's kind began with a non-finite loss, not the one it names."""
    series = AS_IT_STANDS(
        o, f"gradtel_nonfinite_loss_incident_step{{{promql.RUN_SCOPE},kind=%[3]q}}"
    )
    query = promql.query(f"max({series}) > 0", *promql.KIND_ARGS)
    return f"{{{{ with {query} }}}} The loss was already non-finite: it entered in the forward pass.{{{{ end }}}}"


def _amp_skips_gated_by(gate: Callable[[KitOptions, str], str]) -> Callable[..., list[str]]:
    """The AMP skips alert's share of the window's skipped updates, with the settle budget
    of ``gate`` (none where it says nothing)."""

    def skipping(o: KitOptions, selector: str) -> list[str]:
        share = SKIPPING(o, selector)[:4]
        budget = gate(o, f'gradtel_skipped_updates_total{{{selector},reason="amp_overflow"}}')
        return [*share, "and ignoring (reason)", budget] if budget else share

    return skipping


def _no_settle_budget(o: KitOptions, skipped: str) -> str:
    """A share of a window of minutes alone, as the rule was."""
    return ""


def _settle_budget_as_the_counter_stands(o: KitOptions, skipped: str) -> str:
    return f"{skipped} > {amp_skips.SETTLE_SKIPS}"


def _settle_budget_of_any_process_on_the_labels(o: KitOptions, skipped: str) -> str:
    return f"max_over_time({skipped}[{o.window}]) > {amp_skips.SETTLE_SKIPS}"


def _settle_budget_within_the_window(o: KitOptions, skipped: str) -> str:
    return f"increase({skipped}[{o.window}]) > {amp_skips.SETTLE_SKIPS}"


def _crash_of_any_process_before(o: KitOptions, scope: str, unhealthy: str = "") -> str:
    """A crash as a per-layer series: new only with no sample in the window before, whichever
    process it came from."""
    series = f"gradtel_training_exceptions_total{{{scope}{f',gradients={unhealthy}' if unhealthy else ''}}}"
    return promql.new_or_increased(o, series, scope, on_demand=True)


def _crash_severity_by(condition: Callable[[KitOptions, str], str]) -> Callable[..., str]:
    """Crashes of any ``gradients`` label, critical where ``condition`` holds for the process."""

    def crashed(o: KitOptions, scope: str, unhealthy: str = "") -> str:
        series = f"gradtel_training_exceptions_total{{{scope}}}"
        any_crash = promql.new_or_increased(o, series, scope, on_demand=True, per_process=True)
        return (
            f"({any_crash} and on ({promql.PROCESS}) {condition(o, scope)})"
            if unhealthy
            else any_crash
        )

    return crashed


def _unhealthy_in_the_window(o: KitOptions, scope: str) -> str:
    """Unhealthy updates still in the window, which leave it before the crash does."""
    return f"increase(gradtel_unhealthy_updates_total{{{scope}}}[{o.window}]) > 0"


def _last_status_in_the_window(o: KitOptions, scope: str) -> str:
    """The last update status on the labels, which a process restarted on them reports anew."""
    return f"last_over_time(gradtel_update_status{{{scope}}}[{o.window}]) > 0"


def _no_start_gate_on_spikes(rules: str) -> str:
    return re.sub(
        r"\n\s*and on \([^)]*\)\n\s*last_over_time\(gradtel_start_time_seconds[^\n]*< time\(\) - \d+",
        "",
        rules,
    )


def _disagreement_of_two_ranks(rules: str) -> str:
    """The disagreeing-rank alert without its least number of ranks."""
    return rules.replace(">= 3)", ">= 1)")


def _disagreement_judged_from_the_start(rules: str) -> str:
    """The disagreeing-rank alert judging processes however young."""
    return re.sub(
        r"(gradtel_start_time_seconds\{[^}]*\}\[10m\]\) < time\(\)) - 120\b", r"\1 + 0", rules
    )


def _stalled_by_prometheus_clock(o: KitOptions, selector: str) -> str:
    """A stall as Prometheus' time since the last update time the training host wrote."""
    stall = duration_seconds(o.stall_after)
    held = duration_text(stall // 2)
    return f"time() - last_over_time(gradtel_last_update_timestamp_seconds{{{selector}}}[{held}]) > {stall}"


def _targets_down_counted_by_job(rules: str) -> str:
    """The exporter-down alert one per job, its ``for`` on the job's count of targets down."""
    down = 'up{job="gradtel"} == 0\n'
    assert rules.count(down) == 1
    return rules.replace(down, f"count by (job) ({down[:-1]})\n")


def _no_for_on_unhealthy_updates(rules: str) -> str:
    return re.sub(
        r"(alert: Gradtel(?:NaN|Inf)Gradients\n    expr: .*?)\n    for: 10s",
        r"\1",
        rules,
        flags=re.DOTALL,
    )


def _latest_fingerprints_whatever_their_update(scope: str) -> str:
    """Each rank's latest fingerprint, whichever update it hashes."""
    return (
        f"count_values without () ('fingerprint', {REPLICA_FINGERPRINT}{{{scope},slot='latest'}})"
    )


def _each_slot_of_a_check(scope: str) -> str:
    """Each rank's checks per slot: a rank scraped between the two writes of a check has it
    in both, and counts twice."""
    fingerprints = f"count_values without () ('fingerprint', {REPLICA_FINGERPRINT}{{{scope}}})"
    updates = f"count_values without () ('update', {REPLICA_FINGERPRINT_UPDATE}{{{scope}}})"
    return f"({fingerprints} * ignoring (fingerprint, update) group_left (update) {updates})"


def _checks_before_every_rank_has_hashed(checks: str, scope: str) -> str:
    """The ranks of each check, as many as have published it so far."""
    return f"count by (job, run, update) ({checks})"


def _ranks_counted_from_their_checks(checks: str, scope: str) -> str:
    """Every rank of each check, of as many ranks as the checks read back show."""
    ranks = f"count by (job, run) (group by (job, instance, rank, run) ({checks}))"
    return f"count by (job, run, update) ({checks})\n== on (job, run) group_left ()\n{ranks}"


NAN, INF, AMP = "GradtelNaNGradients", "GradtelInfGradients", "GradtelAmpLossScaleCollapsed"
SKIPS = "GradtelAmpOverflowSkips"
CRASHED = "GradtelTrainingCrashed"
REPLICA = "GradtelReplicaDrifted"
DOWN, STALLED = "GradtelExporterDown", "GradtelTrainingStalled"
Patches = dict[tuple[ModuleType, str], Callable[..., str | list[str]]]
"""The fragments a defect replaces: (module, name) -> the defective one."""
DEFECTS: dict[str, tuple[Patches, Callable[[str], str], set[str]]] = {
    "born where the offset lookup finds nothing": (
        {(promql, "counted"): _born_where_the_offset_finds_nothing},
        str,
        {
            *(
                f"{alert} {severity} does not fire when scrapes fail for 3m, 20m after an incident"
                for alert in (NAN, INF)
                for severity in ("warning", "critical")
            ),
            *(
                f"{alert} {severity} does not fire when Prometheus has a gap of 8m after an incident"
                for alert in (NAN, INF)
                for severity in ("warning", "critical")
            ),
            f"{NAN} fires when a new incident follows a failed scrape, naming its own origin rank, loss and counts",
            f"{NAN} critical fires when a restarted process's first update is unhealthy, its count equal to the old one's last",
        },
    ),
    "the first bad layer of the highest step": (
        {(unhealthy, "_first_bad_template"): _highest_first_bad_step},
        str,
        {
            f"{NAN} critical names the new incident's first bad layer after a rollback to an earlier step",
            f"{NAN} critical names the restarted process's first bad layer through a failed scrape as it fires",
            f"{NAN} critical names the new pod's incident, at an earlier step and with a finite loss, not the crashed pod's",
        },
    ),
    "the first bad layer of any process's last values": (
        {(unhealthy, "_first_bad_template"): _last_values_of_any_process},
        str,
        {
            f"{NAN} critical names the restarted process's first bad layer through a failed scrape as it fires"
        },
    ),
    "the last values of a process only when no process is scraped": (
        {(promql, "as_it_stands"): _last_values_only_when_no_process_is_scraped},
        str,
        {
            f"{NAN} says the loss was already non-finite when the rank whose loss was has its scrape fail as the page fires"
        },
    ),
    "the last values of each process not scraped, for the first bad layer too": (
        {(promql, "as_it_stands"): _last_values_of_each_process_not_scraped},
        str,
        {
            f"{NAN} critical names the new pod's incident, at an earlier step and with a finite loss, not the crashed pod's"
        },
    ),
    "the series sampled last at the evaluation interval": (
        {(promql, "as_it_stands"): _sampled_at_the_evaluation_interval},
        str,
        {
            f"{NAN} critical fires when the process crashes right after the update, naming its first bad layer",
            f"{INF} critical fires when a process's first and only scrape shows the update, before a crash",
        },
    ),
    "the loss clause of any update in the window": (
        {(unhealthy, "_loss_template"): _any_non_finite_loss_in_the_window},
        str,
        {
            f"{NAN} does not say the loss was non-finite when the incident's first update had a finite loss",
            f"{INF} does not say the loss was non-finite when an Inf update with a finite loss came before the NaN losses",
            f"{NAN} critical names the new pod's incident, at an earlier step and with a finite loss, not the crashed pod's",
            *(
                f"{alert} does not say the loss was non-finite when an older NaN incident in the window began with one"
                for alert in (NAN, INF)
            ),
        },
    ),
    "the loss clause by the share of unhealthy updates in the window": (
        {(unhealthy, "_loss_template"): _loss_by_the_share_of_unhealthy_updates},
        str,
        {
            f"{NAN} and {INF} say the loss was already non-finite when one update with an Inf loss had both",
            f"{NAN} does not say the loss was non-finite when the incident's first update had a finite loss",
            f"{NAN} critical names the new pod's incident, at an earlier step and with a finite loss, not the crashed pod's",
        },
    ),
    "the loss clause of any incident that began with one": (
        {(unhealthy, "_loss_template"): _any_incident_that_began_with_one},
        str,
        {
            f"{NAN} does not say the loss was non-finite when an older NaN incident in the window began with one",
            f"{NAN} critical names the new pod's incident, at an earlier step and with a finite loss, not the crashed pod's",
            f"{NAN} fires when a new incident follows a failed scrape, naming its own origin rank, loss and counts",
        },
    ),
    "a loss-scale collapse as a state": (
        {(amp_collapse, "_collapsed"): _lowest_scale_in_the_window},
        str,
        {
            f"{AMP} fires when the loss scale collapses to 0",
            f"{AMP} fires once for a collapse, through failed scrapes",
            f"{AMP} does not fire again when Prometheus has a gap of 8m after a collapse",
            f"{AMP} does not fire again when the process restarts after a collapse",
            f"{AMP} fires when a restarted process's first scrape shows a collapsed scale",
        },
    ),
    "AMP skips judged by the share of a window of minutes alone": (
        {(amp_skips, "_skipping"): _amp_skips_gated_by(_no_settle_budget)},
        str,
        {
            f"{SKIPS} does not fire while a run at one update a minute settles its loss scale in 6 halvings",
            f"{SKIPS} does not fire while a run at one update a minute settles its loss scale in 16 halvings",
            f"{SKIPS} fires when a run at one update a minute keeps skipping 2 of every 3 of its updates after its loss scale settled",
            f"{SKIPS} does not fire when a hung process that had skipped more than 16 updates restarts and settles its loss scale anew, at one update a minute",
        },
    ),
    "AMP skips past the settle as the counter stands": (
        {(amp_skips, "_skipping"): _amp_skips_gated_by(_settle_budget_as_the_counter_stands)},
        str,
        {f"{SKIPS} fires once while the scaler keeps skipping, through a failed scrape"},
    ),
    "AMP skips past the settle of any process on the labels": (
        {
            (amp_skips, "_skipping"): _amp_skips_gated_by(
                _settle_budget_of_any_process_on_the_labels
            )
        },
        str,
        {
            f"{SKIPS} does not fire when a hung process that had skipped more than 16 updates restarts and settles its loss scale anew, at one update a minute"
        },
    ),
    "AMP skips past the settle counted within the window": (
        {(amp_skips, "_skipping"): _amp_skips_gated_by(_settle_budget_within_the_window)},
        str,
        {
            f"{SKIPS} fires when a run at one update a minute keeps skipping 2 of every 3 of its updates after its loss scale settled"
        },
    ),
    "a restarted process's crash hidden by the last one": (
        {(crash, "_crashed"): _crash_of_any_process_before},
        str,
        {
            f"{CRASHED} critical fires when a restarted process crashes again, 15m after the last crash"
        },
    ),
    "a crash's severity by the updates still in the window": (
        {(crash, "_crashed"): _crash_severity_by(_unhealthy_in_the_window)},
        str,
        {
            f"{CRASHED} critical fires once for a crash, through a failed scrape",
            f"{CRASHED} critical stays critical for its window when the process restarts healthy on the same labels",
        },
    ),
    "a crash's severity by the last update status on its labels": (
        {(crash, "_crashed"): _crash_severity_by(_last_status_in_the_window)},
        str,
        {
            f"{CRASHED} critical stays critical for its window when the process restarts healthy on the same labels"
        },
    ),
    "spikes judged by the history of an older process": (
        {},
        _no_start_gate_on_spikes,
        {"GradtelGradNormSpike does not fire in a new process's first 10m on the same labels"},
    ),
    "a disagreeing rank judged by the median of two": (
        {},
        _disagreement_of_two_ranks,
        {"GradtelRankDisagrees does not fire with 2 ranks, however far apart"},
    ),
    "a disagreeing rank judged in its process's first minutes": (
        {},
        _disagreement_judged_from_the_start,
        {
            "GradtelRankDisagrees does not fire at job start",
            "GradtelRankDisagrees does not fire when a rank restarts with norms apart at first",
            "GradtelRankDisagrees does not fire when a rank joins late with norms apart at first",
        },
    ),
    "a stall timed by Prometheus' clock": (
        {(stalled, "_stalled"): _stalled_by_prometheus_clock},
        str,
        {
            f"{STALLED} does not fire while updates keep arriving on a host whose clock is 11m behind",
            f"{STALLED} fires when no update arrives for 10m on a host whose clock is 60m ahead",
        },
    ),
    "targets down counted by job": (
        {},
        _targets_down_counted_by_job,
        {
            f"{DOWN} fires for each rank of a run whose ranks all died, naming its rank and host",
            f"{DOWN} does not fire for targets down 3m each, one after the other",
            f"{DOWN} fires anew for a target that dies while another one's alert fires",
        },
    ),
    "pages before every rank's scrape is in": (
        {},
        _no_for_on_unhealthy_updates,
        {
            f"{NAN} critical fires once every rank's scrape of the update is in, counting them all",
            *(f"{alert} warning fires on a single warning-band update" for alert in (NAN, INF)),
        },
    ),
    "replicas compared by their latest fingerprints, whatever update they hash": (
        {(replicas, "_checks"): _latest_fingerprints_whatever_their_update},
        str,
        {
            f"{REPLICA} counts once a rank scraped between the two writes of a check",
            f"{REPLICA} does not fire when a rank restarts",
            f"{REPLICA} does not fire when ranks are scraped on either side of a check",
            f"{REPLICA} fires once naming the rank that drifted, while checks go on",
            f"{REPLICA} names the drifted rank through another rank's failed scrape",
            f"{REPLICA} waits for every rank's scrape of a check before it compares them",
        },
    ),
    "a rank's check counted once per slot": (
        {(replicas, "_checks"): _each_slot_of_a_check},
        str,
        {f"{REPLICA} counts once a rank scraped between the two writes of a check"},
    ),
    "replicas compared before every rank has hashed the update": (
        {(replicas, "_complete"): _checks_before_every_rank_has_hashed},
        str,
        {
            f"{REPLICA} waits for every rank's scrape of a check before it compares them",
            f"{REPLICA} counts the ranks scraped, not those whose checks the store serves yet",
        },
    ),
    "replicas compared whenever every rank the checks show has hashed": (
        {(replicas, "_complete"): _ranks_counted_from_their_checks},
        str,
        {f"{REPLICA} counts the ranks scraped, not those whose checks the store serves yet"},
    ),
}


def _load(text: str) -> Any:
    return yaml.load(text, Loader=yaml.CSafeLoader)  # libyaml: every defect's kit is read


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=yaml.CSafeDumper, sort_keys=False)


def _alert_rules(rules: str) -> dict[str, list[dict[str, Any]]]:
    """The rules of each alert in a rule file."""
    by_alert: dict[str, list[dict[str, Any]]] = {}
    for group in _load(rules)["groups"]:
        for rule in group["rules"]:
            by_alert.setdefault(rule.get("alert", rule.get("record")), []).append(rule)
    return by_alert


def _render(folder: Path, patches: Patches, edit: Callable[[str], str], clean: str) -> Path:
    """The kit under ``folder``, its rules with a defect; its tests only those of the alerts
    whose rules differ from ``clean``, and its rules only those alerts and the recording
    rules: a case reads the rules of its own alert alone (with the recording rules it
    reads), so every other case passes as it does on the clean rules (which
    tests/test_deploy.py checks: they are the committed ones), and promtool need not
    evaluate the other alerts at every step."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        for (module, name), patch in patches.items():
            monkeypatch.setattr(module, name, patch)
        write_kit(folder)
    prometheus = folder / "prometheus"
    rules = prometheus / "gradtel-rules.yml"
    rules.write_text(edit(rules.read_text()))
    assert rules.read_text() != clean, "the defect changes no rule"
    clean_rules = _alert_rules(clean)
    defective = _alert_rules(rules.read_text())
    changed = {
        alert for alert in clean_rules | defective if clean_rules.get(alert) != defective.get(alert)
    }
    # A rule that reads a changed recorded series changes with it (rules in file order).
    for name, its_rules in defective.items():
        if any(record in rule["expr"] for record in set(changed) for rule in its_rules):
            changed.add(name)
    kept = _load(rules.read_text())
    for group in kept["groups"]:
        group["rules"] = [r for r in group["rules"] if "record" in r or r["alert"] in changed]
    kept["groups"] = [group for group in kept["groups"] if group["rules"]]
    rules.write_text(_dump(kept))
    tests_file = prometheus / "gradtel-rules.test.yml"
    tests = _load(tests_file.read_text())
    tests["tests"] = [
        case
        for case in tests["tests"]
        if changed & {check["alertname"] for check in case["alert_rule_test"]}
    ]
    tests_file.write_text(_dump(tests))
    return prometheus


@pytest.fixture(scope="module")
def promtool_said(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    """What ``promtool test rules`` said of each defect's rules, on every Prometheus
    version, one promtool at a time: one is one busy process, and the suite's other workers
    share the cores (the real-server tests among them, whose pages must not come late).
    (tests/test_deploy.py runs it on the clean rules, the committed ones.)"""
    promtools = {version: bin_folder(version) / "promtool" for version in VERSIONS}
    clean = tmp_path_factory.mktemp("clean")
    write_kit(clean)
    rules = (clean / "prometheus" / "gradtel-rules.yml").read_text()
    folders = {
        defect: _render(tmp_path_factory.mktemp("defect"), patches, edit, rules)
        for defect, (patches, edit, _) in DEFECTS.items()
    }

    def said(defect: str, version: str) -> str:
        run = subprocess.run(
            [promtools[version], "test", "rules", "gradtel-rules.test.yml"],
            cwd=folders[defect], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=300,
        )  # fmt: skip
        return run.stdout

    return {(defect, version): said(defect, version) for defect in folders for version in VERSIONS}


def _failed(out: str) -> set[str]:
    return set(re.findall(r"^\s+name: (.*),$", out, re.MULTILINE))


def test_this_module_runs_on_one_worker(request: pytest.FixtureRequest) -> None:
    """Under ``--dist loadgroup`` (scripts/test.sh) pytest-xdist sends a group to one worker
    by tagging the node ids of its tests. Where it cannot (pytest-dev/pytest-xdist#1386,
    hence the pytest pin in pyproject.toml), the tests are spread over the workers and this
    module's promtool runs start again on each of them."""
    if getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith("@rule-operations"), (
            f"pytest-xdist did not group {request.node.nodeid}: see the pytest pin in pyproject.toml"
        )


@pytest.mark.parametrize("defect", DEFECTS)
def test_rules_with_a_known_defect_fail_the_histories_that_show_it(
    defect: str, promtool_said: dict[tuple[str, str], str]
) -> None:
    expected = DEFECTS[defect][2]
    for version in VERSIONS:
        out = promtool_said[defect, version]
        assert _failed(out) == expected, f"Prometheus {version}:\n{out}"
