"""Champion vs challenger: promote a fine-tuned model to the serving prefix only when it is better.

``spec.promotion.target`` is the prefix serving reads from::

    <target>/
      versions/v0001/      save_pretrained() model + tokenizer, promotion.json
      versions/v0002/      ...
      current.json         the version in use (a copy of its promotion.json), written last

A reader takes ``current.json`` and loads ``modelUri``: because the pointer is written only
after every file of the version is uploaded, it never sees a half-written model. Each
version's record names the ``previous`` one, so :func:`rollback` can point back.

The evaluate stage scores the current champion on the run's own test split next to the new
model and its baseline, then::

    decision = decide(new_scores, baseline_scores, champion, champion_scores, spec.promotion)
    if decision.promote:
        record = publish(target, model_dir, decision, run=ctx.run_identity, source=model_uri)

By hand: ``kubetune promote --job job.yaml`` (the run's model, by the same rule, or
``--force``) and ``kubetune rollback --target URI``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune.contract import StageError
from kubetune.layout import RunLayout, join_uri
from kubetune.schema import PromotionSpec, PromotionStatus, Reason
from kubetune.storage import Storage, StorageError

POINTER = "current.json"
VERSIONS = "versions"
RECORD = "promotion.json"
_VERSION = re.compile(r"^v(\d+)$")


class VersionRecord(BaseModel):
    """``versions/<v>/promotion.json`` and, for the version in use, ``current.json``."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    version: str
    model_uri: str
    previous: str | None = None
    perplexity: float | None = None
    bleu: float | None = None
    source: str | None = Field(None, description="the run's model it was copied from")
    run: dict[str, Any] | None = Field(None, description="the run that produced it")
    promoted_at: str | None = None
    rolled_back_from: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2)


@dataclass(frozen=True)
class Scores:
    """What the rule compares: test perplexity and, optionally, BLEU."""

    perplexity: float | None
    bleu: float | None = None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: Reason
    message: str


def version_key(version: str) -> str:
    return f"{VERSIONS}/{version}"


def read_current(target: Storage) -> VersionRecord | None:
    """The version in use, or None before the first promotion."""
    if not target.exists(POINTER):
        return None
    try:
        return VersionRecord.model_validate_json(target.read_text(POINTER))
    except ValueError as exc:
        raise StageError(
            f"{target.uri(POINTER)} is not a kubetune promotion record ({exc}); fix or remove it",
            Reason.INVALID_SPEC,
        ) from None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def decide(
    new: Scores,
    baseline: Scores | None,
    champion: VersionRecord | None,
    champion_scores: Scores | None,
    spec: PromotionSpec,
) -> Decision:
    """Promote when ``new`` beats the baseline and the champion by the spec's margins."""
    if new.perplexity is None:
        return Decision(False, Reason.NOT_BETTER, "no test perplexity for the new model")
    factor = 1.0 - spec.min_improvement
    rivals: list[tuple[str, Scores]] = []
    if baseline is not None and baseline.perplexity is not None:
        rivals.append(("the baseline", baseline))
    if champion is not None and champion_scores is not None:
        rivals.append((f"champion {champion.version}", champion_scores))
    misses, wins = [], []
    for name, rival in rivals:
        assert rival.perplexity is not None
        bound = rival.perplexity * factor
        part = f"perplexity {_fmt(new.perplexity)} vs {_fmt(rival.perplexity)} of {name}"
        if new.perplexity >= bound:
            misses.append(f"{part} (needs < {_fmt(bound)})")
        else:
            wins.append(part)
        if spec.min_bleu_improvement is not None:
            need = (rival.bleu or 0.0) + spec.min_bleu_improvement
            bleu_part = f"BLEU {_fmt(new.bleu)} vs {_fmt(rival.bleu)} of {name}"
            if new.bleu is None or new.bleu < need:
                misses.append(f"{bleu_part} (needs >= {_fmt(need)})")
            else:
                wins.append(bleu_part)
    if misses:
        return Decision(False, Reason.NOT_BETTER, "not promoted: " + "; ".join(misses))
    if not rivals:
        return Decision(True, Reason.PROMOTED, "promoted: the first model, nothing to beat")
    return Decision(True, Reason.PROMOTED, "promoted: " + "; ".join(wins))


