"""The prepared-dataset format: its one owner, with the writer, the reader and the checks.

The prepare stage writes it under ``<output>/dataset/`` (the :class:`RunLayout` keys);
train and evaluate read it; test fixtures and benchmarks write small ones. Nothing
else spells these files, their dtypes or their invariants. Per split (``train``,
``test``, and ``validation`` when ``training.validation`` carves one out of train)::

    dataset/
      {split}.jsonl         one JSON object per line, {"text": str, "doc": str}, UTF-8,
                            "\\n"-terminated (newlines inside a text are JSON-escaped);
                            ``doc`` is the source document id; the sha256 of the bytes
                            is prepare.json's trainSha256 / testSha256
      {split}.tokens.npy    1-D little-endian uint32 (TOKEN_DTYPE): the token ids of every
                            line, concatenated in jsonl order, no special tokens (no bos/eos)
      {split}.offsets.npy   1-D little-endian int64 (OFFSET_DTYPE), lines + 1 values:
                            line i is tokens[offsets[i]:offsets[i + 1]]
      {split}.loss_mask.npy promptCompletion and chat only: 1-D uint8 (MASK_DTYPE), one value
                            per token: 1 where the token belongs to an answer (it is trained
                            and scored), 0 for prompt, system, user and template tokens
      tokenizer/            the tokenizer that made the ids (save_pretrained)
      prepare.json          kubetune.results.PrepareResult, written last: it vouches
                            for the files above

Examples (``dataset.kind`` promptCompletion or chat) are one row each. The row also has
``"prompt"`` (the last user turn or the prompt, as cleaned), ``"answer"`` (the answer to
it: the reference evaluation scores against) and, for chat, ``"messages"`` (the
conversation before that answer, for chat endpoints); ``text`` is the whole rendered
example and ``doc`` its split group. Its token ids are the rendered segments tokenized one
by one and concatenated (no bos/eos: training appends eos after the example, trained as
the end of the last answer). The example ends with its last answer: the trailing run of
1s in the loss mask; the tokens before it are the prompt generation starts from
(:func:`answer_start` of the example's mask, :meth:`TokenSplit.line_mask`).

Invariants, checked by the readers (a violation raises
:class:`~kubetune.contract.StageError` with reason ``DatasetUnusable``, naming the file
and what to do, usually "re-run the prepare stage"):

* offsets start at 0, never decrease, and the last one equals ``len(tokens)``;
* the number of lines (``len(offsets) - 1``) is at least 1 and, where the jsonl is read
  too, equals its number of rows;
* every id is below the model's vocabulary where the reader is told its size;
* every jsonl row is an object with a string ``text``;
* a loss mask, where there is one, has one 0/1 value per token and every example ends
  with at least one answer token.

Prepare also guarantees that no text is in both splits (``overlap: 0``); the readers
do not re-check that.

Writing (streaming, as prepare does: rows are appended, token ids go to raw files that
become ``.npy`` in :meth:`TokenWriter.close` without being loaded)::

    text = JsonlWriter(out_dir / "train.jsonl")
    tokens = TokenWriter(out_dir, "train")
    text.write("a line", "doc-1")
    tokens.add([[17, 4, 99]])
    sha256 = text.close()
    tokens.close()

or all at once for small datasets: :func:`write_split`, then :func:`upload_splits`.

Reading from a :class:`~kubetune.storage.Storage` rooted at the run's output::

    texts = read_texts(storage, "test")                      # list[str]
    split = read_tokens(storage, "test", lines=len(texts))   # TokenSplit
    split.tokens, split.offsets, split.line_ids()
    read_tokens(storage, "train", local_dir=scratch, vocab_size=50257)  # memory-mapped

The module needs numpy only (no torch, no tokenizers).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from kubetune.contract import StageError
from kubetune.layout import RunLayout
from kubetune.schema import Reason
from kubetune.storage import Storage, StorageError

T = TypeVar("T")

TOKEN_DTYPE = np.dtype("<u4")
"""Token ids: little-endian uint32."""
OFFSET_DTYPE = np.dtype("<i8")
"""Line offsets into the token array: little-endian int64, lines + 1 values."""
MASK_DTYPE = np.dtype("u1")
"""Loss mask: one uint8 per token, 1 for answer tokens (promptCompletion and chat)."""

TRAIN = "train"
TEST = "test"
VALIDATION = "validation"
SPLITS = (TRAIN, TEST)
"""The splits every prepared dataset has; ``validation`` only with ``training.validation``."""

_COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class SplitFiles:
    """The :class:`RunLayout` keys of one split's files."""

    split: str
    text: str
    tokens: str
    offsets: str
    loss_mask: str

    def all_keys(self) -> tuple[str, str, str]:
        return self.text, self.tokens, self.offsets

    @property
    def text_name(self) -> str:
        """The file name inside ``dataset/`` (``train.jsonl``); also ``tokens_name`` etc."""
        return posixpath.basename(self.text)

    @property
    def tokens_name(self) -> str:
        return posixpath.basename(self.tokens)

    @property
    def offsets_name(self) -> str:
        return posixpath.basename(self.offsets)

    @property
    def loss_mask_name(self) -> str:
        return posixpath.basename(self.loss_mask)


