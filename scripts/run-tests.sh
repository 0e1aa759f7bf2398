#!/usr/bin/env bash
# Every test, in two pytest processes at once: what `make test` (and so CI) runs after lint.
#
#   bash scripts/run-tests.sh [pytest options]      # e.g. -x, -k packing, --durations=30
#
# Two streams, so that while one waits for pods the other has the CPU. Each has a cluster of
# its own: a control plane and one real node (kubelet + containerd, harness.fixtures):
#   the real node:  the cluster tests on the main node (marker real_node, given by
#                   tests/cluster/conftest.py to every test on containerd_cluster): kube-proxy,
#                   the shared image store, S3, Prometheus, Kueue
#   the rest:       unit and integration tests, then the cluster tests on the light node
#                   (k8s_cluster: no kube-proxy, an image store of its own): the chart, least
#                   privilege, waiting, Kueue, the harness's own
# The two share nothing on the host: every port is a free one, every node its own state dir,
# bridge, iptables chain and image store. The second stream's output follows the first's; the
# exit status is non-zero when either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-${VENV:-$HOME/.cache/kubetune/venv}/bin/python}"
log="$(mktemp "${TMPDIR:-/tmp}/kubetune-tests.XXXXXX")"

"$PY" -m pytest tests -m "not real_node" "$@" >"$log" 2>&1 &
rest=$!
"$PY" -m pytest tests -m "real_node" "$@"
real_node_rc=$?
wait "$rest"
rest_rc=$?

echo
echo "======================== the other stream (unit, integration, light node) ========================"
cat "$log"
rm -f "$log"
# pytest exits 5 when a stream selected no test (e.g. -k matched only the other's).
for rc in "$real_node_rc" "$rest_rc"; do
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
        exit "$rc"
    fi
done
if [ "$real_node_rc" -eq 5 ] && [ "$rest_rc" -eq 5 ]; then
    echo "run-tests: no test selected in either stream" >&2
    exit 5
fi
