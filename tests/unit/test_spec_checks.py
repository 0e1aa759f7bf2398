"""Cluster-only spec rules (kubetune_operator.spec_checks): what local mode allows, pods cannot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.schema import FineTuneJobSpec, job_manifest, load_job, parse_job
from kubetune_operator.spec_checks import cluster_spec_problems, file_output_problem

REPO = Path(__file__).resolve().parents[2]


def spec(output: str, **sections: dict[str, Any]) -> FineTuneJobSpec:
    base = {"model": {"name": "gpt2"}, "dataset": {"source": "s3://corpora/tldr/"}}
    manifest = job_manifest("x", {**base, **sections}, storage={"output": output})
    return parse_job(manifest).spec


@pytest.mark.parametrize("output", ["file:///etc", "file://runs/quickstart", "file://../out"])
def test_file_output_is_refused_on_a_cluster_naming_the_field_and_the_fix(output: str) -> None:
    (problem,) = cluster_spec_problems(spec(output))
    assert problem.startswith(f"spec.storage.output {output} is a file:// path")
    assert "s3://" in problem and "kubetune run" in problem


def test_the_scheme_is_compared_without_case() -> None:
    assert file_output_problem("FILE:///data/x") is not None


def test_s3_output_has_no_cluster_problem() -> None:
    assert cluster_spec_problems(spec("s3://runs/tldr/")) == []
    assert file_output_problem("s3://runs/tldr/") is None


def test_file_inputs_stay_allowed_an_image_may_carry_them() -> None:
    with_file_inputs = spec(
        "s3://runs/tldr/",
        model={"uri": "file:///models/gpt2"},
        dataset={"source": "file:///data/tldr/"},
    )
    assert cluster_spec_problems(with_file_inputs) == []


def test_a_harness_whose_pods_share_a_file_system_may_allow_file_outputs() -> None:
    assert cluster_spec_problems(spec("file:///shared/runs"), allow_file_output=True) == []


# Examples for `kubetune run` on one machine: they write file:// outputs.
LOCAL_EXAMPLES = {
    "quickstart.yaml",
    "quickstart-base.yaml",
    "tldr-chat.yaml",
    "tldr-prompt-completion.yaml",
}


def test_cluster_examples_have_no_cluster_problem_and_local_examples_are_local_only() -> None:
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        if "kind: FineTuneJob" not in path.read_text():
            continue
        problems = cluster_spec_problems(load_job(path).spec)
        if path.name in LOCAL_EXAMPLES:
            assert problems, f"{path.name} writes file:// (local mode): expected a problem"
        else:
            assert problems == [], f"{path.name}: {problems}"
