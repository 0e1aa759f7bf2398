"""Training rows from tokenized lines: packed blocks (default) or one padded line per row.

Usage::

    rows = build_rows(tokens, offsets, block_size=512, eos_id=eos, bos_id=bos, packing=True)
    batch = collate(rows, [3, 17, 42], pad_id=eos)   # numpy arrays, ready for torch
    kwargs = model_inputs(batch_tensors, attn_implementation="sdpa", dtype=torch.bfloat16)
    logits = model(**kwargs).logits
    nll_sum, n = token_nll_sum(logits, batch_tensors["labels"])

Inputs are the prepare stage's arrays: ``tokens`` (flat uint32 ids, no special
tokens) and ``offsets`` (int64, lines + 1). Every line becomes ``bos tokens eos``
(bos defaults to eos, as in GPT-2): the start token is context only, so every
token of the line is predicted from it — the same convention the evaluate stage
scores perplexity and prompts generation with (``bleu.context_token_id``) — and
the model learns where a line ends.

**Packing** (``packing=True``) fills rows of at most ``block_size`` tokens greedily,
in line order: a line goes into the current row if it fits, otherwise the row is
closed and a new one starts. A batch is padded to its longest row, rounded up to a
multiple of :data:`PACKED_WIDTH_MULTIPLE` (at most ``block_size``): the unfilled tail
of a row costs compute and trains nothing, and a handful of widths keeps the shapes few.
A line longer than a block is cut into block-size chunks, each its own segment. Rows
are made of *segments* (one per line or chunk), and segments never see each other:

* ``position_ids`` restart at 0 at every segment start (GPT-2's learned positions
  then see exactly what they would see for the line alone);
* the attention mask is block-diagonal causal: a float ``[B, 1, T, T]`` mask with
  0 where query ``q`` may attend key ``k`` (same segment and ``k <= q``) and the
  dtype's minimum elsewhere. Padding is its own segment, so no row is empty;
* ``labels`` follow the Hugging Face convention (the model shifts them: the logits
  at ``t`` are scored against ``labels[t + 1]``). ``labels`` are the input ids,
  except ``-100`` on the *first token of every segment* and on padding: so the
  last token of a segment (its eos) is never trained to predict the next
  segment's first token, and the first token of a line is never predicted (as
  when the line is run alone). With the bos start token, the first *real* token
  of a line is predicted from bos, as at evaluation. The summed loss of a packed row is
  therefore exactly the sum of the losses of its lines run one by one
  (``tests/unit/test_packing.py`` checks this to 1e-5).

With ``flash_attention_2`` the 4D mask is not supported; there the model gets
only ``position_ids`` and transformers derives the per-segment varlen attention
from the restarts ("padding-free" packing). The same derivation exists for sdpa
and eager in transformers >= 5 but only when ``use_cache=False`` and no mask is
given; the explicit mask does not depend on that, so it is the default.

**No packing** (``packing=False``): one line (or chunk of a long line) per row,
padded to the longest row of the batch (not to ``block_size``), with a 2D padding
mask; labels are ``-100`` on padding.

**Answers only** (``loss_mask``, instruction datasets: ``dataset.kind``
promptCompletion or chat). Each line is then one example (prompt and answer, no
special tokens) and the prepare stage's loss mask has one 0/1 per token, 1 on
answer tokens. The rows carry a per-token *trained* flag next to the stream:
bos is never trained, an example's tokens are trained where the mask is 1, and
the eos appended after it is trained (it ends the last answer: the model learns
to stop). ``collate`` sets ``labels`` to ``-100`` wherever a token is not trained,
on top of the rules above (segment starts, padding), so a prompt token is context
only while the answer token after it is predicted from it. Packing, attention and
positions are exactly as without the mask, and a chunk of an over-long example
keeps its slice of the mask. :meth:`Rows.row_targets` and :func:`count_targets`
count only trained targets, so the token-weighted loss of the train stage is the
summed NLL of the answer tokens (and their eos) divided by their number: the
summed loss of a packed row equals the sum over its examples, run one by one, of
the NLL of their answer tokens and eos (``tests/unit/test_packing.py``). Without
a mask every token is trained (text datasets), as described above.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
# A packed batch is as wide as its longest row rounded up to this (see ``packed_width``).
PACKED_WIDTH_MULTIPLE = 8


@dataclass(frozen=True)
class Rows:
    """Training rows over one flat token stream.

    ``stream`` holds every line followed by eos; ``seg_start`` is True where a
    segment (line or chunk) starts; row ``i`` is ``stream[row_offsets[i]:row_offsets[i+1]]``.
    ``trained`` (answers-only training, built from a loss mask) is True where a
    token is a target: an answer token or the eos after an example, never a segment
    start; ``None`` when every token but the segment starts is one.
    """

    stream: np.ndarray  # int32 [n_tokens]
    seg_start: np.ndarray  # bool [n_tokens]
    row_offsets: np.ndarray  # int64 [n_rows + 1]
    block_size: int
    packed: bool
    trained: np.ndarray | None = None  # bool [n_tokens], or None: all but segment starts

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens, eos included."""
        return int(self.stream.shape[0])

    @property
    def segments(self) -> int:
        return int(self.seg_start.sum())

    @property
    def efficiency(self) -> float:
        """Share of the token slots of full-length rows holding real tokens (packed mode)."""
        slots = len(self) * self.block_size
        return self.tokens / slots if slots else 0.0

    def row_lengths(self) -> np.ndarray:
        return np.diff(self.row_offsets)

    def row_targets(self) -> np.ndarray:
        """Predicted tokens of each row: what :func:`count_targets` counts once it is collated.

        A row's tokens less the first of each of its segments (rows start at a
        segment start, and padding is never predicted); with a loss mask, the row's
        trained tokens (answer tokens and eos).
        """
        if self.trained is not None:
            return np.add.reduceat(self.trained, self.row_offsets[:-1], dtype=np.int64)
        segments = np.add.reduceat(self.seg_start, self.row_offsets[:-1], dtype=np.int64)
        return self.row_lengths() - segments

    @cached_property
    def targets(self) -> int:
        """Predicted tokens over all rows (with a loss mask: answer tokens and their eos)."""
        return int(self.row_targets().sum())


