"""Packing: blocks filled, no attention or loss across lines, positions restart per line.

Run: ``python -m pytest tests/unit/test_packing.py -q`` (CPU, a few seconds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from integration import tiny
from kubetune_trainer.packing import (
    IGNORE_INDEX,
    build_rows,
    collate,
    count_targets,
    model_inputs,
    packed_width,
    token_nll_sum,
)

EOS = 0


@pytest.fixture(scope="module")
def tldr_tokens() -> tuple[np.ndarray, np.ndarray, int]:
    """Real tldr lines tokenized by the tiny BPE: (tokens, offsets, eos id)."""
    from kubetune_trainer.tokenizer_build import encode_batch

    lines = tiny.tldr_lines(2500)
    tokenizer = tiny.train_tokenizer(lines)
    ids = encode_batch(tokenizer, lines)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    tokens = np.array([t for x in ids for t in x], dtype=np.uint32)
    return tokens, offsets, int(tokenizer.eos_token_id)


def _arrays(lines: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).astype(np.int64)
    return np.array([t for x in lines for t in x], dtype=np.uint32), offsets


def _tiny_model(dtype: torch.dtype, attn: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=64,
        vocab_size=300,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(dtype).eval()


def _random_lines(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 300, n).tolist() for n in lengths]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_packed_loss_per_document_equals_each_document_alone(
    attn: str, dtype: torch.dtype, tol: float
) -> None:
    # 9 lines; one (90 tokens) is longer than the 32-token block and gets split.
    lines = _random_lines([5, 12, 3, 20, 90, 7, 15, 9, 30])
    tokens, offsets = _arrays(lines)
    rows = build_rows(tokens, offsets, block_size=32, eos_id=EOS, packing=True)
    model = _tiny_model(dtype, attn)
    batch_np = collate(rows, list(range(len(rows))), pad_id=EOS)
    batch = {k: torch.from_numpy(v) for k, v in batch_np.items()}
    with torch.no_grad():
        logits = model(
            **model_inputs(batch, packed=True, attn_implementation=attn, mask_dtype=dtype)
        ).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2),
            batch["labels"][:, 1:],
            reduction="none",
            ignore_index=IGNORE_INDEX,
        )
    # Loss of every segment (line or chunk) computed from the packed batch ...
    packed: list[float] = []
    segs = batch_np["segment_ids"]
    for r in range(len(rows)):
        n = int(rows.row_lengths()[r])
        for s in np.unique(segs[r, :n]):
            cols = np.nonzero(segs[r, :n] == s)[0]
            # targets of segment s sit at shifted positions cols[:-1]
            packed.append(float(nll[r, cols[:-1]].sum()))
    # ... equals the loss of the same segment run alone (no neighbours, positions from 0).
    alone: list[float] = []
    for line in lines:
        ids = [*line, EOS]
        for start in range(0, len(ids), 32):
            chunk = torch.tensor([ids[start : start + 32]])
            with torch.no_grad():
                out = model(input_ids=chunk, use_cache=False).logits
            alone.append(
                float(torch.nn.functional.cross_entropy(out[0, :-1], chunk[0, 1:], reduction="sum"))
            )
    assert len(packed) == len(alone) == 11  # 8 lines + one of 90 (+eos) tokens in 3 chunks
    np.testing.assert_allclose(packed, alone, rtol=tol, atol=tol * 10)


def test_position_ids_only_packing_matches_the_explicit_mask() -> None:
    # transformers derives the same block-diagonal mask from position restarts when
    # no mask and no cache are given (the flash-attention path relies on it).
    lines = _random_lines([10, 4, 25, 8, 16])
    tokens, offsets = _arrays(lines)
    rows = build_rows(tokens, offsets, block_size=32, eos_id=EOS)
    model = _tiny_model(torch.float64, "sdpa")
    batch = {k: torch.from_numpy(v) for k, v in collate(rows, range(len(rows)), EOS).items()}
    with torch.no_grad():
        masked = model(
            **model_inputs(batch, packed=True, attn_implementation="sdpa", mask_dtype=torch.float64)
        ).logits
        native = model(
            **model_inputs(
                batch,
                packed=True,
                attn_implementation="flash_attention_2",
                mask_dtype=torch.float64,
            )
        ).logits
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits
    real = torch.from_numpy(collate(rows, range(len(rows)), EOS)["attention_mask"]).bool()
    torch.testing.assert_close(masked[real], native[real], rtol=1e-9, atol=1e-9)
    # and the mask really matters: without it, later lines see earlier ones.
    assert (masked[real] - plain[real]).abs().max() > 1e-3


def test_packing_fills_blocks_on_tldr_lines(
    tldr_tokens: tuple[np.ndarray, np.ndarray, int],
) -> None:
    tokens, offsets, eos = tldr_tokens
    rows = build_rows(tokens, offsets, block_size=512, eos_id=eos)
    assert rows.efficiency > 0.90
    lengths = rows.row_lengths()
    assert lengths.max() <= 512
    # Every token of every line is there once, each line followed by eos, in order.
    assert rows.tokens == len(tokens) + len(offsets) - 1
    assert int(rows.seg_start.sum()) == len(offsets) - 1  # no tldr line exceeds 512 tokens
    assert (rows.stream[rows.seg_start.nonzero()[0][1:] - 1] == eos).all()


def test_positions_restart_and_labels_stop_at_every_line_boundary() -> None:
    lines = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    tokens, offsets = _arrays(lines)
    rows = build_rows(tokens, offsets, block_size=16, eos_id=EOS)
    assert len(rows) == 1
    b = collate(rows, [0], pad_id=EOS)
    assert b["input_ids"][0, :12].tolist() == [11, 12, 13, 0, 21, 22, 0, 31, 32, 33, 34, 0]
    assert b["position_ids"][0, :12].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    assert b["segment_ids"][0].tolist() == [0] * 4 + [1] * 3 + [2] * 5 + [3] * 4
    # HF convention (shifted inside the model): -100 on each segment's first token and on pads.
    assert b["labels"][0].tolist() == [
        -100,
        12,
        13,
        0,
        -100,
        22,
        0,
        -100,
        32,
        33,
        34,
        0,
        -100,
        -100,
        -100,
        -100,
    ]
    assert count_targets(b["labels"]) == 12 - 3  # one unpredictable first token per line
    assert b["input_ids"].shape == (1, 16)  # 12 real tokens, rounded up to a multiple of 8


def test_a_packed_batch_is_as_wide_as_its_longest_row_rounded_up_to_eight() -> None:
    tokens, offsets = _arrays([[1, 2, 3], [4, 5, 6, 7, 8], list(range(1, 30))])
    rows = build_rows(tokens, offsets, block_size=64, eos_id=EOS)
    assert rows.row_lengths().tolist() == [4 + 6 + 30]  # one row of three lines + eos each
    b = collate(rows, [0], pad_id=EOS)
    assert b["input_ids"].shape == (1, 40)  # not 64: the tail would be computed for nothing
    assert b["attention_mask"].sum() == 40
    assert [packed_width(n, 64) for n in (1, 8, 9, 57, 64)] == [8, 8, 16, 64, 64]
    assert packed_width(509, 510) == 510  # never wider than the block


def test_lines_longer_than_a_block_are_split_into_block_chunks() -> None:
    tokens, offsets = _arrays([list(range(1, 71)), [5, 6]])  # 70 tokens + eos = 71
    rows = build_rows(tokens, offsets, block_size=32, eos_id=EOS)
    assert rows.row_lengths().tolist() == [32, 32, 7 + 3]  # chunks 32, 32, 7; then [5, 6, eos]
    b = collate(rows, [2], pad_id=EOS)
    assert b["position_ids"][0, :10].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]


def test_no_packing_pads_each_batch_to_its_longest_line() -> None:
    tokens, offsets = _arrays([[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]])
    rows = build_rows(tokens, offsets, block_size=64, eos_id=EOS, packing=False)
    assert len(rows) == 3
    b = collate(rows, [0, 2], pad_id=EOS)
    assert b["input_ids"].shape == (2, 4)  # longest in this batch: 3 + eos, not 64
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3, 0], [-100, 10, 0, -100]]
    model = _tiny_model(torch.float64, "sdpa")
    t = {k: torch.from_numpy(v) for k, v in b.items()}
    with torch.no_grad():
        logits = model(
            **model_inputs(t, packed=False, attn_implementation="sdpa", mask_dtype=torch.float64)
        ).logits
        alone = model(input_ids=t["input_ids"][1:, :3], use_cache=False).logits
    torch.testing.assert_close(logits[1, :3], alone[0], rtol=1e-9, atol=1e-9)


def test_empty_lines_are_skipped() -> None:
    tokens, offsets = _arrays([[1, 2], [], [3]])
    rows = build_rows(tokens, offsets, block_size=8, eos_id=EOS)
    assert rows.stream.tolist() == [1, 2, 0, 3, 0]
    assert rows.segments == 2


def test_lines_start_with_the_evaluation_context_token() -> None:
    """With bos_id every line is ``bos tokens eos``: its first real token is trained
    to be predicted from bos, exactly as the evaluate stage scores it."""
    tokens = np.array([5, 6, 7, 8, 9], dtype=np.uint32)
    offsets = np.array([0, 3, 5], dtype=np.int64)
    rows = build_rows(tokens, offsets, block_size=16, eos_id=1, bos_id=2, packing=True)
    assert rows.stream.tolist() == [2, 5, 6, 7, 1, 2, 8, 9, 1]
    batch = collate(rows, [0], pad_id=1)
    labels = batch["labels"][0][:9].tolist()
    # bos positions are context only; every real token and each eos is a target.
    assert labels == [-100, 5, 6, 7, 1, -100, 8, 9, 1]
    assert batch["position_ids"][0][:9].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]


# --------------------------------------------------------------------------- answers only

BOS = 2


def _examples(
    turns: list[list[tuple[int, int]]], seed: int = 1
) -> tuple[list[list[int]], list[list[int]]]:
    """Random examples and their loss masks from (prompt length, answer length) turns."""
    rng = np.random.default_rng(seed)
    lines, masks = [], []
    for example in turns:
        mask = [m for n_prompt, n_answer in example for m in [0] * n_prompt + [1] * n_answer]
        lines.append(rng.integers(3, 300, len(mask)).tolist())
        masks.append(mask)
    return lines, masks


def _mask_array(masks: list[list[int]]) -> np.ndarray:
    return np.array([m for x in masks for m in x], dtype=np.uint8)


# Single-turn examples with prompts and answers of different lengths, and two
# multi-turn (chat-like) ones whose earlier answers are trained too.
TURNS = [
    [(6, 3)],
    [(1, 12)],
    [(15, 1)],
    [(4, 2), (3, 5)],
    [(5, 4)],
    [(2, 1), (5, 2), (3, 4)],
    [(3, 3)],
    [(14, 4)],
]


def _answer_nll_alone(
    model: torch.nn.Module, line: list[int], mask: list[int]
) -> tuple[float, int]:
    """NLL of an example's answer tokens and eos with the example run alone as bos+line+eos."""
    ids = torch.tensor([[BOS, *line, EOS]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].double(), -1)
    nll, n = 0.0, 0
    for t, trained in enumerate([*mask, 1]):  # target ids[t + 1], predicted at t
        if trained:
            nll -= float(logp[t, ids[0, t + 1]])
            n += 1
    return nll, n


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_answer_only_loss_equals_the_answers_of_each_example_alone(
    packing: bool, dtype: torch.dtype, tol: float
) -> None:
    lines, masks = _examples(TURNS)
    tokens, offsets = _arrays(lines)
    rows = build_rows(
        tokens,
        offsets,
        block_size=32,
        eos_id=EOS,
        bos_id=BOS,
        packing=packing,
        loss_mask=_mask_array(masks),
    )
    # rows of 11+15 | 18 | 16+11 | 19+8 | 20 tokens (bos and eos included), padded to 32
    assert len(rows) == (5 if packing else len(lines))
    model = _tiny_model(dtype, "sdpa")
    batch_np = collate(rows, list(range(len(rows))), pad_id=EOS)
    batch = {k: torch.from_numpy(v) for k, v in batch_np.items()}
    with torch.no_grad():
        logits = model(
            **model_inputs(batch, packed=packing, attn_implementation="sdpa", mask_dtype=dtype)
        ).logits
        nll_sum = float(token_nll_sum(logits, batch["labels"]))  # in fp32, as training
        exact = float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].double().transpose(1, 2),
                batch["labels"][:, 1:],
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
    n = count_targets(batch_np["labels"])
    # The reference: every example alone, its answer tokens and eos scored by log-softmax.
    alone = [_answer_nll_alone(model, line, mask) for line, mask in zip(lines, masks, strict=True)]
    ref_sum = sum(a for a, _ in alone)
    ref_n = sum(k for _, k in alone)
    assert n == ref_n == sum(map(sum, masks)) + len(lines) == int(rows.row_targets().sum())
    np.testing.assert_allclose(exact, ref_sum, rtol=tol)
    np.testing.assert_allclose(nll_sum, ref_sum, rtol=1e-5)  # fp32 sums: ~1e-7 apart
    # the token-weighted mean (the train stage's loss) too
    np.testing.assert_allclose(exact / n, ref_sum / ref_n, rtol=tol)
    np.testing.assert_allclose(nll_sum / n, ref_sum / ref_n, rtol=1e-5)


