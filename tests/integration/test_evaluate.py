"""The evaluate stage end to end on file:// storage with tiny fine-tuned and baseline models."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
import torch
from tiny_eval import N_POSITIONS, make_job, one_thread, tiny_gpt2, write_run

from kubetune.contract import StageError
from kubetune.layout import RunLayout
from kubetune.results import EvaluateResult
from kubetune_trainer import evaluate
from kubetune_trainer.bleu import context_token_id, generate_continuations, select_samples
from kubetune_trainer.context import make_context
from kubetune_trainer.perplexity import score_sequences


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("evaluate") / "out"
    return write_run(root) | {"root": root}


def _run_copy(built: dict[str, Any], tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(built["root"], out)
    return out


def _evaluate(out: Path, tmp_path: Path, **evaluation: Any) -> EvaluateResult:
    ctx = make_context(make_job(f"file://{out}", **evaluation), scratch=tmp_path / "scratch")
    return evaluate.run(ctx)


def test_evaluate_scores_fine_tuned_and_baseline(built: dict[str, Any], tmp_path: Path) -> None:
    out = _run_copy(built, tmp_path)
    result = _evaluate(out, tmp_path)
    ft, base = result.fine_tuned, result.baseline
    assert base is not None
    for scores in (ft, base):
        assert scores.perplexity is not None and math.isfinite(scores.perplexity)
        assert scores.predicted_tokens == sum(map(len, built["test_ids"]))
        assert scores.bleu is not None and 0.0 <= scores.bleu <= 100.0
        assert scores.bleu_samples == 40
    # The baseline of a fresh model is its untrained init: training must have helped.
    assert base.perplexity is not None and ft.perplexity is not None
    assert ft.perplexity < base.perplexity / 2
    assert result.bleu_signature and result.bleu_signature.startswith("nrefs:1|")

    # The stored result is the returned one, and it was written after the samples.
    stored = EvaluateResult.model_validate_json((out / RunLayout.EVAL_RESULT).read_text())
    assert stored == result
    samples_file = out / RunLayout.EVAL_SAMPLES
    assert samples_file.stat().st_mtime_ns <= (out / RunLayout.EVAL_RESULT).stat().st_mtime_ns
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    # Every generation BLEU scored is kept: sacrebleu recomputes the score from the file.
    assert len(rows) == ft.bleu_samples
    recomputed = sacrebleu.corpus_bleu(
        [r["fine_tuned"] for r in rows], [[r["reference"] for r in rows]]
    ).score
    assert ft.bleu == pytest.approx(recomputed, abs=1e-9)
    for row in rows:
        assert set(row) == {"prompt", "reference", "fine_tuned", "baseline"}
        assert "\n" not in row["fine_tuned"] and "\n" not in row["baseline"]
        assert row["prompt"] and row["reference"]


def test_evaluate_perplexity_equals_direct_scoring(built: dict[str, Any], tmp_path: Path) -> None:
    out = _run_copy(built, tmp_path)
    result = _evaluate(out, tmp_path, baseline=False, bleu={"enabled": False})
    tok = built["tokenizer"]
    direct = score_sequences(
        built["model"],
        built["test_ids"],
        context_token=context_token_id(tok),
        max_length=N_POSITIONS,
        batch_size=1,
    )
    assert result.fine_tuned.nll_sum == pytest.approx(direct.nll_sum, rel=1e-5)
    assert result.baseline is None


def test_bf16_precision_is_opt_in_and_recorded(built: dict[str, Any], tmp_path: Path) -> None:
    off = {"baseline": False, "bleu": {"enabled": False}}
    fp32 = _evaluate(_run_copy(built, tmp_path / "a"), tmp_path / "a", **off)
    bf16 = _evaluate(_run_copy(built, tmp_path / "b"), tmp_path / "b", precision="bf16", **off)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    a, b = fp32.fine_tuned.nll_sum, bf16.fine_tuned.nll_sum
    assert a is not None and b is not None
    # Rounded matmul inputs move the sum a little, and only a little.
    assert a != b and b == pytest.approx(a, rel=1e-2)


def test_batched_generation_equals_generate_and_one_at_a_time(built: dict[str, Any]) -> None:
    # A random model with sharpened logits: clear argmax margins, long varied continuations,
    # and some rows that hit eos/newline early (so finished rows are dropped mid-batch).
    tok = built["tokenizer"]
    model = tiny_gpt2(len(tok), seed=11).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8)
        model.transformer.wte.weight[tok.eos_token_id].mul_(4)  # eos likely but not certain
    prompts = [s.prompt for s in select_samples(built["test"], 0.5, 40)]
    kwargs: dict[str, Any] = {"max_new_tokens": 40, "max_length": N_POSITIONS}
    batched, _ = generate_continuations(model, tok, prompts, batch_size=16, **kwargs)
    single, _ = generate_continuations(model, tok, prompts, batch_size=1, **kwargs)
    with_generate, _ = generate_continuations(
        model, tok, prompts, batch_size=16, use_generate=True, **kwargs
    )
    assert batched == single == with_generate
    assert all("\n" not in text for text in batched)
    lengths = {len(tok(text)["input_ids"]) for text in batched}
    assert max(lengths) >= 20 and min(lengths) < 10, lengths  # long rows and early stops


def test_evaluate_with_perplexity_off_computes_only_bleu(
    built: dict[str, Any], tmp_path: Path
) -> None:
    out = _run_copy(built, tmp_path)
    result = _evaluate(out, tmp_path, perplexity=False, bleu={"maxSamples": 10, "maxNewTokens": 8})
    assert result.fine_tuned.perplexity is None and result.fine_tuned.predicted_tokens is None
    assert result.fine_tuned.bleu is not None and result.fine_tuned.bleu_samples == 10
    assert result.baseline is not None and result.baseline.bleu is not None
    assert len((out / RunLayout.EVAL_SAMPLES).read_text().splitlines()) == 10


def test_evaluate_with_bleu_off_computes_only_perplexity(
    built: dict[str, Any], tmp_path: Path
) -> None:
    out = _run_copy(built, tmp_path)
    result = _evaluate(out, tmp_path, bleu={"enabled": False}, maxSamples=5)
    assert result.fine_tuned.bleu is None and result.bleu_signature is None
    assert result.fine_tuned.predicted_tokens == sum(map(len, built["test_ids"][:5]))
    assert result.baseline is not None and result.baseline.perplexity is not None
    assert not (out / RunLayout.EVAL_SAMPLES).exists()
    assert result.samples_uri is None


def test_evaluate_without_model_says_to_run_train(built: dict[str, Any], tmp_path: Path) -> None:
    out = _run_copy(built, tmp_path)
    shutil.rmtree(out / RunLayout.MODEL)
    with pytest.raises(StageError, match="run the train stage first"):
        _evaluate(out, tmp_path)
    assert not (out / RunLayout.EVAL_RESULT).exists()


def test_evaluate_rejects_inconsistent_token_offsets(built: dict[str, Any], tmp_path: Path) -> None:
    out = _run_copy(built, tmp_path)
    (out / RunLayout.TEST_TEXT).write_text('{"text": "only one line here", "doc": "x"}\n')
    with pytest.raises(StageError, match="re-run the prepare stage") as info:
        _evaluate(out, tmp_path)
    assert info.value.reason == "DatasetUnusable"
