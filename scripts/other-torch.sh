#!/usr/bin/env bash
# The collector's tests on the other torch releases gradtel supports: the oldest that
# pyproject.toml declares and the newest this machine installs. Each gets a virtual
# environment of its own (.venv-torch-VERSION, kept between runs, except with CI=true).
# On Linux x86-64 PyPI has only CUDA builds of torch: about 3 GB to fetch for each, which
# runs on the CPU all the same (the newest comes from local wheels where a machine has them).
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
case "$oldest" in *.*.*) ;; *) oldest="$oldest.0" ;; esac
newest=${GRADTEL_NEWEST_TORCH:-2.14.1}
# The collector, its telemetry and its endpoint; not the framework callbacks (their
# libraries pin torch versions of their own) nor the deploy kit's real servers.
core=(
  tests/test_scan.py tests/test_monitor.py tests/test_health.py tests/test_hooks.py
  tests/test_steps.py tests/test_deferred.py tests/test_clip.py
  tests/test_grad_norm.py tests/test_checkpoints.py tests/test_loops.py tests/test_layers.py
  tests/test_combinations.py tests/test_parameters.py tests/test_parts.py
  tests/test_crash.py tests/test_contract.py tests/test_fingerprint.py
  tests/test_exporter.py
)
# torch==$2 into the virtual environment of Python $1, one package at a time and without
# pip's cache: pip keeps every wheel it fetches until it exits, and a CUDA build's 3 GB of
# wheels beside their 5 GB unpacked did not fit a CI machine's disk.
install_torch() {
  local python=$1 version=$2 report
  report=$(mktemp)
  "$python" -m pip install --quiet --disable-pip-version-check --dry-run --report "$report" "torch==$version"
  "$python" -c 'import json, sys
for package in json.load(open(sys.argv[1]))["install"]:
    print(package["metadata"]["name"] + "==" + package["metadata"]["version"])' "$report" \
    | while read -r package; do
        "$python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps "$package"
      done
  rm -f "$report"
}

for version in "$oldest" "$newest"; do
  venv=.venv-torch-$version
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
  if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
    echo "other-torch: installing torch==$version into $venv ($(df -h --output=avail . | tail -n 1 | tr -d ' ') free on disk)" >&2
    install_torch "$venv/bin/python" "$version"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[deploy]' pytest hypothesis
  echo "other-torch: the collector's tests on torch $version" >&2
  "$venv/bin/python" -m pytest -p no:cacheprovider -q "${core[@]}" \
    -k "not lightning and not hugging_face and not transformers"
  # A fresh clone in CI never runs again: give the disk back before the next release.
  [ "${CI:-}" != true ] || rm -rf "$venv"
done
