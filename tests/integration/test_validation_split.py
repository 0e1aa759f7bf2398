"""The validation split prepare carves out of training (training.validation), on real data.

Checks that no text is in two of the three splits, that documents and groups stay whole,
that the test split is exactly the one a run without validation gets, and that a later run
without validation leaves no stale validation split behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from datapaths import TLDR_PROMPT_COMPLETION, require, tldr_files

from kubetune.dataset_format import TEST, TRAIN, VALIDATION, read_examples, read_tokens
from kubetune.results import PrepareResult
from kubetune.schema import FineTuneJob, job_manifest, parse_job
from kubetune.storage import open_storage
from kubetune_trainer.context import make_context
from kubetune_trainer.prepare import run
from kubetune_trainer.prepare_examples import match_key


def make_job(output: Path, validation: dict[str, Any] | None, **dataset: Any) -> FineTuneJob:
    training: dict[str, Any] = {"maxSeqLength": 128}
    if validation is not None:
        training["validation"] = validation
    return parse_job(
        job_manifest(
            "carve",
            model={
                "fresh": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "nPositions": 128, "vocabSize": 400}
            },
            training=training,
            dataset=dataset,
            storage={"output": f"file://{output}"},
        )
    )


def rows(out: Path, split: str) -> list[dict[str, Any]]:
    text = (out / "dataset" / f"{split}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def test_text_by_document_keeps_documents_whole_and_splits_disjoint(tmp_path: Path) -> None:
    source = f"file://{tldr_files('common')[0].parent}/"
    dataset = {"source": source, "maxDocuments": 200, "split": {"unit": "document"}}
    with_val = make_job(tmp_path / "a", {"fraction": 0.2}, **dataset)
    without = make_job(tmp_path / "b", None, **dataset)
    a = run(make_context(with_val, scratch=tmp_path / "sa"))
    b = run(make_context(without, scratch=tmp_path / "sb"))
    train, val, test = (rows(tmp_path / "a", s) for s in (TRAIN, VALIDATION, TEST))
    assert val and train
    texts = [{r["text"] for r in split} for split in (train, val, test)]
    assert not texts[0] & texts[1] and not texts[1] & texts[2] and not texts[0] & texts[2]
    assert not {r["doc"] for r in train} & {r["doc"] for r in val}
    # The test split is untouched: the same as without validation.
    assert a.test_sha256 == b.test_sha256
    assert a.stats.train_lines + (a.stats.validation_lines or 0) <= b.stats.train_lines
    store = open_storage(f"file://{tmp_path / 'a'}")
    for split, n in ((TRAIN, a.stats.train_lines), (VALIDATION, a.stats.validation_lines)):
        tokens = read_tokens(store, split, lines=n)
        assert tokens.lines == n
    assert a.stats.validation_tokens == int(read_tokens(store, VALIDATION).offsets[-1])
    import hashlib

    sha = hashlib.sha256((tmp_path / "a/dataset/train.jsonl").read_bytes()).hexdigest()
    assert a.train_sha256 == sha  # prepare.json vouches for the carved train split

    # The same output prepared again without validation: no stale validation split.
    again = make_job(tmp_path / "a", None, **dataset)
    run(make_context(again, scratch=tmp_path / "sc"))
    assert not (tmp_path / "a/dataset/validation.jsonl").exists()


def test_examples_keep_groups_whole_and_no_prompt_or_answer_on_two_sides(tmp_path: Path) -> None:
    job = make_job(
        tmp_path / "out",
        {"fraction": 0.15},
        source=f"file://{require(TLDR_PROMPT_COMPLETION)}",
        kind="promptCompletion",
        maxDocuments=3000,
        clean={"stripMarkup": False, "minChars": 4},
        split={"testFraction": 0.1, "groupBy": "command"},
    )
    result: PrepareResult = run(make_context(job, scratch=tmp_path / "s"))
    store = open_storage(f"file://{tmp_path / 'out'}")
    splits = {s: read_examples(store, s) for s in (TRAIN, VALIDATION, TEST)}
    groups = {s: {e.doc for e in rows} for s, rows in splits.items()}
    assert not groups[TRAIN] & groups[VALIDATION] and not groups[VALIDATION] & groups[TEST]
    for a, b in ((TRAIN, VALIDATION), (VALIDATION, TEST), (TRAIN, TEST)):
        assert not {match_key(e.prompt) for e in splits[a]} & {
            match_key(e.prompt) for e in splits[b]
        }
        assert not {match_key(e.answer) for e in splits[a]} & {
            match_key(e.answer) for e in splits[b]
        }
    assert result.stats.validation_lines == len(splits[VALIDATION])
    mask = np.load(tmp_path / "out/dataset/validation.loss_mask.npy")
    assert mask.shape == read_tokens(store, VALIDATION).tokens.shape
