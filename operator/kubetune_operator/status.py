"""Pure status logic: from what the cluster says about a run to the FineTuneJob status.

    old = parse_status(body.get("status"))        # the typed FineTuneJobStatus, read leniently
    view = RunView(run=run, generation=7, stages={"prepare": obs, ...})
    new, events = compute_status(old, view, now="2025-01-01T00:00:00Z")
    patch = status_patch(body.get("status"), status_to_wire(new))   # None: nothing to write

:func:`compute_status` is the one writer of the status: phase, conditions, what carries
over from the previous status (history, ``lastTransitionTime``, the last progress) and
the Events, for a run and for a spec that cannot be used at all
(:meth:`RunView.for_invalid_spec`). The status is a
:class:`~kubetune.schema.FineTuneJobStatus`, the model the CRD is generated from;
:func:`status_to_wire` gives its API form (camelCase, no nulls).

The status follows the Kubernetes API conventions and kstatus:

* ``Reconciling=True`` while a run is working (Pending, Preparing, Training, Evaluating);
* ``Stalled=True`` when the run failed and retrying cannot help (typed reason, message);
* ``Ready=True`` only when the run Succeeded;
* ``DatasetReady``, ``Trained``, ``Evaluated``: one per stage;
* ``Retrain`` (with ``spec.retrain``): True while its triggers can work, False with a
  reason when they cannot (a schedule that does not parse, a source the operator cannot
  list, ``spec.suspend``). It never changes the finished run's phase or results.

``lastTransitionTime`` changes only when a condition's status changes (conditions start
afresh with each run). ``events`` are the Kubernetes Events the change deserves
(computed from the old and new status, so a restarted operator that finds the status up
to date posts nothing twice).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetune.contract import JOB_STAGES, STAGE_CONDITION, STAGE_PHASE, Stage
from kubetune.layout import RunLayout, parse_run_id
from kubetune.results import EvaluateResult, PrepareResult, RetentionResult, TrainResult
from kubetune.schema import (
    Artifacts,
    CheckpointRecord,
    Condition,
    ConditionType,
    DatasetStats,
    FineTuneJobStatus,
    Phase,
    Progress,
    Reason,
    Results,
    RunRecord,
    StageStatus,
    TrackingStatus,
)
from kubetune_operator.builders import RunRef
from kubetune_operator.observe import (
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    StageObservation,
)
from kubetune_operator.triggers import (
    REASON_INVALID_SPEC,
    REASON_SUSPENDED,
    RETRAIN_CONDITION,
    Trigger,
)

log = logging.getLogger("kubetune.operator")

MAX_HISTORY = 5

WORKING = {Phase.PENDING, Phase.PREPARING, Phase.TRAINING, Phase.EVALUATING}
# A working run's phases in the order it moves through them; it never moves back.
WORKING_ORDER = [Phase.PENDING, Phase.PREPARING, Phase.TRAINING, Phase.EVALUATING]

CONDITION_ORDER = [c.value for c in ConditionType]

Wire = dict[str, Any]  # an object as the API server sends and takes it (camelCase JSON)


@dataclass
class Event:
    """A Kubernetes Event to post about the FineTuneJob."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class RunView:
    """Everything the reconciler learned about the current run.

    ``run`` is None only when the spec itself cannot be used (see :meth:`for_invalid_spec`):
    then there is no current run, and ``invalid`` says why.
    """

    run: RunRef | None
    generation: int  # metadata.generation of the FineTuneJob now
    suspended: bool = False
    stages: dict[str, StageObservation] = field(default_factory=dict)
    job_names: dict[str, str] = field(default_factory=dict)
    prepare: PrepareResult | None = None
    train: TrainResult | None = None
    evaluate: EvaluateResult | None = None
    progress: Progress | None = None
    # The trainer's checkpoint list from progress.json while train runs (checkpoints_from)
    checkpoints: list[CheckpointRecord] | None = None
    invalid: tuple[str, str] | None = None  # (reason, message): the spec cannot work
    # spec.retrain (kubetune_operator.triggers): the Retrain condition (status, reason,
    # message; None without spec.retrain), status.nextRunAt and status.datasetCheckedAt, and
    # what fired the current run when it started in this pass (for its Event).
    retrain: tuple[bool, str, str] | None = None
    next_run_at: str | None = None
    dataset_checked_at: str | None = None
    trigger_detail: str = ""

    @classmethod
    def for_invalid_spec(cls, generation: int, message: str) -> RunView:
        """A spec that does not parse: no run, ``Stalled`` with reason ``InvalidSpec``."""
        return cls(run=None, generation=generation, invalid=(Reason.INVALID_SPEC.value, message))


