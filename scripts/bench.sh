#!/usr/bin/env bash
# The performance benchmark: set up on a fresh machine, then print the table and the
# targets (about 10 minutes on 2 cores; --quick for a short smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python benchmarks/bench_scan.py "$@"
