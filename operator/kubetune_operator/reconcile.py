"""The reconciler: look at the cluster, take the next step for one FineTuneJob, write its status.

Level-triggered and idempotent: every call derives the run from what exists (the run's
ConfigMap, its stage Jobs and their pods, result files in storage) and the status is only
a cache of that, so an operator killed at any moment continues the same run after a
restart, never creates a second Job for a stage and never loses a result::

    reconciler = Reconciler(Kube.from_environment(), OperatorConfig.from_env())
    requeue_after = reconciler.reconcile("default", "tldr-gpt2")   # seconds, or None

The reconciler talks to the cluster only through :class:`~kubetune_operator.kube.KubeClient`
(``tests/unit/fake_kube.py`` is an in-memory one) and writes the status only through
:meth:`Reconciler._write_status`, which asks :func:`~kubetune_operator.status.compute_status`
for the new status and Events, both for a run and for a spec that does not parse.

Runs. Run ``g<N>`` starts when the spec (without ``suspend``, ``ttlSecondsAfterFinished``
and ``retrain``) differs from the current run's; it writes under
``<spec.storage.output>/runs/<uid[:8]>-g<N>/``. Once the current run has finished, a
retraining trigger (:mod:`kubetune_operator.triggers`: ``spec.retrain.schedule``,
``spec.retrain.onDatasetChange``, the ``kubetune.io/retrain`` annotation) starts
``g<N>-r<n+1>`` of the same spec, under its own prefix. The current run is the newest by
(generation, n). Children of other runs are deleted; their results move into
``status.history``.

Results belong to their run. A stage result, from storage or from a termination message,
counts only when its ``run`` (:class:`~kubetune.results.RunIdentity`: the FineTuneJob's
uid, the run's spec hash and id) is the current run's; anything else is ignored and the
stage is not done. Before creating a stage Job the reconciler checks that no older live
FineTuneJob, in any namespace, uses an overlapping ``spec.storage.output``
(:mod:`kubetune_operator.outputs`); if one does, the newer job stalls with ``OutputInUse``.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kubetune.contract import JOB_STAGES, S3_CREDENTIAL_KEYS_TEXT, STAGE_CONDITION, Stage
from kubetune.layout import RunLayout, parse_run_id, run_prefix
from kubetune.results import EvaluateResult, PrepareResult, RunIdentity, TrainResult
from kubetune.schema import (
    API_VERSION,
    KIND,
    FineTuneJob,
    FineTuneJobStatus,
    ManifestError,
    Progress,
    Reason,
    parse_job,
)
from kubetune_operator import builders, cron, outputs, spec_checks
from kubetune_operator.builders import (
    ANNOTATION_FAILED_MESSAGE,
    ANNOTATION_FAILED_REASON,
    ANNOTATION_GENERATION,
    ANNOTATION_OUTPUT,
    ANNOTATION_RETRAIN_INDEX,
    ANNOTATION_RETRAIN_VALUE,
    ANNOTATION_SPEC_HASH,
    ANNOTATION_TRIGGER,
    LABEL_JOB,
    LABEL_RUN,
    LABEL_STAGE,
    RunRef,
)
from kubetune_operator.config import OperatorConfig
from kubetune_operator.fit import NodeCache
from kubetune_operator.kube import (
    ApiError,
    Conflict,
    KubeClient,
    Obj,
    all_ftjs_path,
    core_path,
    ftj_path,
    jobs_path,
    path_for,
)
from kubetune_operator.observe import (
    FAILED,
    SUCCEEDED,
    SUSPENDED,
    StageObservation,
    is_queued_by_kueue,
    observe_stage,
    unschedulable_condition,
)
from kubetune_operator.result_reader import ResultReader, SourceNotPollable
from kubetune_operator.status import (
    Event,
    RunView,
    checkpoints_from,
    compute_status,
    get_condition,
    parse_status,
    run_finished,
    status_patch,
    status_to_wire,
)
from kubetune_operator.triggers import (
    ANNOTATION_RETRAIN,
    REASON_ARMED,
    REASON_INVALID_SPEC,
    REASON_NO_LISTING,
    REASON_NOT_POLLABLE,
    REASON_SOURCE_UNREADABLE,
    REASON_SUSPENDED,
    Listing,
    Trigger,
    format_time,
    listing_changes,
    normalize_listing,
    parse_time,
    recorded_listing,
)

log = logging.getLogger("kubetune.operator")

RESULT_MODELS: dict[str, type[PrepareResult | TrainResult | EvaluateResult]] = {
    Stage.PREPARE.value: PrepareResult,
    Stage.TRAIN.value: TrainResult,
    Stage.EVALUATE.value: EvaluateResult,
}
RETRY_SOON = 2.0  # seconds: waiting for a deleted child to disappear


class WaitError(RuntimeError):
    """Not an error of ours: something in the cluster must happen first; retry after ``delay``."""

    def __init__(self, message: str, delay: float = RETRY_SOON) -> None:
        super().__init__(message)
        self.delay = delay


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run_order(cm: Obj) -> tuple[int, int] | None:
    """(generation, retrain) of a run ConfigMap, the order of runs; None if it has none."""
    annotations = cm["metadata"].get("annotations") or {}
    try:
        generation = int(annotations.get(ANNOTATION_GENERATION, ""))
    except ValueError:
        return None
    retrain = 0
    index = annotations.get(ANNOTATION_RETRAIN_INDEX)
    if index is not None and index.isdigit():
        retrain = int(index)
    else:  # an older operator's ConfigMap: the run id says it (g<generation>)
        parsed = parse_run_id((cm["metadata"].get("labels") or {}).get(LABEL_RUN, ""))
        retrain = parsed[1] if parsed is not None else 0
    return generation, retrain


def _owned_by(obj: Obj, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


@dataclass
class _DatasetPoll:
    """The last listing of a job's dataset source (spec.retrain.onDatasetChange)."""

    at: datetime  # when it was attempted
    run: str  # the run whose prepare it was compared with
    problem: tuple[str, str] | None  # (reason, message) when it could not be compared