@dataclass(frozen=True)
class _Assessment:
    """Where the run stands: the phase, its reason and message, and each stage's condition."""

    phase: Phase
    reason: str
    message: str
    stages: dict[str, tuple[bool, str, str]]  # stage -> (status, reason, message)


# --------------------------------------------------------------------------- reading


def parse_status(raw: Mapping[str, Any] | None) -> FineTuneJobStatus:
    """The typed status from the API's ``status`` (or None).

    Lenient: a field that does not validate (edited by hand, or written by an older
    operator) is dropped with a log line instead of failing every pass; the next status
    patch then replaces it.
    """
    if not raw:
        return FineTuneJobStatus()
    try:
        return FineTuneJobStatus.model_validate(dict(raw))
    except ValidationError:
        kept: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                FineTuneJobStatus.model_validate({key: value})
            except ValidationError:
                log.warning("ignoring status.%s: it does not match the FineTuneJob schema", key)
            else:
                kept[key] = value
        return FineTuneJobStatus.model_validate(kept)


def get_condition(status: FineTuneJobStatus, ctype: ConditionType) -> Condition | None:
    return next((c for c in status.conditions if c.type == ctype.value), None)


# --------------------------------------------------------------------------- conditions


def set_condition(
    conditions: list[Condition],
    ctype: ConditionType | str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int,
) -> list[Condition]:
    """Conditions with ``ctype`` set; lastTransitionTime kept unless the status flips."""
    value = "True" if status else "False"
    name = ctype.value if isinstance(ctype, ConditionType) else ctype
    old = next((c for c in conditions if c.type == name), None)
    since = old.last_transition_time if old is not None and old.status == value else now
    new = Condition(
        type=name,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    return [*(c for c in conditions if c.type != name), new]


def _conditions(
    previous: list[Condition], assessment: _Assessment, now: str, generation: int
) -> list[Condition]:
    """kstatus' Ready/Reconciling/Stalled and one condition per stage, in a fixed order."""
    phase, reason, message = assessment.phase, assessment.reason, assessment.message
    succeeded = phase == Phase.SUCCEEDED
    working = phase in WORKING
    failed = phase == Phase.FAILED
    # A False Reconciling/Stalled says why it is not so: the run succeeded, or the reason.
    settled_reason = Reason.SUCCEEDED.value if succeeded else reason
    conditions = set_condition(
        previous,
        ConditionType.READY,
        succeeded,
        settled_reason,
        message or "the run succeeded",
        now,
        generation,
    )
    conditions = set_condition(
        conditions,
        ConditionType.RECONCILING,
        working,
        reason if working else settled_reason,
        message if working else "",
        now,
        generation,
    )
    conditions = set_condition(
        conditions,
        ConditionType.STALLED,
        failed,
        reason if failed else settled_reason,
        message if failed else "",
        now,
        generation,
    )
    for stage in JOB_STAGES:
        ok, why, msg = assessment.stages[stage]
        conditions = set_condition(
            conditions, STAGE_CONDITION[stage], ok, why, msg, now, generation
        )
    return sorted(
        conditions,
        key=lambda c: CONDITION_ORDER.index(c.type) if c.type in CONDITION_ORDER else 99,
    )


# --------------------------------------------------------------------------- results


def results_from(evaluate: EvaluateResult) -> Results:
    ft, base = evaluate.fine_tuned, evaluate.baseline

    def delta(a: float | None, b: float | None) -> float | None:
        return round(a - b, 6) if a is not None and b is not None else None

    return Results(
        perplexity=ft.perplexity,
        baseline_perplexity=base.perplexity if base else None,
        perplexity_delta=delta(ft.perplexity, base.perplexity if base else None),
        bleu=ft.bleu,
        baseline_bleu=base.bleu if base else None,
        bleu_delta=delta(ft.bleu, base.bleu if base else None),
        bleu_signature=evaluate.bleu_signature,
        chrf=ft.chrf,
        baseline_chrf=base.chrf if base else None,
        exact_match=ft.exact_match,
        baseline_exact_match=base.exact_match if base else None,
        chrf_signature=evaluate.chrf_signature,
        comparisons=list(evaluate.comparisons),
    )


def tracking_from(view: RunView) -> TrackingStatus | None:
    """The newest stage result's experiment-tracking status (spec.tracking)."""
    for result in (view.evaluate, view.train, view.prepare):
        if result is not None and result.tracking is not None:
            return result.tracking
    return None


def progress_from(train: TrainResult) -> Progress:
    validated = train.best_step is not None or train.validation_loss is not None
    return Progress(
        step=train.steps,
        total_steps=train.total_steps,
        percent=100,
        epoch=train.epochs,
        loss=train.final_loss,
        tokens_per_second=train.tokens_per_second,
        eta_seconds=0.0,
        validation_loss=train.validation_loss,
        validation_perplexity=_perplexity(train.validation_loss),
        best_validation_loss=train.best_validation_loss,
        best_step=train.best_step,
        stopped_early=train.stopped_early if validated or train.stopped_early else None,
        preemptions=train.preemptions or None,
        resumed_from_step=train.resumed_from_step,
    )


def _perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss) or loss > 700:
        return None
    return round(math.exp(loss), 4)


