#!/usr/bin/env bash
# Make .venv hold gradtel (editable). Words: "test" adds the test tools (and
# every extra but bench); "deploy" adds the deploy extra (gradtel render, demo
# --stack); "bench" adds the tools benchmarks/bench_peers.py measures; "debian" installs the
# Debian prometheus, prometheus-alertmanager and victoria-metrics packages, and unpacks
# Debian unstable's Prometheus 3.x and promtool into .prometheus3/ for the compatibility
# tests (as root; otherwise says how). Idempotent: Python packages are re-installed only
# when pyproject.toml or the words change.
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

# Prometheus 3.x beside Debian's 2.x: Debian unstable's packages, fetched under a private
# apt state from this machine's own Debian mirror and unpacked, never installed.
prometheus3=.prometheus3
if [ "$with_debian" = yes ] && [ ! -x "$prometheus3/usr/bin/promtool" ]; then
  if [ "$(id -u)" = 0 ]; then
    # The first non-security URI of this machine's apt sources (deb822 or one-line style).
    mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }
             /^deb[ \t]/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }' \
      | awk '!/security/ && !m { m = $0 } END { print m }' || true)
    [ -n "$mirror" ] || { echo "setup: no Debian mirror found in /etc/apt/sources*" >&2; exit 1; }
    echo "setup: unpacking Prometheus 3.x (Debian unstable, from $mirror) into $prometheus3" >&2
    state=$(mktemp -d)
    trap 'rm -rf "$state"' EXIT
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$state/sources.list"
    apt=(-o "Dir::State=$state" -o "Dir::State::status=/var/lib/dpkg/status" -o "Dir::Cache=$state/cache"
         -o "Dir::Etc::sourcelist=$state/sources.list" -o "Dir::Etc::sourceparts=-" -o "APT::Sandbox::User=root")
    apt-get "${apt[@]}" update -qq
    (cd "$state" && apt-get "${apt[@]}" download -qq prometheus promtool)
    rm -rf "$prometheus3"
    for package in "$state"/*.deb; do dpkg -x "$package" "$prometheus3"; done
    "$prometheus3/usr/bin/prometheus" --version | head -n 1 >&2
  else
    echo "setup: Prometheus 3.x not found in $prometheus3; run this as root to fetch it" >&2
  fi
fi
