"""Near-duplicate measures on real tldr text: normalised, letters-and-digits, MinHash/LSH."""

from __future__ import annotations

import random

import pytest
from datapaths import tldr_lines

from kubetune_trainer.near_dup import (
    letters_and_digits,
    minhash_signatures,
    near_duplicate_mask,
    near_twins,
    normalize_for_match,
    twin_counts,
)

NGRAM = 5


def exact_jaccard(a: str, b: str) -> float:
    def grams(text: str) -> set[bytes]:
        data = normalize_for_match(text).encode().ljust(NGRAM, b"\0")
        return {data[i : i + NGRAM] for i in range(len(data) - NGRAM + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


@pytest.fixture(scope="module")
def lines() -> list[str]:
    unique = list(dict.fromkeys(line.strip() for line in tldr_lines("common") if line.strip()))
    random.Random(3).shuffle(unique)
    return unique[:3000]


def test_normalized_ignores_case_punctuation_and_spacing() -> None:
    assert normalize_for_match("  Compress a  FILE:") == normalize_for_match("compress a file")
    assert normalize_for_match("tar -xf x.tar") != normalize_for_match("tar xf x tar gz")


def test_letters_and_digits_drop_everything_else() -> None:
    assert letters_and_digits("git-log --oneline (v2)") == "gitlogonelinev2"


def test_signature_agreement_estimates_jaccard(lines: list[str]) -> None:
    pairs = [(lines[i], lines[i + 1]) for i in range(0, 200, 2)]
    pairs += [(line, line.replace(" ", "  ").upper() + " now") for line in lines[200:300]]
    sig = minhash_signatures([t for pair in pairs for t in pair])
    estimates = (sig[0::2] == sig[1::2]).mean(axis=1)
    truth = [exact_jaccard(a, b) for a, b in pairs]
    errors = sorted(abs(e - t) for e, t in zip(estimates, truth, strict=True))
    assert errors[len(errors) // 2] < 0.06  # median error of a 64-permutation estimate
    assert errors[-1] < 0.3


def test_near_twins_finds_edited_copies_and_not_strangers(lines: list[str]) -> None:
    train, strangers = lines[:2000], lines[2000:2300]
    edited = [line + " now" for line in train[:100] if len(line) > 40]
    found = near_twins(train, edited + strangers, threshold=0.8)
    brute_strangers = sum(any(exact_jaccard(s, t) >= 0.8 for t in train) for s in strangers[:100])
    assert found >= 0.95 * len(edited)
    assert found <= len(edited) + 3 * brute_strangers + 5


def test_near_duplicate_mask_keeps_the_first_of_each_pair(lines: list[str]) -> None:
    base = [line for line in lines[:500] if len(line) > 40][:50]
    texts = base + [line.rstrip(".") + "!" for line in base]
    mask = near_duplicate_mask(texts, threshold=0.8)
    assert not mask[: len(base)].any()
    assert mask[len(base) :].mean() > 0.95


def test_twin_counts_order_from_strict_to_loose(lines: list[str]) -> None:
    train, test = lines[:2500], lines[2500:]
    test = [*test, train[0].upper(), train[1].replace(" ", "")]
    counts = twin_counts(train, test, threshold=0.8)
    assert counts["exact"] == 0
    assert counts["normalized"] >= 1
    assert counts["lettersDigits"] >= counts["normalized"] + 1
    assert counts["near"] >= counts["normalized"]
