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

promptCompletion and chat datasets (``spec.dataset.kind``) are scored as the
model is trained on them, from ``dataset/test.jsonl``'s example rows and
``dataset/test.loss_mask.npy``:

* perplexity over the answer tokens given their prompts: each example is
  ``[context token] + its tokens + [eos]``, and only the answer tokens (loss mask 1)
  and the eos are predicted (at most ``evaluation.maxSamples`` examples);
* generation: greedy answers to the first ``bleu.maxSamples`` examples from their
  tokens before the last answer (``answer_start``), stopped at eos, cut at the
  template's end-of-turn text (``answer_end``), scored against the reference answer
  with BLEU, chrF and exact match (see :mod:`.bleu`);
* endpoints answer the same examples through their chat API (see :mod:`.remote`).

Runs on CUDA when available, else on the CPU; ``evaluation.precision`` picks the
arithmetic (auto: bf16 autocast on CUDA, float32 on the CPU).
"""

from __future__ import annotations

import gc
import json
import logging
import posixpath
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune.contract import StageError
from kubetune.dataset_format import (
    TEST,
    TRAIN,
    ExampleRow,
    answer_start,
    read_examples,
    read_loss_mask,
    read_texts,
    read_tokens,
)
from kubetune.fingerprint import changed
from kubetune.layout import RunLayout, join_uri
from kubetune.results import EvaluateResult, ModelScores, PrepareResult, TrainingRecord
from kubetune.schema import (
    Comparison,
    DatasetKind,
    EvaluationPrecision,
    PromotionStatus,
    Reason,
)
from kubetune.storage import Storage, StorageError
from kubetune_trainer import promotion
from kubetune_trainer.bleu import (
    BleuSample,
    context_token_id,
    corpus_bleu,
    corpus_chrf,
    exact_match,
    generate_answers,
    generate_continuations,
    select_samples,
)
from kubetune_trainer.context import StageContext
from kubetune_trainer.modeling import fuse_activations
from kubetune_trainer.perplexity import score_sequences
from kubetune_trainer.remote import Endpoint, score_endpoint, score_endpoint_answers
from kubetune_trainer.retention import apply_retention

log = logging.getLogger(__name__)

# Windows longer than this gain little on line-level test text and cost memory
# quadratically; a model with a 128k context is scored in 4096-token windows.
MAX_EVAL_CONTEXT = 4096


@dataclass
class _Scored:
    scores: ModelScores
    continuations: list[str]
    signature: str | None = None
    chrf_signature: str | None = None


@dataclass
class _TestSet:
    """What every model is scored on: perplexity sequences and generation prompts.

    Text: ``token_lists`` are test lines, ``samples`` split lines into prompt and
    reference. promptCompletion/chat: ``token_lists`` are examples and
    ``target_masks`` their loss masks (1 = answer token); ``samples`` hold each
    generated example's prompt text and reference answer, ``prompt_ids`` its tokens
    before the answer and ``examples`` its row (for endpoints).
    """

    token_lists: list[list[int]]
    samples: list[BleuSample]
    target_masks: list[list[int]] | None = None
    prompt_ids: list[list[int]] | None = None
    examples: list[ExampleRow] | None = None

    @property
    def instruction(self) -> bool:
        return self.target_masks is not None


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
    model_dir = _download(ctx.storage, ctx.model_key, ctx.scratch / "eval-model")
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
    model = ctx.model_key
    if not ctx.storage.list(model):
        raise StageError(
            f"{ctx.storage.uri(model)}: no fine-tuned model; run the train stage first"
        )
    prepare = _read_model(
        ctx.storage, RunLayout.PREPARE_RESULT, PrepareResult, "run the prepare stage first"
    )
    record = _read_model(
        ctx.storage,
        join_uri(model, posixpath.basename(RunLayout.MODEL_RECORD)),
        TrainingRecord,
        f"the model has no training record; {rerun}",
    )
    same_data = record.train_sha256 == prepare.train_sha256 and (
        record.dataset_fingerprint == prepare.fingerprint
    )
    if not same_data:
        what = changed(record.dataset_inputs or {}, prepare.fingerprint_inputs or {})
        raise StageError(
            f"{ctx.storage.uri(model)} was trained on another dataset than the test "
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


def _device(precision: str) -> tuple[torch.device, torch.dtype | None]:
    """Where models are scored, and the autocast dtype (None: fp32) evaluation.precision asks."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precision == EvaluationPrecision.BF16:
        return device, torch.bfloat16
    if precision == EvaluationPrecision.FP32:
        return device, None
    # auto: a CPU stays in fp32, the result the per-line reference gives to 1e-7; bf16
    # moves a 12-layer model's perplexity by ~4e-4 (bench/RESULTS.md), so it is opt-in there.
    return device, torch.bfloat16 if device.type == "cuda" else None


