"""BLEU on greedy continuations of test lines (sacrebleu corpus BLEU, signature recorded).

Usage::

    from kubetune_trainer.bleu import select_samples, generate_continuations, corpus_bleu
    samples = select_samples(test_texts, prompt_fraction=0.5, max_samples=500)
    hyps, _ = generate_continuations(model, tok, [s.prompt for s in samples], max_new_tokens=48)
    score, signature = corpus_bleu(hyps, [s.reference for s in samples])

The task: the prompt is the first ``prompt_fraction`` of a line's words (at
least one word, leaving at least one word of reference), the reference is the
rest of the line. Lines with fewer than two words cannot be split and are
skipped. The samples are the first ``max_samples`` splittable lines of
``dataset/test.jsonl`` in file order (deterministic: prepare already shuffled
the split with its seed).

Generation is greedy with the KV cache, in batches of prompts sorted by length
and left-padded, each prompt starting with the same context token as
perplexity (eos/bos). A continuation ends at the first newline or eos, because
a reference never runs past its line.

promptCompletion and chat datasets (:func:`generate_answers`): the prompt is an
example's token ids before its answer, the reference is the answer; generation
stops at eos only (or at the chat template's one-token end-of-turn marker), and
the answers are scored with BLEU, chrF (:func:`corpus_chrf`) and exact match
(:func:`exact_match`). Both modes share the decoding loop (:func:`generate_ids`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: remote.py needs none of it
    import torch


@dataclass(frozen=True)
class BleuSample:
    """One test line split into the prompt the model sees and the reference it should produce."""

    prompt: str
    reference: str


def split_prompt(text: str, prompt_fraction: float) -> BleuSample | None:
    """Split ``text`` by words; None when it has fewer than two words."""
    words = text.split()
    if len(words) < 2:
        return None
    n_prompt = min(max(int(len(words) * prompt_fraction), 1), len(words) - 1)
    return BleuSample(" ".join(words[:n_prompt]), " ".join(words[n_prompt:]))


def select_samples(
    texts: Sequence[str], prompt_fraction: float, max_samples: int
) -> list[BleuSample]:
    """The first ``max_samples`` splittable lines, split into prompt and reference."""
    samples = []
    for text in texts:
        sample = split_prompt(text, prompt_fraction)
        if sample is not None:
            samples.append(sample)
            if len(samples) >= max_samples:
                break
    return samples


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """sacrebleu corpus BLEU (default 13a tokenisation, exp smoothing) and its signature."""
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """sacrebleu corpus chrF (character 6-grams, beta 2, default settings) and its signature."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def normalize_answer(text: str) -> str:
    """Whitespace-normalised text: what exact match compares."""
    return " ".join(text.split())


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Percent of hypotheses equal to their reference after whitespace normalisation."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(
        normalize_answer(h) == normalize_answer(r)
        for h, r in zip(hypotheses, references, strict=True)
    )
    return 100.0 * hits / len(references)


def stop_token_mask(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Boolean [vocab_size]: True for tokens whose text contains a newline."""
    import torch

    size = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[:size] = torch.tensor(["\n" in t for t in texts], dtype=torch.bool)
    return mask


def context_token_id(tokenizer: Any) -> int | None:
    """The token every scored or generated text starts from: bos if there is one, else eos."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def _cut(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def _greedy_compacting(
    model: Any,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    max_new_tokens: int,
    stop: torch.Tensor,
) -> list[list[int]]:
    """Greedy decoding with the KV cache that drops each row from the batch once it stops.

    ``generate`` keeps finished rows in the batch until the last one stops; with
    short references most rows stop early, so dropping them saves most of the work.
    Returns each row's new tokens up to and including its stop token.
    """
    import torch
    from transformers import DynamicCache

    rows = input_ids.size(0)
    new: list[list[int]] = [[] for _ in range(rows)]
    alive = torch.arange(rows, device=input_ids.device)
    # Left padding: positions count real tokens only, as generate() does.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    try:  # with the config, the cache knows sliding-window layers (Mistral, Gemma)
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    params = inspect.signature(model.forward).parameters
    # transformers renamed past_key_values to cache (5.x); pass whichever this model takes.
    cache_arg = {"cache" if "cache" in params else "past_key_values": cache}
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        **cache_arg,
        **extra,
    )
    next_pos = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        for row, t in zip(alive.tolist(), token.tolist(), strict=True):
            new[row].append(t)
        done = stop[token]
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, token = alive[keep], token[keep]
            attention, next_pos = attention[keep], next_pos[keep]
        attention = torch.cat([attention, attention.new_ones((attention.size(0), 1))], dim=-1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=next_pos,
            use_cache=True,
            **cache_arg,
        )
        next_pos = next_pos + 1
    return new


