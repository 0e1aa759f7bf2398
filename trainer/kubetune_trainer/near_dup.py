"""Near-duplicate lines: normalised matching and MinHash/LSH, vectorised with numpy.

Usage::

    from kubetune_trainer.near_dup import twin_counts, near_duplicate_mask

    twin_counts(train_lines, test_lines, threshold=0.8)
    # {"exact": 0, "normalized": 5, "lettersDigits": 60, "near": 210}: test lines with a
    # twin in training under each measure
    keep = ~near_duplicate_mask(lines, threshold=0.8)   # drop lines close to an earlier one

The measures, from strictest to loosest:

* ``exact``: the same text;
* ``normalized``: the same after lower-casing, dropping punctuation and symbols, and
  collapsing whitespace (``"Compress a file:"`` = ``"compress a  file"``);
* ``lettersDigits``: the same letters and digits, in order, ignoring everything else;
* ``near``: estimated Jaccard similarity of the lines' character 5-gram sets at least
  ``threshold`` (MinHash with 64 permutations, banded LSH for candidates, then the
  estimate on the full signatures).

Why MinHash rather than pairwise comparison: 40,000 training lines against 4,000 test
lines are 160 million pairs; 64 signature values per line and a few band lookups make it
a few seconds on one core.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

NGRAM = 5
NUM_PERM = 64
MAX_BUCKET_CHECKS = 8  # lines compared per LSH bucket hit (bounds the work)
TRAIN_CHUNK = 50_000  # training lines hashed at once by TwinCounter
_WS_RE = re.compile(r"\s+")


# ASCII: upper case -> lower, punctuation and symbols -> space, as one byte table (the
# fast path of normalize_for_match: bytes.translate is a single C loop).
_ASCII_TABLE = bytes(
    ord(" ") if chr(c) in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" else ord(chr(c).lower())
    for c in range(256)
)
_NOT_ALNUM_RE = re.compile(r"[^a-z0-9]+")


def normalize_for_match(text: str) -> str:
    """Lower case, punctuation and symbols removed, whitespace collapsed."""
    if text.isascii():
        return " ".join(text.encode("ascii").translate(_ASCII_TABLE).decode("ascii").split())
    kept = "".join(
        " " if unicodedata.category(ch)[0] in "PSZ" or ch.isspace() else ch for ch in text.lower()
    )
    return _WS_RE.sub(" ", kept).strip()


def letters_and_digits(text: str) -> str:
    """Only the letters and digits of ``text``, lower-cased."""
    return _letters_of_normalized(normalize_for_match(text))


def _letters_of_normalized(normalized: str) -> str:
    if normalized.isascii():
        return _NOT_ALNUM_RE.sub("", normalized)
    return "".join(ch for ch in normalized if ch.isalnum())


def _shingle_hashes(normalized: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every character 5-gram (bytes of the normalised text), and each line's start.

    All lines are hashed at once: their bytes are concatenated (each padded to at least
    NGRAM bytes, so a short line is one shingle), a polynomial hash is computed for every
    window, and the windows that would cross into the next line are dropped.
    """
    encoded = [t.encode("utf-8").ljust(NGRAM, b"\0") for t in normalized]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint64)
    windows = len(data) - NGRAM + 1
    hashes = np.zeros(max(windows, 0), dtype=np.uint64)
    for k in range(NGRAM):  # h = sum(byte[i+k] * 257^(NGRAM-1-k)), wrapping at 2^64
        hashes = hashes * np.uint64(257) + data[k : k + windows]
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    per_line = lengths - NGRAM + 1
    keep = np.repeat(starts, per_line) + _ranges(per_line)
    offsets = np.concatenate(([0], np.cumsum(per_line)[:-1]))
    return hashes[keep], offsets


def _ranges(counts: np.ndarray) -> np.ndarray:
    """[0..c0), [0..c1), ... concatenated."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)


def minhash_signatures(texts: Sequence[str], num_perm: int = NUM_PERM, seed: int = 1) -> np.ndarray:
    """``(len(texts), num_perm)`` uint32 MinHash signatures of the lines' 5-gram sets."""
    return _signatures([normalize_for_match(t) for t in texts], num_perm, seed)


def _signatures(normalized: Sequence[str], num_perm: int = NUM_PERM, seed: int = 1) -> np.ndarray:
    """MinHash signatures of already normalised lines."""
    if not normalized:
        return np.zeros((0, num_perm), dtype=np.uint32)
    hashes, offsets = _shingle_hashes(normalized)
    out = np.empty((len(normalized), num_perm), dtype=np.uint32)
    # 32-bit arithmetic halves the memory traffic of the hot loop (3x faster than 64-bit):
    # fold the window hashes to 32 bits, then each permutation is x -> a*x + b mod 2^32
    # with odd a, a bijection of the 32-bit values.
    folded = (hashes ^ (hashes >> np.uint64(32))).astype(np.uint32)
    rng = np.random.default_rng(seed)
    a = (rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64) | np.uint64(1)).astype(np.uint32)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    for i in range(num_perm):
        out[:, i] = np.minimum.reduceat(a[i] * folded + b[i], offsets)
    return out


def _bands(num_perm: int, threshold: float) -> int:
    """The fewest LSH bands whose S-curve midpoint (1/b)^(1/r) lies well below ``threshold``.

    A low midpoint finds nearly every pair above the threshold (recall); the false
    candidates it adds cost only a signature comparison each.
    """
    for bands in (d for d in range(1, num_perm + 1) if num_perm % d == 0):
        if (1.0 / bands) ** (bands / num_perm) <= threshold - 0.1:
            return bands
    return num_perm


