"""Carve the validation split out of a prepared training split (``training.validation``).

The prepare stage calls it after writing train and test::

    carved = carve_validation(out_dir, fraction=0.05, seed=42, by_doc=False)
    carved.train_sha256, carved.validation_lines

Rows of ``train.jsonl`` go to validation by a keyed hash (seed, and a salt of its own, so
the choice is independent of the test split's) of their text (``split.unit: line``) or of
their ``doc`` (``unit: document``, and instruction examples, whose ``doc`` is their
``split.groupBy`` value or record id), so whole documents and groups stay together. The
test split is never touched. Validation rows whose text (examples: whose prompt or answer,
ignoring case and spacing) is also in the remaining training rows are dropped, so no text
is in two of the three splits. Both files and their token arrays (and loss mask) are
rewritten in one streaming pass each; the rows keep their order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kubetune.contract import StageError
from kubetune.dataset_format import (
    MASK_DTYPE,
    TRAIN,
    VALIDATION,
    TokenWriter,
    split_files,
)
from kubetune.schema import Reason
from kubetune_trainer.cleaning import seed_key, text_hash
from kubetune_trainer.prepare_examples import match_key

_U64 = 1 << 64
_SALT = b"kubetune-validation"


@dataclass(frozen=True)
class CarvedSplit:
    """What :func:`carve_validation` left in train and wrote to validation."""

    train_lines: int
    train_tokens: int
    train_sha256: str
    validation_lines: int
    validation_tokens: int
    validation_sha256: str
    removed: int  # chosen for validation but their text was also in train: dropped


def _row_keys(row: dict[str, str], instruction: bool) -> list[int]:
    """What must not be on both sides: the text, and for examples the prompt and answer."""
    keys = [text_hash(row["text"])]
    if instruction:
        keys.append(text_hash("prompt:" + match_key(row["prompt"])))
        keys.append(text_hash("answer:" + match_key(row["answer"])))
    return keys


def _choose(jsonl: Path, fraction: float, seed: int, by_doc: bool) -> np.ndarray:
    key = (seed_key(seed) + _SALT)[:64]
    threshold = int(fraction * _U64)
    chosen = []
    with open(jsonl, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            value = row["doc"] if by_doc else row["text"]
            chosen.append((text_hash(value, key) >> 64) < threshold)
    return np.asarray(chosen, dtype=bool)


def carve_validation(
    out_dir: Path, *, fraction: float, seed: int, by_doc: bool, instruction: bool = False
) -> CarvedSplit:
    """Move a ``fraction`` of ``out_dir``'s train split into a validation split."""
    train_files, val_files = split_files(TRAIN), split_files(VALIDATION)
    train_jsonl = out_dir / train_files.text_name
    chosen = _choose(train_jsonl, fraction, seed, by_doc)
    # One more pass: the training rows' keys, and the (few) chosen rows' keys to check.
    train_keys: set[int] = set()
    chosen_keys: dict[int, list[int]] = {}
    with open(train_jsonl, encoding="utf-8") as fh:
        for i, (line, is_val) in enumerate(zip(fh, chosen, strict=True)):
            keys = _row_keys(json.loads(line), instruction)
            if is_val:
                chosen_keys[i] = keys
            else:
                train_keys.update(keys)
    to_train = ~chosen
    to_val = chosen.copy()
    for i, keys in chosen_keys.items():
        if any(k in train_keys for k in keys):
            to_val[i] = False
    if not to_val.any():
        raise StageError(
            f"the validation split is empty ({int(chosen.sum())} of {len(chosen)} training rows "
            f"chosen, all also in training); raise training.validation.fraction ({fraction}) "
            "or add data",
            Reason.DATASET_UNUSABLE,
        )
    if not to_train.any():
        raise StageError(
            f"training.validation.fraction={fraction} left no training data; lower it",
            Reason.DATASET_UNUSABLE,
        )
    train_sha, val_sha = _split_jsonl(train_jsonl, out_dir / val_files.text_name, to_train, to_val)
    train_tokens, val_tokens = _split_tokens(out_dir, to_train, to_val)
    return CarvedSplit(
        train_lines=int(to_train.sum()),
        train_tokens=train_tokens,
        train_sha256=train_sha,
        validation_lines=int(to_val.sum()),
        validation_tokens=val_tokens,
        validation_sha256=val_sha,
        removed=int(chosen.sum() - to_val.sum()),
    )


def _split_jsonl(
    train_jsonl: Path, val_jsonl: Path, to_train: np.ndarray, to_val: np.ndarray
) -> tuple[str, str]:
    """Rewrite train.jsonl with its ``to_train`` rows and write ``to_val`` rows to validation."""
    import hashlib

    tmp = train_jsonl.with_name(".train.carved.jsonl")
    train_sha, val_sha = hashlib.sha256(), hashlib.sha256()
    with (
        open(train_jsonl, "rb") as src,
        open(tmp, "wb") as train_out,
        open(val_jsonl, "wb") as val_out,
    ):
        for i, line in enumerate(src):
            if to_train[i]:
                train_out.write(line)
                train_sha.update(line)
            elif to_val[i]:
                val_out.write(line)
                val_sha.update(line)
    tmp.replace(train_jsonl)
    return train_sha.hexdigest(), val_sha.hexdigest()


def _split_tokens(out_dir: Path, to_train: np.ndarray, to_val: np.ndarray) -> tuple[int, int]:
    """Rewrite the train token files with ``to_train`` rows; write ``to_val`` rows to validation."""
    files = split_files(TRAIN)
    tokens = np.load(out_dir / files.tokens_name)
    offsets = np.load(out_dir / files.offsets_name)
    mask_path = out_dir / files.loss_mask_name
    mask = np.load(mask_path) if mask_path.exists() else None
    lengths = np.diff(offsets)
    per_token = np.repeat(np.arange(len(lengths)), lengths)
    counts = []
    for split, rows in ((VALIDATION, to_val), (TRAIN, to_train)):
        keep = rows[per_token]
        writer = TokenWriter(out_dir, split, masked=mask is not None)
        writer.add_flat(
            tokens[keep],
            lengths[rows],
            None if mask is None else mask[keep].astype(MASK_DTYPE, copy=False),
        )
        writer.close()
        counts.append(writer.tokens)
    return counts[1], counts[0]
