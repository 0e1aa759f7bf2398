"""The stage registry: one name per stage, one entrypoint each, shared by every caller.

``kubetune run`` (local mode), ``kubetune <stage>`` (inside a pod) and the
benchmarks all call :func:`run_stage`, which imports the stage module lazily
so that nothing here pulls in torch until a stage really runs.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from kubetune.contract import (
    STAGE_ORDER,
    TERMINATION_MESSAGE_LIMIT,
    ExitCode,
    Stage,
    StageError,
    exit_code_for,
    failure_payload,
    write_termination_message,
)
from kubetune.layout import RunLayout
from kubetune.results import (
    EvaluateResult,
    PrepareResult,
    ReportResult,
    TrainResult,
)
from kubetune.schema import FineTuneJob
from kubetune.storage import storage_failure_reason
from kubetune_trainer.caches import check_caches_writable
from kubetune_trainer.context import StageContext, make_context
from kubetune_trainer.cpus import fit_threads

_MODULES = {stage.value: f"kubetune_trainer.{stage.value}" for stage in Stage}

StageResult = PrepareResult | TrainResult | EvaluateResult | ReportResult


def run_stage(name: str, ctx: StageContext) -> StageResult:
    """Run one stage in this process and return its result.

    A stage that fails on refused credentials or on storage unreachable for its whole
    retry budget raises :class:`StageError` with the reason storage decides
    (:func:`kubetune.storage.storage_failure_reason`), whatever the stage was reading
    when it happened.
    """
    if name not in _MODULES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_ORDER)}")
    # Before the stage imports torch: the pod's CPUs, not the node's cores, set its threads.
    fit_threads()
    module = importlib.import_module(_MODULES[name])
    try:
        result: StageResult = module.run(ctx)
    except Exception as exc:
        _track_failure(name, ctx, exc)
        reason = storage_failure_reason(exc)
        if reason is None or (isinstance(exc, StageError) and exc.reason == reason.value):
            raise
        raise StageError(str(exc), reason) from exc
    return _tracked(name, ctx, result)


def _tracks(ctx: StageContext) -> bool:
    """Whether this process records the stage in spec.tracking (once per stage: rank 0)."""
    return ctx.job.spec.tracking is not None and os.environ.get("RANK", "0") == "0"


def _tracked(name: str, ctx: StageContext, result: StageResult) -> StageResult:
    """The result with ``tracking`` filled in, written again where the stage wrote it.

    Tracking never fails a stage: ``tracking.error`` says what went wrong instead.
    """
    if not _tracks(ctx):
        return result
    from kubetune_trainer.tracking import track_stage

    status = track_stage(ctx.job, name, result, ctx.storage, ctx.run_identity)
    if status is None:
        return result
    result = result.model_copy(update={"tracking": status})
    key = RunLayout.RESULT_KEYS.get(name)
    if key is not None and not (name == Stage.EVALUATE and ctx.model_key != RunLayout.MODEL):
        ctx.storage.write_text(key, result.to_json())
    return result


def _track_failure(name: str, ctx: StageContext, exc: BaseException) -> None:
    if _tracks(ctx):
        from kubetune_trainer.tracking import track_failure

        track_failure(ctx.job, name, exc, ctx.storage, ctx.run_identity)


TERMINATION_CHECKPOINTS = 6  # checkpoint records in a train termination message at most


def termination_summary(result: StageResult) -> dict[str, Any]:
    """The compact form of a result for a pod's termination message (< 4 KiB)."""
    data = result.to_wire()
    # Resolved configs and fingerprint inputs (a source listing can be long) stay in
    # storage: the message must fit in 4 KiB.
    for key in ("config", "fingerprintInputs", "trainingInputs"):
        data.pop(key, None)
    # The checkpoint list (train.json has it whole): the best and the newest ones, as
    # many as fit, oldest first.
    records = data.get("checkpoints")
    if records:
        keep = _newest_and_best(records, TERMINATION_CHECKPOINTS)
        while True:
            data["checkpoints"] = keep
            text = json.dumps(data, separators=(",", ":"), default=str)
            if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT or not keep:
                break
            keep = _newest_and_best(keep, len(keep) - 1)
        if not keep:
            data.pop("checkpoints")
    return data


