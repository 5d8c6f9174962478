"""The deploy kit: committed files equal the default render, and the real tools accept them."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradtel import Thresholds
from gradtel.render import KitOptions, render_kit, write_kit
from gradtel.tools.cli import main
from gradtel.tools.stack import free_port

from .conftest import require_tool
from .prometheus_versions import prometheus_bin  # noqa: F401 (a fixture)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"


def run(*command: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_committed_kit_equals_the_default_render() -> None:
    rendered = render_kit()
    committed = {
        str(path.relative_to(DEPLOY)): path.read_text(encoding="utf-8")
        for path in DEPLOY.rglob("*")
        if path.is_file()
    }
    stale = sorted(name for name in rendered if committed.get(name) != rendered[name])
    extra = sorted(set(committed) - set(rendered))
    assert not stale and not extra, (
        f"deploy/ differs from the default render (stale: {stale}, not rendered: {extra}); "
        "run `gradtel render --out deploy` and commit"
    )


def test_promtool_checks_and_unit_tests_the_committed_rules(prometheus_bin: Path) -> None:  # noqa: F811
    promtool = str(prometheus_bin / "promtool")
    checked = run(promtool, "check", "rules", "gradtel-rules.yml")
    assert checked.returncode == 0 and "SUCCESS: 18 rules found" in checked.stdout, checked.stderr
    tested = run(promtool, "test", "rules", "gradtel-rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_rule_tests_cover_every_behaviour_the_alerts_promise() -> None:
    tests = yaml.safe_load((PROMETHEUS / "gradtel-rules.test.yml").read_text())["tests"]
    names = [case["name"] for case in tests]
    for expected in (
        "GradtelNaNGradients warning fires on a single warning-band update",
        "GradtelInfGradients critical fires on a single critical-band update",
        "GradtelNaNGradients warning and critical both fire when both happen in one window",
        "GradtelNaNGradients critical names the first bad layer in backward order",
        "GradtelNaNGradients and GradtelInfGradients do not fire on healthy updates",
        "GradtelInfGradients critical does not fire on a counter reset alone (training restarted)",
        "GradtelInfGradients critical fires when the very first update after start is critical",
        "GradtelNaNGradients critical resolves 10m after the last unhealthy update",
        "GradtelExporterDown fires for each rank of a run whose ranks all died, naming its rank and host",
        "GradtelExporterDown does not fire for targets down 3m each, one after the other",
        "GradtelExporterDown fires anew for a target that dies while another one's alert fires",
        "GradtelTrainingStalled fires when no update arrives for 10m while up",
        "GradtelTrainingStalled does not fire while updates keep arriving on a host whose clock is 11m behind",
        "GradtelTrainingStalled fires when no update arrives for 10m on a host whose clock is 60m ahead",
        "GradtelGradNormSpike fires on a 20x spike of the gradient norm",
        "GradtelGradNormSpike is silent on slow growth",
        "GradtelGradNormSpike is silent on noise within 3x",
        "GradtelGradNormSpike is silent at job start",
        "GradtelNaNGradients critical does not fire when scrapes fail for 3m, 20m after an incident",
        "GradtelInfGradients warning does not fire when Prometheus has a gap of 8m after an incident",
        "GradtelNaNGradients fires when a new incident follows a failed scrape, naming its own origin rank, loss and counts",
        "GradtelNaNGradients critical fires when a restarted process's first update is unhealthy, its count equal to the old one's last",
        "GradtelNaNGradients critical fires when the process crashes right after the update, naming its first bad layer",
        "GradtelNaNGradients critical names the new incident's first bad layer after a rollback to an earlier step",
        "GradtelNaNGradients critical fires once every rank's scrape of the update is in, counting them all",
        "GradtelGradNormSpike does not fire in a new process's first 10m on the same labels",
        "GradtelTrainingStalled fires once for a stall, through a failed scrape",
        "GradtelExporterDown does not fire when Prometheus restarts, with a gap of 8m",
        "GradtelAmpLossScaleCollapsed fires when the loss scale collapses to 0",
        "GradtelTrainingCrashed critical fires when training crashes after NaN gradients, naming the step, "
        "the exception and the rank",
        "GradtelTrainingCrashed warning fires when training crashes after a healthy update",
        "GradtelTrainingCrashed critical fires when a restarted process crashes again, 15m after the last crash",
        "GradtelAmpLossScaleCollapsed fires when the loss scale keeps falling",
        "GradtelAmpLossScaleCollapsed does not fire while the loss scale settles in an fp16 run's first steps",
        "GradtelAmpOverflowSkips does not fire while a run at one update a minute settles its loss scale in 6 halvings",
        "GradtelAmpOverflowSkips does not fire while a run at one update a minute settles its loss scale in 16 halvings",
        "GradtelAmpOverflowSkips fires when a run at one update a minute keeps skipping 2 of every 3 of its updates "
        "after its loss scale settled",
        "GradtelAmpOverflowSkips does not fire when a hung process that had skipped more than 16 updates restarts and "
        "settles its loss scale anew, at one update a minute",
        "GradtelNaNGradients does not say the loss was non-finite when the incident's first update had a finite loss",
        "GradtelNaNGradients does not say the loss was non-finite when an older NaN incident in the window began with one",
        "GradtelTrainingCrashed critical stays critical for its window when the process restarts healthy on the same labels",
        "GradtelTrainingCrashed critical fires once for a run whose ranks saw different gradients, naming them all",
        "GradtelTrainingCrashed critical names the host and GPU of the rank that crashed",
        "GradtelNaNGradients names the host and GPU of the rank it originated on",
        "GradtelRankDisagrees fires when one of 4 ranks' norm stays 50x the median, naming its rank, host and GPU",
        "GradtelRankDisagrees fires for a rank whose norm collapses, without device info (an older gradtel)",
        "GradtelRankDisagrees does not fire on per-rank data noise within 3x",
        "GradtelRankDisagrees does not fire when every rank's norm moves together",
        "GradtelRankDisagrees does not fire with 2 ranks, however far apart",
        "GradtelRankDisagrees does not fire at job start",
        "GradtelRankDisagrees compares the ranks of one run only, with two runs on one Prometheus",
        "GradtelRankDisagrees does not fire when a rank restarts with norms apart at first",
    ):
        assert expected in names
    # Every alert goes through the histories of a deployment.
    for alert in ("GradtelNaNGradients", "GradtelInfGradients", "GradtelNothingScanned", "GradtelAmpOverflowSkips",
                  "GradtelAmpLossScaleCollapsed", "GradtelGradNormSpike", "GradtelTrainingStalled",
                  "GradtelExporterDown", "GradtelTrainingCrashed", "GradtelRankDisagrees"):  # fmt: skip
        assert any(n.startswith(f"{alert} ") and ("scrape" in n and "fail" in n) for n in names), (
            alert
        )
        assert any(n.startswith(f"{alert} ") and "gap" in n for n in names), alert
        assert any(
            n.startswith(f"{alert} ") and ("restart" in n or "joins late" in n) for n in names
        ), alert


def test_unhealthy_alerts_wait_one_scrape_and_one_evaluation_interval() -> None:
    kit = render_kit(KitOptions(scrape_interval="15s", evaluation_interval="1m"))
    config = yaml.safe_load(kit["prometheus/prometheus.yml"])
    assert config["global"]["evaluation_interval"] == "1m"
    assert config["scrape_configs"][0]["scrape_interval"] == "15s"
    alerts = [
        r for g in yaml.safe_load(kit["prometheus/gradtel-rules.yml"])["groups"] for r in g["rules"]
    ]
    assert {r["for"] for r in alerts if r.get("alert", "").endswith("Gradients")} == {"1m15s"}


def test_a_broken_rule_fails_the_rule_tests(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    write_kit(tmp_path)
    rules = tmp_path / "prometheus" / "gradtel-rules.yml"
    # Alerting on the last-value gauge instead of the counter misses these updates.
    rules.write_text(rules.read_text().replace("[10m]) > 0\n", "[10m]) > 1\n"))
    tested = run(promtool, "test", "rules", "gradtel-rules.test.yml", cwd=rules.parent)
    assert tested.returncode != 0 and "FAILED" in tested.stdout + tested.stderr


def test_scrape_configs_are_valid_and_wire_the_rules() -> None:
    promtool = require_tool("promtool", "prometheus")
    for config in ("prometheus.yml", "prometheus-ranks.yml"):
        checked = run(promtool, "check", "config", config)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert yaml.safe_load((PROMETHEUS / config).read_text())["rule_files"] == [
            "gradtel-rules.yml"
        ]
    ranks = yaml.safe_load((PROMETHEUS / "prometheus-ranks.yml").read_text())["scrape_configs"][0]
    assert ranks["static_configs"][0]["targets"] == ["127.0.0.1:9464", "127.0.0.1:9465"]
    assert ranks["file_sd_configs"][0]["files"] == ["targets/*.json"]


def test_scale_out_configs_are_valid_and_their_commands_are_the_tested_ones(
    prometheus_bin: Path,  # noqa: F811 (the fixture)
) -> None:
    promtool = str(prometheus_bin / "promtool")
    scale_out = DEPLOY / "scale-out"
    for config, flags in (("prometheus-agent.yml", ["--agent"]), ("central-prometheus.yml", [])):
        checked = run(promtool, "check", "config", *flags, config, cwd=scale_out)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    agent = yaml.safe_load((scale_out / "prometheus-agent.yml").read_text())
    assert agent["scrape_configs"][0]["file_sd_configs"][0]["files"] == [
        "../prometheus/targets/*.json"
    ]
    assert agent["remote_write"][0]["queue_config"]["batch_send_deadline"] == "1s"
    readme = (scale_out / "README.md").read_text()
    for flag in ("--agent \\", "--enable-feature=agent", "--web.enable-remote-write-receiver", "-search.latencyOffset=12s",
                 "-evaluationInterval=5s", "-remoteWrite.url=http://victoria-metrics:8428"):  # fmt: skip
        assert flag in readme, flag
    # The page is complete with the default resend delays, which the kit keeps.
    assert "--rules.alert.resend-delay" not in readme and "-rule.resendDelay" not in readme
    assert "resend" not in (DEPLOY / "compose.yaml").read_text()
    vmalert = require_tool("vmalert", "victoria-metrics")
    checked = run(vmalert, "-rule=gradtel-rules.yml", "-dryRun")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alertmanager_config_and_routes() -> None:
    amtool = require_tool("amtool", "prometheus-alertmanager")
    checked = run(amtool, "check-config", "alertmanager.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for labels, receiver in (
        (["alertname=GradtelNaNGradients", "severity=critical", "kind=nan"], "pager"),
        (["alertname=GradtelInfGradients", "severity=warning", "kind=inf"], "chat"),
        (["alertname=GradtelExporterDown", "severity=warning"], "chat"),
        (["alertname=GradtelTrainingStalled", "severity=warning"], "chat"),
    ):
        routed = run(
            amtool,
            "config",
            "routes",
            "test",
            "--config.file=alertmanager.yml",
            f"--verify.receivers={receiver}",
            *labels,
        )
        assert routed.returncode == 0, (labels, routed.stdout + routed.stderr)
    wrong = run(
        amtool, "config", "routes", "test", "--config.file=alertmanager.yml",
        "--verify.receivers=chat", "severity=critical",
    )  # fmt: skip
    assert wrong.returncode != 0
    inhibit = yaml.safe_load((PROMETHEUS / "alertmanager.yml").read_text())["inhibit_rules"]
    assert inhibit == [
        {
            "source_matchers": ['severity="critical"'],
            "target_matchers": ['severity="warning"'],
            "equal": ["alertname", "job", "run", "kind"],
        },
        {
            "source_matchers": ['alertname="GradtelAmpLossScaleCollapsed"'],
            "target_matchers": ['alertname="GradtelAmpOverflowSkips"'],
            "equal": ["job", "run"],
        },
    ]


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Alertmanager with the committed alertmanager.yml: its URL."""
    binary = require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    folder, port = tmp_path_factory.mktemp("alertmanager"), free_port()
    with open(folder / "log", "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={PROMETHEUS / 'alertmanager.yml'}",
             f"--storage.path={folder}", f"--web.listen-address=127.0.0.1:{port}",
             "--cluster.listen-address="],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _answers(url + "/-/ready"):
            assert process.poll() is None and time.monotonic() < deadline, (
                folder / "log"
            ).read_text()
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _post_alerts(url: str, *alerts: dict[str, str]) -> None:
    body = json.dumps([{"labels": labels} for labels in alerts]).encode()
    request = urllib.request.Request(
        url + "/api/v2/alerts", body, {"Content-Type": "application/json"}
    )
    urllib.request.urlopen(request, timeout=10).close()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.mark.slow