def checkpoints_from(data: Mapping[str, Any] | None) -> list[CheckpointRecord] | None:
    """The trainer's checkpoint list from progress.json (``checkpoints``); None if absent.

    Lenient like the rest of the status: a record that does not validate is dropped.
    """
    if not data or not isinstance(data.get("checkpoints"), list):
        return None
    records = []
    for raw in data["checkpoints"]:
        try:
            records.append(CheckpointRecord.model_validate(raw))
        except ValidationError:
            continue
    return records


def artifacts_for(run: RunRef, view: RunView, old: Artifacts | None) -> Artifacts | None:
    """The run's artifact URIs: the old ones, updated from the results found now."""
    layout = RunLayout(run.output)
    arts = old.model_copy() if old is not None else Artifacts()
    if view.prepare is not None:
        arts.dataset = view.prepare.dataset_uri or layout.uri(RunLayout.DATASET)
    if view.train is not None:
        arts.model = view.train.model_uri
        arts.last_checkpoint = view.train.last_checkpoint
    if view.evaluate is not None:
        arts.report = layout.uri(RunLayout.REPORT_MD)
    return arts if arts.to_wire() else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _results_summary(results: Results) -> str:
    parts = []
    if results.perplexity is not None:
        parts.append(
            f"perplexity {_fmt(results.perplexity)} (baseline {_fmt(results.baseline_perplexity)})"
        )
    if results.bleu is not None:
        parts.append(f"BLEU {_fmt(results.bleu)} (baseline {_fmt(results.baseline_bleu)})")
    if results.chrf is not None:
        parts.append(f"chrF {_fmt(results.chrf)} (baseline {_fmt(results.baseline_chrf)})")
    if results.exact_match is not None:
        parts.append(
            f"exact match {_fmt(results.exact_match)}% "
            f"(baseline {_fmt(results.baseline_exact_match)}"
            f"{'%' if results.baseline_exact_match is not None else ''})"
        )
    return ", ".join(parts) or "no metrics"


def _stage_success_message(stage: str, view: RunView) -> str:
    if stage == Stage.PREPARE and view.prepare is not None:
        s = view.prepare.stats
        return (
            f"{s.kept_lines} lines kept of {s.lines} ({s.train_lines} train / {s.test_lines} test, "
            f"{s.train_tokens} train tokens)"
        )
    if stage == Stage.TRAIN and view.train is not None:
        t = view.train
        resumed = f", resumed from step {t.resumed_from_step}" if t.resumed_from_step else ""
        return f"{t.steps}/{t.total_steps} steps, final loss {_fmt(t.final_loss)}{resumed}"
    if stage == Stage.EVALUATE and view.evaluate is not None:
        return _results_summary(results_from(view.evaluate))
    return f"{stage} completed"