def _newest_and_best(records: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` records, in their order: the newest, and the best among them."""
    if limit <= 0:
        return []
    chosen = set(range(len(records))[-limit:])
    best = next((i for i, r in enumerate(records) if r.get("best")), None)
    if best is not None and best not in chosen:
        chosen.discard(min(chosen))
        chosen.add(best)
    return [records[i] for i in sorted(chosen)]


def run_as_pod(
    job: FineTuneJob,
    stage: str,
    *,
    output: str | None = None,
    scratch: Path | None = None,
    with_report: bool = False,
    checkpoint: str | None = None,
) -> int:
    """``kubetune <stage>``: run one stage (and the report after evaluate) as a pod does.

    Prints each result as JSON, writes the compact result or the failure to the
    termination log, and returns the exit code the operator's podFailurePolicy reads.
    ``checkpoint`` (evaluate only: a step or a checkpoint URI): score that training
    checkpoint, exported under ``exports/``, instead of ``model/``.
    """
    try:
        # Before the scratch directory is made: on a read-only root that is where it fails.
        check_caches_writable()
    except StageError as exc:
        return _stage_failed(stage, exc)
    with make_context(
        job, output=output, scratch=scratch, show_progress=sys.stderr.isatty()
    ) as ctx:
        return _run_in_context(ctx, stage, with_report, checkpoint)


def _run_in_context(
    ctx: StageContext, stage: str, with_report: bool, checkpoint: str | None = None
) -> int:
    names = [stage] + ([Stage.REPORT.value] if with_report else [])
    summary: dict[str, Any] = {}
    for name in names:
        try:
            if name == stage:
                ctx.check_output_writable()
                if checkpoint is not None:
                    from kubetune_trainer.export import use_checkpoint

                    use_checkpoint(ctx, checkpoint)
            result = run_stage(name, ctx)
        except Exception as exc:
            return _stage_failed(name, exc)
        summary = termination_summary(result) if name == stage else summary
        print(result.to_json())
    write_termination_message(summary)
    return ExitCode.OK


def _stage_failed(name: str, exc: BaseException) -> int:
    """Report a failed stage as a pod does (termination message, one line) and its exit code."""
    payload = failure_payload(name, exc)
    write_termination_message(payload)
    # The traceback helps a developer (-v); the one-line message is for users.
    logging.getLogger("kubetune").debug("%s failed", name, exc_info=exc)
    print(f"kubetune {name}: {payload['reason']}: {payload['error']}", file=sys.stderr)
    return exit_code_for(exc)


def run_export(
    job: FineTuneJob,
    checkpoint: str,
    to: str,
    *,
    output: str | None = None,
    scratch: Path | None = None,
) -> int:
    """``kubetune export``: write a training checkpoint as a save_pretrained model to ``to``."""
    from kubetune_trainer.export import export_checkpoint

    with make_context(job, output=output, scratch=scratch) as ctx:
        try:
            exported = export_checkpoint(ctx, checkpoint, ctx.open(to))
        except Exception as exc:
            reason = storage_failure_reason(exc)
            error = exc if reason is None else StageError(str(exc), reason)
            payload = failure_payload("export", error)
            logging.getLogger("kubetune").debug("export failed", exc_info=exc)
            print(f"kubetune export: {payload['reason']}: {payload['error']}", file=sys.stderr)
            return exit_code_for(error)
    print(
        json.dumps(
            {
                "step": exported.step,
                "checkpoint": exported.source,
                "model": exported.uri,
                "record": exported.record.to_wire(),
            },
            indent=2,
        )
    )
    return ExitCode.OK


def run_promote(job: FineTuneJob, *, output: str | None = None, force: bool = False) -> int:
    """``kubetune promote``: the run's model to spec.promotion.target if it is better."""
    from kubetune_trainer.promotion import promote_by_hand

    with make_context(job, output=output) as ctx:
        try:
            decision, record = promote_by_hand(ctx, force=force)
        except Exception as exc:
            return _command_failed("promote", exc)
    print(decision.message)
    if record is None:
        return ExitCode.NOT_RETRIABLE
    print(record.to_json())
    return ExitCode.OK


def run_rollback(target: str, *, job: FineTuneJob | None = None) -> int:
    """``kubetune rollback``: point the target's current.json back at the previous version."""
    from kubetune.storage import open_storage
    from kubetune_trainer.promotion import rollback

    try:
        storage = make_context(job).open(target) if job is not None else open_storage(target)
        record = rollback(storage)
    except Exception as exc:
        return _command_failed("rollback", exc)
    print(f"rolled back: {target} now serves {record.version} (was {record.rolled_back_from})")
    return ExitCode.OK


def _command_failed(command: str, exc: Exception) -> int:
    reason = storage_failure_reason(exc)
    error = exc if reason is None else StageError(str(exc), reason)
    payload = failure_payload(command, error)
    logging.getLogger("kubetune").debug("%s failed", command, exc_info=exc)
    print(f"kubetune {command}: {payload['reason']}: {payload['error']}", file=sys.stderr)
    return exit_code_for(error)


class Timer:
    """Wall-clock seconds of a block (for the summary table)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.start
