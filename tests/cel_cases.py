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
  counterpart and expects it accepted (``tests/cluster/test_spec_validation.py`` too, for
  the rules that mirror the Job API's).

A case's sections replace the base's sections whole (so ``model={"fresh": ...}`` drops the
base's ``model.name``); the valid counterpart changes as little as it can to satisfy the rule.

:data:`FIELD_CASES` is the same kind of table for single-field formats (a ``pattern`` or an
``enum`` in the CRD, the same regex in Python): values the Kubernetes API would refuse when
the operator creates a stage Job (quantities, object names, label keys and values, toleration
enums, image references) and storage URIs that leave their prefix (``s3://b/../x``). Python
(``tests/unit/test_schema.py``), the CRD offline (``tests/unit/test_crd.py``) and a real API
server (``tests/cluster/test_spec_validation.py``) each refuse every case naming its field,
and accept its valid counterpart.
"""

from __future__ import annotations

import re
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

    @property
    def python_path(self) -> str:
        """``object_path`` as ``parse_job`` writes it (``tolerations.0``, not ``[0]``)."""
        return python_path(self.object_path)

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
        "instruction-kind-on-text-files",
        _rule(schema.DatasetSpec, ".format"),
        "spec.dataset.format",
        {"dataset": {"source": "s3://corpora/tldr/", "kind": "chat", "format": "markdown"}},
        {"dataset": {"source": "s3://corpora/tldr/", "kind": "chat", "format": "jsonl"}},
    ),
    CelCase(
        "instruction-kind-with-near-dedup",
        _rule(schema.DatasetSpec, ".clean.dedup"),
        "spec.dataset.clean.dedup",
        {
            "dataset": {
                "source": "s3://corpora/tldr/",
                "kind": "promptCompletion",
                "clean": {"dedup": "near"},
            }
        },
        {
            "dataset": {
                "source": "s3://corpora/tldr/",
                "kind": "promptCompletion",
                "clean": {"dedup": "normalized"},
            }
        },
    ),
    CelCase(
        "group-by-on-text",
        _rule(schema.DatasetSpec, ".split.groupBy"),
        "spec.dataset.split.groupBy",
        {"dataset": {"source": "s3://corpora/tldr/", "split": {"groupBy": "command"}}},
        {
            "dataset": {
                "source": "s3://corpora/tldr/",
                "kind": "chat",
                "split": {"groupBy": "command"},
            }
        },
    ),
    CelCase(
        "promotion-on-bleu-without-bleu",
        _rule(schema.FineTuneJobSpec, ".promotion.minBleuImprovement"),
        "spec.promotion.minBleuImprovement",
        {
            "promotion": {"target": "s3://serving/tldr/", "minBleuImprovement": 1.0},
            "evaluation": {"bleu": {"enabled": False}},
        },
        {
            "promotion": {"target": "s3://serving/tldr/", "minBleuImprovement": 1.0},
            "evaluation": {"bleu": {"enabled": True}},
        },
    ),
    CelCase(
        "evaluation-measures-nothing",
        _rule(schema.EvaluationSpec),
        "spec.evaluation",
        {"evaluation": {"perplexity": False, "bleu": {"enabled": False}}},
        {"evaluation": {"perplexity": False, "bleu": {"enabled": True}}},
    ),
    CelCase(
        "workload-priority-without-queue",
        _rule(schema.FineTuneJobSpec, ".workloadPriorityClassName"),
        "spec.workloadPriorityClassName",
        {"workloadPriorityClassName": "high"},
        {"workloadPriorityClassName": "high", "queueName": "team-a"},
    ),
    CelCase(
        "s3-endpoint-for-file-storage",
        _rule(schema.StorageSpec, ".endpoint"),
        "spec.storage.endpoint",
        {"storage": {"output": "file:///runs/cel-case/", "endpoint": "http://s3:9000"}},
        {"storage": {"output": "s3://runs/cel-case/", "endpoint": "http://s3:9000"}},
    ),
]

# Rules the Kubernetes API applies to a stage Job, checked at apply instead.
JOB_API_CEL_CASES: list[CelCase] = [
    CelCase(
        "priority-class-reserved-for-the-system",
        _rule(schema.ResourcesSpec, ".priorityClassName"),
        "spec.resources.priorityClassName",
        {"resources": {"priorityClassName": "system-node-critical"}},
        {"resources": {"priorityClassName": "batch-low"}},
    ),
    CelCase(
        "node-selector-key-not-a-label-key",
        _rule(schema.ResourcesSpec, ".nodeSelector"),
        "spec.resources.nodeSelector",
        {"resources": {"nodeSelector": {"gpu type": "a100"}}},
        {"resources": {"nodeSelector": {"example.com/gpu-type": "a100"}}},
    ),
    CelCase(
        "node-selector-key-with-two-slashes",
        _rule(schema.ResourcesSpec, ".nodeSelector"),
        "spec.resources.nodeSelector",
        {"resources": {"nodeSelector": {"a/b/c": "x"}}},
        {"resources": {"nodeSelector": {"a.io/b-c": "x"}}},
    ),
    CelCase(
        "toleration-without-key-not-exists",
        _rule(schema.Toleration, ".operator"),
        "spec.resources.tolerations[0].operator",
        {"resources": {"tolerations": [{"operator": "Equal", "effect": "NoSchedule"}]}},
        {"resources": {"tolerations": [{"operator": "Exists", "effect": "NoSchedule"}]}},
    ),
    CelCase(
        "toleration-exists-with-a-value",
        _rule(schema.Toleration, ".value"),
        "spec.resources.tolerations[0].value",
        {"resources": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]}},
        {"resources": {"tolerations": [{"key": "gpu", "operator": "Equal", "value": "yes"}]}},
    ),
    CelCase(
        "toleration-seconds-without-no-execute",
        _rule(schema.Toleration, ".tolerationSeconds"),
        "spec.resources.tolerations[0].tolerationSeconds",
        {
            "resources": {
                "tolerations": [
                    {
                        "key": "gpu",
                        "operator": "Exists",
                        "effect": "NoSchedule",
                        "tolerationSeconds": 60,
                    }
                ]
            }
        },
        {
            "resources": {
                "tolerations": [
                    {
                        "key": "gpu",
                        "operator": "Exists",
                        "effect": "NoExecute",
                        "tolerationSeconds": 60,
                    }
                ]
            }
        },
    ),
]
CEL_CASES += JOB_API_CEL_CASES


def python_path(api_path: str) -> str:
    """An API server field path as ``parse_job`` names it: ``a[0].b`` -> ``a.0.b``."""
    return re.sub(r"\[([^\]]+)\]", r".\1", api_path)


@dataclass(frozen=True)
class FieldCase:
    """A manifest with one malformed value at ``field``, and a counterpart with a valid one."""

    id: str
    field: str  # the path the API server reports, e.g. spec.resources.tolerations[0].operator
    breaking: dict[str, Any]  # spec sections with the malformed value
    keeping: dict[str, Any]  # the same sections with a valid value instead

    @property
    def python_path(self) -> str:
        return python_path(self.field)

    def manifest(self) -> dict[str, Any]:
        return job_manifest("field-case", {**BASE_SPEC, **self.breaking})

    def valid_manifest(self) -> dict[str, Any]:
        return job_manifest("field-case", {**BASE_SPEC, **self.keeping})


def _resources(**values: Any) -> dict[str, Any]:
    return {"resources": values}


def _toleration(**values: Any) -> dict[str, Any]:
    return {"resources": {"tolerations": [values]}}


def _storage(output: str, **values: Any) -> dict[str, Any]:
    return {"storage": {"output": output, **values}}


def _compare_with(**values: Any) -> dict[str, Any]:
    endpoint = {"name": "ollama", "baseUrl": "http://ollama:11434/v1", "model": "llama3"}
    return {"evaluation": {"compareWith": [{**endpoint, **values}]}}


# Values the Job API would refuse when the operator creates a stage Job, and storage URIs
# that leave their prefix: refused at apply. (`file://` outputs are the operator's to
# refuse: local mode writes them; see kubetune_operator.spec_checks.)
FIELD_CASES: list[FieldCase] = [
    FieldCase(
        "cpu-not-a-quantity",
        "spec.resources.cpu",
        _resources(cpu="lots"),
        _resources(cpu="500m"),
    ),
    FieldCase(
        "memory-with-a-space",
        "spec.resources.memory",
        _resources(memory="2 GB"),
        _resources(memory="2G"),
    ),
    FieldCase(
        "memory-in-gigabytes-with-b",
        "spec.resources.memory",
        _resources(memory="32GB"),
        _resources(memory="32Gi"),
    ),
    FieldCase(
        "negative-cpu",
        "spec.resources.cpu",
        _resources(cpu="-1"),
        _resources(cpu="1.5"),
    ),
    FieldCase(
        "service-account-with-a-space",
        "spec.resources.serviceAccountName",
        _resources(serviceAccountName="bad name"),
        _resources(serviceAccountName="trainer"),
    ),
    FieldCase(
        "priority-class-with-capitals",
        "spec.resources.priorityClassName",
        _resources(priorityClassName="Batch_Low"),
        _resources(priorityClassName="batch-low"),
    ),
    FieldCase(
        "toleration-operator-sometimes",
        "spec.resources.tolerations[0].operator",
        _toleration(key="nvidia.com/gpu", operator="Sometimes", effect="NoSchedule"),
        _toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
    ),
    FieldCase(
        "toleration-effect-unknown",
        "spec.resources.tolerations[0].effect",
        _toleration(key="nvidia.com/gpu", operator="Exists", effect="NoRun"),
        _toleration(key="nvidia.com/gpu", operator="Exists", effect="PreferNoSchedule"),
    ),
    FieldCase(
        "toleration-key-with-a-space",
        "spec.resources.tolerations[0].key",
        _toleration(key="gpu node", operator="Exists"),
        _toleration(key="gpu-node", operator="Exists"),
    ),
    FieldCase(
        "toleration-value-too-long",
        "spec.resources.tolerations[0].value",
        _toleration(key="pool", operator="Equal", value="x" * 64),
        _toleration(key="pool", operator="Equal", value="x" * 63),
    ),
    FieldCase(
        "node-selector-value-with-a-space",
        "spec.resources.nodeSelector.pool",
        _resources(nodeSelector={"pool": "gpu nodes"}),
        _resources(nodeSelector={"pool": "gpu-nodes"}),
    ),
    FieldCase(
        "image-empty",
        "spec.resources.image",
        _resources(image=""),
        _resources(image="ghcr.io/kubetune/trainer:0.1.0"),
    ),
    FieldCase(
        "image-with-a-space",
        "spec.resources.image",
        _resources(image="kubetune/trainer :0.1.0"),
        _resources(image="registry.local:5000/kubetune/trainer@sha256:" + "a" * 64),
    ),
    FieldCase(
        "credentials-secret-in-another-namespace",
        "spec.storage.credentialsSecret",
        _storage("s3://runs/field-case/", credentialsSecret="../../kube-system/foo"),
        _storage("s3://runs/field-case/", credentialsSecret="s3-credentials"),
    ),
    FieldCase(
        "api-key-secret-not-a-secret-name",
        "spec.evaluation.compareWith[0].apiKeySecret",
        _compare_with(apiKeySecret="Ollama_Key"),
        _compare_with(apiKeySecret="ollama-key"),
    ),
    FieldCase(
        "output-climbing-out-of-its-prefix",
        "spec.storage.output",
        _storage("s3://runs/../../x"),
        _storage("s3://runs/x/"),
    ),
    FieldCase(
        "output-with-a-dot-segment",
        "spec.storage.output",
        _storage("s3://runs/team/./x"),
        _storage("s3://runs/team/x"),
    ),
    FieldCase(
        "output-bucket-not-a-bucket-name",
        "spec.storage.output",
        _storage("s3://Runs_2024/x/"),
        _storage("s3://runs-2024/x/"),
    ),
    FieldCase(
        "output-bucket-too-short",
        "spec.storage.output",
        _storage("s3://r/x/"),
        _storage("s3://run/x/"),
    ),
    FieldCase(
        "dataset-source-climbing-out-of-its-prefix",
        "spec.dataset.source",
        {"dataset": {"source": "s3://corpora/tldr/../../other/"}},
        {"dataset": {"source": "s3://corpora/tldr/..pages/"}},
    ),
    FieldCase(
        "model-uri-climbing-out-of-its-prefix",
        "spec.model.uri",
        {"model": {"uri": "s3://models/../gpt2/"}},
        {"model": {"uri": "s3://models/gpt2/"}},
    ),
    FieldCase(
        "tokenizer-climbing-out-of-its-prefix",
        "spec.model.tokenizer",
        {"model": {"name": "gpt2", "tokenizer": "s3://models/gpt2/../tok/"}},
        {"model": {"name": "gpt2", "tokenizer": "s3://models/gpt2-tok/"}},
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