def _greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    max_new_tokens: int,
    stop: torch.Tensor,
    pad: int,
    eos: int | None,
) -> list[list[int]]:
    """The same greedy decoding through ``model.generate`` (models without a DynamicCache)."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return stop[input_ids[:, -1]]

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        generation_config=config,
        stopping_criteria=StoppingCriteriaList([_Stop()]),
    )
    return [list(row) for row in out[:, input_ids.size(1) :].tolist()]


def generate_ids(
    model: Any,
    prompts: Sequence[Sequence[int]],
    stop_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    max_length: int | None = None,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    use_generate: bool = False,
) -> tuple[list[list[int]], float]:
    """Greedy new token ids for each already-encoded prompt, and generated tokens/s.

    ``stop_mask`` is a boolean ``[vocab_size]``: a row ends at its first token marked
    True, which is kept as its last id (a row that never stops has ``max_new_tokens``
    ids). Prompts are batched by length and left-padded with ``pad_token_id`` (else
    eos, else 0); those longer than ``max_length - max_new_tokens`` keep their last
    tokens. ``use_generate`` decodes with ``model.generate`` instead of the compacting
    loop (the two give the same tokens; the loop is faster).
    """
    import torch

    device = next(model.parameters()).device
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    if pad is None:
        pad = 0
    stop = stop_mask.to(device)
    is_stop = stop_mask.tolist()  # host copy: no device sync per token below
    limit = max((max_length or 1 << 30) - max_new_tokens, 1)
    encoded = [list(ids)[-limit:] for ids in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[list[int]] = [[] for _ in encoded]
    generated = 0
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids = encoded[i]
                input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[r, width - len(ids) :] = 1
            with (
                torch.no_grad(),
                torch.autocast(
                    device_type=device.type,
                    dtype=autocast_dtype or torch.float32,
                    enabled=autocast_dtype is not None,
                ),
            ):
                args = (model, input_ids.to(device), attention.to(device), max_new_tokens, stop)
                if use_generate:
                    new = _greedy_generate(*args, pad=pad, eos=eos_token_id)
                else:
                    new = _greedy_compacting(*args)
            for r, i in enumerate(rows):
                ids = new[r]
                end = next((k for k, t in enumerate(ids) if is_stop[t]), len(ids))
                outputs[i] = ids[: end + 1]  # the stop token was generated too
                generated += len(outputs[i])
    finally:
        model.train(was_training)
    seconds = max(time.perf_counter() - start, 1e-9)
    return outputs, generated / seconds


def _generate_after_context(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    stop_mask: torch.Tensor,
    **options: Any,
) -> tuple[list[list[int]], float]:
    """:func:`generate_ids` for prompts given without the context token, which goes first
    (bos, else eos: what every line and example starts from in training and scoring)."""
    context = context_token_id(tokenizer)
    start = [context] if context is not None else []
    encoded = [start + list(ids) for ids in prompt_ids]
    return generate_ids(
        model,
        encoded,
        stop_mask,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **options,
    )


def generate_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    max_length: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    use_generate: bool = False,
) -> tuple[list[str], float]:
    """Greedy continuations of ``prompts`` (cut at the first newline), and generated tokens/s.

    Each prompt starts with the context token; generation stops at a token whose text
    has a newline, or at eos (see :func:`generate_ids`).
    """
    vocab_size = int(model.config.vocab_size)
    eos = tokenizer.eos_token_id
    stop_mask = stop_token_mask(tokenizer, vocab_size)
    if eos is not None and eos < vocab_size:
        stop_mask[eos] = True
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    new, tokens_per_second = _generate_after_context(
        model,
        tokenizer,
        prompt_ids,
        stop_mask,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_length=max_length,
        autocast_dtype=autocast_dtype,
        use_generate=use_generate,
    )
    # Keep the stop token's text before its newline (e.g. "." of ".\n").
    outputs = [_cut(tokenizer.decode(ids, skip_special_tokens=True)) for ids in new]
    return outputs, tokens_per_second


def _single_token(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` when the tokenizer reads it as one token (e.g. ``<|im_end|>``)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def cut_answer(text: str, answer_end: str | None = None) -> str:
    """An answer's text before the first ``answer_end`` (stripped, unless blank), stripped."""
    if answer_end:
        marker = answer_end.strip() or answer_end
        text = text.split(marker, 1)[0]
    return text.strip()


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    max_length: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    answer_end: str | None = None,
    use_generate: bool = False,
) -> tuple[list[str], float]:
    """Greedy answers to the prompts of promptCompletion/chat examples, and generated tokens/s.

    ``prompt_ids``: each example's token ids before its answer (the rendered prompt,
    without the context token, which is prepended here as in training). Generation
    stops at eos only (answers may span lines), or at ``answer_end`` when the chat
    template ends an answer with it and it is one token. The answer is decoded without
    special tokens, cut at the first ``answer_end`` (see :func:`cut_answer`) and stripped.
    """
    import torch

    vocab_size = int(model.config.vocab_size)
    eos = tokenizer.eos_token_id
    stop_mask = torch.zeros(vocab_size, dtype=torch.bool)
    stops = [eos]
    if answer_end and answer_end.strip():
        stops.append(_single_token(tokenizer, answer_end.strip()))
    for token in stops:
        if token is not None and 0 <= token < vocab_size:
            stop_mask[token] = True
    new, tokens_per_second = _generate_after_context(
        model,
        tokenizer,
        prompt_ids,
        stop_mask,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_length=max_length,
        autocast_dtype=autocast_dtype,
        use_generate=use_generate,
    )
    is_stop = stop_mask.tolist()
    outputs = []
    for ids in new:
        if ids and is_stop[ids[-1]]:
            ids = ids[:-1]
        outputs.append(cut_answer(tokenizer.decode(ids, skip_special_tokens=True), answer_end))
    return outputs, tokens_per_second
