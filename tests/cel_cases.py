"""One table of cross-field cases: each breaks exactly one :class:`~kubetune.schema.CelRule`.

A rule is written once in ``core/kubetune/schema.py`` and enforced twice: as CEL by the API
server (the generated CRD) and in Python by ``parse_job`` (local mode). Both sides read this
table, so they are checked on the same manifests:

* Python: ``tests/unit/test_schema.py`` parses each case and expects exactly the rule's
  message at the path of the object carrying the rule, and parses each valid counterpart;
  it also fails while a rule in the schema has no case here;
* CEL, offline: ``tests/unit/test_crd.py`` finds each case's rule in the generated CRD at
  the path the case expects the API server to name;
* CEL, on a real API server: ``tests/cluster/test_operator.py`` applies each case with
  ``--dry-run=server`` and expects the field path and the message, and applies each valid
  counterpart and expects it accepted.

A case's sections replace the base's sections whole (so ``model={"fresh": ...}`` drops the
base's ``model.name``); the valid counterpart changes as little as it can to satisfy the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune import schema
from kubetune.schema import CelRule, job_manifest

BASE_SPEC: dict[str, Any] = {
    "model": {"name": "gpt2"},
    "dataset": {"source": "s3://corpora/tldr/"},
    "storage": {"output": "s3://runs/cel-case/"},
}


def _rule(model: type[Any], field: str | None = None) -> CelRule:
    """The rule of ``model`` whose ``field`` is ``field`` (a table row names its rule)."""
    (found,) = [r for r in vars(model)["cel_rules"] if r.field == field]
    return found


@dataclass(frozen=True)
class CelCase:
    """A manifest that breaks ``rule`` and only it, and a counterpart that keeps it."""

    id: str
    rule: CelRule
    field: str  # the path the API server reports: the rule's object path, then rule.field
    breaking: dict[str, Any]  # spec sections that break the rule
    keeping: dict[str, Any]  # the same sections changed to keep it

    @property
    def object_path(self) -> str:
        """Where the rule sits (its object's path): Python reports the problem there."""
        return self.field.removesuffix(self.rule.field or "")

    def manifest(self) -> dict[str, Any]:
        return job_manifest("cel-case", {**BASE_SPEC, **self.breaking})

    def valid_manifest(self) -> dict[str, Any]:
        return job_manifest("cel-case", {**BASE_SPEC, **self.keeping})


CEL_CASES: list[CelCase] = [
    CelCase(
        "model-name-and-uri",
        _rule(schema.ModelSpec),
        "spec.model",
        {"model": {"name": "gpt2", "uri": "s3://models/gpt2/"}},
        {"model": {"uri": "s3://models/gpt2/"}},
    ),
    CelCase(
        "model-name-and-fresh",
        _rule(schema.ModelSpec),
        "spec.model",
        {"model": {"name": "gpt2", "fresh": {}}},
        {"model": {"fresh": {}}},
    ),
    CelCase(
        "model-none-of-name-uri-fresh",
        _rule(schema.ModelSpec),
        "spec.model",
        {"model": {}},
        {"model": {"name": "gpt2"}},
    ),
    CelCase(
        "fresh-width-not-a-multiple-of-heads",
        _rule(schema.FreshModelSpec, ".nEmbd"),
        "spec.model.fresh.nEmbd",
        {"model": {"fresh": {"nHead": 3, "nEmbd": 100}}},
        {"model": {"fresh": {"nHead": 3, "nEmbd": 96}}},
    ),
    CelCase(
        "sequence-longer-than-fresh-positions",
        _rule(schema.FineTuneJobSpec, ".training.maxSeqLength"),
        "spec.training.maxSeqLength",
        {"model": {"fresh": {"nPositions": 64}}, "training": {"maxSeqLength": 128}},
        {"model": {"fresh": {"nPositions": 128}}, "training": {"maxSeqLength": 128}},
    ),
    CelCase(
        "lora-on-a-fresh-model",
        _rule(schema.FineTuneJobSpec, ".training.lora"),
        "spec.training.lora",
        {"model": {"fresh": {}}, "training": {"lora": {"r": 8}}},
        {"model": {"name": "gpt2"}, "training": {"lora": {"r": 8}}},
    ),
    CelCase(
        "clean-max-chars-below-min-chars",
        _rule(schema.CleanSpec, ".maxChars"),
        "spec.dataset.clean.maxChars",
        {"dataset": {"source": "s3://corpora/tldr/", "clean": {"minChars": 50, "maxChars": 10}}},
        {"dataset": {"source": "s3://corpora/tldr/", "clean": {"minChars": 50, "maxChars": 50}}},
    ),
    CelCase(
        "evaluation-measures-nothing",
        _rule(schema.EvaluationSpec),
        "spec.evaluation",
        {"evaluation": {"perplexity": False, "bleu": {"enabled": False}}},
        {"evaluation": {"perplexity": False, "bleu": {"enabled": True}}},
    ),
    CelCase(
        "several-workers-without-gpus",
        _rule(schema.ResourcesSpec, ".gpusPerWorker"),
        "spec.resources.gpusPerWorker",
        {"resources": {"workers": 2, "gpusPerWorker": 0}},
        {"resources": {"workers": 2, "gpusPerWorker": 1}},
    ),
    CelCase(
        "s3-endpoint-for-file-storage",
        _rule(schema.StorageSpec, ".endpoint"),
        "spec.storage.endpoint",
        {"storage": {"output": "file:///runs/cel-case/", "endpoint": "http://s3:9000"}},
        {"storage": {"output": "s3://runs/cel-case/", "endpoint": "http://s3:9000"}},
    ),
]


def schema_cel_rules() -> list[CelRule]:
    """Every CelRule declared in kubetune.schema (each model's own, not inherited)."""
    return [
        rule
        for obj in vars(schema).values()
        if isinstance(obj, type)
        for rule in vars(obj).get("cel_rules", ())
    ]
