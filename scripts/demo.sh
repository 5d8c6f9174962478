#!/usr/bin/env bash
# The main job: set up on a fresh machine, then run `gradtel demo` (arguments pass through;
# with --stack the deploy extra and the Debian prometheus and prometheus-alertmanager
# packages are installed too).
set -euo pipefail
cd "$(dirname "$0")/.."
words=()
for arg in "$@"; do [ "$arg" = --stack ] && words=(deploy debian); done
bash scripts/setup.sh "${words[@]}"
exec .venv/bin/gradtel demo "$@"