def _next_version(target: Storage, current: VersionRecord | None) -> str:
    numbers = [0]
    for key in target.list(VERSIONS):
        match = _VERSION.match(key.split("/")[1]) if key.count("/") >= 1 else None
        if match:
            numbers.append(int(match.group(1)))
    if current is not None and (match := _VERSION.match(current.version)):
        numbers.append(int(match.group(1)))
    return f"v{max(numbers) + 1:04d}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def publish(
    target: Storage,
    model_dir: Path,
    new: Scores,
    *,
    run: dict[str, Any] | None = None,
    source: str | None = None,
) -> VersionRecord:
    """Upload ``model_dir`` as the next version, then point ``current.json`` at it (last)."""
    current = read_current(target)
    version = _next_version(target, current)
    prefix = version_key(version)
    try:
        target.upload_dir(model_dir, prefix)
        record = VersionRecord(
            version=version,
            model_uri=target.uri(prefix),
            previous=current.version if current else None,
            perplexity=new.perplexity,
            bleu=new.bleu,
            source=source,
            run=run,
            promoted_at=_now(),
        )
        target.write_text(f"{prefix}/{RECORD}", record.to_json())
        target.write_text(POINTER, record.to_json())
    except StorageError as exc:
        raise StageError(
            f"promotion to {target.uri('')} failed: {exc}; the current version is unchanged "
            f"({current.version if current else 'none'})",
            Reason.PROMOTION_FAILED,
        ) from None
    return record


def rollback(target: Storage) -> VersionRecord:
    """Point ``current.json`` back at the version before the current one."""
    current = read_current(target)
    if current is None:
        raise StageError(f"{target.uri(POINTER)}: nothing promoted yet, nothing to roll back")
    if current.previous is None:
        raise StageError(
            f"{target.uri(POINTER)}: version {current.version} has no previous version to roll "
            "back to"
        )
    key = f"{version_key(current.previous)}/{RECORD}"
    try:
        previous = VersionRecord.model_validate_json(target.read_text(key))
    except StorageError as exc:
        raise StageError(f"cannot roll back: {exc}") from None
    rolled = previous.model_copy(update={"rolled_back_from": current.version})
    target.write_text(POINTER, rolled.to_json())
    return rolled


def status_of(
    decision: Decision,
    record: VersionRecord | None,
    current: VersionRecord | None,
    champion_scores: Scores | None,
) -> PromotionStatus:
    """The status.promotion the operator shows for this decision."""
    in_use = record or current
    return PromotionStatus(
        promoted=decision.promote and record is not None,
        reason=decision.reason.value,
        message=decision.message,
        version=in_use.version if in_use else None,
        previous=record.previous if record else (current.previous if current else None),
        model_uri=in_use.model_uri if in_use else None,
        champion_perplexity=champion_scores.perplexity if champion_scores else None,
    )


def champion_uri(target_uri: str, record: VersionRecord) -> str:
    """Where a champion's files are (its record's modelUri, else under the target)."""
    return record.model_uri or join_uri(target_uri, version_key(record.version))


def promote_by_hand(ctx: Any, *, force: bool = False) -> tuple[Decision, VersionRecord | None]:
    """``kubetune promote``: the run's model to ``spec.promotion.target``, by the same rule.

    The rule uses the scores of the run's ``eval/evaluate.json``: its model, its baseline
    and the champion it was compared with, which must still be the version in use (else the
    run would be judged against a model it never met: evaluate again, or ``force``).
    ``force`` publishes whatever the numbers say.
    """
    from kubetune.results import EvaluateResult

    spec = ctx.job.spec.promotion
    if spec is None:
        raise StageError("the job has no spec.promotion.target to promote to", Reason.INVALID_SPEC)
    try:
        evaluated = EvaluateResult.model_validate_json(ctx.storage.read_text(RunLayout.EVAL_RESULT))
    except StorageError as exc:
        raise StageError(f"{exc}; run the evaluate stage first") from None
    target = ctx.open(spec.target)
    current = read_current(target)
    new = Scores(evaluated.fine_tuned.perplexity, evaluated.fine_tuned.bleu)
    if force:
        decision = Decision(True, Reason.PROMOTED, "promoted by hand (--force)")
    else:
        base = evaluated.baseline
        judged = evaluated.promotion.version if evaluated.promotion else None
        if current is not None and (evaluated.champion is None or judged != current.version):
            raise StageError(
                f"the version in use is {current.version}, but this run was compared with "
                f"{judged or 'no champion'}; run the evaluate stage again to score it against "
                f"{current.version}, or promote with --force",
                Reason.INVALID_SPEC,
            )
        champion_scores = (
            Scores(evaluated.champion.perplexity, evaluated.champion.bleu)
            if evaluated.champion is not None and current is not None
            else None
        )
        decision = decide(
            new,
            Scores(base.perplexity, base.bleu) if base else None,
            current,
            champion_scores,
            spec,
        )
        if not decision.promote:
            return decision, None
    model_dir = ctx.scratch / "promote-model"
    model_dir.mkdir(parents=True, exist_ok=True)
    ctx.storage.download_dir(RunLayout.MODEL, model_dir)
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        ctx.storage.download_dir(RunLayout.TOKENIZER, model_dir)
    record = publish(
        target,
        model_dir,
        new,
        run=ctx.run_identity.to_wire(),
        source=ctx.storage.uri(RunLayout.MODEL),
    )
    return decision, record
