"""observe_stage on pods the scheduler cannot place: waiting is not failing.

A pod that waits for free CPU, memory or GPUs is Pending with reason Waiting and the
scheduler's message, however long it waits; only a pod no node could ever hold fails
(Unschedulable), after ``unschedulable_timeout``. Other observe cases: test_status.py.
"""

from __future__ import annotations

from typing import Any

from kubetune.contract import ExitCode
from kubetune_operator.observe import observe_stage, unschedulable_condition

T0 = "2025-01-01T00:00:00Z"
NOW = 1735689600.0 + 600  # T0 + 10 minutes
BUSY = "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available."
NODES = [
    {
        "metadata": {"name": "process-node"},
        "status": {"allocatable": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}},
    }
]


def job(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "x-g1-train", "annotations": {}},
        "spec": {"backoffLimit": 2, **spec},
        "status": {"startTime": T0},
    }


def pod(
    phase: str = "Pending",
    *,
    cpu: str = "2",
    gpus: int = 0,
    since: str = T0,
    scheduled: bool = False,
    message: str = BUSY,
    name: str = "p",
) -> dict[str, Any]:
    limits = {"nvidia.com/gpu": gpus} if gpus else {}
    conditions = (
        []
        if scheduled
        else [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastTransitionTime": since,
            }
        ]
    )
    return {
        "metadata": {"name": name, "creationTimestamp": since},
        "spec": {
            "containers": [
                {"name": "train", "resources": {"requests": {"cpu": cpu}, "limits": limits}}
            ]
        },
        "status": {"phase": phase, "conditions": conditions},
    }


def observe(pods: list[dict[str, Any]], nodes: Any = NODES, timeout: float = 300) -> Any:
    return observe_stage(job(), pods, now=NOW, unschedulable_timeout=timeout, nodes=nodes)


def test_a_pod_waiting_for_room_waits_with_the_schedulers_message_however_long() -> None:
    obs = observe([pod(since=T0)], timeout=60)  # ten minutes, past any timeout
    assert (obs.state, obs.reason) == ("Pending", "Waiting")
    assert BUSY in obs.message and not obs.terminal_by_operator
    assert obs.recheck_after is None  # nothing changes by itself: pod events wake us
    assert obs.start_time == T0


def test_without_nodes_every_unschedulable_pod_waits() -> None:
    obs = observe([pod(cpu="64")], nodes=None, timeout=0)
    assert (obs.state, obs.reason) == ("Pending", "Waiting")


def test_a_pod_no_node_can_hold_waits_for_the_timeout_then_fails() -> None:
    recent = "2025-01-01T00:09:00Z"  # one minute before NOW
    early = observe([pod(gpus=3, since=recent)], timeout=300)
    assert (early.state, early.reason) == ("Pending", "Waiting")
    assert "nvidia.com/gpu 3 (spec.resources.gpusPerWorker)" in early.message
    # A time, not a countdown, so the status does not change on every pass.
    assert "the run fails at 2025-01-01T00:14:00Z" in early.message
    assert early.recheck_after == 240
    again = observe_stage(
        job(), [pod(gpus=3, since=recent)], now=NOW + 7, unschedulable_timeout=300, nodes=NODES
    )
    assert again.message == early.message and again.recheck_after == 233

    late = observe([pod(gpus=3, since=T0)], timeout=300)
    assert (late.state, late.reason, late.terminal_by_operator) == ("Failed", "Unschedulable", True)
    assert late.message.startswith("no node can ever run the stage pod: it requests nvidia.com/gpu")
    assert "the most any node has is 2 (node process-node)" in late.message
    assert BUSY in late.message  # the scheduler's own words too


def test_a_zero_timeout_fails_a_pod_no_node_can_hold_at_once() -> None:
    obs = observe([pod(cpu="9", since="2025-01-01T00:10:00Z")], timeout=0)
    assert (obs.state, obs.reason) == ("Failed", "Unschedulable")
    assert "cpu 9 (spec.resources.cpu): the most any node has is 8" in obs.message


def test_a_running_worker_with_a_waiting_sibling_is_running_and_says_so() -> None:
    obs = observe([pod("Running", scheduled=True, name="w0"), pod(name="w1")])
    assert obs.state == "Running"
    assert obs.message.startswith("1 pod(s) running; waiting for a node") and BUSY in obs.message


def test_only_pending_undeleted_pods_count_as_unschedulable() -> None:
    assert unschedulable_condition(pod()) is not None
    assert unschedulable_condition(pod(scheduled=True)) is None
    assert unschedulable_condition(pod("Failed")) is None
    deleted = pod()
    deleted["metadata"]["deletionTimestamp"] = T0
    assert unschedulable_condition(deleted) is None


def test_a_deadline_exceeded_job_says_waiting_time_counts() -> None:
    failed = job(activeDeadlineSeconds=600)
    failed["status"]["conditions"] = [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}
    ]
    obs = observe_stage(failed, [pod()], now=NOW, unschedulable_timeout=300, nodes=NODES)
    assert (obs.state, obs.reason) == ("Failed", "DeadlineExceeded")
    assert "600s" in obs.message and "waiting for a node included" in obs.message


def _stopped_pod(name: str, exit_code: int, message: str, since: str = T0) -> dict[str, Any]:
    stopped = pod("Failed", scheduled=True, name=name, since=since)
    stopped["status"]["containerStatuses"] = [
        {"name": "train", "state": {"terminated": {"exitCode": exit_code, "message": message}}}
    ]
    return stopped


def test_a_pod_stopped_on_sigterm_with_a_checkpoint_is_not_a_failure() -> None:
    preempted = _stopped_pod(
        "x-g1-train-a",
        ExitCode.INTERRUPTED,
        '{"stage":"train","reason":"Preempted","error":"stopped","checkpointStep":17}',
    )
    running = pod("Running", scheduled=True, name="x-g1-train-b", since="2025-01-01T00:05:00Z")
    obs = observe([preempted, running])
    assert obs.state == "Running" and obs.failed_attempts == 0 and obs.last_failure is None


def test_a_real_failure_after_a_preemption_is_still_reported_as_the_failure() -> None:
    preempted = _stopped_pod(
        "a",
        ExitCode.INTERRUPTED,
        '{"reason":"Preempted","error":"x","checkpointStep":3}',
        since="2025-01-01T00:05:00Z",  # newer than the failure: still not the failure
    )
    failed = _stopped_pod("b", 1, '{"reason":"StageFailed","error":"lost S3"}')
    obs = observe_stage(
        {**job(), "status": {"startTime": T0, "failed": 1}},
        [failed, preempted],
        now=NOW,
        unschedulable_timeout=300,
    )
    assert obs.failed_attempts == 1 and obs.last_failure == ("StageFailed", "lost S3")


def test_a_suspended_job_in_a_kueue_queue_is_queued_not_suspended() -> None:
    queued = job(suspend=True)
    queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    queued["metadata"]["namespace"] = "ml"
    obs = observe_stage(queued, [], now=NOW, unschedulable_timeout=300)
    assert (obs.state, obs.reason) == ("Pending", "Queued")
    assert "'team-a'" in obs.message and "kubectl get workloads -n ml" in obs.message
    plain = observe_stage(job(suspend=True), [], now=NOW, unschedulable_timeout=300)
    assert (plain.state, plain.reason) == ("Suspended", "Suspended")
