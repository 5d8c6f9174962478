"""The Prometheus versions the kit is tested on: Debian's 2.x on PATH, and Debian unstable's
3.x that ``scripts/setup.sh test debian`` unpacks into ``.prometheus3/`` (as root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gradtel.tools.stack import prometheus_version

from .conftest import require_tool

PROMETHEUS3 = Path(__file__).resolve().parent.parent / ".prometheus3" / "usr" / "bin"
VERSIONS = ("2.x", "3.x")
"""The majors every Prometheus test runs on."""


def bin_folder(version: str) -> Path:
    """The folder holding ``prometheus`` and ``promtool`` of ``version`` ("2.x" or "3.x");
    missing fails in CI and skips elsewhere, as :func:`require_tool` does."""
    if version == "2.x":
        folder = Path(require_tool("prometheus", "prometheus")).parent
    else:
        folder = PROMETHEUS3
        if not (folder / "promtool").exists():
            message = f"Prometheus 3.x is not in {folder}; `sudo bash scripts/setup.sh test debian` unpacks it"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    major = prometheus_version(str(folder / "prometheus"))[0]
    assert f"{major}.x" == version, (
        f"{folder / 'prometheus'} is Prometheus {major}.x, not {version}"
    )
    return folder


@pytest.fixture(params=VERSIONS)
def prometheus_bin(request: pytest.FixtureRequest) -> Path:
    """The folder of each tested Prometheus version's binaries, in turn."""
    return bin_folder(request.param)
