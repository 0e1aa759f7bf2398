"""The report stage: one Markdown and one standalone HTML page about a finished run.

Run it with ``kubetune report --job job.yaml [--output URI]`` (or ``kubetune
evaluate --report``, or as the last step of ``kubetune run``); in Python:
``kubetune_trainer.report.run(ctx)``.

Reads ``eval/evaluate.json`` (required), ``eval/samples.jsonl``,
``dataset/prepare.json``, ``train/train.json`` and ``train/metrics.jsonl``
(each optional: a missing one becomes a "not available" line). Writes
``report/loss.png``, ``report/report.md``, ``report/report.html`` and then
``report/report.json`` (:class:`ReportResult`) last.

Both documents are rendered from the same list of blocks, so they always say
the same thing; every piece of text from data (test lines, generations) is
escaped for Markdown or HTML. The HTML embeds the loss curve, so it is one file.

For promptCompletion and chat datasets (``EvaluateResult.kind``) the results are
answer perplexity, BLEU, chrF and exact match of the answers to held-out prompts,
for the fine-tuned model, the baseline and the compareWith endpoints, and the
samples show prompts, reference answers and each model's answer.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.contract import StageError
from kubetune.layout import RunLayout
from kubetune.results import EvaluateResult, PrepareResult, ReportResult, TrainResult
from kubetune.storage import StorageError
from kubetune_trainer.context import StageContext

SAMPLES_SHOWN = 8
# promptCompletion/chat answers can run for paragraphs: a sample cell shows this many characters.
ANSWER_CHARS = 400


# --------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    emphasis: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    alt: str
    name: str  # file name next to the report
    png: bytes


@dataclass
class Code:
    text: str


Block = Heading | Para | Table | Image | Code

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#!])")


def md_escape(text: str) -> str:
    """Text that Markdown shows literally (no emphasis, links, HTML or table breaks)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {md_escape(block.text)}")
        elif isinstance(block, Para):
            text = md_escape(block.text)
            out.append(f"*{text}*" if block.emphasis else text)
        elif isinstance(block, Table):
            out.append("| " + " | ".join(md_escape(h) for h in block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            out.extend("| " + " | ".join(md_escape(c) for c in row) + " |" for row in block.rows)
        elif isinstance(block, Image):
            out.append(f"![{md_escape(block.alt)}]({block.name})")
        else:
            fence = "```" if "```" not in block.text else "~~~~"
            out.append(f"{fence}\n{block.text}\n{fence}")
        out.append("")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;
color:#222}table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;
padding:.3rem .6rem;text-align:left;vertical-align:top}th{background:#f3f3f3}
pre{background:#f6f6f6;padding:.6rem;overflow-x:auto}img{max-width:100%}"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            text = esc(block.text)
            out.append(f"<p><em>{text}</em></p>" if block.emphasis else f"<p>{text}</p>")
        elif isinstance(block, Table):
            out.append("<table>")
            out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.header) + "</tr>")
            out.extend(
                "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows
            )
            out.append("</table>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode("ascii")
            out.append(f'<img alt="{esc(block.alt)}" src="data:image/png;base64,{data}">')
        else:
            out.append(f"<pre><code>{esc(block.text)}</code></pre>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- inputs


def _read_json(ctx: StageContext, key: str) -> Any:
    try:
        return json.loads(ctx.storage.read_text(key))
    except (StorageError, json.JSONDecodeError):
        return None


def _read_jsonl(ctx: StageContext, key: str) -> list[dict[str, Any]]:
    try:
        text = ctx.storage.read_text(key)
    except StorageError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write: skip it, keep the curve
        if isinstance(row, dict):
            rows.append(row)
    return rows


def validation_points(metrics: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(step, validation loss) of the metrics rows that have one (training.validation)."""
    return [
        (m["step"], m["validation_loss"])
        for m in metrics
        if isinstance(m.get("step"), (int, float))
        and isinstance(m.get("validation_loss"), (int, float))
        and math.isfinite(m["validation_loss"])
    ]


def loss_curve_png(metrics: Sequence[dict[str, Any]]) -> bytes | None:
    """PNG of training (and validation) loss per step, learning rate on a second axis."""
    points = [
        (m["step"], m["loss"])
        for m in metrics
        if isinstance(m.get("step"), (int, float))
        and isinstance(m.get("loss"), (int, float))
        and math.isfinite(m["loss"])
    ]
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:blue", label="training")
    validation = validation_points(metrics)
    if validation:
        ax.plot(
            [p[0] for p in validation],
            [p[1] for p in validation],
            color="tab:green",
            marker="o",
            markersize=3,
            label="validation",
        )
        ax.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" if validation else "training loss", color="tab:blue")
    ax.grid(alpha=0.3)
    lrs = [
        (m["step"], m["lr"])
        for m in metrics
        if isinstance(m.get("step"), (int, float)) and isinstance(m.get("lr"), (int, float))
    ]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in lrs], [p[1] for p in lrs], color="tab:orange", alpha=0.6)
        ax2.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- sections


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:,.{digits}f}"


def _change(ft: float | None, base: float | None, lower_is_better: bool, digits: int) -> list[str]:
    if ft is None or base is None or not math.isfinite(ft) or not math.isfinite(base):
        return ["n/a", "n/a"]
    delta = ft - base
    relative = f" ({delta / base:+.1%})" if base else ""
    if abs(delta) < 0.5 * 10**-digits:
        return [f"{delta:+.{digits}f}", "= unchanged"]
    improved = delta < 0 if lower_is_better else delta > 0
    arrow = "↓" if delta < 0 else "↑"
    direction = "lower" if delta < 0 else "higher"
    verdict = "better" if improved else "worse"
    return [f"{delta:+,.{digits}f}{relative}", f"{arrow} {verdict} ({direction})"]


def _header(ctx: StageContext) -> list[Block]:
    job, spec = ctx.job, ctx.job.spec
    blocks: list[Block] = [
        Heading(1, f"Fine-tune report: {job.metadata.name}"),
        Para(
            f"Model: {spec.model.display_name}. Dataset: {spec.dataset.source}. "
            f"Output: {ctx.output}."
        ),
    ]
    if spec.model.fresh is not None:
        blocks.append(
            Para(
                "This is a small demo model initialised from scratch (model.fresh), not a "
                "pre-trained language model: its numbers show that the pipeline works, not the "
                "quality a real model would reach. Its baseline is the untrained initialisation "
                "(same architecture, same seed), so the baseline perplexity is near the vocabulary "
                "size and the baseline generations are noise.",
                emphasis=True,
            )
        )
    return blocks


def _metric_row(
    name: str, ft: float | None, base: float | None, lower_is_better: bool, digits: int
) -> list[str]:
    return [
        name,
        _num(ft, digits),
        _num(base, digits),
        *_change(ft, base, lower_is_better, digits),
    ]


def _instruction_results(ctx: StageContext, result: EvaluateResult) -> list[Block]:
    """promptCompletion/chat: answer perplexity, BLEU, chrF and exact match of the answers."""
    ft, base = result.fine_tuned, result.baseline
    blocks: list[Block] = [Heading(2, "Results")]
    metrics = [
        ("Answer perplexity (lower is better)", "perplexity", True, 3),
        ("BLEU (higher is better)", "bleu", False, 2),
        ("chrF (higher is better)", "chrf", False, 2),
        # Two decimals: one exact answer in a few thousand is 0.0x%, not "unchanged".
        ("Exact match, % (higher is better)", "exact_match", False, 2),
    ]
    rows = []
    for name, attr, lower, digits in metrics:
        value = getattr(ft, attr)
        base_value = getattr(base, attr) if base else None
        if value is not None or base_value is not None:
            rows.append(_metric_row(name, value, base_value, lower, digits))
    blocks.append(Table(["Metric", "Fine-tuned", "Baseline", "Change", "Verdict"], rows))
    if base is None:
        blocks.append(Para("No baseline was evaluated (evaluation.baseline is false)."))
    blocks.extend(_precision(result))
    if ft.perplexity is not None:
        blocks.append(
            Para(
                "Answer perplexity is exp(total NLL / predicted tokens) over the answers of "
                f"{_scored_lines(result, 'examples')} ({ft.predicted_tokens or 0:,} tokens): each "
                "example is scored as the context token, its prompt and answer and an eos, and "
                "only the answer tokens and the eos are predicted; the prompt (system, user and "
                "template tokens) is context only. It is not comparable with the perplexity of "
                "a text dataset."
            )
        )
    if ft.bleu is not None:
        spec = ctx.job.spec.evaluation.bleu
        blocks.append(
            Para(
                f"BLEU, chrF and exact match: greedy answers to the first "
                f"{_of_total(ft.bleu_samples, result.test_lines)} held-out prompts (all in "
                f"{RunLayout.EVAL_SAMPLES}, to recompute with sacrebleu), at most "
                f"{spec.max_new_tokens} new tokens, stopped at the end of the answer, each "
                "compared with the reference answer. Exact match is the percent of answers "
                "equal to their reference after whitespace normalisation. sacrebleu signatures "
                "(BLEU, chrF):"
            )
        )
        blocks.append(Code(result.bleu_signature or "n/a"))
        blocks.append(Code(result.chrf_signature or "n/a"))
    if result.comparisons:
        blocks.append(Heading(3, "Other endpoints (compareWith)"))
        blocks.append(
            Table(
                ["Endpoint", "BLEU", "chrF", "Exact match, %", "Answer perplexity", "Note"],
                [
                    [
                        c.name,
                        _num(c.bleu, 2),
                        _num(c.chrf, 2),
                        _num(c.exact_match, 1),
                        _num(c.perplexity),
                        c.note or "",
                    ]
                    for c in result.comparisons
                ],
            )
        )
        blocks.append(
            Para(
                "Endpoints answer the same prompts through their chat API (their own chat "
                "template), greedily, with the same token budget."
            )
        )
    return blocks


def _results(ctx: StageContext, result: EvaluateResult) -> list[Block]:
    if result.is_instruction:
        return _instruction_results(ctx, result)
    ft, base = result.fine_tuned, result.baseline
    blocks: list[Block] = [Heading(2, "Results")]
    rows = []
    if ft.perplexity is not None or (base and base.perplexity is not None):
        rows.append(
            [
                "Perplexity (lower is better)",
                _num(ft.perplexity),
                _num(base.perplexity if base else None),
                *_change(ft.perplexity, base.perplexity if base else None, True, 3),
            ]
        )
    if ft.bleu is not None or (base and base.bleu is not None):
        rows.append(
            [
                "BLEU (higher is better)",
                _num(ft.bleu, 2),
                _num(base.bleu if base else None, 2),
                *_change(ft.bleu, base.bleu if base else None, False, 2),
            ]
        )
    blocks.append(Table(["Metric", "Fine-tuned", "Baseline", "Change", "Verdict"], rows))
    if base is None:
        blocks.append(Para("No baseline was evaluated (evaluation.baseline is false)."))
    blocks.extend(_precision(result))
    if ft.perplexity is not None:
        blocks.append(
            Para(
                f"Perplexity is exp(total NLL / predicted tokens) over {_scored_lines(result)} "
                f"({ft.predicted_tokens or 0:,} tokens); each test line is scored on its own "
                "with the eos/bos token as context, so every token of the line is predicted."
            )
        )
    if ft.bleu is not None:
        spec = ctx.job.spec.evaluation.bleu
        blocks.append(
            Para(
                f"BLEU: greedy continuations of {_of_total(ft.bleu_samples, result.test_lines)} "
                f"test lines (all in {RunLayout.EVAL_SAMPLES}, to recompute with sacrebleu); "
                "the prompt is "
                f"the first {spec.prompt_fraction:.0%} of each line's words, the reference is the "
                "rest; "
                f"at most {spec.max_new_tokens} new tokens, cut at the first newline. sacrebleu "
                "signature:"
            )
        )
        blocks.append(Code(result.bleu_signature or "n/a"))
    if result.comparisons:
        blocks.append(Heading(3, "Other endpoints (compareWith)"))
        blocks.append(
            Table(
                ["Endpoint", "BLEU", "Perplexity", "Note"],
                [
                    [c.name, _num(c.bleu, 2), _num(c.perplexity), c.note or ""]
                    for c in result.comparisons
                ],
            )
        )
        blocks.append(
            Para(
                "An endpoint's perplexity is computed over its own tokenisation, so "
                "it is not comparable token for token with the local models."
            )
        )
    return blocks


def _promotion(result: EvaluateResult | None) -> list[Block]:
    """spec.promotion's decision: promoted or not, against what, and where it lives."""
    if result is None or result.promotion is None:
        return []
    p = result.promotion
    verdict = "promoted" if p.promoted else f"not promoted ({p.reason})"
    rows = [
        ["Decision", verdict],
        ["Why", p.message or ""],
        ["Version in use", p.version or "none"],
        ["Previous version", p.previous or "none"],
        ["Serving model", p.model_uri or ""],
    ]
    if result.champion is not None:
        rows.append(["Champion perplexity on this test split", _num(result.champion.perplexity)])
    return [Heading(2, "Promotion"), Table(["", ""], rows)]


def _dataset(prepare: PrepareResult | None) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Dataset")]
    if prepare is None:
        return [*blocks, Para("dataset/prepare.json not available.")]
    s = prepare.stats
    rows = [
        ("Documents read", s.documents),
        ("Lines read", s.lines),
        ("Lines kept", s.kept_lines),
        ("Dropped (too short/long)", s.dropped_short),
        ("Duplicates removed", s.duplicates_removed),
        ("Train lines", s.train_lines),
        ("Test lines", s.test_lines),
        ("Train tokens", s.train_tokens),
        ("Test tokens", s.test_tokens),
        ("Train/test overlap", s.overlap),
    ]
    if s.validation_lines is not None:
        rows += [
            ("Validation lines (carved from train)", s.validation_lines),
            ("Validation tokens", s.validation_tokens or 0),
        ]
    if s.records is not None:
        rows += [(f"Bad records: {cause}", n) for cause, n in (s.bad_records or {}).items()]
        if s.train_groups is not None:
            rows += [("Train groups", s.train_groups), ("Test groups", s.test_groups or 0)]
        rows += [
            ("Test prompts also in train", s.prompt_overlap or 0),
            ("Test answers also in train", s.answer_overlap or 0),
            ("Test examples removed for a shared prompt or answer", s.overlap_removed or 0),
        ]
    twins = s.test_twins
    if twins is not None:
        threshold = prepare.config.get("clean", {}).get("nearDuplicateThreshold", 0.8)
        rows += [
            ("Test lines with a twin in train: same text", twins.exact),
            ("... ignoring case, punctuation, spacing", twins.normalized),
            ("... same letters and digits", twins.letters_digits),
            (f"... 5-gram Jaccard >= {threshold}", twins.near),
        ]
    blocks.append(Table(["Statistic", "Value"], [[k, f"{v:,}"] for k, v in rows]))
    blocks.append(Para(f"Tokenizer: {prepare.tokenizer}. Source: {prepare.dataset_uri}."))
    if prepare.fingerprint:
        blocks.append(Para(f"Dataset fingerprint: {prepare.fingerprint[:16]}."))
    return blocks


def _flatten(config: dict[str, Any], prefix: str = "") -> list[list[str]]:
    rows = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append([name, json.dumps(value) if not isinstance(value, str) else value])
    return rows


def _training(train: TrainResult | None, png: bytes | None) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Training")]
    if train is None:
        return [*blocks, Para("train/train.json not available.")]
    summary = [
        ["Optimizer steps", f"{train.steps:,} of {train.total_steps:,}"],
        ["Epochs", _num(train.epochs, 2)],
        ["Final loss", _num(train.final_loss, 4)],
        ["Tokens trained on", f"{train.train_tokens:,}"],
        ["Throughput (tokens/s)", _num(train.tokens_per_second, 0)],
        ["Device", train.device],
    ]
    if train.resumed_from_step is not None:
        summary.append(["Resumed from step", str(train.resumed_from_step)])
    if train.validation_loss is not None:
        summary += [
            ["Validation loss (last)", _num(train.validation_loss, 4)],
            [
                "Best validation loss",
                f"{_num(train.best_validation_loss, 4)} at step {train.best_step}",
            ],
            ["Model saved from step", str(train.model_step or train.steps)],
            ["Stopped early", "yes" if train.stopped_early else "no"],
        ]
    blocks.append(Table(["", ""], summary))
    if train.checkpoints:
        blocks.append(Heading(3, "Checkpoints"))
        blocks.append(
            Table(
                ["Step", "Training loss", "Validation loss", "Best", "URI"],
                [
                    [
                        str(c.step),
                        _num(c.loss, 4),
                        _num(c.validation_loss, 4),
                        "yes" if c.best else "",
                        c.uri,
                    ]
                    for c in train.checkpoints
                ],
            )
        )
    blocks.append(Heading(3, "Hyperparameters (resolved)"))
    if train.config:
        blocks.append(Table(["Setting", "Value"], _flatten(train.config)))
    else:
        blocks.append(Para("train.json records no resolved configuration."))
    blocks.append(Heading(3, "Loss curve"))
    if png is None:
        blocks.append(Para("train/metrics.jsonl has no loss values to plot."))
    else:
        curves = (
            "training loss" if train.validation_loss is None else "training and validation loss"
        )
        blocks.append(Image(f"{curves} per optimizer step", "loss.png", png))
    return blocks


def _of_total(count: int | None, total: int | None) -> str:
    if total is None or count is None or count >= total:
        return f"{count or 0:,}"
    return f"{count:,} of {total:,}"


def _precision(result: EvaluateResult) -> list[Block]:
    """Which arithmetic scored the models (bf16 moves perplexity in its fourth digit)."""
    if result.precision is None:  # a result written before evaluation.precision
        return []
    how = "bf16 autocast" if result.precision == "bf16" else "fp32"
    return [Para(f"Every model here was scored in {how} (evaluation.precision).")]


def _scored_lines(result: EvaluateResult, unit: str = "lines") -> str:
    """ "all 4,596 test lines", or "500 of 4,596 test lines" when evaluation.maxSamples caps it."""
    scored, total = result.fine_tuned.perplexity_lines, result.test_lines
    if scored is None or total is None:
        return "the test split"
    if scored >= total:
        return f"all {total:,} test {unit}"
    return f"{scored:,} of {total:,} test {unit} (evaluation.maxSamples)"


def _clip(text: str, limit: int = ANSWER_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _answer_samples(rows: list[dict[str, Any]], result: EvaluateResult) -> list[Block]:
    """promptCompletion/chat: prompts, reference answers and each model's answer."""
    if not rows:
        return []
    has_baseline = result.baseline is not None
    endpoints = [c.name for c in result.comparisons]
    header = ["Prompt", "Reference", "Fine-tuned"] + (["Baseline"] if has_baseline else [])
    header += endpoints
    table = []
    for r in rows[:SAMPLES_SHOWN]:
        others = r.get("comparisons")
        others = others if isinstance(others, dict) else {}
        cells = [
            str(r.get("prompt", "")),
            str(r.get("reference", "")),
            str(r.get("fine_tuned", "")),
        ]
        if has_baseline:
            cells.append(str(r.get("baseline", "")))
        cells += [str(others.get(name, "")) for name in endpoints]
        table.append([_clip(c) for c in cells])
    return [
        Heading(2, "Sample answers"),
        Para(
            f"The first {len(table)} held-out prompts (the last user turn), their reference "
            f"answers and each model's answer; longer texts are cut at {ANSWER_CHARS} "
            "characters here, not in the scoring."
        ),
        Table(header, table),
    ]


def _samples(rows: list[dict[str, Any]], has_baseline: bool) -> list[Block]:
    if not rows:
        return []
    header = ["Prompt", "Reference", "Fine-tuned"] + (["Baseline"] if has_baseline else [])
    table = [
        [str(r.get("prompt", "")), str(r.get("reference", "")), str(r.get("fine_tuned", ""))]
        + ([str(r.get("baseline", ""))] if has_baseline else [])
        for r in rows[:SAMPLES_SHOWN]
    ]
    return [Heading(2, "Sample generations"), Table(header, table)]


def _timings(
    prepare: PrepareResult | None, train: TrainResult | None, result: EvaluateResult
) -> list[Block]:
    rows = [
        [name, _num(obj.seconds, 1) if obj else "n/a"]
        for name, obj in (("prepare", prepare), ("train", train), ("evaluate", result))
    ]
    return [Heading(2, "Timings"), Table(["Stage", "Seconds"], rows)]


def build_blocks(
    ctx: StageContext,
    result: EvaluateResult,
    prepare: PrepareResult | None,
    train: TrainResult | None,
    samples: list[dict[str, Any]],
    png: bytes | None,
) -> list[Block]:
    return [
        *_header(ctx),
        *_results(ctx, result),
        *_promotion(result),
        *(
            _answer_samples(samples, result)
            if result.is_instruction
            else _samples(samples, result.baseline is not None)
        ),
        *_dataset(prepare),
        *_training(train, png),
        *_timings(prepare, train, result),
    ]


def run(ctx: StageContext) -> ReportResult:
    """Write loss.png, report.md and report.html, then report.json."""
    raw = _read_json(ctx, RunLayout.EVAL_RESULT)
    if raw is None:
        raise StageError(
            f"{ctx.storage.uri(RunLayout.EVAL_RESULT)}: missing or unreadable; run "
            "the evaluate stage first"
        )
    result = EvaluateResult.model_validate(raw)
    prepare_raw = _read_json(ctx, RunLayout.PREPARE_RESULT)
    train_raw = _read_json(ctx, RunLayout.TRAIN_RESULT)
    prepare = PrepareResult.model_validate(prepare_raw) if prepare_raw else None
    train = TrainResult.model_validate(train_raw) if train_raw else None
    png = loss_curve_png(_read_jsonl(ctx, RunLayout.TRAIN_METRICS))
    samples = _read_jsonl(ctx, RunLayout.EVAL_SAMPLES)

    blocks = build_blocks(ctx, result, prepare, train, samples, png)
    loss_uri = None
    if png is not None:
        ctx.storage.write_bytes(RunLayout.LOSS_PNG, png)
        loss_uri = ctx.storage.uri(RunLayout.LOSS_PNG)
    ctx.storage.write_text(RunLayout.REPORT_MD, render_markdown(blocks))
    title = f"Fine-tune report: {ctx.job.metadata.name}"
    ctx.storage.write_text(RunLayout.REPORT_HTML, render_html(blocks, title))
    report = ReportResult(
        run=ctx.run_identity,
        markdown_uri=ctx.storage.uri(RunLayout.REPORT_MD),
        html_uri=ctx.storage.uri(RunLayout.REPORT_HTML),
        loss_curve_uri=loss_uri,
    )
    ctx.storage.write_text(RunLayout.REPORT_RESULT, report.to_json())
    return report
