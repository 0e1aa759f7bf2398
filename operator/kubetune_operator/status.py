"""Pure status logic: from what the cluster says about a run to the FineTuneJob status.

    view = RunView(run=run, generation=7, suspended=False, stages={"prepare": obs, ...})
    new_status, events = compute_status(old_status_dict, view, now="2025-01-01T00:00:00Z")

The status follows the Kubernetes API conventions and kstatus:

* ``Reconciling=True`` while a run is working (Pending, Preparing, Training, Evaluating);
* ``Stalled=True`` when the run failed and retrying cannot help (typed reason, message);
* ``Ready=True`` only when the run Succeeded;
* ``DatasetReady``, ``Trained``, ``Evaluated``: one per stage.

``lastTransitionTime`` changes only when a condition's status changes. ``events`` are the
Kubernetes Events the change deserves (computed from the old and new status, so a
restarted operator that finds the status up to date posts nothing twice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune.contract import JOB_STAGES, STAGE_CONDITION, STAGE_PHASE, Stage
from kubetune.layout import RunLayout
from kubetune.results import EvaluateResult, PrepareResult, TrainResult
from kubetune.schema import (
    Artifacts,
    ConditionType,
    DatasetStats,
    Phase,
    Progress,
    Reason,
    Results,
    RunRecord,
)
from kubetune_operator.builders import RunRef
from kubetune_operator.observe import FAILED, RUNNING, SUCCEEDED, SUSPENDED, StageObservation

MAX_HISTORY = 5

WORKING = {Phase.PENDING, Phase.PREPARING, Phase.TRAINING, Phase.EVALUATING}

Status = dict[str, Any]


@dataclass
class Event:
    """A Kubernetes Event to post about the FineTuneJob."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class RunView:
    """Everything the reconciler learned about the current run."""

    run: RunRef
    generation: int  # metadata.generation of the FineTuneJob now
    suspended: bool = False
    stages: dict[str, StageObservation] = field(default_factory=dict)
    job_names: dict[str, str] = field(default_factory=dict)
    prepare: PrepareResult | None = None
    train: TrainResult | None = None
    evaluate: EvaluateResult | None = None
    progress: Progress | None = None
    invalid: tuple[str, str] | None = None  # (reason, message): the spec cannot work


# --------------------------------------------------------------------------- conditions