# --------------------------------------------------------------------------- the status


def _assess(view: RunView) -> _Assessment:
    """The phase from the first stage that has not succeeded; later stages wait for it."""
    phase = Phase.SUCCEEDED
    reason, message = Reason.SUCCEEDED.value, ""
    stages: dict[str, tuple[bool, str, str]] = {}
    blocked_by = ""
    if view.invalid is not None:
        phase, (reason, message) = Phase.FAILED, view.invalid
    for stage in JOB_STAGES:
        obs = view.stages.get(stage)
        if view.invalid is not None and obs is None:
            stages[stage] = (False, reason, "the spec cannot work: " + message)
            continue
        if blocked_by:
            stages[stage] = (False, Reason.WAITING.value, f"waiting for {blocked_by}")
            continue
        if obs is None or obs.state != SUCCEEDED:
            blocked_by = stage
        if obs is None:
            phase, reason, message = Phase.PENDING, Reason.WAITING.value, f"{stage} not started"
            stages[stage] = (False, reason, message)
        elif obs.state == SUCCEEDED:
            stages[stage] = (
                True,
                Reason.STAGE_SUCCEEDED.value,
                _stage_success_message(stage, view),
            )
        elif obs.state == FAILED:
            phase, reason = Phase.FAILED, obs.reason or Reason.STAGE_FAILED.value
            message = f"{stage} failed: {obs.message}"
            stages[stage] = (False, reason, message)
        elif view.suspended or obs.state == SUSPENDED:
            phase, reason = Phase.SUSPENDED, Reason.SUSPENDED.value
            message = f"suspended during {stage}; set spec.suspend to false to resume"
            stages[stage] = (False, reason, message)
        else:
            # Pending until the first pod runs; after that the phase names the stage.
            started = obs.state == RUNNING or stage != Stage.PREPARE
            queued = obs.reason == Reason.QUEUED.value
            phase = STAGE_PHASE[stage] if started and not queued else Phase.PENDING
            reason = obs.reason or Reason.STAGE_PENDING.value
            message = f"{stage}: {obs.message}" if obs.message else stage
            progress = view.progress if stage == Stage.TRAIN else None
            if progress is not None and progress.preemptions:
                message += (
                    f" (preempted {progress.preemptions} time(s), resumed from the checkpoint "
                    f"of step {progress.resumed_from_step})"
                )
            stages[stage] = (False, reason, message)
    if phase == Phase.SUCCEEDED and view.evaluate is not None:
        message = _results_summary(results_from(view.evaluate))
    return _Assessment(phase=phase, reason=reason, message=message, stages=stages)


def run_finished(view: RunView) -> bool:
    """The run is over: Succeeded or Failed by its stages (not a spec it cannot start with)."""
    if view.run is None or view.invalid is not None:
        return False
    return _assess(view).phase in (Phase.SUCCEEDED, Phase.FAILED)


def _forward_only(assessment: _Assessment, prev: FineTuneJobStatus) -> _Assessment:
    """The phase of a working run never goes back (``prev`` is the same run's last status).

    A stage between two pods (a retried attempt, a finished pod whose Job is not yet marked
    Complete) looks Pending again; a user watching ``kubectl get ftj -w`` should not see
    Preparing -> Pending -> Training. The reason and message still say what happens now.
    """
    before = Phase(prev.phase) if prev.phase else None
    now = assessment.phase
    if (
        before in WORKING
        and now in WORKING
        and WORKING_ORDER.index(now) < WORKING_ORDER.index(before)
    ):
        return _Assessment(
            phase=before,
            reason=assessment.reason,
            message=assessment.message,
            stages=assessment.stages,
        )
    return assessment