def _band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """``(n, bands)`` uint64 keys: each band's rows hashed together."""
    n, num_perm = signatures.shape
    rows = num_perm // bands
    grouped = signatures.reshape(n, bands, rows).astype(np.uint64)
    keys = np.zeros((n, bands), dtype=np.uint64)
    for r in range(rows):
        keys = (keys ^ grouped[:, :, r]) * np.uint64(0x100000001B3)
    return keys


def _similar(sig: np.ndarray, i: np.ndarray, j: np.ndarray, threshold: float) -> np.ndarray:
    """Estimated Jaccard of pairs (i, j) of rows of ``sig`` at least ``threshold``."""
    if len(i) == 0:
        return np.zeros(0, dtype=bool)
    agree = (sig[i] == sig[j]).mean(axis=1)
    return np.asarray(agree >= threshold)


def near_duplicate_mask(texts: Sequence[str], threshold: float) -> np.ndarray:
    """True for each line whose estimated Jaccard with an EARLIER line is >= ``threshold``."""
    sig = minhash_signatures(texts)
    n = len(texts)
    dup = np.zeros(n, dtype=bool)
    if n < 2:
        return dup
    keys = _band_keys(sig, _bands(sig.shape[1], threshold))
    index = np.arange(n)
    for band in range(keys.shape[1]):
        order = np.lexsort((index, keys[:, band]))
        sorted_keys = keys[order, band]
        for back in range(1, MAX_BUCKET_CHECKS + 1):
            same = sorted_keys[back:] == sorted_keys[:-back]
            later, earlier = order[back:][same], order[:-back][same]
            dup[later[_similar(sig, later, earlier, threshold)]] = True
    return dup


class TwinCounter:
    """Counts the test lines with a twin in training, streaming over the training lines.

    Memory grows with the test split only (its keys and signatures) plus one chunk of
    training lines, so a million-line corpus is counted in bounded memory::

        counter = TwinCounter(test_lines, threshold=0.8)
        counter.add_train_lines(train_lines)     # any iterable, hashed in chunks
        counter.counts()        # {"exact": ..., "normalized": ..., ...}
    """

    def __init__(self, test: Sequence[str], threshold: float) -> None:
        self.threshold = threshold
        self._test_keys = [_match_keys(t) for t in test]  # (exact, normalized, letters)
        self._wanted = [{keys[m] for keys in self._test_keys} for m in range(3)]
        self._matched: list[set[str]] = [set(), set(), set()]
        self._sig = _signatures([keys[1] for keys in self._test_keys])
        self._bands = _bands(self._sig.shape[1], threshold)
        band_keys = _band_keys(self._sig, self._bands)
        self._order = [np.argsort(band_keys[:, b], kind="stable") for b in range(self._bands)]
        self._sorted = [band_keys[order, b] for b, order in enumerate(self._order)]
        self.near_found = np.zeros(len(test), dtype=bool)

    def add_train_lines(self, lines: Iterable[str]) -> None:
        """Every training line, streamed in chunks of ``TRAIN_CHUNK``."""
        chunk: list[str] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) >= TRAIN_CHUNK:
                self.add_train(chunk)
                chunk = []
        self.add_train(chunk)

    def add_train(self, train: Sequence[str]) -> None:
        """One chunk of training lines."""
        train_keys = [_match_keys(t) for t in train]
        for m in range(3):
            wanted, matched = self._wanted[m], self._matched[m]
            matched.update(k[m] for k in train_keys if k[m] in wanted)
        if not train or not self._test_keys:
            return
        sig = _signatures([keys[1] for keys in train_keys])
        band_keys = _band_keys(sig, self._bands)
        found = self.near_found
        for band in range(self._bands):
            sorted_keys, order = self._sorted[band], self._order[band]
            first = np.searchsorted(sorted_keys, band_keys[:, band], side="left")
            last = np.searchsorted(sorted_keys, band_keys[:, band], side="right")
            for k in range(MAX_BUCKET_CHECKS):
                train_rows = np.nonzero(first + k < last)[0]
                test_rows = order[first[train_rows] + k]
                fresh = ~found[test_rows]
                train_rows, test_rows = train_rows[fresh], test_rows[fresh]
                if len(test_rows):
                    agree = (self._sig[test_rows] == sig[train_rows]).mean(axis=1)
                    found[test_rows[agree >= self.threshold]] = True

    def counts(self) -> dict[str, int]:
        out = {
            name: sum(1 for keys in self._test_keys if keys[m] in self._matched[m])
            for m, name in enumerate(("exact", "normalized", "lettersDigits"))
        }
        out["near"] = int(self.near_found.sum())
        return out


def _match_keys(text: str) -> tuple[str, str, str]:
    """The text under the three exact measures: as is, normalised, letters and digits."""
    normalized = normalize_for_match(text)
    return text, normalized, _letters_of_normalized(normalized)


def near_twin_mask(train: Sequence[str], test: Sequence[str], threshold: float) -> np.ndarray:
    """True for each ``test`` line with a ``train`` line of estimated Jaccard >= threshold."""
    counter = TwinCounter(test, threshold)
    counter.add_train_lines(train)
    return counter.near_found


def near_twins(train: Sequence[str], test: Sequence[str], threshold: float) -> int:
    """How many ``test`` lines have a ``train`` line with estimated Jaccard >= threshold."""
    return int(near_twin_mask(train, test, threshold).sum())


def twin_counts(train: Sequence[str], test: Sequence[str], threshold: float) -> dict[str, int]:
    """Test lines with a twin in ``train`` under each measure (see the module docstring)."""
    counter = TwinCounter(test, threshold)
    counter.add_train_lines(train)
    return counter.counts()
