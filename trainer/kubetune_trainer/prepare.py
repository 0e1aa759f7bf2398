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
to flat binary files that become ``.npy`` at the end (the writers and the format
are :mod:`kubetune.dataset_format`'s). What grows with the corpus
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

import logging
import multiprocessing
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kubetune.contract import Env, StageError
from kubetune.dataset_format import (
    TEST,
    TRAIN,
    JsonlWriter,
    TokenWriter,
    read_jsonl,
    split_files,
    upload_splits,
)
from kubetune.fingerprint import dataset_inputs, fingerprint
from kubetune.results import PrepareResult
from kubetune.schema import CleanSpec, DatasetStats, DedupMode, SplitSpec, SplitUnit, TwinCounts
from kubetune_trainer.cleaning import Cleaner, seed_key, text_hash
from kubetune_trainer.context import StageContext
from kubetune_trainer.cpus import usable_cpus
from kubetune_trainer.near_dup import (
    TwinCounter,
    near_duplicate_mask,
    near_twin_mask,
    normalize_for_match,
)
from kubetune_trainer.prepare_examples import prepare_examples
from kubetune_trainer.sources import UNUSABLE, open_source
from kubetune_trainer.tokenizer_build import (
    FastEncoder,
    encode_batch,
    load_tokenizer,
    model_tokenizer_source,
    tokenizer_name,
    train_bpe_tokenizer,
)
from kubetune_trainer.validation_split import carve_validation

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
NEAR_ROUNDS = 8  # near-twin searches of the test candidates (dedup: near)
_U64 = 1 << 64
_TRAIN_JSONL = split_files(TRAIN).text_name
_TEST_JSONL = split_files(TEST).text_name
# The test split before step 4 removes texts also in train: its rows and token ids.
_TEST_CANDIDATES = ".test.candidates.jsonl"
_CANDIDATES = "test.candidates"


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


# --------------------------------------------------------------------------- tokenizing


def _tokenize_file(jsonl: Path, writer: TokenWriter, tokenizer: Any, batch_size: int) -> None:
    """Tokenize every text of ``jsonl`` into ``writer``, then close it."""
    batch: list[str] = []
    for text, _ in read_jsonl(jsonl):
        batch.append(text)
        if len(batch) >= batch_size:
            writer.add(encode_batch(tokenizer, batch))
            batch = []
    if batch:
        writer.add(encode_batch(tokenizer, batch))
    writer.close()


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
        # dedup: normalized/near hash the normalised text, so lines that differ only in
        # case, punctuation or spacing are one text (kept once, in one split).
        self.normalize = clean.dedup in (DedupMode.NORMALIZED, DedupMode.NEAR)

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
        if self.normalize:
            hashes = [text_hash(normalize_for_match(t), key) for t in texts]
        else:
            hashes = [text_hash(t, key) for t in texts]
        chunk = _Chunk(kept, texts, hashes, self.cleaner.dropped_short - before)
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
    """Worker processes for the first pass: $KUBETUNE_PREPARE_WORKERS, else the usable CPUs
    (the affinity capped by the pod's request and the CPU quota: cpus.usable_cpus)."""
    env = os.environ.get(Env.PREPARE_WORKERS)
    if env:
        return max(1, int(env))
    return max(1, min(usable_cpus(), MAX_WORKERS))


def _pool_start_method() -> str:
    """``fork`` from a single-threaded process (the CLI, a pod), else ``forkserver``.

    fork is cheapest: the workers inherit the cleaner and tokenizer without pickling them.
    But a process with other threads (a test runner with servers, a notebook) can be
    forked while one of them holds a lock, and the child then waits on it forever;
    forkserver children start from a clean, single-threaded server instead. Empty when
    neither exists (no pool).
    """
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else ""


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
    use_pool = workers > 1 and second is not None and bool(_pool_start_method())
    if not use_pool:
        for part in (first, second):
            if part is not None:
                yield part[0], worker(part[1])
        while (part := read()) is not None:
            yield part[0], worker(part[1])
        return
    pool = multiprocessing.get_context(_pool_start_method()).Pool(workers, _pool_init, (worker,))
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


# --------------------------------------------------------------------------- steps


class _FirstPass:
    """Step 1: count, dedup and route each cleaned chunk's rows to train or the test candidates.

    Rows are appended in input order to ``train.jsonl`` and the test candidates (the test
    split before step 4 removes texts also in train), and their token ids with them when
    the chunks were tokenized. The hot per-row loop works on local names (speed).
    """

    def __init__(
        self, out_dir: Path, clean: CleanSpec, split: SplitSpec, key: bytes, tokenized: bool
    ) -> None:
        self.key = key
        self.threshold = int(split.test_fraction * _U64)
        self.dedup = clean.dedup != DedupMode.NONE
        self.by_document = split.unit == SplitUnit.DOCUMENT
        self.seen: set[int] = set()  # dedup: exact -> every kept hash; none -> the train hashes
        self.test_hashes: set[int] = set()
        self.train = JsonlWriter(out_dir / _TRAIN_JSONL)
        self.candidates = JsonlWriter(out_dir / _TEST_CANDIDATES)
        self.train_tokens = TokenWriter(out_dir, TRAIN) if tokenized else None
        self.cand_tokens = TokenWriter(out_dir, _CANDIDATES) if tokenized else None
        self.train_sha256 = ""
        self.lines_read = self.documents = self.duplicates = self.dropped = 0
        self._last_doc: str | None = None
        self._split_doc: str | None = None
        self._doc_in_test = False

    def add(self, docs: list[str], chunk: _Chunk) -> None:
        """One chunk: ``docs`` are the document ids of all its raw lines, in order."""
        self.lines_read += len(docs)
        for doc in docs:
            if doc != self._last_doc:
                self._last_doc = doc
                self.documents += 1
        self.dropped += chunk.dropped
        to_train, to_test = self._route(docs, chunk)
        self._add_tokens(chunk, to_train, to_test)

    def _route(self, docs: list[str], chunk: _Chunk) -> tuple[np.ndarray, np.ndarray]:
        """Dedup the kept rows and append each to train or the candidates; returns the masks."""
        seen, test_hashes, key, threshold = self.seen, self.test_hashes, self.key, self.threshold
        dedup, by_document = self.dedup, self.by_document
        train, candidates = self.train, self.candidates
        split_doc, doc_in_test, duplicates = self._split_doc, self._doc_in_test, 0
        to_train = np.zeros(len(chunk.kept), dtype=bool)
        to_test = np.zeros(len(chunk.kept), dtype=bool)
        for j, (row, text, h) in enumerate(zip(chunk.kept, chunk.texts, chunk.hashes, strict=True)):
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
        self._split_doc, self._doc_in_test = split_doc, doc_in_test
        self.duplicates += duplicates
        return to_train, to_test

    def _add_tokens(self, chunk: _Chunk, to_train: np.ndarray, to_test: np.ndarray) -> None:
        if chunk.flat is None or chunk.lengths is None:
            return
        assert self.train_tokens is not None and self.cand_tokens is not None
        per_token = np.repeat(np.arange(len(chunk.kept)), chunk.lengths)
        for mask, writer in ((to_train, self.train_tokens), (to_test, self.cand_tokens)):
            if mask.any():
                writer.add_flat(chunk.flat[mask[per_token]], chunk.lengths[mask])

    def close(self) -> None:
        self.train_sha256 = self.train.close()
        self.candidates.close()
        for writer in (self.train_tokens, self.cand_tokens):
            if writer is not None:
                writer.close()

    def take_overlap(self) -> set[int]:
        """Hashes of test texts also in train (only without dedup); frees the hash sets."""
        overlap = self.test_hashes & self.seen if not self.dedup else set()
        self.seen, self.test_hashes = set(), set()  # the largest structures
        return overlap


def _first_pass(
    lines: Iterable[tuple[str, str]],
    clean: CleanSpec,
    split: SplitSpec,
    key: bytes,
    tokenizer: PreTrainedTokenizerBase | FreshTokenizer,
    out_dir: Path,
    workers: int | None,
) -> _FirstPass:
    """Step 1: read, clean (and tokenize, unless fresh) in chunks; dedup, split and append."""
    fresh = isinstance(tokenizer, FreshTokenizer)
    worker = _ChunkWorker(clean, key, None if fresh else FastEncoder(tokenizer))
    first = _FirstPass(out_dir, clean, split, key, tokenized=not fresh)
    try:
        for docs, chunk in _chunks(lines, worker, workers or prepare_workers()):
            first.add(docs, chunk)
    finally:
        first.close()
    return first


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


def _check_both_splits(
    first: _FirstPass, clean: CleanSpec, split: SplitSpec, source: str, out_dir: Path
) -> None:
    """Step 2: fail (leaving nothing behind) when no text was kept or a split is empty."""
    kept = first.train.count + first.candidates.count
    if kept == 0:
        _cleanup(out_dir)
        limits = f"minChars={clean.min_chars}"
        if clean.max_chars is not None:
            limits += f"/maxChars={clean.max_chars}"
        raise StageError(
            f"no text left after cleaning {source}: {first.lines_read} lines read, all dropped "
            f"by {limits}/dedup ({first.dropped} too short or long, {first.duplicates} "
            "duplicates); lower dataset.clean.minChars or check the format/textField",
            reason=UNUSABLE,
        )
    if first.train.count == 0:
        _cleanup(out_dir)
        raise _split_error("train", kept, split, source)
    if first.candidates.count == 0:
        _cleanup(out_dir)
        raise _split_error("test", kept, split, source)


def _fit_tokenizer(
    fresh: FreshTokenizer, out_dir: Path, train_lines: int, batch_size: int
) -> PreTrainedTokenizerBase:
    """Step 3 (``model.fresh``): train a byte-level BPE on the train split, then tokenize it."""
    train_jsonl = out_dir / _TRAIN_JSONL
    tokenizer = train_bpe_tokenizer(
        (text for text, _ in read_jsonl(train_jsonl)),
        fresh.vocab_size,
        model_max_length=fresh.model_max_length,
        length=train_lines,
    )
    _tokenize_file(train_jsonl, TokenWriter(out_dir, TRAIN), tokenizer, batch_size)
    return tokenizer


@dataclass
class _TestSplit:
    lines: int
    tokens: int
    sha256: str
    removed: int  # candidates whose text is also in train


def _candidate_rows(
    ids: np.ndarray, offsets: np.ndarray, rows: list[int], removed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated ids and the lengths of the kept candidate ``rows`` (ascending)."""
    index_rows = np.asarray(rows, dtype=np.int64)
    starts, ends = offsets[index_rows], offsets[index_rows + 1]
    lengths = ends - starts
    if not removed:
        return np.asarray(ids), lengths
    index = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    index += np.arange(int(lengths.sum()))
    return np.asarray(ids[index]), lengths


def _write_test_split(
    out_dir: Path,
    cand_tokens: TokenWriter | None,
    overlap: set[int],
    tokenizer: Any,
    key: bytes,
    batch_size: int,
    near_rows: frozenset[int] = frozenset(),
) -> _TestSplit:
    """Step 5: the test split = the candidates minus texts in train (and, for ``dedup: near``,
    minus ``near_rows``, the candidates close to a train line); tokenized or copied ids."""
    test = JsonlWriter(out_dir / _TEST_JSONL)
    test_tokens = TokenWriter(out_dir, TEST)
    cand_ids = cand_offsets = None
    if cand_tokens is not None:  # the first pass tokenized them
        cand_ids = np.load(cand_tokens.tokens_path, mmap_mode="r")
        cand_offsets = np.load(cand_tokens.offsets_path)
    removed = 0
    batch: list[str] = []
    keep_rows: list[int] = []
    try:
        for row, (text, doc) in enumerate(read_jsonl(out_dir / _TEST_CANDIDATES)):
            if (overlap and text_hash(text, key) in overlap) or row in near_rows:
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
            test_tokens.add_flat(*_candidate_rows(cand_ids, cand_offsets, keep_rows, removed))
    finally:
        sha = test.close()
        test_tokens.close()
        del cand_ids
        (out_dir / _TEST_CANDIDATES).unlink()
        if cand_tokens is not None:
            cand_tokens.tokens_path.unlink(missing_ok=True)
            cand_tokens.offsets_path.unlink(missing_ok=True)
    return _TestSplit(test.count, test_tokens.tokens, sha, removed)


def _stats(first: _FirstPass, test: _TestSplit, out_dir: Path, clean: CleanSpec) -> DatasetStats:
    """Step 6: what was read, kept and written, and the test lines' twins in training."""
    counter = TwinCounter(
        [text for text, _ in read_jsonl(out_dir / _TEST_JSONL)], clean.near_duplicate_threshold
    )
    counter.add_train_lines(text for text, _ in read_jsonl(out_dir / _TRAIN_JSONL))
    twins = counter.counts()
    return DatasetStats(
        documents=first.documents,
        lines=first.lines_read,
        kept_lines=first.train.count + test.lines,
        dropped_short=first.dropped,
        duplicates_removed=first.duplicates + test.removed,
        train_lines=first.train.count,
        test_lines=test.lines,
        train_tokens=_npy_len(out_dir / split_files(TRAIN).tokens_name),
        test_tokens=test.tokens,
        overlap=twins["exact"],  # 0 by construction: dedup, or the removal of step 5
        test_twins=TwinCounts(
            exact=twins["exact"],
            normalized=twins["normalized"],
            letters_digits=twins["lettersDigits"],
            near=twins["near"],
        ),
    )


def _drop_near_duplicates(first: _FirstPass, out_dir: Path, threshold: float) -> set[int]:
    """Step 3 (``dedup: near``): drop train lines close to an earlier train line.

    Rewrites ``train.jsonl`` (and the train tokens, when the first pass made them) without
    those lines; returns the rows of the test candidates that are close to a kept train
    line, for step 5 to leave out of the test split.
    """
    train_path = out_dir / _TRAIN_JSONL
    rows = list(read_jsonl(train_path))
    duplicate = near_duplicate_mask([text for text, _ in rows], threshold)
    if duplicate.any():
        writer = JsonlWriter(train_path.with_name(".train.near.jsonl"))
        for (text, doc), dup in zip(rows, duplicate, strict=True):
            if not dup:
                writer.write(text, doc)
        first.train_sha256 = writer.close()
        writer.path.replace(train_path)
        first.train = writer
        first.duplicates += int(duplicate.sum())
        if first.train_tokens is not None:
            _keep_token_rows(out_dir, TRAIN, ~duplicate)
    kept = [text for (text, _), dup in zip(rows, duplicate, strict=True) if not dup]
    candidates = [text for text, _ in read_jsonl(out_dir / _TEST_CANDIDATES)]
    # LSH compares a bounded number of lines per bucket, so a twin can hide behind others
    # in a crowded bucket; once those are gone it shows. Repeat until none is found, so
    # the statistics (the same search on the final split) report no near twin.
    remaining = np.arange(len(candidates))
    for _ in range(NEAR_ROUNDS):
        twins = near_twin_mask(kept, [candidates[i] for i in remaining], threshold)
        if not twins.any():
            break
        remaining = remaining[~twins]
    return set(range(len(candidates))) - {int(i) for i in remaining}


def _keep_token_rows(out_dir: Path, split: str, keep: np.ndarray) -> None:
    """Rewrite ``split``'s token files with only the rows where ``keep`` is True."""
    files = split_files(split)
    ids = np.load(out_dir / files.tokens_name)
    offsets = np.load(out_dir / files.offsets_name)
    rows = np.nonzero(keep)[0]
    flat, lengths = _candidate_rows(ids, offsets, rows.tolist(), removed=int((~keep).sum()))
    writer = TokenWriter(out_dir, split)
    writer.add_flat(flat, lengths)
    writer.close()


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
    ``.offsets.npy`` (:mod:`kubetune.dataset_format`) and ``tokenizer/`` (the given
    tokenizer, or one trained on the train split for :class:`FreshTokenizer`).
    ``documents`` in the returned stats counts distinct consecutive document ids among
    the lines read. ``workers`` (default :func:`prepare_workers`) processes clean and
    tokenize chunks in parallel; the output does not depend on it.

    Steps: (1) one pass: each chunk is cleaned, hashed and (with a given tokenizer)
    tokenized, then deduplicated, split and appended in input order; (2) fail if nothing
    or one split is empty; (3) ``dedup: near``: drop train lines close to an earlier one,
    and mark the test candidates close to a train line; (4) for a fresh tokenizer, train
    it on the train split and tokenize that; (5) write the test split: with dedup a text
    (normalised for ``normalized``/``near``) is kept once, so no test text can be in
    train; with ``dedup: none`` the test candidates whose text is in train are removed
    here, with ``near`` the marked ones; (6) count, with each test line's twins in train.
    """
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (_TRAIN_JSONL, _TEST_JSONL, "tokenizer"):
        path = out_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
    key = seed_key(split.seed)
    first = _first_pass(lines, clean, split, key, tokenizer, out_dir, workers)
    overlap = first.take_overlap()
    if overlap:
        log.warning("%d test texts also in train; removing them from test", len(overlap))
    _check_both_splits(first, clean, split, source, out_dir)
    near_rows: frozenset[int] = frozenset()
    if clean.dedup == DedupMode.NEAR:
        near_rows = frozenset(_drop_near_duplicates(first, out_dir, clean.near_duplicate_threshold))
    if isinstance(tokenizer, FreshTokenizer):
        tokenizer = _fit_tokenizer(tokenizer, out_dir, first.train.count, batch_size)
    test = _write_test_split(
        out_dir, first.cand_tokens, overlap, tokenizer, key, batch_size, near_rows
    )
    if test.lines == 0:
        _cleanup(out_dir)
        raise _split_error("test", first.train.count, split, source)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    return PreparedDataset(
        stats=_stats(first, test, out_dir, clean),
        tokenizer=tokenizer,
        out_dir=out_dir,
        train_sha256=first.train_sha256,
        test_sha256=test.sha256,
        seconds=time.perf_counter() - started,
    )


def _npy_len(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").shape[0])


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
    versions = None
    if source.storage is not None:
        log.info("prepare: %d file(s) under %s", len(source.keys()), source.uri)
        versions = source.storage.versions("")
    inputs = dataset_inputs(job.spec, versions)

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

    answer_end = None
    if spec.is_instruction:
        examples = prepare_examples(
            source.records(),
            spec,
            tokenizer,
            out_dir,
            # A training row holds the example between its start and end tokens.
            max_tokens=job.spec.training.max_seq_length - 2,
            source=source.uri,
        )
        stats = examples.stats
        answer_end = examples.answer_end
        tokenizer = examples.tokenizer
        train_sha256, test_sha256 = examples.train_sha256, examples.test_sha256
    else:
        prepared = prepare_lines(
            source.lines(), spec.clean, spec.split, tokenizer, out_dir, source=source.uri
        )
        stats = prepared.stats.model_copy(update={"documents": source.documents})
        train_sha256, test_sha256 = prepared.train_sha256, prepared.test_sha256

    validation = job.spec.training.validation
    if validation is not None:
        carved = carve_validation(
            out_dir,
            fraction=validation.fraction,
            seed=spec.split.seed,
            by_doc=spec.is_instruction or spec.split.unit == SplitUnit.DOCUMENT,
            instruction=spec.is_instruction,
        )
        stats = stats.model_copy(
            update={
                "train_lines": carved.train_lines,
                "train_tokens": carved.train_tokens,
                "validation_lines": carved.validation_lines,
                "validation_tokens": carved.validation_tokens,
                "kept_lines": stats.kept_lines - carved.removed,
                "duplicates_removed": stats.duplicates_removed + carved.removed,
            }
        )
        train_sha256 = carved.train_sha256
        log.info(
            "prepare: validation split of %d rows carved from training (%d dropped: also in train)",
            carved.validation_lines,
            carved.removed,
        )

    # Upload: drop the old result first, so a crash mid-upload never leaves a
    # prepare.json that vouches for files it did not write; the result goes last.
    storage = ctx.storage
    storage.delete(layout.PREPARE_RESULT)
    storage.delete(layout.TOKENIZER)
    storage.upload_dir(out_dir / "tokenizer", layout.TOKENIZER)
    upload_splits(storage, out_dir)
    result = PrepareResult(
        run=ctx.run_identity,
        stats=stats,
        train_sha256=train_sha256,
        test_sha256=test_sha256,
        answer_end=answer_end,
        tokenizer=tokenizer_name(model),
        dataset_uri=ctx.storage.uri(layout.DATASET),
        fingerprint=fingerprint(inputs),
        fingerprint_inputs=inputs,
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
