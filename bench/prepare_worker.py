"""One prepare run in its own process, so the parent can read this process's peak RSS.

    python -m bench.prepare_worker --side kubetune|baseline --corpus rows.tsv \
        --lines N --tokenizer DIR --out DIR --result result.json [--threads T]

``kubetune`` calls the stage's storage-free core, ``prepare_lines``; ``baseline`` is the
plain loop a course notebook would write: clean a line, check a set of strings, pick a
split with ``random``, call the tokenizer on that one line, keep everything in lists,
dump JSON at the end. Both read the same rows and use the same cleaning rules and
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
    parser.add_argument("--side", choices=["kubetune", "baseline"], required=True)
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
    run = _kubetune if args.side == "kubetune" else _baseline
    stats = run(rows, tokenizer, args.out, seed=42, test_fraction=0.1)
    seconds = time.perf_counter() - start
    stats.update(seconds=seconds, lines_per_s=stats["lines"] / seconds, side=args.side)
    args.result.write_text(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
