#!/usr/bin/env bash
# Build the two images (images/*.Dockerfile) with buildah: no Docker daemon, no registry.
#
#   bash scripts/build-images.sh              # `make images`: both images
#   bash scripts/build-images.sh operator     # one of them
#
# Steps (docs/images.md has the why and the measured times):
#   1. install buildah, podman, runc, mmdebstrap (scripts/install-system-deps.sh);
#   2. write the containers.conf drop-in this sandbox needs (runc, no default ulimits);
#   3. make the base image localhost/kubetune/debian-base:bookworm-<hash of its inputs> with
#      mmdebstrap + `podman import`, unless it exists: no registry means no python:*-slim and no
#      nvidia/cuda; the Dockerfiles take it through --build-arg PYTHON_IMAGE / CUDA_IMAGE;
#   4. build localhost/kubetune/<name>:<content hash> (+ :dev) with `buildah build --layers`,
#      or do nothing when that tag exists. The content hash covers the Dockerfile, its
#      dependency list (images/<name>.requirements.txt), .dockerignore, pyproject.toml,
#      README.md, core/, trainer/, operator/ (what the build copies) and the base.
#   5. export the operator as an OCI archive, ~/.cache/kubetune/images/operator-<hash>.tar, for
#      `ctr images import` (the trainer too with KUBETUNE_EXPORT_IMAGES="operator trainer";
#      gigabytes, so not by default), and print ids, tags, sizes and build times.
#
# Runs as root: images live in /var/lib/containers/storage (CI keeps it between runs, like
# ~/.cache/kubetune). Rootless buildah needs /etc/subuid ranges and is not set up here.
# Environment:
#   KUBETUNE_BUILD_CA_BUNDLE  CA bundle the build steps trust for PyPI (default: the host's
#                             /etc/ssl/certs/ca-certificates.crt, which has the CA of a
#                             TLS-intercepting proxy where there is one); "" for none
#   KUBETUNE_EXPORT_IMAGES    images to export as OCI archives (default "operator")
#   KUBETUNE_IMAGE_ARCHIVES   where (default ~/.cache/kubetune/images)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "build-images: $*" >&2; }

PRINT_REF=0
if [ "${1:-}" = "--ref" ]; then
    PRINT_REF=1
    shift
fi
NAMES=("$@")
[ "${#NAMES[@]}" -gt 0 ] || NAMES=(operator trainer)
for name in "${NAMES[@]}"; do
    [ -f "images/$name.Dockerfile" ] || { log "ERROR: no images/$name.Dockerfile"; exit 2; }
done

REGISTRY=localhost/kubetune
ARCHIVES="${KUBETUNE_IMAGE_ARCHIVES:-$HOME/.cache/kubetune/images}"
EXPORT="${KUBETUNE_EXPORT_IMAGES-operator}"
CA_BUNDLE="${KUBETUNE_BUILD_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"

# The base image: Debian bookworm, minbase, plus what the Dockerfiles' steps use: python3 and
# its venv module (pip via ensurepip, for the uv stage), CA certificates, and passwd (useradd
# in the trainer). Documentation is left out, except the copyright files. Its tag is a hash of
# these inputs: change one and the next run makes a new base (and so new images).
BASE_SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates,passwd
BASE_SOURCES=(
    "deb http://deb.debian.org/debian $BASE_SUITE main"
    "deb http://deb.debian.org/debian $BASE_SUITE-updates main"
    "deb http://deb.debian.org/debian-security $BASE_SUITE-security main"
)
BASE_DPKG_OPTS=(
    "path-exclude=/usr/share/man/*"
    "path-exclude=/usr/share/locale/*"
    "path-exclude=/usr/share/doc/*"
    "path-include=/usr/share/doc/*/copyright"
)
base_hash="$(printf '%s\n' v1 minbase "$BASE_SUITE" "$BASE_PACKAGES" "${BASE_SOURCES[@]}" \
    "${BASE_DPKG_OPTS[@]}" | sha256sum | cut -c1-12)"
BASE="$REGISTRY/debian-base:$BASE_SUITE-$base_hash"

