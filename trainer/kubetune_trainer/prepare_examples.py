"""Prepare for ``dataset.kind`` promptCompletion and chat: records -> examples -> split -> tokens.

The prepare stage calls :func:`prepare_examples` instead of the line pipeline when the
dataset holds instruction examples::

    out = prepare_examples(source.records(), job.spec.dataset, tokenizer, out_dir,
                           max_tokens=job.spec.training.max_seq_length - 2)
    out.stats.bad_records, out.stats.overlap_removed

Steps, each streaming over the records or the rows written so far:

1. Each record becomes an :class:`~kubetune_trainer.examples.Example` or counts as bad
   (per cause). Exact or normalized dedup on the whole rendered text. The split is
   decided by a keyed hash of the seed and the example's group (``split.groupBy``'s
   value, so every record of one group lands on one side), or of its text without a
   group. Train rows go to ``train.jsonl``-to-be, test rows to the candidates.
2. Too many bad records (``dataset.maxBadFraction``) or an empty split fails here,
   naming the causes.
3. The tokenizer: the model's, or for ``model.fresh`` a byte-level BPE trained on the
   training examples' text. Each example is tokenized segment by segment with its loss
   mask; examples that cannot fit a training row (``training.maxSeqLength`` with the
   start and end tokens) are bad (``overLong``) and dropped, in both splits.
4. The test split: the candidates whose prompt or answer is also in training, exactly or
   ignoring case and spacing, are removed (``overlapRemoved``), so no test prompt and no
   test answer was seen in training (``promptOverlap``/``answerOverlap``: 0).
5. Statistics, with each test example's twins in training (on the rendered text).

The files are :mod:`kubetune.dataset_format`'s, with the loss mask and example rows.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.contract import StageError
from kubetune.dataset_format import (
    TEST,
    TRAIN,
    ExampleRow,
    JsonlWriter,
    TokenWriter,
    split_files,
)
from kubetune.schema import DatasetKind, DatasetSpec, DatasetStats, DedupMode, Reason, TwinCounts
from kubetune_trainer.cleaning import seed_key, text_hash
from kubetune_trainer.examples import BadRecord, Example, ExampleBuilder, tokenize_examples
from kubetune_trainer.near_dup import TwinCounter, normalize_for_match

log = logging.getLogger(__name__)

_U64 = 1 << 64
BATCH = 512  # examples tokenized per call
_TRAIN_ROWS = ".train.examples.jsonl"
_TEST_ROWS = ".test.examples.jsonl"


@dataclass
class PreparedExamples:
    """What :func:`prepare_examples` wrote to ``out_dir`` and what it counted."""

    stats: DatasetStats
    tokenizer: Any
    out_dir: Path
    train_sha256: str
    test_sha256: str
    answer_end: str  # the template's text after an answer (evaluation cuts answers there)
    seconds: float


def match_key(text: str) -> str:
    """A prompt or answer as the overlap check compares it: lower case, spacing collapsed."""
    return " ".join(text.lower().split())


class _Staged:
    """Step 1's output for one split: examples as JSON rows in a hidden file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.count = 0
        self.groups: set[str] = set()

    def add(self, example: Example) -> None:
        row = {
            "segments": example.segments,
            "prompt": example.prompt,
            "answer": example.answer,
            "group": example.group,
            "messages": example.messages,
        }
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.count += 1
        self.groups.add(example.group)

    def close(self) -> None:
        self._fh.close()

    def read(self) -> Iterator[Example]:
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                messages = row["messages"]
                yield Example(
                    tuple((text, bool(answer)) for text, answer in row["segments"]),
                    row["prompt"],
                    row["answer"],
                    row["group"],
                    tuple(messages) if messages is not None else None,
                )


def _route(
    records: Iterable[tuple[str, dict[str, Any]]],
    builder: ExampleBuilder,
    spec: DatasetSpec,
    out_dir: Path,
    bad: Counter[str],
) -> tuple[_Staged, _Staged, int, int]:
    """Step 1: build, dedup and split every record; returns (train, test, records, dups)."""
    key = seed_key(spec.split.seed)
    threshold = int(spec.split.test_fraction * _U64)
    dedup = spec.clean.dedup != DedupMode.NONE
    normalized = spec.clean.dedup == DedupMode.NORMALIZED
    seen: set[int] = set()
    train, test = _Staged(out_dir / _TRAIN_ROWS), _Staged(out_dir / _TEST_ROWS)
    count = duplicates = 0
    first_bad: dict[str, str] = {}
    try:
        for record_id, record in records:
            count += 1
            try:
                example = builder.build(record, record_id)
            except BadRecord as exc:
                bad[exc.cause] += 1
                first_bad.setdefault(exc.cause, f"{record_id}: {exc.detail}")
                continue
            text = example.text
            h = text_hash(normalize_for_match(text) if normalized else text, key)
            if dedup:
                if h in seen:
                    duplicates += 1
                    continue
                seen.add(h)
            if spec.split.group_by is not None:
                in_test = (text_hash(example.group, key) >> 64) < threshold
            else:
                in_test = (h >> 64) < threshold
            (test if in_test else train).add(example)
    finally:
        train.close()
        test.close()
    for cause, where in first_bad.items():
        log.warning("prepare: %d bad records (%s), first: %s", bad[cause], cause, where)
    return train, test, count, duplicates