def test_a_critical_alert_inhibits_the_warning_of_its_own_alert_only(alertmanager: str) -> None:
    """With the labels the rules give them: a critical alert without ``kind`` (or without
    ``run``) mutes no other alert's warning of its run (or job)."""
    job = {"job": "gradtel"}
    run = {**job, "run": "inhibit"}
    critical, warning = {"severity": "critical"}, {"severity": "warning"}
    alerts = {  # the critical ones first: Alertmanager's inhibitor learns of them in order
        "NaN critical": {"alertname": "GradtelNaNGradients", **run, "kind": "nan", **critical},
        "drifted": {"alertname": "GradtelReplicaDrifted", **run, **critical},
        "crashed, no run": {"alertname": "GradtelTrainingCrashed", **job, **critical},
        "collapsed": {"alertname": "GradtelAmpLossScaleCollapsed", **run, **critical},
        "NaN warning": {"alertname": "GradtelNaNGradients", **run, "kind": "nan", **warning},
        "Inf warning": {"alertname": "GradtelInfGradients", **run, "kind": "inf", **warning},
        "NaN warning, other run": {
            "alertname": "GradtelNaNGradients", **job, "run": "other", "kind": "nan", **warning,
        },
        "stalled": {"alertname": "GradtelTrainingStalled", **run, **warning},
        "blind": {"alertname": "GradtelNothingScanned", **run, **warning},
        "spike": {"alertname": "GradtelGradNormSpike", **run, **warning},
        "skips": {"alertname": "GradtelAmpOverflowSkips", **run, **warning},
        "down, no run": {"alertname": "GradtelExporterDown", **job, "instance": "t:9464", **warning},
    }  # fmt: skip
    _post_alerts(alertmanager, *alerts.values())
    names = {frozenset(labels.items()): name for name, labels in alerts.items()}

    def states() -> dict[str, str]:
        found = _get(alertmanager + "/api/v2/alerts?filter=job%3D%22gradtel%22")
        return {names[frozenset(a["labels"].items())]: a["status"]["state"] for a in found}

    # Once the last critical alert mutes its warning, the inhibitor knows them all.
    deadline = time.monotonic() + 15
    while states().get("skips") != "suppressed" and time.monotonic() < deadline:
        time.sleep(0.1)
    found = states()
    assert set(found) == set(alerts)
    assert {name for name, state in found.items() if state == "suppressed"} == {
        "NaN warning",
        "skips",
    }, found