def _stage_statuses(view: RunView, prev: FineTuneJobStatus) -> dict[str, StageStatus]:
    """Each observed stage's Job, state and times (times kept from before when unknown now)."""
    stages: dict[str, StageStatus] = {}
    for stage in JOB_STAGES:
        obs = view.stages.get(stage)
        if obs is None:
            continue
        old = prev.stages.get(stage) or StageStatus()
        stages[stage] = StageStatus(
            job=view.job_names.get(stage) or old.job,
            state=obs.state,
            start_time=obs.start_time or old.start_time,
            completion_time=obs.completion_time or old.completion_time,
            message=obs.message or None,
            failed_attempts=obs.failed_attempts or old.failed_attempts,
        )
    return stages


def _history(old: FineTuneJobStatus, run: RunRef | None, now: str) -> list[RunRecord]:
    """Earlier runs, newest first: the old status' run joins them when the run changes."""
    history = list(old.history)
    run_id = run.id if run is not None else None
    if old.run and old.run != run_id:
        parsed = parse_run_id(old.run)
        generation = parsed[0] if parsed is not None else old.observed_generation or 0
        record = RunRecord(
            run=old.run,
            generation=generation,
            phase=Phase(old.phase or Phase.PENDING).value,
            output=old.output,
            results=old.results,
            completion_time=old.completion_time or now,
            trigger=old.trigger,
            promoted=old.promotion.promoted if old.promotion is not None else None,
        )
        history = [record, *(h for h in history if h.run != old.run)]
    # The current run is never history (a spec that was invalid for a while, then restored).
    return [h for h in history if h.run != run_id][:MAX_HISTORY]


def _retry_events(prev: FineTuneJobStatus, view: RunView) -> list[Event]:
    """A Warning for each attempt a stage lost since ``prev``: retries are not free.

    A lost connection or a preempted node costs an attempt of ``spec.resources.backoffLimit``;
    users (and alerts on Warning Events) should know before the last one goes.
    """
    events = []
    for stage in JOB_STAGES:
        obs = view.stages.get(stage)
        if obs is None or not obs.failed_attempts or obs.state not in (PENDING, RUNNING):
            continue
        before = prev.stages.get(stage)
        if obs.failed_attempts <= ((before.failed_attempts or 0) if before else 0):
            continue
        reason, message = obs.last_failure or (Reason.STAGE_FAILED.value, "no error message")
        left = max(obs.attempts - obs.failed_attempts, 0)
        events.append(
            Event(
                "Warning",
                Reason.STAGE_RETRYING.value,
                f"{stage}: attempt {obs.failed_attempts} of {obs.attempts} failed ({reason}: "
                f"{message}); {left} left (spec.resources.backoffLimit)",
            )
        )
    return events


def _preemption_event(prev: FineTuneJobStatus, new: FineTuneJobStatus) -> list[Event]:
    """A Warning when training stopped on SIGTERM (with its checkpoint) since ``prev``.

    The count comes from the trainer's progress.json: the stopped pod itself is usually gone
    (a preemption, an eviction or Kueue deletes it), storage is what remembers.
    """
    before = (prev.progress.preemptions if prev.progress else None) or 0
    now = (new.progress.preemptions if new.progress else None) or 0
    if now <= before:
        return []
    step = new.progress.resumed_from_step if new.progress else None
    return [
        Event(
            "Warning",
            Reason.PREEMPTED.value,
            f"train: stopped on SIGTERM (preemption {now}) after saving a checkpoint"
            + (f"; resumed from step {step}" if step else "; the next pod resumes from it")
            + "; it costs no attempt of spec.resources.backoffLimit",
        )
    ]


