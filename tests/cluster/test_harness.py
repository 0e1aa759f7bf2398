"""The harness's components, and the Kubernetes behaviour the operator relies on, for real.

    cd /work/main && PYTHONPATH=tests ~/.cache/kubetune/venv/bin/python -m pytest -q \
        -p no:cacheprovider tests/cluster/test_harness.py

Needs root, scripts/install-system-deps.sh (runc, CNI plugins, prometheus) and the binaries of
scripts/build-tools.sh (built on first use otherwise).

Pods run on ``k8s_cluster``'s real node (kubelet + containerd + runc) from the kt-probe test
image (tests/harness/node/probe.go; its steps are listed there), which the harness loads into
the node, so nothing is pulled. Covered here:

- Jobs: one completes and ``kubectl logs`` (of its pod and of ``job/NAME``) shows its output;
  a failing one fails after its backoffLimit, each pod with the container's exit code and
  termination message; deleting one (Background or Foreground propagation) stops its
  container on the node and removes its pods.
- Pods: init containers run first and an OnFailure container is restarted; a ConfigMap volume
  and Secret env reach the container; the service-account token authenticates to the API
  server; activeDeadlineSeconds kills the pod (DeadlineExceeded); a pod wanting more GPUs than
  the node has stays Pending (Unschedulable, a FailedScheduling event); a pod that ends while
  the API server is down is reported once it is back; restricted Pod Security rejects a
  privileged pod.
- The rest of the harness: the control plane's pinned version, helm and kubeconform, an S3
  object round trip, Prometheus scraping an endpoint.

The node itself (containerd 2, non-root read-only pods, memory limits, networking, DNS, the
trainer image, teardown) is tested in test_containerd_node.py.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness._proc import free_port, wait_until
from harness.fixtures import ContainerdCluster

pytestmark = pytest.mark.cluster
KUBE_VERSION = re.search(
    r"k8s\.io/kubernetes (v\S+)", (Path(__file__).parent / "tools" / "go.mod").read_text()
)
# What the operator's pods declare too (and the image's user, 65534, already is).
RESTRICTED = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# Pods start in seconds, but other cluster tests may share the machine's 2 cores.
POD_TIMEOUT = 120.0


@pytest.fixture
def api(k8s_cluster: ContainerdCluster) -> Iterator[Any]:
    with k8s_cluster.api_client() as api_client:
        yield api_client


@pytest.fixture(scope="module")
def probe_image(k8s_cluster: ContainerdCluster) -> str:
    return k8s_cluster.probe_image()


def core_api(api: Any) -> Any:
    # Any: the tests pass plain dicts as bodies, which the client's model typings do not admit.
    return client.CoreV1Api(api)


def batch_api(api: Any) -> Any:
    return client.BatchV1Api(api)


def probe_container(name: str, image: str, steps: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "Never",  # loaded into the node; there is no registry
        "args": steps,
        "securityContext": RESTRICTED,
        **extra,
    }


def probe_pod(name: str, image: str, *steps: str, **spec: Any) -> dict[str, Any]:
    """A bare pod running `kt-probe steps...`; `container` updates the container, the other
    keyword args go into the pod's spec."""
    container = probe_container("main", image, list(steps), **spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [container],
            **spec,
        },
    }


def probe_job(name: str, image: str, *steps: str, backoff_limit: int = 0) -> dict[str, Any]:
    pod = probe_pod(name, image, *steps)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": backoff_limit, "template": {"spec": pod["spec"]}},
    }


def wait_pod_phase(
    api: Any, namespace: str, name: str, phases: tuple[str, ...], timeout: float = POD_TIMEOUT
) -> Any:
    core = core_api(api)

    def in_phase() -> Any:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase in phases else None

    return wait_until(in_phase, timeout=timeout, what=f"pod {name} in phase {phases}", interval=0.5)


def wait_container_started(api: Any, namespace: str, name: str) -> str:
    """Wait until pod `name`'s container runs; return its containerd id."""
    core = core_api(api)

    def started() -> str | None:
        statuses = core.read_namespaced_pod(name, namespace).status.container_statuses or []
        running = statuses and statuses[0].state.running and statuses[0].container_id
        return str(statuses[0].container_id) if running else None

    container_id = wait_until(
        started, timeout=POD_TIMEOUT, what=f"the container of pod {name} to run", interval=0.5
    )
    assert container_id.startswith("containerd://"), container_id
    return container_id.removeprefix("containerd://")


