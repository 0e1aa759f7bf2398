#!/usr/bin/env bash
# make demo-cluster: a FineTuneJob end to end on a real (local) Kubernetes control plane.
#
#   bash scripts/demo-cluster.sh            # exits 0 only when the job Succeeded
#
# 1. brings up the test cluster (python -m harness up: etcd, kube-apiserver, controller
#    manager, scheduler, a "process node" that runs pods as local processes, moto S3);
# 2. installs the CRD and the operator's RBAC, starts `kubetune operator` in the background;
# 3. uploads a slice of ../shared/data/tldr-pages to S3 and creates the credentials Secret;
# 4. applies examples/cluster/tldr-tiny.yaml (a fresh tiny model, CPU, ~1-3 minutes);
# 5. polls `kubectl get ftj` until Succeeded (exit 0) or Failed (exit 1 with the reason);
# and always tears everything down (trap). Env: PYTHON (default: the kubetune venv),
# DEMO_TIMEOUT (seconds, default 900), KEEP_CLUSTER=1 to leave it running.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-$HOME/.cache/kubetune/venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
# Stage pods run `kubetune` from the host PATH (the process node passes PATH on).
export PATH="$(dirname "$PYTHON"):$PATH"
export KUBETUNE_CLUSTER_DIR=${KUBETUNE_CLUSTER_DIR:-$(mktemp -d /tmp/kubetune-demo.XXXXXX)}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-900}
NAME=tldr-tiny
DATA=${DEMO_DATA:-$REPO/../shared/data/tldr-pages/pages/common}
OPERATOR_LOG=$KUBETUNE_CLUSTER_DIR/operator.log
OPERATOR_PID=""

log() { printf '\n==> %s\n' "$*" >&2; }

cleanup() {
    local rc=$?
    if [ -n "$OPERATOR_PID" ] && kill -0 "$OPERATOR_PID" 2>/dev/null; then
        kill "$OPERATOR_PID" 2>/dev/null || true
        wait "$OPERATOR_PID" 2>/dev/null || true
    fi
    if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
        log "cluster left running (KUBECONFIG=${KUBECONFIG:-?}); stop it with:" \
            "PYTHONPATH=tests $PYTHON -m harness down --state-dir $KUBETUNE_CLUSTER_DIR"
    else
        log "tearing down"
        PYTHONPATH=tests "$PYTHON" -m harness down --state-dir "$KUBETUNE_CLUSTER_DIR" || true
    fi
    exit $rc
}
trap cleanup EXIT INT TERM

log "starting the cluster in $KUBETUNE_CLUSTER_DIR (first run builds the binaries: minutes)"
eval "$(PYTHONPATH=tests "$PYTHON" -m harness up --state-dir "$KUBETUNE_CLUSTER_DIR")"
export KUBECONFIG

log "installing the CRD and RBAC"
kubectl apply -f crds/finetunejob.yaml
kubectl wait --for=condition=Established crd/finetunejobs.kubetune.io --timeout=60s
"$PYTHON" -m kubetune_operator.rbac --namespace default | kubectl apply -f -

log "starting the operator (log: $OPERATOR_LOG)"
KUBETUNE_NAMESPACE=default KUBETUNE_PROGRESS_INTERVAL=5 KUBETUNE_OPERATOR_METRICS_PORT=0 \
KUBETUNE_HEALTH_PORT=0 "$PYTHON" -m kubetune_operator >"$OPERATOR_LOG" 2>&1 &
OPERATOR_PID=$!

log "uploading a slice of tldr-pages to $AWS_ENDPOINT_URL and applying $NAME"
"$PYTHON" - "$DATA" <<'PY'
import sys
from pathlib import Path

import boto3

client = boto3.client("s3")
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
kubectl create secret generic kubetune-s3 \
    --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
    --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# The example's endpoint is a placeholder: point it at this cluster's S3 server.
"$PYTHON" - "$AWS_ENDPOINT_URL" <<'PY' | kubectl apply -f -
import sys

import yaml

job = yaml.safe_load(open("examples/cluster/tldr-tiny.yaml", encoding="utf-8"))
job["spec"]["storage"]["endpoint"] = sys.argv[1]
print(yaml.safe_dump(job))
PY

log "following $NAME (timeout ${DEMO_TIMEOUT}s)"
deadline=$((SECONDS + DEMO_TIMEOUT))
last=""
while :; do
    # Print a line when phase, progress or results change (not every poll).
    row=$(kubectl get ftj "$NAME" --no-headers -o custom-columns='NAME:.metadata.name,PHASE:.status.phase,PROGRESS:.status.progress.percent,PPL:.status.results.perplexity,BASE-PPL:.status.results.baselinePerplexity' 2>/dev/null || true)
    [ "$row" != "$last" ] && echo "$row" && last=$row
    phase=$(kubectl get ftj "$NAME" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    case "$phase" in
    Succeeded)
        kubectl get ftj "$NAME" -o wide
        kubectl get ftj "$NAME" -o jsonpath='{.status.message}{"\n"}model: {.status.artifacts.model}{"\n"}'
        exit 0 ;;
    Failed)
        echo "FAILED: $(kubectl get ftj "$NAME" -o jsonpath='{range .status.conditions[?(@.type=="Stalled")]}{.reason}: {.message}{end}')" >&2
        tail -20 "$OPERATOR_LOG" >&2
        exit 1 ;;
    esac
    if ! kill -0 "$OPERATOR_PID" 2>/dev/null; then
        echo "the operator exited; its log:" >&2; tail -40 "$OPERATOR_LOG" >&2; exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "timed out after ${DEMO_TIMEOUT}s in phase ${phase:-<none>}" >&2
        kubectl get jobs,pods -o wide >&2 || true
        exit 1
    fi
    sleep 3
done
