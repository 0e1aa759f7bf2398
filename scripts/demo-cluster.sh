#!/usr/bin/env bash
# make demo-cluster: a FineTuneJob end to end on a real (local) Kubernetes cluster, every part
# of kubetune in a container.
#
#   sudo bash scripts/demo-cluster.sh       # exits 0 only when the job Succeeded
#
# 1. builds the operator and trainer images unless this tree's exist (scripts/build-images.sh);
# 2. brings up the test cluster (python -m harness up: etcd, kube-apiserver, controller
#    manager, scheduler, a real node: kubelet + containerd + runc + CNI with kube-proxy and
#    CoreDNS, and moto S3 on loopback, which pods reach at the node's bridge address);
# 3. loads both images into the node (no registry: imagePullPolicy Never / IfNotPresent);
# 4. creates two namespaces that enforce Pod Security "restricted", and `helm install`s
#    charts/kubetune into kubetune-system, watching kubetune-demo;
# 5. uploads a slice of ../shared/data/tldr-pages to S3 and creates the credentials Secret;
# 6. applies examples/cluster/tldr-tiny.yaml (a fresh tiny model, CPU, a few minutes);
# 7. polls the FineTuneJob until Succeeded (exit 0) or Failed (exit 1 with the reason), then
#    shows which image each pod ran and the node's container runtime;
# and always tears everything down (trap). Runs as root (the node, the images).
# Env: PYTHON (default: the kubetune venv), DEMO_TIMEOUT (seconds, default 900), DEMO_DATA
# (a dir of tldr .md pages), KEEP_CLUSTER=1 to leave the cluster running.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-$HOME/.cache/kubetune/venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
export KUBETUNE_CLUSTER_DIR=${KUBETUNE_CLUSTER_DIR:-$(mktemp -d /tmp/kubetune-demo.XXXXXX)}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-900}
NAME=tldr-tiny
OP_NS=kubetune-system
NS=kubetune-demo
RELEASE=kubetune
DATA=${DEMO_DATA:-$REPO/../shared/data/tldr-pages/pages/common}

log() { printf '\n==> %s\n' "$*" >&2; }
die() { echo "demo-cluster: $*" >&2; exit 1; }
harness() { PYTHONPATH=tests "$PYTHON" -m harness "$@" --state-dir "$KUBETUNE_CLUSTER_DIR"; }

cleanup() {
    local rc=$?
    if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
        log "cluster left running (KUBECONFIG=${KUBECONFIG:-?}); stop it with:" \
            "PYTHONPATH=tests $PYTHON -m harness down --state-dir $KUBETUNE_CLUSTER_DIR"
    else
        log "tearing down"
        harness down || true
        rmdir "$KUBETUNE_CLUSTER_DIR" 2>/dev/null || true  # when it never came up
    fi
    exit $rc
}

# The images of this tree (their tags hash its sources): built unless they exist.
image_refs() {
    mapfile -t REFS < <(bash scripts/build-images.sh --ref operator trainer)
    OPERATOR_REF=${REFS[0]}
    TRAINER_REF=${REFS[1]}
    if ! podman image exists "$OPERATOR_REF" || ! podman image exists "$TRAINER_REF"; then
        log "building the images (make images; minutes on a cold cache)"
        bash scripts/build-images.sh
    fi
}

# A namespace whose pods must meet Pod Security "restricted" (as the cluster tests use).
restricted_namespace() {
    kubectl create namespace "$1" >/dev/null
    kubectl label namespace "$1" pod-security.kubernetes.io/enforce=restricted >/dev/null
    local deadline=$((SECONDS + 30))
    until kubectl -n "$1" get serviceaccount default >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "no default service account in $1 after 30s"
        sleep 0.5
    done
}