@pytest.mark.slow
def test_the_targets_of_a_job_that_went_down_together_are_one_notification(
    alertmanager: str,
) -> None:
    """GradtelExporterDown is one alert per target: Alertmanager groups a job's."""
    down = [
        {"alertname": "GradtelExporterDown", "job": "grouped", "instance": f"trainer-{r}:9464",
         "severity": "warning"}
        for r in range(4)
    ]  # fmt: skip
    _post_alerts(alertmanager, *down)
    groups = _get(alertmanager + "/api/v2/alerts/groups?filter=job%3D%22grouped%22")
    assert [(g["receiver"]["name"], g["labels"], len(g["alerts"])) for g in groups] == [
        ("chat", {"alertname": "GradtelExporterDown", "job": "grouped"}, 4)
    ]


def test_every_alert_links_an_anchor_of_the_runbook() -> None:
    rules = yaml.safe_load((PROMETHEUS / "gradtel-rules.yml").read_text())
    runbook = (PROMETHEUS / "runbook.md").read_text()
    anchors = {line[3:].strip().lower() for line in runbook.splitlines() if line.startswith("## ")}
    alerts = [r for group in rules["groups"] for r in group["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == {
        "GradtelNaNGradients", "GradtelInfGradients", "GradtelExporterDown", "GradtelTrainingStalled",
        "GradtelNothingScanned", "GradtelAmpOverflowSkips", "GradtelAmpLossScaleCollapsed", "GradtelGradNormSpike",
        "GradtelTrainingCrashed", "GradtelReplicaDrifted", "GradtelRankDisagrees",
    }  # fmt: skip
    for alert in alerts:
        assert alert["annotations"]["runbook_url"].rsplit("#", 1)[1] in anchors
        assert set(alert["annotations"]) == {"summary", "description", "runbook_url"}
        assert "{{" not in alert["annotations"]["summary"]  # static summary
        assert alert["labels"]["severity"] in ("warning", "critical")
        if alert["alert"] in (
            "GradtelNaNGradients",
            "GradtelInfGradients",
            "GradtelTrainingCrashed",
        ):
            # One scrape and one evaluation interval: every rank's scrape of the update (or its last) is in.
            assert alert["for"] == "10s"
        if alert["alert"].endswith("Gradients"):
            assert "increase(gradtel_unhealthy_updates_total" in alert["expr"]


def test_other_thresholds_render_a_consistent_kit_that_passes_its_own_tests(
    tmp_path: Path,
    prometheus_bin: Path,  # noqa: F811
) -> None:
    promtool = str(prometheus_bin / "promtool")
    assert main(
        ["render", "--out", str(tmp_path), "--warning", "2", "--critical", "10",
         "--window", "5m", "--stall-after", "3m", "--job", "trainer", "--amp-skip-ratio", "0.25",
         "--spike-factor", "4", "--spike-baseline", "30m", "--spike-history", "5m", "--amp-scale-floor", "0.5",
         "--scrape-interval", "30s", "--evaluation-interval", "29s"]
    ) == 0  # fmt: skip
    # The window, stall time and intervals at the edges of what the rule tests are written for.
    folder = tmp_path / "prometheus"
    tested = run(promtool, "test", "rules", "gradtel-rules.test.yml", cwd=folder)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = (folder / "gradtel-rules.yml").read_text()
    assert "more than 10 NaN gradient values" in rules and "more than 2 and at most 10" in rules
    assert 'job="trainer"' in rules and "[5m]" in rules and "> 0.25" in rules
    assert "[1m30s] offset 3m30s)" in rules  # half the stall time; the stall and a scrape
    assert "for: 59s" in rules
    assert '> 4 * quantile_over_time(0.5, gradtel_grad_norm{job="trainer"}[30m])' in rules
    assert "[30m] offset 5m)" in rules and "< time() - 300" in rules
    assert 'last_over_time(gradtel_amp_loss_scale{job="trainer"}[5m]) < 0.5' in rules
    assert "| warning  | more than 2 and at most 10 |" in (folder / "runbook.md").read_text()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"window": "ten minutes"},
            ValueError,
            r"window must be a Prometheus duration .* got 'ten minutes'",
        ),
        ({"window": "0m"}, ValueError, r"window must be longer than 0, got '0m'"),
        ({"stall_after": ""}, ValueError, r"stall_after must be a Prometheus duration"),
        ({"job": "my job"}, ValueError, r"job must be a plain Prometheus job name .* got 'my job'"),
        (
            {"runbook_url": "runbook.md"},
            ValueError,
            r"runbook_url must be an http\(s\) URL, got 'runbook.md'",
        ),
        ({"thresholds": 5}, TypeError, r"thresholds must be a gradtel.Thresholds, got 5"),
        (
            {"amp_skip_ratio": 1.0},
            ValueError,
            r"amp_skip_ratio must be a number between 0 and 1 \(exclusive\), got 1.0",
        ),
        ({"amp_skip_ratio": "half"}, ValueError, r"amp_skip_ratio must be .* got 'half'"),
        (
            {"amp_scale_floor": 0},
            ValueError,
            r"amp_scale_floor must be a finite number above 0, got 0",
        ),
        (
            {"amp_scale_floor": "1"},
            ValueError,
            r"amp_scale_floor must be a finite number above 0, got '1'",
        ),
        ({"spike_factor": 1}, ValueError, r"spike_factor must be a finite number above 1, got 1"),
        (
            {"disagree_factor": 0.5},
            ValueError,
            r"disagree_factor must be a finite number above 1, got 0.5",
        ),
        (
            {"disagree_for": "soon"},
            ValueError,
            r"disagree_for must be a Prometheus duration .*'soon'",
        ),
        (
            {"spike_factor": True},
            ValueError,
            r"spike_factor must be a finite number above 1, got True",
        ),
        (
            {"spike_baseline": "hour"},
            ValueError,
            r"spike_baseline must be a Prometheus duration .* got 'hour'",
        ),
        (
            {"spike_history": "1h"},
            ValueError,
            r"spike_history must be shorter than spike_baseline \('1h'\), got '1h'",
        ),
        (
            {"scrape_interval": "often"},
            ValueError,
            r"scrape_interval must be a Prometheus duration .* got 'often'",
        ),
        (
            {"evaluation_interval": "0s"},
            ValueError,
            r"evaluation_interval must be longer than 0, got '0s'",
        ),
        (
            {"targets": "node-1:9464"},
            ValueError,
            r"targets must be a list of 'host:port' strings .* got 'node-1:9464'",
        ),
        ({"targets": []}, ValueError, r"targets must be a list of 'host:port' strings"),
        (
            {"targets": ["node-1"]},
            ValueError,
            r"targets must be 'host:port' with a port from 1 to 65535, .* got 'node-1'",
        ),
        (
            {"targets": ["http://node-1:9464/metrics"]},
            ValueError,
            r"\(no scheme, no path\), got 'http://node-1:9464/metrics'",
        ),
        ({"targets": ["node-1:65536"]}, ValueError, r"got 'node-1:65536'"),
        ({"alertmanager": "am"}, ValueError, r"alertmanager must be 'host:port' .* got 'am'"),
        (
            {"pager_url": "pagerduty"},
            ValueError,
            r"pager_url must be an http\(s\) webhook URL .* got 'pagerduty'",
        ),
        (
            {"chat_url": "ftp://chat/hook"},
            ValueError,
            r"chat_url must be an http\(s\) webhook URL .* got 'ftp://chat/hook'",
        ),
    ],
)
def test_bad_kit_options(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        KitOptions(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # A stall time under 2s rendered last_over_time(...[0s]): Prometheus refuses the file.
        ({"stall_after": "1s"}, r"stall_after must span at least 4 scrape intervals \(20s .*'1s'"),
        ({"window": "1s"}, r"window must span at least 4 scrape intervals \(20s .*'1s'"),
        (
            {"scrape_interval": "20m"},
            r"window must span at least 4 scrape intervals \(1h20m .*'10m'",
        ),
    ],
)
def test_options_whose_alerts_could_not_fire_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KitOptions(**kwargs)


