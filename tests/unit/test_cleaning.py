"""The cleaning rules one by one, the Cleaner built from a CleanSpec, and dedup on tldr-pages."""

from __future__ import annotations

import pytest
from datapaths import tldr_lines

from kubetune.schema import CleanSpec
from kubetune_trainer.cleaning import (
    Cleaner,
    normalize_unicode,
    normalize_whitespace,
    remove_control_chars,
    seed_key,
    strip_html,
    strip_markdown,
    text_hash,
)


def cleaner(**overrides: object) -> Cleaner:
    return Cleaner(CleanSpec.model_validate({"minChars": 0, **overrides}))


# --------------------------------------------------------------------------- unicode


FULLWIDTH_FULL = "\uff46\uff55\uff4c\uff4c"  # "full" in fullwidth letters


def test_nfkc_turns_compatibility_forms_into_plain_text() -> None:
    assert normalize_unicode(FULLWIDTH_FULL + " \uff11\uff12\uff13") == "full 123"
    assert normalize_unicode("\ufb01le") == "file"  # the "fi" ligature
    assert normalize_unicode("x\u00b2") == "x2"


def test_nfkc_composes_decomposed_accents() -> None:
    assert normalize_unicode("cafe\u0301") == "café"


def test_nfkc_can_be_switched_off() -> None:
    assert cleaner(normalizeUnicode=False).clean_line(FULLWIDTH_FULL) == FULLWIDTH_FULL
    assert cleaner().clean_line(FULLWIDTH_FULL) == "full"


# --------------------------------------------------------------------------- whitespace


def test_whitespace_runs_collapse_and_ends_are_trimmed() -> None:
    assert normalize_whitespace("  a \t\t b\u00a0\u00a0c   ") == "a b c"


def test_whitespace_normalisation_can_be_switched_off() -> None:
    assert cleaner(normalizeWhitespace=False).clean_line("  a  b ") == "  a  b "


def test_form_feed_and_carriage_return_separate_words() -> None:
    assert cleaner().clean_line("page\fbreak\rhere") == "page break here"


# --------------------------------------------------------------------------- control chars


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a\x00b\x07c\x1bd", "abcd"),  # C0 controls
        ("a\x85b\x9fc", "abc"),  # C1 controls
        ("zero\u200bwidth\u200djoin\u2060", "zerowidthjoin"),  # zero-width chars
        ("\ufeffbom", "bom"),  # byte order mark
        ("bad\ufffdbyte", "badbyte"),  # replacement char
        ("private\ue000\U000f0001use", "privateuse"),  # private use areas
        ("bidi\u202eoverride\u202c", "bidioverride"),
        ("soft\u00adhyphen", "softhyphen"),
        ("lone\ud800surrogate", "lonesurrogate"),
    ],
)
def test_control_and_stray_special_chars_are_dropped(raw: str, expected: str) -> None:
    assert remove_control_chars(raw) == expected


def test_tab_survives_control_removal_and_becomes_a_space() -> None:
    assert remove_control_chars("a\tb") == "a\tb"
    assert cleaner().clean_line("a\tb") == "a b"


def test_control_removal_can_be_switched_off() -> None:
    assert cleaner(removeControlChars=False).clean_line("a\x07b") == "a\x07b"


def test_lone_surrogates_are_dropped_even_with_control_removal_off() -> None:
    # They cannot be written as UTF-8, so they must never reach the jsonl.
    out = cleaner(removeControlChars=False).clean_line("x\ud800y")
    assert out == "xy"
    assert out.encode("utf-8")


def test_bom_does_not_hide_a_heading() -> None:
    assert cleaner().clean_line("\ufeff# Title here") == "Title here"


# --------------------------------------------------------------------------- markdown


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("# tar", "tar"),
        ("### Section ###", "Section"),
        ("#hashtag stays", "#hashtag stays"),
        ("> Archiving utility.", "Archiving utility."),
        ("> > nested quote", "nested quote"),
        ("- Create an archive:", "Create an archive:"),
        ("* star bullet", "star bullet"),
        ("+ plus bullet", "plus bullet"),
        ("1. first item", "first item"),
        ("12) twelfth item", "twelfth item"),
        ("- [x] done task", "done task"),
        ("---", ""),
        ("```bash", ""),
    ],
)
def test_block_markdown_prefixes_are_stripped(raw: str, expected: str) -> None:
    assert strip_markdown(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("an *emphasised* word", "an emphasised word"),
        ("an _emphasised_ word", "an emphasised word"),
        ("a **strong** word", "a strong word"),
        ("a __strong__ word", "a strong word"),
        ("***both***", "both"),
        ("~~gone~~ text", "gone text"),
        ("snake_case_name stays", "snake_case_name stays"),
        ("2 * 3 * 4 stays", "2 * 3 * 4 stays"),
        (r"escaped \*star\*", "escaped *star*"),
    ],
)
def test_emphasis_markers_are_removed_and_the_text_kept(raw: str, expected: str) -> None:
    assert strip_markdown(raw) == expected


def test_inline_code_keeps_the_code_text_literally() -> None:
    assert strip_markdown("run `ls *.txt` now") == "run ls *.txt now"
    assert strip_markdown("`cat <file >out`") == "cat <file >out"
    assert strip_markdown("`a_b_c` and `**x**`") == "a_b_c and **x**"
    assert strip_markdown("``code with ` tick``") == "code with ` tick"


