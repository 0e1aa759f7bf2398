"""Local mode: ``kubetune run job.yaml`` runs prepare, train, evaluate and report in order.

No cluster, no S3: outputs go to ``spec.storage.output`` (``file://`` paths may
be relative to the current directory). It calls the very same stage functions
as the pods do (:func:`kubetune_trainer.stages.run_stage`) and stops at the
first failing stage with that stage's message.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from kubetune.contract import StageError
from kubetune.results import EvaluateResult, PrepareResult, ReportResult, TrainResult
from kubetune.schema import FineTuneJob
from kubetune_trainer.context import StageContext, make_context
from kubetune_trainer.stages import STAGE_ORDER, StageResult, Timer, run_stage


@dataclass
class LocalRun:
    """What a local run produced, stage by stage."""

    ctx: StageContext
    results: dict[str, StageResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    failed_stage: str | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.failed_stage is None


def run_local(
    job: FineTuneJob,
    *,
    output: str | None = None,
    stages: Sequence[str] = STAGE_ORDER,
    scratch: Path | None = None,
    show_progress: bool = True,
    log: TextIO | None = None,
) -> LocalRun:
    """Run ``stages`` of ``job`` in this process; never raises for a stage failure.

    The output is checked for writing before the first stage, and a scratch directory
    made for the run (no ``scratch``) is removed at the end.
    """
    log = log or sys.stderr  # looked up per call: a test may have replaced sys.stderr
    with make_context(job, output=output, scratch=scratch, show_progress=show_progress) as ctx:
        run = LocalRun(ctx=ctx)
        try:
            ctx.check_output_writable()
        except StageError as exc:
            run.failed_stage, run.error = (stages[0] if stages else STAGE_ORDER[0]), exc
            return run
        for stage in stages:
            print(f"==> {stage}: {job.metadata.name} -> {ctx.output}", file=log, flush=True)
            try:
                with Timer() as timer:
                    run.results[stage] = run_stage(stage, ctx)
            except Exception as exc:  # the summary reports it; the CLI maps it to an exit code
                run.failed_stage, run.error = stage, exc
                run.seconds[stage] = timer.seconds
                break
            run.seconds[stage] = timer.seconds
    return run


def _fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def summary_table(run: LocalRun) -> str:
    """The table ``kubetune run`` prints at the end."""
    rows: list[tuple[str, str]] = []
    prep = run.results.get("prepare")
    if isinstance(prep, PrepareResult):
        s = prep.stats
        unit = "examples" if s.records is not None else "lines"
        if s.records is not None:
            bad = ", ".join(f"{n:,} {cause}" for cause, n in (s.bad_records or {}).items())
            rows += [
                ("records read / kept", f"{_fmt(s.records)} / {_fmt(s.kept_lines)}"),
                ("bad records", bad or "0"),
            ]
        else:
            rows += [
                ("documents", _fmt(s.documents)),
                ("lines read / kept", f"{_fmt(s.lines)} / {_fmt(s.kept_lines)}"),
            ]
        rows += [
            ("duplicates removed", _fmt(s.duplicates_removed)),
            (f"train / test {unit}", f"{_fmt(s.train_lines)} / {_fmt(s.test_lines)}"),
            ("train / test tokens", f"{_fmt(s.train_tokens)} / {_fmt(s.test_tokens)}"),
            ("train/test overlap", _fmt(s.overlap)),
        ]
        if s.validation_lines is not None:
            rows.append((f"validation {unit} (from train)", _fmt(s.validation_lines)))
        if s.train_groups is not None:
            rows.append(("train / test groups", f"{_fmt(s.train_groups)} / {_fmt(s.test_groups)}"))
        if s.overlap_removed is not None:
            rows.append(
                (
                    "test prompts / answers in train",
                    f"{_fmt(s.prompt_overlap)} / {_fmt(s.answer_overlap)} "
                    f"({_fmt(s.overlap_removed)} examples removed)",
                )
            )
        if s.test_twins is not None:
            t = s.test_twins
            rows.append(
                (
                    "test lines with a twin in train",
                    f"{t.normalized:,} normalized, {t.letters_digits:,} letters/digits, "
                    f"{t.near:,} near",
                )
            )
    train = run.results.get("train")
    if isinstance(train, TrainResult):
        rows += [
            ("optimizer steps", _fmt(train.steps)),
            ("final train loss", _fmt(train.final_loss, 4)),
            ("train tokens/s", _fmt(train.tokens_per_second, 0)),
            *(
                [
                    (
                        "validation loss (best, step)",
                        f"{_fmt(train.best_validation_loss, 4)} at {train.best_step}",
                    )
                ]
                if train.best_validation_loss is not None
                else []
            ),
            ("model", train.model_uri),
        ]
    ev = run.results.get("evaluate")
    if isinstance(ev, EvaluateResult):
        base = ev.baseline
        rows += [
            (
                "perplexity lines scored",
                f"{_fmt(ev.fine_tuned.perplexity_lines)} of {_fmt(ev.test_lines)}",
            ),
            ("perplexity (fine-tuned)", _fmt(ev.fine_tuned.perplexity, 3)),
            ("perplexity (baseline)", _fmt(base.perplexity if base else None, 3)),
            ("BLEU (fine-tuned)", _fmt(ev.fine_tuned.bleu, 2)),
            ("BLEU (baseline)", _fmt(base.bleu if base else None, 2)),
        ]
        if ev.is_instruction:
            rows += [
                ("chrF (fine-tuned)", _fmt(ev.fine_tuned.chrf, 2)),
                ("chrF (baseline)", _fmt(base.chrf if base else None, 2)),
                ("exact match % (fine-tuned)", _fmt(ev.fine_tuned.exact_match, 2)),
                ("exact match % (baseline)", _fmt(base.exact_match if base else None, 2)),
            ]
        for comp in ev.comparisons:
            rows.append((f"BLEU ({comp.name})", _fmt(comp.bleu, 2)))
            if ev.is_instruction:
                rows.append((f"chrF ({comp.name})", _fmt(comp.chrf, 2)))
                rows.append((f"exact match % ({comp.name})", _fmt(comp.exact_match, 1)))
    rep = run.results.get("report")
    if isinstance(rep, ReportResult):
        rows.append(("report", rep.markdown_uri))
    for stage, secs in run.seconds.items():
        rows.append((f"{stage} time", f"{secs:.1f} s"))
    if run.failed_stage:
        rows.append(("FAILED", f"{run.failed_stage}: {run.error}"))
    width = max((len(k) for k, _ in rows), default=10)
    line = "-" * (width + 2 + max((len(v) for _, v in rows), default=10))
    body = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    title = f"kubetune run {run.ctx.job.metadata.name}: " + ("succeeded" if run.ok else "FAILED")
    return f"{title}\n{line}\n{body}\n{line}"
