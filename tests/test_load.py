"""A short version of benchmarks/bench_load.py: training while 5 processes scrape."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_load import soak

pytestmark = pytest.mark.slow


def test_no_failed_scrapes_and_no_memory_growth_under_load() -> None:
    result = soak(clients=5, seconds=3, updates=8_000)
    assert result["scrapes"] > 100
    assert result["failed_scrapes"] == 0
    assert result["updates"] >= 8_000
    # Allocator noise aside, memory must not grow with updates or scrapes.
    assert result["rss_mib_end"] - result["rss_mib_start"] < 16, result