def test_tldr_placeholders_are_unwrapped_in_and_out_of_code() -> None:
    line = "`tar cf {{path/to/target.tar}} {{path/to/file1 path/to/file2 ...}}`"
    assert strip_markdown(line) == "tar cf path/to/target.tar path/to/file1 path/to/file2 ..."
    assert strip_markdown("copy {{file}} here") == "copy file here"


def test_links_keep_their_text_and_images_their_alt_text() -> None:
    assert strip_markdown("see [the manual](https://x.org/man) now") == "see the manual now"
    assert strip_markdown("![a diagram](img/d.png) below") == "a diagram below"
    assert strip_markdown("a [reference link][ref] here") == "a reference link here"
    assert strip_markdown("[c]reate an archive") == "[c]reate an archive"  # tldr mnemonic


def test_autolinks_keep_the_url() -> None:
    line = "> More information: <https://www.gnu.org/software/tar/manual/tar.html>."
    assert strip_markdown(line) == (
        "More information: https://www.gnu.org/software/tar/manual/tar.html."
    )


def test_html_tags_comments_and_entities_are_removed() -> None:
    assert strip_html("<b>bold</b> and <a href='x'>link</a><br/>") == "bold and link"
    assert strip_html("a <!-- hidden --> b") == "a  b"
    assert strip_html("fish &amp; chips &lt;3 &#233;") == "fish & chips <3 é"
    assert strip_html("1 < 2 and 3 > 2") == "1 < 2 and 3 > 2"


def test_markup_stripping_can_be_switched_off() -> None:
    assert cleaner(stripMarkup=False).clean_line("# **Title**") == "# **Title**"


def test_entity_decoding_to_a_control_char_is_still_cleaned() -> None:
    assert cleaner().clean_line("a&#x200b;b&nbsp;c") == "ab c"


# --------------------------------------------------------------------------- case and length


def test_lowercase_option() -> None:
    assert cleaner(lowercase=True).clean_line("Hello WORLD") == "hello world"
    assert cleaner().clean_line("Hello WORLD") == "Hello WORLD"


def test_min_chars_is_applied_after_cleaning_and_counted() -> None:
    c = cleaner(minChars=8)
    assert c.clean_line("# tar") is None  # "tar" after stripping the heading
    assert c.clean_line("**a**   **b**   **c**") is None  # "a b c"
    assert c.clean_line("12345678") == "12345678"
    assert c.dropped_short == 2


def test_max_chars_drops_long_lines() -> None:
    c = cleaner(minChars=1, maxChars=5)
    assert c.clean_line("12345") == "12345"
    assert c.clean_line("123456") is None
    assert c.dropped_short == 1


def test_a_line_that_cleans_to_nothing_is_dropped_even_with_min_chars_zero() -> None:
    c = cleaner(minChars=0)
    assert c.clean_line("\u200b \ufeff ---") is None
    assert c.dropped_short == 1


def test_full_tldr_example_line() -> None:
    c = Cleaner(CleanSpec())
    assert c.clean_line("- E[x]tract a (compressed) archive [f]ile:") == (
        "E[x]tract a (compressed) archive [f]ile:"
    )
    assert c.clean_line("`tar xf {{path/to/source.tar}} {{[-C|--directory]}} {{path/to/dir}}`") == (
        "tar xf path/to/source.tar [-C|--directory] path/to/dir"
    )


# --------------------------------------------------------------------------- hashing and dedup


def test_text_hash_is_stable_and_depends_on_the_seed() -> None:
    # A fixed value: a hash that changed between releases would change every split.
    assert text_hash("hello", seed_key(42)) == text_hash("hello", seed_key(42))
    assert text_hash("hello", seed_key(42)) != text_hash("hello", seed_key(43))
    assert text_hash("hello") != text_hash("hello ")
    assert 0 <= text_hash("x") < 1 << 128


def test_exact_dedup_on_tldr_pages_counts_cross_platform_duplicates() -> None:
    lines = tldr_lines("common", "linux", "osx")
    c = Cleaner(CleanSpec())
    seen_hashes: set[int] = set()
    seen_texts: set[str] = set()
    duplicates = 0
    for line in lines:
        text = c.clean_line(line)
        if text is None:
            continue
        h = text_hash(text)
        if h in seen_hashes:
            duplicates += 1
        seen_hashes.add(h)
        seen_texts.add(text)
    # Hash dedup gives exactly the string dedup (no collisions at this size) ...
    assert len(seen_hashes) == len(seen_texts)
    kept = len(seen_texts)
    # Every line is kept, a duplicate, or dropped (blank lines count as too short).
    assert kept + duplicates + c.dropped_short == len(lines)
    # ... and tldr-pages repeats many lines across platforms ("Display help:", "--version").
    assert duplicates > 1000
    assert duplicates / (kept + duplicates) > 0.05


def test_dedup_happens_on_the_cleaned_text() -> None:
    c = Cleaner(CleanSpec(min_chars=1))
    a = c.clean_line("- Display **help**:")
    b = c.clean_line("*  Display   help:")
    assert a is not None and a == b
    assert text_hash(a) == text_hash(b)
