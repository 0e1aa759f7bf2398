"""Training that outlives its pod, and one model trained by several pods, on the real node.

* A training pod deleted mid-run (what a preemption, an eviction or a drained node does) gets
  SIGTERM, saves a checkpoint within its grace period and exits ``INTERRUPTED``; the Job starts
  a new pod without spending an attempt, it resumes from that checkpoint, and the FineTuneJob
  says so (``status.progress.preemptions``, a ``Preempted`` Event).
* ``resources.workers: 2`` on CPU: two pods of an Indexed Job find pod 0 through the headless
  Service and the cluster DNS and train one model with gloo; its loss curve matches one pod
  training the same global batch.

Run: ``pytest -m cluster tests/cluster/test_distributed.py`` (root, ``make images``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_helpers import apply, diagnose, get_ftj, get_json, kubectl, wait_for
from real_node_env import RUN_TIMEOUT, node_job

from kubetune.layout import RunLayout

pytestmark = pytest.mark.cluster

# One pod's and two pods' losses at every logged step: the same global batch, so only float
# summation order differs (measured: see the assertion's comment).
LOSS_RTOL = 1e-3


def succeeded(env: dict[str, Any], name: str) -> dict[str, Any]:
    kc, ns = env["kubeconfig"], env["ns"]

    def done() -> dict[str, Any] | None:
        ftj = get_ftj(kc, ns, name)
        phase = (ftj.get("status") or {}).get("phase")
        assert phase != "Failed", diagnose(kc, ns, name, env["op"])
        return ftj if phase == "Succeeded" else None

    return dict(
        wait_for(
            done, RUN_TIMEOUT, f"{name} to succeed", dump=lambda: diagnose(kc, ns, name, env["op"])
        )
    )


def stage_pods(env: dict[str, Any], name: str, stage: str) -> list[dict[str, Any]]:
    selector = f"kubetune.io/job={name},kubetune.io/stage={stage}"
    return list(get_json(env["kubeconfig"], env["ns"], "pods", "-l", selector)["items"])


def events(env: dict[str, Any], name: str) -> list[dict[str, Any]]:
    selector = f"involvedObject.name={name},involvedObject.kind=FineTuneJob"
    items = get_json(env["kubeconfig"], env["ns"], "events", "--field-selector", selector)
    return list(items["items"])


def losses(env: dict[str, Any], s3: Any, name: str, ftj: dict[str, Any]) -> dict[int, float]:
    """step -> loss from the run's train/metrics.jsonl in S3."""
    prefix = ftj["status"]["output"].removeprefix(f"s3://{env['out_bucket']}/").rstrip("/")
    key = f"{prefix}/{RunLayout.TRAIN_METRICS}"
    body = s3.get_object(Bucket=env["out_bucket"], Key=key)["Body"]
    rows = [json.loads(line) for line in body.read().decode().splitlines()]
    return {int(r["step"]): float(r["loss"]) for r in rows}


def test_a_training_pod_deleted_mid_run_checkpoints_and_the_next_pod_resumes(
    env: dict[str, Any],
) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "preempted"
    job = node_job(env, name, maxSteps=3000, checkpointEverySteps=100_000, logEverySteps=50)
    job["spec"]["resources"]["terminationGracePeriodSeconds"] = 90
    apply(kc, ns, job)

    def training() -> str | None:
        for pod in stage_pods(env, name, "train"):
            if pod["status"].get("phase") != "Running":
                continue
            pod_name = pod["metadata"]["name"]
            logs = kubectl(kc, "-n", ns, "logs", pod_name, check=False).stdout
            if " steps of " in logs:  # the plan is logged as the loop starts
                return str(pod_name)
        return None

    first = wait_for(training, RUN_TIMEOUT, "the training loop to start")
    # What a preemption does to the pod: SIGTERM, then the grace period.
    kubectl(kc, "-n", ns, "delete", "pod", first, "--wait=false")

    ftj = succeeded(env, name)
    progress = ftj["status"]["progress"]
    assert progress["preemptions"] == 1, progress
    assert 1 <= progress["resumedFromStep"] < 3000, progress
    assert progress["step"] == 3000
    reasons = [e["reason"] for e in events(env, name)]
    assert "Preempted" in reasons, reasons
    assert "StageRetrying" not in reasons, reasons  # the stop cost no attempt
    train_job = get_json(kc, ns, "job", ftj["status"]["stages"]["train"]["job"])
    assert not train_job["status"].get("failed"), train_job["status"]
    trained = next(c for c in ftj["status"]["conditions"] if c["type"] == "Trained")
    assert f"resumed from step {progress['resumedFromStep']}" in trained["message"], trained
    (second,) = stage_pods(env, name, "train")  # the deleted pod is gone; its successor ran
    assert second["metadata"]["name"] != first


def test_two_cpu_workers_train_the_loss_curve_of_one_pod_on_the_same_global_batch(
    env: dict[str, Any], s3_server: Any
) -> None:
    kc, ns = env["kubeconfig"], env["ns"]
    steps = {"maxSteps": 30, "checkpointEverySteps": 30, "logEverySteps": 5}
    one = node_job(env, "one-worker", batchSize=8, **steps)
    two = node_job(env, "two-workers", batchSize=4, **steps)  # 4 rows on each of 2 pods
    two["spec"]["resources"]["workers"] = 2
    for job in (one, two):
        job["spec"]["resources"]["cpu"] = "500m"  # both training pods fit on the node
        apply(kc, ns, job)
    ftjs = {job["metadata"]["name"]: succeeded(env, job["metadata"]["name"]) for job in (one, two)}

    pods = stage_pods(env, "two-workers", "train")
    indexes = sorted(
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods
    )
    assert indexes == ["0", "1"], indexes
    assert all(
        p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0 for p in pods
    )
    s3 = s3_server.client()
    curve_one = losses(env, s3, "one-worker", ftjs["one-worker"])
    curve_two = losses(env, s3, "two-workers", ftjs["two-workers"])
    assert sorted(curve_one) == sorted(curve_two) == [1, *range(5, 31, 5)]
    for step, loss in curve_one.items():
        assert curve_two[step] == pytest.approx(loss, rel=LOSS_RTOL), (step, curve_one, curve_two)
    # Only rank 0 writes: one model, one result, from the group of two processes.
    result = ftjs["two-workers"]["status"]
    assert result["phase"] == "Succeeded" and result["progress"]["step"] == 30
