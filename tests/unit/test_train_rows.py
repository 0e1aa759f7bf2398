"""The train stage's rows from a prepared dataset: answers only for instruction datasets.

Run: ``python -m pytest tests/unit/test_train_rows.py -q`` (CPU, a second).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kubetune.dataset_format import TRAIN, TokenWriter, split_files
from kubetune.schema import job_manifest, parse_job
from kubetune.storage import open_storage
from kubetune_trainer.context import make_context
from kubetune_trainer.packing import IGNORE_INDEX, collate
from kubetune_trainer.train import load_training_rows

EOS, BOS = 0, 1
IDS = [[5, 6, 7, 8], [9, 10, 11]]
MASKS = [[0, 0, 1, 1], [0, 1, 1]]


def _prepared(tmp_path: Path, masked: bool) -> str:
    """A train split (and its loss mask when ``masked``) under a file:// output."""
    work = tmp_path / "work"
    work.mkdir()
    writer = TokenWriter(work, TRAIN, masked=masked)
    writer.add(IDS, MASKS if masked else None)
    writer.close()
    output = f"file://{tmp_path / 'out'}"
    storage, files = open_storage(output), split_files(TRAIN)
    storage.upload_file(writer.tokens_path, files.tokens)
    storage.upload_file(writer.offsets_path, files.offsets)
    if masked:
        storage.upload_file(writer.mask_path, files.loss_mask)
    return output


def _rows(tmp_path: Path, kind: str, masked: bool) -> np.ndarray:
    output = _prepared(tmp_path, masked)
    job = parse_job(
        job_manifest(
            "rows",
            dataset={"source": "file:///data/examples.jsonl", "kind": kind},
            model={"name": "gpt2"},
            training={"maxSeqLength": 16},
            storage={"output": output},
        )
    )
    ctx = make_context(job, scratch=tmp_path / "scratch")
    rows = load_training_rows(ctx, EOS, vocab_size=32, bos_id=BOS)
    return collate(rows, [0], pad_id=EOS)["labels"][0, :11]


def test_instruction_datasets_train_on_answers_and_eos_only(tmp_path: Path) -> None:
    labels = _rows(tmp_path, "promptCompletion", masked=True)
    x = IGNORE_INDEX
    assert labels.tolist() == [x, x, x, 7, 8, EOS, x, x, 10, 11, EOS]


def test_text_datasets_train_on_every_token(tmp_path: Path) -> None:
    labels = _rows(tmp_path, "text", masked=False)
    x = IGNORE_INDEX
    assert labels.tolist() == [x, 5, 6, 7, 8, EOS, x, 9, 10, 11, EOS]


def test_an_instruction_dataset_without_its_loss_mask_is_unusable(tmp_path: Path) -> None:
    from kubetune.contract import StageError

    with pytest.raises(StageError, match="loss_mask"):
        _rows(tmp_path, "chat", masked=False)
