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


# --------------------------------------------------------------------------- answer-only


def _masks(lines: list[list[int]], seed: int = 7) -> list[list[int]]:
    """Per line: a prompt run of 0s, then answer 1s (sometimes two answers, like a chat)."""
    rng = random.Random(seed)
    masks = []
    for ids in lines:
        n = len(ids)
        start = rng.randrange(0, n)  # at least one answer token at the end
        mask = [0] * start + [1] * (n - start)
        if start > 3 and rng.random() < 0.5:  # an earlier answer turn
            mask[1:3] = [1, 1]
        masks.append(mask)
    return masks


@torch.no_grad()
def _reference_masked_nll(
    model: torch.nn.Module, lines: list[list[int]], masks: list[list[int]]
) -> tuple[float, int]:
    """Each example on its own, [EOS] + ids + [EOS], summing the NLL where the mask (+ eos) is 1."""
    nll, count = 0.0, 0
    for ids, mask in zip(lines, masks, strict=True):
        x = torch.tensor([[EOS, *ids, EOS]])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1)
        picked = logp.gather(1, x[0, 1:, None]).squeeze(1)
        keep = torch.tensor([*mask, 1], dtype=torch.bool)
        nll -= picked[keep].sum().item()
        count += int(keep.sum())
    return nll, count


@pytest.mark.parametrize("split_head", [True, False])
def test_answer_only_perplexity_matches_per_example_reference(
    model: torch.nn.Module, split_head: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubetune_trainer.perplexity as ppl

    if not split_head:  # the model(...).logits path (peft wrappers, soft-capped models)
        monkeypatch.setattr(ppl, "_split_head", lambda model: None)
    lines = _lines([1, 2, 5, 9, 30, 14, 3, 22, 7, 12], seed=8)
    masks = _masks(lines)
    sequences = [[*ids, EOS] for ids in lines]
    targets = [[*m, 1] for m in masks]
    nll, count = _reference_masked_nll(model, lines, masks)
    for batch_size in (1, 4, 64):
        result = score_sequences(
            model,
            sequences,
            context_token=EOS,
            max_length=32,
            batch_size=batch_size,
            target_masks=targets,
        )
        assert result.predicted_tokens == count == sum(map(sum, targets))
        assert result.nll_sum == pytest.approx(nll, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_all_ones_target_mask_equals_unmasked_scoring(model: torch.nn.Module) -> None:
    lines = _lines([4, 17, 31, 2], seed=9)
    plain = score_sequences(model, lines, context_token=EOS, max_length=32)
    masked = score_sequences(
        model,
        lines,
        context_token=EOS,
        max_length=32,
        target_masks=[[1] * len(ids) for ids in lines],
    )
    assert masked.predicted_tokens == plain.predicted_tokens
    assert masked.nll_sum == pytest.approx(plain.nll_sum, rel=1e-9)


@pytest.mark.parametrize(("length", "max_length", "stride"), [(40, 8, 4), (41, 8, 3), (9, 4, 10)])
def test_masked_rolling_windows_predict_each_marked_token_once(
    length: int, max_length: int, stride: int
) -> None:
    ids = list(range(1, length + 1))
    rng = random.Random(length)
    mask = [int(rng.random() < 0.4) for _ in ids]
    mask[-1] = 1
    windows = rolling_windows(ids, EOS, max_length, stride, target_mask=mask)
    predicted = [w.tokens[i] for w in windows for i in w.predicted()]
    assert predicted == [t for t, m in zip(ids, mask, strict=True) if m]
    for w in windows:
        assert len(w.tokens) <= max_length and w.targets == len(w.predicted()) >= 1
        assert 0 not in w.predicted()  # the first token of a window is context only


def test_long_masked_example_matches_masked_rolling_reference(model: torch.nn.Module) -> None:
    # Longer than the context: rolling windows, and only marked tokens count.
    lines = _lines([60], seed=10)
    mask = [0] * 20 + [1] * 40
    full = [*lines[0], EOS]
    result = score_sequences(
        model, [full], context_token=EOS, max_length=16, stride=8, target_masks=[[*mask, 1]]
    )
    unmasked = rolling_windows(full, EOS, 16, 8)
    # Each token's NLL in its window, from the unmasked windows, summed where marked.
    expected = 0.0
    position = 0
    with torch.no_grad():
        for w in unmasked:
            x = torch.tensor([w.tokens])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1)
            for i in w.predicted():
                if ([*mask, 1])[position]:
                    expected -= logp[i - 1, w.tokens[i]].item()
                position += 1
    assert result.predicted_tokens == 41
    assert result.nll_sum == pytest.approx(expected, rel=1e-5)


def test_target_masks_must_match_the_sequences(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="target mask"):
        score_sequences(model, [[1, 2, 3]], context_token=EOS, max_length=8, target_masks=[[1]])
    with pytest.raises(ValueError, match="target masks"):
        score_sequences(model, [[1, 2]], context_token=EOS, max_length=8, target_masks=[])