def _events(prev: FineTuneJobStatus, assessment: _Assessment, run: RunRef | None) -> list[Event]:
    """Events for what changed since ``prev`` (the same run's previous status, or empty)."""
    events: list[Event] = []
    for stage in JOB_STAGES:
        ok, _, message = assessment.stages[stage]
        was = get_condition(prev, STAGE_CONDITION[stage])
        if ok and not (was is not None and was.status == "True"):
            events.append(Event("Normal", Reason.STAGE_SUCCEEDED.value, f"{stage}: {message}"))
    phase, reason, message = assessment.phase, assessment.reason, assessment.message
    if phase == Phase.FAILED:
        # A failure is news when it starts and when it changes (e.g. another bad spec).
        if phase != prev.phase or message != prev.message:
            events.append(Event("Warning", reason, message))
    elif phase != prev.phase:
        if phase == Phase.SUCCEEDED and run is not None:
            events.append(
                Event("Normal", Reason.SUCCEEDED.value, f"run {run.id} succeeded: {message}")
            )
        elif phase == Phase.SUSPENDED:
            events.append(Event("Normal", Reason.SUSPENDED.value, message))
        elif phase in (Phase.PREPARING, Phase.TRAINING, Phase.EVALUATING):
            events.append(Event("Normal", Reason.STAGE_RUNNING.value, message))
    return events


def compute_status(
    old: FineTuneJobStatus, view: RunView, now: str
) -> tuple[FineTuneJobStatus, list[Event]]:
    """The new status and the Events the transition from ``old`` deserves.

    What carries over from ``old``: for the same run, conditions (their
    ``lastTransitionTime`` when their status is unchanged), stage times, dataset
    statistics, progress, results, artifacts and ``startTime``; across runs, only the
    history, which the old run joins. Without a run (a spec that cannot be used) the
    run's fields are left out.
    """
    run = view.run
    run_id = run.id if run is not None else None
    same_run = old.run == run_id
    prev = old if same_run else FineTuneJobStatus()
    events: list[Event] = []
    if not same_run and run is not None:
        if run.trigger == Trigger.SPEC_CHANGE.value:
            events.append(
                Event(
                    "Normal",
                    Reason.NEW_GENERATION.value,
                    f"run {run.id} started for generation {run.generation}; output {run.output}",
                )
            )
        else:  # a retrain: the Event's reason is its trigger (Schedule, DatasetChanged, ...)
            why = f": {view.trigger_detail}" if view.trigger_detail else ""
            events.append(
                Event(
                    "Normal",
                    run.trigger,
                    f"run {run.id} started ({run.trigger}{why}); output {run.output}",
                )
            )
    assessment = _forward_only(_assess(view), prev)
    phase = assessment.phase
    new = FineTuneJobStatus(
        phase=phase,
        reason=assessment.reason,
        observed_generation=view.generation,
        run=run_id,
        trigger=run.trigger if run is not None else None,
        next_run_at=view.next_run_at if run is not None else None,
        dataset_checked_at=view.dataset_checked_at if run is not None else None,
        output=run.output if run is not None else None,
        message=assessment.message,
        conditions=_conditions(prev.conditions, assessment, now, view.generation),
        history=_history(old, run, now),
    )
    if run is not None:
        new.stages = _stage_statuses(view, prev)
        if view.prepare is not None:
            new.dataset = DatasetStats.model_validate(view.prepare.stats.model_dump())
        else:
            new.dataset = prev.dataset
        if view.train is not None:
            new.progress = progress_from(view.train)
            new.checkpoints = list(view.train.checkpoints)
        else:
            new.progress = view.progress or prev.progress
            new.checkpoints = (
                view.checkpoints if view.checkpoints is not None else list(prev.checkpoints)
            )
        new.results = results_from(view.evaluate) if view.evaluate is not None else prev.results
        new.promotion = view.evaluate.promotion if view.evaluate is not None else prev.promotion
        if new.promotion is not None:
            p = new.promotion
            new.conditions = set_condition(
                new.conditions,
                ConditionType.PROMOTED,
                p.promoted,
                p.reason,
                p.message or "",
                now,
                view.generation,
            )
        new.tracking = tracking_from(view) or prev.tracking
        if new.tracking is not None:
            t = new.tracking
            new.conditions = set_condition(
                new.conditions,
                ConditionType.TRACKED,
                t.error is None,
                Reason.TRACKED.value if t.error is None else Reason.TRACKING_FAILED.value,
                t.error or (f"recorded at {t.url}" if t.url else "recorded"),
                now,
                view.generation,
            )
        new.artifacts = artifacts_for(run, view, prev.artifacts)
        new.start_time = prev.start_time or now
        if phase in (Phase.SUCCEEDED, Phase.FAILED):
            done = view.stages.get(Stage.EVALUATE.value)
            finished = done.completion_time if done is not None else None
            new.completion_time = prev.completion_time or (
                finished if phase == Phase.SUCCEEDED and finished else now
            )
    new.conditions, retrain_events = _retrain_condition(old, new.conditions, view, now)
    events += retrain_events
    events += _retry_events(prev, view) if run is not None else []
    events += _preemption_event(prev, new) if run is not None else []
    events += _events(prev, assessment, run)
    if new.promotion is not None and prev.promotion is None:
        severity = "Warning" if new.promotion.reason == Reason.PROMOTION_FAILED.value else "Normal"
        events.append(Event(severity, new.promotion.reason, new.promotion.message or ""))
    retention = view.evaluate.retention if view.evaluate is not None else None
    if retention is not None:
        new.history = _mark_deleted(new.history, retention.deleted)
        if prev.results is None:
            events += _retention_events(retention)
    return new, events


