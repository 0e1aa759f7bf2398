"""Paths to the shared real-text corpora (the repo's sibling ``../shared/data``; never copied in).

Usage in a test::

    from datapaths import TLDR_PAGES, TINY_SHAKESPEARE, tldr_files
    files = tldr_files("common")[:300]
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
TINY_SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
TLDR_PAGES = SHARED_DATA / "tldr-pages" / "pages"
TLDR_INSTRUCT = SHARED_DATA / "tldr-instruct"
TLDR_CHAT = TLDR_INSTRUCT / "chat.jsonl"
TLDR_PROMPT_COMPLETION = TLDR_INSTRUCT / "prompt-completion.jsonl"


def require(path: Path) -> Path:
    """``path`` if it exists, else skip the test with a message saying what is missing."""
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (expected next to the repo in ../shared/data)")
    return path


def tldr_files(platform: str = "common") -> list[Path]:
    """The tldr-pages Markdown files of one platform, sorted by name."""
    return sorted(require(TLDR_PAGES / platform).glob("*.md"))


def tldr_lines(*platforms: str) -> list[str]:
    """Every line of the tldr pages of the given platforms (all platforms if none given)."""
    root = require(TLDR_PAGES)
    dirs = [root / p for p in platforms] if platforms else sorted(root.iterdir())
    lines: list[str] = []
    for d in dirs:
        for path in sorted(d.glob("*.md")):
            lines.extend(path.read_text(encoding="utf-8").splitlines())
    return lines
