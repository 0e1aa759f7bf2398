"""The Helm chart on a real node (the light one, harness.fixtures.k8s_cluster): install,
run a job, upgrade, refuse a bad value, uninstall.

    sudo bash scripts/install-system-deps.sh && make images   # once
    PYTHONPATH=tests ~/.cache/kubetune/venv/bin/python -m pytest tests/cluster/test_chart.py

The operator pod runs the operator image that `make images` built (loaded into the node,
``pullPolicy: Never``) under Pod Security ``restricted``, logged in with the chart's own
ServiceAccount, so it acts with exactly the RBAC the chart grants (a Role in each watched
namespace). This node has no trainer image: the job's stage pods name an image that is not
there, and the FineTuneJob must end ``Failed`` with ``ImagePullFailed``, written by the chart's
operator. A job that succeeds under a chart's operator runs in test_observability.py, on the
node that has the trainer image.

The tests of this module share one release and run in order (install -> job -> upgrade ->
bad value -> uninstall).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from built_images import built_image
from operator_helpers import get_ftj, kubectl, let_helm_adopt_crd, tiny_job, wait_for
from real_node_env import restricted_namespace, tenant_data

from harness.fixtures import ContainerdCluster

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/kubetune"
CRD_NAME = "finetunejobs.kubetune.io"
RELEASE = "kt"
FULLNAME = "kt-kubetune"
HEALTH_PORT = 8081  # the chart's default operator.healthPort
ABSENT_TRAINER = "localhost/kubetune/trainer:not-on-this-node"
FAIL_TIMEOUT = 240.0


@dataclass
class Release:
    cluster: ContainerdCluster
    namespace: str  # where the operator runs
    jobs_namespace: str  # watchNamespaces
    values_file: Path
    operator_image: str
    data: dict[str, str]  # data_uri, out_bucket, endpoint (tenant_data)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [
            str(self.cluster.bin_dir / "helm"),
            "--kubeconfig",
            str(self.cluster.kubeconfig),
            "--namespace",
            self.namespace,
            *args,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return kubectl(self.cluster.kubeconfig, *args, check=check)

    def get(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", *args, "-o", "json").stdout))

    def diagnose(self) -> str:
        parts = []
        for ns in (self.namespace, self.jobs_namespace):
            for what in ("deploy,rs,pods,jobs,ftj", "events"):
                out = self.kubectl("-n", ns, "get", what, "-o", "wide", check=False)
                parts.append(f"$ kubectl -n {ns} get {what}\n{out.stdout}{out.stderr}")
        logs = self.kubectl(
            "-n", self.namespace, "logs", f"deploy/{FULLNAME}", "--tail=60", check=False
        )
        parts.append(f"operator log:\n{logs.stdout}{logs.stderr}")
        return "\n".join(parts)

    def operator_pods(self) -> list[dict[str, Any]]:
        selector = "app.kubernetes.io/component=operator"
        return list(self.get("-n", self.namespace, "pods", "-l", selector)["items"])

    def healthy(self) -> bool:
        """Whether a running operator pod answers /healthz at its pod address (the host
        reaches pods through the node's bridge)."""
        for pod in self.operator_pods():
            ip = pod.get("status", {}).get("podIP")
            if not ip or pod.get("metadata", {}).get("deletionTimestamp"):
                continue
            try:
                with urllib.request.urlopen(f"http://{ip}:{HEALTH_PORT}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                continue
        return False


@pytest.fixture(scope="module")
def release(
    k8s_cluster: ContainerdCluster, s3_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    operator_image = built_image("operator")
    k8s_cluster.load_image(operator_image)
    suffix = uuid.uuid4().hex[:6]
    namespace, jobs_ns = f"kubetune-{suffix}", f"ml-{suffix}"
    for ns in (namespace, jobs_ns):
        restricted_namespace(k8s_cluster, ns)
    data = tenant_data(k8s_cluster, s3_server, jobs_ns, f"chart-{suffix}")
    repository, tag = operator_image.rsplit(":", 1)
    values = {
        "watchNamespaces": [jobs_ns],
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "operator": {
            "progressInterval": 2,
            "resyncInterval": 5,
            "trainerImage": ABSENT_TRAINER,
            "storageEndpoints": [data["endpoint"]],
        },
    }
    values_file = tmp_path_factory.mktemp("chart") / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    rel = Release(k8s_cluster, namespace, jobs_ns, values_file, operator_image, data)
    let_helm_adopt_crd(k8s_cluster.kubeconfig, RELEASE, namespace)
    yield rel
    rel.helm("uninstall", RELEASE, check=False)
    for ns in (namespace, jobs_ns):
        k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _deployment_ready(rel: Release) -> bool:
    deploy = rel.get("-n", rel.namespace, "deployment", FULLNAME)
    status = deploy.get("status") or {}
    return bool(
        status.get("observedGeneration") == deploy["metadata"]["generation"]
        and status.get("updatedReplicas") == 1
        and status.get("availableReplicas") == 1
        and not status.get("unavailableReplicas")
    )


def _replica_sets(rel: Release) -> list[dict[str, Any]]:
    items = rel.get(
        "-n", rel.namespace, "replicasets", "-l", "app.kubernetes.io/component=operator"
    )["items"]
    return list(items)


def test_helm_install_brings_the_operator_up_with_the_charts_rbac(release: Release) -> None:
    rel = release
    installed = rel.helm("install", RELEASE, str(CHART), "-f", str(rel.values_file))
    # NOTES.txt tells the user what to apply next (helm template cannot render it).
    notes = installed.stdout.split("NOTES:", 1)[1]
    assert f"kubectl apply -n {rel.jobs_namespace} -f examples/tldr-gpt2.yaml" in notes
    assert f"kubectl get ftj -n {rel.jobs_namespace} -w" in notes
    assert f"rollout status deployment/{FULLNAME}" in notes
    wait_for(
        lambda: _deployment_ready(rel),
        180,
        "the operator Deployment to be available",
        dump=rel.diagnose,
        interval=2,
    )
    wait_for(rel.healthy, 120, "the operator's /healthz", dump=rel.diagnose)
    # The pod runs the built image as the chart's ServiceAccount, non-root, read-only root.
    [pod] = rel.operator_pods()
    assert pod["spec"]["serviceAccountName"] == FULLNAME
    [status] = pod["status"]["containerStatuses"]
    assert status["image"].endswith(rel.operator_image.split("/", 1)[1]), status["image"]
    assert status["ready"] is True
    container = pod["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    crd = rel.get("crd", CRD_NAME)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # Namespaced RBAC: a Role in the watched namespace; cluster-wide only the cluster-scoped
    # rules (reading nodes), nothing about namespaced resources.
    from kubetune_operator import rbac

    role = rel.get("-n", rel.jobs_namespace, "role", FULLNAME)
    assert role["rules"]
    cluster_role = rel.get("clusterrole", FULLNAME)
    assert cluster_role["rules"] == rbac.CLUSTER_RULES
    can = rel.kubectl(
        "auth",
        "can-i",
        "create",
        "jobs.batch",
        "-n",
        rel.jobs_namespace,
        f"--as=system:serviceaccount:{rel.namespace}:{FULLNAME}",
        check=False,
    )
    assert can.stdout.strip() == "yes"
    cannot = rel.kubectl(
        "auth",
        "can-i",
        "create",
        "jobs.batch",
        "-n",
        "default",
        f"--as=system:serviceaccount:{rel.namespace}:{FULLNAME}",
        check=False,
    )
    assert cannot.stdout.strip() == "no"


def test_the_charts_operator_runs_a_finetunejob_with_the_trainer_image_of_its_values(
    release: Release,
) -> None:
    """The operator reads the job, makes its prepare Job with ``operator.trainerImage``, sees
    the kubelet fail to find that image and writes the typed reason: every step through the
    chart's RBAC. This node has no trainer image on purpose (see the module docstring)."""
    rel = release
    job = tiny_job(
        "chart-tiny",
        data_uri=rel.data["data_uri"],
        output=f"s3://{rel.data['out_bucket']}/chart-tiny/",
        endpoint=rel.data["endpoint"],
        secret="kubetune-s3",
    )
    job["spec"]["resources"].update({"cpu": "1", "gpusPerWorker": 0, "imagePullPolicy": "Never"})
    kubectl(
        rel.cluster.kubeconfig,
        "apply",
        "-n",
        rel.jobs_namespace,
        "-f",
        "-",
        stdin=yaml.safe_dump(job),
    )

    def failed() -> dict[str, Any] | None:
        ftj = get_ftj(rel.cluster.kubeconfig, rel.jobs_namespace, "chart-tiny")
        return ftj if (ftj.get("status") or {}).get("phase") == "Failed" else None

    ftj = wait_for(failed, FAIL_TIMEOUT, "chart-tiny to fail", dump=rel.diagnose, interval=2)
    status = ftj["status"]
    assert status["reason"] == "ImagePullFailed", rel.diagnose()
    assert ABSENT_TRAINER in status["message"]
    jobs = rel.get("-n", rel.jobs_namespace, "jobs")["items"]
    images = {c["image"] for j in jobs for c in j["spec"]["template"]["spec"]["containers"]}
    assert images == {ABSENT_TRAINER}
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"


def test_helm_upgrade_with_a_changed_value_rolls_the_operator(release: Release) -> None:
    rel = release
    before = {rs["metadata"]["labels"]["pod-template-hash"] for rs in _replica_sets(rel)}
    assert len(before) == 1
    rel.helm(
        "upgrade",
        RELEASE,
        str(CHART),
        "-f",
        str(rel.values_file),
        "--set",
        "operator.logLevel=DEBUG",
    )
    wait_for(
        lambda: _deployment_ready(rel) and len(_replica_sets(rel)) == 2,
        180,
        "the upgraded Deployment to roll out",
        dump=rel.diagnose,
        interval=2,
    )
    replica_sets = {rs["metadata"]["labels"]["pod-template-hash"]: rs for rs in _replica_sets(rel)}
    (new_hash,) = set(replica_sets) - before
    assert replica_sets[new_hash]["status"].get("readyReplicas") == 1
    (old_hash,) = before
    assert replica_sets[old_hash]["spec"]["replicas"] == 0
    pods = rel.get("-n", rel.namespace, "pods", "-l", f"pod-template-hash={new_hash}")["items"]
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_LOG_LEVEL"] == "DEBUG"
    wait_for(rel.healthy, 120, "the upgraded operator's /healthz", dump=rel.diagnose)


def test_a_bad_value_is_refused_and_the_release_is_unchanged(release: Release) -> None:
    rel = release
    result = rel.helm(
        "upgrade",
        RELEASE,
        str(CHART),
        "-f",
        str(rel.values_file),
        "--set",
        "replicaCount=3",
        check=False,
    )
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert "/replicaCount" in result.stderr
    history = json.loads(rel.helm("history", RELEASE, "-o", "json").stdout)
    assert [h["revision"] for h in history] == [1, 2]
    assert history[-1]["status"] == "deployed"


def test_helm_uninstall_keeps_the_crd_and_the_users_finetunejobs(release: Release) -> None:
    rel = release
    result = rel.helm("uninstall", RELEASE, "--wait")
    assert CRD_NAME in result.stdout  # "These resources were kept due to the resource policy"
    assert rel.get("crd", CRD_NAME)["metadata"]["name"] == CRD_NAME
    ftj = get_ftj(rel.cluster.kubeconfig, rel.jobs_namespace, "chart-tiny")
    assert ftj["status"]["phase"] == "Failed"  # as the job test left it
    for args in (
        ("-n", rel.namespace, "deployment", FULLNAME),
        ("-n", rel.jobs_namespace, "role", FULLNAME),
    ):
        gone = rel.kubectl("get", *args, "--ignore-not-found", "-o", "name")
        assert not gone.stdout.strip(), f"{args} still exists"
    wait_for(lambda: not rel.operator_pods(), 120, "the operator pod to go", dump=rel.diagnose)