def _stream_with_eos(
    tokens: np.ndarray,
    offsets: np.ndarray,
    eos_id: int,
    bos_id: int | None = None,
    loss_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Lines as ``[bos] tokens eos``, concatenated (vectorised: no per-line Python).

    Without ``bos_id`` a line is ``tokens eos``. With ``loss_mask`` (aligned with
    ``tokens``) also the trained flag of every stream token: the mask on the
    line's tokens, False on bos, True on eos; else ``None``.
    """
    n_lines = len(offsets) - 1
    extra = 2 if bos_id is not None else 1
    out = np.empty(int(offsets[-1]) + extra * n_lines, dtype=np.int32)
    special = np.zeros(out.shape[0], dtype=bool)
    line_index = np.arange(n_lines)
    eos_at = offsets[1:] + extra * line_index + (extra - 1)  # each line's eos in ``out``
    special[eos_at] = True
    out[eos_at] = eos_id
    if bos_id is not None:
        bos_at = offsets[:-1] + 2 * line_index
        special[bos_at] = True
        out[bos_at] = bos_id
    out[~special] = tokens[: int(offsets[-1])]
    if loss_mask is None:
        return out, None
    trained = np.zeros(out.shape[0], dtype=bool)
    trained[eos_at] = True
    trained[~special] = np.asarray(loss_mask[: int(offsets[-1])]) != 0
    return out, trained


def _segment_lengths(line_lengths: np.ndarray, block_size: int) -> np.ndarray:
    """Lengths of the segments: each line, with lines longer than a block cut into chunks."""
    if not (line_lengths > block_size).any():
        return line_lengths
    chunks = -(-line_lengths // block_size)  # ceil
    seg = np.repeat(np.full(len(line_lengths), block_size, dtype=np.int64), chunks)
    last = np.cumsum(chunks) - 1
    seg[last] = line_lengths - (chunks - 1) * block_size
    return seg


def _greedy_rows(seg_lengths: np.ndarray, block_size: int) -> np.ndarray:
    """Row boundaries (token offsets) filling each row with whole segments, in order."""
    bounds = [0]
    fill = 0
    pos = 0
    for length in seg_lengths.tolist():
        if fill + length > block_size:
            bounds.append(pos)
            fill = 0
        fill += length
        pos += length
    bounds.append(pos)
    return np.asarray(bounds, dtype=np.int64)


def build_rows(
    tokens: np.ndarray,
    offsets: np.ndarray,
    *,
    block_size: int,
    eos_id: int,
    bos_id: int | None = None,
    packing: bool = True,
    loss_mask: np.ndarray | None = None,
) -> Rows:
    """Rows of packed blocks (``packing``) or of single lines, from prepare's arrays.

    ``loss_mask``: one 0/1 per token of ``tokens`` (instruction datasets): train on
    the tokens where it is 1 and on each line's eos only (see the module docstring).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) < 2 or offsets[-1] <= 0:
        raise ValueError("no tokens to build training rows from")
    if loss_mask is not None and len(loss_mask) != len(tokens):
        raise ValueError(
            f"loss_mask has {len(loss_mask)} values for {len(tokens)} tokens (one per token)"
        )
    lengths = np.diff(offsets)
    if (lengths == 0).any():
        # An empty line would be a lone eos; it holds no tokens, so dropping it is
        # only a matter of dropping its offset.
        offsets = np.concatenate([[0], np.cumsum(lengths[lengths > 0])]).astype(np.int64)
    stream, trained = _stream_with_eos(np.asarray(tokens), offsets, eos_id, bos_id, loss_mask)
    line_lengths = np.diff(offsets) + (2 if bos_id is not None else 1)
    seg_lengths = _segment_lengths(line_lengths, block_size)
    seg_start = np.zeros(stream.shape[0], dtype=bool)
    seg_start[np.cumsum(seg_lengths) - seg_lengths] = True
    if trained is not None:
        # A segment's first token is never predicted (a chunk's start of an answer either).
        trained &= ~seg_start
    if packing:
        row_offsets = _greedy_rows(seg_lengths, block_size)
    else:
        row_offsets = np.concatenate([[0], np.cumsum(seg_lengths)]).astype(np.int64)
    return Rows(stream, seg_start, row_offsets, block_size, packing, trained)


def packed_width(longest: int, block_size: int) -> int:
    """Width of a packed batch: its longest row rounded up to the multiple, within the block.

    Packed rows are nearly full (``Rows.efficiency``), so the widths seen are few; on a
    GPU a multiple of 8 keeps the matmuls on their fast tiles.
    """
    m = PACKED_WIDTH_MULTIPLE
    return min(block_size, -(-longest // m) * m)


def collate(rows: Rows, indices: np.ndarray | list[int], pad_id: int) -> dict[str, np.ndarray]:
    """Numpy arrays of one batch: input_ids, position_ids, segment_ids, labels, attention_mask.

    Packed rows are padded to the longest row in the batch rounded up to a multiple of
    :data:`PACKED_WIDTH_MULTIPLE` (capped at ``block_size``); unpacked rows to the
    longest row in the batch. ``segment_ids`` are 0, 1, ... per segment inside a
    row, and padding gets the next id (its own segment). ``labels`` are ``-100`` on
    segment starts, padding and (with a loss mask) every token that is not trained.
    """
    starts = rows.row_offsets[np.asarray(indices)]
    ends = rows.row_offsets[np.asarray(indices) + 1]
    lengths = ends - starts
    width = packed_width(int(lengths.max()), rows.block_size) if rows.packed else int(lengths.max())
    b = len(starts)
    input_ids = np.full((b, width), pad_id, dtype=np.int64)
    seg_start = np.zeros((b, width), dtype=bool)
    real = np.zeros((b, width), dtype=bool)
    row_trained = rows.trained
    trained = None if row_trained is None else np.zeros((b, width), dtype=bool)
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        n = e - s
        input_ids[i, :n] = rows.stream[s:e]
        seg_start[i, :n] = rows.seg_start[s:e]
        real[i, :n] = True
        if trained is not None and row_trained is not None:
            trained[i, :n] = row_trained[s:e]
    # Padding starts a segment of its own (rows that are full have no padding).
    pad_first = np.minimum(lengths, width - 1)
    has_pad = lengths < width
    seg_start[np.arange(b)[has_pad], pad_first[has_pad]] = True
    seg_start[:, 0] = True
    segment_ids = np.cumsum(seg_start, axis=1, dtype=np.int32) - 1
    col = np.broadcast_to(np.arange(width, dtype=np.int64), (b, width))
    last_start = np.maximum.accumulate(np.where(seg_start, col, 0), axis=1)
    position_ids = col - last_start
    ignored = seg_start | ~real
    if trained is not None:  # answers only: prompt (and bos) tokens are context
        ignored |= ~trained
    labels = np.where(ignored, IGNORE_INDEX, input_ids)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "labels": labels,
        "attention_mask": real.astype(np.int64),
    }


def count_targets(labels: np.ndarray) -> int:
    """Tokens that are predicted (after the model's one-token shift): labels not ``-100``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float ``[B, 1, T, T]`` mask: 0 where attention is allowed, dtype-min elsewhere."""
    import torch

    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def model_inputs(
    batch: dict[str, torch.Tensor],
    *,
    packed: bool,
    attn_implementation: str,
    mask_dtype: torch.dtype,
) -> dict[str, Any]:
    """Keyword arguments for a Hugging Face causal LM forward (no labels, no cache)."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if not packed:
        kwargs["attention_mask"] = batch["attention_mask"]
        return kwargs
    kwargs["position_ids"] = batch["position_ids"]
    if not attn_implementation.startswith("flash_attention"):
        kwargs["attention_mask"] = block_causal_mask(batch["segment_ids"], mask_dtype)
    return kwargs


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (fp32) with the model's shift; ``-100`` labels are skipped."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
