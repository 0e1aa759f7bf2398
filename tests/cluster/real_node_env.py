"""The real-node environment FineTuneJob tests share: the trainer image in the node, a
restricted namespace with data in S3 the pods can reach, and an operator watching it.

    from real_node_env import env, loaded_image, node_job  # fixtures and builders

``env`` (per test) gives ``kubeconfig``, ``ns``, ``op`` (the operator: the chart's Deployment
from the operator image, watching ``ns``; chart_operator.ChartOperator), ``image``,
``data_uri``, ``data_bucket``, ``out_bucket``, ``endpoint`` (the S3 server as pods see it,
through the node's bridge address), ``s3`` and ``client`` (the server and a boto3 client of
it), ``node`` (the ContainerdNode) and
``secret_values``: the job's S3 keys are distinctive ones, and the operator's own environment
holds a secret S3 refuses, so a leak check can look for both and the operator can only read a
job's storage with the job's keys. ``node_namespace`` is a restricted namespace with the CRD,
for tests that need only the API server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from built_images import built_image
from chart_operator import ChartOperator
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


def tenant_data(
    cluster: ContainerdCluster,
    s3_server: Any,
    ns: str,
    suffix: str,
    keys: tuple[str, str] | None = None,
) -> dict[str, str]:
    """A tldr slice and an output bucket in S3, the credentials Secret in ``ns`` (the server's
    own keys, or ``keys``), and the S3 endpoint as pods see it (the node's bridge address)."""
    data_bucket = s3_server.make_bucket(f"rn-data-{suffix}")
    out_bucket = s3_server.make_bucket(f"rn-runs-{suffix}")
    upload_files(s3_server.client(), data_bucket, "tldr/common", tldr_files("common")[:60])
    key_id, secret = keys or (s3_server.access_key, s3_server.secret_key)
    create_s3_secret(cluster.kubeconfig, ns, key_id, secret)
    return {
        "data_uri": f"s3://{data_bucket}/tldr/common/",
        "data_bucket": data_bucket,
        "out_bucket": out_bucket,
        "endpoint": pod_url(cluster, s3_server.endpoint_url),
    }


def pod_url(cluster: ContainerdCluster, url: str) -> str:
    """``url`` of a server on the host's loopback as pods reach it (the node's bridge address)."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    return f"http://{cluster.node.expose_host_port(port)}"


@pytest.fixture
def node_namespace(containerd_cluster: ContainerdCluster) -> Iterator[str]:
    """A restricted namespace on the containerd cluster, with the FineTuneJob CRD served."""
    ns = restricted_namespace(containerd_cluster, f"test-{uuid.uuid4().hex[:8]}")
    install_crd(containerd_cluster.kubeconfig)
    yield ns
    kubectl(containerd_cluster.kubeconfig, "delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture
def env(
    containerd_cluster: ContainerdCluster, s3_server: Any, loaded_image: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """A restricted namespace, data in S3 reachable from pods, and the chart's operator (its
    Deployment, from the operator image) watching it with the chart's namespaced RBAC."""
    yield from _tenant_env(containerd_cluster, s3_server, loaded_image, tmp_path, "chart")


@pytest.fixture
def cluster_wide_env(
    containerd_cluster: ContainerdCluster, s3_server: Any, loaded_image: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """``env`` with an operator that reads FineTuneJobs in every namespace, as a cluster-wide
    install does (the ServiceAccount ``kubetune-operator-<ns>`` with every rule of rbac.py in
    a ClusterRole), watching the test's namespace: for checks that span namespaces. A host
    process (operator_helpers.OperatorProcess) logged in as that ServiceAccount."""
    yield from _tenant_env(containerd_cluster, s3_server, loaded_image, tmp_path, "host")


@pytest.fixture
def light_env(
    k8s_cluster: ContainerdCluster, s3_server: Any, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """``env`` on the light node (its own CI stream; the trainer image loaded into its store),
    for long FineTuneJob tests that need nothing of the main node (no kube-proxy)."""
    image = built_image("trainer")
    k8s_cluster.load_image(image)
    yield from _tenant_env(k8s_cluster, s3_server, image, tmp_path, "chart")


def _tenant_env(
    cluster: ContainerdCluster, s3_server: Any, image: str, tmp_path: Path, operator: str
) -> Iterator[dict[str, Any]]:
    kc = cluster.kubeconfig
    ns = restricted_namespace(cluster, f"test-{uuid.uuid4().hex[:8]}")
    install_crd(kc)
    # Distinctive keys, so a leak check cannot match by accident; S3 is told to accept them.
    keys = (f"AK{uuid.uuid4().hex[:16].upper()}", f"sk-{uuid.uuid4().hex}")
    s3_server.add_credentials(*keys)
    data = tenant_data(cluster, s3_server, ns, ns.removeprefix("test-"), keys)
    op_secret = f"op-{uuid.uuid4().hex}"  # S3 refuses it: the operator must use the job's keys
    own_env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": op_secret}
    settings = {
        "KUBETUNE_TRAINER_IMAGE": image,
        "KUBETUNE_UNSCHEDULABLE_TIMEOUT": "5",
        # The endpoint the jobs name, as the chart's operator.storageEndpoints would list it:
        # the operator reads progress and dataset listings there (with each job's own keys).
        "KUBETUNE_STORAGE_ENDPOINTS": data["endpoint"],
    }
    log = tmp_path / "operator.log"
    op: ChartOperator | OperatorProcess
    if operator == "chart":
        op = ChartOperator.start(cluster, ns, own_env, log, **settings)
    else:
        sa_kubeconfig = operator_service_account(kc, ns, tmp_path / "operator.kubeconfig")
        op = OperatorProcess.start(sa_kubeconfig, ns, own_env, log, **settings)
    ctx = {
        "kubeconfig": kc,
        "ns": ns,
        "op": op,
        "image": image,
        "s3": s3_server,
        "client": s3_server.client(),
        "node": cluster.node,
        "cluster": cluster,
        "secret_values": [keys[1], op_secret],
        **data,
    }
    yield ctx
    ctx["op"].stop()  # (a test may have restarted it)
    kubectl(kc, "delete", "namespace", ns, "--wait=false", check=False)
    if operator == "host":
        sa = f"kubetune-operator-{ns}"
        kubectl(kc, "delete", "clusterrole,clusterrolebinding", sa, check=False)


def node_job(env: dict[str, Any], name: str, bleu: bool = False, **training: Any) -> dict[str, Any]:
    """The tiny cluster example on the real node: one CPU, no GPU, the loaded image only, and
    BLEU (the example's settings) only when ``bleu``."""
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
    if not bleu:
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
