"""The contract between the operator and the stage pods, defined once.

Both sides import this module and nothing else for these facts:

* **stages**: their names, their order, which ones get a Kubernetes Job, and the phase
  and condition each one drives (:data:`STAGE_ORDER`, :data:`JOB_STAGES`,
  :data:`STAGE_PHASE`, :data:`STAGE_CONDITION`); where each stage's result file lives is
  :attr:`kubetune.layout.RunLayout.RESULT_KEYS`;
* **environment variables** the operator sets and the pods read (:class:`Env`);
* **exit codes** of ``kubetune <stage>`` and the ones a retry cannot fix
  (:class:`ExitCode`, :data:`NOT_RETRIABLE_EXIT_CODES`), which the operator's
  podFailurePolicy turns into an immediate failure, and the one a stop on SIGTERM with a
  saved checkpoint ends with (:attr:`ExitCode.INTERRUPTED`), which costs no attempt;
* **ports**: the trainer's Prometheus endpoint (:data:`METRICS_PORT`) and the
  rendezvous port of multi-worker training (:data:`RENDEZVOUS_PORT`);
* **failure reasons**: :class:`StageError` carries a :class:`kubetune.schema.Reason`,
  and the pod's termination message (:func:`write_termination_message`) carries it to
  the operator, which copies it into the failed condition;
* **run identity**: the annotations on the metadata of the ``job.json`` a pod reads that
  name the run it works for (:class:`RunAnnotation`); each stage stamps them, with the
  FineTuneJob's uid, into its result (:class:`kubetune.results.RunIdentity`), and the
  operator counts a result only when they are the current run's.

The module imports only the schema (pydantic), so both images use it.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
from pathlib import Path
from typing import Any

from kubetune.schema import ConditionType, Phase, Reason


class Stage(str, enum.Enum):
    PREPARE = "prepare"
    TRAIN = "train"
    EVALUATE = "evaluate"
    REPORT = "report"


STAGE_ORDER: tuple[str, ...] = tuple(s.value for s in Stage)
"""Every stage in the order local mode runs them."""

JOB_STAGES: tuple[str, ...] = (Stage.PREPARE.value, Stage.TRAIN.value, Stage.EVALUATE.value)
"""Stages the operator runs as Jobs, in order; the evaluate Job also writes the report."""

STAGE_PHASE: dict[str, Phase] = {
    Stage.PREPARE.value: Phase.PREPARING,
    Stage.TRAIN.value: Phase.TRAINING,
    Stage.EVALUATE.value: Phase.EVALUATING,
}
STAGE_CONDITION: dict[str, ConditionType] = {
    Stage.PREPARE.value: ConditionType.DATASET_READY,
    Stage.TRAIN.value: ConditionType.TRAINED,
    Stage.EVALUATE.value: ConditionType.EVALUATED,
}


class Env:
    """Names of the environment variables a stage container reads."""

    TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"
    """Where a stage writes its compact result or failure (the pod's terminationMessagePath)."""
    SCRATCH = "KUBETUNE_SCRATCH"
    """Working directory for downloads and temporary files (an emptyDir in a pod)."""
    METRICS_PORT = "KUBETUNE_METRICS_PORT"
    """Port of the trainer's Prometheus endpoint; 0 disables it."""
    METRICS_FINAL_SCRAPE_SECONDS = "KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS"
    """Longest wait at the end of training for a scrape of the final values (0: none)."""
    S3_ENDPOINT = "KUBETUNE_S3_ENDPOINT"
    """S3 endpoint URL (``AWS_ENDPOINT_URL`` is read too; this one wins)."""
    STORAGE_RETRY_SECONDS = "KUBETUNE_STORAGE_RETRY_SECONDS"
    """Seconds an S3 operation keeps retrying transient failures before the stage gives up
    its attempt (default 300; 0: no retries beyond botocore's own few)."""
    PREPARE_WORKERS = "KUBETUNE_PREPARE_WORKERS"
    """Worker processes of prepare's first pass (default: the usable CPUs)."""
    CPUS = "KUBETUNE_CPUS"
    """Whole CPUs the pod requested (``spec.resources.cpu`` rounded up; unset without one):
    a stage keeps at most this many busy, whatever the node has (kubetune_trainer.cpus)."""
    ATTN_IMPLEMENTATION = "KUBETUNE_ATTN_IMPLEMENTATION"
    """Overrides the attention implementation (e.g. ``flash_attention_2``)."""
    RENDEZVOUS_TIMEOUT_SECONDS = "KUBETUNE_RENDEZVOUS_TIMEOUT_SECONDS"
    """How long the training processes of several pods wait for each other, at the start and
    at every collective (default 600): a lost worker fails the others within this time."""

    @staticmethod
    def compare_api_key(name: str) -> str:
        """``KUBETUNE_COMPARE_<NAME>_API_KEY``: the API key of endpoint ``name``, from a Secret."""
        return f"KUBETUNE_COMPARE_{re.sub(r'[^A-Z0-9]', '_', name.upper())}_API_KEY"


class ExitCode(enum.IntEnum):
    """Exit codes of ``kubetune <stage>`` and ``kubetune run``."""

    OK = 0
    FAILED = 1
    """The stage failed; a retry may succeed (lost connection, preempted node)."""
    USAGE = 2
    """Bad command line or manifest."""
    NOT_RETRIABLE = 3
    """Bad data or spec: a retry would fail the same way."""
    INTERRUPTED = 4
    """Stopped on SIGTERM (preemption, eviction, a drained node, Kueue) after saving a complete
    checkpoint; the next attempt resumes from it, and the Job does not count it as a failure."""


class RunAnnotation:
    """Annotations the operator puts on the metadata of the ``job.json`` it gives a pod."""

    RUN_ID = "kubetune.io/run-id"
    """The run (``g<generation>``) the pod works for."""
    SPEC_HASH = "kubetune.io/spec-hash"
    """Hash of the run's spec (without ``suspend``/``ttlSecondsAfterFinished``)."""


NOT_RETRIABLE_EXIT_CODES: tuple[int, ...] = (ExitCode.USAGE.value, ExitCode.NOT_RETRIABLE.value)
NOT_RETRIABLE_REASONS = frozenset(
    {
        Reason.DATASET_UNUSABLE.value,
        Reason.INVALID_SPEC.value,
        Reason.MODEL_DATASET_MISMATCH.value,
        Reason.STORAGE_ACCESS_DENIED.value,
        Reason.CACHE_NOT_WRITABLE.value,
    }
)

S3_KEY_ID = "AWS_ACCESS_KEY_ID"
S3_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
S3_SESSION_TOKEN = "AWS_SESSION_TOKEN"
S3_CREDENTIAL_KEYS = (S3_KEY_ID, S3_SECRET_KEY)
S3_CREDENTIAL_KEYS_TEXT = f"{S3_KEY_ID} and {S3_SECRET_KEY}"  # for messages
"""The keys ``spec.storage.credentialsSecret`` must hold; pods get them as env vars of those names
(``S3_SESSION_TOKEN`` is optional and read by the operator only)."""

MLFLOW_TOKEN = "MLFLOW_TRACKING_TOKEN"
MLFLOW_USERNAME = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
MLFLOW_CREDENTIAL_KEYS = (MLFLOW_TOKEN, MLFLOW_USERNAME, MLFLOW_PASSWORD)
"""The keys ``spec.tracking.mlflow.credentialsSecret`` may hold (a token, or a user name and a
password); pods get those present as env vars of the same names (optional secretKeyRefs)."""

METRICS_PORT = 9400
RENDEZVOUS_PORT = 29500

# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096


class StageError(RuntimeError):
    """A stage cannot complete; the message says which input is wrong and what to change.

    ``reason`` is the :class:`~kubetune.schema.Reason` the operator copies into the
    failed condition (e.g. ``DatasetUnusable``).
    """

    def __init__(self, message: str, reason: Reason = Reason.STAGE_FAILED) -> None:
        super().__init__(message)
        self.reason: str = Reason(reason).value


class Interrupted(StageError):
    """The stage stopped on SIGTERM; ``checkpoint_step`` is the complete checkpoint it left."""

    def __init__(self, message: str, checkpoint_step: int) -> None:
        super().__init__(message, Reason.PREEMPTED)
        self.checkpoint_step = checkpoint_step


def exit_code_for(exc: BaseException) -> int:
    """The exit code of a stage that raised ``exc``."""
    if isinstance(exc, Interrupted):
        return ExitCode.INTERRUPTED
    if isinstance(exc, StageError) and exc.reason in NOT_RETRIABLE_REASONS:
        return ExitCode.NOT_RETRIABLE
    return ExitCode.FAILED


def failure_payload(stage: str, exc: BaseException) -> dict[str, Any]:
    """The termination message of a stage that raised ``exc``."""
    reason = exc.reason if isinstance(exc, StageError) else Reason.STAGE_FAILED.value
    message = str(exc) or type(exc).__name__
    payload: dict[str, Any] = {"stage": stage, "error": message[:3000], "reason": reason}
    if isinstance(exc, Interrupted):
        payload["checkpointStep"] = exc.checkpoint_step
    return payload


def write_termination_message(payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``$KUBETUNE_TERMINATION_LOG`` as JSON of at most 4 KiB."""
    path = os.environ.get(Env.TERMINATION_LOG)
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
