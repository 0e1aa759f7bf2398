"""The evaluate stage: test perplexity and BLEU of the fine-tuned model, the baseline and endpoints.

Run it with ``kubetune evaluate --job job.yaml [--output URI]`` (or as part of
``kubetune run job.yaml``); in Python: ``kubetune_trainer.evaluate.run(ctx)``.

Inputs (RunLayout keys): ``dataset/test.jsonl``, ``dataset/test.tokens.npy`` +
``dataset/test.offsets.npy``, ``dataset/tokenizer/`` and ``model/``.
Outputs: ``eval/samples.jsonl`` (every generation BLEU scored, next to its prompt and
reference, so ``sacrebleu`` can recompute the score), then ``eval/evaluate.json``
(:class:`EvaluateResult`) last.

It scores only a model trained on this very dataset: ``model/kubetune-training.json``
must name the dataset fingerprint and train-split hash of ``dataset/prepare.json``
(a rerun with another split seed, source, cleaning or test fraction would otherwise
score a model on lines it was trained on). The result records both fingerprints and
the number of test lines whose text is in the model's training split (0).

* Perplexity (``spec.evaluation.perplexity``) scores the prepared token ids of
  each test line with the eos/bos token as context (see :mod:`.perplexity`).
* BLEU (``spec.evaluation.bleu``) continues the first words of each test line
  greedily and compares with the rest of the line (see :mod:`.bleu`).
* The baseline (``spec.evaluation.baseline``) is ``spec.model`` before
  fine-tuning: the hub model, the model under ``model.uri``, or for
  ``model.fresh`` the same architecture freshly initialised with the training
  seed, i.e. the untrained init.
* ``spec.evaluation.compareWith`` endpoints are scored on the same prompts
  (see :mod:`.remote`).

Runs on CUDA when available (bf16 autocast), else on the CPU in float32.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune.contract import StageError
from kubetune.dataset_format import TEST, TRAIN, read_texts, read_tokens
from kubetune.fingerprint import changed
from kubetune.layout import RunLayout
from kubetune.results import EvaluateResult, ModelScores, PrepareResult, TrainingRecord
from kubetune.schema import Comparison, Reason
from kubetune.storage import Storage, StorageError
from kubetune_trainer.bleu import (
    BleuSample,
    context_token_id,
    corpus_bleu,
    generate_continuations,
    select_samples,
)
from kubetune_trainer.context import StageContext
from kubetune_trainer.perplexity import score_sequences
from kubetune_trainer.remote import Endpoint, score_endpoint

log = logging.getLogger(__name__)

# Windows longer than this gain little on line-level test text and cost memory
# quadratically; a model with a 128k context is scored in 4096-token windows.
MAX_EVAL_CONTEXT = 4096


@dataclass
class _Scored:
    scores: ModelScores
    continuations: list[str]
    signature: str | None = None


# --------------------------------------------------------------------------- models


def _download(storage: Storage, prefix: str, target: Path) -> Path:
    # A fresh directory: files left by an earlier run must not mix with this model.
    shutil.rmtree(target, ignore_errors=True)
    storage.download_dir(prefix, target)
    return target


def _load_model_dir(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(str(path)).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(str(path))


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _load_fine_tuned(ctx: StageContext) -> tuple[Any, Any]:
    model_dir = _download(ctx.storage, RunLayout.MODEL, ctx.scratch / "eval-model")
    has_tokenizer = any(
        (model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")
    )
    tok_dir = (
        model_dir
        if has_tokenizer
        else _download(ctx.storage, RunLayout.TOKENIZER, ctx.scratch / "eval-tokenizer")
    )
    return _load_model_dir(model_dir), _load_tokenizer(tok_dir)


def _load_baseline(ctx: StageContext, tokenizer: Any) -> Any:
    """spec.model before fine-tuning, through the train stage's own loader.

    For ``model.fresh`` that is the same architecture initialised with the
    training seed: the untrained init the fine-tune started from.
    """
    from kubetune_trainer.modeling import load_model

    return load_model(
        ctx.job.spec.model,
        ctx,
        len(tokenizer),
        seed=ctx.job.spec.training.seed,
        eos_token_id=tokenizer.eos_token_id,
    )


def _read_model(storage: Storage, key: str, model: type[Any], what: str) -> Any:
    try:
        return model.model_validate_json(storage.read_text(key))
    except StorageError as exc:
        raise StageError(f"{exc}; {what}", Reason.MODEL_DATASET_MISMATCH) from None
    except ValueError as exc:
        raise StageError(
            f"{storage.uri(key)}: unreadable ({exc}); {what}", Reason.MODEL_DATASET_MISMATCH
        ) from None


def check_model_trained_on_dataset(ctx: StageContext) -> tuple[PrepareResult, TrainingRecord]:
    """Refuse to score a model that was not trained on this output's train split."""
    rerun = "run the train stage again on this dataset"
    if not ctx.storage.list(RunLayout.MODEL):
        raise StageError(
            f"{ctx.storage.uri(RunLayout.MODEL)}: no fine-tuned model; run the train stage first"
        )
    prepare = _read_model(
        ctx.storage, RunLayout.PREPARE_RESULT, PrepareResult, "run the prepare stage first"
    )
    record = _read_model(
        ctx.storage,
        RunLayout.MODEL_RECORD,
        TrainingRecord,
        f"the model has no training record; {rerun}",
    )
    same_data = record.train_sha256 == prepare.train_sha256 and (
        record.dataset_fingerprint == prepare.fingerprint
    )
    if not same_data:
        what = changed(record.dataset_inputs or {}, prepare.fingerprint_inputs or {})
        raise StageError(
            f"{ctx.storage.uri(RunLayout.MODEL)} was trained on another dataset than the test "
            f"split in {ctx.storage.uri(RunLayout.DATASET)} (changed since training: "
            f"{'; '.join(what) or 'the prepared split'}); scoring it would count lines it "
            f"was trained on as test lines. {rerun.capitalize()}",
            Reason.MODEL_DATASET_MISMATCH,
        )
    return prepare, record