def node_task(cluster: ContainerdCluster, container_id: str) -> str | None:
    """The containerd task (the process) of a container on the node: "PID STATUS", or None."""
    listing = cluster.node.ctr("tasks", "ls", timeout=30).stdout.splitlines()
    for line in listing[1:]:
        task, *rest = line.split()
        if task == container_id:
            return " ".join(rest)
    return None


def job_condition(api: Any, namespace: str, name: str, timeout: float = POD_TIMEOUT) -> Any:
    """Wait for the Job's Complete or Failed condition and return it."""
    batch = batch_api(api)

    def finished() -> Any:
        conditions = batch.read_namespaced_job_status(name, namespace).status.conditions or []
        return next(
            (c for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"), None
        )

    return wait_until(finished, timeout=timeout, what=f"job {name} to finish", interval=0.5)


def job_pods(api: Any, namespace: str, job: str) -> list[Any]:
    items: list[Any] = (
        core_api(api).list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    )
    return items


# -- Jobs and logs -------------------------------------------------------------------------


def test_job_completes_and_its_logs_show_the_output(
    k8s_cluster: ContainerdCluster, k8s_namespace: str, api: Any, probe_image: str
) -> None:
    job = probe_job("hello", probe_image, "env:POD_NAME", "say:arg-1")
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    job["spec"]["template"]["spec"]["containers"][0]["env"] = env
    batch_api(api).create_namespaced_job(k8s_namespace, job)

    assert job_condition(api, k8s_namespace, "hello").type == "Complete"
    [pod] = job_pods(api, k8s_namespace, "hello")
    assert pod.spec.node_name == k8s_cluster.node_name
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert {c.type for c in pod.status.conditions if c.status == "True"} >= {
        "PodScheduled",
        "Initialized",
    }
    logs = k8s_cluster.kubectl("logs", "-n", k8s_namespace, pod.metadata.name).stdout
    assert logs == f"POD_NAME={pod.metadata.name}\narg-1\n"
    tail = k8s_cluster.kubectl("logs", "-n", k8s_namespace, "job/hello", "--tail=1").stdout
    assert tail == "arg-1\n"


def test_failing_job_fails_after_backoff_limit_with_exit_code_and_message(
    k8s_cluster: ContainerdCluster, k8s_namespace: str, api: Any, probe_image: str
) -> None:
    job = probe_job(
        "fails",
        probe_image,
        "say:failing",
        "write:/dev/termination-log=bad input",
        "exit:3",
        "say:not reached",
        backoff_limit=1,
    )
    batch_api(api).create_namespaced_job(k8s_namespace, job)

    # backoffLimit 1 = two pods; the Job controller waits ~10s (pod-failure backoff) in between.
    condition = job_condition(api, k8s_namespace, "fails", timeout=240)
    assert (condition.type, condition.reason) == ("Failed", "BackoffLimitExceeded")
    pods = job_pods(api, k8s_namespace, "fails")
    assert len(pods) == 2
    for pod in pods:
        assert pod.status.phase == "Failed"
        terminated = pod.status.container_statuses[0].state.terminated
        assert (terminated.exit_code, terminated.reason, terminated.message) == (
            3,
            "Error",
            "bad input",
        )
        logs = k8s_cluster.kubectl("logs", "-n", k8s_namespace, pod.metadata.name).stdout
        assert logs == "failing\n"


@pytest.mark.parametrize("propagation", ["Background", "Foreground"])
def test_deleting_job_stops_its_container_and_removes_its_pods(
    k8s_cluster: ContainerdCluster,
    k8s_namespace: str,
    api: Any,
    probe_image: str,
    propagation: str,
) -> None:
    batch_api(api).create_namespaced_job(
        k8s_namespace, probe_job("sleeper", probe_image, "say:up", "sleep")
    )
    pod_name = wait_until(
        lambda: next((p.metadata.name for p in job_pods(api, k8s_namespace, "sleeper")), None),
        timeout=POD_TIMEOUT,
        what="the Job's pod",
    )
    container_id = wait_container_started(api, k8s_namespace, pod_name)
    task = node_task(k8s_cluster, container_id)
    assert task is not None and task.endswith("RUNNING"), task

    batch_api(api).delete_namespaced_job(
        "sleeper", k8s_namespace, body=client.V1DeleteOptions(propagation_policy=propagation)
    )
    wait_until(
        lambda: node_task(k8s_cluster, container_id) is None,
        timeout=POD_TIMEOUT,
        what=f"the kubelet to stop container {container_id}",
    )
    wait_until(
        lambda: not job_pods(api, k8s_namespace, "sleeper"),
        timeout=POD_TIMEOUT,
        what="GC to delete the pods",
    )

    def job_gone() -> bool:
        try:
            batch_api(api).read_namespaced_job("sleeper", k8s_namespace)
        except ApiException as err:
            if err.status == 404:
                return True
            raise
        return False

    # Foreground: the Job object stays until its pods are gone, then goes too.
    wait_until(job_gone, timeout=POD_TIMEOUT, what="the Job to be deleted")


# -- Pods ----------------------------------------------------------------------------------


def test_init_container_runs_first_and_on_failure_restarts_the_container(
    k8s_cluster: ContainerdCluster, k8s_namespace: str, api: Any, probe_image: str
) -> None:
    # The main container fails on its first attempt (no marker yet) and succeeds on the restart;
    # both attempts print what the init container wrote into the shared emptyDir.
    work = [{"name": "work", "mountPath": "/work"}]
    pod = probe_pod(
        "restarts",
        probe_image,
        "cat:/work/from-init",
        "failonce:/work/attempted",
        restartPolicy="OnFailure",
        volumes=[{"name": "work", "emptyDir": {}}],
        container={"volumeMounts": work, "terminationMessagePolicy": "FallbackToLogsOnError"},
    )
    pod["spec"]["initContainers"] = [
        probe_container("init", probe_image, ["write:/work/from-init=init ran"], volumeMounts=work)
    ]
    core_api(api).create_namespaced_pod(k8s_namespace, pod)

    # OnFailure restarts after the kubelet's crash-loop backoff (10 s the first time).
    done = wait_pod_phase(api, k8s_namespace, "restarts", ("Succeeded", "Failed"))
    assert done.status.phase == "Succeeded"
    assert done.status.init_container_statuses[0].state.terminated.exit_code == 0
    status = done.status.container_statuses[0]
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 1
    assert k8s_cluster.kubectl("logs", "-n", k8s_namespace, "restarts").stdout == "init ran\n"
    # The first attempt's output, kept as its termination message (FallbackToLogsOnError).
    first = status.last_state.terminated.message
    assert first.startswith("init ran\n") and "first attempt" in first, first


def test_pod_sees_config_map_volume_and_secret_env(
    k8s_cluster: ContainerdCluster, k8s_namespace: str, api: Any, probe_image: str
) -> None:
    core = core_api(api)
    core.create_namespaced_config_map(
        k8s_namespace,
        {
            "metadata": {"name": "settings"},
            "data": {"model.yaml": "lr: 0.1\n", "unused": "x"},
        },
    )
    core.create_namespaced_secret(
        k8s_namespace,
        {
            "metadata": {"name": "creds"},
            "stringData": {"token": "s3cr3t", "region": "eu"},
        },
    )
    pod = probe_pod(
        "reader",
        probe_image,
        "cat:/etc/kubetune/model.yaml",
        "env:TOKEN",
        "env:CRED_region",
        "ls:/etc/kubetune",
        volumes=[
            {
                "name": "settings",
                "configMap": {
                    "name": "settings",
                    "items": [{"key": "model.yaml", "path": "model.yaml"}],
                },
            }
        ],
        container={
            "volumeMounts": [{"name": "settings", "mountPath": "/etc/kubetune", "readOnly": True}],
            "env": [
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}
            ],
            "envFrom": [{"secretRef": {"name": "creds"}, "prefix": "CRED_"}],
        },
    )
    core.create_namespaced_pod(k8s_namespace, pod)

    phase = wait_pod_phase(api, k8s_namespace, "reader", ("Succeeded", "Failed")).status.phase
    logs = k8s_cluster.kubectl("logs", "-n", k8s_namespace, "reader").stdout
    assert phase == "Succeeded", logs
    assert logs == "lr: 0.1\nTOKEN=s3cr3t\nCRED_region=eu\nls /etc/kubetune: model.yaml\n"


