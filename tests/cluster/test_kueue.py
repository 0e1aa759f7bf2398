"""Real Kueue (harness.kueue) queues and admits batch/v1 Jobs on the test control plane.

Each test gets its own ResourceFlavor, ClusterQueue and LocalQueue (and priority classes), and
Jobs labelled ``kueue.x-k8s.io/queue-name`` whose pods ask for ``nvidia.com/gpu`` (the real node
of ``k8s_cluster`` advertises 2) and run the kt-probe test image (tests/harness/node/probe.go,
loaded into the node, so nothing is pulled) with its ``sleep`` step: each holds its GPU until
its pod is deleted. What is checked is Kueue's side: its webhook suspends the Job on creation,
its Workload's conditions say why it waits, and it unsuspends the Job on admission.

    cd /work/main && PYTHONPATH=tests ~/.cache/kubetune/venv/bin/python -m pytest -q \
        -p no:cacheprovider tests/cluster/test_kueue.py

Needs root and scripts/install-system-deps.sh (the real node); builds Kueue with
scripts/build-kueue.sh on first use (about 8 minutes cold).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from harness._proc import wait_until
from harness.fixtures import ContainerdCluster
from harness.kueue import PRIORITY_LABEL, QUEUE_LABEL, Kueue, workload_condition

pytestmark = pytest.mark.cluster

TIMEOUT = 120.0  # seconds for Kueue, the Job controller and the kubelet on a busy 2-core machine
# More than the Jobs ask for (the node has 2 cores): GPUs are what each test limits.
QUOTA = {"cpu": "8", "memory": "32Gi"}


@dataclass
class Queues:
    """A test's own Kueue objects in `namespace`: Jobs go to `local_queue`."""

    kueue: Kueue
    cluster: ContainerdCluster
    namespace: str
    suffix: str
    local_queue: str = ""
    made: list[tuple[str, str]] = field(default_factory=list)  # (kind, name), cluster-scoped

    def set_up(self, gpus: str, *, preempt_lower_priority: bool = False) -> None:
        flavor, cluster_queue = f"flavor-{self.suffix}", f"cq-{self.suffix}"
        self.kueue.create_resource_flavor(flavor)
        self.made.append(("resourceflavor", flavor))
        self.kueue.create_cluster_queue(
            cluster_queue,
            {**QUOTA, "nvidia.com/gpu": gpus},
            flavor=flavor,
            preempt_lower_priority=preempt_lower_priority,
        )
        self.made.append(("clusterqueue", cluster_queue))
        self.local_queue = "main"
        self.kueue.create_local_queue(self.namespace, self.local_queue, cluster_queue)

    def priority_class(self, name: str, value: int) -> str:
        full_name = f"{name}-{self.suffix}"
        self.kueue.create_priority_class(full_name, value)
        self.made.append(("workloadpriorityclass", full_name))
        return full_name

    def tear_down(self) -> None:
        # Jobs first: a ClusterQueue keeps its finalizer while it has Workloads.
        self.cluster.kubectl("delete", "jobs", "--all", "-n", self.namespace, "--wait=true")
        if self.local_queue:
            self.kueue.delete("localqueue", self.local_queue, self.namespace)
        for kind, name in reversed(self.made):
            self.kueue.delete(kind, name)


@pytest.fixture(scope="module")
def probe_image(k8s_cluster: ContainerdCluster) -> str:
    """The kt-probe image, loaded into the node."""
    return k8s_cluster.probe_image()


@pytest.fixture
def queues(kueue: Kueue, k8s_cluster: ContainerdCluster, k8s_namespace: str) -> Iterator[Queues]:
    made = Queues(kueue, k8s_cluster, k8s_namespace, uuid.uuid4().hex[:6])
    yield made
    made.tear_down()


def gpu_job(
    name: str,
    queue: str,
    image: str,
    *,
    pods: int = 1,
    indexed: bool = False,
    priority: str | None = None,
) -> dict[str, Any]:
    """A Job of `pods` pods, each asking for 1 GPU and holding it (kt-probe's `sleep`, until
    the pod is deleted), queued in LocalQueue `queue`."""
    labels = {QUEUE_LABEL: queue}
    if priority:
        labels[PRIORITY_LABEL] = priority
    spec: dict[str, Any] = {
        "parallelism": pods,
        "completions": pods,
        "backoffLimit": 0,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "main",
                        "image": image,
                        "imagePullPolicy": "Never",  # loaded into the node; no registry
                        "args": ["sleep"],
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "64Mi", "nvidia.com/gpu": "1"},
                            "limits": {"nvidia.com/gpu": "1"},
                        },
                    }
                ],
            }
        },
    }
    if indexed:
        spec["completionMode"] = "Indexed"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }


def create_job(kueue: Kueue, namespace: str, job: dict[str, Any]) -> dict[str, Any]:
    job["metadata"]["namespace"] = namespace
    created = kueue.create(job)
    # Kueue's mutating webhook, not its controller later: suspended in the create response.
    assert created["spec"]["suspend"] is True, created["spec"]
    return created


