"""bench/flops.py: parameter count and FLOPs-per-token formula of the GPU benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is a top-level package of the repo, not installed
    sys.path.insert(0, str(REPO))

from bench.flops import (  # noqa: E402
    flops_per_token,
    gpt2_param_count,
    matmul_flops,
    mfu,
)


def test_param_count_matches_hugging_face_gpt2_small() -> None:
    # GPT2LMHeadModel.from_pretrained("gpt2").num_parameters() == 124,439,808 (tied head).
    assert gpt2_param_count(12, 768, 50257, 1024) == 124_439_808


def test_param_count_without_positions_drops_exactly_the_position_table() -> None:
    with_pos = gpt2_param_count(12, 768, 50257, 1024)
    without = gpt2_param_count(12, 768, 50257, 1024, include_positions=False)
    assert with_pos - without == 1024 * 768


def test_flops_per_token_is_six_n_plus_attention_term() -> None:
    n = gpt2_param_count(12, 768, 50257, 1024, include_positions=False)
    expected = 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(n, 12, 768, 1024) == expected
    # Attention grows with the attended length; the 6N part does not.
    assert flops_per_token(n, 12, 768, 1024) - flops_per_token(n, 12, 768, 512) == (
        12 * 12 * 768 * 512
    )


def test_flops_per_token_rejects_non_positive_sizes() -> None:
    with pytest.raises(ValueError):
        flops_per_token(0, 12, 768, 1024)


def test_mfu_is_achieved_over_peak() -> None:
    assert mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


def test_matmul_flops_counts_two_per_multiply_add() -> None:
    assert matmul_flops(2, 3, 4) == 48


def test_forward_flops_per_token_is_a_third_of_training() -> None:
    from bench.flops import forward_flops_per_token

    n = gpt2_param_count(12, 768, 8192, 1024, include_positions=False)
    assert forward_flops_per_token(n, 12, 768, 512) * 3 == pytest.approx(
        flops_per_token(n, 12, 768, 512)
    )
    with pytest.raises(ValueError):
        forward_flops_per_token(n, 12, 768, 0)
