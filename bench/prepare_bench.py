"""Benchmark 3, prepare: clean + dedup + split + tokenize, kubetune vs a plain per-line loop.

Each side runs in a child process (``bench.prepare_worker``) and the parent reads that
child's own peak RSS from ``os.wait4`` (``ru_maxrss``), so the parent's memory never
counts. The corpus is the tldr pages repeated with variations (``bench.data``), written
to scratch first so both sides stream the same rows from disk.

Figures: ``prepare_lines_per_s`` and ``prepare_peak_rss_mb`` (kubetune on the full line
count: 1,000,000 in --full, 200,000 in --quick), ``prepare_speedup`` (kubetune vs the
baseline on the same first ``baseline_lines`` lines: the baseline is too slow for the
full count).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.assets import bench_tokenizer, scratch_root
from bench.common import REPO_ROOT, Figure
from bench.data import write_corpus


def run_worker(
    side: str, corpus: Path, lines: int, tokenizer: Path, threads: int
) -> dict[str, Any]:
    """Run one side in a child; its result JSON plus ``peak_rss_mb`` and ``wall_s``."""
    work = scratch_root() / f"prepare-{side}-{lines}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result = work / "result.json"
    argv = [
        sys.executable,
        "-m",
        "bench.prepare_worker",
        "--side",
        side,
        "--corpus",
        str(corpus),
        "--lines",
        str(lines),
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(work / "out"),
        "--result",
        str(result),
        "--threads",
        str(threads),
    ]
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(REPO_ROOT / "trainer"), str(REPO_ROOT / "operator")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"prepare worker ({side}, {lines} lines) exited {proc.returncode}")
    stats: dict[str, Any] = json.loads(result.read_text())
    stats["peak_rss_mb"] = usage.ru_maxrss / 1024.0  # Linux reports KiB
    stats["wall_s"] = wall
    shutil.rmtree(work, ignore_errors=True)
    return stats


def run(quick: bool, threads: int) -> tuple[list[Figure], dict[str, Any]]:
    lines = 200_000 if quick else 1_000_000
    baseline_lines = 30_000 if quick else 100_000
    tokenizer = bench_tokenizer()
    corpus = write_corpus(scratch_root() / f"corpus-{lines}.tsv", lines)
    try:
        big = run_worker("kubetune", corpus, lines, tokenizer, threads)
        small = run_worker("kubetune", corpus, baseline_lines, tokenizer, threads)
        base = run_worker("baseline", corpus, baseline_lines, tokenizer, threads)
    finally:
        corpus.unlink(missing_ok=True)
    speedup = small["lines_per_s"] / base["lines_per_s"]
    figures = [
        Figure(
            "prepare_lines_per_s",
            big["lines_per_s"],
            "lines/s",
            None,
            f"kubetune prepare_lines on {lines:,} lines (tldr x variations)",
        ),
        Figure(
            "prepare_peak_rss_mb",
            big["peak_rss_mb"],
            "MiB",
            "< 2048",
            f"child process peak RSS, {lines:,} lines",
        ),
        Figure(
            "prepare_baseline_lines_per_s",
            base["lines_per_s"],
            "lines/s",
            None,
            f"per-line loop on the first {baseline_lines:,} lines",
        ),
        Figure(
            "prepare_speedup",
            speedup,
            "x",
            ">= 5",
            f"same first {baseline_lines:,} lines both sides; kubetune with "
            f"{small.get('workers', 1)} worker process(es), baseline one process",
        ),
        Figure(
            "prepare_baseline_peak_rss_mb",
            base["peak_rss_mb"],
            "MiB",
            None,
            f"per-line loop, {baseline_lines:,} lines",
        ),
    ]
    return figures, {"kubetune_full": big, "kubetune_subset": small, "baseline_subset": base}
