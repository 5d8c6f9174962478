"""The incident record (``GradMonitor(incident_log=...)``, ``$GRADTEL_INCIDENT_LOG``) and
``gradtel incidents``: one JSON line per unhealthy, AMP-skipped or unscanned update, none
for a healthy one, with either read-out; a capped file; a failure to write that training
never sees; one file per rank; and the ranks' files merged into one timeline and drawn."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry

import gradtel
from gradtel import GradHealth, GradMonitor
from gradtel.export.incidents import IncidentLog
from gradtel.tools.cli import main

from .conftest import net, sample, samples
from .test_distributed import torchrun

FIELDS = {
    "step", "update", "time", "run", "rank", "host", "status", "amp_overflow", "unscanned", "nan", "inf",
    "nan_by_layer", "inf_by_layer", "first_bad_layer", "origin", "loss_finite", "grad_norm",
    "last_finite_grad_norm", "action",
}  # fmt: skip


def lines(path: Path) -> list[dict[str, Any]]:
    """The records of ``path``; a NaN or Infinity token fails the test (JSON has none)."""

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} written to {path}")

    if not path.exists():
        return []
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "GRADTEL_INCIDENT_LOG",
        "WORLD_SIZE",
        "RANK",
        "GRADTEL_RUN",
        "TORCHELASTIC_RUN_ID",
    ):
        monkeypatch.delenv(name, raising=False)


def backward(model: torch.nn.Module) -> torch.Tensor:
    model.zero_grad()
    loss = model(torch.randn(3, 4)).pow(2).mean()
    loss.backward()
    return loss


@pytest.mark.parametrize("readout", ["sync", "deferred"])
def test_each_kind_of_incident_writes_one_line_and_a_healthy_update_none(
    tmp_path: Path, provider: MeterProvider, readout: str
) -> None:
    path = tmp_path / "incidents.jsonl"
    model = net()
    monitor = GradMonitor(
        model,
        meter_provider=provider,
        incident_log=path,
        grad_norm=True,
        readout=readout,  # type: ignore[arg-type]
        on_warning="ignore",
        on_critical="warn",
    )
    loss = backward(model)
    healthy = monitor.collect(step=10, loss=loss)
    monitor.flush()
    assert lines(path) == []
    loss = backward(model)
    model[2].weight.grad[0, :3] = float("nan")  # type: ignore[index]
    model[0].bias.grad[0] = float("inf")
    monitor.collect(step=11, loss=loss)  # warning: 3 NaN, 1 Inf
    loss = backward(model)
    model[2].weight.grad[0, 0] = float("inf")  # type: ignore[index]
    monitor.collect(step=12, loss=loss, scaler=torch.amp.GradScaler("cpu"))  # AMP overflow
    model.zero_grad(set_to_none=True)
    monitor.collect(step=13)  # due, but no gradient to look at
    monitor.close()

    unhealthy, amp, unknown = lines(path)
    assert all(set(record) == FIELDS for record in (unhealthy, amp, unknown))
    assert [r["step"] for r in (unhealthy, amp, unknown)] == [11, 12, 13]
    assert [r["update"] for r in (unhealthy, amp, unknown)] == [2, 3, 4]  # the monitor's count
    assert unhealthy == {
        **unhealthy,
        "run": None,
        "rank": 0,
        "status": "warning",
        "amp_overflow": False,
        "unscanned": None,
        "nan": 3,
        "inf": 1,
        "nan_by_layer": {"2": 3},
        "inf_by_layer": {"0": 1},
        "first_bad_layer": "2",
        "origin": None,
        "loss_finite": True,
        "grad_norm": None,
        "action": "ignore",
    }
    assert unhealthy["host"] and abs(unhealthy["time"] - unknown["time"]) < 60
    assert unhealthy["last_finite_grad_norm"] > 0
    if readout == "sync":
        assert unhealthy["last_finite_grad_norm"] == pytest.approx(healthy.grad_norm)
    assert amp == {
        **amp,
        "status": "warning",
        "amp_overflow": True,
        "inf_by_layer": {"2": 1},
        "action": None,
    }
    assert unknown == {
        **unknown,
        "status": "unknown",
        "unscanned": "no_gradients",
        "nan": 0,
        "inf": 0,
        "nan_by_layer": {},
        "first_bad_layer": None,
        "action": None,
    }


def test_a_non_finite_loss_and_a_critical_update_are_recorded_as_they_were(
    tmp_path: Path, provider: MeterProvider
) -> None:
    path = tmp_path / "incidents.jsonl"
    model = net()
    monitor = GradMonitor(
        model, meter_provider=provider, incident_log=str(path), on_critical="skip"
    )
    model.zero_grad()
    x = torch.randn(3, 4)
    x[0, 0] = float("nan")
    loss = model(x).sum()
    loss.backward()
    monitor.collect(loss=loss)
    monitor.close()
    (record,) = lines(path)
    assert (record["step"], record["status"], record["loss_finite"], record["action"]) == (
        1,
        "critical",
        False,
        "skip",
    )
    assert record["nan"] == sum(record["nan_by_layer"].values()) > 5


def test_an_attached_monitor_records_the_users_step(
    tmp_path: Path, provider: MeterProvider
) -> None:
    path = tmp_path / "incidents.jsonl"
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = GradMonitor(model, meter_provider=provider, incident_log=path, on_warning="ignore")
    iter_num = 0
    handle = monitor.attach(optimizer, step=lambda: iter_num)
    for iter_num in (500, 501):
        model.zero_grad()
        x = torch.randn(3, 4)
        x[0, 0] = float("nan") if iter_num == 501 else x[0, 0]
        model(x).sum().backward()
        optimizer.step()
    handle.remove()
    monitor.close()
    assert [(r["step"], r["status"]) for r in lines(path)] == [(501, "critical")]


def test_after_a_rollback_the_update_number_orders_the_incidents(
    tmp_path: Path, provider: MeterProvider, capsys: pytest.CaptureFixture[str]
) -> None:
    """Steps 5 and 9 unhealthy, a rollback to the checkpoint of step 3, then step 6: the
    timeline is in step order, and the update column and the milliseconds tell when."""
    path = tmp_path / "incidents.jsonl"
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, incident_log=path, on_warning="ignore")

    def update(step: int, bad: bool) -> None:
        backward(model)
        if bad:
            model[0].bias.grad[0] = float("nan")
        monitor.collect(step=step)

    for step in range(1, 11):
        update(step, step in (5, 9))
    monitor.reset_health()
    for step in range(4, 8):
        update(step, step == 6)
    monitor.close()
    assert [(r["step"], r["update"]) for r in lines(path)] == [(5, 5), (9, 9), (6, 13)]
    assert main(["incidents", str(path)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[11] == "update"  # in a row: after the 1-word first bad layer, [9]
    assert [(row.split()[0], row.split()[9]) for row in rows] == [
        ("5", "5"), ("6", "13"), ("9", "9"),
    ]  # fmt: skip
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", row.split()[2]) for row in rows)


def test_a_sampled_out_update_is_no_incident(tmp_path: Path, provider: MeterProvider) -> None:
    path = tmp_path / "incidents.jsonl"
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, incident_log=path, sample_every=2)
    backward(model)
    monitor.collect()
    model.zero_grad(set_to_none=True)
    assert monitor.collect().sampled is False  # not due: not looked at, and no line
    monitor.close()
    assert lines(path) == []


def test_the_file_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "incidents.jsonl"
    errors: list[Exception] = []
    log = IncidentLog(path, on_error=errors.append, max_bytes=2000)
    bad = GradHealth(nan_by_layer={"encoder.layers.0.attn": 3}, step=0)
    for step in range(200):
        log.write(GradHealth(nan_by_layer=bad.nan_by_layer, step=step), "warn", 1.0e9)
    log.close()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incidents.jsonl", "incidents.jsonl.1"]
    assert path.stat().st_size <= 2000
    assert path.with_name("incidents.jsonl.1").stat().st_size <= 2000
    assert lines(path)[-1]["step"] == 199  # the newest is kept


def test_the_command_reads_the_rotated_file_first_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "incidents.jsonl"
    errors: list[Exception] = []
    log = IncidentLog(path, on_error=errors.append, max_bytes=2000)
    for step in range(1, 21):
        log.write(GradHealth(nan_by_layer={"encoder.layers.0.attn": 3}, step=step), "warn", 1e9)
    log.close()
    assert errors == []
    older = path.with_name("incidents.jsonl.1")
    kept = len(lines(older)) + len(lines(path))
    assert older.exists() and kept > len(lines(path))
    for given in ([path], [older, path], [path, older]):  # given or not, each file read once
        assert main(["incidents", *map(str, given)]) == 0
        out, err = capsys.readouterr()
        steps = [int(row.split()[0]) for row in out.splitlines()[1:]]
        assert steps == list(range(21 - kept, 21))
        said = f"also reading the older incidents of {older}"
        assert err.count(said) == (given == [path])


def test_an_unwritable_path_never_reaches_training_and_is_counted(
    tmp_path: Path, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    provider = gradtel.prometheus_meter_provider(registry)
    model = net()
    monitor = GradMonitor(
        model,
        meter_provider=provider,
        incident_log=blocker / "incidents.jsonl",
        on_warning="ignore",
    )
    for _ in range(3):
        backward(model)
        model[0].bias.grad[0] = float("nan")
        assert monitor.collect().nan_total == 1  # training goes on
    monitor.close()
    assert sample(samples(registry), "gradtel_errors_total", stage="incident_log") == 3
    failures = [r for r in caplog.records if "incident_log failed" in r.getMessage()]
    assert len(failures) == 1  # once a minute
    provider.shutdown()


def test_the_error_series_of_the_record_is_exported_at_0(
    registry: CollectorRegistry,
) -> None:
    provider = gradtel.prometheus_meter_provider(registry)
    GradMonitor(net(), meter_provider=provider).close()
    assert sample(samples(registry), "gradtel_errors_total", stage="incident_log") == 0
    provider.shutdown()


def unhealthy_update(path: object | None, provider: MeterProvider) -> None:
    model = net()
    monitor = GradMonitor(model, meter_provider=provider, incident_log=path, on_warning="ignore")  # type: ignore[arg-type]
    backward(model)
    model[0].bias.grad[0] = float("nan")
    monitor.collect()
    monitor.close()


def test_the_environment_turns_it_on_and_the_argument_wins(
    tmp_path: Path, provider: MeterProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = tmp_path / "env.jsonl"
    monkeypatch.setenv("GRADTEL_INCIDENT_LOG", str(from_env))
    unhealthy_update(None, provider)
    assert len(lines(from_env)) == 1
    unhealthy_update(tmp_path / "given.jsonl", provider)
    assert len(lines(tmp_path / "given.jsonl")) == 1 and len(lines(from_env)) == 1
    monkeypatch.setenv("GRADTEL_INCIDENT_LOG", "")  # empty: off
    unhealthy_update(None, provider)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.jsonl", "given.jsonl"]


def test_each_rank_of_several_writes_its_own_file(
    tmp_path: Path, provider: MeterProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("GRADTEL_RUN", "run-7")
    unhealthy_update(tmp_path / "incidents.jsonl", provider)
    unhealthy_update(tmp_path / "{rank}" / "incidents.jsonl", provider)  # its folder is made
    (suffixed,) = lines(tmp_path / "incidents.rank1.jsonl")
    (placed,) = lines(tmp_path / "1" / "incidents.jsonl")
    assert (suffixed["rank"], suffixed["run"], placed["rank"]) == (1, "run-7", 1)
    monkeypatch.delenv("WORLD_SIZE")  # one process: the path as given, {rank} is 0
    unhealthy_update(tmp_path / "single.jsonl", provider)
    unhealthy_update(tmp_path / "single-{rank}.jsonl", provider)
    assert len(lines(tmp_path / "single.jsonl")) == len(lines(tmp_path / "single-0.jsonl")) == 1


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (3, TypeError, r"incident_log must be a file path \(str or os.PathLike\) or None, got 3 \(int\)"),
        (b"x.jsonl", TypeError, r"incident_log must be a file path .* got b'x.jsonl' \(bytes\)"),
        ("", ValueError, r"incident_log must be a file path such as 'incidents.jsonl', got ''"),
        ("runs/{step}.jsonl", ValueError, r"incident_log may hold no placeholder but \{rank\}, got 'runs/\{step\}.jsonl'"),
    ],
)  # fmt: skip
def test_bad_incident_logs_are_refused(
    provider: MeterProvider, value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        GradMonitor(net(), meter_provider=provider, incident_log=value)  # type: ignore[arg-type]


def test_a_bad_environment_variable_is_refused(
    provider: MeterProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADTEL_INCIDENT_LOG", "runs/{Rank}.jsonl")
    with pytest.raises(ValueError, match=r"GRADTEL_INCIDENT_LOG may hold no placeholder but"):
        GradMonitor(net(), meter_provider=provider)


# gradtel incidents


def two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Each rank's file of a made-up job: rank 0 writes steps 2 and 7, rank 1 step 5."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, steps in (("0", (2, 7)), ("1", (5,))):
        monkeypatch.setenv("RANK", rank)
        log = IncidentLog(tmp_path / f"incidents.rank{rank}.jsonl", on_error=print)
        norm = GradHealth(grad_norm=0.5 + int(rank))
        log.write(norm, None, 0.0)  # healthy, leaves its norm
        for step in steps:
            health = GradHealth(
                nan_by_layer={"body.0": step}, inf_by_layer={"head": 1}, step=step, grad_norm=None
            )
            log.write(health, "warn", 1.7e9 + step)
        log.close()
    return sorted(tmp_path.glob("incidents.rank*.jsonl"))


def test_the_command_merges_the_ranks_in_step_order_and_skips_a_bad_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rank0, rank1 = two_ranks(tmp_path, monkeypatch)
    with rank1.open("a") as more:
        more.write("{not json\n[1, 2]\n")
    assert main(["incidents", str(rank0), str(rank1)]) == 0
    out, err = capsys.readouterr()
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["step", "time", "(UTC)", "rank"]
    assert [(row.split()[0], row.split()[3]) for row in rows] == [
        ("2", "0"),
        ("5", "1"),
        ("7", "0"),
    ]
    assert "body.0=7 head=1" in rows[2]
    assert (
        f"{rank1}:2: skipped, not JSON" in err and f"{rank1}:3: skipped, not a JSON object" in err
    )


def test_within_a_step_the_timeline_is_in_time_then_rank_order(tmp_path: Path) -> None:
    from gradtel.tools.incidents import read

    records = [(7, 2.0, 1), (7, 2.0, 0), (7, 1.0, 3), (6, 9.0, 2)]  # step, time, rank
    path = tmp_path / "incidents.jsonl"
    path.write_text(
        "".join(
            json.dumps({"step": s, "time": t, "rank": r, "status": "warning", "nan": 1, "inf": 0})
            + "\n"
            for s, t, r in records
        )
    )
    timeline = read([path])
    assert timeline.problems == []
    assert [(r["step"], r["time"], r["rank"]) for r in timeline.incidents] == sorted(records)


def test_plot_draws_a_picture_of_both_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import matplotlib.image

    files = two_ranks(tmp_path, monkeypatch)
    picture = tmp_path / "incidents.png"
    assert main(["incidents", *map(str, files), "--plot", str(picture)]) == 0
    assert 10_000 < picture.stat().st_size < 150_000
    pixels = matplotlib.image.imread(picture)
    assert pixels.shape[0] > 300 and pixels.std() > 0.05  # not blank


def test_plot_keeps_the_ten_layers_with_the_most_values_and_groups_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradtel.tools.incidents import OTHER_LAYERS, legend_layers, read

    path = tmp_path / "incidents.jsonl"
    log = IncidentLog(path, on_error=print)
    for step in (1, 2):  # a NaN spread to every layer, the most in the last ones
        log.write(GradHealth(nan_by_layer={f"l{i:02}": i for i in range(1, 31)}, step=step),
                  "warn", 1e9)  # fmt: skip
    log.close()
    legend = legend_layers(read([path]).incidents)
    assert list(dict.fromkeys(legend.values())) == [f"l{i:02}" for i in range(30, 20, -1)] + [
        OTHER_LAYERS
    ]
    assert len(legend) == 30
    picture = tmp_path / "incidents.png"
    assert main(["incidents", str(path), "--plot", str(picture)]) == 0
    assert "tight_layout" not in capsys.readouterr().err  # the legend fits beside the axes
    assert picture.stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files = two_ranks(tmp_path, monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["incidents", *map(str, files), "--plot", str(tmp_path / "p.png")]) == 1
    assert "pip install 'gradtel[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_a_missing_file_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["incidents", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl" in capsys.readouterr().err


# A real job


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("job")
    with pytest.MonkeyPatch.context() as patch:  # the launcher's environment, for every rank
        patch.setenv("GRADTEL_INCIDENT_LOG", str(folder / "incidents.jsonl"))
        run = torchrun("incident_trainer.py")
    assert run.returncode == 0, run.stderr[-3000:]
    yield folder


@pytest.mark.slow
def test_a_torchrun_job_gives_one_timeline_naming_both_ranks_incidents(job: Path) -> None:
    files = sorted(job.glob("*.jsonl"))
    assert [f.name for f in files] == ["incidents.rank0.jsonl", "incidents.rank1.jsonl"]
    run = subprocess.run(
        [sys.executable, "-m", "gradtel.tools.cli", "incidents", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stderr == "", run.stderr
    rows = [row.split() for row in run.stdout.splitlines()[1:]]
    # step, rank, origin: after the all-reduce both ranks hold each NaN; origin says whose.
    assert [r[0] for r in rows] == ["103", "103", "105", "105"], run.stdout  # step order
    assert sorted((r[0], r[3], r[10], r[11]) for r in rows) == [  # r[9]: the update number
        ("103", "0", "here", "NON-FINITE"),
        ("103", "1", "elsewhere", "finite"),
        ("105", "0", "elsewhere", "finite"),
        ("105", "1", "here", "NON-FINITE"),
    ], run.stdout
    assert all(r[5] == "critical" for r in rows)
