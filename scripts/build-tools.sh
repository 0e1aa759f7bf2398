#!/usr/bin/env bash
# Build the test harness's binaries from the Go module proxy and cache them outside the repo.
#
#   bash scripts/build-tools.sh            # builds what is missing, prints the bin dir on stdout
#   KUBETUNE_TOOLS_DIR=/some/dir bash scripts/build-tools.sh
#
# Each binary lands in ${KUBETUNE_TOOLS_DIR:-$HOME/.cache/kubetune/tools}/<name>-<version>/<name>
# and is linked from $KUBETUNE_TOOLS_DIR/bin/. A binary already there is never rebuilt, so a
# warm run takes well under a second. The versions of kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy and etcd come from tests/cluster/tools/go.mod; containerd
# (containerd, ctr, containerd-shim-runc-v2: the real node of harness.containerd_node), coredns
# (that node's cluster DNS, harness.node.dns), helm and kubeconform are pinned below. runc and the CNI plugins come from Debian:
# scripts/install-system-deps.sh. Progress goes to stderr; the only stdout line is the bin directory.
set -euo pipefail

HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.8.0
# 2.x: the kubelet asks the runtime for its cgroup driver (RuntimeConfig), which 1.x lacks.
CONTAINERD_VERSION=v2.4.2
# The newest release; its go.mod asks for Go 1.26, so the Go this script needs already builds it.
COREDNS_VERSION=v1.15.0

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_module="$repo_root/tests/cluster/tools"
tools_dir="${KUBETUNE_TOOLS_DIR:-$HOME/.cache/kubetune/tools}"
bin_dir="$tools_dir/bin"

log() { echo "build-tools: $*" >&2; }
die() { echo "build-tools: ERROR: $*" >&2; exit 1; }

if ! command -v go >/dev/null 2>&1; then
    if [ -x /usr/local/go/bin/go ]; then
        export PATH="$PATH:/usr/local/go/bin"
    else
        die "no 'go' on PATH (need Go >= 1.26 to build the control plane); install Go or add it to PATH"
    fi
fi
# Two build jobs at most: the machines this runs on are small and shared.
export GOFLAGS="${GOFLAGS:--p=2}"
mkdir -p "$bin_dir"
# One build at a time per cache (`make tools` and a test run may start together); the
# second waits and then finds everything cached.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$tools_dir/.lock"
    flock 9
fi

module_version() {
    (cd "$tools_module" && go list -m -f '{{.Version}}' "$1") \
        || die "cannot resolve $1 in $tools_module/go.mod (is the Go module proxy reachable?)"
}

# install_binary NAME VERSION CMD...: run CMD (which must write $out) unless already cached.
install_binary() {
    local name="$1" version="$2"
    shift 2
    local dest="$tools_dir/$name-$version/$name"
    if [ -x "$dest" ]; then
        log "$name $version: cached at $dest"
    else
        log "$name $version: building (this can take many minutes on a cold cache)"
        local start=$SECONDS
        mkdir -p "$(dirname "$dest")"
        # Build to a temporary name and rename, so an interrupted build never looks cached.
        out="$dest.tmp.$$"
        if ! "$@"; then
            rm -f "$out"
            die "building $name $version failed (see the go output above)"
        fi
        mv -f "$out" "$dest"
        log "$name $version: built in $((SECONDS - start))s"
    fi
    ln -sfn "$dest" "$bin_dir/$name"
}

build_kube() {  # build_kube NAME: a main package of k8s.io/kubernetes/cmd/
    local name="$1" minor
    minor="$(echo "$KUBE_VERSION" | cut -d. -f2)"
    local ldflags="-s -w"
    # The same variables Kubernetes' own hack/lib/version.sh sets, so --version and the
    # API server's /version report the real release rather than v0.0.0-master.
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    done
    (cd "$tools_module" && go build -trimpath -ldflags "$ldflags" -o "$out" "k8s.io/kubernetes/cmd/$name")
}

