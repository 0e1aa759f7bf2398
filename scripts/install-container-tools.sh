#!/usr/bin/env bash
# Install the Debian packages that build and run the images without Docker or a registry:
# buildah (builds images/*.Dockerfile), podman (runs them in tests), runc (the OCI runtime:
# crun refuses a hybrid cgroup v1 host) and mmdebstrap (makes the local Debian base image).
#
#   sudo bash scripts/install-container-tools.sh    # (or as root)
#
# Idempotent: does nothing when every tool is already on PATH, and runs `apt-get update`
# only when a package is not installable from the current lists. scripts/build-images.sh
# calls it.
set -euo pipefail

log() { echo "install-container-tools: $*" >&2; }

tools=(buildah podman runc mmdebstrap)
missing=()
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -eq 0 ]; then
    log "buildah, podman, runc and mmdebstrap already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -E bash "$0" "$@"
    fi
    log "ERROR: must run as root to apt-get install ${missing[*]}"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
packages=(buildah podman runc mmdebstrap)
if ! apt-cache show "${packages[@]}" >/dev/null 2>&1; then
    apt-get update
fi
# Without recommends: no crun, criu, fuse-overlayfs or slirp4netns (root builds on the native
# overlay driver with runc); podman still gets containernetworking-plugins (a Depends).
apt-get install -y --no-install-recommends "${packages[@]}"

for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null || { log "ERROR: $tool missing after install"; exit 1; }
done
log "installed $(buildah --version), $(podman --version)"