def test_answer_only_labels_skip_prompts_bos_and_padding() -> None:
    lines = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15]]
    masks = [[0, 0, 1, 1], [0, 1, 1], [0, 1, 0, 1]]  # the last: two turns
    tokens, offsets = _arrays(lines)
    rows = build_rows(
        tokens, offsets, block_size=24, eos_id=1, bos_id=BOS, loss_mask=_mask_array(masks)
    )
    assert len(rows) == 1
    b = collate(rows, [0], pad_id=1)
    assert b["input_ids"][0, :17].tolist() == [
        *[2, 5, 6, 7, 8, 1],
        *[2, 9, 10, 11, 1],
        *[2, 12, 13, 14, 15, 1],
    ]
    # bos, prompt tokens and padding are -100; answer tokens and each example's eos are targets.
    assert b["labels"][0].tolist() == [
        *[-100, -100, -100, 7, 8, 1],
        *[-100, -100, 10, 11, 1],
        *[-100, -100, 13, -100, 15, 1],
        *[-100] * 7,
    ]
    # Attention and positions are those of packing without a mask.
    plain = collate(build_rows(tokens, offsets, block_size=24, eos_id=1, bos_id=BOS), [0], 1)
    for key in ("input_ids", "position_ids", "segment_ids", "attention_mask"):
        assert (b[key] == plain[key]).all(), key
    assert count_targets(b["labels"]) == 3 + 3 + 3 == rows.targets