def precision_name(autocast: torch.dtype | None) -> str:
    return "bf16" if autocast == torch.bfloat16 else "fp32"


# --------------------------------------------------------------------------- scoring


def _score_model(
    ctx: StageContext,
    label: str,
    model: Any,
    tokenizer: Any,
    test: _TestSet,
    answer_end: str | None = None,
) -> _Scored:
    spec = ctx.job.spec.evaluation
    device, autocast = _device(spec.precision)
    fuse_activations(model)
    model.to(device).eval()
    context = _context_length(model, tokenizer)
    scores = ModelScores()
    if spec.perplexity:
        _perplexity(spec, label, model, tokenizer, test, context, autocast, scores)
    continuations: list[str] = []
    signature = chrf_signature = None
    if spec.bleu.enabled and test.samples:
        references = [s.reference for s in test.samples]
        if test.prompt_ids is not None:
            _check_vocab(label, int(model.config.vocab_size), test.prompt_ids)
            continuations, gen_tps = generate_answers(
                model,
                tokenizer,
                test.prompt_ids,
                max_new_tokens=spec.bleu.max_new_tokens,
                batch_size=spec.bleu.batch_size,
                max_length=context,
                autocast_dtype=autocast,
                answer_end=answer_end,
            )
            scores.chrf, chrf_signature = corpus_chrf(continuations, references)
            scores.exact_match = exact_match(continuations, references)
        else:
            continuations, gen_tps = generate_continuations(
                model,
                tokenizer,
                [s.prompt for s in test.samples],
                max_new_tokens=spec.bleu.max_new_tokens,
                batch_size=spec.bleu.batch_size,
                max_length=context,
                autocast_dtype=autocast,
            )
        scores.bleu, signature = corpus_bleu(continuations, references)
        scores.bleu_samples = len(test.samples)
        if test.instruction:
            log.info(
                "%s: BLEU %.2f, chrF %.2f, exact match %.1f%% on %d answers "
                "(%.0f generated tokens/s)",
                label,
                scores.bleu,
                scores.chrf or 0.0,
                scores.exact_match or 0.0,
                len(test.samples),
                gen_tps,
            )
        else:
            log.info(
                "%s: BLEU %.2f on %d lines (%.0f generated tokens/s)",
                label,
                scores.bleu,
                len(test.samples),
                gen_tps,
            )
    return _Scored(scores, continuations, signature, chrf_signature)


def _check_vocab(label: str, vocab: int, token_lists: list[list[int]]) -> None:
    top = max((max(ids) for ids in token_lists if ids), default=0)
    if top >= vocab:
        raise StageError(
            f"dataset/test.tokens.npy holds token id {top} but the {label} model has a "
            f"vocabulary of {vocab}: the dataset was tokenized with another tokenizer; set "
            "model.tokenizer to the model's tokenizer and re-run prepare",
            Reason.INVALID_SPEC,
        )


def _perplexity(
    spec: Any,
    label: str,
    model: Any,
    tokenizer: Any,
    test: _TestSet,
    context: int,
    autocast: torch.dtype | None,
    scores: ModelScores,
) -> None:
    """Score ``test``'s token lists into ``scores`` (answers only for instruction data)."""
    vocab = int(model.config.vocab_size)
    _check_vocab(label, vocab, test.token_lists)
    sequences, masks = test.token_lists, test.target_masks
    if masks is not None:
        # As trained: eos after each example, predicted as the end of its last answer.
        eos = tokenizer.eos_token_id
        if isinstance(eos, int) and eos < vocab:
            sequences = [[*ids, eos] for ids in sequences]
            masks = [[*m, 1] for m in masks]
    result = score_sequences(
        model,
        sequences,
        context_token=context_token_id(tokenizer),
        max_length=context,
        stride=spec.stride,
        batch_size=spec.batch_size,
        autocast_dtype=autocast,
        target_masks=masks,
    )
    if result.predicted_tokens == 0:
        raise StageError(
            "dataset/test.tokens.npy holds no tokens to score; re-run prepare "
            "or disable evaluation.perplexity",
            Reason.DATASET_UNUSABLE,
        )
    scores.perplexity, scores.nll_sum = result.perplexity, result.nll_sum
    scores.predicted_tokens = result.predicted_tokens
    scores.perplexity_lines = len(test.token_lists)
    scores.tokens_per_second = result.tokens_per_second
    log.info(
        "%s: %s %.3f over %d tokens (%.0f tokens/s)",
        label,
        "answer perplexity" if masks is not None else "perplexity",
        result.perplexity,
        result.predicted_tokens,
        result.tokens_per_second,
    )


