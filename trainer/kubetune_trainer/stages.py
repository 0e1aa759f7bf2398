"""The stage registry: one name per stage, one entrypoint each, shared by every caller.

``kubetune run`` (local mode), ``kubetune <stage>`` (inside a pod) and the
benchmarks all call :func:`run_stage`, which imports the stage module lazily
so that nothing here pulls in torch until a stage really runs.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from kubetune.contract import (
    STAGE_ORDER,
    ExitCode,
    Stage,
    StageError,
    exit_code_for,
    failure_payload,
    write_termination_message,
)
from kubetune.results import (
    EvaluateResult,
    PrepareResult,
    ReportResult,
    TrainResult,
)
from kubetune.schema import FineTuneJob
from kubetune.storage import storage_failure_reason
from kubetune_trainer.context import StageContext, make_context

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
    module = importlib.import_module(_MODULES[name])
    try:
        result: StageResult = module.run(ctx)
    except Exception as exc:
        reason = storage_failure_reason(exc)
        if reason is None or (isinstance(exc, StageError) and exc.reason == reason.value):
            raise
        raise StageError(str(exc), reason) from exc
    return result


def termination_summary(result: StageResult) -> dict[str, Any]:
    """The compact form of a result for a pod's termination message (< 4 KiB)."""
    data = result.to_wire()
    # Resolved configs and fingerprint inputs (a source listing can be long) stay in
    # storage: the message must fit in 4 KiB.
    for key in ("config", "fingerprintInputs", "trainingInputs"):
        data.pop(key, None)
    return data


def run_as_pod(
    job: FineTuneJob,
    stage: str,
    *,
    output: str | None = None,
    scratch: Path | None = None,
    with_report: bool = False,
) -> int:
    """``kubetune <stage>``: run one stage (and the report after evaluate) as a pod does.

    Prints each result as JSON, writes the compact result or the failure to the
    termination log, and returns the exit code the operator's podFailurePolicy reads.
    """
    with make_context(
        job, output=output, scratch=scratch, show_progress=sys.stderr.isatty()
    ) as ctx:
        return _run_in_context(ctx, stage, with_report)


def _run_in_context(ctx: StageContext, stage: str, with_report: bool) -> int:
    names = [stage] + ([Stage.REPORT.value] if with_report else [])
    summary: dict[str, Any] = {}
    for name in names:
        try:
            if name == stage:
                ctx.check_output_writable()
            result = run_stage(name, ctx)
        except Exception as exc:
            payload = failure_payload(name, exc)
            write_termination_message(payload)
            # The traceback helps a developer (-v); the one-line message is for users.
            logging.getLogger("kubetune").debug("%s failed", name, exc_info=exc)
            print(f"kubetune {name}: {payload['reason']}: {payload['error']}", file=sys.stderr)
            return exit_code_for(exc)
        summary = termination_summary(result) if name == stage else summary
        print(result.to_json())
    write_termination_message(summary)
    return ExitCode.OK


class Timer:
    """Wall-clock seconds of a block (for the summary table)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.start
