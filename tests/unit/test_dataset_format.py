"""kubetune.dataset_format: what the writer writes the reader reads back, and every broken file
is rejected as DatasetUnusable with a message naming the file and what to do."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from kubetune.contract import StageError
from kubetune.dataset_format import (
    OFFSET_DTYPE,
    SPLITS,
    TEST,
    TOKEN_DTYPE,
    TRAIN,
    JsonlWriter,
    TokenWriter,
    read_jsonl,
    read_texts,
    read_tokens,
    upload_splits,
    write_split,
)
from kubetune.layout import RunLayout
from kubetune.schema import Reason
from kubetune.storage import Storage, open_storage

TEXTS = {
    TRAIN: ["ls -la", 'say "hi"\tand\\bye', "ünïcode ✓ line", "x"],
    TEST: ["git status", "one more\nwith a newline"],
}
IDS = {
    TRAIN: [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10]],
    TEST: [[11, 12], [13, 14, 15]],
}


def _written(tmp_path: Path, store: Storage | None = None) -> Storage:
    """Both splits written with write_split and uploaded to ``store`` (file:// by default)."""
    store = store or open_storage(f"file://{tmp_path}/run")
    for split in SPLITS:
        write_split(tmp_path / "local", split, TEXTS[split], IDS[split], f"doc-{split}")
    upload_splits(store, tmp_path / "local")
    return store


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _unusable(info: pytest.ExceptionInfo[StageError], *parts: str) -> str:
    message = str(info.value)
    assert info.value.reason == Reason.DATASET_UNUSABLE.value
    for part in parts:
        assert part in message, message
    return message


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_written_splits_read_back_as_texts_and_line_token_ids(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = None
    if backend == "s3":
        store = open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/runs/rt")
    store = _written(tmp_path, store)
    for split in SPLITS:
        texts = read_texts(store, split)
        tokens = read_tokens(store, split, lines=len(texts), vocab_size=16)
        assert texts == TEXTS[split]
        assert tokens.line_ids() == IDS[split]
        assert tokens.line_ids(1) == IDS[split][:1]
        assert tokens.lines == len(texts)
        assert tokens.tokens.dtype == TOKEN_DTYPE and tokens.offsets.dtype == OFFSET_DTYPE
        assert int(tokens.offsets[0]) == 0 and int(tokens.offsets[-1]) == len(tokens.tokens)


def test_reading_into_a_local_dir_memory_maps_and_reuses_the_download(tmp_path: Path) -> None:
    store = _written(tmp_path)
    local = tmp_path / "scratch"
    first = read_tokens(store, TRAIN, local_dir=local)
    assert isinstance(first.tokens, np.memmap) and first.line_ids() == IDS[TRAIN]
    (tmp_path / "run" / RunLayout.TRAIN_TOKENS).unlink()  # the local copy is used now
    assert read_tokens(store, TRAIN, local_dir=local).line_ids() == IDS[TRAIN]


def test_streaming_writers_match_write_split_byte_for_byte(tmp_path: Path) -> None:
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    written = write_split(whole, TRAIN, TEXTS[TRAIN], IDS[TRAIN], "doc-train")
    streamed.mkdir()
    text = JsonlWriter(streamed / "train.jsonl")
    tokens = TokenWriter(streamed, TRAIN)
    for line in TEXTS[TRAIN]:
        text.write(line, "doc-train")
    tokens.add(IDS[TRAIN][:2])
    rest = IDS[TRAIN][2:]
    tokens.add_flat(np.array([t for ids in rest for t in ids]), np.array([len(x) for x in rest]))
    assert text.close() == written.sha256
    tokens.close()
    for name in ("train.jsonl", "train.tokens.npy", "train.offsets.npy"):
        assert (streamed / name).read_bytes() == (whole / name).read_bytes(), name
    assert sorted(p.name for p in streamed.iterdir()) == sorted(p.name for p in whole.iterdir())
    assert list(read_jsonl(streamed / "train.jsonl")) == [(t, "doc-train") for t in TEXTS[TRAIN]]
    assert (written.lines, written.tokens) == (4, 10)


def test_jsonl_rows_are_text_then_doc_one_object_per_line(tmp_path: Path) -> None:
    write_split(tmp_path, TEST, TEXTS[TEST], IDS[TEST], ["a", "b"])
    rows = (tmp_path / "test.jsonl").read_text(encoding="utf-8").split("\n")
    assert rows[-1] == "" and len(rows) == 3  # "\n"-terminated, newlines in texts escaped
    assert [json.loads(r) for r in rows[:-1]] == [
        {"text": "git status", "doc": "a"},
        {"text": "one more\nwith a newline", "doc": "b"},
    ]


def test_write_split_rejects_texts_and_ids_of_different_lengths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 texts but 1 token id lists"):
        write_split(tmp_path, TEST, TEXTS[TEST], IDS[TEST][:1], "d")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("key", [RunLayout.TRAIN_TOKENS, RunLayout.TRAIN_OFFSETS])
def test_missing_token_file_says_run_the_prepare_stage_first(key: str, tmp_path: Path) -> None:
    store = _written(tmp_path)
    store.delete(key)
    with pytest.raises(StageError) as info:
        read_tokens(store, TRAIN)
    _unusable(info, store.uri(key), "run the prepare stage first")


def test_missing_jsonl_says_run_the_prepare_stage_first(tmp_path: Path) -> None:
    store = _written(tmp_path)
    store.delete(RunLayout.TEST_TEXT)
    with pytest.raises(StageError) as info:
        read_texts(store, TEST)
    _unusable(info, store.uri(RunLayout.TEST_TEXT), "run the prepare stage first")


def test_offsets_not_ending_at_the_token_count_are_rejected(tmp_path: Path) -> None:
    store = _written(tmp_path)
    store.write_bytes(RunLayout.TRAIN_OFFSETS, _npy(np.array([0, 3, 4, 9], dtype=OFFSET_DTYPE)))
    with pytest.raises(StageError) as info:
        read_tokens(store, TRAIN)
    _unusable(
        info,
        store.uri(RunLayout.TRAIN_OFFSETS),
        "offsets do not match",
        "the last offset is 9, the array holds 10 tokens",
        "re-run the prepare stage",
    )


def test_decreasing_offsets_are_rejected_naming_the_line(tmp_path: Path) -> None:
    store = _written(tmp_path)
    offsets = np.array([0, 3, 2, 9, 10], dtype=OFFSET_DTYPE)
    store.write_bytes(RunLayout.TRAIN_OFFSETS, _npy(offsets))
    with pytest.raises(StageError) as info:
        read_tokens(store, TRAIN)
    _unusable(info, "offsets decrease at line 1", "re-run the prepare stage")


@pytest.mark.parametrize(
    "offsets",
    [
        np.array([1, 3, 10], dtype=OFFSET_DTYPE),  # does not start at 0
        np.array([0], dtype=OFFSET_DTYPE),  # no line
        np.array([0, 3, 10], dtype=np.int32),  # wrong dtype
    ],
)
def test_malformed_offsets_are_rejected(offsets: np.ndarray, tmp_path: Path) -> None:
    store = _written(tmp_path)
    store.write_bytes(RunLayout.TRAIN_OFFSETS, _npy(offsets))
    with pytest.raises(StageError) as info:
        read_tokens(store, TRAIN)
    _unusable(info, "expected int64 line offsets starting at 0", "re-run the prepare stage")


def test_token_ids_of_another_dtype_are_rejected(tmp_path: Path) -> None:
    store = _written(tmp_path)
    store.write_bytes(RunLayout.TRAIN_TOKENS, _npy(np.arange(10, dtype=np.int64)))
    with pytest.raises(StageError) as info:
        read_tokens(store, TRAIN)
    _unusable(info, "expected 1-D uint32 token ids, found int64", "re-run the prepare stage")


def test_a_file_that_is_not_npy_is_rejected(tmp_path: Path) -> None:
    store = _written(tmp_path)
    store.write_bytes(RunLayout.TEST_TOKENS, b"not numpy at all")
    with pytest.raises(StageError) as info:
        read_tokens(store, TEST)
    _unusable(info, store.uri(RunLayout.TEST_TOKENS), "not a readable .npy array")


def test_line_count_differing_from_the_jsonl_is_rejected(tmp_path: Path) -> None:
    store = _written(tmp_path)
    with pytest.raises(StageError) as info:
        read_tokens(store, TEST, lines=3)
    _unusable(
        info,
        f"has 3 offsets for the 3 lines of {RunLayout.TEST_TEXT}",
        "the dataset is inconsistent, re-run the prepare stage",
    )


def test_token_id_outside_the_vocabulary_says_the_tokenizer_differs(tmp_path: Path) -> None:
    store = _written(tmp_path)
    with pytest.raises(StageError) as info:
        read_tokens(store, TRAIN, vocab_size=10)
    _unusable(info, "token id 10 is outside the model's vocabulary (10)", "re-run prepare")


def test_jsonl_row_without_text_is_rejected_naming_the_line(tmp_path: Path) -> None:
    store = _written(tmp_path)
    store.write_text(RunLayout.TEST_TEXT, '{"text": "fine", "doc": "d"}\n{"doc": "d"}\n')
    with pytest.raises(StageError) as info:
        read_texts(store, TEST)
    _unusable(
        info,
        f"{store.uri(RunLayout.TEST_TEXT)} line 2",
        "expected a JSON object with a 'text' field",
    )


def test_empty_jsonl_says_the_split_has_no_lines(tmp_path: Path) -> None:
    store = _written(tmp_path)
    store.write_text(RunLayout.TEST_TEXT, "")
    with pytest.raises(StageError) as info:
        read_texts(store, TEST)
    _unusable(info, "is empty: the test split has no lines", "raise dataset.split.testFraction")
