"""Every public entry point refuses bad input with the argument, the bad value and what is
allowed in the message. (Each module's own tests hold more cases; this table covers the
edges across all of them: empty and huge models, unknown options, malformed environment.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradtel
from gradtel.otlp import otlp_meter_provider
from gradtel.render import KitOptions

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