def test_service_account_token_authenticates_the_pod(
    k8s_cluster: ContainerdCluster, k8s_namespace: str, api: Any, probe_image: str
) -> None:
    # A SelfSubjectReview, not /version (which anonymous users may read too): the API server
    # names the pod's service account. KUBERNETES_SERVICE_* point at the `kubernetes` Service.
    pod = probe_pod(
        "whoami",
        probe_image,
        "review",
        "cat:/var/run/secrets/kubernetes.io/serviceaccount/namespace",
    )
    core_api(api).create_namespaced_pod(k8s_namespace, pod)
    phase = wait_pod_phase(api, k8s_namespace, "whoami", ("Succeeded", "Failed")).status.phase
    logs = k8s_cluster.kubectl("logs", "-n", k8s_namespace, "whoami").stdout
    assert phase == "Succeeded", logs
    assert logs.split() == [f"user=system:serviceaccount:{k8s_namespace}:default", k8s_namespace]


def test_active_deadline_kills_the_pod(
    k8s_cluster: ContainerdCluster, k8s_namespace: str, api: Any, probe_image: str
) -> None:
    # Long enough for the container to be seen running first, on a busy machine.
    pod = probe_pod("deadline", probe_image, "say:up", "sleep", activeDeadlineSeconds=8)
    core_api(api).create_namespaced_pod(k8s_namespace, pod)
    container_id = wait_container_started(api, k8s_namespace, "deadline")

    pod = wait_pod_phase(api, k8s_namespace, "deadline", ("Succeeded", "Failed"))
    assert (pod.status.phase, pod.status.reason) == ("Failed", "DeadlineExceeded")
    started = pod.status.start_time
    assert started is not None
    wait_until(
        lambda: node_task(k8s_cluster, container_id) is None,
        timeout=60,
        what=f"the kubelet to kill container {container_id}",
    )
    terminated = core_api(api).read_namespaced_pod("deadline", k8s_namespace)
    state = terminated.status.container_statuses[0].state
    assert state.terminated is not None, state
    # Killed by the deadline, not before it: sleep only ends on a signal.
    assert (state.terminated.finished_at - started).total_seconds() >= 7, (started, state)


