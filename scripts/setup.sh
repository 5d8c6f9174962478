#!/usr/bin/env bash
# Make .venv hold gradtel (editable). Words: "test" adds the test tools (and
# every extra but bench); "deploy" adds the deploy extra (gradtel render, demo
# --stack); "bench" adds the tools benchmarks/bench_peers.py measures; "debian" installs the Debian prometheus, prometheus-alertmanager and
# victoria-metrics packages (as root; otherwise says how). Idempotent: Python packages are
# re-installed only when pyproject.toml or the words change.
set -euo pipefail
cd "$(dirname "$0")/.."

with_test=no with_deploy=no with_bench=no with_debian=no
for word in "$@"; do
  case "$word" in
    test) with_test=yes ;;
    deploy) with_deploy=yes ;;
    bench) with_bench=yes ;;
    debian) with_debian=yes ;;
    *) echo "setup: unknown word '$word' (allowed: test, deploy, bench, debian)" >&2; exit 2 ;;
  esac
done
extras=none
[ "$with_deploy" = yes ] && extras=deploy
[ "$with_test" = yes ] && extras=test  # the test tools include every extra but bench
[ "$with_bench" = yes ] && extras="${extras/none/}${extras:+,}bench" && extras=${extras#,}

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.gradtel-setup
hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
# An install with the test tools also serves a plain or deploy one, a deploy one a plain
# one, and one with bench added serves one without it.
served() {
  case "$1" in
    "$extras" | "$extras,bench") return 0 ;;
    test | test,bench) [ "$extras" = none ] || [ "$extras" = deploy ] ;;
    deploy | deploy,bench) [ "$extras" = none ] ;;
    *) return 1 ;;
  esac
}
if [ "${have%% *}" != "$hash" ] || ! served "${have#* extras=}"; then
  echo "setup: installing Python packages into .venv" >&2
  # The CPU wheel, pinned: an unpinned torch would pull gigabytes of CUDA packages.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
  target="."
  [ "$extras" != none ] && target=".[$extras]"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$target"
  echo "$hash extras=$extras" >"$stamp"
fi

debian_packages="prometheus prometheus-alertmanager victoria-metrics"
if [ "$with_debian" = yes ] \
  && ! { command -v promtool && command -v prometheus-alertmanager && command -v vmalert; } >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages $debian_packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086 (a list of package names)
    apt-get install -y -qq --no-install-recommends $debian_packages >/dev/null
  else
    echo "setup: Prometheus/Alertmanager/VictoriaMetrics not found; as root run:" \
      "apt-get install -y --no-install-recommends $debian_packages" >&2
  fi
fi
