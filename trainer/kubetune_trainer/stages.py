"""The stage registry: one name per stage, one entrypoint each, shared by every caller.

``kubetune run`` (local mode), ``kubetune <stage>`` (inside a pod) and the
benchmarks all call :func:`run_stage`, which imports the stage module lazily
so that nothing here pulls in torch until a stage really runs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

from kubetune_trainer.context import StageContext, StageError
from kubetune_trainer.results import (
    EvaluateResult,
    PrepareResult,
    ReportResult,
    TrainResult,
)

STAGE_ORDER = ("prepare", "train", "evaluate", "report")

_MODULES = {
    "prepare": "kubetune_trainer.prepare",
    "train": "kubetune_trainer.train",
    "evaluate": "kubetune_trainer.evaluate",
    "report": "kubetune_trainer.report",
}

StageResult = PrepareResult | TrainResult | EvaluateResult | ReportResult

# Exit codes of `kubetune <stage>`: the operator's podFailurePolicy fails the Job
# at once on NOT_RETRIABLE (bad data or spec: a retry would fail the same way).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RETRIABLE = 3
NOT_RETRIABLE_REASONS = frozenset({"DatasetUnusable", "InvalidSpec"})

# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096


def run_stage(name: str, ctx: StageContext) -> StageResult:
    """Run one stage in this process and return its result."""
    if name not in _MODULES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_ORDER)}")
    module = importlib.import_module(_MODULES[name])
    result: StageResult = module.run(ctx)
    return result


def termination_summary(result: StageResult) -> dict[str, Any]:
    """The compact form of a result for a pod's termination message (< 4 KiB)."""
    data = result.to_wire()
    data.pop("config", None)  # resolved configs are in storage; keep the message small
    return data


def write_termination_message(payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``$KUBETUNE_TERMINATION_LOG`` (the pod's terminationMessagePath)."""
    path = os.environ.get("KUBETUNE_TERMINATION_LOG")
    if not path:
        return
    text = json.dumps(payload, separators=(",", ":"), default=str)
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        # Keep what the operator needs (stage, reason, the start of the error) as valid JSON.
        small: dict[str, Any] = {k: payload[k] for k in ("stage", "reason") if k in payload}
        small["truncated"] = True
        room = TERMINATION_MESSAGE_LIMIT - len(json.dumps(small)) - 64
        small["error"] = str(payload.get("error", ""))[: max(room, 0)]
        text = json.dumps(small, separators=(",", ":"))
    # Not in a pod (or no writable path): the result file in storage is the record.
    with contextlib.suppress(OSError):
        Path(path).write_text(text)


def failure_payload(stage: str, exc: BaseException) -> dict[str, Any]:
    reason = exc.reason if isinstance(exc, StageError) else "StageFailed"
    message = str(exc) or type(exc).__name__
    return {"stage": stage, "error": message[:3000], "reason": reason}


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, StageError) and exc.reason in NOT_RETRIABLE_REASONS:
        return EXIT_NOT_RETRIABLE
    return EXIT_FAILED


class Timer:
    """Wall-clock seconds of a block (for the summary table)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.start