def _train_test_overlap(ctx: StageContext, test_texts: list[str]) -> int:
    """Test lines whose text is in the training split the model was trained on."""
    test = set(test_texts)
    return sum(1 for text in read_texts(ctx.storage, TRAIN) if text in test)


def _context_length(model: Any, tokenizer: Any) -> int:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return min(value, MAX_EVAL_CONTEXT)
    value = getattr(tokenizer, "model_max_length", None)
    return min(value, MAX_EVAL_CONTEXT) if isinstance(value, int) and value > 1 else 2048


def _device() -> tuple[torch.device, torch.dtype | None]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), None


# --------------------------------------------------------------------------- scoring


def _score_model(
    ctx: StageContext,
    label: str,
    model: Any,
    tokenizer: Any,
    token_lists: list[list[int]],
    samples: list[BleuSample],
) -> _Scored:
    spec = ctx.job.spec.evaluation
    device, autocast = _device()
    model.to(device).eval()
    context = _context_length(model, tokenizer)
    scores = ModelScores()
    if spec.perplexity:
        vocab = int(model.config.vocab_size)
        top = max((max(ids) for ids in token_lists if ids), default=0)
        if top >= vocab:
            raise StageError(
                f"dataset/test.tokens.npy holds token id {top} but the {label} model has a "
                f"vocabulary of {vocab}: the dataset was tokenized with another tokenizer; set "
                "model.tokenizer to the model's tokenizer and re-run prepare",
                Reason.INVALID_SPEC,
            )
        result = score_sequences(
            model,
            token_lists,
            context_token=context_token_id(tokenizer),
            max_length=context,
            stride=spec.stride,
            batch_size=spec.batch_size,
            autocast_dtype=autocast,
        )
        if result.predicted_tokens == 0:
            raise StageError(
                "dataset/test.tokens.npy holds no tokens to score; re-run prepare "
                "or disable evaluation.perplexity",
                Reason.DATASET_UNUSABLE,
            )
        scores.perplexity, scores.nll_sum = result.perplexity, result.nll_sum
        scores.predicted_tokens = result.predicted_tokens
        scores.perplexity_lines = len(token_lists)
        scores.tokens_per_second = result.tokens_per_second
        log.info(
            "%s: perplexity %.3f over %d tokens (%.0f tokens/s)",
            label,
            result.perplexity,
            result.predicted_tokens,
            result.tokens_per_second,
        )
    continuations: list[str] = []
    signature = None
    if spec.bleu.enabled and samples:
        continuations, gen_tps = generate_continuations(
            model,
            tokenizer,
            [s.prompt for s in samples],
            max_new_tokens=spec.bleu.max_new_tokens,
            batch_size=spec.bleu.batch_size,
            max_length=context,
            autocast_dtype=autocast,
        )
        scores.bleu, signature = corpus_bleu(continuations, [s.reference for s in samples])
        scores.bleu_samples = len(samples)
        log.info(
            "%s: BLEU %.2f on %d lines (%.0f generated tokens/s)",
            label,
            scores.bleu,
            len(samples),
            gen_tps,
        )
    return _Scored(scores, continuations, signature)


