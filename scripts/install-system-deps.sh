#!/usr/bin/env bash
# Install the Debian packages the test harness needs, all in one place:
#   prometheus (brings promtool)     a real Prometheus, and promtool for the alert rules
#   lua5.1                           the chart's Argo CD health check (tests/argocd_health.py)
#   buildah, podman, runc,           the images (scripts/build-images.sh, docs/images.md)
#   mmdebstrap
#   containernetworking-plugins,     the real node (tests/harness/containerd_node.py,
#   iptables, iproute2               docs/test-cluster.md); runc too
#
#   sudo bash scripts/install-system-deps.sh    # (or as root)
#
# Idempotent: does nothing when every command (or file) below is there, installs only the
# packages that are missing, and runs `apt-get update` only when one is not installable from
# the current lists. The tests start their own Prometheus processes, so the system service
# the package starts is stopped and disabled again.
set -euo pipefail

log() { echo "install-system-deps: $*" >&2; }

# What the harness runs, and the package that brings it: a command on PATH or an absolute path.
needs=(
    "prometheus prometheus"
    "promtool prometheus"
    "lua5.1 lua5.1"
    "buildah buildah"
    "podman podman"
    "runc runc"
    "mmdebstrap mmdebstrap"
    "iptables iptables"
    "ip iproute2"
    "/usr/lib/cni/bridge containernetworking-plugins"
    "/usr/lib/cni/host-local containernetworking-plugins"
    "/usr/lib/cni/loopback containernetworking-plugins"
)

present() {
    case "$1" in
        /*) [ -x "$1" ] ;;
        *) command -v "$1" >/dev/null 2>&1 ;;
    esac
}

missing_packages() {
    local need
    for need in "${needs[@]}"; do
        present "${need% *}" || echo "${need#* }"
    done | sort -u
}

mapfile -t packages < <(missing_packages)
if [ "${#packages[@]}" -eq 0 ]; then
    log "everything the harness needs is installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -E bash "$0" "$@"
    fi
    log "ERROR: must run as root to apt-get install ${packages[*]}"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show "${packages[@]}" >/dev/null 2>&1; then
    apt-get update
fi
# A policy-rc.d that refuses every start keeps a package's service (prometheus) from starting
# in the first place (container images usually have no init system to stop it with later).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
log "installing ${packages[*]}"
apt-get install -y --no-install-recommends "${packages[@]}"

# Belt and braces: if the Prometheus service got started anyway, stop and disable it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl disable --now prometheus || true
fi
service prometheus stop >/dev/null 2>&1 || true
# The packaged daemon runs as the "prometheus" user; harness instances run as the tester.
if id prometheus >/dev/null 2>&1 && pids="$(pgrep -u prometheus -x prometheus)"; then
    kill $pids || true
fi

mapfile -t still < <(missing_packages)
if [ "${#still[@]}" -ne 0 ]; then
    log "ERROR: still missing after install: ${still[*]}"
    exit 1
fi
log "installed ${packages[*]}"