def _free(model: Any) -> None:
    model.to("cpu")
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _text_test_set(ctx: StageContext, texts: list[str]) -> _TestSet:
    spec = ctx.job.spec.evaluation
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
    return _TestSet(token_lists, samples)


def _instruction_test_set(ctx: StageContext, examples: list[ExampleRow]) -> _TestSet:
    """The examples' tokens and answer masks, and the first bleu.maxSamples prompts."""
    spec = ctx.job.spec.evaluation
    tokens = read_tokens(ctx.storage, TEST, lines=len(examples))
    mask = read_loss_mask(ctx.storage, tokens)
    n_ppl = min(spec.max_samples or tokens.lines, tokens.lines) if spec.perplexity else 0
    n_gen = min(spec.bleu.max_samples, tokens.lines) if spec.bleu.enabled else 0
    n = max(n_ppl, n_gen)
    ids, masks = tokens.line_ids(n), tokens.line_mask(mask, n)
    prompt_ids = [ids[i][: answer_start(masks[i])] for i in range(n_gen)]
    return _TestSet(
        token_lists=ids[:n_ppl],
        target_masks=masks[:n_ppl],
        samples=[BleuSample(e.prompt, e.answer) for e in examples[:n_gen]],
        prompt_ids=prompt_ids,
        examples=examples[:n_gen],
    )


def _sample_rows(
    test: _TestSet,
    fine_tuned: _Scored,
    baseline: _Scored | None,
    remote_texts: dict[str, list[str]],
) -> list[str]:
    """eval/samples.jsonl: each scored generation next to its prompt and reference."""
    rows = []
    for i, sample in enumerate(test.samples):
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
    return rows


def _publish_dir(ctx: StageContext) -> Path:
    """The fine-tuned model as it is promoted: its files and, if it lacks them, the tokenizer's."""
    model_dir = ctx.scratch / "eval-model"
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer_dir = ctx.scratch / "eval-tokenizer"
        if not tokenizer_dir.exists():
            _download(ctx.storage, RunLayout.TOKENIZER, tokenizer_dir)
        for path in tokenizer_dir.iterdir():
            if path.is_file():
                shutil.copy2(path, model_dir / path.name)
    return model_dir


def _same_vocabulary(a: Any, b: Any) -> bool:
    return bool(a.get_vocab() == b.get_vocab())


def _promote(
    ctx: StageContext,
    fine_tuned: _Scored,
    baseline: _Scored | None,
    tokenizer: Any,
    test: _TestSet,
    answer_end: str | None,
) -> tuple[PromotionStatus, ModelScores | None]:
    """spec.promotion: score the champion on this test split, decide, publish if better.

    A target that cannot be read or written gives a ``PromotionFailed`` decision, never
    a failed stage: the evaluation stands, and the version in use is unchanged.
    """
    spec = ctx.job.spec.promotion
    assert spec is not None
    new = promotion.Scores(fine_tuned.scores.perplexity, fine_tuned.scores.bleu)
    base = promotion.Scores(baseline.scores.perplexity, baseline.scores.bleu) if baseline else None
    current: promotion.VersionRecord | None = None
    try:
        target = ctx.open(spec.target)
        current = promotion.read_current(target)
        champion: _Scored | None = None
        if current is not None:
            champion_dir = _download(ctx.open(current.model_uri), "", ctx.scratch / "eval-champion")
            champion_tokenizer = _load_tokenizer(champion_dir)
            if not _same_vocabulary(champion_tokenizer, tokenizer):
                decision = promotion.Decision(
                    False,
                    Reason.NOT_BETTER,
                    f"not promoted: champion {current.version} uses another tokenizer, so "
                    "perplexities are not comparable; promote by hand if this model is "
                    "better (kubetune promote --force)",
                )
                return promotion.status_of(decision, None, current, None), None
            champion_model = _load_model_dir(champion_dir)
            champion = _score_model(
                ctx, f"champion {current.version}", champion_model, tokenizer, test, answer_end
            )
            _free(champion_model)
        rival = (
            promotion.Scores(champion.scores.perplexity, champion.scores.bleu) if champion else None
        )
        decision = promotion.decide(new, base, current, rival, spec)
        record = None
        if decision.promote:
            record = promotion.publish(
                target,
                _publish_dir(ctx),
                new,
                run=ctx.run_identity.to_wire(),
                source=ctx.storage.uri(ctx.model_key),
            )
        log.info("promotion: %s", decision.message)
        status = promotion.status_of(decision, record, current, rival)
        return status, champion.scores if champion else None
    except (StageError, StorageError) as exc:
        message = f"promotion to {spec.target} failed: {exc}"
        log.warning("%s", message)
        failed = promotion.Decision(False, Reason.PROMOTION_FAILED, message)
        return promotion.status_of(failed, None, current, None), None