@pytest.mark.parametrize("packing", [True, False])
def test_row_targets_count_the_answer_targets_of_each_collated_row(packing: bool) -> None:
    # Random examples, one (70 tokens) longer than the 32-token block: it is cut into chunks.
    turns = [[(4, 7)], [(10, 3), (2, 8)], [(30, 40)], [(1, 1)], [(12, 5)], [(3, 20)]]
    lines, masks = _examples(turns, seed=3)
    tokens, offsets = _arrays(lines)
    rows = build_rows(
        tokens,
        offsets,
        block_size=32,
        eos_id=EOS,
        bos_id=BOS,
        packing=packing,
        loss_mask=_mask_array(masks),
    )
    targets = rows.row_targets()
    for i in range(len(rows)):
        assert targets[i] == count_targets(collate(rows, [i], pad_id=EOS)["labels"])
    everything = list(range(len(rows)))[::-1]
    assert rows.targets == count_targets(collate(rows, everything, pad_id=EOS)["labels"])


def test_chunks_of_a_long_example_keep_their_slice_of_the_mask() -> None:
    lines, masks = _examples([[(25, 20), (5, 20)]], seed=4)  # 70 tokens: bos+70+eos = 72
    tokens, offsets = _arrays(lines)
    rows = build_rows(
        tokens, offsets, block_size=32, eos_id=EOS, bos_id=BOS, loss_mask=_mask_array(masks)
    )
    assert rows.row_lengths().tolist() == [32, 32, 8]
    stream = [BOS, *lines[0], EOS]
    trained = [0, *masks[0], 1]
    for r in range(3):
        b = collate(rows, [r], pad_id=EOS)
        start = 32 * r
        expected = [
            stream[start + j] if j > 0 and trained[start + j] else IGNORE_INDEX
            for j in range(rows.row_lengths()[r])
        ]
        assert b["labels"][0, : len(expected)].tolist() == expected


def test_a_mask_of_ones_trains_like_no_mask() -> None:
    lines = _random_lines([5, 0, 12, 40, 3])  # an empty line and one longer than a block
    tokens, offsets = _arrays(lines)
    ones = np.ones(len(tokens), dtype=np.uint8)
    for bos in (None, BOS):
        for packing in (True, False):
            plain = build_rows(
                tokens, offsets, block_size=16, eos_id=EOS, bos_id=bos, packing=packing
            )
            masked = build_rows(
                tokens,
                offsets,
                block_size=16,
                eos_id=EOS,
                bos_id=bos,
                packing=packing,
                loss_mask=ones,
            )
            assert (plain.row_targets() == masked.row_targets()).all()
            idx = list(range(len(plain)))
            a, b = collate(plain, idx, EOS), collate(masked, idx, EOS)
            assert all((a[k] == b[k]).all() for k in a)


def test_a_loss_mask_needs_one_value_per_token() -> None:
    tokens, offsets = _arrays([[1, 2, 3]])
    with pytest.raises(ValueError, match="one per token"):
        build_rows(tokens, offsets, block_size=8, eos_id=EOS, loss_mask=np.ones(2, np.uint8))
