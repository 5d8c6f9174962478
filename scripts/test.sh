#!/usr/bin/env bash
# The test suite: set up on a fresh machine (as root this installs Prometheus and
# Alertmanager from Debian), type-check src/, run every test and doctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test debian
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