def _mark_deleted(history: list[RunRecord], deleted: list[str]) -> list[RunRecord]:
    """``history`` with ``artifactsDeleted`` set on the runs spec.retrain.keepRuns removed."""
    return [
        h.model_copy(update={"artifacts_deleted": True}) if h.run in deleted else h for h in history
    ]


def _retention_events(retention: RetentionResult) -> list[Event]:
    events = []
    if retention.deleted:
        events.append(
            Event(
                "Normal",
                Reason.RUNS_DELETED.value,
                f"deleted the artifacts of run(s) {', '.join(retention.deleted)} "
                f"(spec.retrain.keepRuns: {retention.keep_runs}; kept {', '.join(retention.kept)})",
            )
        )
    if retention.error:
        events.append(
            Event("Warning", Reason.RETENTION_FAILED.value, f"retention: {retention.error}")
        )
    return events


def _retrain_condition(
    old: FineTuneJobStatus, conditions: list[Condition], view: RunView, now: str
) -> tuple[list[Condition], list[Event]]:
    """``conditions`` with the Retrain condition of ``view`` (or without it), and its Event.

    The condition is about the FineTuneJob, not the run: it carries over across runs (from
    ``old``), so a schedule that does not parse is one Warning Event, not one per run.
    """
    rest = [c for c in conditions if c.type != RETRAIN_CONDITION]
    if view.retrain is None or view.run is None:
        return rest, []
    ok, reason, message = view.retrain
    was = next((c for c in old.conditions if c.type == RETRAIN_CONDITION), None)
    merged = set_condition(
        [was] if was is not None else [],
        RETRAIN_CONDITION,
        ok,
        reason,
        message,
        now,
        view.generation,
    )
    events = []
    # News: the triggers stopped working, or why changed (or, for a bad spec, how).
    news = was is None or was.status != "False" or was.reason != reason
    news = news or (reason == REASON_INVALID_SPEC and was is not None and was.message != message)
    if not ok and reason != REASON_SUSPENDED and news:
        events.append(Event("Warning", reason, message))
    return [*rest, *merged], events


# --------------------------------------------------------------------------- writing


def status_to_wire(status: FineTuneJobStatus) -> Wire:
    """The status as the CRD stores it: camelCase, no nulls, no empty history."""
    wire = status.to_wire()
    if not wire.get("history"):
        wire.pop("history", None)
    return wire


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> Wire:
    """The JSON merge patch (RFC 7386) turning ``old`` into ``new``; ``{}`` when equal.

    Merge patches merge nested objects, so every key that ``new`` drops, at any depth,
    must be sent as null: otherwise a new run would inherit the old run's
    ``stages.train`` or ``artifacts.model``.
    """
    patch: Wire = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif key not in old or before != value:
            patch[key] = value
    return patch


def status_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> Wire | None:
    """The merge patch turning wire status ``old`` into ``new`` (None when nothing changed).

    ``old`` is the status as read from the API server (not a re-serialised model), so
    anything there that ``new`` lacks is removed.
    """
    return merge_patch(old or {}, new) or None