def test_write_kit_refuses_a_disagreement_time_its_rule_tests_are_not_written_for(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"disagree_for must be longer than 1m .* got '1m'"):
        write_kit(tmp_path, KitOptions(disagree_for="1m"))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--window", "4m"], "window must be at least 5m"),
        (["--stall-after", "210s"], "stall_after must be a whole number of minutes, at least 3m"),
        (["--stall-after", "2m"], "stall_after must be a whole number of minutes, at least 3m"),
        (["--spike-baseline", "3m", "--spike-history", "1m"], "spike_baseline must be at least 4m"),
        (["--scrape-interval", "1m"], "scrape_interval must be under 1m with evaluation_interval"),
    ],
)
def test_render_refuses_options_its_rule_tests_are_not_written_for(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["render", "--out", str(tmp_path), *argv]) == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_render_command_renders_a_kit_for_your_own_job(tmp_path: Path) -> None:
    assert main(
        ["render", "--out", str(tmp_path), "--targets", "node-1:9464,node-1:9465,[fd00::2]:9464",
         "--alertmanager", "alerts.example:9093", "--pager-url", "https://pager.example/hook",
         "--chat-url", "https://chat.example/hook", "--scrape-interval", "15s", "--evaluation-interval", "30s"]
    ) == 0  # fmt: skip
    folder = tmp_path / "prometheus"
    config = yaml.safe_load((folder / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"] == [
        {"targets": ["node-1:9464", "node-1:9465", "[fd00::2]:9464"]}
    ]
    assert config["scrape_configs"][0]["scrape_interval"] == "15s"
    assert config["global"]["evaluation_interval"] == "30s"
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alerts.example:9093"
    ]
    routing = yaml.safe_load((folder / "alertmanager.yml").read_text())
    assert {r["name"]: r["webhook_configs"][0]["url"] for r in routing["receivers"]} == {
        "pager": "https://pager.example/hook", "chat": "https://chat.example/hook",
    }  # fmt: skip
    rules = (folder / "gradtel-rules.yml").read_text()
    assert "for: 45s" in rules
    for rendered in ("prometheus.yml", "alertmanager.yml", "gradtel-rules.yml"):
        assert (
            "Do not edit by hand:\n# re-render with `gradtel render"
            in (folder / rendered).read_text()
        )


