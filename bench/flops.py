"""FLOPs per token of a GPT-2-shaped decoder, for model FLOPs utilisation (MFU).

The formula (Kaplan et al. 2020, as in the PaLM paper's appendix B and nanoGPT's
``estimate_mfu``), per trained token (forward + backward)::

    flops_per_token = 6 * N + 12 * n_layer * n_embd * seq

* ``6 * N``: each weight does one multiply-add (2 FLOPs) per token forward and two
  backward (grad wrt input and wrt weight): 2 + 4 = 6 FLOPs per parameter per token.
  ``N`` counts the parameters that take part in a matmul: every parameter except the
  position embedding table (a lookup, no matmul). The token embedding is tied to the
  output head, so it is counted once, for the head's matmul.
* ``12 * n_layer * n_embd * seq``: attention scores ``QK^T`` and the weighted sum
  ``AV`` are 2 matmuls of ``seq x n_embd`` per token per layer, 2 FLOPs per
  multiply-add and 3x for forward + backward: ``2 * 2 * 3 = 12``. ``seq`` is the
  attended length (the full training sequence; causal masking is not discounted,
  as in PaLM). Layer norms, softmax, GELU and the loss are ignored (< 1%).

MFU = tokens_per_second * flops_per_token / peak_flops, where the peak is the chip's
measured dense bf16 matmul rate (see ``bench.gpu.measure_matmul_flops``).
"""

from __future__ import annotations


def gpt2_param_count(
    n_layer: int, n_embd: int, vocab_size: int, n_positions: int, *, include_positions: bool = True
) -> int:
    """Parameters of Hugging Face ``GPT2LMHeadModel`` (tied head), by formula.

    Per block: 2 layer norms (4 * n_embd), attention (qkv 3*E*E + 3*E, proj E*E + E),
    MLP (fc 4*E*E + 4*E, proj 4*E*E + E): 12*E*E + 13*E. Plus wte, wpe and the final norm.
    """
    per_block = 12 * n_embd * n_embd + 13 * n_embd
    total = n_layer * per_block + vocab_size * n_embd + 2 * n_embd
    if include_positions:
        total += n_positions * n_embd
    return total


def matmul_params(model: object) -> int:
    """``N`` for the formula: all (unique) parameters except the position embedding table."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():  # type: ignore[attr-defined]
        if id(p) in seen or name.endswith("wpe.weight"):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq: int) -> float:
    """Training FLOPs per token: ``6 * n_params + 12 * n_layer * n_embd * seq``."""
    if min(n_params, n_layer, n_embd, seq) <= 0:
        raise ValueError("n_params, n_layer, n_embd and seq must be positive")
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq


def forward_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq: float) -> float:
    """Forward-only FLOPs per token (evaluation): ``2 * n_params + 4 * n_layer * n_embd * seq``.

    One third of :func:`flops_per_token`: one multiply-add per weight and the two
    attention matmuls, forward only. ``seq`` is the attended length; for a batch of
    short lines scored one per row, their mean length (a float) is the honest value.
    """
    if min(n_params, n_layer, n_embd) <= 0 or seq <= 0:
        raise ValueError("n_params, n_layer, n_embd and seq must be positive")
    return 2.0 * n_params + 4.0 * n_layer * n_embd * seq


def mfu(tokens_per_second: float, flops_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in 0..1 (can exceed 1 only if the peak was under-measured)."""
    if peak_flops <= 0:
        raise ValueError("peak_flops must be positive")
    return tokens_per_second * flops_token / peak_flops


def matmul_flops(m: int, n: int, k: int) -> float:
    """FLOPs of one ``[m, k] @ [k, n]`` matmul: 2 per multiply-add."""
    return 2.0 * m * n * k