def _free(model: Any) -> None:
    model.to("cpu")
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(ctx: StageContext) -> EvaluateResult:
    """Evaluate the fine-tuned model (and baseline, endpoints); write samples then the result."""
    start = time.perf_counter()
    spec = ctx.job.spec.evaluation
    # The test split, checked against kubetune.dataset_format (DatasetUnusable if not).
    texts = read_texts(ctx.storage, TEST)
    prepare, record = check_model_trained_on_dataset(ctx)
    overlap = _train_test_overlap(ctx, texts)
    if overlap:
        raise StageError(
            f"{overlap} test lines of {ctx.storage.uri(RunLayout.TEST_TEXT)} are in the "
            "model's training split; run the prepare stage again",
            Reason.DATASET_UNUSABLE,
        )
    token_lists: list[list[int]] = []
    if spec.perplexity:
        test_tokens = read_tokens(ctx.storage, TEST, lines=len(texts))
        token_lists = test_tokens.line_ids(spec.max_samples or None)
    samples: list[BleuSample] = []
    if spec.bleu.enabled:
        samples = select_samples(texts, spec.bleu.prompt_fraction, spec.bleu.max_samples)
        if not samples:
            raise StageError(
                f"{ctx.storage.uri(RunLayout.TEST_TEXT)}: no test line has two or more words, so "
                "none can be split into prompt and reference; disable evaluation.bleu or use "
                "longer lines",
                Reason.DATASET_UNUSABLE,
            )

    model, tokenizer = _load_fine_tuned(ctx)
    fine_tuned = _score_model(ctx, "fine-tuned", model, tokenizer, token_lists, samples)
    _free(model)

    baseline: _Scored | None = None
    if spec.baseline:
        base_model = _load_baseline(ctx, tokenizer)
        baseline = _score_model(ctx, "baseline", base_model, tokenizer, token_lists, samples)
        _free(base_model)

    comparisons: list[Comparison] = []
    remote_texts: dict[str, list[str]] = {}
    for entry in spec.compare_with:
        comparison, continuations = score_endpoint(
            Endpoint.from_spec(entry),
            samples,
            texts[: len(samples) or spec.bleu.max_samples],
            max_new_tokens=spec.bleu.max_new_tokens,
            bleu=spec.bleu.enabled,
            perplexity=spec.perplexity,
        )
        comparisons.append(comparison)
        remote_texts[entry.name] = continuations

    samples_uri = None
    if samples:
        rows = []
        for i, sample in enumerate(samples):
            row: dict[str, Any] = {
                "prompt": sample.prompt,
                "reference": sample.reference,
                "fine_tuned": fine_tuned.continuations[i],
            }
            if baseline is not None:
                row["baseline"] = baseline.continuations[i]
            others = {k: v[i] for k, v in remote_texts.items() if i < len(v)}
            if others:
                row["comparisons"] = others
            rows.append(json.dumps(row, ensure_ascii=False))
        ctx.storage.write_text(RunLayout.EVAL_SAMPLES, "\n".join(rows) + "\n")
        samples_uri = ctx.storage.uri(RunLayout.EVAL_SAMPLES)

    result = EvaluateResult(
        run=ctx.run_identity,
        fine_tuned=fine_tuned.scores,
        baseline=baseline.scores if baseline else None,
        bleu_signature=fine_tuned.signature,
        comparisons=comparisons,
        test_lines=len(texts),
        dataset_fingerprint=prepare.fingerprint,
        training_fingerprint=record.training_fingerprint,
        train_test_overlap=overlap,
        samples_uri=samples_uri,
        seconds=time.perf_counter() - start,
    )
    ctx.storage.write_text(RunLayout.EVAL_RESULT, result.to_json())
    return result