@dataclass
class _Children:
    jobs: list[Obj] = field(default_factory=list)
    config_maps: list[Obj] = field(default_factory=list)
    services: list[Obj] = field(default_factory=list)

    def all(self) -> list[Obj]:
        return [*self.jobs, *self.config_maps, *self.services]


def _secrets_named(job: FineTuneJob) -> list[tuple[str, str, str]]:
    """(Secret name, the field naming it, the keys it must hold) for each Secret the spec uses."""
    named = []
    if job.spec.storage.credentials_secret:
        named.append(
            (
                job.spec.storage.credentials_secret,
                "spec.storage.credentialsSecret",
                S3_CREDENTIAL_KEYS_TEXT,
            )
        )
    for i, entry in enumerate(job.spec.evaluation.compare_with):
        if entry.api_key_secret:
            named_by = f"spec.evaluation.compareWith[{i}].apiKeySecret"
            named.append((entry.api_key_secret, named_by, "apiKey"))
    return named


def _refused_child(exc: ApiError, stage: str) -> tuple[str, str] | None:
    """(InvalidSpec, the API server's words) when it refused a child as invalid (400/422)."""
    if exc.status not in (400, 422):
        return None
    message = str(exc.body.get("message") or exc)
    return Reason.INVALID_SPEC.value, (
        f"the API server refused the {stage} stage's objects built from this spec: {message}; "
        "fix the spec (the fields named above) and apply it again"
    )


def parse_result(stage: str, data: dict[str, Any] | None, run: RunIdentity) -> Any:
    """The stage's result in ``data`` if it is one and was written by ``run``; else None.

    A result of another run (an earlier FineTuneJob of the same name, another job on the
    same prefix, another spec) or without a run (an older trainer) does not count.
    """
    if not data or "error" in data:
        return None
    try:
        result = RESULT_MODELS[stage].model_validate(data)
    except ValueError:
        return None
    if result.run != run:
        theirs = result.run.to_wire() if result.run is not None else None
        log.info("ignoring a %s result of another run (%s; expected %s)", stage, theirs, run)
        return None
    return result


def _result_key(job: FineTuneJob, run: RunRef, stage: str) -> tuple[str, ...]:
    """Cache key of a run's stage result: the FineTuneJob by name *and* uid, the run."""
    ns, name = job.metadata.namespace or "", job.metadata.name
    return (ns, name, run.job_uid, run.id, run.spec_hash, stage)