build_etcd() {
    (cd "$tools_module" && go build -trimpath -ldflags "-s -w" -o "$out" ./cmd/etcd)
}

go_install() {  # go_install PKG@VERSION LDFLAGS [TAGS]: `go install` into a scratch GOBIN, then move
    local gobin
    gobin="$(mktemp -d)"
    (cd "$tools_dir" && GOBIN="$gobin" go install -trimpath -tags "${3:-}" -ldflags "-s -w $2" "$1") \
        || { rm -rf "$gobin"; return 1; }
    mv "$gobin"/* "$out" && rm -rf "$gobin"
}

build_containerd() {  # build_containerd NAME: containerd, ctr or containerd-shim-runc-v2
    local pkg=github.com/containerd/containerd/v2
    # Static, as upstream's release build: no cgo, so no btrfs snapshotter (it needs the
    # btrfs headers; the node uses overlayfs). The version is what CRI reports to the kubelet
    # (`kubectl get nodes -o wide`: containerd://v2.4.2).
    CGO_ENABLED=0 go_install "$pkg/cmd/$1@$CONTAINERD_VERSION" \
        "-X $pkg/version.Version=$CONTAINERD_VERSION -X $pkg/version.Package=$pkg" \
        "no_btrfs urfave_cli_no_docs"
}

build_coredns() {
    # Static, as upstream's release build; the whole default plugin set (the node's Corefile
    # uses only kubernetes, template, errors, ready and health). The version is compiled in.
    CGO_ENABLED=0 go_install "github.com/coredns/coredns@$COREDNS_VERSION" ""
}

build_node_program() {  # build_node_program FILE: a standard-library Go program in tests/harness/node
    (cd "$node_src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out" "./$1")
}

KUBE_VERSION="$(module_version k8s.io/kubernetes)"
ETCD_VERSION="$(module_version go.etcd.io/etcd/server/v3)"

install_binary etcd "$ETCD_VERSION" build_etcd
for name in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
    install_binary "$name" "$KUBE_VERSION" build_kube "$name"
done
for name in containerd ctr containerd-shim-runc-v2; do
    install_binary "$name" "$CONTAINERD_VERSION" build_containerd "$name"
done
install_binary coredns "$COREDNS_VERSION" build_coredns
# Kueue (and its CRDs) for the queueing tests: its own script, with its own lock and cache.
bash "$repo_root/scripts/build-kueue.sh" >/dev/null || die "scripts/build-kueue.sh failed"
# The node's sandbox process and the test image's program, versioned by their source's hash
# (an edited file gets rebuilt); harness.node.images wraps them in images.
node_src="$repo_root/tests/harness/node"
install_binary pause "src-$(sha256sum "$node_src/pause.go" | cut -c1-12)" build_node_program pause.go
install_binary kt-probe "src-$(sha256sum "$node_src/probe.go" | cut -c1-12)" build_node_program probe.go
install_binary helm "$HELM_VERSION" go_install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
install_binary kubeconform "$KUBECONFORM_VERSION" go_install \
    "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" "-X main.version=$KUBECONFORM_VERSION"

# Smoke-check every binary, so a broken build fails here rather than in a test.
for name in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy \
    containerd ctr; do
    "$bin_dir/$name" --version >/dev/null 2>&1 || die "$bin_dir/$name --version failed"
done
"$bin_dir/containerd-shim-runc-v2" -v >/dev/null 2>&1 || die "$bin_dir/containerd-shim-runc-v2 -v failed"
"$bin_dir/kt-probe" say:ok >/dev/null 2>&1 || die "$bin_dir/kt-probe say:ok failed"
"$bin_dir/coredns" -version >/dev/null 2>&1 || die "$bin_dir/coredns -version failed"
[ -x "$bin_dir/pause" ] || die "$bin_dir/pause missing"
"$bin_dir/helm" version --short >/dev/null 2>&1 || die "$bin_dir/helm version failed"
"$bin_dir/kubeconform" -v >/dev/null 2>&1 || die "$bin_dir/kubeconform -v failed"
echo "$bin_dir"