SPLIT_FILES = {
    TRAIN: SplitFiles(
        TRAIN,
        RunLayout.TRAIN_TEXT,
        RunLayout.TRAIN_TOKENS,
        RunLayout.TRAIN_OFFSETS,
        RunLayout.TRAIN_LOSS_MASK,
    ),
    TEST: SplitFiles(
        TEST,
        RunLayout.TEST_TEXT,
        RunLayout.TEST_TOKENS,
        RunLayout.TEST_OFFSETS,
        RunLayout.TEST_LOSS_MASK,
    ),
    VALIDATION: SplitFiles(
        VALIDATION,
        RunLayout.VALIDATION_TEXT,
        RunLayout.VALIDATION_TOKENS,
        RunLayout.VALIDATION_OFFSETS,
        RunLayout.VALIDATION_LOSS_MASK,
    ),
}


def split_files(split: str) -> SplitFiles:
    try:
        return SPLIT_FILES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_FILES)}") from None


# --------------------------------------------------------------------------- writing


class JsonlWriter:
    """Appends ``{"text": ..., "doc": ...}`` rows to ``path`` and hashes the bytes as it goes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._sha = hashlib.sha256()
        self.count = 0
        self._doc: str | None = None
        self._doc_json = ""

    def write(self, text: str, doc: str) -> None:
        if doc != self._doc:  # documents are contiguous: encode each id once
            self._doc = doc
            self._doc_json = encode_basestring(doc)
        data = f'{{"text": {encode_basestring(text)}, "doc": {self._doc_json}}}\n'.encode()
        self._fh.write(data)
        self._sha.update(data)
        self.count += 1

    def write_example(self, example: ExampleRow) -> None:
        """Append one promptCompletion/chat example (see the module docstring)."""
        data = (json.dumps(example.to_row(), ensure_ascii=False) + "\n").encode()
        self._fh.write(data)
        self._sha.update(data)
        self.count += 1

    def close(self) -> str:
        """Close the file; returns the sha256 of its bytes."""
        self._fh.close()
        return self._sha.hexdigest()


@dataclass(frozen=True)
class ExampleRow:
    """One promptCompletion/chat row of ``{split}.jsonl``."""

    text: str  # the whole rendered example
    doc: str  # its split group (split.groupBy value) or record id
    prompt: str  # the last prompt / user turn
    answer: str  # the last answer: the reference
    messages: tuple[dict[str, str], ...] | None = None  # chat: the turns before the answer

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "text": self.text,
            "doc": self.doc,
            "prompt": self.prompt,
            "answer": self.answer,
        }
        if self.messages is not None:
            row["messages"] = [dict(m) for m in self.messages]
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ExampleRow:
        messages = row.get("messages")
        return cls(
            text=row["text"],
            doc=row["doc"],
            prompt=row["prompt"],
            answer=row["answer"],
            messages=tuple(messages) if messages is not None else None,
        )


_DECODER = json.JSONDecoder()


def read_jsonl(path: Path) -> Iterator[tuple[str, str]]:
    """``(text, doc)`` of each row of a local jsonl written by :class:`JsonlWriter`."""
    # Our own files: decoding str directly skips json.loads' encoding sniffing (~20% faster).
    decode = _DECODER.decode
    with open(path, encoding="utf-8", newline="\n") as fh:
        for line in fh:
            record = decode(line)
            yield record["text"], record["doc"]


def _write_npy_from_raw(raw: Path, target: Path, dtype: np.dtype, count: int) -> None:
    """Wrap a flat little-endian binary file as a 1-D ``.npy`` without loading it."""
    with open(target, "wb") as out, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(
            out, {"descr": dtype.str, "fortran_order": False, "shape": (count,)}
        )
        shutil.copyfileobj(src, out, _COPY_CHUNK)
    raw.unlink()


class TokenWriter:
    """Streams one split's token ids and line offsets into ``{split}.{tokens,offsets}.npy``.

    Appends raw little-endian bytes to hidden ``.raw`` files and wraps them as ``.npy`` in
    :meth:`close`, so memory does not grow with the corpus. ``split`` may be any name
    (prepare writes its test candidates as ``test.candidates``).
    """

    def __init__(self, out_dir: Path, split: str, *, masked: bool = False) -> None:
        self.tokens_path = out_dir / f"{split}.tokens.npy"
        self.offsets_path = out_dir / f"{split}.offsets.npy"
        self.mask_path = out_dir / f"{split}.loss_mask.npy"
        self._tokens_raw = out_dir / f".{split}.tokens.raw"
        self._offsets_raw = out_dir / f".{split}.offsets.raw"
        self._mask_raw = out_dir / f".{split}.loss_mask.raw"
        self._tokens: BinaryIO = open(self._tokens_raw, "wb")  # noqa: SIM115
        self._offsets: BinaryIO = open(self._offsets_raw, "wb")  # noqa: SIM115
        self._mask: BinaryIO | None = open(self._mask_raw, "wb") if masked else None  # noqa: SIM115
        self._offsets.write(np.zeros(1, dtype=OFFSET_DTYPE).tobytes())
        self.tokens = 0
        self.lines = 0

    @property
    def masked(self) -> bool:
        return self._mask is not None

    def add(
        self, ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]] | None = None
    ) -> None:
        """Append lines given as one id list each (and, when masked, one 0/1 list each)."""
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        flat = np.fromiter(chain.from_iterable(ids), dtype=TOKEN_DTYPE, count=total)
        mask = None
        if masks is not None:
            mask = np.fromiter(chain.from_iterable(masks), dtype=MASK_DTYPE, count=total)
        self.add_flat(flat, lengths, mask)

    def add_flat(
        self, flat: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None
    ) -> None:
        """Append lines given as their concatenated ids (and loss mask) and per-line lengths."""
        if (mask is None) != (self._mask is None):
            raise ValueError("a masked TokenWriter takes a loss mask with every add, others none")
        if mask is not None and self._mask is not None:
            if mask.shape != flat.shape:
                raise ValueError(f"loss mask of {mask.shape[0]} values for {flat.shape[0]} ids")
            self._mask.write(mask.astype(MASK_DTYPE, copy=False).tobytes())
        self._tokens.write(flat.astype(TOKEN_DTYPE, copy=False).tobytes())
        ends = np.cumsum(lengths, dtype=np.int64) + self.tokens
        self._offsets.write(ends.astype(OFFSET_DTYPE, copy=False).tobytes())
        self.tokens += int(flat.shape[0])
        self.lines += int(lengths.shape[0])

    def close(self) -> None:
        self._tokens.close()
        self._offsets.close()
        _write_npy_from_raw(self._tokens_raw, self.tokens_path, TOKEN_DTYPE, self.tokens)
        _write_npy_from_raw(self._offsets_raw, self.offsets_path, OFFSET_DTYPE, self.lines + 1)
        if self._mask is not None:
            self._mask.close()
            _write_npy_from_raw(self._mask_raw, self.mask_path, MASK_DTYPE, self.tokens)


@dataclass(frozen=True)
class WrittenSplit:
    """What :func:`write_split` wrote."""

    lines: int
    tokens: int
    sha256: str  # of the jsonl


def write_split(
    out_dir: Path,
    split: str,
    texts: Sequence[str],
    ids: Sequence[Sequence[int]],
    docs: str | Sequence[str],
) -> WrittenSplit:
    """Write one whole split (texts, their token ids, one doc id or one per line) to ``out_dir``."""
    files = split_files(split)
    if len(texts) != len(ids):
        raise ValueError(f"{split}: {len(texts)} texts but {len(ids)} token id lists")
    if not isinstance(docs, str) and len(docs) != len(texts):
        raise ValueError(f"{split}: {len(texts)} texts but {len(docs)} doc ids")
    out_dir.mkdir(parents=True, exist_ok=True)
    text = JsonlWriter(out_dir / files.text_name)
    tokens = TokenWriter(out_dir, split)
    for i, line in enumerate(texts):
        text.write(line, docs if isinstance(docs, str) else docs[i])
    tokens.add(ids)
    sha = text.close()
    tokens.close()
    return WrittenSplit(lines=len(texts), tokens=tokens.tokens, sha256=sha)


def upload_splits(storage: Storage, out_dir: Path, splits: Sequence[str] | None = None) -> None:
    """Upload each split's files (and loss mask, if written) to their :class:`RunLayout` keys.

    By default train, test and, when ``out_dir`` has one, validation; a validation split
    left by an earlier run is deleted when this one has none.
    """
    if splits is None:
        if (out_dir / split_files(VALIDATION).text_name).exists():
            splits = (*SPLITS, VALIDATION)
        else:
            splits = SPLITS
            for key in (*split_files(VALIDATION).all_keys(), split_files(VALIDATION).loss_mask):
                storage.delete(key)
    for split in splits:
        files = split_files(split)
        for key in files.all_keys():
            storage.upload_file(out_dir / posixpath.basename(key), key)
        mask = out_dir / files.loss_mask_name
        if mask.exists():
            storage.upload_file(mask, files.loss_mask)
        else:  # a text dataset: no mask may be left from an earlier instruction run
            storage.delete(files.loss_mask)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TokenSplit:
    """One split's token ids and line offsets, checked against the invariants."""

    split: str
    tokens: np.ndarray  # TOKEN_DTYPE, 1-D
    offsets: np.ndarray  # OFFSET_DTYPE, 1-D, lines + 1

    @property
    def lines(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def line_mask(self, mask: np.ndarray, limit: int | None = None) -> list[list[int]]:
        """The loss mask of each line (the first ``limit`` lines), as 0/1 Python ints."""
        n = self.lines if limit is None else min(limit, self.lines)
        bounds = self.offsets[: n + 1]
        flat = np.asarray(mask[: int(bounds[-1])], dtype=np.int64)
        return [flat[bounds[i] : bounds[i + 1]].tolist() for i in range(n)]

    def line_ids(self, limit: int | None = None) -> list[list[int]]:
        """The ids of each line (the first ``limit`` lines), as Python ints."""
        n = self.lines if limit is None else min(limit, self.lines)
        flat = self.tokens[: int(self.offsets[n])].astype(np.int64)
        bounds = self.offsets[: n + 1]
        return [flat[bounds[i] : bounds[i + 1]].tolist() for i in range(n)]


def _unusable(message: str) -> StageError:
    return StageError(message, reason=Reason.DATASET_UNUSABLE)


def _rows(storage: Storage, split: str, parse: Callable[[Any], T], expected: str) -> list[T]:
    """``parse`` of each JSON row of ``{split}.jsonl``; :class:`StageError` naming the line.

    ``parse`` raises KeyError or TypeError for a row that is not what ``expected`` says.
    """
    key = split_files(split).text
    try:
        raw = storage.read_text(key)
    except StorageError as exc:
        raise _unusable(f"{exc}; run the prepare stage first") from None
    rows = []
    for number, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(parse(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise _unusable(
                f"{storage.uri(key)} line {number}: expected {expected}; re-run the prepare stage"
            ) from None
    if not rows:
        hint = "raise" if split == TEST else "lower"
        raise _unusable(
            f"{storage.uri(key)} is empty: the {split} split has no lines; "
            f"{hint} dataset.split.testFraction or add data"
        )
    return rows


def _text_of(row: Any) -> str:
    text = row["text"]
    if not isinstance(text, str):
        raise TypeError(text)
    return text


def read_texts(storage: Storage, split: str) -> list[str]:
    """The ``text`` of each row of ``{split}.jsonl``; at least one, else :class:`StageError`."""
    return _rows(storage, split, _text_of, "a JSON object with a 'text' field")


def _load_npy(storage: Storage, key: str, split: str, local_dir: Path | None) -> np.ndarray:
    """``key`` as an array: downloaded into ``local_dir`` and memory-mapped, else in memory."""
    try:
        if local_dir is None:
            return np.load(io.BytesIO(storage.read_bytes(key)))
        local = local_dir / posixpath.basename(key)
        if not local.exists():  # node-local scratch: another process may have fetched it
            storage.download_file(key, local)
        return np.load(local, mmap_mode="r")
    except StorageError as exc:
        raise _unusable(
            f"{exc}; run the prepare stage first (it writes the tokenized {split} split there)"
        ) from None
    except (ValueError, OSError, EOFError) as exc:
        raise _unusable(
            f"{storage.uri(key)}: not a readable .npy array ({exc}); re-run the prepare stage"
        ) from None


def read_tokens(
    storage: Storage,
    split: str,
    *,
    lines: int | None = None,
    vocab_size: int | None = None,
    local_dir: Path | None = None,
) -> TokenSplit:
    """One split's token ids and offsets, checked; :class:`StageError` names what is wrong.

    ``lines``: the jsonl's row count, when the caller read it (:func:`read_texts`).
    ``vocab_size``: the model's, to reject ids it has no embedding for (scans the ids).
    ``local_dir``: download there (kept, and reused if present) and memory-map; else the
    arrays are read into memory.
    """
    files = split_files(split)
    tokens = _load_npy(storage, files.tokens, split, local_dir)
    offsets = _load_npy(storage, files.offsets, split, local_dir)
    tokens_at, offsets_at = storage.uri(files.tokens), storage.uri(files.offsets)
    if tokens.ndim != 1 or tokens.dtype != TOKEN_DTYPE:
        raise _unusable(
            f"{tokens_at}: expected 1-D uint32 token ids, found {tokens.dtype} of shape "
            f"{tokens.shape}; re-run the prepare stage"
        )
    if (
        offsets.ndim != 1
        or offsets.dtype != OFFSET_DTYPE
        or len(offsets) < 2
        or int(offsets[0]) != 0
    ):
        raise _unusable(
            f"{offsets_at}: expected int64 line offsets starting at 0 (lines + 1 values), "
            f"found {offsets.dtype} of shape {offsets.shape}; re-run the prepare stage"
        )
    if int(offsets[-1]) != len(tokens):
        raise _unusable(
            f"{offsets_at}: offsets do not match {files.tokens} (the last offset is "
            f"{int(offsets[-1])}, the array holds {len(tokens)} tokens); re-run the prepare stage"
        )
    decreasing = np.flatnonzero(np.diff(offsets) < 0)
    if len(decreasing):
        raise _unusable(
            f"{offsets_at}: offsets decrease at line {int(decreasing[0])} (its end is before "
            "its start); re-run the prepare stage"
        )
    if lines is not None and len(offsets) != lines + 1:
        raise _unusable(
            f"{offsets_at} has {len(offsets)} offsets for the {lines} lines of {files.text} "
            "(expected lines + 1); the dataset is inconsistent, re-run the prepare stage"
        )
    if vocab_size is not None and len(tokens):
        top = int(tokens.max())
        if top >= vocab_size:
            raise _unusable(
                f"{tokens_at}: token id {top} is outside the model's vocabulary "
                f"({vocab_size}); the dataset was tokenized with another tokenizer, re-run "
                "prepare"
            )
    return TokenSplit(split, tokens, offsets)


def answer_start(mask: Sequence[int]) -> int:
    """Where an example's last answer starts: the start of its trailing run of 1s.

    The tokens before it are the prompt evaluation generates the answer from.
    """
    i = len(mask)
    while i > 0 and mask[i - 1]:
        i -= 1
    return i


def read_loss_mask(
    storage: Storage, split: TokenSplit, *, local_dir: Path | None = None
) -> np.ndarray:
    """``split``'s loss mask (promptCompletion/chat datasets), checked against its tokens."""
    files = split_files(split.split)
    mask = _load_npy(storage, files.loss_mask, split.split, local_dir)
    at = storage.uri(files.loss_mask)
    if mask.ndim != 1 or mask.dtype != MASK_DTYPE or len(mask) != len(split.tokens):
        raise _unusable(
            f"{at}: expected one uint8 per token ({len(split.tokens)}), found {mask.dtype} of "
            f"shape {mask.shape}; re-run the prepare stage"
        )
    ends = np.asarray(split.offsets[1:]) - 1
    empty = np.asarray(split.offsets[1:]) == np.asarray(split.offsets[:-1])
    if len(mask) and (empty.any() or not np.asarray(mask)[ends].all()):
        bad = int(np.flatnonzero(empty | (np.asarray(mask)[np.maximum(ends, 0)] == 0))[0])
        raise _unusable(
            f"{at}: example {bad} does not end with an answer token; re-run the prepare stage"
        )
    return mask


def read_examples(storage: Storage, split: str) -> list[ExampleRow]:
    """The rows of ``{split}.jsonl`` of a promptCompletion/chat dataset; at least one."""
    return _rows(
        storage,
        split,
        ExampleRow.from_row,
        "an example with 'text', 'doc', 'prompt' and 'answer' (dataset.kind promptCompletion "
        "or chat)",
    )
