"""Reruns into the same output never report another run's numbers.

A user changes the split seed, the source, the cleaning, the test fraction or the
learning rate and runs ``kubetune run`` again into the same output. Each must train a
fresh model (never "finish" in 0 steps from the old checkpoint) and score it on its own
test split; and evaluate alone, after a prepare with another split, must refuse to score
the old model, naming what changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from datapaths import tldr_files

from kubetune.contract import StageError
from kubetune.results import EvaluateResult, PrepareResult, TrainResult
from kubetune.schema import FineTuneJob, Reason, job_manifest, parse_job
from kubetune_trainer.local import run_local

pytestmark = pytest.mark.slow

FRESH = {"fresh": {"nLayer": 1, "nHead": 2, "nEmbd": 16, "nPositions": 64, "vocabSize": 300}}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpora")
    files = tldr_files("common")
    out = {}
    for name, chosen in (("a", files[:40]), ("b", files[40:80])):
        (root / name).mkdir()
        for path in chosen:
            shutil.copy(path, root / name / path.name)
        out[name] = (root / name).as_uri() + "/"
    return out


def make_job(output: Path, source: str, **sections: Any) -> FineTuneJob:
    dataset = {"source": source, "format": "markdown", **sections.pop("dataset", {})}
    training = {"maxSteps": 3, "batchSize": 4, "maxSeqLength": 64, **sections.pop("training", {})}
    return parse_job(
        job_manifest(
            "rerun",
            model=FRESH,
            dataset=dataset,
            training=training,
            evaluation={"bleu": {"enabled": False}, "baseline": False, "maxSamples": 50},
            storage={"output": output.as_uri()},
        )
    )


def run_all(job: FineTuneJob, tmp_path: Path, name: str) -> dict[str, Any]:
    run = run_local(job, scratch=tmp_path / f"scratch-{name}", show_progress=False)
    assert run.ok, run.error
    return run.results


@pytest.fixture(scope="module")
def first(corpora: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("first")
    output = tmp / "out"
    job = make_job(output, corpora["a"])
    return {"output": output, "results": run_all(job, tmp, "first"), "job": job}


CHANGES: dict[str, dict[str, Any]] = {
    "split seed": {"dataset": {"split": {"seed": 7}}},
    "test fraction": {"dataset": {"split": {"testFraction": 0.2}}},
    "cleaning": {"dataset": {"clean": {"minChars": 30}}},
    "learning rate": {"training": {"learningRate": 1e-3}},
    "source": {"source": "b"},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_rerun_after_a_change_trains_and_scores_its_own_model(
    change: str,
    first: dict[str, Any],
    corpora: dict[str, str],
    tmp_path: Path,
) -> None:
    output = tmp_path / "out"
    shutil.copytree(first["output"], output)  # the same output as the first run
    sections = dict(CHANGES[change])
    source = corpora[sections.pop("source", "a")]
    before: dict[str, Any] = first["results"]
    after = run_all(make_job(output, source, **sections), tmp_path, change)

    train: TrainResult = after["train"]
    evaluation: EvaluateResult = after["evaluate"]
    prepare: PrepareResult = after["prepare"]
    assert train.resumed_from_step is None and train.steps == 3  # trained, not "done"
    assert train.training_fingerprint != before["train"].training_fingerprint
    assert evaluation.training_fingerprint == train.training_fingerprint
    assert evaluation.dataset_fingerprint == prepare.fingerprint
    assert evaluation.train_test_overlap == 0
    data_changed = change != "learning rate"
    assert (prepare.fingerprint != before["prepare"].fingerprint) == data_changed


def test_evaluate_refuses_a_model_trained_on_another_split(
    first: dict[str, Any], corpora: dict[str, str], tmp_path: Path
) -> None:
    output = tmp_path / "out"
    shutil.copytree(first["output"], output)
    job = make_job(output, corpora["a"], dataset={"split": {"seed": 7}})
    run = run_local(
        job, stages=["prepare", "evaluate"], scratch=tmp_path / "s", show_progress=False
    )
    assert run.failed_stage == "evaluate"
    assert isinstance(run.error, StageError)
    assert run.error.reason == Reason.MODEL_DATASET_MISMATCH.value
    message = str(run.error)
    assert "dataset.split.seed: 42 -> 7" in message
    assert "run the train stage again" in message.lower()
