"""Test-set perplexity of a causal language model: exp(total NLL / total predicted tokens).

Usage::

    from kubetune_trainer.perplexity import score_sequences
    result = score_sequences(model, token_lists, context_token=tok.eos_token_id,
                             max_length=1024, batch_size=8)
    result.perplexity, result.nll_sum, result.predicted_tokens

Conventions (the numbers in the report mean exactly this):

* Each test line is scored as its own text, with ``context_token`` (the eos/bos
  token) prepended: every token of the line is predicted, the first one from
  the context token alone. Without a context token the first token of a line
  is context only and is not counted.
* Perplexity is ``exp(sum of NLL over every predicted token of the split /
  number of predicted tokens)``, summed in float64 over the WHOLE split. It is
  never a mean of per-batch (or per-line) means: those weight short lines as
  much as long ones and give a different number.
* A text longer than ``max_length`` (the model context) is scored in rolling
  windows (the Hugging Face "perplexity of fixed-length models" method): a
  window starts every ``stride`` tokens (default half the context) and
  predicts only the tokens no earlier window predicted, with the tokens before
  them in the window as context. Every token is predicted exactly once.
* Windows are sorted by length and batched with right padding (attention mask
  0 and no target on pads), so many short lines share one forward pass.
* ``target_masks`` (promptCompletion and chat: one 0/1 list per sequence) restricts
  the predicted tokens to those marked 1; the others are context only. The evaluate
  stage scores each example as ``[context token] + prompt and answer + [eos]`` with
  the answer tokens and the eos marked: perplexity over the answers given their
  prompts. Rolling windows, batching and the float64 sum are the same.

Speed (why the code looks the way it does): on a CPU a batch is capped at
``CPU_BATCH_TOKENS`` padded positions (small batches stay in cache and sorted
neighbours pad less), and for the usual decoder-only models (``_SPLIT_HEAD``)
the output layer runs only on the hidden states of predicted positions, in
chunks, taking ``logsumexp`` and the target logit in float32 and summing the NLL
in float64: the full ``[rows, length, vocab]`` logits tensor and its
log-softmax are never built. Other models (e.g. with logit soft-capping, or
wrapped by peft) go through ``model(...).logits`` unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

# Logits of one batch are [rows, length, vocab]; keep them under this many
# values so a big-vocabulary model (e.g. 150k tokens) does not run out of memory.
LOGITS_BUDGET = {"cuda": 512 * 1024 * 1024, "cpu": 64 * 1024 * 1024}
# Padded positions per batch on a CPU. Measured (bench/eval_bench.py, GPT-2 4 x 256,
# vocab 8192, 1 thread): 8 x 512 = 4096-position batches ran ~2x slower than
# 512: activations of a few MiB fall out of cache, and sorted short lines pad
# less in small batches. A GPU wants big batches instead (LOGITS_BUDGET).
CPU_BATCH_TOKENS = 512
# Rows of hidden states sent through the output layer at once (chunk x vocab logits).
HEAD_CHUNK = 256
# Model types whose logits are exactly ``get_output_embeddings()(base model output)``:
# no soft-capping or scaling, so the head may run on the predicted positions alone.
_SPLIT_HEAD = frozenset({"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"})


class PerplexityResult(NamedTuple):
    """Summed NLL (nats, float64), tokens predicted, exp(nll_sum / tokens), throughput."""

    nll_sum: float
    predicted_tokens: int
    perplexity: float
    tokens_per_second: float


@dataclass(frozen=True)
class Window:
    """One forward pass worth of tokens; the last ``targets`` tokens are predicted.

    With ``mask`` (one flag per token), exactly the flagged tokens are predicted
    (``targets`` of them); the first token never is.
    """

    tokens: tuple[int, ...]
    targets: int
    mask: tuple[bool, ...] | None = None

    def predicted(self) -> list[int]:
        """Indices into ``tokens`` of the predicted tokens."""
        n = len(self.tokens)
        if self.mask is None:
            return list(range(n - self.targets, n))
        return [i for i, flag in enumerate(self.mask) if flag]


def perplexity_from_nll(nll_sum: float, predicted_tokens: int) -> float:
    """exp(nll_sum / predicted_tokens); inf when it overflows, nan with no tokens."""
    if predicted_tokens <= 0:
        return math.nan
    try:
        return math.exp(nll_sum / predicted_tokens)
    except OverflowError:
        return math.inf


def rolling_windows(
    ids: Sequence[int],
    context_token: int | None,
    max_length: int,
    stride: int | None = None,
    target_mask: Sequence[int] | None = None,
) -> list[Window]:
    """Split one text into windows of at most ``max_length`` tokens.

    The windows together predict each token of ``ids`` exactly once (all of
    them with a context token; all but the first without one). With
    ``target_mask`` (one 0/1 value per id) only the ids marked 1 are predicted,
    each exactly once, and windows that would predict none are left out.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
    if target_mask is not None and len(target_mask) != len(ids):
        raise ValueError(f"target mask of {len(target_mask)} values for {len(ids)} ids")
    tokens = ([context_token] if context_token is not None else []) + list(ids)
    if len(tokens) < 2:
        return []
    if target_mask is not None:
        flags = ([False] if context_token is not None else []) + [bool(m) for m in target_mask]
        return _masked_windows(tokens, flags, max_length, stride)
    stride = stride or max_length // 2
    # A stride of the whole window would leave a window's first token without context.
    stride = max(1, min(stride, max_length - 1))
    windows = []
    predicted_until = 1  # tokens[0] is context only
    begin = 0
    while True:
        end = min(begin + max_length, len(tokens))
        windows.append(Window(tuple(tokens[begin:end]), end - predicted_until))
        predicted_until = end
        if end == len(tokens):
            return windows
        begin += stride


