"""The real-node environment FineTuneJob tests share: the trainer image in the node, a
restricted namespace with data in S3 the pods can reach, and an operator watching it.

    from real_node_env import env, loaded_image, node_job  # fixtures and builders

``env`` (per test) gives ``kubeconfig``, ``ns``, ``op`` (the operator, a host process with the
ServiceAccount rules of rbac.py), ``image``, ``data_uri``, ``out_bucket`` and ``endpoint`` (the
S3 server as pods see it, through the node's bridge address).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from built_images import built_image
from datapaths import tldr_files
from operator_helpers import (
    OperatorProcess,
    create_s3_secret,
    diagnose,
    get_ftj,
    install_crd,
    kubectl,
    operator_service_account,
    tiny_job,
    upload_files,
    wait_for,
)

from harness._proc import wait_until
from harness.fixtures import ContainerdCluster

RUN_TIMEOUT = 600.0  # a whole tiny run: three pods that each import torch, on two loaded cores
FAIL_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def loaded_image(containerd_cluster: ContainerdCluster) -> str:
    """The trainer image, imported into the node once (skipped when its id is there)."""
    ref = built_image("trainer")
    containerd_cluster.load_image(ref)
    return ref


def restricted_namespace(cluster: ContainerdCluster, ns: str) -> str:
    """Namespace ``ns``, enforcing Pod Security ``restricted``, once its default SA exists."""
    kubectl(cluster.kubeconfig, "create", "namespace", ns)
    label = "pod-security.kubernetes.io/enforce=restricted"
    kubectl(cluster.kubeconfig, "label", "namespace", ns, label)
    wait_until(
        lambda: (
            cluster.control_plane.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default")[0] == 200
        ),
        timeout=30,
        what=f"service account default in {ns}",
    )
    return ns


def tenant_data(cluster: ContainerdCluster, s3_server: Any, ns: str, suffix: str) -> dict[str, str]:
    """A tldr slice and an output bucket in S3, the credentials Secret in ``ns``, and the S3
    endpoint as pods see it (the node's bridge address)."""
    data_bucket = s3_server.make_bucket(f"rn-data-{suffix}")
    out_bucket = s3_server.make_bucket(f"rn-runs-{suffix}")
    upload_files(s3_server.client(), data_bucket, "tldr/common", tldr_files("common")[:60])
    create_s3_secret(cluster.kubeconfig, ns, s3_server.access_key, s3_server.secret_key)
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    return {
        "data_uri": f"s3://{data_bucket}/tldr/common/",
        "out_bucket": out_bucket,
        "endpoint": f"http://{cluster.node.expose_host_port(port)}",
    }


@pytest.fixture
def env(
    containerd_cluster: ContainerdCluster, s3_server: Any, loaded_image: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """A restricted namespace, data in S3 reachable from pods, and an operator watching."""
    cluster, kc = containerd_cluster, containerd_cluster.kubeconfig
    ns = restricted_namespace(cluster, f"test-{uuid.uuid4().hex[:8]}")
    install_crd(kc)
    data = tenant_data(cluster, s3_server, ns, ns.removeprefix("test-"))
    op = OperatorProcess.start(
        operator_service_account(kc, ns, tmp_path / "operator.kubeconfig"),
        ns,
        s3_server.env(),
        tmp_path / "operator.log",
        KUBETUNE_TRAINER_IMAGE=loaded_image,
        KUBETUNE_UNSCHEDULABLE_TIMEOUT="5",
    )
    ctx = {
        "kubeconfig": kc,
        "ns": ns,
        "op": op,
        "image": loaded_image,
        **data,
    }
    yield ctx
    op.stop()
    kubectl(kc, "delete", "namespace", ns, "--wait=false", check=False)
    sa = f"kubetune-operator-{ns}"
    kubectl(kc, "delete", "clusterrole,clusterrolebinding", sa, check=False)


def node_job(env: dict[str, Any], name: str, **training: Any) -> dict[str, Any]:
    """The tiny cluster example on the real node: one CPU, no GPU, the loaded image only."""
    job = tiny_job(
        name,
        data_uri=env["data_uri"],
        output=f"s3://{env['out_bucket']}/{name}/",
        endpoint=env["endpoint"],
        secret="kubetune-s3",
        **training,
    )
    job["spec"]["resources"].update(
        {"cpu": "1", "memory": "2Gi", "gpusPerWorker": 0, "imagePullPolicy": "Never"}
    )
    job["spec"]["evaluation"]["bleu"] = {"enabled": False}
    return job


def failed_with(env: dict[str, Any], name: str, reason: str) -> dict[str, Any]:
    kc, ns = env["kubeconfig"], env["ns"]

    def failed() -> dict[str, Any] | None:
        ftj = get_ftj(kc, ns, name)
        return ftj if (ftj.get("status") or {}).get("phase") == "Failed" else None

    ftj = dict(
        wait_for(
            failed, FAIL_TIMEOUT, f"{name} to fail", dump=lambda: diagnose(kc, ns, name, env["op"])
        )
    )
    assert ftj["status"]["reason"] == reason, diagnose(kc, ns, name, env["op"])
    return ftj
