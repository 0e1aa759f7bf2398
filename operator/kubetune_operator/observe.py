"""Pure reading of a stage Job and its pods: is it pending, running, done or failed, and why.

    obs = observe_stage(job_dict, pod_dicts, now=time.time(), unschedulable_timeout=300,
                        nodes=node_dicts)   # nodes: None when the operator may not list them
    obs.state        # "Pending" | "Running" | "Succeeded" | "Failed"
    obs.reason       # a schema.Reason value when Failed (OOMKilled, ImagePullFailed, ...)
    obs.result       # the stage's result JSON from the termination message, if any
    obs.recheck_after  # seconds until the observation changes by itself (a timeout), or None

Results and failure messages come only from the containers' termination messages
(the file ``KUBETUNE_TERMINATION_LOG`` the stage CLI writes), the Job's conditions
and the pods' states, never from logs.

Waiting is not failing. A pod the scheduler cannot place for lack of free CPU, memory or
GPUs is ``Pending`` with reason ``Waiting`` and the scheduler's message, for as long as it
takes: the user's limit is ``spec.resources.activeDeadlineSeconds`` (the Job's deadline
counts from its start, waiting included; then ``DeadlineExceeded``). Only a pod that no
node could ever hold (:func:`kubetune_operator.fit.never_fits`) fails, with reason
``Unschedulable``, once it has waited ``unschedulable_timeout`` seconds for such a node to
join (an autoscaler may be adding one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kubetune.contract import S3_CREDENTIAL_KEYS_TEXT, ExitCode
from kubetune.schema import Reason
from kubetune_operator.builders import (
    ANNOTATION_FAILED_MESSAGE,
    ANNOTATION_FAILED_REASON,
    LABEL_KUEUE_QUEUE,
)
from kubetune_operator.fit import never_fits

PENDING = "Pending"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"

# Waiting reasons that will not fix themselves; the operator gives up on the stage.
IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_REASONS = {"CreateContainerConfigError"}

Obj = dict[str, Any]


@dataclass
class StageObservation:
    """What one stage's Job and pods say."""

    state: str
    reason: str = ""
    message: str = ""
    result: dict[str, Any] | None = None  # parsed termination message of the successful pod
    start_time: str | None = None
    completion_time: str | None = None
    terminal_by_operator: bool = False  # the operator must mark the Job failed and stop it
    failed_attempts: int = 0  # pods of a still-active Job that failed (the Job retries them)
    attempts: int = 0  # attempts the Job allows (backoffLimit + 1); 0 when unknown
    last_failure: tuple[str, str] | None = None  # (reason, message) of the newest failed pod
    recheck_after: float | None = None  # seconds until a timeout changes this observation
    details: dict[str, Any] = field(default_factory=dict)


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_termination_message(text: str | None) -> dict[str, Any] | None:
    """The stage's JSON from a termination message; None when empty or not a JSON object."""
    if not text or not text.strip():
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _condition(obj: Obj, ctype: str) -> Obj | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return dict(cond)
    return None


def _container_statuses(pod: Obj) -> list[Obj]:
    status = pod.get("status") or {}
    return list(status.get("containerStatuses") or []) + list(
        status.get("initContainerStatuses") or []
    )


def _terminated(pod: Obj) -> list[Obj]:
    out = []
    for cs in _container_statuses(pod):
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get(
            "terminated"
        )
        if term:
            out.append(term)
    return out


def _newest_first(pods: list[Obj]) -> list[Obj]:
    return sorted(
        pods,
        key=lambda p: parse_time((p.get("metadata") or {}).get("creationTimestamp")) or 0.0,
        reverse=True,
    )


def _failure_from_pods(pods: list[Obj]) -> tuple[str, str] | None:
    """(reason, message) from the newest failed container: OOM, or the stage's own error.

    A pod stopped on SIGTERM with its checkpoint saved did not fail (exit INTERRUPTED; the
    trainer's progress counts those).
    """
    for pod in _newest_first(pods):
        for term in _terminated(pod):
            if term.get("exitCode", 0) in (0, ExitCode.INTERRUPTED):
                continue
            if term.get("reason") == "OOMKilled":
                return Reason.OOM_KILLED.value, (
                    "the stage container was killed for using more memory than its limit; "
                    "raise spec.resources.memory or lower training.batchSize/maxSeqLength"
                )
            data = parse_termination_message(term.get("message"))
            if data and data.get("error"):
                reason = str(data.get("reason") or Reason.STAGE_FAILED.value)
                return reason, str(data["error"])
            return Reason.STAGE_FAILED.value, (
                f"the stage exited with code {term.get('exitCode')}"
                + (f" ({term['reason']})" if term.get("reason") else "")
                + " and wrote no error message"
            )
    return None


