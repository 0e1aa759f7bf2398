"""The report stage: Markdown + standalone HTML + loss curve from a run's results."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from tiny_eval import make_job, one_thread, write_run, write_stage_results

from kubetune.contract import StageError
from kubetune.layout import RunLayout
from kubetune.results import EvaluateResult, ModelScores, ReportResult
from kubetune.schema import Comparison
from kubetune.storage import open_storage
from kubetune_trainer import evaluate, report
from kubetune_trainer.context import StageContext, make_context

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIGNATURE = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
HOSTILE = {
    "prompt": "use <script>alert(1)</script> | pipe",
    "reference": "*not bold* [x](y)",
    "fine_tuned": "a & b `code`",
    "baseline": "# not a heading",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def _synthetic_run(out: Path, tmp_path: Path, **evaluation: object) -> StageContext:
    store = open_storage(f"file://{out}")
    write_stage_results(store, n_train=900, n_test=100, train_tokens=20000, test_tokens=2500)
    result = EvaluateResult(
        fine_tuned=ModelScores(
            perplexity=12.5,
            nll_sum=6313.8,
            predicted_tokens=2500,
            bleu=21.25,
            bleu_samples=40,
            tokens_per_second=9000.0,
        ),
        baseline=ModelScores(
            perplexity=48.0, nll_sum=9678.0, predicted_tokens=2500, bleu=25.5, bleu_samples=40
        ),
        bleu_signature=SIGNATURE,
        comparisons=[
            Comparison(
                name="ollama-llama",
                bleu=30.0,
                note="endpoint returns no prompt log-probabilities; perplexity not computed",
            )
        ],
        samples_uri=store.uri(RunLayout.EVAL_SAMPLES),
        seconds=12.0,
    )
    rows = [HOSTILE] + [
        {"prompt": f"p{i}", "reference": f"r{i}", "fine_tuned": f"f{i}", "baseline": f"b{i}"}
        for i in range(12)
    ]
    store.write_text(RunLayout.EVAL_SAMPLES, "".join(json.dumps(r) + "\n" for r in rows))
    store.write_text(RunLayout.EVAL_RESULT, result.to_json())
    return make_context(make_job(f"file://{out}", **evaluation), scratch=tmp_path / "scratch")


def _table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0].startswith(first_cell):
            rows.append(cells)
    return rows


def test_report_has_every_section_and_valid_png(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = report.run(_synthetic_run(out, tmp_path))
    md = (out / RunLayout.REPORT_MD).read_text()
    for section in (
        "# Fine-tune report: tiny-eval",
        "Model: fresh gpt2 (2x64, vocab 512)",
        "small demo model",
        "## Results",
        "## Sample generations",
        "## Dataset",
        "## Training",
        "### Hyperparameters (resolved)",
        "### Loss curve",
        "## Timings",
        "### Other endpoints (compareWith)",
        SIGNATURE,
    ):
        assert section in md, section
    assert "![training loss per optimizer step](loss.png)" in md

    (ppl,) = _table_rows(md, "Perplexity")
    assert ppl[1:4] == ["12.500", "48.000", "-35.500 (-74.0%)"] and "better" in ppl[4]
    (bleu,) = _table_rows(md, "BLEU")
    assert bleu[1:3] == ["21.25", "25.50"] and "worse" in bleu[4] and "↓" in bleu[4]
    assert _table_rows(md, "Test tokens")[0][1] == "2,500"
    assert _table_rows(md, "lora.r")[0][1] == "8"
    (endpoint,) = _table_rows(md, "ollama-llama")
    assert endpoint[1] == "30.00" and "perplexity not computed" in endpoint[3]

    png = (out / RunLayout.LOSS_PNG).read_bytes()
    assert png.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(png)) as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100

    html = (out / RunLayout.REPORT_HTML).read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<th>Fine-tuned</th>" in html and "<td>12.500</td>" in html
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', html)
    assert embedded and base64.b64decode(embedded.group(1)) == png

    stored = ReportResult.model_validate_json((out / RunLayout.REPORT_RESULT).read_text())
    assert stored == result and result.loss_curve_uri == f"file://{out}/{RunLayout.LOSS_PNG}"
    assert (out / RunLayout.REPORT_RESULT).stat().st_mtime_ns >= (
        out / RunLayout.REPORT_HTML
    ).stat().st_mtime_ns


def test_report_escapes_generated_text(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report.run(_synthetic_run(out, tmp_path))
    html = (out / RunLayout.REPORT_HTML).read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "a &amp; b `code`" in html
    md = (out / RunLayout.REPORT_MD).read_text()
    (hostile,) = _table_rows(md, "use")
    assert len(hostile) == 4  # the '|' inside the prompt did not split the row
    assert hostile[0] == "use \\<script\\>alert(1)\\</script\\> \\| pipe"
    assert hostile[1] == "\\*not bold\\* \\[x\\](y)"
    assert hostile[3] == "\\# not a heading"
    shown = [r for r in _table_rows(md, "p") if re.fullmatch(r"p\d+", r[0])]
    assert len(shown) == report.SAMPLES_SHOWN - 1  # p0, p1, ... after the hostile row


def test_report_without_baseline_or_metrics_says_what_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ctx = _synthetic_run(out, tmp_path)
    stored = EvaluateResult.model_validate_json((out / RunLayout.EVAL_RESULT).read_text())
    stored.baseline = None
    (out / RunLayout.EVAL_RESULT).write_text(stored.to_json())
    (out / RunLayout.TRAIN_METRICS).unlink()
    (out / RunLayout.PREPARE_RESULT).unlink()
    result = report.run(ctx)
    md = (out / RunLayout.REPORT_MD).read_text()
    assert "No baseline was evaluated" in md
    assert "evaluation.precision" not in md  # a result from before the field says nothing
    assert "dataset/prepare.json not available." in md
    assert "has no loss values to plot" in md
    assert result.loss_curve_uri is None and not (out / RunLayout.LOSS_PNG).exists()


def test_report_before_evaluate_says_to_run_it(tmp_path: Path) -> None:
    ctx = make_context(make_job(f"file://{tmp_path / 'empty'}"), scratch=tmp_path / "scratch")
    with pytest.raises(StageError, match="run the evaluate stage first"):
        report.run(ctx)


def test_evaluate_then_report_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_run(out, n_train=800, n_test=30)
    ctx = make_context(
        make_job(f"file://{out}", bleu={"maxSamples": 10, "maxNewTokens": 8}),
        scratch=tmp_path / "scratch",
    )
    evaluated = evaluate.run(ctx)
    assert evaluated.baseline is not None
    report.run(ctx)
    md = (out / RunLayout.REPORT_MD).read_text()
    (ppl,) = _table_rows(md, "Perplexity")
    assert ppl[1] == f"{evaluated.fine_tuned.perplexity:,.3f}"
    assert "better" in ppl[4]  # the fine-tuned tiny model beats its untrained init
    assert evaluated.precision == "fp32"  # auto on a CPU
    assert "Every model here was scored in fp32 (evaluation.precision)." in md
    assert (
        len(_table_rows(md, "Prompt")) == 1
        and "<table>" in (out / RunLayout.REPORT_HTML).read_text()
    )