def _masked_windows(
    tokens: list[int], flags: list[bool], max_length: int, stride: int | None
) -> list[Window]:
    """:func:`rolling_windows` predicting only the flagged tokens (never ``tokens[0]``)."""
    stride = max(1, min(stride or max_length // 2, max_length - 1))
    windows = []
    predicted_until = 1
    begin = 0
    while True:
        end = min(begin + max_length, len(tokens))
        mask = tuple(begin + i >= predicted_until and flags[begin + i] for i in range(end - begin))
        targets = sum(mask)
        if targets:
            windows.append(Window(tuple(tokens[begin:end]), targets, mask))
        predicted_until = end
        if end == len(tokens):
            return windows
        begin += stride


def _batches(windows: list[Window], max_rows: int, max_tokens: int) -> list[list[Window]]:
    """Windows sorted by length, grouped so rows * padded length stays under the budgets."""
    ordered = sorted(windows, key=lambda w: len(w.tokens))
    batches: list[list[Window]] = []
    current: list[Window] = []
    for window in ordered:
        # Sorted ascending: the newest window is the longest, so it sets the padded length.
        rows = len(current) + 1
        if current and (rows > max_rows or rows * len(window.tokens) > max_tokens):
            batches.append(current)
            current = []
        current.append(window)
    if current:
        batches.append(current)
    return batches


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _split_head(model: Any) -> tuple[Any, Any] | None:
    """(base model, output layer) when the logits are just ``head(base(x))``, else None."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None  # e.g. a peft wrapper: let its own forward apply the adapters
    config = model.config
    if getattr(config, "model_type", None) not in _SPLIT_HEAD:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if body is None or body is model or not isinstance(head, torch.nn.Linear):
        return None
    return body, head


def _target_nll(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-target NLL (float32) from hidden states, ``HEAD_CHUNK`` rows of logits at a time."""
    out = []
    for begin in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = head(hidden[begin : begin + HEAD_CHUNK]).float()
        target = targets[begin : begin + HEAD_CHUNK]
        # One fused log-softmax pass is ~3x cheaper on a CPU than logsumexp's five.
        logp = torch.log_softmax(logits, dim=-1)
        out.append(-logp.gather(1, target[:, None]).squeeze(1))
    return torch.cat(out)


@torch.inference_mode()
def _batch_nll(
    model: Any,
    batch: list[Window],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    split: tuple[Any, Any] | None = None,
) -> tuple[float, int]:
    length = max(len(w.tokens) for w in batch)
    input_ids = torch.zeros((len(batch), length), dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, window in enumerate(batch):
        n = len(window.tokens)
        ids = torch.tensor(window.tokens, dtype=torch.long)
        input_ids[row, :n] = ids
        attention[row, :n] = 1
        if window.mask is None:
            labels[row, n - window.targets : n] = ids[n - window.targets :]
        else:
            flags = torch.tensor(window.mask, dtype=torch.bool)
            labels[row, :n][flags] = ids[flags]
    input_ids, attention, labels = (t.to(device) for t in (input_ids, attention, labels))
    # Position t predicts token t+1; keep only target positions before the softmax.
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    targets = shift_labels[mask]
    with torch.autocast(
        device_type=device.type,
        dtype=autocast_dtype or torch.float32,
        enabled=autocast_dtype is not None,
    ):
        if split is not None:
            body, head = split
            hidden = body(input_ids=input_ids, attention_mask=attention).last_hidden_state
            nll = _target_nll(head, hidden[:, :-1][mask], targets)
        else:
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            picked = logits[:, :-1][mask].float()
            nll = torch.nn.functional.cross_entropy(picked, targets, reduction="none")
    return float(nll.double().sum().item()), int(targets.numel())


def score_sequences(
    model: Any,
    sequences: Sequence[Sequence[int]],
    *,
    context_token: int | None,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    target_masks: Sequence[Sequence[int]] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` over all ``sequences`` (token ids of one test line each).

    ``target_masks``: one 0/1 list per sequence, as long as it; only the tokens
    marked 1 are predicted (and counted), the others are context.

    ``batch_size`` is in full-context sequences: a batch holds up to
    ``batch_size * max_length`` tokens, so short lines are batched many at a
    time (at most 1024 rows). ``autocast_dtype`` (e.g. ``torch.bfloat16`` on a
    GPU) runs the forward pass in mixed precision; the NLL is summed in float64.
    """
    if target_masks is not None and len(target_masks) != len(sequences):
        raise ValueError(f"{len(target_masks)} target masks for {len(sequences)} sequences")
    windows = [
        w
        for i, ids in enumerate(sequences)
        for w in rolling_windows(
            ids,
            context_token,
            max_length,
            stride,
            target_masks[i] if target_masks is not None else None,
        )
    ]
    device = _model_device(model)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 50_000)
    budget = LOGITS_BUDGET.get(device.type, LOGITS_BUDGET["cpu"]) // vocab
    if device.type == "cpu":
        budget = min(budget, CPU_BATCH_TOKENS)
    max_tokens = max(max_length, min(batch_size * max_length, budget))
    split = _split_head(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll_sum, count = 0.0, 0
    try:
        for batch in _batches(windows, max_rows=max(1024, batch_size), max_tokens=max_tokens):
            nll, n = _batch_nll(model, batch, device, autocast_dtype, split)
            nll_sum += nll
            count += n
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        model.train(was_training)
    seconds = max(time.perf_counter() - start, 1e-9)
    return PerplexityResult(nll_sum, count, perplexity_from_nll(nll_sum, count), count / seconds)
