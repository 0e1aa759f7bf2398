"""The FineTuneJob schema: the one source of truth for spec and status.

Everything else derives from these models:

* ``crds/finetunejob.yaml`` and the Helm chart's CRD are generated from them
  (``python -m kubetune.crd``; ``tests/unit/test_crd.py`` fails on drift);
* ``kubetune run job.yaml`` and the stage commands parse manifests with them;
* the operator parses the resource it watches with them and builds its status
  with the status models;
* tests and benchmarks write their jobs with :func:`job_manifest`.

This module imports only pydantic, so the operator image (no torch) and the
trainer image (no kopf) can both use it.

Cross-field rules are written once as :class:`CelRule` objects: the CRD carries
the CEL expression (the API server rejects a bad manifest at ``kubectl apply``)
and the same rule runs in Python for local mode, where there is no API server.
"""

from __future__ import annotations

import copy
import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

GROUP = "kubetune.io"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
API_VERSION = f"{GROUP}/{VERSION}"

# Formats the Kubernetes API checks when the operator creates a stage Job, checked here too
# so that `kubectl apply` (the CRD's `pattern`) and local mode (the same regex in Python)
# refuse a bad value up front. Every regex is RE2 and Python alike and has no backslash
# (`[.]`, not an escaped dot), so it can also sit in a CEL string literal.
_DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = _DNS_LABEL + "([.]" + _DNS_LABEL + ")*"
_LABEL_NAME = "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"  # 1-63 characters
_QUALIFIED_NAME = "(" + _DNS_SUBDOMAIN + "/)?" + _LABEL_NAME
_NUMBER = "([0-9]+([.][0-9]*)?|[.][0-9]+)"
# A path segment that is not `.` or `..` (empty is fine: a trailing or doubled slash).
_SEGMENT = "([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+)?"
_S3_URI = "s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9](/" + _SEGMENT + ")*"
_IMAGE_COMPONENT = "[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
_IMAGE_DOMAIN = "[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*"