def eval_keys(model_key: str) -> tuple[str, str]:
    """Where the evaluation of ``model_key`` goes: ``eval/`` for model/, else next to it.

    So scoring a checkpoint by hand (``evaluate --checkpoint``) never replaces the run's
    own evaluation, which the operator and the report read.
    """
    if model_key == RunLayout.MODEL:
        return RunLayout.EVAL_RESULT, RunLayout.EVAL_SAMPLES
    return join_uri(model_key, RunLayout.EVAL_RESULT), join_uri(model_key, RunLayout.EVAL_SAMPLES)


def run(ctx: StageContext, *, answer_end: str | None = None) -> EvaluateResult:
    """Evaluate the fine-tuned model (and baseline, endpoints); write samples then the result.

    ``answer_end``: promptCompletion/chat only, the text the chat template puts after
    an answer (e.g. ``<|im_end|>``); generated answers are cut there. Default: the one
    the prepare stage recorded (``PrepareResult.answer_end``).
    """
    start = time.perf_counter()
    spec = ctx.job.spec.evaluation
    instruction = ctx.job.spec.dataset.is_instruction
    # The test split, checked against kubetune.dataset_format (DatasetUnusable if not).
    examples = read_examples(ctx.storage, TEST) if instruction else None
    texts = [e.text for e in examples] if examples is not None else read_texts(ctx.storage, TEST)
    prepare, record = check_model_trained_on_dataset(ctx)
    overlap = _train_test_overlap(ctx, texts)
    if overlap:
        raise StageError(
            f"{overlap} test lines of {ctx.storage.uri(RunLayout.TEST_TEXT)} are in the "
            "model's training split; run the prepare stage again",
            Reason.DATASET_UNUSABLE,
        )
    if answer_end is None:
        answer_end = prepare.answer_end
    test = (
        _instruction_test_set(ctx, examples) if examples is not None else _text_test_set(ctx, texts)
    )

    model, tokenizer = _load_fine_tuned(ctx)
    fine_tuned = _score_model(ctx, "fine-tuned", model, tokenizer, test, answer_end)
    _free(model)

    baseline: _Scored | None = None
    if spec.baseline:
        base_model = _load_baseline(ctx, tokenizer)
        baseline = _score_model(ctx, "baseline", base_model, tokenizer, test, answer_end)
        _free(base_model)

    promoted: PromotionStatus | None = None
    champion_scores: ModelScores | None = None
    # A checkpoint scored by hand (evaluate --checkpoint) is never promoted automatically.
    if ctx.job.spec.promotion is not None and ctx.model_key == RunLayout.MODEL:
        promoted, champion_scores = _promote(ctx, fine_tuned, baseline, tokenizer, test, answer_end)

    comparisons: list[Comparison] = []
    remote_texts: dict[str, list[str]] = {}
    for entry in spec.compare_with:
        if test.examples is not None:
            comparison, continuations = score_endpoint_answers(
                Endpoint.from_spec(entry),
                test.examples,
                max_new_tokens=spec.bleu.max_new_tokens,
                perplexity=spec.perplexity,
            )
        else:
            comparison, continuations = score_endpoint(
                Endpoint.from_spec(entry),
                test.samples,
                texts[: len(test.samples) or spec.bleu.max_samples],
                max_new_tokens=spec.bleu.max_new_tokens,
                bleu=spec.bleu.enabled,
                perplexity=spec.perplexity,
            )
        comparisons.append(comparison)
        remote_texts[entry.name] = continuations

    # After promotion, so a model just promoted keeps its run; before the result, so the
    # operator learns which runs are gone.
    retention = apply_retention(ctx)

    result_key, samples_key = eval_keys(ctx.model_key)
    samples_uri = None
    if test.samples:
        rows = _sample_rows(test, fine_tuned, baseline, remote_texts)
        ctx.storage.write_text(samples_key, "\n".join(rows) + "\n")
        samples_uri = ctx.storage.uri(samples_key)

    result = EvaluateResult(
        run=ctx.run_identity,
        fine_tuned=fine_tuned.scores,
        baseline=baseline.scores if baseline else None,
        bleu_signature=fine_tuned.signature,
        chrf_signature=fine_tuned.chrf_signature,
        kind=DatasetKind(ctx.job.spec.dataset.kind).value,
        comparisons=comparisons,
        test_lines=len(texts),
        precision=precision_name(_device(spec.precision)[1]),
        dataset_fingerprint=prepare.fingerprint,
        training_fingerprint=record.training_fingerprint,
        train_test_overlap=overlap,
        samples_uri=samples_uri,
        champion=champion_scores,
        promotion=promoted,
        retention=retention,
        seconds=time.perf_counter() - start,
    )
    ctx.storage.write_text(result_key, result.to_json())
    return result
