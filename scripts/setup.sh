#!/usr/bin/env bash
# Make .venv hold gradtel (editable) and, with "test", its test tools and the
# Debian prometheus/alertmanager packages. Idempotent: re-installs only when
# pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=${1:-}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.gradtel-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${extra}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv" >&2
  # The CPU wheel, pinned: an unpinned torch would pull gigabytes of CUDA packages.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
  target="."
  [ "$extra" = test ] && target=".[test]"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$target"
  echo "$want" >"$stamp"
fi

if [ "$extra" = test ] && ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages prometheus and prometheus-alertmanager" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null
  else
    echo "setup: promtool not found; as root run:" \
      "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager" >&2
  fi
fi
