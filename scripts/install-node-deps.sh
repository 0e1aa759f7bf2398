#!/usr/bin/env bash
# Install the Debian packages the harness's real node (tests/harness/containerd_node.py) needs
# next to the kubelet and containerd that scripts/build-tools.sh builds:
#   runc                         the OCI runtime containerd's runc shim calls (crun refuses a
#                                hybrid cgroup v1 host)
#   containernetworking-plugins  the CNI plugins bridge, host-local and loopback (/usr/lib/cni)
#   iptables, iproute2           the node's bridge, its DNAT rules and network namespaces
#
#   sudo bash scripts/install-node-deps.sh    # (or as root)
#
# Idempotent: does nothing when everything is already there, and runs `apt-get update` only
# when a package is not installable from the current lists. No service is started: the
# harness runs its own containerd and kubelet.
set -euo pipefail

log() { echo "install-node-deps: $*" >&2; }

cni_dir=/usr/lib/cni
have_all() {
    command -v runc >/dev/null 2>&1 && command -v iptables >/dev/null 2>&1 \
        && command -v ip >/dev/null 2>&1 && [ -x "$cni_dir/bridge" ] \
        && [ -x "$cni_dir/host-local" ] && [ -x "$cni_dir/loopback" ]
}

if have_all; then
    log "runc, iptables, ip and the CNI plugins in $cni_dir already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -E bash "$0" "$@"
    fi
    log "ERROR: must run as root to apt-get install the node's packages"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
packages=(runc containernetworking-plugins iptables iproute2)
if ! apt-cache show "${packages[@]}" >/dev/null 2>&1; then
    apt-get update
fi
apt-get install -y --no-install-recommends "${packages[@]}"

have_all || { log "ERROR: runc, iptables, ip or a CNI plugin still missing after install"; exit 1; }
log "installed $(runc --version | head -1), CNI plugins in $cni_dir"
