"""Line cleaning rules of the prepare stage: pure functions and the :class:`Cleaner`.

Usage::

    from kubetune_trainer.cleaning import Cleaner
    from kubetune.schema import CleanSpec

    cleaner = Cleaner(CleanSpec(min_chars=16))
    cleaner.clean_line("- Create an **archive**:")   # -> "Create an archive:"
    cleaner.clean_line("# tar")                       # -> None (shorter than minChars)

Each rule is a small function that can be tested on its own. ``Cleaner`` applies
the ones a :class:`~kubetune.schema.CleanSpec` enables, in this order:
control characters, NFKC, markup, whitespace, lower case, length. Control
characters go first so that a BOM or a zero-width space at the start of a line
does not hide a Markdown heading or bullet from the markup rules.

Dedup lives here too: :func:`text_hash` is the stable, seeded 128-bit hash that
both the exact dedup and the train/test split use (the prepare stage keeps only
these integers, never the strings, so memory stays bounded).
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata

from kubetune.schema import CleanSpec

# C0 controls except TAB, LF, VT, FF, CR (whitespace: the whitespace rule turns them
# into spaces, so "a\fb" stays two words), DEL, C1
# controls, soft hyphen, zero-width and bidi controls, word joiner and invisible
# operators, BOM / zero-width no-break space, interlinear annotations, the
# replacement character U+FFFD (what a lossy decoder left behind), private use
# areas, and lone surrogates (json.loads accepts "\ud800"; UTF-8 cannot encode it).
_CONTROL_RE = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f"
    "\ufeff\ufff9-\ufffd\ue000-\uf8ff\ud800-\udfff\U000f0000-\U000ffffd\U00100000-\U0010fffd]"
)

# --- Markdown: block-level prefixes (only at the start of a line) -------------
_FENCE_RE = re.compile(r"^\s*(```|~~~)")
_HRULE_RE = re.compile(r"^\s{0,3}([-*_])(?:\s*\1){2,}\s*$")
_HEADING_RE = re.compile(r"^\s{0,3}#{1,6}(?:\s+|$)")
_HEADING_CLOSE_RE = re.compile(r"\s+#+\s*$")
_QUOTE_RE = re.compile(r"^\s*(?:>\s?)+")
_BULLET_RE = re.compile(r"^\s*(?:[-*+]|\d{1,9}[.)])\s+")
_TASK_RE = re.compile(r"^\[[ xX]\]\s+")

# --- Markdown: inline ----------------------------------------------------------
# A code span: a run of backticks, content, the same run (CommonMark).
_CODE_RE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_PLACEHOLDER_RE = re.compile(r"\{\{(.*?)\}\}")
_IMAGE_RE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK_RE = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_REF_LINK_RE = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_AUTOLINK_RE = re.compile(r"<((?:https?|ftp)://[^\s<>]+|mailto:[^\s<>]+)>")
_HTML_COMMENT_RE = re.compile(r"<!--.*?(?:-->|$)")
_HTML_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s+[^<>]*)?/?>")
_STRONG_RE = re.compile(r"(?<!\\)(\*\*|__)(?=\S)(.+?)(?<=\S)(?<!\\)\1")
_EM_STAR_RE = re.compile(r"(?<![\\*])\*(?=[^\s*])(.+?)(?<=[^\s\\*])\*(?!\*)")
# "_x_" only at word boundaries: snake_case_names are not emphasis.
_EM_UNDERSCORE_RE = re.compile(r"(?<![\\\w])_(?=[^\s_])(.+?)(?<=[^\s\\_])_(?!\w)")
_STRIKE_RE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_ESCAPE_RE = re.compile(r"\\([!-/:-@\[-`{-~])")
# Cheap pre-checks: most lines of most corpora need none of the inline rules.
_INLINE_TRIGGER_RE = re.compile(r"[*_\[\]<>&~\\{!]")
_BLOCK_TRIGGER = frozenset("#>-*+_`~0123456789 \t")


def remove_control_chars(text: str) -> str:
    """Drop control characters, zero-width and bidi marks, BOM, U+FFFD and private-use chars."""
    return _CONTROL_RE.sub("", text)


def normalize_unicode(text: str) -> str:
    """NFKC: compatibility forms become plain ones (fullwidth letters, ligatures, NBSP)."""
    if text.isascii():  # ASCII is already NFKC; skip the C call and its copy
        return text
    return unicodedata.normalize("NFKC", text)


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace (spaces, tabs, NBSP, ...) to one space; trim the ends."""
    return " ".join(text.split())


def strip_html(text: str) -> str:
    """Remove HTML comments and tags and decode entities (``&amp;`` -> ``&``)."""
    if "<" in text:
        text = _HTML_COMMENT_RE.sub("", text)
        text = _HTML_TAG_RE.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    return text


