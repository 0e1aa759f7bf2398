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
"""

from __future__ import annotations

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


def generate_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    max_length: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[list[str], float]:
    """Greedy continuations of ``prompts`` (cut at the first newline), and generated tokens/s.

    Prompts longer than ``max_length - max_new_tokens`` tokens keep their last tokens.
    """
    import torch
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    device = next(model.parameters()).device
    vocab_size = int(model.config.vocab_size)
    context = context_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        pad = 0
    newline_mask = stop_token_mask(tokenizer, vocab_size)
    newline = newline_mask.to(device)
    is_newline = newline_mask.tolist()  # host copy: no device sync per token below

    class _StopAtNewline(StoppingCriteria):
        def __call__(
            self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any
        ) -> torch.BoolTensor:
            return newline[input_ids[:, -1]]  # type: ignore[return-value]

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=tokenizer.bos_token_id,
    )
    limit = max((max_length or 1 << 30) - max_new_tokens, 1)
    encoded = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = ([context] if context is not None else []) + list(ids)
        encoded.append(ids[-limit:])
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
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
            with torch.autocast(
                device_type=device.type,
                dtype=autocast_dtype or torch.float32,
                enabled=autocast_dtype is not None,
            ):
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    generation_config=config,
                    stopping_criteria=StoppingCriteriaList([_StopAtNewline()]),
                )
            new = out[:, width:].tolist()
            for r, i in enumerate(rows):
                ids = new[r]
                if eos is not None and eos in ids:
                    ids = ids[: ids.index(eos)]
                # Count the tokens up to the stop (the rest of the row is padding).
                stop = next((k + 1 for k, t in enumerate(ids) if is_newline[t]), len(ids))
                generated += stop
                outputs[i] = _cut(tokenizer.decode(ids[:stop], skip_special_tokens=True))
    finally:
        model.train(was_training)
    seconds = max(time.perf_counter() - start, 1e-9)
    return outputs, generated / seconds
