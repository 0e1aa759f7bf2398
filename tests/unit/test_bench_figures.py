"""Pure helpers of bench/ (figures, best-of runs, the ablation's patch, tree PSS): no timing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is a top-level package of the repo, not installed
    sys.path.insert(0, str(REPO))

from bench.eval_bench import alternate  # noqa: E402
from bench.prepare_bench import tree_pss_mb  # noqa: E402
from bench.train_bench import (  # noqa: E402
    combine_rounds,
    no_bos_figures,
    peer_figures,
    without_start_token,
)


def _by_name(figures: list) -> dict:
    return {f.name: f for f in figures}


def _side(rate: float, *losses: float) -> dict:
    """One side of the peer comparison as combine_rounds makes it (seeds 42, 43, ...)."""
    rounds = [
        {"steady_tokens_per_s": rate, "test_loss": loss, "seed": 42 + i}
        for i, loss in enumerate(losses)
    ]
    return combine_rounds(rounds)


def test_peer_figures_compare_with_the_fastest_peer_and_the_best_loss() -> None:
    kt = _side(1200.0, 6.9, 7.038)  # mean 6.969
    runs = {"group_texts": _side(1000.0, 7.0, 7.0), "trl_sft": _side(800.0, 6.8, 7.0)}
    figs = _by_name(peer_figures(kt, runs, {}, steps=12, threads=1))
    assert figs["train_speedup_vs_fastest_peer"].value == pytest.approx(1.2)
    assert "group_texts" in figs["train_speedup_vs_fastest_peer"].note
    assert figs["train_speedup_vs_fastest_peer"].met is True
    assert figs["train_loss_gap_vs_best_peer"].value == pytest.approx(0.01)
    assert "trl_sft" in figs["train_loss_gap_vs_best_peer"].note
    assert figs["trl_sft_test_loss"].value == pytest.approx(6.9)
    assert "mean of 2 seeds (6.800-7.000)" in figs["trl_sft_test_loss"].note
    assert "seeds 42, 43" in figs["train_loss_gap_vs_best_peer"].note


def test_peer_figures_record_a_peer_that_did_not_run_as_not_measured() -> None:
    runs = {"group_texts": _side(1000.0, 7.0)}
    errors = {"trl_sft": "trl is not installed"}
    figs = _by_name(peer_figures(_side(900.0, 7.2), runs, errors, 12, 1))
    assert figs["trl_sft_tokens_per_s"].value is None
    assert "trl is not installed" in figs["trl_sft_tokens_per_s"].note
    assert figs["train_speedup_vs_fastest_peer"].met is False
    assert figs["train_loss_gap_vs_best_peer"].met is False


def test_peer_figures_without_any_peer_leave_the_comparisons_unmeasured() -> None:
    errors = {"group_texts": "boom", "trl_sft": "boom"}
    figs = _by_name(peer_figures(_side(900.0, 7.2), {}, errors, 12, 1))
    assert figs["train_speedup_vs_fastest_peer"].value is None
    assert figs["train_loss_gap_vs_best_peer"].met is None


def test_tree_pss_counts_this_process_and_nothing_for_a_finished_one() -> None:
    assert tree_pss_mb(os.getpid()) > 1.0
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert tree_pss_mb(child.pid) == 0.0


def test_test_loss_scores_the_same_targets_with_or_without_a_context_token() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from bench.train_bench import test_loss

    class Tok:
        is_fast = False

        def __call__(self, texts: list[str], **_: object) -> dict:
            return {"input_ids": [[3 + (ord(c) % 20) for c in t] for t in texts]}

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        n_positions=64,
        vocab_size=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    texts = ["hello world", "ab", "x"]  # "x" has no second token: never scored
    plain = test_loss(model, Tok(), texts)
    after_eos = test_loss(model, Tok(), texts, context=0)
    assert plain > 0 and after_eos > 0
    assert plain != after_eos  # the same 11 targets, conditioned differently


def test_combine_rounds_keeps_the_best_rate_and_the_mean_loss_and_drops_the_models() -> None:
    rounds = [
        {"steady_tokens_per_s": 900.0, "test_loss": 6.5, "seed": 42, "model": "a", "steps": 60},
        {"steady_tokens_per_s": 1100.0, "test_loss": 6.1, "seed": 43, "model": "b"},
        {"steady_tokens_per_s": 1000.0, "test_loss": 6.3, "seed": 44, "model": "c"},
    ]
    side = combine_rounds(rounds)
    assert side["steady_tokens_per_s"] == 1100.0 and side["rates"] == [900.0, 1100.0, 1000.0]
    assert side["test_loss"] == pytest.approx(6.3) and side["test_losses"] == [6.5, 6.1, 6.3]
    assert side["seeds"] == [42, 43, 44] and side["steps"] == 60 and "model" not in side
    with pytest.raises(ValueError):
        combine_rounds([])


def test_alternate_interleaves_the_sides_and_keeps_each_first_result() -> None:
    calls: list[str] = []

    def side(name: str) -> object:
        def run() -> object:
            calls.append(name)
            return (name, len(calls))

        return run

    ours, ours_s, base, base_s = alternate(side("ours"), side("base"), rounds=3)
    assert calls == ["ours", "base"] * 3
    assert ours == ("ours", 1) and base == ("base", 2)
    assert 0 <= ours_s < 1 and 0 <= base_s < 1


def test_the_start_token_ablation_drops_the_bos_and_restores_the_stage() -> None:
    from kubetune_trainer import train

    original = train.build_rows
    tokens, offsets = [5, 6, 7, 8, 9], [0, 3, 5]

    def rows() -> dict:
        built = train.build_rows(tokens, offsets, block_size=16, eos_id=0, bos_id=1, packing=True)
        return {"tokens": built.tokens}

    with_bos, without = rows(), without_start_token(rows)
    assert train.build_rows is original
    # bos line eos per line, or line eos: one position fewer per line without the bos.
    assert with_bos["tokens"] - without["tokens"] == len(offsets) - 1


def test_no_bos_figures_compare_the_ablation_with_the_best_peer() -> None:
    runs = {"group_texts": {"test_loss": 7.0}, "trl_sft": {"test_loss": 6.0}}
    figs = _by_name(no_bos_figures(_side(1000.0, 6.2, 6.4), runs))
    assert figs["train_peer_kubetune_no_bos_test_loss"].value == pytest.approx(6.3)
    gap = figs["train_loss_gap_no_bos_vs_best_peer"]
    assert gap.value == pytest.approx(0.05) and "trl_sft" in gap.note
    assert "train_loss_gap_no_bos_vs_best_peer" not in _by_name(
        no_bos_figures(_side(1000.0, 1.0), {})
    )
