"""reStructuredText (Sphinx) documents -> plain text lines, for the prepare stage.

Usage::

    from kubetune_trainer.rst import rst_to_text
    for line in rst_to_text(open("index.rst").read().splitlines()):
        ...

Unlike Markdown, reStructuredText markup spans lines (a comment or a directive's
options continue on indented lines), so this runs once per document, while it is
read, before the line-by-line :class:`~kubetune_trainer.cleaning.Cleaner` (whose
Markdown rules then take care of bullets and emphasis, which the two share).

What it removes, keeping the text a reader sees:

* section adornments (``=====`` under or over a title) and transitions;
* explicit markup: comments (``.. text`` and their indented continuation), hyperlink
  targets (``.. _label: url``), substitution definitions (``.. |name| image:: x``),
  the directive line itself (``.. note::``; its arguments stay when they are prose, as
  in ``.. note:: Read this``) and its option lines (``:alt: ...``); directives whose
  body is not prose (``toctree``, ``raw``, ``include``, ``image``, ``index``, ...) lose
  their body too; footnotes and citations keep their text;
* field-list markers (``:param name: text`` -> ``text``) and the ``::`` that
  introduces a literal block (``Example::`` -> ``Example:``);
* inline markup: roles (``:func:`os.path.join``` -> ``os.path.join``; ``title
  <target>`` -> ``title``; ``~a.b`` -> ``b``), inline literals, interpreted text,
  hyperlink references (```text <url>`_`` and ``word_`` -> the text), footnote and
  citation references (``[1]_``), substitution references (``|name|`` -> ``name``),
  line-block bars.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_ADORNMENT_RE = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}\s*$")
_EXPLICIT_RE = re.compile(r"^(\s*)\.\.(?:\s+(.*))?$")
_DIRECTIVE_RE = re.compile(r"^(?:\|[^|]+\|\s+)?([A-Za-z0-9][\w.:+-]*)::(?:\s+(.*))?$")
_FOOTNOTE_RE = re.compile(r"^\[(?:#[\w-]*|\*|\d+|[A-Za-z][\w.-]*)\]\s*(.*)$")
_FIELD_RE = re.compile(r"^(\s*):(?![:\s])[^:`]+(?<!\s):(?:\s+|$)")
_LINE_BLOCK_RE = re.compile(r"^(\s*)\|\s+")

# Directives whose body is not running text: drop the body with the directive.
_NON_PROSE = frozenset(
    {
        "toctree",
        "raw",
        "include",
        "literalinclude",
        "image",
        "index",
        "meta",
        "contents",
        "highlight",
        "autosummary",
        "automodule",
        "autoclass",
        "autofunction",
        "currentmodule",
        "module",
        "sectionauthor",
        "moduleauthor",
        "tabularcolumns",
        "csv-table",
        "only",
        "ifconfig",
    }
)
# Directives whose argument is a path or a name, not text a reader sees.
_ARGUMENT_NOT_TEXT = _NON_PROSE | frozenset(
    {"code-block", "code", "sourcecode", "figure", "versionadded", "versionchanged", "deprecated"}
)

_ROLE_RE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]+)`")
_REF_LINK_RE = re.compile(r"`([^`<]*?)\s*<[^`>]+>`__?")
_REF_RE = re.compile(r"`([^`]+)`__?(?!\w)")
_LITERAL_RE = re.compile(r"``(.+?)``")
_INTERPRETED_RE = re.compile(r"(?<![\w`])`([^`]+)`(?![\w`])")
_FOOTNOTE_REF_RE = re.compile(r"\s?\[(?:#[\w-]*|\*|\d+|[A-Za-z][\w.-]*)\]_(?!\w)")
_WORD_REF_RE = re.compile(r"\b([A-Za-z][\w-]*[A-Za-z0-9])__?(?=[\s.,;:!?)\]]|$)")
_SUBST_RE = re.compile(r"(?<![\w|])\|([^|\s][^|]*?)\|_{0,2}(?![\w|])")
_TARGET_IN_TITLE_RE = re.compile(r"^(.*?)\s*<[^<>]+>$")


def _role_text(content: str) -> str:
    """The visible text of a role's content: ``title <target>`` -> title; ``~a.b`` -> ``b``."""
    titled = _TARGET_IN_TITLE_RE.match(content)
    if titled and titled.group(1):
        return titled.group(1)
    content = content.lstrip("!")
    if content.startswith("~"):
        return content[1:].rsplit(".", 1)[-1]
    return content


def strip_rst_inline(line: str) -> str:
    """Inline reStructuredText markup of one line -> its text (literals kept verbatim)."""
    if "`" not in line and "_" not in line and "|" not in line:
        return line
    literals: list[str] = []

    def keep_literal(match: re.Match[str]) -> str:
        literals.append(match.group(1))
        return f"\x00{len(literals) - 1}\x00"

    line = _LITERAL_RE.sub(keep_literal, line)
    line = _ROLE_RE.sub(lambda m: _role_text(m.group(1)), line)
    line = _REF_LINK_RE.sub(r"\1", line)
    line = _REF_RE.sub(r"\1", line)
    line = _INTERPRETED_RE.sub(r"\1", line)
    line = _FOOTNOTE_REF_RE.sub("", line)
    line = _WORD_REF_RE.sub(r"\1", line)
    line = _SUBST_RE.sub(r"\1", line)
    return re.sub("\x00(\\d+)\x00", lambda m: literals[int(m.group(1))], line)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _explicit_markup(body: str) -> tuple[str | None, bool]:
    """(text to keep from an explicit-markup line, whether its indented body is kept)."""
    directive = _DIRECTIVE_RE.match(body)
    if directive:
        name, argument = directive.group(1).split(":")[-1].lower(), directive.group(2)
        keep_argument = argument and name not in _ARGUMENT_NOT_TEXT
        return (argument if keep_argument else None), name not in _NON_PROSE
    footnote = _FOOTNOTE_RE.match(body)
    if footnote:
        return footnote.group(1) or None, True
    # A hyperlink target (``_label: url``, ``__ url``) or a comment: nothing to keep.
    return None, False


def rst_to_text(lines: Iterable[str]) -> Iterator[str]:
    """The text lines of one reStructuredText document (blank lines are kept as blank)."""
    skip_below: int | None = None  # drop lines indented deeper than this (a block's body)
    options_below: int | None = None  # drop ``:option:`` lines right after a directive
    for line in lines:
        stripped = line.strip()
        indent = _indent(line)
        if skip_below is not None:
            if not stripped or indent > skip_below:
                continue
            skip_below = None
        if options_below is not None:
            if stripped and indent > options_below and _FIELD_RE.match(line):
                continue
            options_below = None
        if _ADORNMENT_RE.match(stripped):
            continue
        explicit = _EXPLICIT_RE.match(line)
        if explicit:
            keep, body_is_text = _explicit_markup(explicit.group(2) or "")
            if body_is_text:
                options_below = len(explicit.group(1))
            else:
                skip_below = len(explicit.group(1))
            if keep:
                yield strip_rst_inline(keep)
            continue
        if stripped == "::":
            continue
        if stripped.endswith("::"):
            # "Example::" reads "Example:"; "text ::" (a space before) reads "text".
            head = line.rstrip()[:-2]
            line = head.rstrip() if head.endswith((" ", "\t")) else head + ":"
        field = _FIELD_RE.match(line)
        if field:
            line = field.group(1) + line[field.end() :]
        line = _LINE_BLOCK_RE.sub(r"\1", line, count=1)
        yield strip_rst_inline(line)
