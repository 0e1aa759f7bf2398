"""The FineTuneJob models: defaults, bounds, cross-field rules and error messages."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from cel_cases import CEL_CASES, CelCase, schema_cel_rules

from kubetune.schema import FineTuneJob, ManifestError, job_manifest, load_job, parse_job

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MINIMAL: dict[str, Any] = job_manifest(
    "tldr-gpt2",
    model={"name": "gpt2"},
    dataset={"source": "s3://corpora/tldr/pages/"},
    storage={"output": "s3://runs/tldr-gpt2/"},
)


def with_spec(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        node = doc["spec"]
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is _DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


_DELETE = object()


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_job(doc)
    return info.value.problems


def test_minimal_manifest_gets_documented_defaults() -> None:
    job = parse_job(MINIMAL)
    assert job.spec.training.epochs == 3
    assert job.spec.training.batch_size == 8
    assert job.spec.dataset.split.test_fraction == 0.1
    assert job.spec.dataset.clean.dedup == "exact"
    assert job.spec.evaluation.bleu.prompt_fraction == 0.5
    assert job.spec.resources.workers == 1


def test_wire_form_round_trips_in_camel_case() -> None:
    job = parse_job(MINIMAL)
    wire = job.to_wire()
    assert wire["spec"]["training"]["gradientAccumulationSteps"] == 1
    assert parse_job(wire) == job


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"training__batchSize": 0}, "spec.training.batchSize"),
        ({"training__precision": "fp8"}, "spec.training.precision"),
        ({"dataset__split__testFraction": 0.0}, "spec.dataset.split.testFraction"),
        ({"dataset__source": "ftp://x"}, "spec.dataset.source"),
        ({"storage__output": "/tmp/x"}, "spec.storage.output"),
        ({"training__learningRte": 1e-4}, "spec.training.learningRte"),
        ({"dataset__source": _DELETE}, "spec.dataset.source"),
    ],
)
def test_bad_field_is_named_in_the_error(change: dict[str, Any], field: str) -> None:
    found = problems(with_spec(**change))
    assert any(p.startswith(field) for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    found = problems(with_spec(training__batchSize=0, training__epochs=-1))
    assert len(found) == 2


@pytest.mark.parametrize("case", CEL_CASES, ids=lambda c: c.id)
def test_cross_field_rule_rejects_its_case_in_python_naming_the_field(case: CelCase) -> None:
    # The same cases go to the API server (tests/cluster/test_operator.py): one table.
    assert problems(case.manifest()) == [f"{case.object_path}: {case.rule.message}"]
    assert case.field.rsplit(".", 1)[-1] in case.rule.message  # the message names the field


@pytest.mark.parametrize("case", CEL_CASES, ids=lambda c: c.id)
def test_valid_counterpart_of_a_cross_field_case_parses(case: CelCase) -> None:
    assert isinstance(parse_job(case.valid_manifest()), FineTuneJob)


def test_every_cel_rule_has_a_case_in_the_table() -> None:
    rules = schema_cel_rules()
    untested = [r.message for r in rules if not any(c.rule is r for c in CEL_CASES)]
    assert rules and not untested, f"add cases to tests/cel_cases.py for: {untested}"


def test_wrong_kind_is_rejected() -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["apiVersion"] = "batch/v1"
    assert any("expected apiVersion kubetune.io/v1alpha1" in p for p in problems(doc))


def test_load_job_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text(
        "kind: FineTuneJob\napiVersion: kubetune.io/v1alpha1\nmetadata: {name: x}\n"
        "spec: {model: {name: gpt2}}\n"
    )
    with pytest.raises(ManifestError) as info:
        load_job(bad)
    assert str(bad) in str(info.value)
    assert "spec.dataset: required field is missing" in str(info.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_job(broken)
    with pytest.raises(ManifestError, match="cannot read the file"):
        load_job(tmp_path / "missing.yaml")


def test_every_example_manifest_is_valid() -> None:
    manifests = sorted(EXAMPLES.rglob("*.yaml"))
    assert manifests, "examples/ has no manifests"
    checked = 0
    for path in manifests:
        text = path.read_text()
        if "kind: FineTuneJob" in text:
            assert isinstance(load_job(path), FineTuneJob)
            checked += 1
    assert checked >= 2
