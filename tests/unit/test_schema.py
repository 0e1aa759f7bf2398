"""The FineTuneJob models: defaults, bounds, cross-field rules and error messages."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from cel_cases import CEL_CASES, FIELD_CASES, CelCase, FieldCase, schema_cel_rules

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
    assert problems(case.manifest()) == [f"{case.python_path}: {case.rule.message}"]
    assert case.field.rsplit(".", 1)[-1] in case.rule.message  # the message names the field


@pytest.mark.parametrize("case", CEL_CASES, ids=lambda c: c.id)
def test_valid_counterpart_of_a_cross_field_case_parses(case: CelCase) -> None:
    assert isinstance(parse_job(case.valid_manifest()), FineTuneJob)


@pytest.mark.parametrize("case", FIELD_CASES, ids=lambda c: c.id)
def test_value_the_job_api_would_refuse_is_refused_naming_the_field(case: FieldCase) -> None:
    # The same cases go to the API server (tests/cluster/test_spec_validation.py): one table.
    found = problems(case.manifest())
    assert len(found) == 1 and found[0].startswith(f"{case.python_path}: "), found


@pytest.mark.parametrize("case", FIELD_CASES, ids=lambda c: c.id)
def test_valid_counterpart_of_a_field_case_parses(case: FieldCase) -> None:
    assert isinstance(parse_job(case.valid_manifest()), FineTuneJob)


@pytest.mark.parametrize(
    ("output", "accepted"),
    [
        ("s3://runs/tldr-gpt2/", True),
        ("s3://runs", True),  # a whole bucket
        ("s3://my.runs-2024/a//b/", True),  # a doubled slash is an empty segment, not a climb
        ("s3://runs/..hidden/x..", True),  # dots inside a segment are part of its name
        ("file://runs/quickstart", True),  # local mode, relative to the current directory
        ("file:///data/runs", True),
        ("file://../runs", True),  # local mode may write next to the checkout
        ("s3://runs/a/..", False),
        ("s3://runs/./a", False),
        ("s3://-runs/a", False),
        ("s3://runs-/a", False),
        ("s3://" + "r" * 64 + "/a", False),
        ("s3:///a", False),
        ("s3://", False),
        ("S3://runs/a", False),
    ],
)
def test_storage_output_must_stay_inside_a_valid_bucket(output: str, accepted: bool) -> None:
    doc = with_spec(storage__output=output)
    if accepted:
        assert parse_job(doc).spec.storage.output == output
    else:
        assert [p.split(":")[0] for p in problems(doc)] == ["spec.storage.output"]


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("4", True),
        ("500m", True),
        ("0.5", True),
        (".5", True),
        ("128Gi", True),
        ("2G", True),
        ("1e3", True),
        ("100Ki", True),
        ("lots", False),
        ("2 GB", False),
        ("32GB", False),
        ("1.5.2", False),
        ("-1", False),
        ("+1", False),
        ("4 ", False),
        ("", False),
        ("1e3.5", False),
    ],
)
def test_cpu_and_memory_use_the_kubernetes_quantity_grammar(value: str, accepted: bool) -> None:
    for field in ("cpu", "memory"):
        doc = with_spec(**{f"resources__{field}": value})
        if accepted:
            assert getattr(parse_job(doc).spec.resources, field) == value
        else:
            found = problems(doc)
            assert found[0].startswith(f"spec.resources.{field}: must be a Kubernetes quantity")


@pytest.mark.parametrize(
    ("image", "accepted"),
    [
        ("ghcr.io/kubetune/trainer:0.1.0", True),
        ("kubetune/trainer", True),
        ("localhost:5000/trainer:dev", True),
        ("registry.local/team/trainer:v1.2_rc-3", True),
        ("trainer@sha256:" + "0" * 64, True),
        ("", False),
        (" ghcr.io/kubetune/trainer", False),
        ("ghcr.io/kubetune/trainer:0.1.0\n", False),
        ("ghcr.io/Kubetune/trainer", False),  # repository paths are lower case
        ("ghcr.io//trainer", False),
        ("trainer:", False),
    ],
)
def test_image_must_be_an_image_reference(image: str, accepted: bool) -> None:
    doc = with_spec(resources__image=image)
    if accepted:
        assert parse_job(doc).spec.resources.image == image
    else:
        assert problems(doc)[0].startswith("spec.resources.image: must be an image reference")


def test_several_tolerations_and_node_labels_the_job_api_accepts_parse() -> None:
    job = parse_job(
        with_spec(
            resources__nodeSelector={"nvidia.com/gpu.present": "true", "pool": ""},
            resources__tolerations=[
                {"operator": "Exists"},  # every taint
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "pool", "value": "gpu"},  # operator Equal by default
                {"key": "maint", "effect": "NoExecute", "tolerationSeconds": 300, "value": ""},
                {"key": "spot", "operator": "Equal", "value": "yes", "effect": ""},
            ],
        )
    )
    assert [t.operator for t in job.spec.resources.tolerations][:2] == ["Exists", "Exists"]
    wire = job.to_wire()["spec"]["resources"]
    assert wire["tolerations"][1] == {
        "key": "nvidia.com/gpu",
        "operator": "Exists",
        "effect": "NoSchedule",
    }


def test_too_many_node_labels_or_tolerations_are_refused() -> None:
    labels = {f"l{i}": "x" for i in range(65)}
    assert problems(with_spec(resources__nodeSelector=labels))[0].startswith(
        "spec.resources.nodeSelector:"
    )
    many = [{"operator": "Exists"}] * 65
    assert problems(with_spec(resources__tolerations=many))[0].startswith(
        "spec.resources.tolerations:"
    )


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
