"""Thresholds, status classification and the per-update result."""

from __future__ import annotations

import dataclasses

import pytest

from gradtel import GradHealth, Status, Thresholds


@pytest.mark.parametrize(
    ("count", "expected"),
    [(0, Status.HEALTHY), (1, Status.WARNING), (5, Status.WARNING), (6, Status.CRITICAL)],
)
def test_default_bands_follow_tele_300(count: int, expected: Status) -> None:
    assert Thresholds().classify(count) is expected


def test_nan_and_inf_are_judged_separately_and_worst_wins() -> None:
    # 4 NaN + 4 Inf is 8 non-finite values, but each kind alone is only a warning.
    both_warning = GradHealth(nan_by_layer={"a": 4}, inf_by_layer={"b": 4})
    assert (both_warning.nan_status, both_warning.inf_status) == (Status.WARNING, Status.WARNING)
    assert both_warning.status is Status.WARNING
    mixed = GradHealth(nan_by_layer={"a": 1}, inf_by_layer={"b": 6})
    assert mixed.status is Status.CRITICAL


def test_totals_and_status_worked_out_once_belong_to_their_own_update() -> None:
    health = GradHealth(nan_by_layer={"fc1": 3}, inf_by_layer={"fc2": 6})
    assert (health.nan_total, health.inf_total, health.status) == (3, 6, Status.CRITICAL)
    assert health.status is health.status
    # A copy with other counts or another look is judged anew, never from the original's answer.
    assert dataclasses.replace(health, inf_by_layer={}).status is Status.WARNING
    assert dataclasses.replace(health, nan_by_layer={}, inf_by_layer={}).status is Status.HEALTHY
    assert dataclasses.replace(health, sampled=False).status is Status.UNKNOWN
    assert dataclasses.replace(health, nan_by_layer={"fc1": 1}).nan_total == 1
    assert health == GradHealth(nan_by_layer={"fc1": 3}, inf_by_layer={"fc2": 6})


def test_custom_thresholds() -> None:
    strict = Thresholds(warning=2, critical=2)
    assert [strict.classify(n) for n in (2, 3)] == [Status.HEALTHY, Status.CRITICAL]


def test_status_values_and_levels() -> None:
    assert [(s.value, s.level) for s in Status] == [
        ("unknown", -1),
        ("healthy", 0),
        ("warning", 1),
        ("critical", 2),
    ]
    assert Status("critical") is Status.CRITICAL


def test_top_layers_sum_nan_and_inf_per_layer() -> None:
    health = GradHealth(nan_by_layer={"a": 1, "b": 5}, inf_by_layer={"a": 6, "c": 2})
    assert health.top_layers(2) == [("a", 7), ("b", 5)]
    assert health.nan_total == 6 and health.inf_total == 8


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"warning": 5, "critical": 2},
            ValueError,
            r"warning \(5\) must be <= Thresholds.critical \(2\)",
        ),
        ({"warning": -1}, ValueError, r"warning must be >= 0, got -1"),
        ({"warning": 1.5}, TypeError, r"warning must be an int count, got 1.5 \(float\)"),
        ({"critical": "5"}, TypeError, r"critical must be an int count, got '5' \(str\)"),
        ({"critical": True}, TypeError, r"critical must be an int count, got True \(bool\)"),
    ],
)
def test_bad_thresholds_are_refused(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as raised:
        Thresholds(**kwargs)
    assert "allowed: integers with 0 <= warning <= critical" in str(raised.value)