def _too_many_bad(bad: Counter[str], records: int, spec: DatasetSpec, source: str) -> None:
    """Step 2: fail when more than ``maxBadFraction`` of the records are bad."""
    total_bad = sum(bad.values())
    if records and total_bad <= spec.max_bad_fraction * records:
        return
    causes = ", ".join(f"{n} {cause}" for cause, n in bad.most_common()) or "no records"
    if DatasetKind(spec.kind).value == "chat":
        fields = f"dataset.messagesField ({spec.messages_field!r})"
    else:
        fields = (
            f"dataset.promptField ({spec.prompt_field!r}) and dataset.completionField "
            f"({spec.completion_field!r})"
        )
    if spec.split.group_by:
        fields += f" and dataset.split.groupBy ({spec.split.group_by!r})"
    raise StageError(
        f"{source}: {total_bad} of {records} records are bad ({causes}); more than "
        f"dataset.maxBadFraction={spec.max_bad_fraction}. Check dataset.kind "
        f"({DatasetKind(spec.kind).value}), {fields}, and the records themselves",
        Reason.DATASET_UNUSABLE,
    )


def _empty_split(which: str, spec: DatasetSpec, kept: int, source: str) -> StageError:
    unit = f"groups of {spec.split.group_by!r}" if spec.split.group_by else "examples"
    hint = (
        "raise dataset.split.testFraction or add data"
        if which == "test"
        else "lower dataset.split.testFraction or add data"
    )
    return StageError(
        f"the {which} split of {source} is empty ({kept} examples kept, split by {unit}, "
        f"testFraction={spec.split.test_fraction}, seed={spec.split.seed}); {hint}",
        Reason.DATASET_UNUSABLE,
    )


def _batches(examples: Iterable[Example]) -> Iterator[list[Example]]:
    batch: list[Example] = []
    for example in examples:
        batch.append(example)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _row(example: Example) -> ExampleRow:
    return ExampleRow(
        text=example.text,
        doc=example.group,
        prompt=example.prompt,
        answer=example.answer,
        messages=example.messages,
    )


@dataclass
class _Written:
    examples: int = 0
    tokens: int = 0
    sha256: str = ""
    groups: int = 0


def _write_split(
    staged: _Staged,
    split: str,
    tokenizer: Any,
    out_dir: Path,
    max_tokens: int,
    bad: Counter[str],
    keep: Any = None,
) -> _Written:
    """Tokenize ``staged`` into ``split``'s files; drops over-long examples (and ``keep``-False)."""
    rows = JsonlWriter(out_dir / split_files(split).text_name)
    tokens = TokenWriter(out_dir, split, masked=True)
    groups: set[str] = set()
    try:
        for batch in _batches(e for e in staged.read() if keep is None or keep(e)):
            encoded = tokenize_examples(tokenizer, batch)
            ids_out, masks_out = [], []
            for example, (ids, mask) in zip(batch, encoded, strict=True):
                if len(ids) > max_tokens or not any(mask):
                    bad["overLong"] += 1
                    continue
                rows.write_example(_row(example))
                groups.add(example.group)
                ids_out.append(ids)
                masks_out.append(mask)
            if ids_out:
                tokens.add(ids_out, masks_out)
    finally:
        sha = rows.close()
        tokens.close()
        staged.path.unlink(missing_ok=True)
    return _Written(rows.count, tokens.tokens, sha, len(groups))


def _fresh_tokenizer(fresh: Any, staged: _Staged) -> Any:
    from kubetune_trainer.tokenizer_build import train_bpe_tokenizer

    return train_bpe_tokenizer(
        (example.text for example in staged.read()),
        fresh.vocab_size,
        model_max_length=fresh.model_max_length,
        length=staged.count,
    )


def _leaks(out_dir: Path, train_prompts: set[int], train_answers: set[int]) -> Counter[str]:
    """Re-read the written splits: test prompts, answers and groups also in training.

    Step 4 removed such examples, so these are 0; counted from the files as written, not
    assumed, and a group on both sides (split.groupBy) fails the stage.
    """
    leaks: Counter[str] = Counter(prompt=0, answer=0)
    train_groups = {row.doc for row in _rows(out_dir, TRAIN)}
    for row in _rows(out_dir, TEST):
        leaks["prompt"] += text_hash(match_key(row.prompt)) in train_prompts
        leaks["answer"] += text_hash(match_key(row.answer)) in train_answers
        leaks["group"] += row.doc in train_groups
    return leaks


def _rows(out_dir: Path, split: str) -> Iterator[ExampleRow]:
    with open(out_dir / split_files(split).text_name, encoding="utf-8") as fh:
        for line in fh:
            yield ExampleRow.from_row(json.loads(line))


