"""Dedup modes and the test-twin statistics on real text (tldr pages of two platforms).

tldr has many lines that differ only in case, punctuation or one word across pages and
platforms: exactly the near-duplicates that leak between a train and a test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from datapaths import tldr_lines

from kubetune.schema import CleanSpec, DatasetStats, SplitSpec
from kubetune_trainer.near_dup import letters_and_digits, normalize_for_match, twin_counts
from kubetune_trainer.prepare import prepare_lines
from kubetune_trainer.tokenizer_build import train_bpe_tokenizer


@pytest.fixture(scope="module")
def lines() -> list[tuple[str, str]]:
    return [("tldr", line) for line in tldr_lines("common", "osx") if line.strip()]


@pytest.fixture(scope="module")
def tokenizer(lines: list[tuple[str, str]]) -> Any:
    return train_bpe_tokenizer([text for _, text in lines[:3000]], 300, model_max_length=128)


def prepare(lines: list[tuple[str, str]], tokenizer: Any, out: Path, dedup: str) -> DatasetStats:
    clean = CleanSpec.model_validate({"dedup": dedup})
    return prepare_lines(lines, clean, SplitSpec(seed=5), tokenizer, out, workers=1).stats


def texts(path: Path) -> list[str]:
    import json

    return [json.loads(row)["text"] for row in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def by_mode(
    lines: list[tuple[str, str]], tokenizer: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[DatasetStats, Path]]:
    out = {}
    for mode in ("exact", "normalized", "near"):
        path = tmp_path_factory.mktemp(mode)
        out[mode] = (prepare(lines, tokenizer, path, mode), path)
    return out


def test_every_mode_reports_twins_under_each_measure(
    by_mode: dict[str, tuple[DatasetStats, Path]],
) -> None:
    for mode, (stats, path) in by_mode.items():
        twins = stats.test_twins
        assert twins is not None, mode
        recount = twin_counts(texts(path / "train.jsonl"), texts(path / "test.jsonl"), 0.8)
        assert twins.model_dump(by_alias=True) == recount, mode
        assert twins.exact == stats.overlap == 0


def test_exact_dedup_leaves_normalized_twins_that_normalized_mode_removes(
    by_mode: dict[str, tuple[DatasetStats, Path]],
) -> None:
    exact, normalized = by_mode["exact"][0].test_twins, by_mode["normalized"][0].test_twins
    assert exact is not None and normalized is not None
    assert exact.normalized > 0  # tldr: "Compress a file:" vs "compress a file"
    assert normalized.normalized == 0
    assert by_mode["normalized"][0].duplicates_removed > by_mode["exact"][0].duplicates_removed


def test_near_mode_leaves_no_near_twin_and_no_near_duplicate_in_train(
    by_mode: dict[str, tuple[DatasetStats, Path]],
) -> None:
    stats, path = by_mode["near"]
    exact = by_mode["exact"][0]
    assert stats.test_twins is not None and exact.test_twins is not None
    assert exact.test_twins.near > 0
    assert stats.test_twins.near == 0
    assert stats.test_twins.normalized == 0
    assert stats.duplicates_removed > by_mode["normalized"][0].duplicates_removed
    train = texts(path / "train.jsonl")
    assert len(train) == stats.train_lines
    assert len({normalize_for_match(t) for t in train}) == len(train)


def test_near_mode_keeps_the_token_files_aligned_with_the_text(
    by_mode: dict[str, tuple[DatasetStats, Path]], tokenizer: Any
) -> None:
    import numpy as np

    _, path = by_mode["near"]
    train = texts(path / "train.jsonl")
    tokens = np.load(path / "train.tokens.npy")
    offsets = np.load(path / "train.offsets.npy")
    assert len(offsets) == len(train) + 1
    for i in (0, len(train) // 2, len(train) - 1):
        ids = tokens[offsets[i] : offsets[i + 1]].tolist()
        assert ids == tokenizer(train[i], add_special_tokens=False).input_ids


def test_letters_digits_is_the_loosest_exact_measure(
    by_mode: dict[str, tuple[DatasetStats, Path]],
) -> None:
    twins = by_mode["exact"][0].test_twins
    assert twins is not None
    assert twins.exact <= twins.normalized <= twins.letters_digits
    assert letters_and_digits("Compress: a FILE!") == letters_and_digits("compress a file")
