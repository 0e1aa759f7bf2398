"""The Helm chart on the real control plane (tests/harness): install, run a job, upgrade,
refuse a bad value, uninstall. Run with ``pytest -m cluster tests/cluster/test_chart.py``.

The process node runs the chart's operator pod as a local process (``kubetune operator`` from
the venv on PATH; the image is ignored). The Python client's in-cluster login reads a fixed
path the process node cannot remap, so the test hands the operator a kubeconfig holding a
token of the chart's own ServiceAccount (TokenRequest API) through the chart's
``extraVolumes``/``extraVolumeMounts``/``operator.extraEnv``: the operator acts with exactly
the RBAC the chart grants (a Role in ``watchNamespace``), as it would in a real cluster.

The tests of this module share one release and run in order (install -> job -> upgrade ->
bad value -> uninstall).
"""

from __future__ import annotations

import base64
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
from datapaths import tldr_files
from operator_helpers import (
    free_port,
    get_ftj,
    kubectl,
    let_helm_adopt_crd,
    tiny_job,
    upload_files,
    wait_for,
)

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/kubetune"
CRD_NAME = "finetunejobs.kubetune.io"
RELEASE = "kt"
FULLNAME = "kt-kubetune"
KUBECONFIG_MOUNT = "/etc/kubetune-kubeconfig"
RUN_TIMEOUT = 480.0

# The operator and stage pods run the venv's `kubetune` from the host PATH (the process node
# passes PATH on), so the venv must be on it before the cluster fixture starts the node.


@dataclass
class Release:
    cluster: Any
    namespace: str  # where the operator runs
    jobs_namespace: str  # watchNamespace
    values_file: Path
    health_port: int
    metrics_port: int
    s3: Any
    data_uri: str
    out_bucket: str

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

    def healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


def _sa_kubeconfig(cluster: Any, namespace: str, service_account: str) -> str:
    """A kubeconfig that authenticates as the ServiceAccount (a bound token, 2 hours)."""
    token = kubectl(
        cluster.kubeconfig, "-n", namespace, "create", "token", service_account, "--duration=2h"
    ).stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    ca_path = Path(admin["clusters"][0]["cluster"]["certificate-authority"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": cluster.api_url,
                    "certificate-authority-data": base64.b64encode(ca_path.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [
            {
                "name": "c",
                "context": {"cluster": "c", "user": service_account, "namespace": namespace},
            }
        ],
        "current-context": "c",
    }
    return json.dumps(config)


@pytest.fixture(scope="module")
def release(
    k8s_cluster: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    suffix = uuid.uuid4().hex[:6]
    namespace, jobs_ns = f"kubetune-{suffix}", f"ml-{suffix}"
    for ns in (namespace, jobs_ns):
        k8s_cluster.kubectl("create", "namespace", ns)
    client = s3_server.client()
    data_bucket = s3_server.make_bucket(f"chart-data-{suffix}")
    out_bucket = s3_server.make_bucket(f"chart-runs-{suffix}")
    upload_files(client, data_bucket, "tldr/common", tldr_files("common")[:150])
    kubectl(
        k8s_cluster.kubeconfig,
        "-n",
        jobs_ns,
        "create",
        "secret",
        "generic",
        "kubetune-s3",
        f"--from-literal=AWS_ACCESS_KEY_ID={s3_server.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3_server.secret_key}",
    )
    health_port, metrics_port = free_port(), free_port()
    values = {
        "watchNamespace": jobs_ns,
        "image": {"tag": "test"},
        "operator": {
            "progressInterval": 2,
            "resyncInterval": 5,
            "healthPort": health_port,
            "metricsPort": metrics_port,
            "trainerImage": "kubetune/trainer:test",
            "extraEnv": [
                {"name": "KUBECONFIG", "value": f"{KUBECONFIG_MOUNT}/config"},
                *({"name": k, "value": v} for k, v in sorted(s3_server.env().items())),
            ],
        },
        "extraVolumes": [{"name": "kubeconfig", "secret": {"secretName": "operator-kubeconfig"}}],
        "extraVolumeMounts": [
            {"name": "kubeconfig", "mountPath": KUBECONFIG_MOUNT, "readOnly": True}
        ],
    }
    values_file = tmp_path_factory.mktemp("chart") / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    rel = Release(
        k8s_cluster,
        namespace,
        jobs_ns,
        values_file,
        health_port,
        metrics_port,
        s3_server,
        f"s3://{data_bucket}/tldr/common/",
        out_bucket,
    )
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
    # The ServiceAccount exists now: give the operator a kubeconfig that acts as it.
    kubeconfig = _sa_kubeconfig(rel.cluster, rel.namespace, FULLNAME)
    rel.kubectl(
        "-n",
        rel.namespace,
        "create",
        "secret",
        "generic",
        "operator-kubeconfig",
        f"--from-literal=config={kubeconfig}",
    )
    wait_for(
        lambda: _deployment_ready(rel),
        180,
        "the operator Deployment to be available",
        dump=rel.diagnose,
        interval=2,
    )
    wait_for(rel.healthy, 120, "the operator's /healthz", dump=rel.diagnose)
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


def test_a_finetunejob_applied_after_install_succeeds(release: Release) -> None:
    rel = release
    job = tiny_job(
        "chart-tiny",
        data_uri=rel.data_uri,
        output=f"s3://{rel.out_bucket}/chart-tiny/",
        endpoint=rel.s3.endpoint_url,
        secret="kubetune-s3",
    )
    kubectl(
        rel.cluster.kubeconfig,
        "apply",
        "-n",
        rel.jobs_namespace,
        "-f",
        "-",
        stdin=yaml.safe_dump(job),
    )

    def finished() -> str | None:
        phase = (
            get_ftj(rel.cluster.kubeconfig, rel.jobs_namespace, "chart-tiny").get("status") or {}
        ).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_for(finished, RUN_TIMEOUT, "chart-tiny to finish", dump=rel.diagnose, interval=2)
    assert phase == "Succeeded", rel.diagnose()
    status = get_ftj(rel.cluster.kubeconfig, rel.jobs_namespace, "chart-tiny")["status"]
    assert status["results"]["perplexity"] > 0
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


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
    assert ftj["status"]["phase"] == "Succeeded"
    for args in (
        ("-n", rel.namespace, "deployment", FULLNAME),
        ("-n", rel.jobs_namespace, "role", FULLNAME),
    ):
        gone = rel.kubectl("get", *args, "--ignore-not-found", "-o", "name")
        assert not gone.stdout.strip(), f"{args} still exists"
    wait_for(lambda: not rel.healthy(), 60, "the operator process to stop", dump=rel.diagnose)
