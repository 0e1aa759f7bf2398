"""Stage results: the small JSON files each stage writes next to its outputs.

A stage exits 0 only after its outputs are complete and its result file is
written. The operator reads these (or the compact copy in the pod's termination
message) and copies the numbers into the FineTuneJob status; it never parses
logs. Local mode reads the same files to print its summary.

Every result carries the :class:`RunIdentity` of the run that wrote it (the
FineTuneJob's uid, the run's spec hash and run id, from the ``job.json`` the
operator gives the pod); the operator counts a result, from storage or from a
termination message, only when that identity is the current run's. Local runs
have no uid or run, so their identity is empty.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune.contract import RunAnnotation, Stage
from kubetune.schema import (
    CheckpointRecord,
    Comparison,
    DatasetStats,
    FineTuneJob,
    PromotionStatus,
    TrackingStatus,
)


class _Result(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class RunIdentity(_Result):
    """Which run of which FineTuneJob wrote a result (every field None in local mode)."""

    job_uid: str | None = Field(None, description="metadata.uid of the FineTuneJob")
    spec_hash: str | None = Field(None, description="hash of the run's spec")
    run_id: str | None = Field(None, description="the run (g<generation>)")

    @classmethod
    def of_job(cls, job: FineTuneJob) -> RunIdentity:
        """The identity the operator put into ``job``'s metadata (uid and annotations)."""
        annotations = job.metadata.annotations
        return cls(
            job_uid=job.metadata.uid,
            spec_hash=annotations.get(RunAnnotation.SPEC_HASH),
            run_id=annotations.get(RunAnnotation.RUN_ID),
        )


class PrepareResult(_Result):
    """dataset/prepare.json"""

    stage: str = Stage.PREPARE.value
    run: RunIdentity | None = Field(None, description="the run that wrote it")
    tracking: TrackingStatus | None = Field(None, description="spec.tracking's run, if any")
    stats: DatasetStats
    train_sha256: str = Field(..., description="sha256 of dataset/train.jsonl")
    test_sha256: str = Field(..., description="sha256 of dataset/test.jsonl")
    tokenizer: str = Field(..., description="Tokenizer used (hub id or URI)")
    dataset_uri: str
    fingerprint: str | None = Field(
        None, description="sha256 of fingerprintInputs (kubetune.fingerprint)"
    )
    fingerprint_inputs: dict[str, Any] | None = Field(
        None, description="what decided the splits: source files, dataset spec, tokenizer"
    )
    config: dict[str, Any] = Field(default_factory=dict, description="dataset spec used")
    answer_end: str | None = Field(
        None,
        description="promptCompletion/chat: the text the chat template puts after an answer "
        "(e.g. an end-of-turn marker); evaluation cuts generated answers there",
    )
    seconds: float = 0.0


class TrainResult(_Result):
    """train/train.json"""

    stage: str = Stage.TRAIN.value
    run: RunIdentity | None = Field(None, description="the run that wrote it")
    tracking: TrackingStatus | None = Field(None, description="spec.tracking's run, if any")
    steps: int
    total_steps: int
    epochs: float
    final_loss: float | None = None
    train_tokens: int = 0
    tokens_per_second: float | None = None
    model_uri: str
    dataset_fingerprint: str | None = None
    training_fingerprint: str | None = None
    last_checkpoint: str | None = None
    resumed_from_step: int | None = None
    preemptions: int = Field(
        0, description="times training stopped on SIGTERM with a checkpoint and was resumed"
    )
    seconds: float = 0.0
    device: str = "cpu"
    config: dict[str, Any] = Field(default_factory=dict, description="resolved hyperparameters")
    validation_loss: float | None = Field(
        None, description="training.validation: the last validation loss"
    )
    best_validation_loss: float | None = Field(None, description="the lowest validation loss")
    best_step: int | None = Field(None, description="the step of bestValidationLoss")
    stopped_early: bool = Field(
        False, description="training stopped before totalSteps: validation loss stopped improving"
    )
    model_step: int | None = Field(
        None,
        description="the step whose weights model/ holds: bestStep with "
        "training.validation.keepBest, else steps",
    )
    checkpoints: list[CheckpointRecord] = Field(
        default_factory=list,
        description="complete checkpoints kept, oldest first (keepCheckpoints newest + the best)",
    )