def queue_name(job: Obj) -> str | None:
    """The Kueue LocalQueue that manages this Job (spec.queueName), or None."""
    return ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_KUEUE_QUEUE)


def is_queued_by_kueue(job: Obj) -> bool:
    """A Job Kueue manages: only Kueue may unsuspend it (admission)."""
    return queue_name(job) is not None


def _success_result(pods: list[Obj]) -> dict[str, Any] | None:
    for pod in _newest_first(pods):
        for term in _terminated(pod):
            if term.get("exitCode", 1) == 0:
                data = parse_termination_message(term.get("message"))
                if data is not None:
                    return data
    return None


def _stuck_pod(pods: list[Obj]) -> tuple[str, str] | None:
    """A pod that will never start by itself: image pull or bad config."""
    for pod in _newest_first(pods):
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            continue
        for cs in _container_statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            why = waiting.get("reason", "")
            detail = waiting.get("message", "")
            if why in IMAGE_PULL_REASONS:
                return Reason.IMAGE_PULL_FAILED.value, (
                    f"cannot pull image {cs.get('image', '')!r} ({why}"
                    + (f": {detail}" if detail else "")
                    + "); fix spec.resources.image or the registry credentials"
                )
            if why in CONFIG_REASONS:
                return Reason.INVALID_SPEC.value, (
                    f"the stage pod cannot start: {detail or why}; check "
                    f"spec.storage.credentialsSecret (it needs the keys {S3_CREDENTIAL_KEYS_TEXT})"
                )
    return None


