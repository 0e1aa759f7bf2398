"""The harness against real components: control plane, process node, S3, Prometheus.

    cd /work/main && PYTHONPATH=tests ~/.cache/kubetune/venv/bin/python -m pytest tests/cluster -q

Needs the binaries from `make tools` (built on first use otherwise) and prometheus from
scripts/install-system-deps.sh.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness._proc import free_port, wait_until
from harness.fixtures import K8sCluster

pytestmark = pytest.mark.cluster
PY = sys.executable  # the image is ignored: pods run the host's (the venv's) interpreter
KUBE_VERSION = re.search(
    r"k8s\.io/kubernetes (v\S+)", (Path(__file__).parent / "tools" / "go.mod").read_text()
)


@pytest.fixture
def api(k8s_cluster: K8sCluster) -> Iterator[Any]:
    with k8s_cluster.api_client() as api_client:
        yield api_client


def core_api(api: Any) -> Any:
    # Any: the tests pass plain dicts as bodies, which the client's model typings do not admit.
    return client.CoreV1Api(api)


def batch_api(api: Any) -> Any:
    return client.BatchV1Api(api)


def python_pod(name: str, code: str, *args: str, **spec: Any) -> dict[str, Any]:
    """A bare pod running `python -c code args...`; extra keyword args go into its spec."""
    container = {"name": "main", "image": "python:3.11-slim", "command": [PY, "-c", code, *args]}
    container.update(spec.pop("container", {}))
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


def python_job(name: str, code: str, *args: str, backoff_limit: int = 0) -> dict[str, Any]:
    pod = python_pod(name, code, *args)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": backoff_limit, "template": {"spec": pod["spec"]}},
    }


def wait_pod_phase(
    api: Any, namespace: str, name: str, phases: tuple[str, ...], timeout: float = 60
) -> Any:
    core = core_api(api)

    def in_phase() -> Any:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase in phases else None

    return wait_until(in_phase, timeout=timeout, what=f"pod {name} in phase {phases}", interval=0.2)


def job_condition(api: Any, namespace: str, name: str, timeout: float = 90) -> Any:
    """Wait for the Job's Complete or Failed condition and return it."""
    batch = batch_api(api)

    def finished() -> Any:
        conditions = batch.read_namespaced_job_status(name, namespace).status.conditions or []
        return next(
            (c for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"), None
        )

    return wait_until(finished, timeout=timeout, what=f"job {name} to finish", interval=0.25)


def job_pods(api: Any, namespace: str, job: str) -> list[Any]:
    items: list[Any] = (
        core_api(api).list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    )
    return items


def wait_for_pid(pid_file: Path) -> int:
    def pid() -> int | None:
        text = pid_file.read_text() if pid_file.exists() else ""
        return int(text) if text else None

    return wait_until(pid, timeout=60, what=f"a pid in {pid_file}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- Jobs, logs and the process node ---------------------------------------------------


def test_job_pod_runs_on_process_node_and_completes(
    k8s_cluster: K8sCluster, k8s_namespace: str, api: Any
) -> None:
    code = "import os, sys; print('hello from', os.environ['POD_NAME'], sys.argv[1])"
    job = python_job("hello", code, "arg-1")
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
    assert logs == f"hello from {pod.metadata.name} arg-1\n"
    tail = k8s_cluster.kubectl("logs", "-n", k8s_namespace, "job/hello", "--tail=1").stdout
    assert tail.strip().endswith("arg-1")


def test_failing_job_fails_after_backoff_limit_with_exit_code_and_message(
    k8s_namespace: str, api: Any
) -> None:
    # The termination message path is remapped into the pod's sandbox like any mount.
    code = "open('/dev/termination-log', 'w').write('bad input'); raise SystemExit(3)"
    batch_api(api).create_namespaced_job(k8s_namespace, python_job("fails", code, backoff_limit=1))

    # backoffLimit 1 = two pods; the Job controller waits ~10s (pod-failure backoff) in between.
    condition = job_condition(api, k8s_namespace, "fails", timeout=120)
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


@pytest.mark.parametrize("propagation", ["Background", "Foreground"])
def test_deleting_job_kills_its_process_and_gc_removes_pods(
    k8s_namespace: str, api: Any, tmp_path: Path, propagation: str
) -> None:
    pid_file = tmp_path / "pid"  # a host path: not under any mountPath, so not remapped
    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)"
    batch_api(api).create_namespaced_job(k8s_namespace, python_job("sleeper", code, str(pid_file)))
    pid = wait_for_pid(pid_file)
    assert pid_alive(pid)

    batch_api(api).delete_namespaced_job(
        "sleeper", k8s_namespace, body=client.V1DeleteOptions(propagation_policy=propagation)
    )
    wait_until(lambda: not pid_alive(pid), timeout=30, what=f"pid {pid} to be killed")
    wait_until(
        lambda: not job_pods(api, k8s_namespace, "sleeper"),
        timeout=60,
        what="GC to delete the pods",
    )


def test_init_container_runs_first_and_on_failure_restarts_the_container(
    k8s_cluster: K8sCluster, k8s_namespace: str, api: Any
) -> None:
    # The main container fails on its first attempt (no marker yet) and succeeds on the restart.
    main = (
        "import os; p = '/work/attempted'; first = not os.path.exists(p); open(p, 'w').close();"
        "print(open('/work/from-init').read()); raise SystemExit(1 if first else 0)"
    )
    pod = python_pod(
        "restarts",
        main,
        restartPolicy="OnFailure",
        volumes=[{"name": "work", "emptyDir": {}}],
        container={"volumeMounts": [{"name": "work", "mountPath": "/work"}]},
    )
    pod["spec"]["initContainers"] = [
        {
            "name": "init",
            "image": "busybox",
            "command": [PY, "-c", "open('/work/from-init', 'w').write('init ran')"],
            "volumeMounts": [{"name": "work", "mountPath": "/work"}],
        }
    ]
    core_api(api).create_namespaced_pod(k8s_namespace, pod)

    done = wait_pod_phase(api, k8s_namespace, "restarts", ("Succeeded", "Failed"))
    assert done.status.phase == "Succeeded"
    assert done.status.init_container_statuses[0].state.terminated.exit_code == 0
    status = done.status.container_statuses[0]
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 1
    assert k8s_cluster.kubectl("logs", "-n", k8s_namespace, "restarts").stdout == "init ran\n"


def test_pod_sees_config_map_volume_and_secret_env(
    k8s_cluster: K8sCluster, k8s_namespace: str, api: Any
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
    code = (
        "import os; print(open('/etc/kubetune/model.yaml').read().strip(), os.environ['TOKEN'],"
        " os.environ['CRED_region'], sorted(os.listdir('/etc/kubetune')))"
    )
    pod = python_pod(
        "reader",
        code,
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

    assert (
        wait_pod_phase(api, k8s_namespace, "reader", ("Succeeded", "Failed")).status.phase
        == "Succeeded"
    )
    logs = k8s_cluster.kubectl("logs", "-n", k8s_namespace, "reader").stdout
    assert logs == "lr: 0.1 s3cr3t eu ['model.yaml']\n"


def test_service_account_token_authenticates_the_pod(
    k8s_cluster: K8sCluster, k8s_namespace: str, api: Any
) -> None:
    # The default projected token volume is remapped; KUBERNETES_SERVICE_* point at the API server.
    code = """
import json, os, ssl, urllib.request
d = '/var/run/secrets/kubernetes.io/serviceaccount'
token = open(d + '/token').read()
ctx = ssl.create_default_context(cafile=d + '/ca.crt')
url = 'https://%s:%s/apis/authentication.k8s.io/v1/selfsubjectreviews' % (
    os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT'])
body = json.dumps({'apiVersion': 'authentication.k8s.io/v1', 'kind': 'SelfSubjectReview'}).encode()
headers = {'Authorization': 'Bearer ' + token, 'Content-Type': 'application/json'}
req = urllib.request.Request(url, body, headers)
print(json.load(urllib.request.urlopen(req, context=ctx))['status']['userInfo']['username'])
print(open(d + '/namespace').read())
"""
    core_api(api).create_namespaced_pod(k8s_namespace, python_pod("whoami", code))
    assert (
        wait_pod_phase(api, k8s_namespace, "whoami", ("Succeeded", "Failed")).status.phase
        == "Succeeded"
    )
    logs = k8s_cluster.kubectl("logs", "-n", k8s_namespace, "whoami").stdout.split()
    assert logs == [f"system:serviceaccount:{k8s_namespace}:default", k8s_namespace]


def test_active_deadline_kills_the_pod(k8s_namespace: str, api: Any, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)"
    core_api(api).create_namespaced_pod(
        k8s_namespace, python_pod("deadline", code, str(pid_file), activeDeadlineSeconds=3)
    )
    pod = wait_pod_phase(api, k8s_namespace, "deadline", ("Succeeded", "Failed"), timeout=60)
    assert (pod.status.phase, pod.status.reason) == ("Failed", "DeadlineExceeded")
    assert not pid_alive(int(pid_file.read_text()))


# -- Scheduling and admission ------------------------------------------------------------


def test_pod_wanting_more_gpus_than_the_node_has_stays_pending(
    k8s_namespace: str, api: Any
) -> None:
    pod = python_pod(
        "greedy",
        "print('never')",
        container={
            "resources": {"limits": {"nvidia.com/gpu": "3"}},  # the process node has 2
        },
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

    condition = wait_until(unschedulable, timeout=30, what="the scheduler's verdict")
    assert condition.reason == "Unschedulable"
    assert "nvidia.com/gpu" in condition.message
    pod_now = core_api(api).read_namespaced_pod("greedy", k8s_namespace)
    assert (pod_now.status.phase, pod_now.spec.node_name) == ("Pending", None)


def test_a_pod_that_ends_while_the_api_server_is_down_is_reported_when_it_is_back(
    k8s_cluster: K8sCluster, k8s_namespace: str, api: Any, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "while not os.path.exists(sys.argv[1]): time.sleep(0.1)\n"
        "print('done')"
    )
    core_api(api).create_namespaced_pod(k8s_namespace, python_pod("outlives", code, str(go)))
    wait_pod_phase(api, k8s_namespace, "outlives", ("Running",))
    # The pod finishes during a 10 s outage; its status must still reach the API server.
    k8s_cluster.control_plane.restart_apiserver(down_seconds=10, while_down=go.touch)
    pod = wait_pod_phase(api, k8s_namespace, "outlives", ("Succeeded", "Failed"), timeout=90)
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


def test_restricted_pod_security_rejects_privileged_pod(
    k8s_cluster: K8sCluster, k8s_namespace: str, api: Any
) -> None:
    k8s_cluster.kubectl(
        "label", "namespace", k8s_namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    pod = python_pod(
        "privileged", "print('no')", container={"securityContext": {"privileged": True}}
    )
    with pytest.raises(ApiException) as rejected:
        core_api(api).create_namespaced_pod(k8s_namespace, pod)
    assert rejected.value.status == 403
    message = json.loads(str(rejected.value.body))["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "securityContext.privileged=true" in message


# -- Tools, S3, Prometheus -----------------------------------------------------------------


def test_control_plane_reports_the_pinned_version(k8s_cluster: K8sCluster) -> None:
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
