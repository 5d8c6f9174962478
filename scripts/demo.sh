#!/usr/bin/env bash
# The main job: set up on a fresh machine, then run `gradtel demo` (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gradtel demo "$@"
