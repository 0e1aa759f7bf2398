"""The operator as users run it: the chart's Deployment, from the operator image, on a real node.

    from chart_operator import ChartOperator
    op = ChartOperator.start(cluster, ns, own_env, tmp_path / "operator.log",
                             KUBETUNE_TRAINER_IMAGE=image, KUBETUNE_STORAGE_ENDPOINTS=url)
    op.log_text(); op.metrics(); op.kill(); op = op.restart(); op.stop()

``helm install`` of charts/kubetune into the test's namespace, watching only that namespace
(a Role there, the chart's own ServiceAccount), with the operator image `make images` built,
loaded into the node (``pullPolicy: Never``). The same methods as operator_helpers'
OperatorProcess, so a test does not care which it has: ``kill`` SIGKILLs the container on the
node (a crashed operator pod; the kubelet starts it again), ``stop`` uninstalls the release.
Its log is every container's log of the release, kept in ``log_path`` too.

``KUBETUNE_*`` settings the chart has a value for become that value (trainer image, storage
endpoints, the intervals, the unschedulable timeout, the log level); everything else, like the
operator's own S3 keys, goes to ``operator.extraEnv``, the secret ones through a Secret so
that no object a leak check reads holds them.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml
from built_images import built_image
from operator_helpers import REPO, get_json, kubectl, wait_for

from harness.fixtures import ContainerdCluster
from kubetune_operator.kube import all_ftjs_path

CHART = REPO / "charts/kubetune"
METRICS_PORT, HEALTH_PORT = 8080, 8081  # the chart's defaults
START_TIMEOUT = 180.0  # helm install to /healthz on a loaded 2-core node
# KUBETUNE_* settings -> (the chart's operator.<value>, how to write it)
CHART_VALUES: dict[str, tuple[str, Any]] = {
    "KUBETUNE_TRAINER_IMAGE": ("trainerImage", str),
    "KUBETUNE_STORAGE_ENDPOINTS": ("storageEndpoints", lambda v: [e for e in v.split(",") if e]),
    "KUBETUNE_PROGRESS_INTERVAL": ("progressInterval", int),
    "KUBETUNE_RESYNC_INTERVAL": ("resyncInterval", int),
    "KUBETUNE_UNSCHEDULABLE_TIMEOUT": ("unschedulableTimeout", int),
    "KUBETUNE_LOG_LEVEL": ("logLevel", str),
}
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def chart_values(
    namespace: str, release: str, image: str, settings: dict[str, str], own_secret: str
) -> dict[str, Any]:
    """The chart's values for an operator of ``namespace`` with ``settings`` (env names)."""
    operator: dict[str, Any] = {"progressInterval": 2, "resyncInterval": 5, "logLevel": "DEBUG"}
    extra_env: list[dict[str, Any]] = []
    for name, value in sorted(settings.items()):
        if name in CHART_VALUES:
            key, convert = CHART_VALUES[name]
            operator[key] = convert(value)
        elif name in SECRET_ENV:
            ref = {"secretKeyRef": {"name": own_secret, "key": name}}
            extra_env.append({"name": name, "valueFrom": ref})
        else:
            extra_env.append({"name": name, "value": value})
    operator["extraEnv"] = extra_env
    repository, tag = image.rsplit(":", 1)
    return {
        "fullnameOverride": release,
        "watchNamespaces": [namespace],
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "operator": operator,
        "crds": {"install": False},
        "grafana": {"dashboards": {"enabled": False}},
    }


