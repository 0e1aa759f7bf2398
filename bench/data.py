"""Benchmark text: the tldr-pages corpus as (document, line) pairs, and bigger variants of it.

* :func:`tldr_documents` reads ``../shared/data/tldr-pages/pages/<platform>/<cmd>.md``
  (never copied into the repo) as ``(document id, raw Markdown line)`` pairs.
* :func:`varied_corpus` repeats that corpus with deterministic variations until it has
  ``n_lines`` lines, so the prepare benchmark can run on 1,000,000 lines: about a
  quarter of the repeated lines are exact copies (work for dedup), the rest change a
  word, a placeholder or a number the way near-duplicate pages differ across platforms.
* :func:`clean_tldr_lines` gives the cleaned, deduplicated text lines the train and
  evaluate benchmarks use (through the real :class:`~kubetune_trainer.cleaning.Cleaner`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from bench.common import TLDR_PAGES

# Words that the variations swap in; they look like tldr text, not like noise.
_VARIANT_WORDS = (
    "file",
    "directory",
    "archive",
    "remote",
    "local",
    "current",
    "given",
    "new",
    "old",
    "specific",
    "all",
    "hidden",
    "recursive",
    "verbose",
    "compressed",
    "default",
    "user",
)


def tldr_files(pages: Path = TLDR_PAGES) -> list[Path]:
    """Every page, sorted (the same order on every machine)."""
    files = sorted(pages.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(
            f"no tldr pages under {pages}; the benchmarks read the shared data set "
            "(../shared/data/tldr-pages/pages next to the repository)"
        )
    return files


def tldr_documents(pages: Path = TLDR_PAGES) -> list[tuple[str, str]]:
    """All non-empty raw lines of the corpus as ``(platform/cmd, line)`` pairs."""
    out: list[tuple[str, str]] = []
    for path in tldr_files(pages):
        doc = f"{path.parent.name}/{path.stem}"
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                out.append((doc, line))
    return out


def _stable(n: int, k: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{n}:{k}".encode(), digest_size=8).digest(), "little")


def vary_line(line: str, copy: int, index: int) -> str:
    """Copy ``copy`` (>= 1) of line ``index``: exact (1 in 4) or with one small change."""
    h = _stable(index, copy)
    kind = h % 4
    word = _VARIANT_WORDS[(h >> 8) % len(_VARIANT_WORDS)]
    if kind == 0:
        return line  # an exact duplicate: dedup removes it
    if kind == 1 and "{{" in line:
        return line.replace("{{", "{{" + word + "_", 1)
    if kind == 2:
        return f"{line} {word}{copy}"
    return line.replace(" ", f" {word} ", 1) if " " in line else f"{line} {copy}"


def varied_corpus(
    n_lines: int, base: list[tuple[str, str]] | None = None
) -> Iterator[tuple[str, str]]:
    """``n_lines`` (document, line) pairs: the corpus once, then varied copies of it."""
    base = base if base is not None else tldr_documents()
    produced = 0
    copy = 0
    while produced < n_lines:
        for index, (doc, line) in enumerate(base):
            if produced >= n_lines:
                return
            if copy == 0:
                yield doc, line
            else:
                yield f"{doc}~{copy}", vary_line(line, copy, index)
            produced += 1
        copy += 1


def write_corpus(path: Path, n_lines: int) -> Path:
    """Write :func:`varied_corpus` as ``doc<TAB>line`` rows (a scratch file, never in the repo)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for doc, line in varied_corpus(n_lines):
            fh.write(f"{doc}\t{line}\n")
    return path


def read_corpus(path: Path) -> Iterator[tuple[str, str]]:
    """Stream the rows :func:`write_corpus` wrote."""
    with open(path, encoding="utf-8") as fh:
        for row in fh:
            doc, _, line = row.rstrip("\n").partition("\t")
            yield doc, line


def clean_tldr_lines(min_chars: int = 16) -> list[str]:
    """Cleaned, exact-deduplicated tldr lines (the kubetune Cleaner, default rules)."""
    from kubetune.schema import CleanSpec
    from kubetune_trainer.cleaning import Cleaner

    cleaner = Cleaner(CleanSpec(min_chars=min_chars))
    seen: set[str] = set()
    out: list[str] = []
    for _, raw in tldr_documents():
        text = cleaner.clean_line(raw)
        if text is not None and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def split_train_test(lines: list[str], test_every: int = 10) -> tuple[list[str], list[str]]:
    """Every ``test_every``-th line to test: deterministic, the same for every side."""
    test = lines[::test_every]
    train = [line for i, line in enumerate(lines) if i % test_every]
    return train, test
