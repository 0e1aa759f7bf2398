"""BLEU: the prompt/reference split and agreement with the sacrebleu command line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_trainer.bleu import BleuSample, corpus_bleu, select_samples, split_prompt

DATA = Path(__file__).resolve().parents[2] / "../shared/data"
SACREBLEU = Path(sys.executable).parent / "sacrebleu"


def _shakespeare(n: int) -> list[str]:
    lines = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if len(line.split()) >= 4][:n]


def _perturb(line: str, rng: random.Random) -> str:
    words = line.split()
    choice = rng.random()
    if choice < 0.25:
        return line  # exact hit
    if choice < 0.5:
        return " ".join(w for w in words if rng.random() > 0.3)  # dropped words
    if choice < 0.75:
        rng.shuffle(words)
        return " ".join(words)
    return " ".join([*words[: len(words) // 2], "the", "king", "said"])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str], list[str]]:
    rng = random.Random(3)
    refs = _shakespeare(300)
    hyps = [_perturb(line, rng) for line in refs]
    hyps[5] = ""  # an empty generation must count too
    base = tmp_path_factory.mktemp("bleu")
    (base / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    (base / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    return base / "ref.txt", base / "hyp.txt", hyps, refs


def test_corpus_bleu_equals_sacrebleu_command_line(
    files: tuple[Path, Path, list[str], list[str]],
) -> None:
    ref, hyp, hyps, refs = files
    cli = subprocess.run(
        [str(SACREBLEU), str(ref), "-i", str(hyp), "-b", "-w", "6"],
        capture_output=True,
        text=True,
        check=True,
    )
    score, _ = corpus_bleu(hyps, refs)
    assert 5.0 < score < 95.0  # a real mix of hits and misses, not a degenerate case
    assert score == pytest.approx(float(cli.stdout.strip()), abs=1e-6)


def test_bleu_signature_equals_sacrebleu_command_line(
    files: tuple[Path, Path, list[str], list[str]],
) -> None:
    ref, hyp, hyps, refs = files
    cli = subprocess.run(
        [str(SACREBLEU), str(ref), "-i", str(hyp)], capture_output=True, text=True, check=True
    )
    _, signature = corpus_bleu(hyps, refs)
    assert signature == json.loads(cli.stdout)["signature"]
    assert "tok:13a" in signature and "nrefs:1" in signature


def test_identical_hypotheses_score_100() -> None:
    refs = _shakespeare(20)
    assert corpus_bleu(refs, refs)[0] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("text", "fraction", "expected"),
    [
        ("one two three four", 0.5, ("one two", "three four")),
        ("one two three", 0.5, ("one", "two three")),  # floor of 1.5 words
        ("one two three", 0.01, ("one", "two three")),  # at least one prompt word
        ("one two three", 0.99, ("one two", "three")),  # at least one reference word
        ("one two", 0.5, ("one", "two")),
        ("  spaced\tout   words here ", 0.5, ("spaced out", "words here")),
    ],
)
def test_split_prompt_by_words(text: str, fraction: float, expected: tuple[str, str]) -> None:
    assert split_prompt(text, fraction) == BleuSample(*expected)


@pytest.mark.parametrize("text", ["", "   ", "single"])
def test_split_prompt_skips_lines_under_two_words(text: str) -> None:
    assert split_prompt(text, 0.5) is None


def test_select_samples_takes_first_splittable_lines_in_order() -> None:
    texts = ["a b", "skip", "c d e", "f g h i", "j k"]
    samples = select_samples(texts, 0.5, max_samples=3)
    assert [s.prompt for s in samples] == ["a", "c", "f g"]
    assert [s.reference for s in samples] == ["b", "d e", "h i"]
    assert select_samples(texts, 0.5, max_samples=3) == samples  # deterministic
