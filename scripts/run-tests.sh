#!/usr/bin/env bash
# Every test, in two pytest processes at once: what `make test` (and so CI) runs after lint.
#
#   bash scripts/run-tests.sh [pytest options]      # e.g. -x, -k packing, --durations=30
#
# The cluster tests mostly wait for pods, so on two cores two streams finish well before one:
#   process node:  tests marked cluster but not real_node (their own control plane, process
#                  node, S3 server, Prometheus, Kueue)
#   the rest:      unit and integration tests, then the real-node tests (marker real_node,
#                  given by tests/cluster/conftest.py to every test on containerd_cluster)
# The two share nothing on the host: every port is a free one, every node its own state dir,
# bridge and iptables chain. The process-node stream's output follows the other's; the exit
# status is non-zero when either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-${VENV:-$HOME/.cache/kubetune/venv}/bin/python}"
log="$(mktemp "${TMPDIR:-/tmp}/kubetune-process-node-tests.XXXXXX")"

"$PY" -m pytest tests -m "cluster and not real_node" "$@" >"$log" 2>&1 &
process_node=$!
"$PY" -m pytest tests -m "not cluster or real_node" "$@"
rest=$?
wait "$process_node"
process_node_rc=$?

echo
echo "======================== the process-node stream (cluster and not real_node) ========================"
cat "$log"
rm -f "$log"
# pytest exits 5 when a stream selected no test (e.g. -k matched only the other's).
for rc in "$rest" "$process_node_rc"; do
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
        exit "$rc"
    fi
done
if [ "$rest" -eq 5 ] && [ "$process_node_rc" -eq 5 ]; then
    echo "run-tests: no test selected in either stream" >&2
    exit 5
fi
