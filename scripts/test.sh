#!/usr/bin/env bash
# The test suite: set up on a fresh machine (as root this installs Prometheus and
# Alertmanager from Debian), type-check src/, run every test and doctest, then the
# collector's tests on the oldest and the newest torch gradtel supports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test debian
.venv/bin/python -m mypy
.venv/bin/python -m pytest "$@"
# The whole suite, not a selection: the collector's tests again on the oldest and newest torch.
[ $# -gt 0 ] || bash scripts/other-torch.sh