def _twins(out_dir: Path, threshold: float) -> TwinCounts:
    counter = TwinCounter([row.text for row in _rows(out_dir, TEST)], threshold)
    counter.add_train_lines(row.text for row in _rows(out_dir, TRAIN))
    twins = counter.counts()
    return TwinCounts(
        exact=twins["exact"],
        normalized=twins["normalized"],
        letters_digits=twins["lettersDigits"],
        near=twins["near"],
    )


def prepare_examples(
    records: Iterable[tuple[str, dict[str, Any]]],
    spec: DatasetSpec,
    tokenizer: Any,
    out_dir: Path,
    *,
    max_tokens: int,
    source: str = "the dataset",
    template_vars: dict[str, str] | None = None,
) -> PreparedExamples:
    """Clean, dedup, split (by group) and tokenize instruction records into ``out_dir``.

    ``tokenizer`` is a loaded tokenizer, or a :class:`~kubetune_trainer.prepare.FreshTokenizer`
    to train one on the training examples. ``max_tokens``: the most ids an example may
    have (the training row less its start and end tokens).
    """
    from kubetune_trainer.prepare import FreshTokenizer

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh = isinstance(tokenizer, FreshTokenizer)
    own_template = None if fresh else getattr(tokenizer, "chat_template", None)
    variables = dict(template_vars or {})
    if not fresh:
        variables.setdefault("bos_token", str(tokenizer.bos_token or ""))
        variables.setdefault("eos_token", str(tokenizer.eos_token or ""))
    builder = ExampleBuilder(
        spec, template=own_template if isinstance(own_template, str) else None, **variables
    )
    bad: Counter[str] = Counter()
    train, test, records_read, duplicates = _route(records, builder, spec, out_dir, bad)
    _too_many_bad(bad, records_read, spec, source)
    if train.count == 0:
        raise _empty_split("train", spec, train.count + test.count, source)
    if test.count == 0:
        raise _empty_split("test", spec, train.count + test.count, source)
    if fresh:
        tokenizer = _fresh_tokenizer(tokenizer, train)
    answer_end = next(iter(train.read())).answer_end.strip()

    # The overlap check needs the training side's keys, which it collects as train is written.
    train_prompts: set[int] = set()
    train_answers: set[int] = set()

    def remember(example: Example) -> bool:
        train_prompts.add(text_hash(match_key(example.prompt)))
        train_answers.add(text_hash(match_key(example.answer)))
        return True

    train_out = _write_split(train, TRAIN, tokenizer, out_dir, max_tokens, bad, keep=remember)
    removed = Counter[str]()

    def unseen(example: Example) -> bool:
        if text_hash(match_key(example.prompt)) in train_prompts:
            removed["prompt"] += 1
            return False
        if text_hash(match_key(example.answer)) in train_answers:
            removed["answer"] += 1
            return False
        return True

    test_out = _write_split(test, TEST, tokenizer, out_dir, max_tokens, bad, keep=unseen)
    if removed:
        log.info(
            "prepare: removed %d test examples whose prompt and %d whose answer is in training",
            removed["prompt"],
            removed["answer"],
        )
    _too_many_bad(bad, records_read, spec, source)
    if train_out.examples == 0:
        raise _empty_split("train", spec, test_out.examples, source)
    if test_out.examples == 0:
        raise _empty_split("test", spec, train_out.examples, source)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    leaks = _leaks(out_dir, train_prompts, train_answers)
    twins = _twins(out_dir, spec.clean.near_duplicate_threshold)
    grouped = spec.split.group_by is not None
    if grouped and leaks["group"]:
        raise StageError(
            f"{leaks['group']} test examples share a split.groupBy value with training; this "
            "is a bug in kubetune's split, please report it",
            Reason.DATASET_UNUSABLE,
        )
    kept = train_out.examples + test_out.examples
    stats = DatasetStats(
        kind=DatasetKind(spec.kind).value,
        documents=records_read,
        records=records_read,
        lines=records_read,
        kept_lines=kept,
        dropped_short=bad["tooShort"] + bad["tooLong"],
        duplicates_removed=duplicates,
        bad_records={cause: n for cause, n in sorted(bad.items()) if n},
        train_lines=train_out.examples,
        test_lines=test_out.examples,
        train_tokens=train_out.tokens,
        test_tokens=test_out.tokens,
        train_groups=train_out.groups if grouped else None,
        test_groups=test_out.groups if grouped else None,
        overlap=twins.exact,
        prompt_overlap=leaks["prompt"],
        answer_overlap=leaks["answer"],
        overlap_removed=sum(removed.values()),
        test_twins=twins,
    )
    return PreparedExamples(
        stats=stats,
        tokenizer=tokenizer,
        out_dir=out_dir,
        train_sha256=train_out.sha256,
        test_sha256=test_out.sha256,
        answer_end=answer_end,
        seconds=time.perf_counter() - started,
    )
