"""The operator never uses its own storage credentials on a tenant's behalf (issue 12, item 2).

Two stand-in "S3 endpoints" on the host's loopback record every request; the operator, the
chart's Deployment from the operator image (chart_operator.ChartOperator), reaches them at the
node's bridge address. It runs with storage keys of its own in its environment and one
endpoint on its allow-list. Each FineTuneJob names
its own credentials Secret and is applied suspended, so no stage pod talks to the endpoints:
every request they see comes from the operator looking for an earlier result.

    pytest -m cluster tests/cluster/test_operator_credentials.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_operator import ChartOperator
from operator_helpers import (
    create_s3_secret,
    get_ftj,
    kubectl,
    tiny_job,
    wait_for,
)
from real_node_env import pod_url
from recording_http import RecordingServer

pytestmark = pytest.mark.cluster

OPERATOR_KEY = "AKIAOPERATORSOWNKEY0"
TENANT_KEY = "AKIATENANTSOWNKEY000"


@pytest.fixture
def recorders() -> Iterator[tuple[RecordingServer, RecordingServer]]:
    with RecordingServer(status=404) as allowed, RecordingServer(status=404) as elsewhere:
        yield allowed, elsewhere


def test_the_operator_reads_allowed_endpoints_with_the_jobs_keys_only(
    containerd_cluster: Any,
    node_namespace: str,
    recorders: tuple[RecordingServer, RecordingServer],
    tmp_path: Path,
) -> None:
    kc, ns = containerd_cluster.kubeconfig, node_namespace
    allowed, elsewhere = recorders
    create_s3_secret(kc, ns, TENANT_KEY, "tenant-secret", name="tenant-s3")
    allowed_url, elsewhere_url = (pod_url(containerd_cluster, r.url) for r in recorders)
    op = ChartOperator.start(
        containerd_cluster,
        ns,
        {"AWS_ACCESS_KEY_ID": OPERATOR_KEY, "AWS_SECRET_ACCESS_KEY": "operator-secret"},
        tmp_path / "operator.log",
        KUBETUNE_STORAGE_ENDPOINTS=allowed_url,
    )
    try:
        for name, endpoint in (("on-list", allowed_url), ("off-list", elsewhere_url)):
            job = tiny_job(
                name,
                data_uri="s3://data/tldr/",
                output=f"s3://runs/{name}/",
                endpoint=endpoint,
                secret="tenant-s3",
            )
            job["spec"]["suspend"] = True  # no pods: only the operator may call the endpoints
            kubectl(kc, "apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(job))

        def suspended(name: str) -> bool:
            return (get_ftj(kc, ns, name).get("status") or {}).get("phase") == "Suspended"

        wait_for(lambda: suspended("on-list") and suspended("off-list"), 90, "both suspended")
        wait_for(lambda: allowed.requests, 30, "the operator to look for an earlier result")
    finally:
        op.stop()
    for request in allowed.requests:
        assert f"Credential={TENANT_KEY}/" in request.get("Authorization", ""), request
    seen = str(allowed.requests + elsewhere.requests)
    assert OPERATOR_KEY not in seen, "the operator sent its own key to a tenant's endpoint"
    assert elsewhere.requests == [], "the operator called an endpoint off its allow-list"
    assert "not on the operator's allow-list" in op.log_text()