def unschedulable_condition(pod: Obj) -> Obj | None:
    """The pod's ``PodScheduled=False`` condition with reason Unschedulable, if it has one."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    if (pod.get("status") or {}).get("phase") not in (None, "", "Pending"):
        return None
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return dict(cond)
    return None


def _unschedulable(
    pods: list[Obj], now: float, unschedulable_timeout: float, nodes: list[Obj] | None
) -> StageObservation | None:
    """The newest unschedulable pod: failed if no node can ever hold it, else waiting."""
    for pod in _newest_first(pods):
        cond = unschedulable_condition(pod)
        if cond is None:
            continue
        scheduler = str(cond.get("message") or "no node fits").strip()
        why = never_fits(pod, nodes) if nodes is not None else None
        if why is None:
            return StageObservation(
                state=PENDING,
                reason=Reason.WAITING.value,
                message=f"waiting for a node with room for the stage pod: {scheduler}",
            )
        since = parse_time(cond.get("lastTransitionTime")) or parse_time(
            (pod.get("metadata") or {}).get("creationTimestamp")
        )
        waited = max(0.0, now - since) if since is not None else 0.0
        deadline = (since if since is not None else now) + unschedulable_timeout
        if waited >= unschedulable_timeout:
            return StageObservation(
                state=FAILED,
                reason=Reason.UNSCHEDULABLE.value,
                message=(
                    f"no node can ever run the stage pod: {why}; change spec.resources or add "
                    f"a node that can hold it (scheduler: {scheduler})"
                ),
                terminal_by_operator=True,
            )
        # A time, not a countdown: the message (and so the status) stays the same each pass.
        at = datetime.fromtimestamp(deadline, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return StageObservation(
            state=PENDING,
            reason=Reason.WAITING.value,
            message=(
                f"no node can ever run the stage pod: {why}; the run fails at {at} unless a "
                f"node that can hold it joins (scheduler: {scheduler})"
            ),
            recheck_after=unschedulable_timeout - waited,
        )
    return None


def observe_stage(
    job: Obj | None,
    pods: list[Obj],
    *,
    now: float,
    unschedulable_timeout: float,
    nodes: list[Obj] | None = None,
) -> StageObservation:
    """Classify one stage; ``job`` None means the stage Job does not exist.

    ``nodes``: the cluster's nodes, to tell a pod that waits for room from one that no node
    could ever hold; None (unknown) makes every unschedulable pod wait. A stage still at work
    also says how many of its attempts failed so far, and why the newest one did.
    """
    obs = _classify(job, pods, now=now, unschedulable_timeout=unschedulable_timeout, nodes=nodes)
    if job is not None and obs.state in (PENDING, RUNNING):
        failed = int((job.get("status") or {}).get("failed") or 0)
        if failed:
            obs.failed_attempts = failed
            obs.attempts = int((job.get("spec") or {}).get("backoffLimit") or 0) + 1
            obs.last_failure = _failure_from_pods(pods)
    return obs


def _classify(
    job: Obj | None,
    pods: list[Obj],
    *,
    now: float,
    unschedulable_timeout: float,
    nodes: list[Obj] | None,
) -> StageObservation:
    if job is None:
        return StageObservation(state=PENDING, reason=Reason.WAITING.value, message="not started")
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    start, done = status.get("startTime"), status.get("completionTime")
    annotations = meta.get("annotations") or {}
    if annotations.get(ANNOTATION_FAILED_REASON):
        return StageObservation(
            state=FAILED,
            reason=annotations[ANNOTATION_FAILED_REASON],
            message=annotations.get(ANNOTATION_FAILED_MESSAGE, ""),
            start_time=start,
            completion_time=done,
        )
    if _condition(job, "Complete"):
        return StageObservation(
            state=SUCCEEDED,
            reason=Reason.STAGE_SUCCEEDED.value,
            message="the stage completed",
            result=_success_result(pods),
            start_time=start,
            completion_time=done or (_condition(job, "Complete") or {}).get("lastTransitionTime"),
        )
    failed = _condition(job, "Failed") or _condition(job, "FailureTarget")
    if failed:
        job_reason = str(failed.get("reason") or "")
        when = done or failed.get("lastTransitionTime")
        from_pods = _failure_from_pods(pods)
        if job_reason == "DeadlineExceeded":
            reason, message = (
                Reason.DEADLINE_EXCEEDED.value,
                (
                    "the stage did not finish within spec.resources.activeDeadlineSeconds "
                    f"({(job.get('spec') or {}).get('activeDeadlineSeconds')}s, counted from "
                    "the stage Job's start, time waiting for a node included)"
                ),
            )
        elif from_pods and from_pods[0] == Reason.OOM_KILLED.value:
            reason, message = from_pods
        elif job_reason == "BackoffLimitExceeded":
            reason = Reason.BACKOFF_LIMIT_EXCEEDED.value
            tries = (job.get("spec") or {}).get("backoffLimit", 0) + 1
            message = f"the stage failed {tries} time(s)"
            if from_pods:
                message += f"; last error ({from_pods[0]}): {from_pods[1]}"
                # A typed reason from the stage (e.g. DatasetUnusable) beats the generic one.
                if from_pods[0] != Reason.STAGE_FAILED.value:
                    reason = from_pods[0]
        elif from_pods:
            reason, message = from_pods
        else:
            reason = Reason.STAGE_FAILED.value
            message = str(failed.get("message") or job_reason or "the stage Job failed")
        return StageObservation(
            state=FAILED, reason=reason, message=message, start_time=start, completion_time=when
        )
    if (job.get("spec") or {}).get("suspend"):
        queue = queue_name(job)
        if queue is not None:  # waiting for Kueue's admission (or re-admission after eviction)
            return StageObservation(
                state=PENDING,
                reason=Reason.QUEUED.value,
                message=(
                    f"queued in Kueue LocalQueue {queue!r}: the Job starts when Kueue admits "
                    f"it (kubectl get workloads -n {meta.get('namespace', '')} says why it "
                    "waits)"
                ),
                start_time=start,
            )
        return StageObservation(state=SUSPENDED, reason=Reason.SUSPENDED.value, start_time=start)
    stuck = _stuck_pod(pods)
    oom = _failure_from_pods(pods)
    if stuck is None and oom and oom[0] == Reason.OOM_KILLED.value:
        # The Job would retry, but the same batch on the same node runs out of memory again.
        stuck = oom
    if stuck:
        return StageObservation(
            state=FAILED,
            reason=stuck[0],
            message=stuck[1],
            start_time=start,
            terminal_by_operator=True,
        )
    unschedulable = _unschedulable(pods, now, unschedulable_timeout, nodes)
    if unschedulable is not None and unschedulable.state == FAILED:
        unschedulable.start_time = start
        return unschedulable
    running = [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") == "Running"
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    if running:
        message = f"{len(running)} pod(s) running"
        if unschedulable is not None:  # a worker of a multi-pod stage
            message += f"; {unschedulable.message}"
        return StageObservation(
            state=RUNNING,
            reason=Reason.STAGE_RUNNING.value,
            message=message,
            start_time=start,
            recheck_after=unschedulable.recheck_after if unschedulable is not None else None,
        )
    if unschedulable is not None:
        unschedulable.start_time = start
        return unschedulable
    waiting = "waiting for the stage pod to start"
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                waiting = f"the stage pod is not scheduled yet: {cond.get('message', '')}".strip()
    return StageObservation(
        state=PENDING, reason=Reason.STAGE_PENDING.value, message=waiting, start_time=start
    )