install_operator() {
    local repository=${OPERATOR_REF%:*} tag=${OPERATOR_REF##*:}
    "$BIN_DIR/helm" install "$RELEASE" charts/kubetune --namespace "$OP_NS" --wait --timeout 5m \
        --set-string "image.repository=$repository,image.tag=$tag,image.pullPolicy=Never" \
        --set-string "operator.trainerImage=$TRAINER_REF" \
        --set-string "operator.storageEndpoints[0]=$S3_ENDPOINT_FROM_PODS" \
        --set-string "watchNamespaces[0]=$NS" \
        --set operator.progressInterval=5 --set operator.resyncInterval=10
}

upload_data() {
    "$PYTHON" - "$DATA" <<'PY'
import sys
from pathlib import Path

import boto3

client = boto3.client("s3")  # AWS_* from `harness up`: the S3 server on the host's loopback
for bucket in ("kubetune-data", "kubetune-runs"):
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
files = sorted(Path(sys.argv[1]).glob("*.md"))[:150]
if not files:
    sys.exit(f"no tldr pages in {sys.argv[1]} (expected ../shared/data next to the repo)")
for path in files:
    client.put_object(Bucket="kubetune-data", Key=f"tldr/common/{path.name}", Body=path.read_bytes())
print(f"uploaded {len(files)} pages", file=sys.stderr)
PY
    kubectl -n "$NS" create secret generic kubetune-s3 \
        --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
        --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" >/dev/null
}

# The example's endpoint is a placeholder: point it at S3 as the pods reach it.
apply_job() {
    "$PYTHON" - "$S3_ENDPOINT_FROM_PODS" <<'PY' | kubectl -n "$NS" apply -f -
import sys

import yaml

job = yaml.safe_load(open("examples/cluster/tldr-tiny.yaml", encoding="utf-8"))
job["spec"]["storage"]["endpoint"] = sys.argv[1]
print(yaml.safe_dump(job))
PY
}

# Proof that it ran in containers: each pod's image, and the node's container runtime.
show_where_it_ran() {
    log "pods and the images they ran"
    kubectl get pods -A -o custom-columns='NAMESPACE:.metadata.namespace,POD:.metadata.name,PHASE:.status.phase,IMAGE:.status.containerStatuses[0].image'
    kubectl get nodes -o wide
}

operator_log() {
    kubectl -n "$OP_NS" logs -l app.kubernetes.io/name=kubetune --tail="$1" >&2 || true
}

follow_job() {
    local deadline=$((SECONDS + DEMO_TIMEOUT)) last="" row phase
    while :; do
        # Print a line when phase, progress or results change (not every poll).
        row=$(kubectl -n "$NS" get ftj "$NAME" --no-headers -o custom-columns='NAME:.metadata.name,PHASE:.status.phase,PROGRESS:.status.progress.percent,PPL:.status.results.perplexity,BASE-PPL:.status.results.baselinePerplexity' 2>/dev/null || true)
        [ "$row" != "$last" ] && echo "$row" && last=$row
        phase=$(kubectl -n "$NS" get ftj "$NAME" -o jsonpath='{.status.phase}' 2>/dev/null || true)
        case "$phase" in
        Succeeded)
            kubectl -n "$NS" get ftj "$NAME" -o wide
            kubectl -n "$NS" get ftj "$NAME" -o jsonpath='{.status.message}{"\n"}model: {.status.artifacts.model}{"\n"}'
            show_where_it_ran
            return 0 ;;
        Failed)
            echo "FAILED: $(kubectl -n "$NS" get ftj "$NAME" -o jsonpath='{.status.reason}: {.status.message}')" >&2
            operator_log 20
            show_where_it_ran
            return 1 ;;
        esac
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "timed out after ${DEMO_TIMEOUT}s in phase ${phase:-<none>}" >&2
            kubectl -n "$NS" get jobs,pods -o wide >&2 || true
            operator_log 40
            return 1
        fi
        sleep 3
    done
}

[ "$(id -u)" -eq 0 ] || die "run as root (sudo): the node makes bridges, mounts and cgroups"
command -v kubectl >/dev/null || die "no kubectl on PATH: install Debian's kubectl package"
[ -d "$DATA" ] || die "no tldr pages at $DATA (expected ../shared/data next to the repo; or set DEMO_DATA)"
BIN_DIR=$(PYTHONPATH=tests "$PYTHON" -m harness.tools)  # helm (builds the tools if missing)
trap cleanup EXIT INT TERM
image_refs

log "starting the cluster in $KUBETUNE_CLUSTER_DIR (first run builds the binaries: minutes)"
exports=$(harness up) || die "harness up failed (see above)"
eval "$exports"
export KUBECONFIG
echo "S3 for pods: $S3_ENDPOINT_FROM_PODS" >&2

log "loading the images into the node (the trainer's first load takes minutes: 6.5 GB)"
harness load-image "$OPERATOR_REF" "$TRAINER_REF"

log "installing the chart into $OP_NS (operator $OPERATOR_REF), watching $NS"
restricted_namespace "$OP_NS"
restricted_namespace "$NS"
install_operator
kubectl -n "$OP_NS" get pods -o wide

log "uploading a slice of tldr-pages to S3 and applying $NAME"
upload_data
apply_job

log "following $NAME (timeout ${DEMO_TIMEOUT}s)"
follow_job