def _strip_inline(segment: str) -> str:
    """Inline Markdown outside code spans: images, links, emphasis, HTML, escapes."""
    if not _INLINE_TRIGGER_RE.search(segment):
        return segment
    if "{{" in segment:
        segment = _PLACEHOLDER_RE.sub(r"\1", segment)
    if "[" in segment:
        segment = _IMAGE_RE.sub(r"\1", segment)
        segment = _LINK_RE.sub(r"\1", segment)
        segment = _REF_LINK_RE.sub(r"\1", segment)
    if "<" in segment:
        segment = _AUTOLINK_RE.sub(r"\1", segment)
    if "*" in segment or "_" in segment:
        segment = _STRONG_RE.sub(r"\2", segment)
        segment = _EM_STAR_RE.sub(r"\1", segment)
        segment = _EM_UNDERSCORE_RE.sub(r"\1", segment)
    if "~~" in segment:
        segment = _STRIKE_RE.sub(r"\1", segment)
    segment = strip_html(segment)
    if "\\" in segment:
        segment = _ESCAPE_RE.sub(r"\1", segment)
    return segment


def _code_text(code: str) -> str:
    """The text of a code span: placeholders unwrapped, one padding space trimmed each side."""
    if len(code) >= 2 and code[0] == " " and code[-1] == " " and code.strip():
        code = code[1:-1]
    if "{{" in code:
        code = _PLACEHOLDER_RE.sub(r"\1", code)
    return code


def strip_block_markdown(line: str) -> str:
    """Remove the line-level Markdown prefixes: heading ``#``, ``>`` quotes, list bullets."""
    if not line or line[0] not in _BLOCK_TRIGGER:
        return line
    if _FENCE_RE.match(line) or _HRULE_RE.match(line):
        return ""
    heading = _HEADING_RE.match(line)
    if heading:
        return _HEADING_CLOSE_RE.sub("", line[heading.end() :])
    line = _QUOTE_RE.sub("", line, count=1)
    bullet = _BULLET_RE.match(line)
    if bullet:
        line = _TASK_RE.sub("", line[bullet.end() :], count=1)
    return line


def strip_markdown(line: str) -> str:
    """Markdown (and inline HTML) of one line -> its plain text.

    Code spans keep their text untouched except tldr-style ``{{placeholder}}``
    -> ``placeholder``: emphasis, tags and escapes inside code are literal
    (``ls *.txt``, ``cat <file >out``, ``a_b_c``).
    """
    line = strip_block_markdown(line)
    if "`" not in line:
        return _strip_inline(line)
    out = []
    pos = 0
    for match in _CODE_RE.finditer(line):
        out.append(_strip_inline(line[pos : match.start()]))
        out.append(_code_text(match.group(2)))
        pos = match.end()
    out.append(_strip_inline(line[pos:]))
    return "".join(out)


def text_hash(text: str, key: bytes = b"") -> int:
    """A stable 128-bit hash of ``text`` (blake2b, keyed with ``key``, e.g. the split seed).

    The same text gives the same number in every process and on every machine
    (unlike ``hash()``), so a split decided from it is reproducible.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16, key=key).digest()
    return int.from_bytes(digest, "little")


def seed_key(seed: int) -> bytes:
    """The blake2b key for a split seed (blake2b keys are at most 64 bytes)."""
    return seed.to_bytes(8, "little", signed=False)


class Cleaner:
    """Applies the rules a :class:`CleanSpec` enables to single lines.

    ``clean_line`` returns the cleaned text, or None when the line is dropped
    (shorter than ``minChars`` or longer than ``maxChars`` after cleaning, or empty).
    The counters say why lines were dropped; dedup is the caller's job because it
    needs a seen-set that spans the whole corpus.
    """

    def __init__(self, spec: CleanSpec) -> None:
        self.spec = spec
        self.min_chars = max(spec.min_chars, 1)  # an empty line is never training text
        self.max_chars = spec.max_chars
        self.dropped_short = 0

    def clean_text(self, line: str) -> str:
        """All enabled text rules, no length filter."""
        spec = self.spec
        if spec.remove_control_chars:
            line = _CONTROL_RE.sub("", line)
        if spec.normalize_unicode and not line.isascii():
            line = unicodedata.normalize("NFKC", line)
        if spec.strip_markup:
            had_entity = "&" in line
            line = strip_markdown(line)
            if had_entity:
                # An entity can decode to a control character or a compatibility form.
                if spec.remove_control_chars:
                    line = _CONTROL_RE.sub("", line)
                if spec.normalize_unicode and not line.isascii():
                    line = unicodedata.normalize("NFKC", line)
        if spec.normalize_whitespace:
            line = " ".join(line.split())
        else:
            # Lines are written one per line: a newline inside one would split it.
            line = line.replace("\n", " ").replace("\r", " ")
        if spec.lowercase:
            line = line.lower()
        if not spec.remove_control_chars:
            # Lone surrogates cannot be written as UTF-8 at all; drop them regardless.
            line = line.encode("utf-8", "surrogatepass").decode("utf-8", "ignore")
        return line

    def clean_line(self, line: str) -> str | None:
        text = self.clean_text(line)
        n = len(text)
        if n < self.min_chars or (self.max_chars is not None and n > self.max_chars):
            self.dropped_short += 1
            return None
        return text
