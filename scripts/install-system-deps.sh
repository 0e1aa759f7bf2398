#!/usr/bin/env bash
# Install the Debian packages the test harness needs: prometheus (which brings promtool),
# and lua5.1 (tests/unit/test_argocd_health.py runs the chart's Argo CD health check in it).
#
#   sudo bash scripts/install-system-deps.sh    # (or as root)
#
# Idempotent: does nothing when prometheus, promtool and lua5.1 are already on PATH, and runs
# `apt-get update` only when the package is not installable from the current lists.
# The tests start their own Prometheus processes, so the system service the package
# starts is stopped and disabled again.
set -euo pipefail

log() { echo "install-system-deps: $*" >&2; }

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 \
    && command -v lua5.1 >/dev/null 2>&1; then
    log "prometheus, promtool and lua5.1 already installed: $(command -v prometheus)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -E bash "$0" "$@"
    fi
    log "ERROR: must run as root to apt-get install prometheus"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show prometheus lua5.1 >/dev/null 2>&1; then
    apt-get update
fi
# A policy-rc.d that refuses every start keeps the package's service from starting in
# the first place (container images usually have no init system to stop it with later).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get install -y --no-install-recommends prometheus lua5.1

# Belt and braces: if a service got started anyway, stop and disable it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl disable --now prometheus || true
fi
service prometheus stop >/dev/null 2>&1 || true
# The packaged daemon runs as the "prometheus" user; harness instances run as the tester.
if id prometheus >/dev/null 2>&1 && pids="$(pgrep -u prometheus -x prometheus)"; then
    kill $pids || true
fi

command -v promtool >/dev/null || { log "ERROR: promtool missing after install"; exit 1; }
command -v lua5.1 >/dev/null || { log "ERROR: lua5.1 missing after install"; exit 1; }
log "installed $(prometheus --version 2>&1 | head -1)"
