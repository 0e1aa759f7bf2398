"""The operator's pure status logic: reading Jobs and pods, computing the status, the work queue.

Job and pod dicts below have the shape the API server returns (only the fields we read).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry

from kubetune.results import (
    EvaluateResult,
    ModelScores,
    PrepareResult,
    RetentionResult,
    TrainResult,
)
from kubetune.schema import Comparison, DatasetStats, Progress
from kubetune_operator.builders import ANNOTATION_FAILED_MESSAGE, ANNOTATION_FAILED_REASON, RunRef
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.observe import StageObservation, observe_stage
from kubetune_operator.reconcile import parse_progress
from kubetune_operator.status import (
    Event,
    RunView,
    compute_status,
    parse_status,
    status_patch,
    status_to_wire,
)
from kubetune_operator.workqueue import WorkQueue

T0 = "2025-01-01T00:00:00Z"
T1 = "2025-01-01T00:05:00Z"
NOW = 1735689600.0 + 600  # T0 + 10 minutes
RUN1 = RunRef(id="g1", generation=1, output="s3://b/x/runs/g1", spec_hash="abc")
RUN2 = RunRef(id="g2", generation=2, output="s3://b/x/runs/g2", spec_hash="def")


def job(conditions: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "x-g1-train", "annotations": {}},
        "spec": {"backoffLimit": 2, **spec},
        "status": {"startTime": T0, "conditions": conditions or []},
    }


def cond(ctype: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": T1,
    }


def pod(
    phase: str = "Running",
    *,
    created: str = T0,
    terminated: dict[str, Any] | None = None,
    waiting: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if terminated is not None:
        state["terminated"] = terminated
    if waiting is not None:
        state["waiting"] = waiting
    return {
        "metadata": {"name": "p", "creationTimestamp": created},
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [{"name": "train", "image": "img:1", "state": state}],
        },
    }


def observe(
    j: dict[str, Any] | None, pods: list[dict[str, Any]], timeout: float = 300
) -> StageObservation:
    return observe_stage(j, pods, now=NOW, unschedulable_timeout=timeout)


# --------------------------------------------------------------------------- observe


def test_completed_job_yields_the_result_from_the_termination_message() -> None:
    msg = json.dumps(
        {
            "stage": "train",
            "steps": 30,
            "totalSteps": 30,
            "epochs": 1.0,
            "modelUri": "s3://b/x/runs/g1/model",
        }
    )
    obs = observe(
        job([cond("Complete")]), [pod("Succeeded", terminated={"exitCode": 0, "message": msg})]
    )
    assert obs.state == "Succeeded"
    assert obs.result is not None and obs.result["steps"] == 30


def test_not_retriable_failure_carries_the_stages_reason_and_message() -> None:
    msg = json.dumps(
        {"error": "dataset.source s3://b/empty/ cleaned to 0 lines", "reason": "DatasetUnusable"}
    )
    obs = observe(
        job([cond("Failed", "PodFailurePolicy")]),
        [pod("Failed", terminated={"exitCode": 3, "message": msg})],
    )
    assert (obs.state, obs.reason) == ("Failed", "DatasetUnusable")
    assert "cleaned to 0 lines" in obs.message


def test_backoff_limit_exceeded_quotes_the_last_error() -> None:
    msg = json.dumps({"error": "CUDA error: device-side assert", "reason": "StageFailed"})
    obs = observe(
        job([cond("Failed", "BackoffLimitExceeded")]),
        [pod("Failed", terminated={"exitCode": 1, "message": msg})],
    )
    assert obs.reason == "BackoffLimitExceeded"
    assert "failed 3 time(s)" in obs.message and "device-side assert" in obs.message


def test_deadline_exceeded_is_reported_as_such() -> None:
    obs = observe(job([cond("Failed", "DeadlineExceeded")], activeDeadlineSeconds=60), [])
    assert obs.reason == "DeadlineExceeded" and "60s" in obs.message


def test_oom_killed_pod_stops_the_stage_even_while_the_job_would_retry() -> None:
    obs = observe(job(), [pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})])
    assert (obs.state, obs.reason, obs.terminal_by_operator) == ("Failed", "OOMKilled", True)
    assert "spec.resources.memory" in obs.message


def test_image_pull_errors_fail_the_stage() -> None:
    waiting = {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}
    obs = observe(job(), [pod("Pending", waiting=waiting)])
    assert (obs.state, obs.reason) == ("Failed", "ImagePullFailed")
    assert "img:1" in obs.message and obs.terminal_by_operator


def test_missing_secret_key_is_an_invalid_spec() -> None:
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}
    obs = observe(job(), [pod("Pending", waiting=waiting)])
    assert obs.reason == "InvalidSpec" and 'secret "s3" not found' in obs.message


def test_unschedulable_pod_waits_and_quotes_the_scheduler() -> None:
    # Failing only when no node could ever hold the pod: tests/unit/test_observe.py.
    sched = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
        }
    ]
    obs = observe(job(), [pod("Pending", conditions=sched)], timeout=300)
    assert (obs.state, obs.reason) == ("Pending", "Waiting")
    assert "Insufficient nvidia.com/gpu" in obs.message


def test_a_job_the_operator_gave_up_on_stays_failed() -> None:
    j = job(suspend=True)
    j["metadata"]["annotations"] = {
        ANNOTATION_FAILED_REASON: "ImagePullFailed",
        ANNOTATION_FAILED_MESSAGE: "cannot pull",
    }
    obs = observe(j, [])
    assert (obs.state, obs.reason, obs.message) == ("Failed", "ImagePullFailed", "cannot pull")


def test_running_pending_and_suspended_jobs() -> None:
    assert observe(job(), [pod("Running")]).state == "Running"
    assert observe(job(), []).state == "Pending"
    assert observe(job(suspend=True), []).state == "Suspended"
    assert observe(None, []).state == "Pending"


def test_a_killed_training_pod_is_not_a_stage_failure_while_the_job_retries() -> None:
    killed = pod("Failed", terminated={"exitCode": 137, "reason": "Error"})
    obs = observe(job(), [killed, pod("Running", created=T1)])
    assert obs.state == "Running"


# --------------------------------------------------------------------------- status


def prepare_result() -> PrepareResult:
    stats = DatasetStats(
        documents=10,
        lines=500,
        kept_lines=400,
        train_lines=360,
        test_lines=40,
        train_tokens=9000,
        test_tokens=1000,
    )
    return PrepareResult(
        stats=stats,
        train_sha256="a",
        test_sha256="b",
        tokenizer="bpe",
        dataset_uri="s3://b/x/runs/g1/dataset",
    )


def train_result() -> TrainResult:
    return TrainResult(
        steps=30,
        total_steps=30,
        epochs=1.5,
        final_loss=3.2,
        model_uri="s3://b/x/runs/g1/model",
        last_checkpoint="s3://b/x/runs/g1/checkpoints/step-00000030",
        resumed_from_step=20,
    )


def evaluate_result() -> EvaluateResult:
    return EvaluateResult(
        fine_tuned=ModelScores(perplexity=40.0, bleu=5.0),
        baseline=ModelScores(perplexity=500.0, bleu=0.5),
        bleu_signature="nrefs:1|case:mixed|tok:13a",
    )


def done(stage: str) -> StageObservation:
    return StageObservation(state="Succeeded", start_time=T0, completion_time=T1)


def succeeded_view(run: RunRef = RUN1, generation: int = 1) -> RunView:
    return RunView(
        run=run,
        generation=generation,
        stages={s: done(s) for s in ("prepare", "train", "evaluate")},
        prepare=prepare_result(),
        train=train_result(),
        evaluate=evaluate_result(),
    )


def compute(old: dict[str, Any], view: RunView, now: str) -> tuple[dict[str, Any], list[Event]]:
    """compute_status from and to the wire form, as the reconciler reads and writes it."""
    new, events = compute_status(parse_status(old), view, now)
    return status_to_wire(new), events


def cond_of(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    found = next((c for c in status["conditions"] if c["type"] == ctype), None)
    assert found is not None, ctype
    return found


def test_a_succeeded_run_has_results_artifacts_and_kstatus_conditions() -> None:
    status, events = compute({}, succeeded_view(), T1)
    assert status["phase"] == "Succeeded" and status["observedGeneration"] == 1
    assert status["results"]["perplexity"] == 40.0
    assert status["results"]["baselinePerplexity"] == 500.0
    assert status["results"]["perplexityDelta"] == -460.0
    assert status["results"]["bleuDelta"] == 4.5
    assert status["results"]["bleuSignature"].startswith("nrefs")
    assert status["dataset"]["trainLines"] == 360
    assert status["progress"]["percent"] == 100
    assert status["artifacts"]["model"] == "s3://b/x/runs/g1/model"
    assert status["artifacts"]["report"] == "s3://b/x/runs/g1/report/report.md"
    assert cond_of(status, "Ready")["status"] == "True"
    assert cond_of(status, "Reconciling")["status"] == "False"
    assert cond_of(status, "Stalled")["status"] == "False"
    for ctype in ("DatasetReady", "Trained", "Evaluated"):
        assert cond_of(status, ctype)["status"] == "True"
    assert "resumed from step 20" in cond_of(status, "Trained")["message"]
    assert any(e.reason == "Succeeded" for e in events)


def test_training_in_progress_is_reconciling_with_progress() -> None:
    view = RunView(
        run=RUN1,
        generation=1,
        stages={
            "prepare": done("prepare"),
            "train": StageObservation(
                state="Running", reason="StageRunning", message="1 pod(s) running"
            ),
        },
        prepare=prepare_result(),
        progress=Progress(step=12, total_steps=30, percent=40, loss=4.1),
    )
    status, _ = compute({}, view, T0)
    assert status["phase"] == "Training"
    assert status["progress"]["step"] == 12
    assert cond_of(status, "Reconciling")["status"] == "True"
    assert cond_of(status, "Ready")["status"] == "False"
    assert cond_of(status, "DatasetReady")["status"] == "True"
    assert cond_of(status, "Trained")["reason"] == "StageRunning"
    assert cond_of(status, "Evaluated")["reason"] == "Waiting"
    # The next pass without a fresh progress read keeps the last one.
    view.progress = None
    again, _ = compute(status, view, T1)
    assert again["progress"]["step"] == 12


def test_the_phase_of_a_working_run_never_goes_back() -> None:
    # Preparing, then the prepare pod is retried (or finished before its Job is Complete):
    # the stage looks Pending again, and the phase stays Preparing.
    running = StageObservation(state="Running", reason="StageRunning", message="1 pod(s) running")
    between = StageObservation(
        state="Pending", reason="StagePending", message="waiting for the stage pod to start"
    )
    seen = []
    status: dict[str, Any] = {}
    for obs in (between, running, between, running):
        status, _ = compute(status, RunView(run=RUN1, generation=1, stages={"prepare": obs}), T0)
        seen.append(status["phase"])
    assert seen == ["Pending", "Preparing", "Preparing", "Preparing"]
    between_status, _ = compute(
        status, RunView(run=RUN1, generation=1, stages={"prepare": between}), T1
    )
    assert between_status["phase"] == "Preparing"
    assert "waiting for the stage pod to start" in between_status["message"]
    # A new run starts from Pending again.
    fresh, _ = compute(status, RunView(run=RUN2, generation=2, stages={"prepare": between}), T1)
    assert fresh["phase"] == "Pending"


def test_each_lost_attempt_of_a_retrying_stage_is_one_warning_event() -> None:
    message = json.dumps({"error": "storage unreachable for 300 s", "reason": "StageFailed"})
    lost = pod("Failed", terminated={"exitCode": 1, "reason": "Error", "message": message})
    retrying = job(backoffLimit=2)
    retrying["status"]["failed"] = 1
    obs = observe(retrying, [lost, pod("Running", created=T1)])
    assert (obs.state, obs.failed_attempts, obs.attempts) == ("Running", 1, 3)
    view = RunView(run=RUN1, generation=1, stages={"prepare": done("prepare"), "train": obs})
    status, events = compute({}, view, T0)
    warnings = [e for e in events if e.reason == "StageRetrying"]
    assert len(warnings) == 1 and warnings[0].type == "Warning"
    assert "train: attempt 1 of 3 failed" in warnings[0].message
    assert "storage unreachable for 300 s" in warnings[0].message
    assert "2 left" in warnings[0].message
    assert status["stages"]["train"]["failedAttempts"] == 1
    # The next pass sees the same attempt: no second Event (a restarted operator neither).
    _, again = compute(status, view, T1)
    assert not [e for e in again if e.reason == "StageRetrying"]
    # Another attempt lost: one more Event.
    retrying["status"]["failed"] = 2
    view.stages["train"] = observe(retrying, [lost, pod("Running", created=T1)])
    status, third = compute(status, view, T1)
    retried = [e for e in third if e.reason == "StageRetrying"]
    assert len(retried) == 1 and "attempt 2 of 3" in retried[0].message
    assert status["stages"]["train"]["failedAttempts"] == 2


def test_last_transition_time_changes_only_when_the_status_flips() -> None:
    running = RunView(
        run=RUN1,
        generation=1,
        stages={
            "prepare": StageObservation(state="Pending", reason="StagePending", message="waiting")
        },
    )
    first, _ = compute({}, running, T0)
    running.stages["prepare"] = StageObservation(
        state="Running", reason="StageRunning", message="go"
    )
    second, _ = compute(first, running, T1)
    assert cond_of(second, "Reconciling")["lastTransitionTime"] == T0  # still True
    assert cond_of(second, "Reconciling")["reason"] == "StageRunning"
    third, _ = compute(second, succeeded_view(), T1)
    assert cond_of(third, "Reconciling")["lastTransitionTime"] == T1  # flipped to False


def test_a_failed_stage_stalls_the_run_with_its_reason_and_one_warning() -> None:
    view = RunView(
        run=RUN1,
        generation=1,
        stages={
            "prepare": StageObservation(
                state="Failed", reason="DatasetUnusable", message="no line survived cleaning"
            )
        },
    )
    status, events = compute({}, view, T0)
    assert status["phase"] == "Failed"
    stalled = cond_of(status, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "DatasetUnusable")
    assert "no line survived cleaning" in stalled["message"]
    assert cond_of(status, "Reconciling")["status"] == "False"
    assert cond_of(status, "DatasetReady")["reason"] == "DatasetUnusable"
    warnings = [e for e in events if e.type == "Warning"]
    assert len(warnings) == 1 and warnings[0].reason == "DatasetUnusable"
    # Same facts again: nothing to patch, no second Event.
    again, events2 = compute(status, view, T1)
    assert status_patch(status, again) is None
    assert not events2


def test_invalid_spec_names_the_problem() -> None:
    view = RunView(
        run=RUN1,
        generation=1,
        invalid=(
            "InvalidSpec",
            "Secret ml/s3 named by spec.storage.credentialsSecret does not exist",
        ),
    )
    status, events = compute({}, view, T0)
    assert status["phase"] == "Failed"
    assert "spec.storage.credentialsSecret" in cond_of(status, "Stalled")["message"]
    assert events[-1].type == "Warning" and events[-1].reason == "InvalidSpec"


def test_suspended_run_is_neither_reconciling_nor_stalled() -> None:
    view = RunView(
        run=RUN1,
        generation=2,
        suspended=True,
        stages={
            "prepare": done("prepare"),
            "train": StageObservation(state="Suspended", reason="Suspended"),
        },
    )
    status, _ = compute({}, view, T0)
    assert status["phase"] == "Suspended"
    assert cond_of(status, "Reconciling")["status"] == "False"
    assert cond_of(status, "Stalled")["status"] == "False"
    assert status["observedGeneration"] == 2


def test_a_new_run_moves_the_old_results_into_history() -> None:
    first, _ = compute({}, succeeded_view(), T1)
    view = RunView(
        run=RUN2,
        generation=2,
        stages={"prepare": StageObservation(state="Running", reason="StageRunning")},
    )
    second, events = compute(first, view, T1)
    assert second["run"] == "g2" and second["phase"] == "Preparing"
    assert "results" not in second and "dataset" not in second
    assert second["history"][0]["run"] == "g1"
    assert second["history"][0]["results"]["perplexity"] == 40.0
    assert second["history"][0]["phase"] == "Succeeded"
    assert any(e.reason == "NewGeneration" for e in events)
    patch = status_patch(first, second)
    assert patch is not None and patch["results"] is None  # cleared, not left behind
    # Nested keys too: a merge patch would otherwise keep the old run's later stages.
    assert patch["stages"]["train"] is None and patch["stages"]["evaluate"] is None
    assert patch["artifacts"] is None


def test_status_patch_applied_as_a_merge_patch_yields_exactly_the_new_status() -> None:
    def apply(target: Any, patch: Any) -> Any:  # RFC 7386, as the API server does it
        if not isinstance(patch, dict):
            return patch
        out = dict(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = apply(out.get(key), value)
        return out

    first, _ = compute({}, succeeded_view(), T1)
    view = RunView(
        run=RUN2,
        generation=2,
        stages={"prepare": StageObservation(state="Running", reason="StageRunning")},
    )
    second, _ = compute(first, view, T1)
    assert apply(first, status_patch(first, second)) == second


def test_history_keeps_at_most_five_runs() -> None:
    status: dict[str, Any] = {}
    for gen in range(1, 9):
        run = RunRef(id=f"g{gen}", generation=gen, output=f"s3://b/runs/g{gen}", spec_hash=str(gen))
        status, _ = compute(status, succeeded_view(run, gen), T1)
    assert [h["run"] for h in status["history"]] == ["g7", "g6", "g5", "g4", "g3"]


def test_progress_json_is_read_leniently() -> None:
    progress = parse_progress({"step": 5, "totalSteps": 20, "loss": 2.5, "extra": "ignored"})
    assert progress is not None and progress.percent == 25
    assert parse_progress({"step": "not a number"}) is None
    assert parse_progress(None) is None


# --------------------------------------------------------------------------- metrics, queue


def test_metrics_count_a_finished_run_once() -> None:
    metrics = OperatorMetrics(CollectorRegistry())
    done_status, _ = compute({}, succeeded_view(), T1)
    metrics.observe("ml", "x", {}, done_status)
    metrics.observe("ml", "x", done_status, done_status)
    reg = metrics.registry
    assert reg.get_sample_value("kubetune_operator_runs_total", {"outcome": "succeeded"}) == 1
    assert reg.get_sample_value("kubetune_operator_finetunejobs", {"phase": "Succeeded"}) == 1
    labels = {"finetunejob": "x", "namespace": "ml", "model": "baseline"}
    assert reg.get_sample_value("kubetune_finetunejob_perplexity", labels) == 500.0
    metrics.forget("ml", "x")
    assert reg.get_sample_value("kubetune_operator_finetunejobs", {"phase": "Succeeded"}) == 0
    assert reg.get_sample_value("kubetune_finetunejob_perplexity", labels) is None


def test_work_queue_deduplicates_and_never_hands_a_key_to_two_workers() -> None:
    queue = WorkQueue()
    queue.add("a")
    queue.add("a")
    assert len(queue) == 1
    assert queue.get(timeout=0.1) == "a"
    queue.add("a")  # an event while "a" is being processed
    assert queue.get(timeout=0.1) is None  # not handed out twice at once
    queue.done("a")
    assert queue.get(timeout=0.1) == "a"  # ...but processed again afterwards
    queue.done("a")


def test_work_queue_delays_requeues_and_earliest_due_wins() -> None:
    now = [0.0]
    queue = WorkQueue(clock=lambda: now[0])
    queue.add("k", delay=15)
    assert queue.get(timeout=0) is None
    queue.add("k", delay=1)
    now[0] = 1.0
    assert queue.get(timeout=0) == "k"


def test_work_queue_wakes_a_waiting_worker() -> None:
    queue = WorkQueue()
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.append(queue.get(timeout=5)))
    worker.start()
    time.sleep(0.05)
    queue.add(("ml", "x"))
    worker.join(5)
    assert got == [("ml", "x")]


def test_instruction_results_carry_chrf_and_exact_match_into_status_and_message() -> None:
    view = succeeded_view()
    view.evaluate = EvaluateResult(
        fine_tuned=ModelScores(perplexity=3.5, bleu=41.0, chrf=62.5, exact_match=37.5),
        baseline=ModelScores(perplexity=80.0, bleu=2.0, chrf=12.25, exact_match=0.0),
        bleu_signature="nrefs:1|case:mixed|tok:13a",
        chrf_signature="nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.4.2",
        kind="chat",
        comparisons=[Comparison(name="ollama", bleu=30.0, chrf=55.0, exact_match=25.0)],
    )
    status, _ = compute({}, view, T1)
    results = status["results"]
    assert results["chrf"] == 62.5 and results["baselineChrf"] == 12.25
    assert results["exactMatch"] == 37.5 and results["baselineExactMatch"] == 0.0
    assert results["chrfSignature"].startswith("nrefs:1|") and "nc:6" in results["chrfSignature"]
    assert results["comparisons"] == [
        {"name": "ollama", "bleu": 30.0, "chrf": 55.0, "exactMatch": 25.0}
    ]
    message = cond_of(status, "Evaluated")["message"]
    assert "chrF 62.5 (baseline 12.25)" in message
    assert "exact match 37.5% (baseline 0%)" in message
    # A text run's status has none of them.
    text_status, _ = compute({}, succeeded_view(), T1)
    assert not {"chrf", "exactMatch", "chrfSignature"} & set(text_status["results"])
    assert "chrF" not in cond_of(text_status, "Evaluated")["message"]


def test_a_promotion_decision_is_a_condition_an_event_and_status_promotion() -> None:
    from kubetune.schema import PromotionStatus, TrackingStatus

    for promoted, reason, severity in (
        (True, "Promoted", "Normal"),
        (False, "NotBetter", "Normal"),
        (False, "PromotionFailed", "Warning"),
    ):
        view = succeeded_view()
        assert view.evaluate is not None
        decision = PromotionStatus(
            promoted=promoted, reason=reason, message=f"{reason}: numbers", version="v0002"
        )
        tracking = TrackingStatus(run_id="abc", url="http://mlflow/#/experiments/1/runs/abc")
        view.evaluate = view.evaluate.model_copy(
            update={"promotion": decision, "tracking": tracking}
        )
        status, events = compute({}, view, T1)
        assert status["promotion"]["reason"] == reason and status["promotion"]["version"] == "v0002"
        condition = cond_of(status, "Promoted")
        assert condition["status"] == ("True" if promoted else "False")
        assert condition["reason"] == reason and condition["message"] == f"{reason}: numbers"
        assert [(e.type, e.reason) for e in events if e.reason == reason] == [(severity, reason)]
        assert status["tracking"]["url"].endswith("/runs/abc")
        # The decision is news once: the next pass of the same run emits no second Event.
        again, later = compute(status, view, T1)
        assert not [e for e in later if e.reason == reason]
        assert cond_of(again, "Promoted")["status"] == condition["status"]


def test_a_run_without_promotion_has_no_promoted_condition() -> None:
    status, _ = compute({}, succeeded_view(), T1)
    assert "promotion" not in status
    assert all(c["type"] != "Promoted" for c in status["conditions"])


def test_a_tracking_failure_is_a_false_tracked_condition_not_a_failed_run() -> None:
    from kubetune.schema import TrackingStatus

    view = succeeded_view()
    assert view.evaluate is not None
    error = "MLflow at http://mlflow:5000 unreachable after 3 attempts; check trackingUri"
    view.evaluate = view.evaluate.model_copy(
        update={"tracking": TrackingStatus(run_id="abc", error=error)}
    )
    status, _ = compute({}, view, T1)
    tracked = cond_of(status, "Tracked")
    assert (tracked["status"], tracked["reason"], tracked["message"]) == (
        "False",
        "TrackingFailed",
        error,
    )
    assert status["phase"] == "Succeeded" and cond_of(status, "Ready")["status"] == "True"


def test_runs_deleted_by_retention_are_marked_in_history_with_one_event() -> None:
    status: dict[str, Any] = {}
    for gen in (1, 2):
        run = RunRef(id=f"g{gen}", generation=gen, output=f"s3://b/runs/g{gen}", spec_hash=str(gen))
        status, _ = compute(status, succeeded_view(run, gen), T1)
    run3 = RunRef(id="g3", generation=3, output="s3://b/runs/g3", spec_hash="3")
    view = succeeded_view(run3, 3)
    assert view.evaluate is not None
    view.evaluate.retention = RetentionResult(
        keep_runs=2, kept=["g3", "g2"], deleted=["g1"], error="g0: access denied"
    )
    status, events = compute(status, view, T1)
    marks = {h["run"]: h.get("artifactsDeleted") for h in status["history"]}
    assert marks == {"g2": None, "g1": True}
    deleted = [e for e in events if e.reason == "RunsDeleted"]
    assert len(deleted) == 1 and "g1" in deleted[0].message and "keepRuns: 2" in deleted[0].message
    assert [e.type for e in events if e.reason == "RetentionFailed"] == ["Warning"]
    # The same run observed again: the marks stay, the Events are not repeated.
    again, events = compute(status, view, T1)
    assert again["history"] == status["history"]
    assert not [e for e in events if e.reason in ("RunsDeleted", "RetentionFailed")]


def test_each_preemption_the_trainer_counts_is_one_warning_and_no_attempt_is_lost() -> None:
    running = StageObservation(state="Running", reason="StageRunning", message="1 pod(s) running")
    view = RunView(run=RUN1, generation=1, stages={"prepare": done("prepare"), "train": running})
    view.progress = Progress(step=20, total_steps=100, percent=20)
    status, events = compute({}, view, T0)
    assert not [e for e in events if e.reason == "Preempted"]
    # The stopped pod is gone; progress.json (written by the trainer) remembers.
    view.progress = Progress(
        step=44, total_steps=100, percent=44, preemptions=1, resumed_from_step=40
    )
    status, events = compute(status, view, T1)
    preempted = [e for e in events if e.reason == "Preempted"]
    assert len(preempted) == 1 and preempted[0].type == "Warning"
    assert "preemption 1" in preempted[0].message and "resumed from step 40" in preempted[0].message
    assert not [e for e in events if e.reason == "StageRetrying"]
    assert status["progress"]["preemptions"] == 1 and status["progress"]["resumedFromStep"] == 40
    assert status["phase"] == "Training" and "preempted 1 time(s)" in status["message"]
    _, again = compute(status, view, T1)  # the same preemption: no second Event
    assert not [e for e in again if e.reason == "Preempted"]


def test_a_stage_queued_by_kueue_keeps_the_run_pending_with_reason_queued() -> None:
    queued = StageObservation(state="Pending", reason="Queued", message="queued in 'team-a'")
    view = RunView(run=RUN1, generation=1, stages={"prepare": queued})
    status, _ = compute({}, view, T0)
    assert (status["phase"], status["reason"]) == ("Pending", "Queued")
    assert "team-a" in status["message"]