# -- Scheduling and admission ----------------------------------------------------------------


def test_pod_wanting_more_gpus_than_the_node_has_stays_pending(
    k8s_cluster: ContainerdCluster, k8s_namespace: str, api: Any, probe_image: str
) -> None:
    allocatable = json.loads(
        k8s_cluster.kubectl("get", "node", k8s_cluster.node_name, "-o", "json").stdout
    )["status"]["allocatable"]
    assert allocatable["nvidia.com/gpu"] == "2"
    pod = probe_pod(
        "greedy",
        probe_image,
        "say:never",
        container={"resources": {"limits": {"nvidia.com/gpu": "3"}}},
    )
    core_api(api).create_namespaced_pod(k8s_namespace, pod)

    def unschedulable() -> Any:
        status = core_api(api).read_namespaced_pod("greedy", k8s_namespace).status
        return next(
            (
                c
                for c in status.conditions or []
                if c.type == "PodScheduled" and c.status == "False"
            ),
            None,
        )

    condition = wait_until(unschedulable, timeout=60, what="the scheduler's verdict")
    assert condition.reason == "Unschedulable"
    assert "nvidia.com/gpu" in condition.message

    def failed_scheduling() -> Any:
        events = core_api(api).list_namespaced_event(
            k8s_namespace, field_selector="involvedObject.name=greedy"
        )
        return next((e for e in events.items if e.reason == "FailedScheduling"), None)

    event = wait_until(failed_scheduling, timeout=60, what="a FailedScheduling event")
    assert "Insufficient nvidia.com/gpu" in event.message, event.message
    pod_now = core_api(api).read_namespaced_pod("greedy", k8s_namespace)
    assert (pod_now.status.phase, pod_now.spec.node_name) == ("Pending", None)