# What the build copies (.dockerignore allows the dependency lists, pyproject.toml, README.md,
# core/, trainer/, operator/ and leaves out caches), the Dockerfile and the base: a change to
# any of them is a new tag. `content_hash NAME DIR` hashes that file set in DIR.
CONTEXT_FILES=(.dockerignore pyproject.toml README.md images core trainer operator)
CONTEXT_EXCLUDES=(__pycache__ '*.pyc' '*.tmp' .mypy_cache .pytest_cache)
content_hash() {
    local name="$1" dir="$2" excludes=() pattern
    for pattern in "${CONTEXT_EXCLUDES[@]}"; do
        excludes+=(-not -path "*/$pattern" -not -path "*/$pattern/*")
    done
    (
        cd "$dir"
        echo "base $BASE"
        sha256sum "images/$name.Dockerfile" "images/$name.requirements.txt" .dockerignore \
            pyproject.toml README.md
        find core trainer operator "${excludes[@]}" -type f -print0 \
            | LC_ALL=C sort -z | xargs -0 sha256sum
    ) | sha256sum | cut -c1-16
}

# --ref: the tags this tree builds (tests/integration/test_container_images.py runs them).
if [ "$PRINT_REF" = 1 ]; then
    for name in "${NAMES[@]}"; do echo "$REGISTRY/$name:$(content_hash "$name" .)"; done
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    log "ERROR: run as root (sudo bash $0): images go to /var/lib/containers/storage"
    exit 1
fi

# One build at a time on this machine (two `make test` runs may start together): the second
# waits, then finds the images built.
exec 9>/run/lock/kubetune-build-images.lock
if ! flock --nonblock 9; then
    log "another build-images.sh is running: waiting for it"
    flock 9
fi

# ---- 1. tools ---------------------------------------------------------------------------
bash scripts/install-system-deps.sh

# ---- 2. containers.conf -----------------------------------------------------------------
# A drop-in next to the system's containers.conf (read by podman and buildah after it), not a
# replacement: a machine's own settings stay, these two win. Written to /etc because the tools
# run as root; on CI machines and this sandbox nothing else uses podman. Why each setting:
#   runtime = "runc": crun refuses the hybrid cgroup v1 layout of this host;
#   default_ulimits = []: the default raises RLIMIT_NOFILE, and without CAP_SYS_RESOURCE the
#     runtime fails with "setrlimit RLIMIT_NOFILE: Operation not permitted".
CONF_DIR=/etc/containers/containers.conf.d
CONF="$CONF_DIR/50-kubetune.conf"
conf_text='# Written by kubetune scripts/build-images.sh (docs/images.md): the sandbox has no
# CAP_SYS_RESOURCE (a runtime that raises an rlimit fails) and a hybrid cgroup v1 layout
# (crun refuses it). Delete this file to go back to the defaults.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
'
if [ "$(cat "$CONF" 2>/dev/null)" != "$(printf '%s' "$conf_text")" ]; then
    mkdir -p "$CONF_DIR"
    printf '%s' "$conf_text" >"$CONF"
    log "wrote $CONF"
fi

# ---- 3. the base image ------------------------------------------------------------------
if podman image exists "$BASE"; then
    log "base image $BASE exists"
else
    log "making base image $BASE with mmdebstrap (about a minute)"
    start=$SECONDS
    workdir="$(mktemp -d /var/tmp/kubetune-base.XXXXXX)"
    trap 'rm -rf "$workdir"' EXIT
    dpkg_args=()
    for opt in "${BASE_DPKG_OPTS[@]}"; do dpkg_args+=("--dpkgopt=$opt"); done
    mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" "${dpkg_args[@]}" \
        "$BASE_SUITE" "$workdir/rootfs.tar" "${BASE_SOURCES[@]}"
    podman import --quiet --change 'CMD ["/bin/bash"]' "$workdir/rootfs.tar" "$BASE" >/dev/null
    rm -rf "$workdir"
    trap - EXIT
    log "base image $BASE made in $((SECONDS - start))s"
fi

# ---- 4. the images ----------------------------------------------------------------------
# The build context is a snapshot of the tree, hashed and built from the same files: someone
# editing sources during a long build cannot get their edit under the old hash. (Small: the
# Python project is under 2 MB.)
CONTEXT="$(mktemp -d /var/tmp/kubetune-context.XXXXXX)"
trap 'rm -rf "$CONTEXT"' EXIT
tar_excludes=()
for pattern in "${CONTEXT_EXCLUDES[@]}"; do tar_excludes+=("--exclude=$pattern"); done
tar -cf - "${tar_excludes[@]}" "${CONTEXT_FILES[@]}" | tar -xf - -C "$CONTEXT"

