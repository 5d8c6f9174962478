#!/usr/bin/env bash
# The test suite: set up on a fresh machine (as root this installs Prometheus and
# Alertmanager from Debian), type-check src/, lint and format-check the code with ruff,
# run every test and doctest, then the collector's tests on the oldest and the newest
# torch gradtel supports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test debian
.venv/bin/python -m mypy
# Lint and format check: the formatter's output is the house style.
.venv/bin/ruff check --quiet src tests benchmarks scripts
.venv/bin/ruff format --check --quiet src tests benchmarks scripts
# The whole suite on one worker more than there are cores, as most tests wait on real
# servers and processes (with two per core, the 1,024-rank replay's scrapes came late and
# its page counted fewer ranks). Tests that share a module-scoped fixture are one
# xdist_group, and pytest-xdist starts the groups first (the largest first); then the
# longest tests, in the order tests/conftest.py gives. A selection runs as given, so that
# what it prints with -s shows.
parallel=()
[ $# -gt 0 ] || parallel=(-n "$(($(nproc) + 1))" --dist loadgroup)
.venv/bin/python -m pytest "${parallel[@]}" "$@"
# The whole suite, not a selection: the collector's tests again on the oldest and newest torch.
[ $# -gt 0 ] || bash scripts/other-torch.sh
