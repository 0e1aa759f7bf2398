#!/usr/bin/env bash
# Build Kueue's controller manager from the Go module proxy and cache it, with its CRDs,
# outside the repo (harness.kueue runs it against the test control plane).
#
#   bash scripts/build-kueue.sh            # builds what is missing, prints the bin dir on stdout
#   KUBETUNE_TOOLS_DIR=/some/dir bash scripts/build-kueue.sh
#
# The binary lands in ${KUBETUNE_TOOLS_DIR:-$HOME/.cache/kubetune/tools}/kueue-<version>/kueue,
# linked from $KUBETUNE_TOOLS_DIR/bin/kueue; Kueue's CRDs (config/components/crd/bases of the
# same module version) are copied next to it, into kueue-<version>/crds/. Same conventions as
# scripts/build-tools.sh: nothing already cached is rebuilt, a build goes to a temporary name
# first, progress goes to stderr and the only stdout line is the bin directory. A cold build
# took 11.5 minutes on the shared 2-core machine (docs/kueue-harness.md).
set -euo pipefail

KUEUE_VERSION=v0.17.0

tools_dir="${KUBETUNE_TOOLS_DIR:-$HOME/.cache/kubetune/tools}"
bin_dir="$tools_dir/bin"
dest_dir="$tools_dir/kueue-$KUEUE_VERSION"

log() { echo "build-kueue: $*" >&2; }
die() { echo "build-kueue: ERROR: $*" >&2; exit 1; }

if ! command -v go >/dev/null 2>&1; then
    if [ -x /usr/local/go/bin/go ]; then
        export PATH="$PATH:/usr/local/go/bin"
    else
        die "no 'go' on PATH (Kueue $KUEUE_VERSION needs Go >= 1.25); install Go or add it to PATH"
    fi
fi
# Two build jobs at most: the machines this runs on are small and shared.
export GOFLAGS="${GOFLAGS:--p=2}"
mkdir -p "$bin_dir"
# Its own lock, not build-tools.sh's: that script may call this one while holding its lock.
if command -v flock >/dev/null 2>&1; then
    exec 8>"$tools_dir/.kueue.lock"
    flock 8
fi

if [ -x "$dest_dir/kueue" ]; then
    log "kueue $KUEUE_VERSION: cached at $dest_dir/kueue"
else
    log "kueue $KUEUE_VERSION: building (this can take many minutes on a cold cache)"
    start=$SECONDS
    mkdir -p "$dest_dir"
    gobin="$(mktemp -d)"
    # The version Kueue logs at start-up and reports in its metrics.
    ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
    if ! (cd "$tools_dir" && GOBIN="$gobin" go install -trimpath -ldflags "$ldflags" \
        "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"); then
        rm -rf "$gobin"
        die "building kueue $KUEUE_VERSION failed (see the go output above)"
    fi
    mv -f "$gobin/kueue" "$dest_dir/kueue.tmp.$$" && rm -rf "$gobin"
    mv -f "$dest_dir/kueue.tmp.$$" "$dest_dir/kueue"
    log "kueue $KUEUE_VERSION: built in $((SECONDS - start))s"
fi
ln -sfn "$dest_dir/kueue" "$bin_dir/kueue"

# The CRDs, from the module source the binary was built from (already in the module cache).
if [ ! -f "$dest_dir/crds/.complete" ]; then
    module_dir="$(cd "$tools_dir" && go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [ -d "$module_dir/config/components/crd/bases" ] \
        || die "no config/components/crd/bases in the module source of kueue $KUEUE_VERSION"
    rm -rf "$dest_dir/crds"
    mkdir -p "$dest_dir/crds"
    cp "$module_dir"/config/components/crd/bases/*.yaml "$dest_dir/crds/"
    chmod 0644 "$dest_dir"/crds/*.yaml  # the module cache is read-only
    touch "$dest_dir/crds/.complete"
    log "kueue $KUEUE_VERSION: CRDs copied to $dest_dir/crds"
fi

"$bin_dir/kueue" --help >/dev/null 2>&1 || die "$bin_dir/kueue --help failed"
echo "$bin_dir"