def test_render_command_reports_bad_targets_and_urls(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["render", "--out", str(tmp_path), "--targets", "node-1:9464,node-2"]) == 1
    assert "gradtel render: targets must be 'host:port'" in capsys.readouterr().err
    assert main(["render", "--out", str(tmp_path), "--pager-url", "pager"]) == 1
    assert "gradtel render: pager_url must be an http(s) webhook URL" in capsys.readouterr().err
    assert main(["render", "--out", str(tmp_path), "--scrape-interval", "often"]) == 1
    assert (
        "gradtel render: scrape_interval must be a Prometheus duration" in capsys.readouterr().err
    )
    assert not list(tmp_path.iterdir())


def test_render_command_reports_bad_thresholds(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["render", "--out", str(tmp_path), "--warning", "6", "--critical", "5"]) == 1
    assert "Thresholds.warning (6) must be <= Thresholds.critical (5)" in capsys.readouterr().err
    assert Thresholds().critical == 5


def test_kubernetes_example_is_consistent() -> None:
    folder = DEPLOY / "kubernetes"
    monitor = yaml.safe_load((folder / "podmonitor.yaml").read_text())
    rule = yaml.safe_load((folder / "prometheusrule.yaml").read_text())
    job = yaml.safe_load((folder / "training-job.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    # The same rules as the plain Prometheus kit.
    assert rule["spec"] == yaml.safe_load((PROMETHEUS / "gradtel-rules.yml").read_text())
    pod = job["spec"]["template"]
    container = pod["spec"]["containers"][0]
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert endpoint["port"] in {p["name"] for p in container["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["relabelings"] == [
        {"targetLabel": "job", "replacement": "gradtel", "action": "replace"}
    ]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GRADTEL_ADDR"] == "0.0.0.0"
    assert int(env["GRADTEL_PORT"]) == container["ports"][0]["containerPort"]
    probe = container["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": endpoint["port"]}