build_args=()
if [ -n "$CA_BUNDLE" ] && [ -f "$CA_BUNDLE" ]; then
    # The steps that reach PyPI mount it as the secret `build-ca` (/run/secrets/build-ca); it
    # is in no layer, and the images keep their own ca-certificates.
    build_args+=(--secret "id=build-ca,src=$CA_BUNDLE"
        --build-arg PIP_CERT=/run/secrets/build-ca --build-arg SSL_CERT_FILE=/run/secrets/build-ca)
fi

declare -A HASH=() BUILD_TIME=()
for name in "${NAMES[@]}"; do
    HASH[$name]="$(content_hash "$name" "$CONTEXT")"
    ref="$REGISTRY/$name:${HASH[$name]}"
    if podman image exists "$ref"; then
        log "$ref exists: nothing to build"
        BUILD_TIME[$name]="exists"
    else
        log "building $ref"
        start=$SECONDS
        # The Dockerfile's base argument (PYTHON_IMAGE, CUDA_IMAGE) names the local base.
        dockerfile="$CONTEXT/images/$name.Dockerfile"
        base_arg="$(sed -n -E 's/^ARG ([A-Z_]+_IMAGE)=.*/\1/p' "$dockerfile" | head -1)"
        # --layers: reuse each unchanged step (the dependency layer survives a source change);
        # --pull=never: the base is local, no registry is asked. OCI format (the default):
        # the operator's HEALTHCHECK, a Docker-only field, is dropped with a warning; Kubernetes
        # never reads it.
        buildah build --layers --pull=never "${build_args[@]}" --build-arg "$base_arg=$BASE" \
            -f "$dockerfile" -t "$ref" "$CONTEXT"
        BUILD_TIME[$name]="$((SECONDS - start))s"
    fi
    podman tag "$ref" "$REGISTRY/$name:dev"
    # Older content-hash tags of this image: untag them so their layers can be reclaimed.
    old_tags="$(podman images --format '{{.Repository}}:{{.Tag}}' \
        --filter "reference=$REGISTRY/$name" | grep -E ":[0-9a-f]{16}$" | grep -v -x -F "$ref" \
        || true)"
    for old in $old_tags; do
        podman rmi "$old" >/dev/null || log "could not remove $old (a container uses it?)"
    done
done
rm -rf "$CONTEXT"
trap - EXIT

# ---- 5. archives and summary ------------------------------------------------------------
for name in "${NAMES[@]}"; do
    case " $EXPORT " in *" $name "*) ;; *) continue ;; esac
    archive="$ARCHIVES/$name-${HASH[$name]}.tar"
    if [ ! -f "$archive" ]; then
        mkdir -p "$ARCHIVES"
        start=$SECONDS
        # Uncompressed layers: a plain copy, fast; containerd imports them as they are.
        podman save --quiet --format oci-archive --uncompressed -o "$archive.tmp" \
            "$REGISTRY/$name:${HASH[$name]}"
        mv "$archive.tmp" "$archive"
        find "$ARCHIVES" -maxdepth 1 -name "$name-*.tar" -not -name "$(basename "$archive")" -delete
        log "exported $archive in $((SECONDS - start))s"
    fi
done

echo
printf '%-45s %-13s %8s %8s  %s\n' IMAGE ID SIZE BUILT_IN ARCHIVE
for name in "${NAMES[@]}"; do
    ref="$REGISTRY/$name:${HASH[$name]}"
    read -r id size < <(podman image inspect --format '{{.Id}} {{.Size}}' "$ref")
    archive="$ARCHIVES/$name-${HASH[$name]}.tar"
    [ -f "$archive" ] || archive="-"
    printf '%-45s %-13s %6sMB %8s  %s\n' "$ref" "${id:0:12}" "$((size / 1000000))" \
        "${BUILD_TIME[$name]}" "$archive"
done
echo "each also tagged $REGISTRY/<name>:dev. Into containerd: ctr images import <archive>, or"
echo "  podman save --format oci-archive --uncompressed $REGISTRY/<name>:dev | ctr images import -"
