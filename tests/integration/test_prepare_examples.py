"""Prepare for instruction data (dataset.kind promptCompletion and chat) on the real tldr examples.

Covers: the group-aware split that cannot leak (no command, prompt or answer on both
sides), the loss mask (1 exactly on answer tokens), bad records counted per cause and a
clear failure when most are bad, over-long examples, csv and Parquet sources on S3.
"""

from __future__ import annotations

import csv
import io
import json
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datapaths import TLDR_CHAT, TLDR_PROMPT_COMPLETION, require
from fixtures_s3 import s3_client

from kubetune.contract import StageError
from kubetune.dataset_format import TEST, TRAIN, answer_start, read_examples, read_tokens
from kubetune.results import PrepareResult
from kubetune.schema import FineTuneJob, Reason, job_manifest, parse_job
from kubetune.storage import open_storage
from kubetune_trainer.context import make_context
from kubetune_trainer.prepare import run
from kubetune_trainer.prepare_examples import match_key

N_RECORDS = 4000


def make_job(source: str, output: str, seq: int = 128, **dataset: Any) -> FineTuneJob:
    return parse_job(
        job_manifest(
            "prep-examples",
            model={
                "fresh": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "nPositions": 256, "vocabSize": 600}
            },
            training={"maxSeqLength": seq},
            dataset={"source": source, "clean": {"minChars": 4, "stripMarkup": False}, **dataset},
            storage={"output": output},
        )
    )


def records(path: Path, n: int = N_RECORDS) -> list[dict[str, Any]]:
    with open(require(path), encoding="utf-8") as fh:
        return [json.loads(line) for line in islice(fh, n)]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("chat")
    job = make_job(
        f"file://{require(TLDR_CHAT)}",
        f"file://{base}/out",
        kind="chat",
        maxDocuments=N_RECORDS,
        split={"testFraction": 0.2, "seed": 7, "groupBy": "command"},
    )
    result = run(make_context(job, scratch=base / "scratch"))
    return {"result": result, "store": open_storage(f"file://{base}/out"), "base": base}


def test_the_group_split_keeps_every_command_on_one_side(chat_run: dict[str, Any]) -> None:
    store = chat_run["store"]
    train, test = read_examples(store, TRAIN), read_examples(store, TEST)
    source = records(TLDR_CHAT)
    command_of = {match_key(r["messages"][-2]["content"]): r["command"] for r in source}
    train_commands = {command_of[match_key(e.prompt)] for e in train}
    test_commands = {command_of[match_key(e.prompt)] for e in test}
    assert train_commands and test_commands
    assert not train_commands & test_commands
    # Every record of a test command that survived cleaning is in the test split.
    assert {e.doc for e in test} == test_commands
    # No prompt and no answer of the test split is in training, even ignoring case/spacing.
    assert not {match_key(e.prompt) for e in test} & {match_key(e.prompt) for e in train}
    assert not {match_key(e.answer) for e in test} & {match_key(e.answer) for e in train}
    stats = chat_run["result"].stats
    assert (stats.prompt_overlap, stats.answer_overlap, stats.overlap) == (0, 0, 0)
    assert stats.train_groups == len(train_commands)
    assert stats.test_groups == len(test_commands)
    assert stats.kind == "chat" and stats.records == N_RECORDS
    assert stats.train_lines == len(train) and stats.test_lines == len(test)


