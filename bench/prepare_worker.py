"""One prepare run in its own process, so the parent can read this process's peak RSS.

    python -m bench.prepare_worker --side kubetune|baseline|datasets --corpus rows.tsv \
        --lines N --tokenizer DIR --out DIR --result result.json [--threads T]

``kubetune`` calls the stage's storage-free core, ``prepare_lines``; ``baseline`` is the
plain loop a course notebook would write: clean a line, check a set of strings, pick a
split with ``random``, call the tokenizer on that one line, keep everything in lists,
dump JSON at the end; ``datasets`` is what a user who cares about speed writes with
Hugging Face ``datasets`` (``map(batched=True, num_proc=2)`` to clean and to tokenize).
All read the same rows and use the same cleaning rules and
tokenizer, so the difference is the data path (streaming, hashed dedup, batched Rust
tokenization), not the amount of work.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import Any


def _baseline(
    rows: Any, tokenizer: Any, out: Path, seed: int, test_fraction: float
) -> dict[str, Any]:
    import numpy as np

    from kubetune.schema import CleanSpec
    from kubetune_trainer.cleaning import Cleaner

    cleaner = Cleaner(CleanSpec())
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    lines = 0
    for doc, raw in rows:
        lines += 1
        text = cleaner.clean_line(raw)
        if text is None or text in seen:
            continue
        seen.add(text)
        ids = tokenizer(text)["input_ids"]
        split = "test" if rng.random() < test_fraction else "train"
        splits[split].append({"text": text, "doc": doc, "ids": ids})
    out.mkdir(parents=True, exist_ok=True)
    tokens = {}
    for name, records in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps({"text": r["text"], "doc": r["doc"]}) + "\n")
        flat = [t for r in records for t in r["ids"]]
        np.save(out / f"{name}.tokens.npy", np.array(flat, dtype=np.uint32))
        tokens[name] = len(flat)
    return {
        "lines": lines,
        "train_lines": len(splits["train"]),
        "test_lines": len(splits["test"]),
        "train_tokens": tokens["train"],
        "test_tokens": tokens["test"],
    }


def _datasets(
    rows: Any, tokenizer: Any, out: Path, seed: int, test_fraction: float
) -> dict[str, Any]:
    """What a user writes with Hugging Face ``datasets``: ``map(batched=True, num_proc=2)``.

    Clean in a batched map (2 processes), drop exact duplicates with a set in the main
    process (a set cannot be shared by map's workers), ``train_test_split``, tokenize in
    a batched map (2 processes), write JSONL and the flat token arrays.
    """
    import numpy as np
    from datasets import Dataset

    from kubetune.schema import CleanSpec
    from kubetune_trainer.cleaning import Cleaner

    cleaner = Cleaner(CleanSpec())
    docs: list[str] = []
    texts: list[str] = []
    for doc, raw in rows:
        docs.append(doc)
        texts.append(raw)
    lines = len(texts)
    dataset = Dataset.from_dict({"doc": docs, "text": texts})
    del docs, texts

    def clean(batch: dict[str, list[str]]) -> dict[str, list[str]]:
        kept: dict[str, list[str]] = {"doc": [], "text": []}
        for doc, raw in zip(batch["doc"], batch["text"], strict=True):
            text = cleaner.clean_line(raw)
            if text is not None:
                kept["doc"].append(doc)
                kept["text"].append(text)
        return kept

    cleaned = dataset.map(clean, batched=True, num_proc=2, remove_columns=["doc", "text"])
    seen: set[str] = set()
    keep: list[int] = []
    for i, text in enumerate(cleaned["text"]):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    del seen
    splits = cleaned.select(keep).train_test_split(test_size=test_fraction, seed=seed)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, Any]:
        return {"input_ids": tokenizer(batch["text"])["input_ids"]}

    tokenized = splits.map(tokenize, batched=True, num_proc=2)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name, part in tokenized.items():
        part.select_columns(["text", "doc"]).to_json(str(out / f"{name}.jsonl"))
        flat = np.fromiter(itertools.chain.from_iterable(part["input_ids"]), dtype=np.uint32)
        np.save(out / f"{name}.tokens.npy", flat)
        counts[name] = len(flat)
    return {
        "lines": lines,
        "train_lines": len(tokenized["train"]),
        "test_lines": len(tokenized["test"]),
        "train_tokens": counts["train"],
        "test_tokens": counts["test"],
        "workers": 2,
    }


def _kubetune(
    rows: Any, tokenizer: Any, out: Path, seed: int, test_fraction: float
) -> dict[str, Any]:
    from kubetune.schema import CleanSpec, SplitSpec
    from kubetune_trainer.prepare import prepare_lines, prepare_workers

    prepared = prepare_lines(
        rows,
        CleanSpec(),
        SplitSpec(test_fraction=test_fraction, seed=seed),
        tokenizer,
        out,
        source="bench corpus",
    )
    s = prepared.stats
    return {
        "lines": s.lines,
        "train_lines": s.train_lines,
        "test_lines": s.test_lines,
        "train_tokens": s.train_tokens,
        "test_tokens": s.test_tokens,
        "duplicates_removed": s.duplicates_removed,
        "workers": prepare_workers(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", choices=["kubetune", "baseline", "datasets"], required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--lines", type=int, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        # The Rust tokenizer's batch call uses its own thread pool: cap it like torch's.
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    from transformers import AutoTokenizer

    from bench.data import read_corpus

    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    rows = itertools.islice(read_corpus(args.corpus), args.lines)
    start = time.perf_counter()
    run = {"kubetune": _kubetune, "baseline": _baseline, "datasets": _datasets}[args.side]
    stats = run(rows, tokenizer, args.out, seed=42, test_fraction=0.1)
    seconds = time.perf_counter() - start
    stats.update(seconds=seconds, lines_per_s=stats["lines"] / seconds, side=args.side)
    args.result.write_text(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