DNS_SUBDOMAIN_PATTERN = "^" + _DNS_SUBDOMAIN + "$"
LABEL_KEY_PATTERN = "^" + _QUALIFIED_NAME + "$"
LABEL_VALUE_PATTERN = "^(" + _LABEL_NAME + ")?$"
# Kubernetes' resource.Quantity without a sign: 4, 500m, 1.5, 32Gi, 1e3.
QUANTITY_PATTERN = "^" + _NUMBER + "([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
# [registry[:port]/]path[:tag][@algorithm:digest], as the distribution reference grammar.
IMAGE_PATTERN = (
    "^(" + _IMAGE_DOMAIN + "(:[0-9]+)?/)?" + _IMAGE_COMPONENT + "(/" + _IMAGE_COMPONENT + ")*"
    "(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?"
    "(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
URI_PATTERN = "^(" + _S3_URI + "|file://.+)$"
SOURCE_PATTERN = "^(" + _S3_URI + "|(file|hf)://.+)$"
TOKENIZER_PATTERN = "^(" + _S3_URI + "|file://.+|[^:]+)$"
LABEL_KEY_MAX_LENGTH = 253 + 1 + 63  # DNS prefix, '/', name

_S3_RULES = (
    "s3://<bucket>/<prefix> (bucket: 3-63 lowercase letters, digits, '.' or '-', starting and "
    "ending with a letter or digit; no '.' or '..' path segments)"
)
_SECRET_NAME = (
    "a Secret name in the FineTuneJob's namespace: lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit (no '/': Secrets of other namespaces cannot "
    "be used)"
)


@dataclass(frozen=True)
class CelRule:
    """A cross-field rule: CEL for the API server, the same check in Python for local mode.

    ``check`` receives the model instance and returns True when the rule holds.
    ``field`` is the JSON path (relative to the object carrying the rule) that the
    message is about; the API server reports it as ``fieldPath``.
    """

    expression: str
    message: str
    check: Callable[[Any], bool]
    field: str | None = None


@dataclass(frozen=True)
class Matching:
    """``Annotated[str, Matching(PATTERN, "what it must be")]``: a string format.

    The CRD carries ``pattern`` (the API server refuses a mismatch, naming the field);
    Python checks the same regex and says what the value must be.
    """

    pattern: str
    what: str

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        regex = re.compile(self.pattern)

        def check(value: str) -> str:
            if not regex.fullmatch(value):
                raise ValueError(f"must be {self.what}")
            return value

        return core_schema.no_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        out["pattern"] = self.pattern
        return out


def is_label_key(key: str) -> bool:
    """A Kubernetes label key (nodeSelector): ``[dns-subdomain/]name``."""
    return len(key) <= LABEL_KEY_MAX_LENGTH and re.fullmatch(LABEL_KEY_PATTERN, key) is not None


SecretName = Annotated[str, Field(max_length=253), Matching(DNS_SUBDOMAIN_PATTERN, _SECRET_NAME)]
Quantity = Annotated[
    str,
    Field(max_length=64),
    Matching(
        QUANTITY_PATTERN,
        "a Kubernetes quantity: a plain number with an optional suffix, e.g. '4', '500m' "
        "(CPU), '32Gi' or '512Mi' (memory); no spaces, no 'GB'/'MB'",
    ),
]
LabelValue = Annotated[
    str,
    Field(max_length=63),
    Matching(
        LABEL_VALUE_PATTERN,
        "a label value: at most 63 letters, digits, '-', '_' or '.', starting and ending "
        "with a letter or digit (or empty)",
    ),
]


class _Model(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> _Model:
        failed = [rule.message for rule in self.cel_rules if not rule.check(self)]
        if failed:
            raise ValueError("; ".join(failed))
        return self

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in a manifest or in the API (camelCase, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------- enums


class DatasetFormat(str, enum.Enum):
    AUTO = "auto"
    TEXT = "text"
    MARKDOWN = "markdown"
    RST = "rst"
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"


class DatasetKind(str, enum.Enum):
    TEXT = "text"
    PROMPT_COMPLETION = "promptCompletion"
    CHAT = "chat"


class DedupMode(str, enum.Enum):
    EXACT = "exact"
    NORMALIZED = "normalized"
    NEAR = "near"
    NONE = "none"


class SplitUnit(str, enum.Enum):
    LINE = "line"
    DOCUMENT = "document"


class Scheduler(str, enum.Enum):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class Precision(str, enum.Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class EvaluationPrecision(str, enum.Enum):
    AUTO = "auto"
    BF16 = "bf16"
    FP32 = "fp32"


class TolerationOperator(str, enum.Enum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(str, enum.Enum):
    ALL = ""  # every effect
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Phase(str, enum.Enum):
    PENDING = "Pending"
    PREPARING = "Preparing"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class ConditionType(str, enum.Enum):
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    DATASET_READY = "DatasetReady"
    TRAINED = "Trained"
    EVALUATED = "Evaluated"
    PROMOTED = "Promoted"
    TRACKED = "Tracked"


class Reason(str, enum.Enum):
    """Typed reasons for conditions and Events (CamelCase, as Kubernetes expects)."""

    CREATED = "Created"
    STAGE_RUNNING = "StageRunning"
    STAGE_PENDING = "StagePending"
    STAGE_SUCCEEDED = "StageSucceeded"
    SUCCEEDED = "Succeeded"
    INVALID_SPEC = "InvalidSpec"
    OUTPUT_IN_USE = "OutputInUse"  # storage.output overlaps an older FineTuneJob's
    DATASET_UNUSABLE = "DatasetUnusable"
    STORAGE_ACCESS_DENIED = "StorageAccessDenied"  # the credentials are refused
    MODEL_DATASET_MISMATCH = "ModelDatasetMismatch"
    STAGE_FAILED = "StageFailed"
    CACHE_NOT_WRITABLE = "CacheNotWritable"  # a cache or temp dir of the pod is read-only
    OOM_KILLED = "OOMKilled"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    UNSCHEDULABLE = "Unschedulable"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    SUSPENDED = "Suspended"
    NEW_GENERATION = "NewGeneration"
    WAITING = "Waiting"
    STAGE_RETRYING = "StageRetrying"  # an attempt failed; the stage Job runs another
    PROMOTED = "Promoted"  # the run's model is the serving version now
    NOT_BETTER = "NotBetter"  # it did not beat the baseline or the champion by the margin
    PROMOTION_FAILED = "PromotionFailed"  # the target could not be read or written
    TRACKED = "Tracked"  # spec.tracking recorded the run
    TRACKING_FAILED = "TrackingFailed"  # the tracking server refused or could not be reached
    RUNS_DELETED = "RunsDeleted"  # spec.retrain.keepRuns deleted older runs' artifacts
    RETENTION_FAILED = "RetentionFailed"  # some older run could not be deleted
    PREEMPTED = "Preempted"  # a training pod stopped on SIGTERM and saved a checkpoint
    RENDEZVOUS_FAILED = "RendezvousFailed"  # the workers of a training Job did not meet
    QUEUED = "Queued"  # the stage Job waits for Kueue to admit it


# --------------------------------------------------------------------------- spec


class FreshModelSpec(_Model):
    """A GPT-2-shaped model initialised from scratch (small demos, pre-training)."""

    n_layer: int = Field(4, ge=1, le=96, description="Number of transformer blocks.")
    n_head: int = Field(4, ge=1, le=128, description="Attention heads per block.")
    n_embd: int = Field(256, ge=8, le=16384, description="Hidden size; must divide by nHead.")
    n_positions: int = Field(
        512, ge=16, le=32768, description="Longest sequence the position table covers (tokens)."
    )
    vocab_size: int = Field(
        8192,
        ge=256,
        le=262144,
        description="Vocabulary size of the byte-level BPE tokenizer trained on the training split "
        "when model.tokenizer is not set.",
    )

    cel_rules = (
        CelRule(
            "!has(self.nEmbd) || !has(self.nHead) || self.nEmbd % self.nHead == 0",
            "model.fresh.nEmbd must be a multiple of model.fresh.nHead",
            lambda m: m.n_embd % m.n_head == 0,
            field=".nEmbd",
        ),
    )


class ModelSpec(_Model):
    """Which pre-trained model to fine-tune: exactly one of name, uri or fresh."""

    name: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Model id on the Hugging Face hub, e.g. gpt2. Needs a reachable hub.",
    )
    uri: Annotated[str, Matching(URI_PATTERN, f"{_S3_RULES} or file://<path>")] | None = Field(
        None,
        description="s3:// or file:// prefix holding a save_pretrained() model and tokenizer "
        "(for air-gapped clusters). s3://<bucket>/<prefix>: a valid bucket name, no '.' or "
        "'..' segments.",
    )
    fresh: FreshModelSpec | None = Field(
        None, description="Initialise a GPT-2-shaped model from scratch instead of loading one."
    )
    tokenizer: (
        Annotated[
            str,
            Matching(TOKENIZER_PATTERN, f"a hub id, {_S3_RULES} or file://<path>"),
        ]
        | None
    ) = Field(
        None,
        description="Tokenizer to use instead of the model's own: hub id, s3:// or file:// prefix.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")

    cel_rules = (
        CelRule(
            "(has(self.name) ? 1 : 0) + (has(self.uri) ? 1 : 0) + (has(self.fresh) ? 1 : 0) == 1",
            "exactly one of model.name, model.uri or model.fresh must be set",
            lambda m: sum(x is not None for x in (m.name, m.uri, m.fresh)) == 1,
        ),
    )

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.uri:
            return self.uri
        assert self.fresh is not None
        f = self.fresh
        return f"fresh gpt2 ({f.n_layer}x{f.n_embd}, vocab {f.vocab_size})"


class CleanSpec(_Model):
    """How raw text becomes training text. Every rule is applied line by line."""

    normalize_unicode: bool = Field(True, description="Apply Unicode NFKC normalisation.")
    normalize_whitespace: bool = Field(
        True, description="Collapse runs of spaces and tabs to one space and trim each line."
    )
    remove_control_chars: bool = Field(
        True, description="Drop control characters and stray special symbols (e.g. U+FFFD)."
    )
    strip_markup: bool = Field(
        True,
        description="Strip Markdown, reStructuredText and HTML markup (headings, emphasis, "
        "links, tags, directives, roles).",
    )
    lowercase: bool = Field(False, description="Lower-case all text.")
    min_chars: int = Field(
        16, ge=0, le=100000, description="Drop lines shorter than this after cleaning (chars)."
    )
    max_chars: int | None = Field(
        None, ge=1, description="Drop lines longer than this after cleaning (chars)."
    )
    dedup: DedupMode = Field(
        DedupMode.EXACT,
        description="Drop lines that repeat an earlier one. exact: the same cleaned text; "
        "normalized: the same ignoring case, punctuation and spacing; near: estimated "
        "character 5-gram Jaccard >= nearDuplicateThreshold (MinHash); none: keep all.",
    )
    near_duplicate_threshold: float = Field(
        0.8,
        ge=0.3,
        le=1.0,
        description="Similarity (Jaccard of character 5-grams) at which two lines count as "
        "near-duplicates, for dedup: near and for the test-twin statistics.",
    )

    cel_rules = (
        CelRule(
            "!has(self.maxChars) || !has(self.minChars) || self.maxChars >= self.minChars",
            "dataset.clean.maxChars must be >= dataset.clean.minChars",
            lambda c: c.max_chars is None or c.max_chars >= c.min_chars,
            field=".maxChars",
        ),
    )


class SplitSpec(_Model):
    """How the test set is split off."""

    test_fraction: float = Field(
        0.1, gt=0.0, le=0.5, description="Share of lines (or documents) held out for evaluation."
    )
    seed: int = Field(
        42, ge=0, description="Seed of the split; the same seed gives the same split."
    )
    unit: SplitUnit = Field(
        SplitUnit.LINE,
        description="line: each cleaned line goes to one split; document: whole documents do. "
        "Text datasets only.",
    )
    group_by: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="promptCompletion and chat: a record field (e.g. command) whose value keeps "
        "records together: all records with the same value land in the same split, so "
        "near-identical variants of one example cannot be on both sides. Without it each "
        "record is split on its own.",
    )


class DatasetSpec(_Model):
    """Where the text comes from and how it is cleaned and split."""

    source: Annotated[
        str,
        Matching(SOURCE_PATTERN, f"{_S3_RULES}, file://<path> or hf://<dataset>"),
    ] = Field(
        ...,
        description="A file or a prefix of files (.txt, .md, .jsonl, .csv, .parquet): s3://, "
        "file://, or hf://<dataset>[/<config>][@<split>] where a hub is reachable. "
        "s3://<bucket>/<prefix>: a valid bucket name, no '.' or '..' segments.",
    )
    format: DatasetFormat = Field(
        DatasetFormat.AUTO,
        description="File format; auto picks by file extension (.txt, .md, .rst, .jsonl, "
        ".csv, .parquet).",
    )
    text_field: str = Field(
        "text", min_length=1, description="Column holding the text in jsonl, csv and parquet."
    )
    max_documents: int | None = Field(
        None, ge=1, description="Read at most this many documents (files or records)."
    )
    clean: CleanSpec = Field(default_factory=CleanSpec, description="Cleaning rules.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="Train/test split.")
    kind: DatasetKind = Field(
        DatasetKind.TEXT,
        description="text: lines of text, every token trained. promptCompletion: records with "
        "a prompt and the completion the model should answer (promptField, completionField). "
        "chat: records with a list of messages (messagesField; roles system, user, assistant), "
        "rendered with chatTemplate. For promptCompletion and chat the loss and the perplexity "
        "count the answer tokens only, and evaluation generates an answer to each held-out "
        "prompt (BLEU, chrF, exact match). Needs jsonl, csv or parquet records.",
    )
    prompt_field: str = Field(
        "prompt", min_length=1, description="promptCompletion: the field holding the prompt."
    )
    completion_field: str = Field(
        "completion",
        min_length=1,
        description="promptCompletion: the field holding the answer to learn.",
    )
    prompt_separator: str = Field(
        "\n",
        max_length=64,
        description="promptCompletion: text put between the prompt and the completion (the model "
        "learns to answer after it).",
    )
    messages_field: str = Field(
        "messages",
        min_length=1,
        description="chat: the field holding the messages, a list of {role, content} (in csv, "
        "a JSON string).",
    )
    chat_template: str | None = Field(
        None,
        min_length=1,
        max_length=65536,
        description="chat: a Jinja chat template (as in tokenizer_config.json) to render the "
        "messages with. Default: the tokenizer's own template if it has one, else kubetune's "
        "(each message as '<|role|>' and its content on their own lines; docs/datasets.md).",
    )
    max_bad_fraction: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="promptCompletion and chat: fail prepare when more than this share of the "
        "records is bad (missing field, wrong role order, empty answer, over-long, ...). Bad "
        "records are skipped and counted per cause in status.dataset.badRecords.",
    )

    cel_rules = (
        CelRule(
            "!has(self.kind) || self.kind == 'text' || !has(self.format) "
            "|| self.format in ['auto', 'jsonl', 'csv', 'parquet']",
            "dataset.kind promptCompletion and chat need records: dataset.format must be auto, "
            "jsonl, csv or parquet",
            lambda d: (
                d.kind == DatasetKind.TEXT
                or d.format
                in (
                    DatasetFormat.AUTO,
                    DatasetFormat.JSONL,
                    DatasetFormat.CSV,
                    DatasetFormat.PARQUET,
                )
            ),
            field=".format",
        ),
        CelRule(
            "!has(self.kind) || self.kind == 'text' || !has(self.clean) "
            "|| !has(self.clean.dedup) || self.clean.dedup != 'near'",
            "dataset.clean.dedup: near is for text datasets; use exact or normalized with "
            "promptCompletion and chat (and split.groupBy to keep variants together)",
            lambda d: d.kind == DatasetKind.TEXT or d.clean.dedup != DedupMode.NEAR,
            field=".clean.dedup",
        ),
        CelRule(
            "!has(self.split) || !has(self.split.groupBy) "
            "|| (has(self.kind) && self.kind != 'text')",
            "dataset.split.groupBy is for promptCompletion and chat datasets; for text use "
            "dataset.split.unit: document",
            lambda d: d.split.group_by is None or d.kind != DatasetKind.TEXT,
            field=".split.groupBy",
        ),
    )

    @property
    def is_instruction(self) -> bool:
        """True for promptCompletion and chat: answers are trained and scored, prompts are not."""
        return self.kind != DatasetKind.TEXT


class LoraSpec(_Model):
    """Low-rank adapters through peft instead of full fine-tuning."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(32, ge=1, le=4096, description="Adapter scaling (lora_alpha).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: peft's choice for the architecture."
    )


class ValidationSpec(_Model):
    """A validation split carved from the training data, scored while training runs."""

    fraction: float = Field(
        0.05,
        gt=0.0,
        le=0.5,
        description="Share of the training data (lines, documents or split.groupBy groups, as "
        "the test split) held out for validation. Never taken from the test split, which stays "
        "untouched for the final evaluation; no text is in two splits.",
    )
    every_steps: int = Field(
        50, ge=1, description="Score the validation split every N optimizer steps (and at the end)."
    )
    max_samples: int | None = Field(
        None,
        ge=1,
        description="Score at most this many validation lines or examples (the first ones); "
        "default all.",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop training after this many validations in a row without an improvement "
        "of at least minDelta in validation loss. Default: never stop early.",
    )
    min_delta: float = Field(
        0.0, ge=0.0, description="The smallest drop in validation loss that counts as better."
    )
    keep_best: bool = Field(
        True,
        description="Keep the weights with the lowest validation loss as the model, not the "
        "last ones.",
    )


class TrainingSpec(_Model):
    """Hyperparameters of the fine-tune."""

    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the training split.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per device per micro-step.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-steps per optimizer step."
    )
    learning_rate: float = Field(5e-5, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay.")
    scheduler: Scheduler = Field(Scheduler.COSINE, description="Decay after warmup.")
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1.0, description="Share of steps with linear warmup."
    )
    max_seq_length: int = Field(
        512, ge=16, le=32768, description="Tokens per training sequence (packed block size)."
    )
    packing: bool = Field(
        True,
        description="Pack short lines into full maxSeqLength blocks; attention never crosses "
        "a line boundary.",
    )
    precision: Precision = Field(
        Precision.BF16, description="Mixed precision: bf16, fp16 (GPU only) or fp32."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (L2 norm).")
    dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Dropout probability of the model's embedding, attention and residual "
        "layers while training (GPT-2's own config: 0.1); unset keeps the model's. 0 is "
        "faster and makes training the same on any number of workers.",
    )
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters instead of all weights.")
    checkpoint_every_steps: int = Field(
        200, ge=1, description="Save a resumable checkpoint every N optimizer steps."
    )
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Complete checkpoints to keep.")
    log_every_steps: int = Field(10, ge=1, description="Log and export metrics every N steps.")
    seed: int = Field(42, ge=0, description="Seed for initialisation and data order.")
    validation: ValidationSpec | None = Field(
        None,
        description="Hold out a validation split of the training data and score it every "
        "everySteps (loss, perplexity), with optional early stopping and best-checkpoint "
        "selection. Default: none.",
    )


class BleuSpec(_Model):
    """BLEU on generations: prompt = first part of a test line, reference = the rest."""

    enabled: bool = Field(True, description="Compute BLEU.")
    prompt_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of each line's words used as the prompt."
    )
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Generation budget per line.")
    max_samples: int = Field(500, ge=1, description="Test lines used for BLEU.")
    batch_size: int = Field(16, ge=1, le=1024, description="Lines generated per batch.")


class CompareWithSpec(_Model):
    """An OpenAI-compatible endpoint (Ollama, vLLM, OpenAI) scored on the same test set."""

    name: str = Field(..., min_length=1, max_length=63, description="Label in the report.")
    base_url: str = Field(
        ..., pattern=r"^https?://.+", description="API base, e.g. http://ollama:11434/v1"
    )
    model: str = Field(..., min_length=1, description="Model name the endpoint serves.")
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the API key (local mode only: the operator "
        "drops it, so a pod's own credentials can never be sent to an endpoint).",
    )
    api_key_secret: SecretName | None = Field(
        None,
        description="Secret with key 'apiKey' holding the API key (cluster mode: the evaluate "
        "pod gets it as KUBETUNE_COMPARE_<NAME>_API_KEY). A Secret name (DNS-1123 subdomain) "
        "in the FineTuneJob's namespace.",
    )


class EvaluationSpec(_Model):
    """What is measured on the test split."""

    perplexity: bool = Field(True, description="Compute test perplexity.")
    bleu: BleuSpec = Field(default_factory=BleuSpec, description="BLEU settings.")
    baseline: bool = Field(True, description="Also evaluate the pre-trained model.")
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per perplexity batch.")
    stride: int | None = Field(
        None,
        ge=1,
        description="Rolling-window stride for texts longer than the model context "
        "(default: half the context).",
    )
    max_samples: int | None = Field(
        None, ge=1, description="Score at most this many test lines for perplexity."
    )
    precision: EvaluationPrecision = Field(
        EvaluationPrecision.AUTO,
        description="Arithmetic of perplexity and generation: auto (bf16 autocast on a GPU, "
        "fp32 on a CPU), fp32, or bf16 (autocast; on a CPU with AVX512-BF16 or AMX about "
        "2x faster than fp32, perplexity within ~0.05%; slow on CPUs without them).",
    )
    compare_with: list[CompareWithSpec] = Field(
        default_factory=list, description="Extra OpenAI-compatible endpoints to score."
    )

    cel_rules = (
        CelRule(
            "(!has(self.perplexity) || self.perplexity) || !has(self.bleu) "
            "|| !has(self.bleu.enabled) || self.bleu.enabled",
            "evaluation must compute perplexity or BLEU (or both)",
            lambda e: e.perplexity or e.bleu.enabled,
        ),
    )


class Toleration(_Model):
    """A Kubernetes toleration, with the rules the Job API applies to it."""

    key: (
        Annotated[
            str,
            Field(max_length=LABEL_KEY_MAX_LENGTH),
            Matching(
                "^(" + _QUALIFIED_NAME + ")?$",
                "a taint key: [prefix/]name, e.g. nvidia.com/gpu (name: at most 63 letters, "
                "digits, '-', '_' or '.'; prefix: a DNS subdomain)",
            ),
        ]
        | None
    ) = Field(
        None,
        description="Taint key, a label key such as nvidia.com/gpu; leave it out (with "
        "operator Exists) to tolerate every taint.",
    )
    operator: TolerationOperator | None = Field(
        None, description="Exists or Equal (the default when unset)."
    )
    value: LabelValue | None = Field(
        None, description="Taint value for operator Equal (a label value); empty for Exists."
    )
    effect: TaintEffect | None = Field(
        None,
        description="NoSchedule, PreferNoSchedule or NoExecute; empty or unset: every effect.",
    )
    toleration_seconds: int | None = Field(
        None,
        description="How long a NoExecute taint is tolerated before the pod is evicted "
        "(needs effect NoExecute).",
    )

    cel_rules = (
        CelRule(
            "(has(self.key) && self.key != '') "
            "|| (has(self.operator) && self.operator == 'Exists')",
            "resources.tolerations operator must be Exists when key is empty (tolerate every "
            "taint); set a key or operator: Exists",
            lambda t: bool(t.key) or t.operator == TolerationOperator.EXISTS,
            field=".operator",
        ),
        CelRule(
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) "
            "|| self.value == ''",
            "resources.tolerations value must be empty when operator is Exists",
            lambda t: t.operator != TolerationOperator.EXISTS or not t.value,
            field=".value",
        ),
        CelRule(
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "resources.tolerations tolerationSeconds needs effect: NoExecute",
            lambda t: t.toleration_seconds is None or t.effect == TaintEffect.NO_EXECUTE,
            field=".tolerationSeconds",
        ),
    )


class ResourcesSpec(_Model):
    """Where and how the stage pods run (cluster mode)."""

    image: (
        Annotated[
            str,
            Field(max_length=512),
            Matching(
                IMAGE_PATTERN,
                "an image reference such as ghcr.io/kubetune/trainer:0.1.0 "
                "([registry[:port]/]path[:tag][@sha256:digest], lowercase path, no spaces); "
                "leave it out for the operator's trainer image",
            ),
        ]
        | None
    ) = Field(
        None,
        description="Trainer image, e.g. ghcr.io/kubetune/trainer:0.1.0 "
        "([registry[:port]/]path[:tag][@digest]); default: the operator's "
        "KUBETUNE_TRAINER_IMAGE.",
    )
    image_pull_policy: str | None = Field(
        None, pattern=r"^(Always|IfNotPresent|Never)$", description="Image pull policy."
    )
    workers: int = Field(
        1,
        ge=1,
        le=512,
        description="Training pods (nodes) of one data-parallel training: rank from the "
        "Indexed Job's completion index, rendezvous at the pod of index 0 through a headless "
        "Service (needs cluster DNS); NCCL with GPUs, gloo on CPU (gpusPerWorker 0).",
    )
    gpus_per_worker: int = Field(1, ge=0, le=16, description="nvidia.com/gpu per training pod.")
    cpu: Quantity | None = Field(
        None, description="CPU request per pod, a Kubernetes quantity: '4', '1.5' or '500m'."
    )
    memory: Quantity | None = Field(
        None,
        description="Memory request and limit per pod, a Kubernetes quantity: 32Gi, 512Mi "
        "(binary) or 2G (decimal); not '2 GB'.",
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Node labels the stage pods need (at most 64): label keys "
        "([prefix/]name, e.g. nvidia.com/gpu.present) and label values.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Tolerations (at most 64)."
    )
    service_account_name: (
        Annotated[
            str,
            Field(max_length=253),
            Matching(
                DNS_SUBDOMAIN_PATTERN,
                "a ServiceAccount name in the FineTuneJob's namespace: lowercase letters, "
                "digits, '-' and '.', starting and ending with a letter or digit",
            ),
        ]
        | None
    ) = Field(
        None,
        description="ServiceAccount of the stage pods, in the FineTuneJob's namespace "
        "(a DNS-1123 subdomain); default: the namespace's default.",
    )
    priority_class_name: (
        Annotated[
            str,
            Field(max_length=253),
            Matching(
                DNS_SUBDOMAIN_PATTERN,
                "a PriorityClass name: lowercase letters, digits, '-' and '.', starting and "
                "ending with a letter or digit",
            ),
        ]
        | None
    ) = Field(
        None,
        description="PriorityClass of the stage pods (a DNS-1123 subdomain), one your cluster "
        "admin made for batch work. Names starting with 'system-' are refused: those classes "
        "are for pods the cluster cannot run without, and a training job must never preempt "
        "them.",
    )
    backoff_limit: int = Field(2, ge=0, le=100, description="Retries of each stage Job.")
    termination_grace_period_seconds: int | None = Field(
        None,
        ge=1,
        le=86400,
        description="Seconds a stage pod gets between SIGTERM (preemption, eviction, a drained "
        "node, Kueue) and being killed. Training uses them to finish the step and save a "
        "checkpoint, so give it more than one checkpoint takes to upload. Default: "
        "Kubernetes' 30.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Wall-clock limit of each stage Job (seconds)."
    )

    cel_rules = (
        CelRule(
            "!has(self.priorityClassName) || !self.priorityClassName.startsWith('system-')",
            "resources.priorityClassName must not start with 'system-' (classes for pods the "
            "cluster cannot run without); use a PriorityClass made for batch work, or leave "
            "it out",
            lambda r: not (r.priority_class_name or "").startswith("system-"),
            field=".priorityClassName",
        ),
        CelRule(
            "!has(self.nodeSelector) || self.nodeSelector.all(k, "
            f"k.size() <= {LABEL_KEY_MAX_LENGTH} && k.matches('{LABEL_KEY_PATTERN}'))",
            "resources.nodeSelector keys must be label keys: [prefix/]name, e.g. "
            "nvidia.com/gpu.present (name: at most 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit; prefix: a DNS subdomain)",
            lambda r: all(is_label_key(k) for k in r.node_selector),
            field=".nodeSelector",
        ),
    )


class StorageSpec(_Model):
    """Where every artifact goes."""

    output: Annotated[
        str,
        Matching(URI_PATTERN, f"{_S3_RULES}, or file://<path> for local mode (kubetune run)"),
    ] = Field(
        ...,
        description="s3:// or file:// prefix for dataset/, training/ (checkpoints), model/, "
        "eval/, report/. s3://<bucket>/<prefix>: a valid bucket name, no '.' or '..' "
        "segments. file:// is for local mode (kubetune run) only: stage pods on a cluster "
        "share no file system, so the operator refuses it.",
    )
    endpoint: str | None = Field(
        None, pattern=r"^https?://.+", description="S3 endpoint URL (MinIO, Ceph, ...)."
    )
    region: str | None = Field(None, description="S3 region.")
    credentials_secret: SecretName | None = Field(
        None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the stage "
        "pods, in the FineTuneJob's namespace (a Secret name: a DNS-1123 subdomain).",
    )

    cel_rules = (
        CelRule(
            "self.output.startsWith('s3://') || !has(self.endpoint)",
            "storage.endpoint only applies to an s3:// storage.output",
            lambda s: s.output.startswith("s3://") or s.endpoint is None,
            field=".endpoint",
        ),
    )


class PromotionSpec(_Model):
    """Where the serving model lives, and what a new model must beat to replace it."""

    target: Annotated[str, Matching(URI_PATTERN, f"{_S3_RULES} or file://<path>")] = Field(
        ...,
        description="Prefix serving reads the model from (same endpoint and credentials as "
        "storage). Each promoted model is a version under <target>/versions/<version>/; "
        "<target>/current.json, written last, names the one in use (readers never see a "
        "half-written model) and the previous one (for rollback).",
    )
    min_improvement: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="The new model's test perplexity must be lower than the baseline's and the "
        "current champion's by at least this share (0.01: 1% lower). Both are scored on this "
        "run's test split, so the comparison is fair when the data changed.",
    )
    min_bleu_improvement: float | None = Field(
        None,
        ge=0.0,
        description="If set, BLEU must also beat the baseline's and the champion's by at least "
        "this many points (needs evaluation.bleu).",
    )


class MlflowSpec(_Model):
    """An MLflow tracking server that records each run."""

    tracking_uri: str = Field(
        ...,
        pattern=r"^https?://.+",
        description="The MLflow tracking server, e.g. http://mlflow.mlflow.svc:5000 (REST API; "
        "artifacts go through its proxied artifact store, mlflow server --serve-artifacts).",
    )
    experiment: str = Field(
        "kubetune",
        min_length=1,
        max_length=256,
        description="Experiment name; created if it does not exist.",
    )
    credentials_secret: SecretName | None = Field(
        None,
        description="Secret with MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD, in the FineTuneJob's namespace.",
    )


class TrackingSpec(_Model):
    """Experiment tracking. Tracking failures never fail a stage: they are reported."""

    mlflow: MlflowSpec | None = Field(None, description="Record runs in MLflow.")


class RetrainSpec(_Model):
    """When to train again without a spec change: on a schedule, or when the data changed."""

    schedule: str | None = Field(
        None,
        min_length=9,
        max_length=128,
        description="A cron schedule (5 fields, UTC: minute hour day-of-month month "
        "day-of-week, e.g. '0 3 * * 1' for 03:00 every Monday): a new run starts at each "
        "time, once the current run has finished.",
    )
    on_dataset_change: bool = Field(
        False,
        description="Poll dataset.source (keys, sizes and ETags) every pollIntervalSeconds "
        "and start a new run when it changed since the current run's prepare.",
    )
    poll_interval_seconds: int = Field(
        300, ge=30, le=86400, description="How often onDatasetChange lists the source."
    )
    keep_runs: int | None = Field(
        None,
        ge=1,
        le=100,
        description="Keep the artifacts (dataset, checkpoints, model, report) of this many "
        "newest runs under storage.output/runs/, the current one included; once a run's "
        "evaluation succeeded, its pod deletes this FineTuneJob's older runs. The run whose "
        "model is the promoted champion is kept too, and promoted versions "
        "(promotion.target) are never deleted. Unset: keep every run.",
    )


class FineTuneJobSpec(_Model):
    """The desired fine-tune: model, data, hyperparameters, evaluation, placement, storage."""

    model: ModelSpec = Field(..., description="The model to fine-tune.")
    dataset: DatasetSpec = Field(..., description="The training text.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Hyperparameters.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Test-set metrics."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Pods (cluster mode only)."
    )
    storage: StorageSpec = Field(..., description="Artifact storage.")
    promotion: PromotionSpec | None = Field(
        None,
        description="Promote the fine-tuned model to a serving prefix when it beats the "
        "baseline and the current champion (scored in the evaluate stage).",
    )
    retrain: RetrainSpec | None = Field(
        None,
        description="Retrain without a spec change: on a cron schedule or when the dataset "
        "source changes. A spec change always starts a new run; suspend stops the triggers.",
    )
    tracking: TrackingSpec | None = Field(
        None,
        description="Experiment tracking: parameters, per-step metrics, final metrics of the "
        "model and its baseline, the report and the dataset card (MLflow).",
    )
    queue_name: (
        Annotated[
            str,
            Field(max_length=63),
            Matching(
                LABEL_VALUE_PATTERN,
                "a Kueue LocalQueue name in the FineTuneJob's namespace: at most 63 letters, "
                "digits, '-', '_' or '.', starting and ending with a letter or digit",
            ),
        ]
        | None
    ) = Field(
        None,
        description="Kueue LocalQueue (in this namespace) for every stage Job: the Jobs are "
        "created suspended with the kueue.x-k8s.io/queue-name label and start when Kueue "
        "admits them, a multi-worker training Job as a whole.",
    )
    workload_priority_class_name: (
        Annotated[
            str,
            Field(max_length=63),
            Matching(
                LABEL_VALUE_PATTERN,
                "a Kueue WorkloadPriorityClass name: at most 63 letters, digits, '-', '_' or "
                "'.', starting and ending with a letter or digit",
            ),
        ]
        | None
    ) = Field(
        None,
        description="Kueue WorkloadPriorityClass of the stage Jobs (needs queueName): a "
        "higher one may preempt this job's Jobs in its ClusterQueue, or be preempted by it; "
        "a preempted training pod saves a checkpoint and resumes from it when re-admitted.",
    )
    suspend: bool = Field(False, description="Pause: stop running stage pods; resume later.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete finished child Jobs after this long; results stay."
    )

    cel_rules = (
        CelRule(
            "!has(self.model.fresh) || !has(self.training) || !has(self.training.maxSeqLength) "
            "|| !has(self.model.fresh.nPositions) "
            "|| self.training.maxSeqLength <= self.model.fresh.nPositions",
            "training.maxSeqLength must be <= model.fresh.nPositions",
            lambda s: (
                s.model.fresh is None or s.training.max_seq_length <= s.model.fresh.n_positions
            ),
            field=".training.maxSeqLength",
        ),
        CelRule(
            "!has(self.promotion) || !has(self.promotion.minBleuImprovement) "
            "|| !has(self.evaluation) || !has(self.evaluation.bleu) "
            "|| !has(self.evaluation.bleu.enabled) || self.evaluation.bleu.enabled",
            "promotion.minBleuImprovement needs evaluation.bleu.enabled",
            lambda s: (
                s.promotion is None
                or s.promotion.min_bleu_improvement is None
                or s.evaluation.bleu.enabled
            ),
            field=".promotion.minBleuImprovement",
        ),
        CelRule(
            "!has(self.workloadPriorityClassName) || has(self.queueName)",
            "workloadPriorityClassName needs queueName (Kueue orders the Jobs of a queue)",
            lambda s: s.workload_priority_class_name is None or s.queue_name is not None,
            field=".workloadPriorityClassName",
        ),
        CelRule(
            "!has(self.training) || !has(self.training.lora) || !has(self.model.fresh)",
            "training.lora needs a pre-trained model (model.name or model.uri), not model.fresh",
            lambda s: s.training.lora is None or s.model.fresh is None,
            field=".training.lora",
        ),
    )


# --------------------------------------------------------------------------- status


class Condition(_Model):
    """A Kubernetes-style condition (API conventions, kstatus)."""

    type: str = Field(..., description="Ready, Reconciling, Stalled, DatasetReady, ...")
    status: str = Field(..., pattern=r"^(True|False|Unknown)$", description="True/False/Unknown.")
    reason: str = Field(..., description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str = Field(..., description="RFC 3339 time of the last change.")
    observed_generation: int | None = Field(None, description="Generation this is about.")


class TwinCounts(_Model):
    """Test lines with a twin in the training split under each measure, strictest first."""

    exact: int = Field(0, description="The same cleaned text.")
    normalized: int = Field(
        0, description="The same after lower-casing and dropping punctuation and extra spaces."
    )
    letters_digits: int = Field(0, description="The same letters and digits, in order.")
    near: int = Field(
        0, description="Estimated 5-gram Jaccard >= dataset.clean.nearDuplicateThreshold."
    )


class DatasetStats(_Model):
    """What prepare found."""

    documents: int = Field(0, description="Documents (files or records) read.")
    lines: int = Field(0, description="Non-empty lines read before cleaning.")
    kept_lines: int = Field(0, description="Lines left after cleaning and dedup.")
    dropped_short: int = Field(0, description="Lines dropped for minChars/maxChars.")
    duplicates_removed: int = Field(0, description="Lines dropped as duplicates.")
    train_lines: int = Field(0, description="Lines in the training split.")
    test_lines: int = Field(0, description="Lines in the test split.")
    train_tokens: int = Field(0, description="Tokens in the training split.")
    test_tokens: int = Field(0, description="Tokens in the test split.")
    validation_lines: int | None = Field(
        None, description="training.validation: lines (or examples) in the validation split."
    )
    validation_tokens: int | None = Field(
        None, description="training.validation: tokens in the validation split."
    )
    overlap: int = Field(0, description="Normalised texts found in both splits (always 0).")
    kind: str | None = Field(None, description="dataset.kind the statistics are about.")
    records: int | None = Field(
        None, description="promptCompletion/chat: records read (lines counts them too)."
    )
    bad_records: dict[str, int] | None = Field(
        None,
        description="promptCompletion/chat: records skipped, per cause (missingField, notText, "
        "wrongRoleOrder, emptyPrompt, emptyAnswer, tooShort, tooLong, overLong, missingGroup).",
    )
    train_groups: int | None = Field(None, description="split.groupBy: groups in training.")
    test_groups: int | None = Field(None, description="split.groupBy: groups in the test split.")
    prompt_overlap: int | None = Field(
        None,
        description="promptCompletion/chat: test prompts also in training, exactly or ignoring "
        "case and spacing (always 0: such examples are removed from the test split).",
    )
    answer_overlap: int | None = Field(None, description="The same for answers (always 0).")
    overlap_removed: int | None = Field(
        None,
        description="Test examples removed because their prompt or answer was in training.",
    )
    test_twins: TwinCounts | None = Field(
        None,
        description="Test lines with a twin in the training split, under each measure "
        "(whatever dedup mode was on).",
    )


class Progress(_Model):
    """Training progress, refreshed while the train stage runs."""

    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int = Field(0, description="Optimizer steps planned.")
    percent: int = Field(0, description="step / totalSteps in percent.")
    epoch: float = Field(0.0, description="Epochs done (fractional).")
    loss: float | None = Field(None, description="Recent training loss.")
    tokens_per_second: float | None = Field(None, description="Recent training throughput.")
    eta_seconds: float | None = Field(None, description="Estimated seconds left.")
    updated_at: str | None = Field(None, description="When the trainer last reported.")
    validation_loss: float | None = Field(
        None, description="Latest validation loss (training.validation)."
    )
    validation_perplexity: float | None = Field(None, description="exp(validationLoss).")
    best_validation_loss: float | None = Field(None, description="Lowest validation loss so far.")
    best_step: int | None = Field(None, description="The step of bestValidationLoss.")
    stopped_early: bool | None = Field(
        None, description="Training stopped early: validation loss stopped improving."
    )
    preemptions: int | None = Field(
        None,
        description="Times training stopped on SIGTERM (preemption, eviction, a drained node, "
        "Kueue) after saving a checkpoint; each next pod resumed from it.",
    )
    resumed_from_step: int | None = Field(
        None, description="The checkpoint step the running attempt resumed from."
    )


class PromotionStatus(_Model):
    """The promotion decision of the current run (spec.promotion)."""

    promoted: bool = Field(..., description="The run's model is now the serving version.")
    reason: str = Field(..., description="Promoted, NotBetter or PromotionFailed.")
    message: str | None = Field(None, description="The numbers behind the decision.")
    version: str | None = Field(None, description="The version now in use under the target.")
    previous: str | None = Field(None, description="The version it replaced (for rollback).")
    model_uri: str | None = Field(None, description="Where the version in use is.")
    champion_perplexity: float | None = Field(
        None, description="The replaced champion's perplexity on this run's test split."
    )


class TrackingStatus(_Model):
    """Where the run is tracked (spec.tracking)."""

    run_id: str | None = Field(None, description="The MLflow run id.")
    url: str | None = Field(None, description="The run's page on the tracking server.")
    error: str | None = Field(None, description="The last tracking failure, if any.")


class CheckpointRecord(_Model):
    """One complete checkpoint of the current run, as the trainer listed it."""

    step: int = Field(..., description="Optimizer step.")
    loss: float | None = Field(None, description="Training loss at that step.")
    validation_loss: float | None = Field(None, description="Validation loss at that step.")
    uri: str = Field(..., description="Where it is (resumable Accelerate state and weights).")
    best: bool | None = Field(None, description="The lowest validation loss so far.")


class Comparison(_Model):
    """Metrics of one compareWith endpoint."""

    name: str = Field(..., description="compareWith name.")
    bleu: float | None = Field(None, description="BLEU of the endpoint.")
    perplexity: float | None = Field(
        None, description="Perplexity, if the endpoint gives logprobs."
    )
    chrf: float | None = Field(None, description="chrF of the endpoint's answers.")
    exact_match: float | None = Field(
        None, description="Percent of answers equal to the reference (whitespace normalised)."
    )
    note: str | None = Field(None, description="Why a metric is missing.")


class Results(_Model):
    """The evaluation's numbers."""

    perplexity: float | None = Field(None, description="Test perplexity of the fine-tuned model.")
    baseline_perplexity: float | None = Field(None, description="Test perplexity of the base.")
    perplexity_delta: float | None = Field(None, description="perplexity - baselinePerplexity.")
    bleu: float | None = Field(None, description="Test BLEU of the fine-tuned model.")
    baseline_bleu: float | None = Field(None, description="Test BLEU of the base model.")
    bleu_delta: float | None = Field(None, description="bleu - baselineBleu.")
    bleu_signature: str | None = Field(None, description="sacrebleu signature.")
    chrf: float | None = Field(
        None, description="promptCompletion/chat: chrF of the fine-tuned model's answers."
    )
    baseline_chrf: float | None = Field(None, description="chrF of the base model's answers.")
    exact_match: float | None = Field(
        None,
        description="promptCompletion/chat: percent of held-out prompts the fine-tuned model "
        "answers exactly (after whitespace normalisation).",
    )
    baseline_exact_match: float | None = Field(None, description="The same for the base model.")
    chrf_signature: str | None = Field(None, description="sacrebleu chrF signature.")
    comparisons: list[Comparison] = Field(default_factory=list, description="compareWith results.")


class Artifacts(_Model):
    """Where the outputs are."""

    dataset: str | None = Field(None, description="Prepared dataset prefix.")
    model: str | None = Field(None, description="Fine-tuned model prefix (save_pretrained).")
    last_checkpoint: str | None = Field(None, description="Newest complete checkpoint.")
    report: str | None = Field(None, description="Report (Markdown) URI.")


class RunRecord(_Model):
    """An earlier run (one per spec generation) kept for GitOps history."""

    run: str = Field(..., description="Run id.")
    generation: int = Field(..., description="metadata.generation the run was for.")
    phase: str = Field(..., description="Final or last phase.")
    output: str | None = Field(None, description="Output prefix of that run.")
    results: Results | None = Field(None, description="Its results, if it got that far.")
    completion_time: str | None = Field(None, description="When it ended.")
    trigger: str | None = Field(
        None, description="Why it started: SpecChange, Schedule, DatasetChanged or Manual."
    )
    promoted: bool | None = Field(None, description="Its model was promoted (spec.promotion).")
    artifacts_deleted: bool | None = Field(
        None, description="Its artifacts under output were deleted (spec.retrain.keepRuns)."
    )


class StageStatus(_Model):
    """One stage's child Job and its timing."""

    job: str | None = Field(None, description="Child Job name.")
    state: str | None = Field(None, description="Pending, Running, Succeeded or Failed.")
    start_time: str | None = Field(None, description="When the Job was created.")
    completion_time: str | None = Field(None, description="When it finished.")
    message: str | None = Field(None, description="Last message (failure reason).")
    failed_attempts: int | None = Field(
        None, description="Attempts (pods) of this stage that failed so far; the Job retries."
    )


class FineTuneJobStatus(_Model):
    """Observed state, written only by the operator (or the local runner)."""

    phase: Phase | None = Field(None, description="Where the current run is.")
    reason: str | None = Field(
        None,
        description="Why the run is in its phase (a Reason, e.g. StagePending, OOMKilled); "
        "the message has the details.",
    )
    observed_generation: int | None = Field(None, description="Generation the status is about.")
    run: str | None = Field(
        None,
        description="Current run id: g<generation>, and -r<n> for the n-th retrain of that "
        "generation (spec.retrain or the kubetune.io/retrain annotation).",
    )
    trigger: str | None = Field(
        None,
        description="Why the current run started: SpecChange, Schedule, DatasetChanged or Manual.",
    )
    next_run_at: str | None = Field(
        None, description="spec.retrain.schedule: when the next scheduled run starts (UTC)."
    )
    dataset_checked_at: str | None = Field(
        None, description="spec.retrain.onDatasetChange: when the source was last listed."
    )
    output: str | None = Field(None, description="Output prefix of the current run.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    stages: dict[str, StageStatus] = Field(
        default_factory=dict, description="prepare, train and evaluate Jobs."
    )
    dataset: DatasetStats | None = Field(None, description="Dataset statistics after prepare.")
    progress: Progress | None = Field(None, description="Training progress.")
    checkpoints: list[CheckpointRecord] = Field(
        default_factory=list,
        description="Complete checkpoints of the current run, oldest first (at most "
        "training.keepCheckpoints, plus the best by validation loss): pick one to evaluate or "
        "export with `kubetune evaluate --checkpoint` / `kubetune export`.",
    )
    results: Results | None = Field(None, description="Evaluation results.")
    promotion: PromotionStatus | None = Field(
        None, description="spec.promotion: whether this run's model was promoted, and why."
    )
    tracking: TrackingStatus | None = Field(
        None, description="spec.tracking: the experiment tracker's run."
    )
    artifacts: Artifacts | None = Field(None, description="Artifact URIs.")
    history: list[RunRecord] = Field(
        default_factory=list, description="Earlier runs, newest first."
    )
    start_time: str | None = Field(None, description="When the current run started.")
    completion_time: str | None = Field(None, description="When the current run ended.")
    message: str | None = Field(None, description="Summary of the current state.")


class ObjectMeta(BaseModel):
    """The part of metadata the CLI and operator read."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=63)
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(BaseModel):
    """A whole FineTuneJob manifest."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: str = Field(API_VERSION, alias="apiVersion")
    kind: str = Field(KIND)
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @model_validator(mode="after")
    def _check_type(self) -> FineTuneJob:
        if self.api_version != API_VERSION or self.kind != KIND:
            raise ValueError(
                f"expected apiVersion {API_VERSION} and kind {KIND}, "
                f"got {self.api_version} {self.kind}"
            )
        return self

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------- parsing


class ManifestError(ValueError):
    """A manifest that does not parse; the message names each bad field and what to do."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: invalid FineTuneJob:\n{lines}")


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field (check spelling; fields are camelCase, see `kubectl explain ftj.spec`)"
    elif err.get("type") == "missing":
        msg = "required field is missing"
    inp = err.get("input")
    if err.get("type") not in ("missing", "extra_forbidden") and isinstance(
        inp, (str, int, float, bool)
    ):
        msg = f"{msg} (got {inp!r})"
    return f"{loc}: {msg}" if loc else msg


def parse_job(data: Any, source: str = "manifest") -> FineTuneJob:
    """Validate a manifest dict; raise :class:`ManifestError` listing every problem at once."""
    if not isinstance(data, dict):
        raise ManifestError(source, ["the document is not a mapping (expected a FineTuneJob)"])
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(source, [_format_error(e) for e in exc.errors()]) from None  # type: ignore[arg-type]


def load_job(path: str | Path) -> FineTuneJob:
    """Read a FineTuneJob from a YAML or JSON file (the first FineTuneJob document in it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(str(path), [f"not valid YAML: {exc}"]) from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if not jobs:
        raise ManifestError(str(path), [f"no document with kind: {KIND}"])
    return parse_job(jobs[0], str(path))


# --------------------------------------------------------------------------- building


def job_manifest(
    name: str,
    base: Mapping[str, Any] | None = None,
    *,
    namespace: str | None = None,
    model: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    resources: Mapping[str, Any] | None = None,
    storage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A FineTuneJob manifest in wire form (camelCase, as ``kubectl apply`` takes it).

    ``base`` is a ``spec`` to start from (an example's, a suite's defaults); each section
    given is laid over the base's section of the same name key by key, so
    ``training={"maxSteps": 20}`` changes one hyperparameter and keeps the others. A key's
    value replaces the base's whole (nested mappings are not merged); to replace a whole
    section, leave it out of ``base``. Nothing is validated or defaulted here: wrap it in
    :func:`parse_job` for a :class:`FineTuneJob`, or apply the dict to a cluster. Tests and
    benchmarks build every job with it::

        job = parse_job(job_manifest(
            "demo",
            model={"name": "gpt2"},
            dataset={"source": "s3://corpora/tldr/pages/"},
            storage={"output": "s3://runs/demo/"},
        ))
    """
    spec: dict[str, Any] = copy.deepcopy(dict(base or {}))
    sections = {
        "model": model,
        "dataset": dataset,
        "training": training,
        "evaluation": evaluation,
        "resources": resources,
        "storage": storage,
    }
    for section, values in sections.items():
        if values is not None:
            spec[section] = {**spec.get(section, {}), **copy.deepcopy(dict(values))}
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}
