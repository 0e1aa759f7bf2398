"""Perplexity: batched rolling-window scoring against straightforward references."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kubetune_trainer.perplexity import (
    perplexity_from_nll,
    rolling_windows,
    score_sequences,
)

VOCAB = 300
EOS = 0


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=32,
        vocab_size=VOCAB,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    return GPT2LMHeadModel(config).eval()


def _lines(lengths: list[int], seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(n)] for n in lengths]


@torch.no_grad()
def _reference_nll(model: torch.nn.Module, lines: list[list[int]]) -> tuple[float, int]:
    """One line at a time, one full forward pass, log-softmax of each target in float64."""
    nll, count = 0.0, 0
    for ids in lines:
        x = torch.tensor([[EOS, *ids]])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1)
        nll -= logp.gather(1, x[0, 1:, None]).sum().item()
        count += len(ids)
    return nll, count


@torch.no_grad()
def _hf_rolling_reference(
    model: torch.nn.Module, ids: list[int], max_length: int, stride: int
) -> tuple[float, int]:
    """The Hugging Face "perplexity of fixed-length models" loop, summing NLL in float64."""
    seq = torch.tensor([[EOS, *ids]])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + max_length, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        logp = torch.log_softmax(model(input_ids=input_ids).logits[0, :-1].double(), dim=-1)
        labels = target[0, 1:]
        keep = labels != -100
        nll -= logp[keep].gather(1, labels[keep][:, None]).sum().item()
        count += int(keep.sum())
        prev_end = end
        if end == seq.size(1):
            break
    return nll, count


def test_batched_perplexity_matches_line_by_line_reference(model: torch.nn.Module) -> None:
    lines = _lines([1, 2, 3, 5, 8, 13, 21, 31, 7, 4, 30, 17, 9, 2, 25])
    result = score_sequences(model, lines, context_token=EOS, max_length=32, batch_size=4)
    nll, count = _reference_nll(model, lines)
    assert result.predicted_tokens == count == sum(map(len, lines))
    assert result.nll_sum == pytest.approx(nll, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert result.tokens_per_second > 0


def test_result_does_not_depend_on_batch_size(model: torch.nn.Module) -> None:
    lines = _lines([3, 29, 12, 1, 6, 18, 31, 2], seed=2)
    one = score_sequences(model, lines, context_token=EOS, max_length=32, batch_size=1)
    many = score_sequences(model, lines, context_token=EOS, max_length=32, batch_size=64)
    assert one.predicted_tokens == many.predicted_tokens
    assert one.nll_sum == pytest.approx(many.nll_sum, rel=1e-6)


@pytest.mark.parametrize(
    ("length", "max_length", "stride"),
    [
        (1, 4, None),
        (3, 4, None),
        (4, 4, 2),
        (40, 8, 4),
        (41, 8, 3),
        (100, 16, None),
        (9, 4, 10),
    ],
)
def test_rolling_windows_predict_every_token_exactly_once(
    length: int, max_length: int, stride: int | None
) -> None:
    ids = list(range(1, length + 1))
    windows = rolling_windows(ids, EOS, max_length, stride)
    predicted = [t for w in windows for t in w.tokens[len(w.tokens) - w.targets :]]
    assert predicted == ids
    for w in windows:
        assert len(w.tokens) <= max_length
        assert 1 <= w.targets <= len(w.tokens) - 1  # every target has context before it


def test_rolling_windows_equal_direct_computation_when_text_fits(
    model: torch.nn.Module,
) -> None:
    lines = _lines([31, 20])
    windowed = score_sequences(model, lines, context_token=EOS, max_length=32, stride=4)
    nll, count = _reference_nll(model, lines)
    assert windowed.predicted_tokens == count
    assert windowed.nll_sum == pytest.approx(nll, rel=1e-6)


def test_long_text_matches_hugging_face_rolling_loop(model: torch.nn.Module) -> None:
    lines = _lines([100, 45, 16], seed=3)
    for stride in (8, 5):
        result = score_sequences(model, lines, context_token=EOS, max_length=16, stride=stride)
        refs = [_hf_rolling_reference(model, ids, 16, stride) for ids in lines]
        assert result.predicted_tokens == sum(c for _, c in refs) == 161
        assert result.nll_sum == pytest.approx(sum(n for n, _ in refs), rel=1e-6)
    # Shorter context than the text: a different (worse-informed) number than full context.
    full = _reference_nll(model, [lines[2]])[0]
    short = score_sequences(model, [lines[2]], context_token=EOS, max_length=8, stride=4)
    assert short.nll_sum != pytest.approx(full, rel=1e-9)


def test_whole_split_perplexity_is_not_a_mean_of_batch_means(model: torch.nn.Module) -> None:
    # One long line and many one-token lines: the per-line means weight them equally.
    lines = _lines([31] + [1] * 9, seed=4)
    total = score_sequences(model, lines, context_token=EOS, max_length=32, batch_size=1)
    per_line = [score_sequences(model, [ids], context_token=EOS, max_length=32) for ids in lines]
    mean_of_means = math.exp(sum(r.nll_sum / r.predicted_tokens for r in per_line) / len(lines))
    token_weighted = math.exp(
        sum(r.nll_sum for r in per_line) / sum(r.predicted_tokens for r in per_line)
    )
    assert total.perplexity == pytest.approx(token_weighted, rel=1e-6)
    assert abs(mean_of_means - total.perplexity) / total.perplexity > 1e-3


def test_without_context_token_first_token_is_not_predicted(model: torch.nn.Module) -> None:
    lines = _lines([1, 5, 10], seed=5)
    result = score_sequences(model, lines, context_token=None, max_length=32)
    assert result.predicted_tokens == 0 + 4 + 9


def test_perplexity_from_nll_edge_cases() -> None:
    assert perplexity_from_nll(0.0, 10) == 1.0
    assert perplexity_from_nll(10 * math.log(7), 10) == pytest.approx(7.0)
    assert math.isnan(perplexity_from_nll(1.0, 0))
    assert perplexity_from_nll(1e6, 1) == math.inf
