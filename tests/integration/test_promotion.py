"""Champion vs challenger in the evaluate stage (spec.promotion), on file:// storage.

A first model is promoted; the same model again is not (it does not beat the champion by
the margin); a better one is, naming the one it replaced; an unwritable target leaves the
evaluation standing and the version in use unchanged.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tiny_eval import fit, make_job, one_thread, write_run

from kubetune.layout import RunLayout
from kubetune.results import EvaluateResult
from kubetune.schema import job_manifest, parse_job
from kubetune.storage import open_storage
from kubetune_trainer import evaluate, report
from kubetune_trainer.context import make_context
from kubetune_trainer.promotion import read_current


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("promotion") / "out"
    return write_run(root, n_test=40) | {"root": root}


def evaluate_with_promotion(out: Path, scratch: Path, target: str) -> EvaluateResult:
    job = make_job(f"file://{out}", bleu={"enabled": False})
    manifest = job_manifest("tiny-eval", job.spec.to_wire())
    manifest["spec"]["promotion"] = {"target": target, "minImprovement": 0.01}
    return evaluate.run(make_context(parse_job(manifest), scratch=scratch))


def copy_run(built: dict[str, Any], path: Path) -> Path:
    shutil.copytree(built["root"], path)
    return path


def test_promote_only_a_better_model_and_keep_the_previous_version(
    built: dict[str, Any], tmp_path: Path
) -> None:
    target = f"file://{tmp_path}/serving"
    serving = open_storage(target)

    first = evaluate_with_promotion(copy_run(built, tmp_path / "r1"), tmp_path / "s1", target)
    assert first.promotion is not None and first.promotion.promoted
    assert first.promotion.reason == "Promoted" and first.promotion.version == "v0001"
    assert "of the baseline" in (first.promotion.message or "")
    current = read_current(serving)
    assert current is not None and current.version == "v0001"
    assert (tmp_path / "serving/versions/v0001/tokenizer.json").exists()
    assert current.perplexity == first.fine_tuned.perplexity

    # The same model again: equal to the champion, not 1% better.
    same = evaluate_with_promotion(copy_run(built, tmp_path / "r2"), tmp_path / "s2", target)
    assert same.promotion is not None and not same.promotion.promoted
    assert same.promotion.reason == "NotBetter"
    assert "champion v0001" in (same.promotion.message or "")
    assert same.champion is not None
    assert same.champion.perplexity == pytest.approx(same.fine_tuned.perplexity, rel=1e-9)
    current = read_current(serving)
    assert current is not None and current.version == "v0001"

    # A better model: trained further, scored on the same test split as the champion.
    out = copy_run(built, tmp_path / "r3")
    model = fit(built["model"], built["train_ids"], built["tokenizer"].eos_token_id, steps=80)
    model.save_pretrained(tmp_path / "better")
    open_storage(f"file://{out}").upload_dir(tmp_path / "better", RunLayout.MODEL)
    better = evaluate_with_promotion(out, tmp_path / "s3", target)
    assert better.promotion is not None and better.promotion.promoted, better.promotion
    assert (better.promotion.version, better.promotion.previous) == ("v0002", "v0001")
    assert better.promotion.champion_perplexity == pytest.approx(first.fine_tuned.perplexity)
    pointer = json.loads((tmp_path / "serving/current.json").read_text())
    assert pointer["version"] == "v0002" and pointer["previous"] == "v0001"

    # The report says what was decided and against which champion.
    job = make_job(f"file://{out}", bleu={"enabled": False})
    report.run(make_context(job, scratch=tmp_path / "s4"))
    markdown = (out / RunLayout.REPORT_MD).read_text()
    assert "## Promotion" in markdown and "v0002" in markdown and "v0001" in markdown


def test_an_unwritable_target_fails_the_promotion_not_the_evaluation(
    built: dict[str, Any], tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the target's parent should be")
    out = copy_run(built, tmp_path / "r")
    result = evaluate_with_promotion(out, tmp_path / "s", f"file://{blocker}/serving")
    assert result.promotion is not None and not result.promotion.promoted
    assert result.promotion.reason == "PromotionFailed"
    assert str(blocker) in (result.promotion.message or "")
    assert result.fine_tuned.perplexity is not None
    saved = EvaluateResult.model_validate_json((out / RunLayout.EVAL_RESULT).read_text())
    assert saved.promotion == result.promotion


def test_promote_and_rollback_by_hand(built: dict[str, Any], tmp_path: Path) -> None:
    import yaml

    from kubetune.cli import main

    out = copy_run(built, tmp_path / "r")
    target = f"file://{tmp_path}/serving"
    job = make_job(f"file://{out}", bleu={"enabled": False})
    manifest = job_manifest("tiny-eval", job.spec.to_wire())
    manifest["spec"]["promotion"] = {"target": target, "minImprovement": 0.01}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(manifest))
    # Evaluated without promotion first: nothing was in use, so the rule needs no champion.
    evaluate.run(
        make_context(make_job(f"file://{out}", bleu={"enabled": False}), scratch=tmp_path / "s")
    )
    assert main(["promote", "--job", str(job_file)]) == 0
    assert main(["promote", "--job", str(job_file), "--force"]) == 0
    serving = open_storage(target)
    current = read_current(serving)
    assert current is not None and (current.version, current.previous) == ("v0002", "v0001")
    # Without --force, a run compared with no champion is not judged against v0002.
    assert main(["promote", "--job", str(job_file)]) == 3
    assert main(["rollback", "--target", target]) == 0
    current = read_current(serving)
    assert current is not None and current.version == "v0001"
    assert current.rolled_back_from == "v0002"
    assert main(["rollback", "--job", str(job_file)]) != 0  # v0001 has no previous version