class TrainingRecord(_Result):
    """model/kubetune-training.json: what the model was trained on, written by train.

    Evaluate scores a model only when this record's dataset matches the test split's
    (``datasetFingerprint`` and ``trainSha256`` equal ``dataset/prepare.json``'s).
    """

    dataset_fingerprint: str | None = None
    train_sha256: str
    training_fingerprint: str
    dataset_inputs: dict[str, Any] | None = None
    training_inputs: dict[str, Any] = Field(default_factory=dict)
    steps: int = 0
    model_step: int | None = Field(
        None,
        description="the optimizer step these weights come from (the best validation step "
        "with training.validation.keepBest, a chosen checkpoint for an export; None: steps)",
    )
    validation_loss: float | None = Field(None, description="validation loss at model_step")


class ModelScores(_Result):
    """The metrics of one model on the test split.

    For promptCompletion and chat datasets (:attr:`EvaluateResult.kind`) perplexity is
    over the answer tokens (and the eos after each example) given their prompts,
    ``perplexity_lines`` counts examples, and BLEU, chrF and exact match score the
    greedy answers to the first ``bleu_samples`` held-out prompts.
    """

    perplexity: float | None = None
    nll_sum: float | None = None
    predicted_tokens: int | None = None
    perplexity_lines: int | None = Field(None, description="test lines perplexity scored")
    bleu: float | None = None
    bleu_samples: int | None = Field(None, description="generations BLEU (and chrF, EM) scored")
    chrf: float | None = Field(None, description="promptCompletion/chat: chrF of the answers")
    exact_match: float | None = Field(
        None,
        description="promptCompletion/chat: percent of answers equal to the reference "
        "(whitespace normalised)",
    )
    tokens_per_second: float | None = None


class RetentionResult(_Result):
    """spec.retrain.keepRuns: which of the FineTuneJob's older runs the evaluate pod deleted."""

    keep_runs: int = Field(..., description="spec.retrain.keepRuns when the run was evaluated")
    kept: list[str] = Field(default_factory=list, description="run ids kept, newest first")
    deleted: list[str] = Field(default_factory=list, description="run ids whose prefix is gone")
    error: str | None = Field(
        None, description="why some run could not be deleted (the stage still succeeded)"
    )


class EvaluateResult(_Result):
    """eval/evaluate.json"""

    stage: str = Stage.EVALUATE.value
    run: RunIdentity | None = Field(None, description="the run that wrote it")
    tracking: TrackingStatus | None = Field(None, description="spec.tracking's run, if any")
    fine_tuned: ModelScores
    baseline: ModelScores | None = None
    bleu_signature: str | None = None
    chrf_signature: str | None = Field(None, description="sacrebleu chrF signature")
    kind: str | None = Field(
        None,
        description="dataset.kind scored (None: written before kinds, text); for "
        "promptCompletion and chat, perplexity is over answer tokens only",
    )
    comparisons: list[Comparison] = Field(default_factory=list)
    test_lines: int | None = Field(None, description="lines in the test split")
    precision: str | None = Field(
        None, description="the arithmetic the models were scored in: fp32 or bf16 (autocast)"
    )
    dataset_fingerprint: str | None = Field(None, description="of the test split's prepare")
    training_fingerprint: str | None = Field(None, description="of the scored model")
    train_test_overlap: int | None = Field(
        None, description="test lines whose text is in the model's training data (0)"
    )
    samples_uri: str | None = Field(
        None, description="every generation BLEU scored: prompt, reference, each model's text"
    )
    champion: ModelScores | None = Field(
        None, description="spec.promotion: the serving model's scores on this test split"
    )
    promotion: PromotionStatus | None = Field(None, description="spec.promotion's decision")
    retention: RetentionResult | None = Field(
        None, description="spec.retrain.keepRuns: older runs deleted after this evaluation"
    )
    seconds: float = 0.0

    @property
    def is_instruction(self) -> bool:
        """promptCompletion or chat: answer-only perplexity and answers scored."""
        return self.kind not in (None, "text")


class ReportResult(_Result):
    """report/report.json"""

    stage: str = Stage.REPORT.value
    run: RunIdentity | None = Field(None, description="the run that wrote it")
    tracking: TrackingStatus | None = Field(None, description="spec.tracking's run, if any")
    markdown_uri: str
    html_uri: str | None = None
    loss_curve_uri: str | None = None
