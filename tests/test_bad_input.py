"""Every public entry point refuses bad input with the argument, the bad value and what is
allowed in the message: the monitor's options and methods, attach(), clipping, the
endpoint, TLS, OTLP and the environment. (The deploy kit's and the command line's
options are tested with them.)"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from torch import nn

import gradtel
from gradtel import GradMonitor, serve
from gradtel.export.otlp import otlp_meter_provider
from gradtel.render import KitOptions

from .conftest import Net, net, net_backward
from .test_grad_norm import trained
from .test_hooks import make

CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    (
        "empty model",
        lambda: gradtel.GradMonitor(nn.Sequential()),
        ValueError,
        r"model has no trainable parameters \(requires_grad=True\)",
    ),
    (
        "empty iterable",
        lambda: gradtel.GradMonitor([]),
        ValueError,
        r"model has no trainable parameters",
    ),
    (
        "model as a string",
        lambda: gradtel.GradMonitor("resnet"),
        TypeError,
        r"model must be a torch.nn.Module or an iterable of \(name, Parameter\) pairs, got 'resnet' \(str\)",
    ),
    (
        "a tensor for a model",
        lambda: gradtel.GradMonitor(torch.ones(2)),
        TypeError,
        r"model must be a torch.nn.Module .* \(Tensor\)",
    ),
    (
        "unknown option",
        lambda: gradtel.GradMonitor(nn.Linear(2, 2), on_nan="raise"),
        TypeError,
        r"unexpected keyword argument 'on_nan'",
    ),
    (
        "huge max_layers",
        lambda: gradtel.GradMonitor(nn.Linear(2, 2), max_layers=10**6),
        ValueError,
        r"max_layers must be from 1 to 1998, got 1000000",
    ),
    (
        "bool max_layers",
        lambda: gradtel.GradMonitor(nn.Linear(2, 2), max_layers=True),
        TypeError,
        r"max_layers must be a positive int, got True \(bool\)",
    ),
    (
        "float layer_depth",
        lambda: gradtel.GradMonitor(nn.Linear(2, 2), layer_depth=1.5),
        TypeError,
        r"layer_depth must be a positive int or None, got 1.5 \(float\)",
    ),
    (
        "thresholds as a dict",
        lambda: gradtel.GradMonitor(nn.Linear(2, 2), thresholds={"warning": 0}),
        TypeError,
        r"thresholds must be a gradtel.Thresholds, got \{'warning': 0\} \(dict\)",
    ),
    (
        "policy in capitals",
        lambda: gradtel.GradMonitor(nn.Linear(2, 2), on_critical="RAISE"),
        ValueError,
        r"on_critical must be one of 'ignore', 'warn', 'raise', 'skip', got 'RAISE'",
    ),
    (
        "incident_log as a number",
        lambda: gradtel.GradMonitor(nn.Linear(2, 2), incident_log=7),
        TypeError,
        r"incident_log must be a file path \(str or os.PathLike\) or None, got 7 \(int\)",
    ),
    (
        "incident_log with an unknown placeholder",
        lambda: gradtel.GradMonitor(nn.Linear(2, 2), incident_log="runs/{host}.jsonl"),
        ValueError,
        r"incident_log may hold no placeholder but \{rank\}, got 'runs/\{host\}.jsonl'",
    ),
    (
        "negative warning",
        lambda: gradtel.Thresholds(warning=-3, critical=5),
        ValueError,
        r"Thresholds.warning must be >= 0, got -3; allowed: integers with 0 <= warning <= critical",
    ),
    (
        "string critical",
        lambda: gradtel.Thresholds(critical="5"),
        TypeError,
        r"Thresholds.critical must be an int count, got '5' \(str\)",
    ),
    (
        "port as a string",
        lambda: gradtel.serve(port="9464"),
        TypeError,
        r"port must be an int from 0 to 65535, got '9464' \(str\)",
    ),
    (
        "port too high",
        lambda: gradtel.serve(port=65536),
        ValueError,
        r"port must be from 0 to 65535 \(0 picks a free port\), got 65536",
    ),
    (
        "exit_grace negative",
        lambda: gradtel.serve(port=0, exit_grace=-5),
        ValueError,
        r"exit_grace must be a number of seconds >= 0, got -5",
    ),
    (
        "clip without a monitor",
        lambda: gradtel.clip_grad_norm_(nn.Linear(2, 2).parameters(), 1.0, monitor=None),
        TypeError,
        r"monitor must be a gradtel.GradMonitor, got None \(NoneType\)",
    ),
    (
        "attach to a model",
        lambda: gradtel.GradMonitor(nn.Linear(2, 2)).attach(nn.Linear(2, 2)),
        TypeError,
        r"optimizer must be a torch.optim.Optimizer, got Linear",
    ),
    (
        "otlp interval",
        lambda: otlp_meter_provider("http://127.0.0.1:1/v1/metrics", interval=-1),
        ValueError,
        r"interval must be a number of seconds > 0, got -1",
    ),
    (
        "render window",
        lambda: KitOptions(window="5 minutes"),
        ValueError,
        r"window must be a Prometheus duration such as '90s', '10m' or '1h30m', got '5 minutes'",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    case: str, call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GRADTEL_PORT", "abc", r"GRADTEL_PORT must be an integer from 0 to 65535, got 'abc'"),
        (
            "GRADTEL_PORT",
            "99999",
            r"GRADTEL_PORT must be from 0 to 65535 \(0 picks a free port\), got 99999",
        ),
        ("GRADTEL_PORT", "-1", r"GRADTEL_PORT must be from 0 to 65535 .* got -1"),
        ("GRADTEL_PORT", "", r"GRADTEL_PORT must be an integer from 0 to 65535, got ''"),
        (
            "GRADTEL_ADDR",
            "",
            r"GRADTEL_ADDR must be a non-empty host address such as '127.0.0.1' or '0.0.0.0', got ''",
        ),
        ("GRADTEL_TLS_CERT", "/nowhere/cert.pem", r"tls_cert is set but tls_key is not"),
        (
            "GRADTEL_TLS_CLIENT_CA",
            "/nowhere/ca.pem",
            r"tls_client_ca \('/nowhere/ca.pem'\) needs tls_cert and tls_key",
        ),
    ],
)
def test_malformed_environment(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        gradtel.serve()


@pytest.mark.parametrize(
    ("norms", "error", "message"),
    [
        (
            torch.ones(2),
            ValueError,
            r"norms must be a 1-D tensor with one norm per watched parameter \(6, .*got a tensor of shape \(2,\)",
        ),
        (torch.ones(6, 1), ValueError, r"got a tensor of shape \(6, 1\)"),
        ([1.0] * 6, TypeError, r"norms must be .* got list"),
        ({"head.weight": 1.0}, TypeError, r"got dict"),
    ],
)
def test_bad_norms_are_refused(
    provider: MeterProvider, norms: object, error: type, message: str
) -> None:
    model = Net()
    monitor = GradMonitor(model, meter_provider=provider)
    net_backward(model)
    with pytest.raises(error, match=message):
        monitor.collect(norms=norms)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "sample_every must be >= 1, got 0"),
        (-2, ValueError, "sample_every must be >= 1, got -2"),
        (1.5, TypeError, r"sample_every must be a positive int, got 1.5 \(float\)"),
        (True, TypeError, r"sample_every must be a positive int, got True \(bool\)"),
        ("2", TypeError, r"sample_every must be a positive int, got '2' \(str\)"),
    ],
)
def test_bad_sample_every(value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        GradMonitor(nn.Linear(2, 2), sample_every=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "message"),
    [
        (None, {}, TypeError, r"model must be a torch.nn.Module or an iterable .* got None"),
        (42, {}, TypeError, r"model must be a torch.nn.Module .* got 42 \(int\)"),
        ([("w", 1.0)], {}, TypeError, r"\(name, Parameter\) pairs .* got an item \('w', 1.0\)"),
        (nn.ReLU(), {}, ValueError, r"model has no trainable parameters"),
        (
            nn.Linear(2, 2).requires_grad_(False),
            {},
            ValueError,
            r"model has no trainable parameters \(requires_grad=True\)",
        ),
        (
            nn.Linear(2, 2),
            {"on_critical": "abort"},
            ValueError,
            r"on_critical must be one of 'ignore', 'warn', 'raise', 'skip', got 'abort'",
        ),
        (
            nn.Linear(2, 2),
            {"on_warning": None},
            TypeError,
            r"on_warning must be one of .* got None \(NoneType\)",
        ),
        (
            nn.Linear(2, 2),
            {"thresholds": (0, 5)},
            TypeError,
            r"thresholds must be a gradtel.Thresholds, got \(0, 5\) \(tuple\)",
        ),
        (
            nn.Linear(2, 2),
            {"max_layers": 5000},
            ValueError,
            r"max_layers must be from 1 to 1998, got 5000",
        ),
        (nn.Linear(2, 2), {"max_layers": 0}, ValueError, r"max_layers must be >= 1, got 0"),
        (
            nn.Linear(2, 2),
            {"on_error": "crash"},
            ValueError,
            r"on_error must be 'warn' or 'raise', got 'crash'",
        ),
        (
            nn.Linear(2, 2),
            {"meter_provider": "otel"},
            TypeError,
            r"meter_provider must be an OpenTelemetry MeterProvider, got 'otel'",
        ),
    ],
)
def test_bad_arguments_are_refused_clearly(
    model: object, kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        GradMonitor(model, **kwargs)  # type: ignore[arg-type]


def test_bad_norm_arguments_are_refused(provider: MeterProvider) -> None:
    model = trained(4)
    with pytest.raises(TypeError, match="grad_norm must be True or False, got 'yes'"):
        gradtel.GradMonitor(model, meter_provider=provider, grad_norm="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="layer_norms must be True or False, got 1"):
        gradtel.GradMonitor(model, meter_provider=provider, layer_norms=1)  # type: ignore[arg-type]
    monitor = gradtel.GradMonitor(model, meter_provider=provider)
    with pytest.raises(TypeError, match="total_norm must be a one-element tensor or None"):
        monitor.collect(total_norm=torch.ones(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"readout": "async"}, "readout must be 'sync' or 'deferred', got 'async'"),
        (
            {"readout": "deferred", "on_critical": "skip"},
            "on_critical='skip' must act on an update before optimizer.step.., but readout='deferred'",
        ),
        (
            {"readout": "deferred", "on_warning": "raise"},
            "use readout='sync' with on_warning='raise'",
        ),
    ],
)
def test_readouts_that_cannot_work_are_refused(
    provider: MeterProvider, kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        GradMonitor(net(), meter_provider=provider, **kwargs)  # type: ignore[arg-type]


def test_bad_checkpoint_arguments_are_refused(provider: MeterProvider) -> None:
    monitor = GradMonitor(net(), meter_provider=provider)
    with pytest.raises(TypeError, match=r"step must be an int >= 0 or None, got 'last'"):
        monitor.allow_checkpoint(step="last")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="all_ranks must be True or False, got 1"):
        monitor.allow_checkpoint(all_ranks=1)  # type: ignore[arg-type]
    from gradtel.integrations import Session

    with pytest.raises(TypeError, match="protect_checkpoints must be True or False, got 'yes'"):
        Session(None, None, False, {}, protect_checkpoints="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (("sgd",), {}, TypeError, r"optimizer must be a torch.optim.Optimizer, got 'sgd' \(str\)"),
        ((), {"scan": "epoch"}, ValueError, r"scan must be 'step' or 'backward', got 'epoch'"),
        ((), {"scaler": 1.0}, TypeError, r"scaler must be a torch.amp.GradScaler or None, got 1.0"),
    ],
)
def test_bad_attach_arguments(
    provider: MeterProvider, args: tuple, kwargs: dict, error: type, message: str
) -> None:
    _, optimizer, monitor = make(provider)
    with pytest.raises(error, match=message):
        monitor.attach(*(args or (optimizer,)), **kwargs)


@pytest.mark.parametrize("step", [True, -1, 1.5, "7"])
def test_a_step_that_is_not_a_count_is_refused(provider: MeterProvider, step: object) -> None:
    monitor = gradtel.GradMonitor(net(), meter_provider=provider)
    with pytest.raises(TypeError, match=r"step must be an int >= 0 or None, got"):
        monitor.collect(step=step)  # type: ignore[arg-type]


@pytest.mark.parametrize("argument", ["step", "loss"])
def test_attach_refuses_a_step_or_loss_that_is_not_a_function(
    provider: MeterProvider, argument: str
) -> None:
    model = net()
    monitor = gradtel.GradMonitor(model, meter_provider=provider)
    with pytest.raises(
        TypeError, match=rf"{argument} must be a function that returns this update's {argument}"
    ):
        monitor.attach(torch.optim.SGD(model.parameters()), **{argument: 5})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "env", "error", "message"),
    [
        (
            {"port": 70000},
            {},
            ValueError,
            r"port must be from 0 to 65535 \(0 picks a free port\), got 70000",
        ),
        ({"port": -1}, {}, ValueError, r"port must be from 0 to 65535 .* got -1"),
        (
            {"port": "9464"},
            {},
            TypeError,
            r"port must be an int from 0 to 65535, got '9464' \(str\)",
        ),
        ({"port": 9464.0}, {}, TypeError, r"port must be an int .* got 9464.0 \(float\)"),
        ({"addr": ""}, {}, ValueError, r"addr must be a non-empty host address .* got ''"),
        (
            {},
            {"GRADTEL_PORT": "abc"},
            ValueError,
            r"GRADTEL_PORT must be an integer from 0 to 65535, got 'abc'",
        ),
        (
            {},
            {"GRADTEL_PORT": "99999"},
            ValueError,
            r"GRADTEL_PORT must be from 0 to 65535 .* got 99999",
        ),
        ({}, {"GRADTEL_ADDR": " "}, ValueError, r"GRADTEL_ADDR must be a non-empty host address"),
        (
            {"on_error": "ignore"},
            {},
            ValueError,
            r"on_error must be 'warn' or 'raise', got 'ignore'",
        ),
    ],
)
def test_bad_endpoint_arguments(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict, env: dict, error: type, message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(error, match=message):
        serve(**kwargs)


def test_negative_exit_grace_is_refused() -> None:
    with pytest.raises(ValueError, match=r"exit_grace must be a number of seconds >= 0, got -1"):
        serve(port=0, exit_grace=-1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tls_cert": "server.crt"}, r"tls_cert is set but tls_key is not; HTTPS needs both"),
        ({"tls_key": "server.key"}, r"tls_key is set but tls_cert is not"),
        ({"tls_client_ca": "ca.crt"}, r"tls_client_ca \('ca.crt'\) needs tls_cert and tls_key"),
        (
            {"tls_cert": "/no/such.crt", "tls_key": "/no/such.key"},
            r"tls_cert must be a readable PEM file, got '/no/such.crt'",
        ),
        ({"stale_after": 0}, r"stale_after must be a number of seconds > 0, got 0"),
    ],
)
def test_bad_tls_and_health_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        serve(port=0, **kwargs)


@pytest.mark.parametrize(
    ("work", "env", "error", "message"),
    [
        (lambda: GradMonitor(nn.Linear(2, 2), meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry())),
         {"WORLD_SIZE": "abc"}, ValueError, r"WORLD_SIZE must be a positive integer, as torchrun sets it, got 'abc'"),
        (lambda: serve(port=0), {"WORLD_SIZE": "two"}, ValueError, r"WORLD_SIZE must be a positive integer"),
        (lambda: GradMonitor(nn.Linear(2, 2), meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry())),
         {"WORLD_SIZE": "2", "RANK": "first"}, ValueError, r"RANK must be a non-negative integer, .* got 'first'"),
        (lambda: gradtel.layer_name(None), {}, TypeError, r"param_name must be a parameter name \(str\) .* got None"),
        (lambda: gradtel.prometheus_meter_provider("x"), {}, TypeError,
         r"registry must be a prometheus_client.CollectorRegistry or None .* got 'x' \(str\)"),
        (lambda: serve(port=0, registry="x"), {}, TypeError, r"registry must be a prometheus_client.CollectorRegistry"),
        (lambda: serve(port=0, rank_offset="no"), {}, TypeError, r"rank_offset must be True or False, got 'no' \(str\)"),
        (lambda: serve(port=0, exit_grace=0).close(grace="5"), {}, ValueError, r"grace must be a number of seconds >= 0, got '5'"),
        (lambda: serve(port=0, exit_grace=0).close(grace=math.nan), {}, ValueError, r"grace must be a number of seconds >= 0, got nan"),
        (lambda: serve(), {"GRADTEL_PORT": "0_0"}, ValueError, r"GRADTEL_PORT must be an integer from 0 to 65535, got '0_0'"),
        (lambda: serve(), {"GRADTEL_PORT": "+80"}, ValueError, r"GRADTEL_PORT must be an integer from 0 to 65535, got '\+80'"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_clearly(
    monkeypatch: pytest.MonkeyPatch, work: object, env: dict[str, str], error: type, message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(error, match=message):
        work()  # type: ignore[operator]


@pytest.mark.parametrize("interval", [0, -1, "10"])
def test_bad_interval(interval: object) -> None:
    with pytest.raises(
        ValueError, match=f"interval must be a number of seconds > 0, got {interval!r}"
    ):
        otlp_meter_provider("http://127.0.0.1:1/v1/metrics", interval=interval)  # type: ignore[arg-type]


def test_a_loss_that_is_not_a_tensor_is_refused() -> None:
    model = net()
    monitor = gradtel.GradMonitor(
        model, meter_provider=gradtel.prometheus_meter_provider(CollectorRegistry())
    )
    with pytest.raises(TypeError, match=r"loss must be a tensor or None, got 1.5 \(float\)"):
        monitor.collect(loss=1.5)  # type: ignore[arg-type]
