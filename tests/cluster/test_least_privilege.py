"""Least privilege on the real control plane: an operator installed for named namespaces may
act in those and nowhere else, and runs FineTuneJobs there with no more than that.

The chart is installed on a real node (the light one, harness.fixtures.k8s_cluster) with
``watchNamespaces=[<ns-a>]``: its operator pod runs the operator image as the chart's
ServiceAccount, every namespace enforces Pod Security ``restricted`` (the CRD comes from
``crds/``). Then:

* the API server is asked what the chart's ServiceAccount may do (``kubectl auth can-i
  --as``) and real requests are made with its token: Secrets, Jobs, ConfigMaps, pods and
  FineTuneJobs in ns-a, none of them in ns-b, kube-system or cluster-wide;
* rbac.py's split is checked against this API server's resource scopes;
* the chart's operator, watching what its Deployment tells it (``KUBETUNE_NAMESPACE``), runs
  a tiny FineTuneJob in ns-a to ``Succeeded`` (stage pods in the trainer image), refuses one in
  ns-a naming a missing Secret (the Role's ``get secrets`` at work), leaves one in ns-b with
  no status and no children, and its log (DEBUG: every API request) shows nothing refused
  along the way but the cluster-wide FineTuneJob listing it falls back from.

    sudo bash scripts/install-system-deps.sh && make images   # once
    PYTHONPATH=tests ~/.cache/kubetune/venv/bin/python -m pytest \
        tests/cluster/test_least_privilege.py

A few minutes: one tiny run, plus about 2.5 minutes the first time the node imports the
trainer image (its store keeps it).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from built_images import built_image
from chart_operator import assert_no_refusal_but_the_expected_one
from operator_helpers import (
    REPO,
    apply,
    child_jobs,
    create_s3_secret,
    diagnose,
    get_ftj,
    get_json,
    kubectl,
    service_account_kubeconfig,
    tiny_job,
    wait_for,
)
from real_node_env import restricted_namespace, tenant_data

from harness.fixtures import ContainerdCluster
from kubetune_operator import rbac

pytestmark = pytest.mark.cluster

CHART = REPO / "charts/kubetune"
RELEASE = "lp"
FULLNAME = "lp-kubetune"
RUN_TIMEOUT = 420.0  # seconds for a whole tiny run on a loaded 2-core machine
SECRET = "kubetune-s3"


@dataclass
class Install:
    cluster: ContainerdCluster
    namespace: str  # the release's: where the ServiceAccount lives
    watched: str  # ns-a, in watchNamespaces
    other: str  # ns-b, not watched
    sa_kubeconfig: Path
    data: dict[str, str]  # data_uri, out_bucket, endpoint (as pods see S3)

    @property
    def who(self) -> str:
        return f"--as=system:serviceaccount:{self.namespace}:{FULLNAME}"

    def can_i(self, verb: str, resource: str, *where: str) -> str:
        result = kubectl(
            self.cluster.kubeconfig, "auth", "can-i", verb, resource, self.who, *where, check=False
        )
        return result.stdout.strip()

    def as_operator(self, *args: str) -> subprocess.CompletedProcess[str]:
        return kubectl(self.sa_kubeconfig, *args, check=False)

    def job(self, name: str, secret: str = SECRET) -> dict[str, Any]:
        """The tiny cluster example for this node: one CPU, no GPU, the loaded image only."""
        job = tiny_job(
            name,
            data_uri=self.data["data_uri"],
            output=f"s3://{self.data['out_bucket']}/{name}/",
            endpoint=self.data["endpoint"],
            secret=secret,
        )
        job["spec"]["resources"].update(
            {"cpu": "1", "memory": "2Gi", "gpusPerWorker": 0, "imagePullPolicy": "Never"}
        )
        job["spec"]["evaluation"]["bleu"] = {"enabled": False}
        return job

    def operator_pod(self) -> dict[str, Any]:
        selector = "app.kubernetes.io/component=operator"
        [pod] = get_json(self.cluster.kubeconfig, self.namespace, "pods", "-l", selector)["items"]
        return dict(pod)

    def operator_log(self) -> str:
        name = self.operator_pod()["metadata"]["name"]
        return kubectl(self.cluster.kubeconfig, "-n", self.namespace, "logs", name).stdout


@pytest.fixture(scope="module")
def install(
    k8s_cluster: ContainerdCluster,
    s3_server: Any,
    crd_installed: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Install]:
    operator_image, trainer_image = built_image("operator"), built_image("trainer")
    for image in (operator_image, trainer_image):
        k8s_cluster.load_image(image)
    suffix = uuid.uuid4().hex[:6]
    release_ns, ns_a, ns_b = f"lp-op-{suffix}", f"lp-a-{suffix}", f"lp-b-{suffix}"
    for ns in (release_ns, ns_a, ns_b):
        restricted_namespace(k8s_cluster, ns)
    data = tenant_data(k8s_cluster, s3_server, ns_a, f"lp-{suffix}")
    # In ns-b too: a refusal there is RBAC, not a missing Secret.
    create_s3_secret(k8s_cluster.kubeconfig, ns_b, s3_server.access_key, s3_server.secret_key)
    tmp = tmp_path_factory.mktemp("least-privilege")
    repository, tag = operator_image.rsplit(":", 1)
    values = {
        "watchNamespaces": [ns_a],
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "operator": {
            "trainerImage": trainer_image,
            "storageEndpoints": [data["endpoint"]],
            "logLevel": "DEBUG",  # every API request in the log, for the refusal check
            "progressInterval": 2,
            "resyncInterval": 5,
        },
        "crds": {"install": False},
        "metrics": {"service": {"enabled": False}},
        "grafana": {"dashboards": {"enabled": False}},
    }
    (tmp / "values.yaml").write_text(yaml.safe_dump(values))
    helm = [str(k8s_cluster.bin_dir / "helm"), "--kubeconfig", str(k8s_cluster.kubeconfig)]
    helm += ["--namespace", release_ns]
    installed = subprocess.run(
        [*helm, "install", RELEASE, str(CHART), "-f", str(tmp / "values.yaml"), "--wait"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    sa_kubeconfig = service_account_kubeconfig(
        k8s_cluster.kubeconfig, release_ns, FULLNAME, tmp / "operator.kubeconfig"
    )
    yield Install(k8s_cluster, release_ns, ns_a, ns_b, sa_kubeconfig, data)
    subprocess.run([*helm, "uninstall", RELEASE], capture_output=True, check=False, timeout=120)
    for ns in (release_ns, ns_a, ns_b):
        k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_the_chart_binds_roles_in_the_watched_namespace_and_nothing_cluster_wide(
    install: Install,
) -> None:
    kc = install.cluster.kubeconfig
    role = get_json(kc, install.watched, "role", FULLNAME)
    assert role["rules"] == rbac.NAMESPACED_RULES
    for ns in (install.other, install.namespace):
        assert not kubectl(kc, "-n", ns, "get", "role,rolebinding", "-o", "name").stdout.strip()
    # Cluster-wide: only the rules on cluster-scoped resources (nodes), if any.
    cluster_wide = kubectl(
        kc, "get", "clusterrole,clusterrolebinding", FULLNAME, "--ignore-not-found", "-o", "name"
    )
    assert len(cluster_wide.stdout.split()) == (2 if rbac.CLUSTER_RULES else 0), cluster_wide
    if rbac.CLUSTER_RULES:
        role = json.loads(kubectl(kc, "get", "clusterrole", FULLNAME, "-o", "json").stdout)
        assert role["rules"] == rbac.CLUSTER_RULES
        for rule in rbac.CLUSTER_RULES:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert install.can_i(verb, resource) == "yes", (verb, resource)


def test_the_operators_service_account_may_act_in_the_watched_namespace_only(
    install: Install,
) -> None:
    needed = [
        ("get", "secrets"),
        ("create", "jobs.batch"),
        ("delete", "jobs.batch"),
        ("create", "configmaps"),
        ("delete", "configmaps"),
        ("list", "pods"),
        ("watch", "finetunejobs.kubetune.io"),
        ("patch", "finetunejobs.kubetune.io", "--subresource=status"),
        ("create", "events"),
    ]
    for verb, resource, *extra in needed:
        assert install.can_i(verb, resource, *extra, "-n", install.watched) == "yes", (
            verb,
            resource,
        )
    elsewhere = [install.other, "kube-system", "default", install.namespace]
    for ns in elsewhere:
        for verb, resource, *extra in needed:
            assert install.can_i(verb, resource, *extra, "-n", ns) == "no", (verb, resource, ns)
    # Not even in the watched namespace: reading Secret values, making pods, deleting jobs.
    for verb, resource in [
        ("list", "secrets"),
        ("create", "pods"),
        ("delete", "finetunejobs.kubetune.io"),
    ]:
        assert install.can_i(verb, resource, "-n", install.watched) == "no", (verb, resource)
    for verb, resource in [
        ("get", "secrets"),
        ("list", "finetunejobs.kubetune.io"),
        ("delete", "configmaps"),
    ]:
        assert install.can_i(verb, resource, "--all-namespaces") == "no", (verb, resource)
    for verb, resource in [("list", "namespaces"), ("list", "customresourcedefinitions")]:
        assert install.can_i(verb, resource) == "no", (verb, resource)


def test_real_requests_outside_the_watched_namespace_are_forbidden(install: Install) -> None:
    ok = install.as_operator("-n", install.watched, "get", "secret", SECRET, "-o", "name")
    assert ok.returncode == 0, ok.stderr
    for ns in (install.other, "kube-system"):
        refused = install.as_operator("-n", ns, "get", "secrets", SECRET, "-o", "name")
        assert refused.returncode != 0 and "Forbidden" in refused.stderr, (ns, refused.stderr)
    # A server-side dry run is authorized like the real thing and deletes nothing.
    refused = install.as_operator(
        "-n", install.other, "delete", "configmap", "kube-root-ca.crt", "--dry-run=server"
    )
    assert refused.returncode != 0 and "Forbidden" in refused.stderr, refused.stderr
    allowed = install.as_operator(
        "-n", install.watched, "delete", "configmap", "kube-root-ca.crt", "--dry-run=server"
    )
    assert allowed.returncode == 0, allowed.stderr
    refused = install.as_operator("get", "finetunejobs.kubetune.io", "--all-namespaces")
    assert refused.returncode != 0 and "Forbidden" in refused.stderr, refused.stderr


def test_rbac_py_puts_each_rule_where_this_api_server_scopes_its_resources(
    install: Install,
) -> None:
    def served(namespaced: bool) -> set[str]:
        out = kubectl(
            install.cluster.kubeconfig,
            "api-resources",
            f"--namespaced={str(namespaced).lower()}",
            "-o",
            "name",
        ).stdout
        # `jobs.batch` -> ("batch", "jobs"); core resources have no group.
        return {line.strip() for line in out.splitlines() if line.strip()}

    def names(rules: list[dict[str, Any]]) -> set[str]:
        return {
            f"{r.split('/')[0]}.{g}" if g else r.split("/")[0]
            for rule in rules
            for g in rule["apiGroups"]
            for r in rule["resources"]
        }

    namespaced, cluster_scoped = served(True), served(False)
    assert names(rbac.NAMESPACED_RULES) <= namespaced, names(rbac.NAMESPACED_RULES) - namespaced
    assert names(rbac.CLUSTER_RULES) <= cluster_scoped, names(rbac.CLUSTER_RULES) - cluster_scoped


def test_an_operator_confined_to_its_namespace_runs_jobs_there_and_leaves_others_alone(
    install: Install,
) -> None:
    kc = install.cluster.kubeconfig
    deployment = get_json(kc, install.namespace, "deployment", FULLNAME)
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBETUNE_NAMESPACE"] == install.watched
    apply(kc, install.watched, install.job("tiny"))
    apply(kc, install.watched, install.job("no-secret", secret="not-there"))
    apply(kc, install.other, install.job("elsewhere"))

    def dump() -> str:
        return (
            diagnose(kc, install.watched, "tiny", None)
            + "\noperator log:\n"
            + "\n".join(install.operator_log().splitlines()[-80:])
        )

    def refused() -> dict[str, Any] | None:
        status = get_ftj(kc, install.watched, "no-secret").get("status") or {}
        stalled = [c for c in status.get("conditions") or [] if c["type"] == "Stalled"]
        return stalled[0] if stalled and stalled[0]["status"] == "True" else None

    stalled = wait_for(refused, 120, "no-secret to be refused", dump=dump)
    assert stalled["reason"] == "InvalidSpec"
    assert f"Secret {install.watched}/not-there" in stalled["message"]
    assert not child_jobs(kc, install.watched, "no-secret")

    def finished() -> str | None:
        phase = (get_ftj(kc, install.watched, "tiny").get("status") or {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    assert wait_for(finished, RUN_TIMEOUT, "tiny to finish", dump=dump) == "Succeeded", dump()
    assert len(child_jobs(kc, install.watched, "tiny")) == 3

    # The unwatched namespace: its FineTuneJob was never touched.
    elsewhere = get_ftj(kc, install.other, "elsewhere")
    assert not elsewhere.get("status"), elsewhere.get("status")
    assert not child_jobs(kc, install.other, "elsewhere")
    labelled = get_json(kc, install.other, "configmaps", "-l", "kubetune.io/job")["items"]
    assert not labelled
    [status] = install.operator_pod()["status"]["containerStatuses"]
    assert status["restartCount"] == 0 and status["ready"], status
    log = install.operator_log()
    assert_no_refusal_but_the_expected_one(log)
    assert "Traceback" not in log, log[-5000:]