def test_a_pod_that_ends_while_the_api_server_is_down_is_reported_when_it_is_back(
    k8s_cluster: ContainerdCluster, k8s_namespace: str, api: Any, probe_image: str
) -> None:
    pod = probe_pod("outlives", probe_image, "say:waiting", "sleep", "say:done")
    core_api(api).create_namespaced_pod(k8s_namespace, pod)
    container_id = wait_container_started(api, k8s_namespace, "outlives")
    signalled: list[float] = []

    def end_the_container() -> None:
        # Straight to containerd, as nothing can go through the API server now: `sleep` ends.
        k8s_cluster.node.ctr("tasks", "kill", "--signal", "SIGTERM", container_id, timeout=30)
        signalled.append(time.time())

    # The pod finishes during a 10 s outage; its status must still reach the API server.
    k8s_cluster.control_plane.restart_apiserver(down_seconds=10, while_down=end_the_container)
    pod = wait_pod_phase(api, k8s_namespace, "outlives", ("Succeeded", "Failed"))
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0
    # It ended while the API server was down (finishedAt has whole seconds).
    assert terminated.finished_at.timestamp() < signalled[0] + 5, (terminated, signalled)
    logs = k8s_cluster.kubectl("logs", "-n", k8s_namespace, "outlives").stdout
    assert logs == "waiting\ndone\n"


def test_restricted_pod_security_rejects_privileged_pod(
    k8s_cluster: ContainerdCluster, k8s_namespace: str, api: Any, probe_image: str
) -> None:
    k8s_cluster.kubectl(
        "label", "namespace", k8s_namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    pod = probe_pod(
        "privileged",
        probe_image,
        "say:no",
        container={"securityContext": {"privileged": True}},
    )
    with pytest.raises(ApiException) as rejected:
        core_api(api).create_namespaced_pod(k8s_namespace, pod)
    assert rejected.value.status == 403
    message = json.loads(str(rejected.value.body))["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "securityContext.privileged=true" in message
    # The same pod without `privileged` is admitted: it was that field.
    pod["spec"]["containers"][0]["securityContext"] = RESTRICTED
    core_api(api).create_namespaced_pod(k8s_namespace, pod)


# -- Tools, S3, Prometheus -------------------------------------------------------------------


def test_control_plane_reports_the_pinned_version(k8s_cluster: ContainerdCluster) -> None:
    assert KUBE_VERSION is not None
    version = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == KUBE_VERSION.group(1)
    for binary in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        out = subprocess.run(
            [k8s_cluster.bin_dir / binary, "--version"], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == f"Kubernetes {KUBE_VERSION.group(1)}"


def test_helm_and_kubeconform_run(tools_bin: Path) -> None:
    helm = subprocess.run(
        [tools_bin / "helm", "version", "--short"], capture_output=True, text=True, check=True
    )
    assert re.fullmatch(r"v3\.\d+\.\d+\S*\n", helm.stdout)
    kubeconform = subprocess.run(
        [tools_bin / "kubeconform", "-v"], capture_output=True, text=True, check=True
    )
    assert re.fullmatch(r"v0\.\d+\.\d+\n", kubeconform.stdout)


def test_s3_object_reads_back_byte_for_byte(s3_server: Any) -> None:
    bucket = s3_server.make_bucket(f"bucket-{secrets.token_hex(4)}")
    payload = secrets.token_bytes(1024 * 1024 + 7)
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="dir/blob.bin", Body=payload)
    assert s3.get_object(Bucket=bucket, Key="dir/blob.bin")["Body"].read() == payload
    assert set(s3_server.env()) >= {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
    }


def test_prometheus_scrapes_a_test_endpoint(prometheus_factory: Any) -> None:
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    Gauge("kubetune_harness_answer", "A value to find in Prometheus", registry=registry).set(42)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        prom = prometheus_factory([f"127.0.0.1:{port}"])
        prom.wait_for_target_up(timeout=30)
        result = wait_until(
            lambda: prom.query("kubetune_harness_answer"), timeout=15, what="the sample"
        )
        assert result[0]["metric"]["job"] == "test"
        assert float(result[0]["value"][1]) == 42.0
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