def parse_progress(data: dict[str, Any] | None) -> Progress | None:
    """Progress from the trainer's progress.json; unknown fields are ignored."""
    if not data:
        return None
    known = {f.alias or n for n, f in Progress.model_fields.items()} | set(Progress.model_fields)
    try:
        progress = Progress.model_validate({k: v for k, v in data.items() if k in known})
    except ValueError:
        return None
    if progress.total_steps > 0 and not progress.percent:
        progress.percent = min(100, int(100 * progress.step / progress.total_steps))
    return progress


class Reconciler:
    """Reconciles FineTuneJobs one at a time (the work queue guarantees one worker per job)."""

    def __init__(
        self,
        kube: KubeClient,
        cfg: OperatorConfig,
        metrics: Any = None,
        reader: ResultReader | None = None,
    ) -> None:
        self.kube = kube
        self.cfg = cfg
        self.metrics = metrics
        self.reader = reader or ResultReader(
            kube, cfg.storage_endpoints, local_files=cfg.file_outputs
        )
        self._results: dict[tuple[str, ...], Any] = {}  # (ns, name, uid, run, hash, stage)
        self._list_all_namespaces = True  # False after a 403 (a Role in one namespace)
        self._progress_at: dict[tuple[str, str, str], float] = {}
        # spec.retrain.onDatasetChange: the last poll of each job's source, and the source
        # listing each run's prepare recorded (read once from its dataset/prepare.json).
        self._dataset_polls: dict[tuple[str, str], _DatasetPoll] = {}
        self._listings: dict[tuple[str, ...], Listing] = {}
        self._instance = socket.gethostname()
        self._nodes = NodeCache(kube)  # listed only while a stage pod cannot be scheduled

    # ------------------------------------------------------------------ entry point

    def reconcile(self, namespace: str, name: str) -> float | None:
        """One pass; returns seconds until the next pass is needed (None: wait for events)."""
        body = self.kube.get(ftj_path(namespace, name))
        if body is None:
            self.forget(namespace, name)
            return None
        if body["metadata"].get("deletionTimestamp"):
            return None  # garbage collection removes the children (ownerReferences)
        try:
            job = parse_job(
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "metadata": body["metadata"],
                    "spec": body.get("spec") or {},
                },
                f"FineTuneJob {namespace}/{name}",
            )
        except ManifestError as exc:
            # The API server accepted it, so its schema and ours disagree: nothing can run.
            # The earlier run's children stay (a fixed spec may continue that run).
            generation = int(body["metadata"].get("generation") or 1)
            problems = "; ".join(exc.problems)
            self._write_status(body, RunView.for_invalid_spec(generation, problems))
            return None
        try:
            return self._reconcile(job, body)
        except WaitError as exc:
            log.info("%s/%s: %s", namespace, name, exc)
            return exc.delay

    def forget(self, namespace: str, name: str) -> None:
        """Drop what this process remembers about a deleted FineTuneJob."""
        for key in [k for k in self._results if k[:2] == (namespace, name)]:
            del self._results[key]
        for pkey in [k for k in self._progress_at if k[:2] == (namespace, name)]:
            del self._progress_at[pkey]
        self._dataset_polls.pop((namespace, name), None)
        for lkey in [k for k in self._listings if k[:2] == (namespace, name)]:
            del self._listings[lkey]
        if self.metrics is not None:
            self.metrics.forget(namespace, name)

    # ------------------------------------------------------------------ the pass

    def _reconcile(
        self, job: FineTuneJob, body: Obj, trigger_detail: str | None = None
    ) -> float | None:
        """One pass; ``trigger_detail`` is set in the pass right after a trigger started a run."""
        ns, name, uid = (
            job.metadata.namespace or "default",
            job.metadata.name,
            body["metadata"]["uid"],
        )
        generation = int(body["metadata"].get("generation") or 1)
        children = self._children(ns, name, uid)
        run = self._current_run(job, generation, children)
        self._delete_other_runs(children, run)
        current = [c for c in children.all() if c["metadata"]["labels"].get(LABEL_RUN) == run.id]
        jobs = {
            c["metadata"]["labels"].get(LABEL_STAGE): c
            for c in current
            if c["kind"] == "Job" and not c["metadata"].get("deletionTimestamp")
        }
        pods = self.kube.list(core_path(ns, "pods"), f"{LABEL_JOB}={name},{LABEL_RUN}={run.id}")
        now = time.time()
        view = RunView(run=run, generation=generation, suspended=job.spec.suspend)
        view.trigger_detail = trigger_detail or ""
        old = parse_status(body.get("status"))
        cached = old if old.run == run.id else FineTuneJobStatus()
        requeue: float | None = None
        posted: list[Event] = []

        for stage in JOB_STAGES:
            view.job_names[stage] = builders.job_name(name, run.id, stage)
            child = jobs.get(stage)
            stage_pods = [p for p in pods if p["metadata"]["labels"].get(LABEL_STAGE) == stage]
            # Nodes tell "waiting for room" from "no node could ever run it".
            unschedulable = any(unschedulable_condition(p) for p in stage_pods)
            obs = observe_stage(
                child,
                stage_pods,
                now=now,
                unschedulable_timeout=self.cfg.unschedulable_timeout,
                nodes=self._nodes.nodes() if unschedulable else None,
            )
            if child is None:
                obs = self._finished_without_job(job, run, stage, cached) or obs
            if obs.state == SUCCEEDED:
                self._record_result(job, run, stage, obs, view)
                view.stages[stage] = obs
                continue
            if obs.state == FAILED:
                if obs.terminal_by_operator and child is not None:
                    self._give_up(child, obs)
                view.stages[stage] = obs
                break
            if job.spec.suspend:
                if child is not None and is_queued_by_kueue(child):
                    # Kueue would admit a Job suspended behind its back again: the Job goes
                    # (its pods checkpoint on SIGTERM) and a new one queues on resume.
                    self.kube.delete(jobs_path(ns, child["metadata"]["name"]))
                elif child is not None and not child["spec"].get("suspend"):
                    self._patch_job(child, {"spec": {"suspend": True}})
                view.stages[stage] = StageObservation(
                    state=SUSPENDED, reason=Reason.SUSPENDED.value, start_time=obs.start_time
                )
                requeue = self.cfg.resync_interval
                break
            if child is None:
                invalid = self._check_spec(job, body)
                if invalid is not None:
                    view.invalid = invalid
                    requeue = self.cfg.resync_interval  # the user may create the Secret
                    break
                try:
                    self._create_stage(job, run, stage)
                except ApiError as exc:
                    refused = _refused_child(exc, stage)
                    if refused is None:
                        raise
                    # Retrying the same spec would be refused again: stall until it changes.
                    view.invalid = refused
                    break
                posted.append(
                    Event(
                        "Normal",
                        Reason.CREATED.value,
                        f"created Job {view.job_names[stage]} ({stage})",
                    )
                )
                queue = job.spec.queue_name
                obs = StageObservation(
                    state="Pending",
                    reason=Reason.QUEUED.value if queue else Reason.STAGE_PENDING.value,
                    message=f"Job created in Kueue LocalQueue {queue!r}"
                    if queue
                    else "Job created",
                    start_time=utcnow(),
                )
            elif child["spec"].get("suspend") and not is_queued_by_kueue(child):
                self._patch_job(child, {"spec": {"suspend": False}})  # unsuspended
            if stage == Stage.TRAIN:
                self._progress(job, run, view)
            view.stages[stage] = obs
            requeue = (
                self.cfg.progress_interval if stage == Stage.TRAIN else self.cfg.resync_interval
            )
            if obs.recheck_after is not None:  # a pod no node can hold: its time runs out
                requeue = min(requeue, max(1.0, obs.recheck_after + 1.0))
            break

        started, detail, delay = self._retrain(job, body, run, view, old)
        if started is not None and trigger_detail is None:
            # Persist the new run first (its ConfigMap), then take its first step at once.
            self._ensure(builders.build_job_config_map(job, started))
            log.info("%s/%s: run %s starts (%s: %s)", ns, name, started.id, started.trigger, detail)
            return self._reconcile(job, body, trigger_detail=detail)
        if delay is not None:
            requeue = delay if requeue is None else min(requeue, delay)
        self._write_status(body, view, posted)
        return requeue

    # ------------------------------------------------------------------ runs and children

    def _children(self, ns: str, name: str, uid: str) -> _Children:
        selector = f"{LABEL_JOB}={name}"
        return _Children(
            jobs=[j for j in self.kube.list(jobs_path(ns), selector) if _owned_by(j, uid)],
            config_maps=[
                c
                for c in self.kube.list(core_path(ns, "configmaps"), selector)
                if _owned_by(c, uid)
            ],
            services=[
                s for s in self.kube.list(core_path(ns, "services"), selector) if _owned_by(s, uid)
            ],
        )

    def _current_run(self, job: FineTuneJob, generation: int, children: _Children) -> RunRef:
        """The run whose ConfigMap is newest by (generation, retrain), if its spec hash is
        the spec's; else a new run ``g<generation>`` (trigger SpecChange)."""
        want = builders.spec_hash(job)
        best: tuple[tuple[int, int], Obj] | None = None
        for cm in children.config_maps:
            if cm["metadata"].get("deletionTimestamp"):
                continue
            order = _run_order(cm)
            if order is not None and (best is None or order > best[0]):
                best = (order, cm)
        if best is not None:
            (gen, retrain), cm = best
            annotations = cm["metadata"].get("annotations") or {}
            if annotations.get(ANNOTATION_SPEC_HASH) == want:
                uid = job.metadata.uid or ""
                run_id = cm["metadata"]["labels"][LABEL_RUN]
                return RunRef(
                    id=run_id,
                    generation=gen,
                    output=annotations.get(ANNOTATION_OUTPUT)
                    or run_prefix(job.spec.storage.output, run_id, uid),
                    spec_hash=want,
                    job_uid=uid,
                    retrain=retrain,
                    trigger=annotations.get(ANNOTATION_TRIGGER) or Trigger.SPEC_CHANGE.value,
                    retrain_value=annotations.get(ANNOTATION_RETRAIN_VALUE, ""),
                )
        return RunRef.for_generation(job, generation)

    def _delete_other_runs(self, children: _Children, run: RunRef) -> None:
        for child in children.all():
            meta = child["metadata"]
            if meta["labels"].get(LABEL_RUN) != run.id and not meta.get("deletionTimestamp"):
                log.info(
                    "deleting %s %s/%s of an earlier run",
                    child["kind"],
                    meta["namespace"],
                    meta["name"],
                )
                self.kube.delete(f"{path_for(child)}/{meta['name']}")

    def _ensure(self, obj: Obj) -> Obj:
        """Create ``obj``; if it exists, check it is ours and of the same run (never a twin)."""
        try:
            return self.kube.create(path_for(obj), obj)
        except Conflict:
            meta = obj["metadata"]
            existing = self.kube.get(f"{path_for(obj)}/{meta['name']}")
            if existing is None:
                raise WaitError(f"{obj['kind']} {meta['name']} is being replaced") from None
            emeta = existing["metadata"]
            if emeta.get("deletionTimestamp"):
                raise WaitError(
                    f"{obj['kind']} {meta['name']} of an earlier run is being deleted"
                ) from None
            same_owner = _owned_by(existing, meta["ownerReferences"][0]["uid"])
            same_run = (emeta.get("labels") or {}).get(LABEL_RUN) == meta["labels"][LABEL_RUN]
            same_spec = (emeta.get("annotations") or {}).get(ANNOTATION_SPEC_HASH) == meta[
                "annotations"
            ][ANNOTATION_SPEC_HASH]
            if same_owner and same_run and same_spec:
                return existing
            if same_owner:
                # Same name, other spec: the run id was reused (ConfigMap deleted by hand).
                self.kube.delete(f"{path_for(obj)}/{meta['name']}")
                raise WaitError(f"replacing {obj['kind']} {meta['name']} of another spec") from None
            raise RuntimeError(
                f"{obj['kind']} {meta['namespace']}/{meta['name']} exists and is not owned by this "
                "FineTuneJob; delete or rename it"
            ) from None

    def _create_stage(self, job: FineTuneJob, run: RunRef, stage: str) -> None:
        self._ensure(builders.build_job_config_map(job, run))
        if stage == Stage.TRAIN and builders.needs_service(job):
            self._ensure(builders.build_train_service(job, run))
        self._ensure(builders.build_stage_job(job, run, stage, self.cfg))
        log.info(
            "%s/%s: created Job %s",
            job.metadata.namespace,
            job.metadata.name,
            builders.job_name(job.metadata.name, run.id, stage),
        )

    def _patch_job(self, child: Obj, patch: Obj) -> None:
        meta = child["metadata"]
        self.kube.merge_patch(jobs_path(meta["namespace"], meta["name"]), patch)

    def _give_up(self, child: Obj, obs: StageObservation) -> None:
        """Record on the Job why the operator stopped it, then suspend it (its pods go away)."""
        if (child["metadata"].get("annotations") or {}).get(ANNOTATION_FAILED_REASON):
            return
        self._patch_job(
            child,
            {
                "metadata": {
                    "annotations": {
                        ANNOTATION_FAILED_REASON: obs.reason,
                        ANNOTATION_FAILED_MESSAGE: obs.message[:1000],
                    }
                },
                "spec": {"suspend": True},
            },
        )

    def _check_spec(self, job: FineTuneJob, body: Obj) -> tuple[str, str] | None:
        """Problems the CRD cannot see; checked before creating a stage Job."""
        cluster_problems = spec_checks.cluster_spec_problems(
            job.spec, allow_file_output=self.cfg.file_outputs
        )
        if cluster_problems:
            return Reason.INVALID_SPEC.value, "; ".join(cluster_problems)
        mine = outputs.OutputClaim.of(body)
        if mine is not None:
            holder = outputs.output_holder(mine, self._finetunejobs(mine.namespace))
            if holder is not None:
                return Reason.OUTPUT_IN_USE.value, outputs.output_in_use_message(
                    job.spec.storage.output, holder
                )
        ns = job.metadata.namespace or "default"
        for secret, named_by, keys in _secrets_named(job):
            try:
                found = self.kube.get_metadata(core_path(ns, "secrets", secret))
            except ApiError as exc:
                if exc.status == 403:
                    return None  # not allowed to look: let the pod tell us
                raise
            if found is None:
                return Reason.INVALID_SPEC.value, (
                    f"Secret {ns}/{secret} named by {named_by} does not exist; "
                    f"create it with the key(s) {keys}"
                )
        return None

    def _finetunejobs(self, namespace: str) -> list[Obj]:
        """The FineTuneJobs whose outputs a new run must not overlap.

        Every FineTuneJob of the cluster when the operator may list them all; else (Roles in
        the watched namespaces only) those of the watched namespaces and ``namespace``.
        """
        if self._list_all_namespaces:
            try:
                return self.kube.list(all_ftjs_path())
            except ApiError as exc:
                if exc.status != 403:
                    raise
                self._list_all_namespaces = False
                log.warning(
                    "cannot list FineTuneJobs of every namespace (no cluster-wide list right); "
                    "checking storage.output against FineTuneJobs of the watched namespaces"
                )
        watched = dict.fromkeys([*self.cfg.namespaces, namespace])
        return [obj for ns in watched for obj in self.kube.list(ftj_path(ns))]

    # ------------------------------------------------------------------ retraining triggers

    def _retrain(
        self,
        job: FineTuneJob,
        body: Obj,
        run: RunRef,
        view: RunView,
        old: FineTuneJobStatus,
    ) -> tuple[RunRef | None, str, float | None]:
        """The retraining triggers: (the run to start, why, or None; seconds to the next check).

        Checked only when the current run has finished (Succeeded or Failed) and the job is
        not suspended. Fills ``view``'s Retrain condition, nextRunAt and datasetCheckedAt.
        """
        spec = job.spec.retrain
        schedule_text = spec.schedule if spec is not None else None
        on_dataset = spec is not None and spec.on_dataset_change
        wanted = (body["metadata"].get("annotations") or {}).get(ANNOTATION_RETRAIN, "")
        suspended = job.spec.suspend
        finished = run_finished(view) and not suspended
        now_text = utcnow()
        now = parse_time(now_text) or datetime.now(timezone.utc)
        due: tuple[Trigger, str] | None = None
        delay: float | None = None
        problems: list[tuple[str, str]] = []
        notes: list[str] = []

        # A new value asks for a run; removing the annotation does not.
        if finished and wanted and wanted != run.retrain_value:
            due = Trigger.MANUAL, f"annotation {ANNOTATION_RETRAIN} is now {wanted!r}"

        if schedule_text:
            try:
                schedule = cron.parse(schedule_text)
            except cron.CronError as exc:
                problems.append(
                    (
                        REASON_INVALID_SPEC,
                        f"spec.retrain.schedule: {exc}; no scheduled runs until it is fixed "
                        "(the current run and its results are not affected)",
                    )
                )
            else:
                if not suspended:
                    # The run's status.startTime; a run new in this pass starts now.
                    cached_start = old.start_time if old.run == run.id else None
                    started = parse_time(cached_start) or now
                    fire = schedule.next_after(started)
                    view.next_run_at = format_time(fire)
                    notes.append(f"next scheduled run at {view.next_run_at}")
                    if finished and due is None:
                        if now >= fire:
                            due = (
                                Trigger.SCHEDULE,
                                (f"schedule {schedule_text!r} was due at {view.next_run_at}"),
                            )
                        else:
                            delay = (fire - now).total_seconds()

        if on_dataset and spec is not None:
            view.dataset_checked_at = old.dataset_checked_at
            refused = self.reader.source_refusal(job)
            if refused is not None:
                problems.append((REASON_NOT_POLLABLE, refused))
            elif not suspended:
                interval = float(spec.poll_interval_seconds)
                notes.append(f"spec.dataset.source listed every {spec.poll_interval_seconds} s")
                if finished and due is None:
                    key = (job.metadata.namespace or "", job.metadata.name)
                    poll = self._dataset_polls.get(key)
                    elapsed = (now - poll.at).total_seconds() if poll is not None else None
                    if poll is None or poll.run != run.id or elapsed is None or elapsed >= interval:
                        changed, problem = self._dataset_changed(job, run, view)
                        poll = _DatasetPoll(at=now, run=run.id, problem=problem)
                        self._dataset_polls[key] = poll
                        if problem is None:
                            view.dataset_checked_at = now_text
                        if changed is not None:
                            due = Trigger.DATASET_CHANGED, changed
                        wait = interval
                    else:
                        wait = interval - (elapsed or 0.0)
                    if poll.problem is not None:
                        problems.append(poll.problem)
                    delay = wait if delay is None else min(delay, wait)

        if schedule_text or on_dataset:
            if problems:
                reasons = [reason for reason, _ in problems]
                view.retrain = False, reasons[0], "; ".join(message for _, message in problems)
            elif suspended:
                view.retrain = False, REASON_SUSPENDED, "spec.suspend stops the retraining triggers"
            elif finished:
                view.retrain = True, REASON_ARMED, "; ".join(notes) or "armed"
            else:
                view.retrain = (
                    True,
                    REASON_ARMED,
                    (f"checked once run {run.id} has finished" + "".join(f"; {n}" for n in notes)),
                )
        if delay is not None:
            delay = max(1.0, min(delay, self.cfg.resync_interval))
        if due is None:
            return None, "", delay
        trigger, detail = due
        return run.next_retrain(job, trigger.value), detail, None

    def _dataset_changed(
        self, job: FineTuneJob, run: RunRef, view: RunView
    ) -> tuple[str | None, tuple[str, str] | None]:
        """(what changed, or None; a problem, or None): the source now vs. the run's prepare."""
        source = job.spec.dataset.source
        key = _result_key(job, run, Stage.PREPARE.value)
        recorded = self._listings.get(key)
        if recorded is None and view.prepare is not None:
            recorded = recorded_listing(view.prepare.fingerprint_inputs)
        if recorded is None:  # termination messages leave the listing out: read prepare.json
            data = self.reader.read_json(job, run.output, RunLayout.RESULT_KEYS[Stage.PREPARE])
            prepare = parse_result(Stage.PREPARE.value, data, run.identity())
            recorded = recorded_listing(prepare.fingerprint_inputs if prepare else None)
        if recorded is None:
            return None, (
                REASON_NO_LISTING,
                f"run {run.id} has no listing of spec.dataset.source to compare with (its "
                "prepare did not finish, or its dataset/prepare.json cannot be read); "
                f"annotate the FineTuneJob with {ANNOTATION_RETRAIN} to start a run",
            )
        self._listings[key] = recorded
        try:
            current = normalize_listing(self.reader.source_versions(job))
        except SourceNotPollable as exc:
            return None, (REASON_NOT_POLLABLE, str(exc))
        except Exception as exc:  # storage is optional: say so, try again at the next poll
            text = str(exc).splitlines()[0][:300] if str(exc) else ""
            return None, (
                REASON_SOURCE_UNREADABLE,
                f"cannot list spec.dataset.source {source} ({type(exc).__name__}"
                f"{': ' + text if text else ''}); trying again at the next poll",
            )
        if not current:
            return None, (
                REASON_SOURCE_UNREADABLE,
                f"spec.dataset.source {source} lists no files; no run starts for an empty "
                "source (trying again at the next poll)",
            )
        if current == recorded:
            return None, None
        return (
            f"spec.dataset.source changed since run {run.id}'s prepare "
            f"({listing_changes(recorded, current)})"
        ), None

    # ------------------------------------------------------------------ results

    def _finished_without_job(
        self, job: FineTuneJob, run: RunRef, stage: str, cached: FineTuneJobStatus
    ) -> StageObservation | None:
        """A stage whose Job is gone (ttlSecondsAfterFinished): the status or storage knows."""
        entry = cached.stages.get(stage)
        if entry is not None and entry.state in (SUCCEEDED, FAILED):
            condition = get_condition(cached, STAGE_CONDITION[stage])
            return StageObservation(
                state=entry.state,
                reason=condition.reason if condition is not None else "",
                message=entry.message or "",
                start_time=entry.start_time,
                completion_time=entry.completion_time,
            )
        data = self.reader.read_json(job, run.output, RunLayout.RESULT_KEYS[stage])
        result = parse_result(stage, data, run.identity())
        if result is None:
            return None  # not done (or not this run's): the stage's Job is created
        self._results[_result_key(job, run, stage)] = result
        return StageObservation(
            state=SUCCEEDED, reason=Reason.STAGE_SUCCEEDED.value, message="result found in storage"
        )

    def _record_result(
        self, job: FineTuneJob, run: RunRef, stage: str, obs: StageObservation, view: RunView
    ) -> None:
        key = _result_key(job, run, stage)
        result = self._results.get(key)
        if result is None:
            identity = run.identity()
            result = parse_result(stage, obs.result, identity)
            if result is None or (stage == Stage.TRAIN and not obs.result):
                data = self.reader.read_json(job, run.output, RunLayout.RESULT_KEYS[stage])
                result = parse_result(stage, data, identity) or result
            if result is not None:
                self._results[key] = result
        if result is None:
            return
        if stage == Stage.PREPARE:
            view.prepare = result
        elif stage == Stage.TRAIN:
            view.train = result
        else:
            view.evaluate = result

    def _progress(self, job: FineTuneJob, run: RunRef, view: RunView) -> None:
        """The trainer's progress.json into ``view``: progress and the checkpoint list."""
        key = (job.metadata.namespace or "", job.metadata.name, run.id)
        last = self._progress_at.get(key)
        if last is not None and time.monotonic() - last < self.cfg.progress_interval:
            return  # keep the status' progress; bounded read rate
        self._progress_at[key] = time.monotonic()
        data = self.reader.read_json(job, run.output, RunLayout.PROGRESS)
        view.progress = parse_progress(data)
        view.checkpoints = checkpoints_from(data)

    # ------------------------------------------------------------------ status and events

    def _write_status(self, body: Obj, view: RunView, posted: list[Event] | None = None) -> None:
        """The one status writer, for runs and for specs that do not parse.

        Patches only what changed (nothing when the status is up to date), then posts
        ``posted`` (what this pass did) and the Events the status change deserves, and
        updates the metrics.
        """
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        raw = body.get("status") or {}
        new, events = compute_status(parse_status(raw), view, utcnow())
        wire = status_to_wire(new)
        patch = status_patch(raw, wire)
        if patch is not None:
            self.kube.merge_patch(ftj_path(ns, name) + "/status", {"status": patch})
            log.info("%s/%s: %s %s", ns, name, new.phase, new.message or "")
        for event in [*(posted or []), *events]:
            self._post_event(body, event)
        if self.metrics is not None:
            self.metrics.observe(ns, name, raw, wire)

    def _post_event(self, body: Obj, event: Event) -> None:
        meta = body["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        obj = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "source": {"component": builders.MANAGED_BY},
            "reportingComponent": builders.MANAGED_BY,
            "reportingInstance": self._instance,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
        }
        try:
            self.kube.create(core_path(meta["namespace"], "events"), obj)
        except ApiError as exc:  # an Event is best effort; the status has the same facts
            log.warning(
                "cannot post Event %s for %s/%s: %s",
                event.reason,
                meta["namespace"],
                meta["name"],
                exc,
            )