def get_json(cluster: ContainerdCluster, path: str) -> dict[str, Any]:
    status, body = cluster.control_plane.get(path)
    assert status == 200, f"GET {path}: HTTP {status}: {body[:300]!r}"
    obj: dict[str, Any] = json.loads(body)
    return obj


def get_job(cluster: ContainerdCluster, namespace: str, name: str) -> dict[str, Any]:
    return get_json(cluster, f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")


def job_pods(cluster: ContainerdCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    path = f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3D{name}"
    pods: list[dict[str, Any]] = get_json(cluster, path)["items"]
    return pods


def wait_workload(
    kueue: Kueue,
    namespace: str,
    job: dict[str, Any],
    check: Callable[[dict[str, Any]], bool],
    what: str,
) -> dict[str, Any]:
    """Wait until the Workload of `job` satisfies `check`; the timeout message shows it."""
    seen: list[dict[str, Any]] = []

    def done() -> dict[str, Any] | None:
        workload = kueue.workload_of(namespace, job["metadata"]["uid"])
        if workload is None:
            return None
        seen[:] = [workload]
        return workload if check(workload) else None

    try:
        return wait_until(done, timeout=TIMEOUT, what=what, interval=0.25)
    except TimeoutError as err:
        conditions = seen[0].get("status", {}).get("conditions") if seen else "no Workload"
        raise AssertionError(f"{err}; conditions: {conditions}") from None


def has_condition(kind: str, status: str, reason: str | None = None) -> Callable[[Any], bool]:
    def check(workload: dict[str, Any]) -> bool:
        condition = workload_condition(workload, kind)
        return (
            condition is not None
            and condition["status"] == status
            and (reason is None or condition["reason"] == reason)
        )

    return check


def wait_unsuspended(cluster: ContainerdCluster, namespace: str, name: str) -> None:
    wait_until(
        lambda: get_job(cluster, namespace, name)["spec"]["suspend"] is False,
        timeout=TIMEOUT,
        what=f"Kueue to unsuspend Job {name}",
        interval=0.25,
    )


def wait_pods(
    cluster: ContainerdCluster, namespace: str, name: str, count: int
) -> list[dict[str, Any]]:
    """Wait until Job `name` has `count` pods and return them."""

    def pods() -> list[dict[str, Any]] | None:
        found = job_pods(cluster, namespace, name)
        return found if len(found) == count else None

    return wait_until(pods, timeout=TIMEOUT, what=f"{count} pods of Job {name}", interval=0.25)


def admitted(
    kueue: Kueue, cluster: ContainerdCluster, namespace: str, job: dict[str, Any]
) -> dict[str, Any]:
    """Wait until `job`'s Workload is Admitted and Kueue has unsuspended the Job."""
    name = job["metadata"]["name"]
    workload = wait_workload(
        kueue, namespace, job, has_condition("Admitted", "True"), f"Job {name} to be admitted"
    )
    wait_unsuspended(cluster, namespace, name)
    return workload


def pending_for_quota(kueue: Kueue, namespace: str, job: dict[str, Any]) -> dict[str, Any]:
    """Wait until `job`'s Workload reports QuotaReserved=False/Pending naming the GPUs."""
    name = job["metadata"]["name"]
    workload = wait_workload(
        kueue,
        namespace,
        job,
        has_condition("QuotaReserved", "False", "Pending"),
        f"Job {name}'s Workload to wait for quota",
    )
    condition = workload_condition(workload, "QuotaReserved")
    assert condition is not None and "nvidia.com/gpu" in condition["message"], condition
    return workload


def assert_still_waiting(cluster: ContainerdCluster, namespace: str, name: str) -> None:
    """The Job stays suspended with no pod at all, for a while (not just at one instant)."""
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        job = get_job(cluster, namespace, name)
        assert job["spec"]["suspend"] is True, f"Job {name} was started: {job['spec']}"
        assert job_pods(cluster, namespace, name) == [], f"Job {name} has pods while waiting"
        time.sleep(0.5)


# -- tests --------------------------------------------------------------------------------


def test_second_gpu_job_waits_for_the_quota_and_is_admitted_when_the_first_is_deleted(
    kueue: Kueue,
    k8s_cluster: ContainerdCluster,
    k8s_namespace: str,
    queues: Queues,
    probe_image: str,
) -> None:
    queues.set_up(gpus="1")
    first = create_job(kueue, k8s_namespace, gpu_job("first", queues.local_queue, probe_image))
    workload = admitted(kueue, k8s_cluster, k8s_namespace, first)
    assert workload["status"]["admission"]["clusterQueue"] == f"cq-{queues.suffix}"
    assert workload_condition(workload, "QuotaReserved")["status"] == "True"  # type: ignore[index]

    second = create_job(kueue, k8s_namespace, gpu_job("second", queues.local_queue, probe_image))
    pending_for_quota(kueue, k8s_namespace, second)
    assert_still_waiting(k8s_cluster, k8s_namespace, "second")

    k8s_cluster.kubectl("delete", "job", "first", "-n", k8s_namespace, "--cascade=background")
    admitted(kueue, k8s_cluster, k8s_namespace, second)
    wait_pods(k8s_cluster, k8s_namespace, "second", 1)
    # waitForPodsReady is on: the Workload reports when its pod runs (Ready) on the node.
    wait_workload(
        kueue, k8s_namespace, second, has_condition("PodsReady", "True"), "second's PodsReady"
    )


def test_indexed_job_is_admitted_whole_or_not_at_all(
    kueue: Kueue,
    k8s_cluster: ContainerdCluster,
    k8s_namespace: str,
    queues: Queues,
    probe_image: str,
) -> None:
    # 2 GPUs of quota; a 1-GPU Job holds one, so the 2-pod Job's second GPU is missing.
    queues.set_up(gpus="2")
    holder = create_job(kueue, k8s_namespace, gpu_job("holder", queues.local_queue, probe_image))
    admitted(kueue, k8s_cluster, k8s_namespace, holder)

    pair = create_job(
        kueue, k8s_namespace, gpu_job("pair", queues.local_queue, probe_image, pods=2, indexed=True)
    )
    workload = pending_for_quota(kueue, k8s_namespace, pair)
    assert [pod_set["count"] for pod_set in workload["spec"]["podSets"]] == [2]
    # Not one pod on the free GPU: the whole Job waits.
    assert_still_waiting(k8s_cluster, k8s_namespace, "pair")

    k8s_cluster.kubectl("delete", "job", "holder", "-n", k8s_namespace, "--cascade=background")
    workload = admitted(kueue, k8s_cluster, k8s_namespace, pair)
    [assignment] = workload["status"]["admission"]["podSetAssignments"]
    assert assignment["count"] == 2
    assert assignment["resourceUsage"]["nvidia.com/gpu"] == "2"
    pods = wait_pods(k8s_cluster, k8s_namespace, "pair", 2)
    indexes = {
        pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] for pod in pods
    }
    assert indexes == {"0", "1"}
    # Both run: the node gives them its 2 GPUs once the holder's pod is gone.
    wait_until(
        lambda: (
            [p["status"].get("phase") for p in job_pods(k8s_cluster, k8s_namespace, "pair")]
            == ["Running", "Running"]
        ),
        timeout=TIMEOUT,
        what="both pods of Job pair to run",
    )


def test_high_priority_job_preempts_a_running_low_priority_one(
    kueue: Kueue,
    k8s_cluster: ContainerdCluster,
    k8s_namespace: str,
    queues: Queues,
    probe_image: str,
) -> None:
    queues.set_up(gpus="1", preempt_lower_priority=True)
    low_class = queues.priority_class("low", 100)
    high_class = queues.priority_class("high", 1000)

    low = create_job(
        kueue, k8s_namespace, gpu_job("low", queues.local_queue, probe_image, priority=low_class)
    )
    admitted(kueue, k8s_cluster, k8s_namespace, low)
    wait_until(
        lambda: any(
            p["status"].get("phase") == "Running"
            for p in job_pods(k8s_cluster, k8s_namespace, "low")
        ),
        timeout=TIMEOUT,
        what="the low-priority Job's pod to run",
    )

    high = create_job(
        kueue, k8s_namespace, gpu_job("high", queues.local_queue, probe_image, priority=high_class)
    )
    evicted = wait_workload(
        kueue,
        k8s_namespace,
        low,
        has_condition("Evicted", "True", "Preempted"),
        "the low-priority Workload to be evicted",
    )
    preempted = workload_condition(evicted, "Preempted")
    assert preempted is not None and preempted["reason"] == "InClusterQueue", preempted
    assert evicted["spec"]["priority"] == 100
    high_workload = admitted(kueue, k8s_cluster, k8s_namespace, high)
    assert high_workload["spec"]["priority"] == 1000
    assert high_workload["spec"]["priorityClassRef"]["name"] == high_class

    # The preempted Job is suspended again (its pod goes) and waits for the quota.
    assert get_job(k8s_cluster, k8s_namespace, "low")["spec"]["suspend"] is True
    pending_for_quota(kueue, k8s_namespace, low)
    wait_pods(k8s_cluster, k8s_namespace, "low", 0)


def test_queues_read_back_in_v1beta1_through_the_conversion_webhook(
    kueue: Kueue, k8s_cluster: ContainerdCluster, queues: Queues
) -> None:
    queues.set_up(gpus="1")
    cluster_queue = get_json(
        k8s_cluster, f"/apis/kueue.x-k8s.io/v1beta1/clusterqueues/cq-{queues.suffix}"
    )
    assert cluster_queue["apiVersion"] == "kueue.x-k8s.io/v1beta1"
    [group] = cluster_queue["spec"]["resourceGroups"]
    assert group["coveredResources"] == ["cpu", "memory", "nvidia.com/gpu"]
