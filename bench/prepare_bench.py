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


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of ``pid`` and all its descendants, MiB (0 if it is gone).

    A worker pool's forked processes share pages with their parent; PSS splits shared
    pages between the processes, so the sum is what the whole tree costs the machine.
    ``ru_maxrss`` (``peak_rss_mb``) is the largest single process only.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            continue
    return total / 2**20


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
    env["HF_DATASETS_CACHE"] = str(work / "hf-datasets-cache")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env)
    tree_peak = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, tree_pss_mb(proc.pid))
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"prepare worker ({side}, {lines} lines) exited {proc.returncode}")
    stats: dict[str, Any] = json.loads(result.read_text())
    stats["peak_rss_mb"] = usage.ru_maxrss / 1024.0  # Linux reports KiB
    stats["peak_tree_pss_mb"] = tree_peak
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
        hf = run_worker("datasets", corpus, lines, tokenizer, threads)
        small = run_worker("kubetune", corpus, baseline_lines, tokenizer, threads)
        base = run_worker("baseline", corpus, baseline_lines, tokenizer, threads)
    finally:
        corpus.unlink(missing_ok=True)
    speedup = small["lines_per_s"] / base["lines_per_s"]
    workers = big.get("workers", 1)
    figures = [
        Figure(
            "prepare_lines_per_s",
            big["lines_per_s"],
            "lines/s",
            None,
            f"kubetune prepare_lines on {lines:,} lines (tldr x variations), {workers} workers",
        ),
        Figure(
            "prepare_seconds",
            big["seconds"],
            "s",
            "< 60" if not quick else None,
            f"kubetune, {lines:,} lines (target for the 1,000,000-line run)",
        ),
        Figure(
            "prepare_peak_rss_mb",
            max(big["peak_rss_mb"], big["peak_tree_pss_mb"]),
            "MiB",
            "< 1536",
            f"kubetune, {lines:,} lines: the larger of the biggest process's ru_maxrss "
            f"({big['peak_rss_mb']:.0f}) and the sampled PSS of the process tree "
            f"({big['peak_tree_pss_mb']:.0f})",
        ),
        Figure(
            "prepare_datasets_lines_per_s",
            hf["lines_per_s"],
            "lines/s",
            None,
            f"datasets.map(batched=True, num_proc=2) clean + tokenize, same {lines:,} lines",
        ),
        Figure(
            "prepare_speedup_vs_datasets",
            big["lines_per_s"] / hf["lines_per_s"],
            "x",
            ">= 1.5",
            f"same {lines:,} lines, same Cleaner and tokenizer",
        ),
        Figure(
            "prepare_rss_vs_datasets",
            max(big["peak_rss_mb"], big["peak_tree_pss_mb"])
            / max(hf["peak_rss_mb"], hf["peak_tree_pss_mb"]),
            "x",
            "< 1",
            f"kubetune / datasets peak memory (datasets: ru_maxrss {hf['peak_rss_mb']:.0f}, "
            f"tree PSS {hf['peak_tree_pss_mb']:.0f} MiB)",
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
    return figures, {
        "kubetune_full": big,
        "datasets_full": hf,
        "kubetune_subset": small,
        "baseline_subset": base,
    }