def set_condition(
    conditions: list[dict[str, Any]],
    ctype: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int,
) -> list[dict[str, Any]]:
    """Conditions with ``ctype`` set; lastTransitionTime kept unless the status flips."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == ctype), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value else now
    new = {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
    out = [c for c in conditions if c.get("type") != ctype]
    out.append(new)
    return out


def get_condition(status: Status, ctype: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), None)


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
        comparisons=list(evaluate.comparisons),
    )


def progress_from(train: TrainResult) -> Progress:
    return Progress(
        step=train.steps,
        total_steps=train.total_steps,
        percent=100,
        epoch=train.epochs,
        loss=train.final_loss,
        tokens_per_second=train.tokens_per_second,
        eta_seconds=0.0,
    )


def artifacts_for(view: RunView, old: dict[str, Any] | None) -> Artifacts:
    layout = RunLayout(view.run.output)
    arts = Artifacts.model_validate(old or {})
    if view.prepare is not None:
        arts.dataset = view.prepare.dataset_uri or layout.uri(RunLayout.DATASET)
    if view.train is not None:
        arts.model = view.train.model_uri
        arts.last_checkpoint = view.train.last_checkpoint
    if view.evaluate is not None:
        arts.report = layout.uri(RunLayout.REPORT_MD)
    return arts


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


def _history(old: Status, view: RunView, now: str) -> list[dict[str, Any]]:
    history = list(old.get("history") or [])
    old_run = old.get("run")
    if old_run and old_run != view.run.id:
        try:
            generation = int(str(old_run).lstrip("g"))
        except ValueError:
            generation = int(old.get("observedGeneration") or 0)
        record = RunRecord(
            run=old_run,
            generation=generation,
            phase=str(old.get("phase") or Phase.PENDING.value),
            output=old.get("output"),
            results=Results.model_validate(old["results"]) if old.get("results") else None,
            completion_time=old.get("completionTime") or now,
        )
        history = [record.to_wire()] + [h for h in history if h.get("run") != old_run]
    return history[:MAX_HISTORY]


def compute_status(old: Status | None, view: RunView, now: str) -> tuple[Status, list[Event]]:
    """The new status (wire form) and the Events the transition deserves."""
    old = dict(old or {})
    same_run = old.get("run") == view.run.id
    prev: Status = old if same_run else {}
    events: list[Event] = []
    if not same_run:
        events.append(
            Event(
                "Normal",
                Reason.NEW_GENERATION.value,
                f"run {view.run.id} started for generation {view.run.generation}; "
                f"output {view.run.output}",
            )
        )

    # Which stage are we at, and how is it doing?
    phase = Phase.SUCCEEDED
    reason, message = Reason.SUCCEEDED.value, ""
    stage_conditions: dict[str, tuple[bool, str, str]] = {}
    blocked_by = ""
    if view.invalid is not None:
        phase, (reason, message) = Phase.FAILED, view.invalid
    for stage in JOB_STAGES:
        obs = view.stages.get(stage)
        if view.invalid is not None and obs is None:
            stage_conditions[stage] = (False, reason, "the spec cannot work: " + message)
            continue
        if blocked_by:
            stage_conditions[stage] = (False, Reason.WAITING.value, f"waiting for {blocked_by}")
            continue
        if obs is None or obs.state != SUCCEEDED:
            blocked_by = stage
        if obs is None:
            phase, reason, message = Phase.PENDING, Reason.WAITING.value, f"{stage} not started"
            stage_conditions[stage] = (False, reason, message)
        elif obs.state == SUCCEEDED:
            stage_conditions[stage] = (
                True,
                Reason.STAGE_SUCCEEDED.value,
                _stage_success_message(stage, view),
            )
        elif obs.state == FAILED:
            phase, reason = Phase.FAILED, obs.reason or Reason.STAGE_FAILED.value
            message = f"{stage} failed: {obs.message}"
            stage_conditions[stage] = (False, reason, message)
        elif view.suspended or obs.state == SUSPENDED:
            phase, reason = Phase.SUSPENDED, Reason.SUSPENDED.value
            message = f"suspended during {stage}; set spec.suspend to false to resume"
            stage_conditions[stage] = (False, reason, message)
        else:
            # Pending until the first pod runs; after that the phase names the stage.
            started = obs.state == RUNNING or stage != Stage.PREPARE
            phase = STAGE_PHASE[stage] if started else Phase.PENDING
            reason = obs.reason or Reason.STAGE_PENDING.value
            message = f"{stage}: {obs.message}" if obs.message else stage
            stage_conditions[stage] = (False, reason, message)
    if phase == Phase.SUCCEEDED and view.evaluate is not None:
        message = _results_summary(results_from(view.evaluate))

    new: Status = {
        "phase": phase.value,
        "observedGeneration": view.generation,
        "run": view.run.id,
        "output": view.run.output,
        "message": message,
    }

    conditions: list[dict[str, Any]] = list(prev.get("conditions") or [])
    gen = view.generation
    conditions = set_condition(
        conditions,
        ConditionType.READY.value,
        phase == Phase.SUCCEEDED,
        Reason.SUCCEEDED.value if phase == Phase.SUCCEEDED else reason,
        message or "the run succeeded",
        now,
        gen,
    )
    conditions = set_condition(
        conditions,
        ConditionType.RECONCILING.value,
        phase in WORKING,
        reason
        if phase in WORKING
        else (Reason.SUCCEEDED.value if phase == Phase.SUCCEEDED else reason),
        message if phase in WORKING else "",
        now,
        gen,
    )
    conditions = set_condition(
        conditions,
        ConditionType.STALLED.value,
        phase == Phase.FAILED,
        reason
        if phase == Phase.FAILED
        else (Reason.SUCCEEDED.value if phase == Phase.SUCCEEDED else reason),
        message if phase == Phase.FAILED else "",
        now,
        gen,
    )
    for stage in JOB_STAGES:
        ok, why, msg = stage_conditions[stage]
        conditions = set_condition(conditions, STAGE_CONDITION[stage].value, ok, why, msg, now, gen)
    order = [c.value for c in ConditionType]
    new["conditions"] = sorted(
        conditions, key=lambda c: order.index(c["type"]) if c["type"] in order else 99
    )

    stages: dict[str, Any] = {}
    for stage in JOB_STAGES:
        obs = view.stages.get(stage)
        old_stage = (prev.get("stages") or {}).get(stage) or {}
        if obs is None:
            continue
        entry = {
            "job": view.job_names.get(stage) or old_stage.get("job"),
            "state": obs.state,
            "startTime": obs.start_time or old_stage.get("startTime"),
            "completionTime": obs.completion_time or old_stage.get("completionTime"),
            "message": obs.message or None,
        }
        stages[stage] = {k: v for k, v in entry.items() if v is not None}
    new["stages"] = stages

    if view.prepare is not None:
        new["dataset"] = DatasetStats.model_validate(view.prepare.stats.model_dump()).to_wire()
    elif prev.get("dataset"):
        new["dataset"] = prev["dataset"]
    if view.train is not None:
        new["progress"] = progress_from(view.train).to_wire()
    elif view.progress is not None:
        new["progress"] = view.progress.to_wire()
    elif prev.get("progress"):
        new["progress"] = prev["progress"]
    if view.evaluate is not None:
        new["results"] = results_from(view.evaluate).to_wire()
    elif prev.get("results"):
        new["results"] = prev["results"]
    arts = artifacts_for(view, prev.get("artifacts")).to_wire()
    if arts:
        new["artifacts"] = arts

    new["startTime"] = prev.get("startTime") or now
    if phase in (Phase.SUCCEEDED, Phase.FAILED):
        done = (view.stages.get(Stage.EVALUATE.value) or StageObservation(state="")).completion_time
        new["completionTime"] = prev.get("completionTime") or (
            done if phase == Phase.SUCCEEDED and done else now
        )
    history = _history(old, view, now)
    if history:
        new["history"] = history

    # Events for what changed.
    old_phase = prev.get("phase")
    for stage in JOB_STAGES:
        ok = stage_conditions[stage][0]
        was = get_condition(prev, STAGE_CONDITION[stage].value)
        if ok and not (was and was.get("status") == "True"):
            events.append(
                Event(
                    "Normal", Reason.STAGE_SUCCEEDED.value, f"{stage}: {stage_conditions[stage][2]}"
                )
            )
    if phase.value != old_phase:
        if phase == Phase.FAILED:
            events.append(Event("Warning", reason, message))
        elif phase == Phase.SUCCEEDED:
            events.append(
                Event("Normal", Reason.SUCCEEDED.value, f"run {view.run.id} succeeded: {message}")
            )
        elif phase == Phase.SUSPENDED:
            events.append(Event("Normal", Reason.SUSPENDED.value, message))
        elif phase in (Phase.PREPARING, Phase.TRAINING, Phase.EVALUATING):
            events.append(Event("Normal", Reason.STAGE_RUNNING.value, message))
    return new, events


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) turning ``old`` into ``new``; ``{}`` when equal.

    Merge patches merge nested objects, so every key that ``new`` drops, at any depth,
    must be sent as null: otherwise a new run would inherit the old run's
    ``stages.train`` or ``artifacts.model``.
    """
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif key not in old or before != value:
            patch[key] = value
    return patch


def status_patch(old: Status | None, new: Status) -> Status | None:
    """The merge patch turning status ``old`` into ``new`` (None when nothing changed)."""
    return merge_patch(old or {}, new) or None


def summary_line(status: Status) -> str:
    """One line for logs: phase, run and message (never anything secret: status has none)."""
    return f"{status.get('phase')} run={status.get('run')} {status.get('message', '')}".strip()
