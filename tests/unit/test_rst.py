"""reStructuredText cleaning: each markup rule, and real Sphinx documents read as a source.

The real documents are ones nobody on this project wrote and that every test machine has:
CPython's ``email/architecture.rst`` and boto3's ``examples/*.rst``.
"""

from __future__ import annotations

import email
import re
import shutil
from pathlib import Path

import boto3
import pytest

from kubetune.schema import DatasetSpec
from kubetune.storage import open_storage
from kubetune_trainer.cleaning import Cleaner
from kubetune_trainer.rst import rst_to_text, strip_rst_inline
from kubetune_trainer.sources import open_source

REAL_RST = [
    Path(email.__file__).parent / "architecture.rst",
    Path(boto3.__file__).parent / "examples" / "s3.rst",
    Path(boto3.__file__).parent / "examples" / "cloudfront.rst",
]


def text_of(rst: str) -> list[str]:
    return [line for line in rst_to_text(rst.splitlines()) if line.strip()]


def test_section_adornments_are_dropped_and_titles_kept() -> None:
    assert text_of("=====\nTitle\n=====\n\nSub\n---\n\nBody text.\n") == [
        "Title",
        "Sub",
        "Body text.",
    ]


def test_comments_and_their_indented_continuation_are_dropped() -> None:
    doc = ".. a comment\n   that goes on\n\nKept paragraph.\n..\n   empty comment body\nEnd.\n"
    assert text_of(doc) == ["Kept paragraph.", "End."]


def test_directive_lines_and_options_go_but_prose_bodies_stay() -> None:
    doc = (
        ".. note:: Read this first.\n"
        "   :class: custom\n"
        "\n"
        "   The note's body.\n"
        "\n"
        ".. code-block:: python\n"
        "   :linenos:\n"
        "\n"
        "   print('hi')\n"
    )
    assert [line.strip() for line in text_of(doc)] == [
        "Read this first.",
        "The note's body.",
        "print('hi')",
    ]


def test_non_prose_directives_lose_their_bodies() -> None:
    doc = (
        ".. toctree::\n   :maxdepth: 2\n\n   intro\n   usage\n\n"
        ".. image:: a.png\n   :alt: A\n\nAfter.\n"
    )
    assert text_of(doc) == ["After."]


def test_targets_and_substitution_definitions_are_dropped() -> None:
    doc = ".. _intro:\n.. _Python: https://python.org\n.. |logo| image:: logo.png\nText.\n"
    assert text_of(doc) == ["Text."]


def test_footnotes_keep_their_text() -> None:
    assert text_of(".. [1] The footnote text.\n") == ["The footnote text."]


def test_field_list_markers_are_removed() -> None:
    assert text_of(":param path: where to write\n:returns: the count\n") == [
        "where to write",
        "the count",
    ]


def test_literal_block_markers() -> None:
    assert text_of("Example::\n\n    code\n\nA list ::\n\n    more\n::\n\n    x\n") == [
        "Example:",
        "    code",
        "A list",
        "    more",
        "    x",
    ]


@pytest.mark.parametrize(
    ("markup", "text"),
    [
        (":func:`os.path.join` joins", "os.path.join joins"),
        (":class:`~email.message.Message`", "Message"),
        (":ref:`the guide <guide-label>`", "the guide"),
        (":mod:`!email`", "email"),
        ("use ``rm -rf *`` carefully", "use rm -rf * carefully"),
        ("see `Python <https://python.org>`_ now", "see Python now"),
        ("see `anonymous <https://x.org>`__.", "see anonymous."),
        ("see `the docs`_.", "see the docs."),
        ("read Python_ first", "read Python first"),
        ("a claim [1]_ and [#note]_.", "a claim and."),
        ("the |version| release", "the version release"),
        ("plain `interpreted` text", "plain interpreted text"),
        ("snake_case_names stay", "snake_case_names stay"),
    ],
)
def test_inline_markup(markup: str, text: str) -> None:
    assert strip_rst_inline(markup) == text


def test_line_blocks_lose_their_bars() -> None:
    assert text_of("| first line\n| second line\n") == ["first line", "second line"]


@pytest.mark.parametrize("path", REAL_RST, ids=lambda p: p.name)
def test_real_documents_come_out_without_rst_markup(path: Path) -> None:
    raw = path.read_text(encoding="utf-8").splitlines()
    cleaner = Cleaner(DatasetSpec(source="file:///x").clean)
    lines = [c for line in rst_to_text(raw) if (c := cleaner.clean_line(line)) is not None]
    assert len(lines) > 20
    markup = re.compile(r"^\.\. |:[a-z]+:`|``|`_|^([=\-^~*#])\1{2,}$|::$")
    leftovers = [line for line in lines if markup.search(line)]
    assert leftovers == []
    # Nothing a reader sees was lost: every line of plain prose comes out as it went in.
    plain = [
        c
        for line in raw
        if not re.search(r"[`|_:*\[\]]|^\s*\.\.|^(.)\1+$", line.strip())
        and (c := cleaner.clean_line(line)) is not None
    ]
    assert len(plain) >= 5
    assert [line for line in plain if line not in lines] == []


def test_rst_files_are_read_as_rst_from_a_prefix(tmp_path: Path) -> None:
    for path in REAL_RST:
        shutil.copy(path, tmp_path / path.name)
    spec = DatasetSpec(source=tmp_path.as_uri() + "/")
    source = open_source(spec, open_storage, tmp_path / "scratch")
    lines = [line for _, line in source.lines()]
    assert source.documents == len(REAL_RST)
    assert not any(line.lstrip().startswith(".. ") for line in lines)
    assert "email Package Architecture" in lines


def test_rst_markup_is_kept_when_strip_markup_is_off(tmp_path: Path) -> None:
    (tmp_path / "doc.rst").write_text("Title\n=====\n\n.. note:: x\n")
    spec = DatasetSpec.model_validate(
        {"source": (tmp_path / "doc.rst").as_uri(), "clean": {"stripMarkup": False}}
    )
    lines = [line for _, line in open_source(spec, open_storage, tmp_path / "s").lines()]
    assert lines == ["Title", "=====", ".. note:: x"]
