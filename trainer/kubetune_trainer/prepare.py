"""The prepare stage: source -> clean -> dedup -> split -> tokenize -> dataset/ under the output.

Run it::

    kubetune prepare --job job.yaml            # or, in Python:
    from kubetune_trainer.prepare import run
    result = run(make_context(job))             # -> PrepareResult, also at dataset/prepare.json

Benchmarks call the storage-free core directly::

    from kubetune_trainer.prepare import FreshTokenizer, prepare_lines
    out = prepare_lines((("bench", line) for line in lines), CleanSpec(), SplitSpec(),
                        FreshTokenizer(vocab_size=1024), Path("/tmp/out"))
    out.stats.kept_lines

Everything streams: lines are cleaned, deduplicated and assigned to a split one
at a time and appended to ``train.jsonl`` / ``test.jsonl``; tokens are appended
to flat binary files that become ``.npy`` at the end. What grows with the corpus
is one 128-bit integer per distinct kept line (the dedup set; 16-byte blake2b
digests, never the strings) and one per test line (the overlap check).

The split is decided by a keyed hash of (seed, text) for ``unit: line`` or of
(seed, document id) for ``unit: document``: deterministic, order-independent
and streaming. Identical texts then always land in the same split for
``unit: line``; for ``unit: document`` with ``dedup: none`` the same line can
appear in a train and a test document, so test lines whose text is in train are
removed (counted in ``duplicatesRemoved``). Either way the overlap is verified by
rehashing both written files and recorded as ``overlap: 0``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from json.encoder import encode_basestring
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from kubetune_trainer.cleaning import Cleaner, seed_key, text_hash
from kubetune_trainer.context import StageContext, StageError
from kubetune_trainer.results import PrepareResult
from kubetune_trainer.schema import CleanSpec, DatasetStats, DedupMode, SplitSpec, SplitUnit
from kubetune_trainer.sources import UNUSABLE, open_source
from kubetune_trainer.tokenizer_build import (
    encode_batch,
    load_tokenizer,
    model_tokenizer_source,
    tokenizer_name,
    train_bpe_tokenizer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 1000
_COPY_CHUNK = 16 * 1024 * 1024
_U64 = 1 << 64
_TEST_CANDIDATES = ".test.candidates.jsonl"


@dataclass(frozen=True)
class FreshTokenizer:
    """Ask :func:`prepare_lines` to train a byte-level BPE tokenizer on the train split."""

    vocab_size: int
    model_max_length: int = 1024


@dataclass
class PreparedDataset:
    """What :func:`prepare_lines` wrote to ``out_dir`` and what it counted."""

    stats: DatasetStats
    tokenizer: Any  # PreTrainedTokenizerBase; saved under out_dir/tokenizer/
    out_dir: Path
    train_sha256: str
    test_sha256: str
    seconds: float


# --------------------------------------------------------------------------- writers


class _JsonlWriter:
    """Appends ``{"text": ..., "doc": ...}`` lines and hashes the bytes as it goes."""

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

    def close(self) -> str:
        self._fh.close()
        return self._sha.hexdigest()


_DECODER = json.JSONDecoder()


def _read_jsonl(path: Path) -> Iterator[tuple[str, str]]:
    # Our own files: decoding str directly skips json.loads' encoding sniffing (~20% faster).
    decode = _DECODER.decode
    with open(path, encoding="utf-8", newline="\n") as fh:
        for line in fh:
            record = decode(line)
            yield record["text"], record["doc"]


def _write_npy_from_raw(raw: Path, target: Path, dtype: str, count: int) -> None:
    """Wrap a flat little-endian binary file as a 1-D ``.npy`` without loading it."""
    with open(target, "wb") as out, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(
            out, {"descr": dtype, "fortran_order": False, "shape": (count,)}
        )
        shutil.copyfileobj(src, out, _COPY_CHUNK)
    raw.unlink()


class _TokenWriter:
    """Streams token ids (uint32) and line offsets (int64, lines + 1) into ``.npy`` files."""

    def __init__(self, out_dir: Path, split: str) -> None:
        self.tokens_path = out_dir / f"{split}.tokens.npy"
        self.offsets_path = out_dir / f"{split}.offsets.npy"
        self._tokens_raw = out_dir / f".{split}.tokens.raw"
        self._offsets_raw = out_dir / f".{split}.offsets.raw"
        self._tokens: BinaryIO = open(self._tokens_raw, "wb")  # noqa: SIM115
        self._offsets: BinaryIO = open(self._offsets_raw, "wb")  # noqa: SIM115
        self._offsets.write(np.zeros(1, dtype="<i8").tobytes())
        self.tokens = 0
        self.lines = 0

    def add(self, ids: list[list[int]]) -> None:
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        flat = np.fromiter(chain.from_iterable(ids), dtype="<u4", count=total)
        self._tokens.write(flat.tobytes())
        ends = np.cumsum(lengths) + self.tokens
        self._offsets.write(ends.astype("<i8").tobytes())
        self.tokens += total
        self.lines += len(ids)

    def close(self) -> None:
        self._tokens.close()
        self._offsets.close()
        _write_npy_from_raw(self._tokens_raw, self.tokens_path, "<u4", self.tokens)
        _write_npy_from_raw(self._offsets_raw, self.offsets_path, "<i8", self.lines + 1)


def _tokenize_file(
    jsonl: Path,
    writer: _TokenWriter,
    tokenizer: Any,
    key: bytes,
    batch_size: int,
    check: set[int] | None = None,
) -> set[int]:
    """Tokenize every text of ``jsonl``; returns the hashes of its texts found in ``check``."""
    found: set[int] = set()
    batch: list[str] = []
    for text, _ in _read_jsonl(jsonl):
        if check:
            h = text_hash(text, key)
            if h in check:
                found.add(h)
        batch.append(text)
        if len(batch) >= batch_size:
            writer.add(encode_batch(tokenizer, batch))
            batch = []
    if batch:
        writer.add(encode_batch(tokenizer, batch))
    writer.close()
    return found


# --------------------------------------------------------------------------- core


def _split_error(which: str, kept: int, split: SplitSpec, source: str) -> StageError:
    if which == "test":
        hint = "raise dataset.split.testFraction or add data"
        if split.unit == SplitUnit.DOCUMENT:
            hint += " (or use dataset.split.unit: line: there may be too few documents)"
    else:
        hint = "lower dataset.split.testFraction or add data"
    return StageError(
        f"the {which} split of {source} is empty ({kept} lines kept, testFraction="
        f"{split.test_fraction}, unit={split.unit}, seed={split.seed}); {hint}",
        reason=UNUSABLE,
    )


def prepare_lines(
    lines: Iterable[tuple[str, str]],
    clean: CleanSpec,
    split: SplitSpec,
    tokenizer: PreTrainedTokenizerBase | FreshTokenizer,
    out_dir: Path,
    *,
    source: str = "the dataset",
    batch_size: int = TOKENIZE_BATCH,
) -> PreparedDataset:
    """Clean, dedup, split and tokenize ``(document id, line)`` pairs into ``out_dir``.

    Writes ``train.jsonl``, ``test.jsonl``, ``{train,test}.tokens.npy`` and
    ``.offsets.npy`` and ``tokenizer/`` (the given tokenizer, or one trained on
    the train split for :class:`FreshTokenizer`). ``documents`` in the returned
    stats counts distinct consecutive document ids among the lines read.
    """
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("train.jsonl", "test.jsonl", "tokenizer"):
        path = out_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
    cleaner = Cleaner(clean)
    key = seed_key(split.seed)
    threshold = int(split.test_fraction * _U64)
    dedup = clean.dedup == DedupMode.EXACT
    by_document = split.unit == SplitUnit.DOCUMENT
    clean_line = cleaner.clean_line

    seen: set[int] = set()
    test_hashes: set[int] = set()
    train = _JsonlWriter(out_dir / "train.jsonl")
    candidates = _JsonlWriter(out_dir / _TEST_CANDIDATES)
    lines_read = documents = duplicates = 0
    last_doc: str | None = None
    doc_in_test = False
    try:
        for doc, raw in lines:
            lines_read += 1
            if doc != last_doc:
                last_doc = doc
                documents += 1
                if by_document:
                    doc_in_test = (text_hash(doc, key) >> 64) < threshold
            text = clean_line(raw)
            if text is None:
                continue
            h = text_hash(text, key)
            if dedup:
                if h in seen:
                    duplicates += 1
                    continue
                seen.add(h)
            in_test = doc_in_test if by_document else (h >> 64) < threshold
            if in_test:
                candidates.write(text, doc)
                test_hashes.add(h)
            else:
                train.write(text, doc)
    finally:
        train.close()
        candidates.close()
    del seen  # the largest structure; not needed any more

    kept = train.count + candidates.count
    if kept == 0:
        _cleanup(out_dir)
        limits = f"minChars={clean.min_chars}"
        if clean.max_chars is not None:
            limits += f"/maxChars={clean.max_chars}"
        raise StageError(
            f"no text left after cleaning {source}: {lines_read} lines read, all dropped by "
            f"{limits}/dedup ({cleaner.dropped_short} too short or long, {duplicates} "
            "duplicates); lower dataset.clean.minChars or check the format/textField",
            reason=UNUSABLE,
        )
    if train.count == 0:
        _cleanup(out_dir)
        raise _split_error("train", kept, split, source)
    if candidates.count == 0:
        _cleanup(out_dir)
        raise _split_error("test", kept, split, source)

    if isinstance(tokenizer, FreshTokenizer):
        tokenizer = train_bpe_tokenizer(
            (text for text, _ in _read_jsonl(out_dir / "train.jsonl")),
            tokenizer.vocab_size,
            model_max_length=tokenizer.model_max_length,
            length=train.count,
        )

    # Train pass: tokenize, and rehash every train text against the test hashes.
    overlap = _tokenize_file(
        out_dir / "train.jsonl",
        _TokenWriter(out_dir, "train"),
        tokenizer,
        key,
        batch_size,
        check=test_hashes,
    )
    del test_hashes
    if overlap and dedup:
        log.warning("%d test texts also in train despite exact dedup; removing them", len(overlap))

    # Test pass: drop texts that are in train, write test.jsonl, tokenize it.
    test = _JsonlWriter(out_dir / "test.jsonl")
    removed = 0
    try:
        for text, doc in _read_jsonl(out_dir / _TEST_CANDIDATES):
            if overlap and text_hash(text, key) in overlap:
                removed += 1
                continue
            test.write(text, doc)
    finally:
        test_sha = test.close()
        (out_dir / _TEST_CANDIDATES).unlink()
    if test.count == 0:
        _cleanup(out_dir)
        raise _split_error("test", train.count, split, source)
    test_tokens = _TokenWriter(out_dir, "test")
    remaining = _tokenize_file(
        out_dir / "test.jsonl", test_tokens, tokenizer, key, batch_size, check=overlap
    )
    if remaining:  # cannot happen: they were just filtered out
        raise AssertionError(f"{len(remaining)} test texts still in train after filtering")

    train_tokens = _npy_len(out_dir / "train.tokens.npy")
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    stats = DatasetStats(
        documents=documents,
        lines=lines_read,
        kept_lines=train.count + test.count,
        dropped_short=cleaner.dropped_short,
        duplicates_removed=duplicates + removed,
        train_lines=train.count,
        test_lines=test.count,
        train_tokens=train_tokens,
        test_tokens=test_tokens.tokens,
        overlap=len(remaining),
    )
    return PreparedDataset(
        stats=stats,
        tokenizer=tokenizer,
        out_dir=out_dir,
        train_sha256=_sha256(out_dir / "train.jsonl"),
        test_sha256=test_sha,
        seconds=time.perf_counter() - started,
    )


def _npy_len(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").shape[0])


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_COPY_CHUNK), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _cleanup(out_dir: Path) -> None:
    """Remove partial outputs so a failed prepare leaves nothing that looks usable."""
    for path in out_dir.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


# --------------------------------------------------------------------------- stage


def run(ctx: StageContext) -> PrepareResult:
    """The prepare stage: read spec.dataset.source, write dataset/ under ctx.storage."""
    started = time.perf_counter()
    job = ctx.job
    spec = job.spec.dataset
    layout = ctx.layout
    work = ctx.scratch / "prepare"
    if work.exists():
        shutil.rmtree(work)  # idempotent: a rerun starts from a clean scratch
    out_dir = work / "dataset"
    download = work / "download"
    out_dir.mkdir(parents=True)
    download.mkdir(parents=True)

    # Open the source first: a wrong URI or an empty prefix fails in seconds,
    # before a (possibly slow) tokenizer download.
    source = open_source(spec, ctx.open, download)
    log.info("prepare: reading %s", source.uri)
    if source.storage is not None:
        log.info("prepare: %d file(s) under %s", len(source.keys()), source.uri)

    model = job.spec.model
    source_name = model_tokenizer_source(model)
    tokenizer: PreTrainedTokenizerBase | FreshTokenizer
    if source_name is None:
        assert model.fresh is not None
        tokenizer = FreshTokenizer(model.fresh.vocab_size, model.fresh.n_positions)
    else:
        tokenizer = load_tokenizer(
            source_name, ctx.open, work, revision=None if model.tokenizer else model.revision
        )

    prepared = prepare_lines(
        source.lines(), spec.clean, spec.split, tokenizer, out_dir, source=source.uri
    )
    stats = prepared.stats.model_copy(update={"documents": source.documents})

    # Upload: drop the old result first, so a crash mid-upload never leaves a
    # prepare.json that vouches for files it did not write; the result goes last.
    storage = ctx.storage
    storage.delete(layout.PREPARE_RESULT)
    storage.delete(layout.TOKENIZER)
    storage.upload_dir(out_dir / "tokenizer", layout.TOKENIZER)
    for key in (
        layout.TRAIN_TEXT,
        layout.TEST_TEXT,
        layout.TRAIN_TOKENS,
        layout.TRAIN_OFFSETS,
        layout.TEST_TOKENS,
        layout.TEST_OFFSETS,
    ):
        storage.upload_file(out_dir / os.path.basename(key), key)
    result = PrepareResult(
        stats=stats,
        train_sha256=prepared.train_sha256,
        test_sha256=prepared.test_sha256,
        tokenizer=tokenizer_name(model),
        dataset_uri=ctx.storage.uri(layout.DATASET),
        config=spec.to_wire(),
        seconds=round(time.perf_counter() - started, 3),
    )
    storage.write_text(layout.PREPARE_RESULT, result.to_json())
    log.info(
        "prepare: %d lines -> %d train / %d test (%d duplicates, %d short) in %.1fs",
        stats.lines,
        stats.train_lines,
        stats.test_lines,
        stats.duplicates_removed,
        stats.dropped_short,
        result.seconds,
    )
    shutil.rmtree(work, ignore_errors=True)
    return result
