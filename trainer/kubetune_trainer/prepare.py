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
removed (counted in ``duplicatesRemoved``; without dedup the train hashes are kept
for this). With exact dedup a text is kept once, so it cannot be in both splits.
Either way ``overlap: 0`` is recorded.

Speed: one pass, nothing re-read. Chunks of ``CHUNK_LINES`` lines are cleaned,
hashed and tokenized (:class:`~kubetune_trainer.tokenizer_build.FastEncoder`) in a
small fork pool (``KUBETUNE_PREPARE_WORKERS``), at most two chunks per worker in
flight, and appended in input order, so the output does not depend on the pool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from json.encoder import encode_basestring
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from kubetune.contract import Env, StageError
from kubetune.results import PrepareResult
from kubetune.schema import CleanSpec, DatasetStats, DedupMode, SplitSpec, SplitUnit
from kubetune_trainer.cleaning import Cleaner, seed_key, text_hash
from kubetune_trainer.context import StageContext
from kubetune_trainer.sources import UNUSABLE, open_source
from kubetune_trainer.tokenizer_build import (
    FastEncoder,
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
# Lines per chunk of the first pass (clean + hash + tokenize), in-process or in a worker.
CHUNK_LINES = 1024
# Worker processes for cleaning and tokenizing: $KUBETUNE_PREPARE_WORKERS, else the
# CPUs this process may use (at most MAX_WORKERS). The pool starts only once a second
# chunk exists, so small datasets never fork.
MAX_WORKERS = 4
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

    def add_flat(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append lines given as their concatenated ids and per-line lengths."""
        self._tokens.write(flat.astype("<u4", copy=False).tobytes())
        ends = np.cumsum(lengths, dtype=np.int64) + self.tokens
        self._offsets.write(ends.astype("<i8", copy=False).tobytes())
        self.tokens += int(flat.shape[0])
        self.lines += int(lengths.shape[0])

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


# --------------------------------------------------------------------------- first pass


@dataclass
class _Chunk:
    """What cleaning one chunk of raw lines gave: kept rows, their texts, hashes and ids."""

    kept: list[int]  # row numbers within the chunk whose cleaned text survived
    texts: list[str]
    hashes: list[int]
    dropped: int  # rows dropped by the length rules
    flat: np.ndarray | None = None  # concatenated token ids of the kept rows
    lengths: np.ndarray | None = None


class _ChunkWorker:
    """Clean, hash and (given a tokenizer) tokenize a chunk; the same code in and out of a pool."""

    def __init__(self, clean: CleanSpec, key: bytes, encoder: FastEncoder | None) -> None:
        self.cleaner = Cleaner(clean)
        self.key = key
        self.encoder = encoder

    def __call__(self, raws: list[str]) -> _Chunk:
        clean_line = self.cleaner.clean_line
        key = self.key
        before = self.cleaner.dropped_short
        kept: list[int] = []
        texts: list[str] = []
        for i, raw in enumerate(raws):
            text = clean_line(raw)
            if text is not None:
                kept.append(i)
                texts.append(text)
        chunk = _Chunk(
            kept, texts, [text_hash(t, key) for t in texts], self.cleaner.dropped_short - before
        )
        if self.encoder is not None and texts:
            ids = self.encoder.encode(texts)
            chunk.lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            chunk.flat = np.fromiter(
                chain.from_iterable(ids), dtype="<u4", count=int(chunk.lengths.sum())
            )
        return chunk


_WORKER: _ChunkWorker | None = None


def _pool_init(worker: _ChunkWorker) -> None:
    global _WORKER
    # A forked child must not touch the parent's Rust thread pool: with
    # TOKENIZERS_PARALLELISM=true a batch call there waits forever on threads
    # that fork() did not copy (seen in bench.run). Tokenize single texts instead.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if worker.encoder is not None:
        worker.encoder.serial = True
    _WORKER = worker


def _pool_call(raws: list[str]) -> _Chunk:
    assert _WORKER is not None
    return _WORKER(raws)


def prepare_workers() -> int:
    """Worker processes for the first pass: $KUBETUNE_PREPARE_WORKERS, else usable CPUs."""
    env = os.environ.get(Env.PREPARE_WORKERS)
    if env:
        return max(1, int(env))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _chunks(
    lines: Iterable[tuple[str, str]], worker: _ChunkWorker, workers: int
) -> Iterator[tuple[list[str], _Chunk]]:
    """(documents, cleaned chunk) in input order; a bounded pool when ``workers`` > 1.

    At most ``2 * workers`` chunks are in flight, so memory does not grow with the
    corpus, and results are consumed in submission order, so the output is the same
    byte for byte whatever the number of workers.
    """
    it = iter(lines)

    def read() -> tuple[list[str], list[str]] | None:
        docs: list[str] = []
        raws: list[str] = []
        for doc, raw in it:
            docs.append(doc)
            raws.append(raw)
            if len(raws) >= CHUNK_LINES:
                break
        return (docs, raws) if raws else None

    first = read()
    if first is None:
        return
    second = read() if len(first[1]) >= CHUNK_LINES else None
    use_pool = (
        workers > 1 and second is not None and "fork" in multiprocessing.get_all_start_methods()
    )
    if not use_pool:
        for part in (first, second):
            if part is not None:
                yield part[0], worker(part[1])
        while (part := read()) is not None:
            yield part[0], worker(part[1])
        return
    # fork: the workers inherit the cleaner and tokenizer without pickling them.
    pool = multiprocessing.get_context("fork").Pool(workers, _pool_init, (worker,))
    try:
        pending: deque[tuple[list[str], Any]] = deque()
        queue: list[tuple[list[str], list[str]] | None] = [first, second]
        while True:
            while len(pending) < 2 * workers:
                part = queue.pop(0) if queue else read()
                if part is None:
                    break
                pending.append((part[0], pool.apply_async(_pool_call, (part[1],))))
            if not pending:
                break
            docs, result = pending.popleft()
            yield docs, result.get()
    finally:
        pool.terminate()
        pool.join()


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
    workers: int | None = None,
) -> PreparedDataset:
    """Clean, dedup, split and tokenize ``(document id, line)`` pairs into ``out_dir``.

    Writes ``train.jsonl``, ``test.jsonl``, ``{train,test}.tokens.npy`` and
    ``.offsets.npy`` and ``tokenizer/`` (the given tokenizer, or one trained on
    the train split for :class:`FreshTokenizer`). ``documents`` in the returned
    stats counts distinct consecutive document ids among the lines read.
    ``workers`` (default :func:`prepare_workers`) processes clean and tokenize
    chunks in parallel; the output does not depend on it.

    One pass: each chunk is cleaned, hashed and (with a given tokenizer) tokenized,
    then deduplicated, split and appended here in input order; nothing is re-read.
    With ``dedup: exact`` a text is kept once, so no test text can be in train; with
    ``dedup: none`` the train hashes are kept and test lines whose text is in train
    are removed at the end.
    """
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("train.jsonl", "test.jsonl", "tokenizer"):
        path = out_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
    key = seed_key(split.seed)
    threshold = int(split.test_fraction * _U64)
    dedup = clean.dedup == DedupMode.EXACT
    by_document = split.unit == SplitUnit.DOCUMENT
    fresh = isinstance(tokenizer, FreshTokenizer)
    worker = _ChunkWorker(clean, key, None if fresh else FastEncoder(tokenizer))

    seen: set[int] = set()  # dedup: exact -> every kept hash; none -> the train hashes
    test_hashes: set[int] = set()
    train = _JsonlWriter(out_dir / "train.jsonl")
    candidates = _JsonlWriter(out_dir / _TEST_CANDIDATES)
    train_tokens = None if fresh else _TokenWriter(out_dir, "train")
    cand_tokens = None if fresh else _TokenWriter(out_dir, "test.candidates")
    lines_read = documents = duplicates = dropped = 0
    last_doc: str | None = None
    split_doc: str | None = None
    doc_in_test = False
    try:
        for docs, chunk in _chunks(lines, worker, workers or prepare_workers()):
            lines_read += len(docs)
            for doc in docs:
                if doc != last_doc:
                    last_doc = doc
                    documents += 1
            dropped += chunk.dropped
            to_train = np.zeros(len(chunk.kept), dtype=bool)
            to_test = np.zeros(len(chunk.kept), dtype=bool)
            for j, (row, text, h) in enumerate(
                zip(chunk.kept, chunk.texts, chunk.hashes, strict=True)
            ):
                doc = docs[row]
                if dedup:
                    if h in seen:
                        duplicates += 1
                        continue
                    seen.add(h)
                if by_document:
                    if doc != split_doc:
                        split_doc = doc
                        doc_in_test = (text_hash(doc, key) >> 64) < threshold
                    in_test = doc_in_test
                else:
                    in_test = (h >> 64) < threshold
                if in_test:
                    candidates.write(text, doc)
                    test_hashes.add(h)
                    to_test[j] = True
                else:
                    train.write(text, doc)
                    if not dedup:
                        seen.add(h)
                    to_train[j] = True
            if chunk.flat is not None and chunk.lengths is not None:
                assert train_tokens is not None and cand_tokens is not None
                per_token = np.repeat(np.arange(len(chunk.kept)), chunk.lengths)
                for mask, writer in ((to_train, train_tokens), (to_test, cand_tokens)):
                    if mask.any():
                        writer.add_flat(chunk.flat[mask[per_token]], chunk.lengths[mask])
    finally:
        train.close()
        candidates.close()
        for tw in (train_tokens, cand_tokens):
            if tw is not None:
                tw.close()
    # Texts in both splits: only possible without dedup (a kept text is unique otherwise).
    overlap = test_hashes & seen if not dedup else set()
    del seen, test_hashes  # the largest structures; not needed any more
    if overlap:
        log.warning("%d test texts also in train; removing them from test", len(overlap))

    kept = train.count + candidates.count
    if kept == 0:
        _cleanup(out_dir)
        limits = f"minChars={clean.min_chars}"
        if clean.max_chars is not None:
            limits += f"/maxChars={clean.max_chars}"
        raise StageError(
            f"no text left after cleaning {source}: {lines_read} lines read, all dropped by "
            f"{limits}/dedup ({dropped} too short or long, {duplicates} "
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
        _tokenize_file(
            out_dir / "train.jsonl", _TokenWriter(out_dir, "train"), tokenizer, key, batch_size
        )

    # Test split: the candidates minus texts that are also in train.
    test = _JsonlWriter(out_dir / "test.jsonl")
    test_tokens = _TokenWriter(out_dir, "test")
    cand_ids = cand_offsets = None
    if cand_tokens is not None:
        cand_ids = np.load(cand_tokens.tokens_path, mmap_mode="r")
        cand_offsets = np.load(cand_tokens.offsets_path)
    removed = 0
    batch: list[str] = []
    keep_rows: list[int] = []
    try:
        for row, (text, doc) in enumerate(_read_jsonl(out_dir / _TEST_CANDIDATES)):
            if overlap and text_hash(text, key) in overlap:
                removed += 1
                continue
            test.write(text, doc)
            if cand_offsets is None:
                batch.append(text)
                if len(batch) >= batch_size:
                    test_tokens.add(encode_batch(tokenizer, batch))
                    batch = []
            else:
                keep_rows.append(row)
        if batch:
            test_tokens.add(encode_batch(tokenizer, batch))
        if cand_ids is not None and cand_offsets is not None and keep_rows:
            rows = np.asarray(keep_rows, dtype=np.int64)
            starts, ends = cand_offsets[rows], cand_offsets[rows + 1]
            lengths = ends - starts
            if removed:
                index = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
                index += np.arange(int(lengths.sum()))
                flat = np.asarray(cand_ids[index])
            else:
                flat = np.asarray(cand_ids)
            test_tokens.add_flat(flat, lengths)
    finally:
        test_sha = test.close()
        test_tokens.close()
        del cand_ids
        (out_dir / _TEST_CANDIDATES).unlink()
        if cand_tokens is not None:
            cand_tokens.tokens_path.unlink(missing_ok=True)
            cand_tokens.offsets_path.unlink(missing_ok=True)
    if test.count == 0:
        _cleanup(out_dir)
        raise _split_error("test", train.count, split, source)

    train_token_count = _npy_len(out_dir / "train.tokens.npy")
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    stats = DatasetStats(
        documents=documents,
        lines=lines_read,
        kept_lines=train.count + test.count,
        dropped_short=dropped,
        duplicates_removed=duplicates + removed,
        train_lines=train.count,
        test_lines=test.count,
        train_tokens=train_token_count,
        test_tokens=test_tokens.tokens,
        overlap=0,  # by construction: dedup, or the removal above
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