class ChartOperator:
    """One release of the chart in a test namespace; see the module docstring."""

    def __init__(
        self, cluster: ContainerdCluster, namespace: str, release: str, log_path: Path
    ) -> None:
        self.cluster, self.namespace, self.release, self.log_path = (
            cluster,
            namespace,
            release,
            log_path,
        )
        self.earlier_logs = ""  # of containers that are gone (killed, uninstalled)
        self.installed = False
        self._killed_restarts: int | None = None  # the restart count a kill() left behind
        self.starts = 1  # operator processes whose logs log_text holds

    @classmethod
    def start(
        cls,
        cluster: ContainerdCluster,
        namespace: str,
        own_env: dict[str, str],
        log_path: Path,
        **settings: str,
    ) -> ChartOperator:
        image = built_image("operator")
        cluster.load_image(image)
        release = f"op-{uuid.uuid4().hex[:6]}"
        own_secret = f"{release}-own-keys"
        secret_keys = {k: v for k, v in own_env.items() if k in SECRET_ENV}
        kubectl(
            cluster.kubeconfig,
            "-n",
            namespace,
            "create",
            "secret",
            "generic",
            own_secret,
            *(f"--from-literal={k}={v}" for k, v in sorted(secret_keys.items())),
        )
        env = {k: v for k, v in own_env.items() if k.startswith("AWS_")} | settings
        values = chart_values(namespace, release, image, env, own_secret)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        values_file = log_path.with_suffix(".values.yaml")
        values_file.write_text(yaml.safe_dump(values))
        op = cls(cluster, namespace, release, log_path)
        op.helm("install", release, str(CHART), "-f", str(values_file))
        op.installed = True
        op.wait_healthy()
        return op

    # -- helm and the pod ------------------------------------------------------------------

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.cluster.bin_dir / "helm"), "--kubeconfig", str(self.cluster.kubeconfig)]
        cmd += ["--namespace", self.namespace, *args]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)}:\n{result.stdout}{result.stderr}")
        return result

    def pod(self) -> dict[str, Any] | None:
        """The release's operator pod that is not being deleted, if any."""
        selector = f"app.kubernetes.io/instance={self.release}"
        pods = get_json(self.cluster.kubeconfig, self.namespace, "pods", "-l", selector)["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        return dict(live[0]) if live else None

    def _container(self) -> dict[str, Any]:
        pod = self.pod()
        statuses = (pod or {}).get("status", {}).get("containerStatuses") or []
        return dict(statuses[0]) if statuses else {}

    def _get(self, port: int, path: str, timeout: float = 5.0) -> str:
        ip = ((self.pod() or {}).get("status") or {}).get("podIP")
        if not ip:
            raise OSError("the operator pod has no address yet")
        with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=timeout) as resp:
            return str(resp.read().decode())

    def _healthy(self) -> bool:
        if not self._container().get("ready"):
            return False
        try:
            self._get(HEALTH_PORT, "/healthz", timeout=2)
        except OSError:
            return False
        return True

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        wait_for(self._healthy, timeout, f"operator {self.release} healthy", dump=self.describe)

    def describe(self) -> str:
        out = kubectl(
            self.cluster.kubeconfig, "-n", self.namespace, "get", "deploy,pods", "-o", "wide"
        )
        events = kubectl(
            self.cluster.kubeconfig, "-n", self.namespace, "get", "events", check=False
        ).stdout
        return f"{out.stdout}\n{events[-3000:]}\n{self.log_tail()}"

    # -- what OperatorProcess offers ---------------------------------------------------------

    def metrics(self) -> str:
        return self._get(METRICS_PORT, "/metrics")

    def kill(self) -> None:
        """SIGKILL the operator's container on the node: no cleanup, like a crash or an OOM
        kill. The kubelet starts it again (``restart`` waits for that)."""
        status = self._container()
        self._killed_restarts = int(status.get("restartCount", 0))
        self._save_logs()
        container_id = str(status["containerID"]).split("://", 1)[1]
        self.cluster.node.ctr("tasks", "kill", "--signal", "SIGKILL", container_id)

    def restart(self) -> ChartOperator:
        """After ``kill``: wait for the kubelet's new container; otherwise delete the pod and
        wait for the Deployment's next one."""
        killed = self._killed_restarts
        if killed is None:
            self._save_logs()
            pod = self.pod()
            assert pod is not None, "no operator pod to restart"
            kubectl(
                self.cluster.kubeconfig, "-n", self.namespace, "delete", "pod",
                pod["metadata"]["name"], "--wait=true",
            )  # fmt: skip
        else:
            wait_for(
                lambda: int(self._container().get("restartCount", 0)) > killed,
                120,
                "the kubelet to start the killed operator again",
                dump=self.describe,
            )
            self._killed_restarts = None
        self.starts += 1
        self.wait_healthy()
        return self

    def stop(self) -> None:
        """Uninstall the release (its Role and ServiceAccount go with it), keeping the log."""
        if not self.installed:
            return
        self._save_logs()
        self.helm("uninstall", self.release, "--wait", "--timeout", "90s", check=False)
        self.installed = False

    def _save_logs(self) -> None:
        """Add the current container's log to what log_text returns from now on."""
        self.earlier_logs = self.log_text()
        self.log_path.write_text(self.earlier_logs, encoding="utf-8")

    def log_text(self) -> str:
        pod = self.pod() if self.installed else None
        if pod is None:
            return self.earlier_logs
        logs = kubectl(
            self.cluster.kubeconfig, "-n", self.namespace, "logs", pod["metadata"]["name"],
            check=False,
        )  # fmt: skip
        # kill() and restart() saved the log of the container before this one.
        return self.earlier_logs + (logs.stdout if logs.returncode == 0 else "")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# The one refusal an operator of named namespaces meets by design: reconcile.py lists the
# FineTuneJobs of every namespace for the storage.output check and, refused, checks within the
# job's namespace from then on (and logs a warning saying so). Handlers that run at once
# before the first refusal is remembered each meet it: at most operator.maxConcurrent of them.
MAX_CONCURRENT = 4  # the chart's operator.maxConcurrent
EXPECTED_REFUSAL = f"GET {all_ftjs_path()}"


def assert_no_refusal_but_the_expected_one(log: str, starts: int = 1) -> None:
    """Every request the API server refused (urllib3 logs each at DEBUG) is the expected
    cluster-wide listing, at most MAX_CONCURRENT times per operator process (``starts`` of
    them wrote ``log``), and no other line speaks of a refusal (kopf's watchers would log
    "Forbidden")."""
    refused = re.findall(r'"([A-Z]+ [^ ?"]+)[^"]* HTTP/1\.1" 403', log)
    assert refused.count(EXPECTED_REFUSAL) == len(refused) <= starts * MAX_CONCURRENT, refused
    other = [
        line
        for line in log.splitlines()
        if re.search("forbidden", line, re.IGNORECASE) and "HTTP/1.1" not in line
    ]
    assert not other, "\n".join(other[:20])
