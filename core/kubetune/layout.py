"""Where each artifact of a run lives under ``spec.storage.output``.

One place names every key, so the stages, the local runner, the operator and
the tests agree::

    <output>/
      dataset/   train.jsonl test.jsonl  train.tokens.npy train.offsets.npy
                 test.tokens.npy test.offsets.npy  tokenizer/  prepare.json
                 {train,test}.loss_mask.npy (promptCompletion and chat only)
                 validation.* (training.validation only: the same files)
      training/<training fingerprint>/checkpoints/step-00000200/ ... COMPLETE
                 (resumable Accelerate state of one dataset + settings; kubetune.fingerprint)
      model/     save_pretrained() model + tokenizer (the fine_tuned_model)
                 kubetune-training.json  (what it was trained on: fingerprints)
      train/     progress.json  metrics.jsonl  train.json
      eval/      evaluate.json  samples.jsonl
      report/    report.md  report.html  loss.png  report.json

The operator gives each run its own output prefix (:func:`run_prefix`),
``<spec.storage.output>/runs/<uid[:8]>-<run id>/``, so an earlier run's results stay
readable after a spec change and a FineTuneJob applied again after a delete (a new uid)
never finds its predecessor's. A run id is ``g<generation>`` for a spec change and
``g<generation>-r<n>`` for the n-th retrain of that spec (:func:`run_id`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kubetune.contract import Stage


def join_uri(base: str, *parts: str) -> str:
    """Join URI parts with single slashes (``s3://b/p/`` + ``x`` -> ``s3://b/p/x``)."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


RUNS = "runs"
_RUN_ID = re.compile(r"^g(\d+)(?:-r(\d+))?$")
_RUN_DIR = re.compile(r"^([0-9a-z]{1,8})-(g\d+(?:-r\d+)?)$")


def run_id(generation: int, retrain: int = 0) -> str:
    """``g<generation>``, or ``g<generation>-r<retrain>`` for a retrain (``retrain >= 1``)."""
    return f"g{generation}" if retrain <= 0 else f"g{generation}-r{retrain}"


def parse_run_id(run: str) -> tuple[int, int] | None:
    """``"g3-r2"`` -> ``(3, 2)``, ``"g3"`` -> ``(3, 0)``; None for anything else."""
    match = _RUN_ID.match(run or "")
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def run_dir(run: str, uid: str) -> str:
    """``runs/<uid[:8]>-<run>``: the key of a run's prefix under ``spec.storage.output``."""
    return f"{RUNS}/{uid[:8]}-{run}" if uid else f"{RUNS}/{run}"


def parse_run_dir(name: str) -> tuple[str, str] | None:
    """``"1a2b3c4d-g3-r1"`` (a directory under ``runs/``) -> ``("1a2b3c4d", "g3-r1")``."""
    match = _RUN_DIR.match(name)
    return (match.group(1), match.group(2)) if match else None


def run_prefix(output: str, run: str, uid: str) -> str:
    """Where run ``run`` of the FineTuneJob ``uid`` writes: ``<output>/runs/<uid[:8]>-<run>``.

    A FineTuneJob deleted and applied again (a new uid) never shares a run prefix with its
    predecessor.
    """
    return join_uri(output, run_dir(run, uid))


@dataclass(frozen=True)
class RunLayout:
    """Keys (relative to the output root) of every artifact of one run."""

    output: str

    DATASET = "dataset"
    TRAIN_TEXT = "dataset/train.jsonl"
    TEST_TEXT = "dataset/test.jsonl"
    TRAIN_TOKENS = "dataset/train.tokens.npy"
    TRAIN_OFFSETS = "dataset/train.offsets.npy"
    TEST_TOKENS = "dataset/test.tokens.npy"
    TEST_OFFSETS = "dataset/test.offsets.npy"
    TRAIN_LOSS_MASK = "dataset/train.loss_mask.npy"
    TEST_LOSS_MASK = "dataset/test.loss_mask.npy"
    VALIDATION_TEXT = "dataset/validation.jsonl"
    VALIDATION_TOKENS = "dataset/validation.tokens.npy"
    VALIDATION_OFFSETS = "dataset/validation.offsets.npy"
    VALIDATION_LOSS_MASK = "dataset/validation.loss_mask.npy"
    TOKENIZER = "dataset/tokenizer"
    PREPARE_RESULT = "dataset/prepare.json"
    CHECKPOINTS = "checkpoints"
    CHECKPOINT_MARKER = "COMPLETE"
    MODEL = "model"
    MODEL_RECORD = "model/kubetune-training.json"
    PROGRESS = "train/progress.json"
    TRAIN_METRICS = "train/metrics.jsonl"
    TRAIN_RESULT = "train/train.json"
    EVAL_RESULT = "eval/evaluate.json"
    EVAL_SAMPLES = "eval/samples.jsonl"
    REPORT_MD = "report/report.md"
    REPORT_HTML = "report/report.html"
    LOSS_PNG = "report/loss.png"
    REPORT_RESULT = "report/report.json"

    RESULT_KEYS = {
        Stage.PREPARE.value: PREPARE_RESULT,
        Stage.TRAIN.value: TRAIN_RESULT,
        Stage.EVALUATE.value: EVAL_RESULT,
        Stage.REPORT.value: REPORT_RESULT,
    }

    def uri(self, key: str) -> str:
        return join_uri(self.output, key)

    TRAINING_RUNS = "training"

    @staticmethod
    def checkpoint_key(step: int) -> str:
        """A checkpoint's key, relative to its training run (:meth:`training_run`)."""
        return f"checkpoints/step-{step:08d}"

    @staticmethod
    def training_run(fingerprint: str) -> str:
        """The directory of one training run: its checkpoints, keyed by what it trains on.

        A rerun with another dataset or other settings gets another directory, so it can
        never resume (or finish "in 0 steps") from a checkpoint of different training.
        """
        return f"training/{fingerprint[:16]}"
