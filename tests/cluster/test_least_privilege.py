"""Least privilege on the real control plane: an operator installed for named namespaces may
act in those and nowhere else, and runs FineTuneJobs there with no more than that.

The chart is installed with ``watchNamespaces=[<ns-a>]`` (``replicaCount=0``: the operator
runs as a local process instead, see below; the CRD comes from ``crds/``). Then:

* the API server is asked what the chart's ServiceAccount may do (``kubectl auth can-i
  --as``) and real requests are made with its token: Secrets, Jobs, ConfigMaps, pods and
  FineTuneJobs in ns-a, none of them in ns-b, kube-system or cluster-wide;
* rbac.py's split is checked against this API server's resource scopes;
* the operator runs as that ServiceAccount (a token kubeconfig), watching what the chart's
  Deployment tells it (``KUBETUNE_NAMESPACE``): a tiny FineTuneJob in ns-a runs to
  ``Succeeded``, one in ns-a naming a missing Secret is refused (the Role's ``get secrets``
  at work), one in ns-b gets no status and no children, and nothing is refused along the way
  but the cluster-wide FineTuneJob listing it falls back from.

Run with ``pytest -m cluster tests/cluster/test_least_privilege.py`` (a few minutes: one tiny
run on the process node).
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from datapaths import tldr_files
from operator_helpers import (
    REPO,
    OperatorProcess,
    apply,
    child_jobs,
    diagnose,
    get_ftj,
    get_json,
    kubectl,
    service_account_kubeconfig,
    tiny_job,
    upload_files,
    wait_for,
)

from kubetune_operator import rbac
from kubetune_operator.kube import all_ftjs_path

pytestmark = pytest.mark.cluster

CHART = REPO / "charts/kubetune"
RELEASE = "lp"
FULLNAME = "lp-kubetune"
RUN_TIMEOUT = 420.0  # seconds for a whole tiny run on a loaded 2-core machine
SECRET = "kubetune-s3"
# The one refusal an operator of named namespaces meets by design, once: reconcile.py lists
# the FineTuneJobs of every namespace for the storage.output check and, refused, checks
# within the job's namespace from then on (and logs a warning saying so).
EXPECTED_REFUSAL = f"GET {all_ftjs_path()}"


@dataclass
class Install:
    cluster: Any
    namespace: str  # the release's: where the ServiceAccount lives
    watched: str  # ns-a, in watchNamespaces
    other: str  # ns-b, not watched
    sa_kubeconfig: Path
    s3: Any
    data_uri: str
    out_bucket: str

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
        return tiny_job(
            name,
            data_uri=self.data_uri,
            output=f"s3://{self.out_bucket}/{name}/",
            endpoint=self.s3.endpoint_url,
            secret=secret,
        )


def _create_namespace(cluster: Any, name: str) -> None:
    cluster.kubectl("create", "namespace", name)

    # Pods are rejected until the service-account controller has made `default`.
    def has_default_sa() -> bool:
        status, _ = cluster.control_plane.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")
        return bool(status == 200)

    wait_for(has_default_sa, 30, f"service account default in {name}")


@pytest.fixture(scope="module")
def install(
    k8s_cluster: Any,
    s3_server: Any,
    crd_installed: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Install]:
    suffix = uuid.uuid4().hex[:6]
    release_ns, ns_a, ns_b = f"lp-op-{suffix}", f"lp-a-{suffix}", f"lp-b-{suffix}"
    for ns in (release_ns, ns_a, ns_b):
        _create_namespace(k8s_cluster, ns)
    client = s3_server.client()
    data_bucket = s3_server.make_bucket(f"lp-data-{suffix}")
    out_bucket = s3_server.make_bucket(f"lp-runs-{suffix}")
    upload_files(client, data_bucket, "tldr/common", tldr_files("common")[:150])
    for ns in (ns_a, ns_b):  # in both: a refusal in ns-b is RBAC, not a missing Secret
        kubectl(
            k8s_cluster.kubeconfig,
            "-n",
            ns,
            "create",
            "secret",
            "generic",
            SECRET,
            f"--from-literal=AWS_ACCESS_KEY_ID={s3_server.access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={s3_server.secret_key}",
        )
    tmp = tmp_path_factory.mktemp("least-privilege")
    values = {
        "watchNamespaces": [ns_a],
        "replicaCount": 0,
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
    yield Install(
        k8s_cluster,
        release_ns,
        ns_a,
        ns_b,
        sa_kubeconfig,
        s3_server,
        f"s3://{data_bucket}/tldr/common/",
        out_bucket,
    )
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
    install: Install, tmp_path: Path
) -> None:
    kc = install.cluster.kubeconfig
    deployment = get_json(kc, install.namespace, "deployment", FULLNAME)
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBETUNE_NAMESPACE"] == install.watched
    op = OperatorProcess.start(
        install.sa_kubeconfig, env["KUBETUNE_NAMESPACE"], install.s3.env(), tmp_path / "op.log"
    )
    try:
        apply(kc, install.watched, install.job("tiny"))
        apply(kc, install.watched, install.job("no-secret", secret="not-there"))
        apply(kc, install.other, install.job("elsewhere"))

        def dump() -> str:
            return diagnose(kc, install.watched, "tiny", op)

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
        assert op.proc.poll() is None, op.log_tail()
    finally:
        op.stop()
    log = op.log_text()
    # Every request the API server refused (urllib3 logs each at DEBUG), and any other word
    # of a refusal (kopf's watchers would log "Forbidden").
    refused = re.findall(r'"([A-Z]+ [^ ?"]+)[^"]* HTTP/1\.1" 403', log)
    assert refused.count(EXPECTED_REFUSAL) == len(refused) <= 1, refused
    other = [
        line
        for line in log.splitlines()
        if re.search("forbidden", line, re.IGNORECASE) and "HTTP/1.1" not in line
    ]
    assert not other, "\n".join(other[:20])
    assert "Traceback" not in log, op.log_tail(80)