def test_the_loss_mask_marks_exactly_the_answers(chat_run: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    store = chat_run["store"]
    out = chat_run["base"] / "out"
    tokenizer = AutoTokenizer.from_pretrained(str(out / "dataset" / "tokenizer"))
    for split in (TRAIN, TEST):
        rows = read_examples(store, split)
        tokens = read_tokens(store, split, lines=len(rows))
        mask = np.load(out / f"dataset/{split}.loss_mask.npy")
        assert mask.dtype == np.uint8 and mask.shape == tokens.tokens.shape
        ids, masks = tokens.line_ids(), tokens.line_mask(mask)
        for row, example_ids, example_mask in list(zip(rows, ids, masks, strict=True))[:200]:
            start = answer_start(example_mask)
            assert set(example_mask[:start]) == {0}
            assert tokenizer.decode(example_ids[start:]) == row.answer + "\n"
            assert tokenizer.decode(example_ids) == row.text
    prepared = PrepareResult.model_validate_json(store.read_text("dataset/prepare.json"))
    assert prepared.answer_end == ""  # the default template ends an answer with a newline


def test_the_same_seed_gives_the_same_split_and_another_seed_another(tmp_path: Path) -> None:
    def split_with(seed: int, out: str) -> PrepareResult:
        job = make_job(
            f"file://{require(TLDR_PROMPT_COMPLETION)}",
            f"file://{tmp_path}/{out}",
            kind="promptCompletion",
            maxDocuments=1500,
            split={"testFraction": 0.2, "seed": seed, "groupBy": "command"},
        )
        return run(make_context(job, scratch=tmp_path / f"scratch-{out}"))

    a, b, c = split_with(1, "a"), split_with(1, "b"), split_with(2, "c")
    assert a.test_sha256 == b.test_sha256 and a.train_sha256 == b.train_sha256
    assert a.test_sha256 != c.test_sha256


def test_over_long_examples_are_dropped_and_counted(tmp_path: Path) -> None:
    job = make_job(
        f"file://{require(TLDR_PROMPT_COMPLETION)}",
        f"file://{tmp_path}/out",
        seq=24,
        kind="promptCompletion",
        maxDocuments=1500,
        maxBadFraction=0.95,
    )
    result = run(make_context(job, scratch=tmp_path / "scratch"))
    assert result.stats.bad_records and result.stats.bad_records["overLong"] > 0
    store = open_storage(f"file://{tmp_path}/out")
    tokens = read_tokens(store, TRAIN)
    assert int(np.diff(tokens.offsets).max()) <= 24 - 2


def test_mostly_bad_records_fail_with_the_causes_and_fields(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    good = [{"question": f"how do I list files number {i}", "answer": f"ls -{i}"} for i in range(3)]
    bad = [{"question": f"how do I list files number {i}"} for i in range(7)]
    data.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    job = make_job(f"file://{data}", f"file://{tmp_path}/out", kind="promptCompletion")
    with pytest.raises(StageError) as err:
        run(make_context(job, scratch=tmp_path / "scratch"))
    message = str(err.value)
    assert err.value.reason == Reason.DATASET_UNUSABLE.value
    assert "10 of 10 records are bad" in message and "missingField" in message
    assert "dataset.promptField ('prompt')" in message
    assert not list((tmp_path / "out").rglob("prepare.json"))


def test_some_bad_records_are_skipped_and_counted(tmp_path: Path) -> None:
    rows = records(TLDR_PROMPT_COMPLETION, 600)
    rows[5]["completion"] = ""
    del rows[6]["prompt"]
    rows[7]["prompt"] = {"not": "text"}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = make_job(f"file://{data}", f"file://{tmp_path}/out", seq=256, kind="promptCompletion")
    result = run(make_context(job, scratch=tmp_path / "scratch"))
    assert result.stats.bad_records == {"emptyAnswer": 1, "missingField": 1, "notText": 1}
    assert result.stats.records == 600


def test_csv_and_parquet_sources_on_s3(s3_bucket: str, moto_s3: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = records(TLDR_CHAT, 1000)
    client = s3_client(moto_s3)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["messages", "command"])
    writer.writeheader()
    for r in rows[:500]:
        writer.writerow({"messages": json.dumps(r["messages"]), "command": r["command"]})
    client.put_object(Bucket=s3_bucket, Key="chat/part-0.csv", Body=text.getvalue().encode())
    table = pa.Table.from_pylist(
        [{"messages": r["messages"], "command": r["command"]} for r in rows[500:]]
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    client.put_object(Bucket=s3_bucket, Key="chat/part-1.parquet", Body=sink.getvalue())
    job = make_job(
        f"s3://{s3_bucket}/chat/",
        f"s3://{s3_bucket}/runs/chat",
        seq=256,
        kind="chat",
        split={"testFraction": 0.2, "groupBy": "command"},
    )
    result = run(make_context(job, scratch=tmp_path / "scratch"))
    assert result.stats.records == 1000
    assert not result.stats.bad_records
    store = open_storage(f"s3://{s3_bucket}/runs/chat")
    assert "dataset/train.loss_mask.npy" in store.list("dataset")
    kept = result.stats.train_lines + result.stats.test_lines
    assert kept == len(read_examples(store, TRAIN)) + len(read_examples(store, TEST))
