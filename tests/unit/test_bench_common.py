"""bench/common.py and bench/data.py: targets, table, JSON document, percentiles, corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is a top-level package of the repo, not installed
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    Figure,
    format_table,
    format_value,
    not_measured,
    percentile,
    results_document,
    target_met,
    write_results,
)
from bench.data import varied_corpus, vary_line  # noqa: E402


@pytest.mark.parametrize(
    ("value", "target", "met"),
    [
        (10.0, ">= 10", True),
        (9.99, ">= 10", False),
        (0.5, "< 1", True),
        (1.0, "< 1", False),
        (None, ">= 5", None),
        (3.0, None, None),
    ],
)
def test_target_met_reads_operator_and_bound(
    value: float | None, target: str | None, met: bool | None
) -> None:
    assert target_met(value, target) is met


def test_target_met_rejects_an_unknown_operator() -> None:
    with pytest.raises(ValueError, match="op"):
        target_met(1.0, "~ 3")


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(x) for x in range(1, 21)]  # 1..20
    assert percentile(values, 50) == pytest.approx(10.5)
    assert percentile(values, 99) == pytest.approx(19.81)
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_table_has_one_row_per_figure_and_flags_missed_targets() -> None:
    figures = [
        Figure("train_speedup_vs_template", 12.5, "x", ">= 10", "ok"),
        Figure("eval_ppl_speedup", 1.4, "x", ">= 5", "cpu"),
        *not_measured([("fleet200_seconds", "s", None)], "no cluster"),
    ]
    table = format_table(figures).splitlines()
    assert len(table) == 2 + 3
    assert "| yes |" in table[2] and "| NO  |" in table[3]
    assert "n/a" in table[4] and "not measured: no cluster" in table[4]


def test_format_value_keeps_small_numbers_readable() -> None:
    assert format_value(6.25e-8) == "6.25e-08"
    assert format_value(12345.6) == "12,346"
    assert format_value(None) == "n/a"


def test_results_document_round_trips_through_json(tmp_path: Path) -> None:
    figures = [Figure("prepare_peak_rss_mb", 800.0, "MiB", "< 2048")]
    doc = results_document(figures, {"cores": 2}, "quick", {"prepare": {"seconds": 3}})
    path = write_results(doc, tmp_path / "results" / "latest.json")
    loaded = json.loads(path.read_text())
    assert loaded["figures"]["prepare_peak_rss_mb"] == {
        "value": 800.0,
        "unit": "MiB",
        "target": "< 2048",
        "note": "",
        "met": True,
    }
    assert loaded["machine"] == {"cores": 2} and loaded["mode"] == "quick"
    assert not list(tmp_path.glob("results/*.tmp"))


def test_varied_corpus_repeats_the_base_with_duplicates_and_variants() -> None:
    base = [("a/x", f"- line number {i} with {{{{path/to/file}}}}") for i in range(40)]
    rows = list(varied_corpus(200, base))
    assert len(rows) == 200
    assert rows[:40] == base
    copies = [line for _, line in rows[40:]]
    originals = {line for _, line in base}
    exact = sum(line in originals for line in copies)
    assert 0 < exact < len(copies)  # some exact duplicates for dedup, most lines varied
    assert vary_line(base[3][1], 2, 3) == vary_line(base[3][1], 2, 3)  # deterministic
