"""The report of a promptCompletion/chat run: answer perplexity, BLEU, chrF and exact match for
the model, the baseline and endpoints, and escaped sample answers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kubetune.layout import RunLayout
from kubetune.results import EvaluateResult, ModelScores
from kubetune.schema import Comparison, job_manifest, parse_job
from kubetune.storage import open_storage
from kubetune_trainer import report
from kubetune_trainer.context import StageContext, make_context

BLEU_SIGNATURE = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
CHRF_SIGNATURE = "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0"
HOSTILE = {
    "prompt": "how do I run <script>alert(1)</script> | twice?",
    "reference": "*not bold* [x](y)",
    "fine_tuned": "a & b `code`\n\nsecond paragraph",
    "baseline": "# not a heading",
    "comparisons": {"ollama": "<b>bold</b>"},
}


def _context(out: Path, tmp_path: Path, kind: str = "chat") -> StageContext:
    job = parse_job(
        job_manifest(
            "tiny-instruct",
            model={"name": "Qwen/Qwen2.5-0.5B-Instruct"},
            dataset={"source": "file:///data/records.jsonl", "kind": kind},
            evaluation={"bleu": {"maxSamples": 40, "maxNewTokens": 64}},
            storage={"output": f"file://{out}"},
        )
    )
    return make_context(job, scratch=tmp_path / "scratch")


def _write(out: Path, result: EvaluateResult, rows: list[dict[str, Any]]) -> None:
    store = open_storage(f"file://{out}")
    store.write_text(RunLayout.EVAL_SAMPLES, "".join(json.dumps(r) + "\n" for r in rows))
    store.write_text(RunLayout.EVAL_RESULT, result.to_json())


def _result(**kwargs: Any) -> EvaluateResult:
    values: dict[str, Any] = {
        "fine_tuned": ModelScores(
            perplexity=2.75,
            nll_sum=1011.6,
            predicted_tokens=1000,
            perplexity_lines=50,
            bleu=41.5,
            bleu_samples=40,
            chrf=63.25,
            exact_match=37.5,
        ),
        "baseline": ModelScores(
            perplexity=9.5, bleu=12.0, bleu_samples=40, chrf=30.0, exact_match=5.0
        ),
        "bleu_signature": BLEU_SIGNATURE,
        "chrf_signature": CHRF_SIGNATURE,
        "kind": "chat",
        "test_lines": 50,
        "comparisons": [
            Comparison(
                name="ollama",
                bleu=35.0,
                chrf=58.0,
                exact_match=30.0,
                note="answer perplexity not computed: a chat endpoint gives no log-probabilities",
            )
        ],
    }
    return EvaluateResult(**(values | kwargs))


def _rows() -> list[dict[str, Any]]:
    return [HOSTILE] + [
        {
            "prompt": f"p{i}",
            "reference": f"r{i}",
            "fine_tuned": f"f{i}",
            "baseline": f"b{i}",
            "comparisons": {"ollama": f"o{i}"},
        }
        for i in range(12)
    ]


def _table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0].startswith(first_cell):
            rows.append(cells)
    return rows


def test_instruction_report_shows_answer_metrics_for_every_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out, _result(), _rows())
    report.run(_context(out, tmp_path))
    md = (out / RunLayout.REPORT_MD).read_text()

    (ppl,) = _table_rows(md, "Answer perplexity (lower")
    assert ppl[1:4] == ["2.750", "9.500", "-6.750 (-71.1%)"] and "better" in ppl[4]
    (bleu,) = _table_rows(md, "BLEU (higher")
    assert bleu[1:3] == ["41.50", "12.00"] and "better" in bleu[4]
    (chrf,) = _table_rows(md, "chrF (higher")
    assert chrf[1:4] == ["63.25", "30.00", "+33.25 (+110.8%)"]
    (em,) = _table_rows(md, "Exact match, % (higher")
    assert em[1:3] == ["37.50", "5.00"] and "better" in em[4]

    (endpoint,) = _table_rows(md, "ollama")
    assert endpoint[1:5] == ["35.00", "58.00", "30.0", "n/a"]
    assert "chat endpoint" in endpoint[5]
    assert "only the answer tokens and the eos are predicted" in md
    assert "all 50 test examples" in md
    assert "40 of 50 held-out prompts" in md
    assert BLEU_SIGNATURE in md and CHRF_SIGNATURE in md

    assert "## Sample answers" in md and "## Sample generations" not in md
    header = next(r for r in _table_rows(md, "Prompt"))
    assert header == ["Prompt", "Reference", "Fine-tuned", "Baseline", "ollama"]
    shown = [r for r in _table_rows(md, "p") if re.fullmatch(r"p\d+", r[0])]
    assert len(shown) == report.SAMPLES_SHOWN - 1
    assert shown[0] == ["p0", "r0", "f0", "b0", "o0"]


def test_instruction_samples_are_escaped_and_clipped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    long_answer = {**_rows()[1], "prompt": "long", "fine_tuned": "word " * 200}
    _write(out, _result(), [HOSTILE, long_answer])
    report.run(_context(out, tmp_path))
    md = (out / RunLayout.REPORT_MD).read_text()
    (hostile,) = _table_rows(md, "how do I run")
    assert len(hostile) == 5  # the '|' in the prompt did not split the row
    assert hostile[0] == "how do I run \\<script\\>alert(1)\\</script\\> \\| twice?"
    assert hostile[1] == "\\*not bold\\* \\[x\\](y)"
    assert hostile[2] == "a & b \\`code\\` second paragraph"  # one table line
    assert hostile[3] == "\\# not a heading" and hostile[4] == "\\<b\\>bold\\</b\\>"
    (long,) = _table_rows(md, "long")
    assert len(long[2]) <= report.ANSWER_CHARS and long[2].endswith("…")

    html = (out / RunLayout.REPORT_HTML).read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "<b>bold</b>" not in html
    assert "<th>Exact match, % (higher is better)</th>" not in html  # a row, not a header
    assert "<td>Exact match, % (higher is better)</td>" in html


def test_instruction_report_without_baseline_generation_or_endpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _result(
        baseline=None,
        fine_tuned=ModelScores(perplexity=2.0, predicted_tokens=10, perplexity_lines=5),
        bleu_signature=None,
        chrf_signature=None,
        comparisons=[],
        kind="promptCompletion",
    )
    _write(out, result, [])
    report.run(_context(out, tmp_path, kind="promptCompletion"))
    md = (out / RunLayout.REPORT_MD).read_text()
    assert "No baseline was evaluated" in md
    assert "5 of 50 test examples (evaluation.maxSamples)" in md
    assert _table_rows(md, "Answer perplexity (lower")[0][1:3] == ["2.000", "n/a"]
    assert not _table_rows(md, "chrF") and not _table_rows(md, "BLEU")
    assert "Sample answers" not in md and "compareWith" not in md


def test_result_without_kind_is_reported_as_text(tmp_path: Path) -> None:
    # evaluate.json written before dataset kinds existed: the text report, unchanged.
    out = tmp_path / "out"
    result = _result(kind=None)
    assert not result.is_instruction and _result().is_instruction
    _write(out, result, _rows())
    report.run(_context(out, tmp_path, kind="text"))
    md = (out / RunLayout.REPORT_MD).read_text()
    assert _table_rows(md, "Perplexity (lower")[0][1] == "2.750"
    assert not _table_rows(md, "chrF") and "## Sample generations" in md
