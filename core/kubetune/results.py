"""Stage results: the small JSON files each stage writes next to its outputs.

A stage exits 0 only after its outputs are complete and its result file is
written. The operator reads these (or the compact copy in the pod's termination
message) and copies the numbers into the FineTuneJob status; it never parses
logs. Local mode reads the same files to print its summary.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune.contract import Stage
from kubetune.schema import Comparison, DatasetStats


class _Result(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class PrepareResult(_Result):
    """dataset/prepare.json"""

    stage: str = Stage.PREPARE.value
    stats: DatasetStats
    train_sha256: str = Field(..., description="sha256 of dataset/train.jsonl")
    test_sha256: str = Field(..., description="sha256 of dataset/test.jsonl")
    tokenizer: str = Field(..., description="Tokenizer used (hub id or URI)")
    dataset_uri: str
    config: dict[str, Any] = Field(default_factory=dict, description="dataset spec used")
    seconds: float = 0.0


class TrainResult(_Result):
    """train/train.json"""

    stage: str = Stage.TRAIN.value
    steps: int
    total_steps: int
    epochs: float
    final_loss: float | None = None
    train_tokens: int = 0
    tokens_per_second: float | None = None
    model_uri: str
    last_checkpoint: str | None = None
    resumed_from_step: int | None = None
    seconds: float = 0.0
    device: str = "cpu"
    config: dict[str, Any] = Field(default_factory=dict, description="resolved hyperparameters")


class ModelScores(_Result):
    """The metrics of one model on the test split."""

    perplexity: float | None = None
    nll_sum: float | None = None
    predicted_tokens: int | None = None
    bleu: float | None = None
    bleu_samples: int | None = None
    tokens_per_second: float | None = None


class EvaluateResult(_Result):
    """eval/evaluate.json"""

    stage: str = Stage.EVALUATE.value
    fine_tuned: ModelScores
    baseline: ModelScores | None = None
    bleu_signature: str | None = None
    comparisons: list[Comparison] = Field(default_factory=list)
    samples_uri: str | None = None
    seconds: float = 0.0


class ReportResult(_Result):
    """report/report.json"""

    stage: str = Stage.REPORT.value
    markdown_uri: str
    html_uri: str | None = None
    loss_curve_uri: str | None = None
