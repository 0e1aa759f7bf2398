"""A child object the API server refuses (400/422) stalls the run visibly (issue 12, item 4).

The CRD refuses what the Job API would refuse on its own, but a cluster can refuse more:
here a platform team's ValidatingAdmissionPolicy allows only Jobs whose images come from its
registry. A FineTuneJob that breaks the policy must end ``Stalled`` with reason
``InvalidSpec``, the policy's message and a Warning Event, instead of looping in the
operator's backoff with no status; fixing the spec starts the run.

    pytest -m cluster tests/cluster/test_refused_children.py
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_operator import ChartOperator
from operator_helpers import (
    get_ftj,
    kubectl,
    tiny_job,
    wait_for,
)

pytestmark = pytest.mark.cluster

REGISTRY = "registry.corp.example/"
POLICY_MESSAGE = f"Jobs here must use images from {REGISTRY}"


def _policy(name: str, namespace: str) -> list[dict[str, Any]]:
    images = "object.spec.template.spec.containers"
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["batch"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["jobs"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": f"{images}.all(c, c.image.startsWith('{REGISTRY}'))",
                        "message": POLICY_MESSAGE,
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
                },
            },
        },
    ]


@pytest.fixture
def registry_policy(containerd_cluster: Any, node_namespace: str) -> Iterator[str]:
    name = f"corp-images-{node_namespace}"
    docs = _policy(name, node_namespace)
    kc = containerd_cluster.kubeconfig
    kubectl(kc, "apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    probe = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "probe"},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "elsewhere/x:1"}],
                }
            }
        },
    }

    def enforced() -> bool:  # the policy takes a moment to reach the admission chain
        result = kubectl(
            kc, "-n", node_namespace, "create", "--dry-run=server", "-f", "-",
            stdin=json.dumps(probe), check=False,
        )  # fmt: skip
        return result.returncode != 0 and POLICY_MESSAGE in result.stderr

    wait_for(enforced, 60, "the admission policy to be enforced")
    yield name
    containerd_cluster.kubectl(
        "delete",
        "validatingadmissionpolicybinding,validatingadmissionpolicy",
        name,
        "--ignore-not-found",
        check=False,
    )


def test_a_job_the_cluster_refuses_stalls_with_the_policy_message_until_the_spec_is_fixed(
    containerd_cluster: Any, node_namespace: str, registry_policy: str, tmp_path: Path
) -> None:
    kc, ns, name = containerd_cluster.kubeconfig, node_namespace, "off-registry"
    kubectl(kc, "-n", ns, "create", "secret", "generic", "s3", "--from-literal=AWS_ACCESS_KEY_ID=a")
    op = ChartOperator.start(containerd_cluster, ns, {}, tmp_path / "operator.log")
    try:
        job = tiny_job(
            name,
            data_uri="s3://data/tldr/",
            output=f"s3://runs/{name}/",
            endpoint="http://127.0.0.1:9",
            secret="s3",
        )
        job["spec"]["resources"]["image"] = "ghcr.io/kubetune/trainer:test"
        kubectl(kc, "apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(job))

        def stalled() -> dict[str, Any] | None:
            status = get_ftj(kc, ns, name).get("status") or {}
            return status if status.get("phase") == "Failed" else None

        status = wait_for(stalled, 90, "the run to stall", dump=op.log_tail)
        assert status["reason"] == "InvalidSpec"
        condition = next(c for c in status["conditions"] if c["type"] == "Stalled")
        assert condition["status"] == "True" and condition["reason"] == "InvalidSpec"
        assert POLICY_MESSAGE in condition["message"]
        events = json.loads(
            kubectl(
                kc,
                "-n",
                ns,
                "get",
                "events",
                "--field-selector",
                f"involvedObject.name={name},reason=InvalidSpec",
                "-o",
                "json",
            ).stdout
        )["items"]
        assert [e["type"] for e in events] == ["Warning"]
        assert kubectl(kc, "-n", ns, "get", "jobs", "-o", "name").stdout.strip() == ""

        # The fix: an image from the registry. A new run creates its first stage Job.
        patch = {"spec": {"resources": {"image": f"{REGISTRY}kubetune/trainer:test"}}}
        kubectl(kc, "-n", ns, "patch", "ftj", name, "--type=merge", "-p", json.dumps(patch))
        wait_for(
            lambda: (
                kubectl(kc, "-n", ns, "get", "jobs", "-o", "name").stdout.strip()
                == f"job.batch/{name}-g2-prepare"
            ),
            60,
            "the prepare Job of the fixed spec",
            dump=op.log_tail,
        )
    finally:
        op.stop()
    assert "Traceback" not in op.log_text()
