"""Run the benchmarks and write ``bench/results/latest.json`` plus a table on stdout.

    python -m bench.run --quick                     # make bench-quick: a few minutes
    python -m bench.run --full                      # make bench
    python -m bench.run --quick --only train,evaluate --threads 2

Each benchmark measures kubetune and its baseline side by side in this run (see the
module of each: ``bench.train_bench``, ``eval_bench``, ``prepare_bench``,
``operator_bench``). A benchmark that fails does not stop the others: its figures are
recorded as not measured, with the error. ``--threads`` (default 1) is what
``torch.set_num_threads`` and the tokenizer pool get on both sides; 1 is the default
because on a shared, oversubscribed machine two spinning OpenMP threads per process
made small training steps ten times slower.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    Figure,
    format_table,
    machine_info,
    not_measured,
    results_document,
    write_results,
)
from bench.operator_bench import FIGURES as OPERATOR_FIGURES

Bench = Callable[[bool, int], tuple[list[Figure], dict[str, Any]]]

# Figures each benchmark promises, for the "not measured" record when it fails.
PROMISED: dict[str, list[tuple[str, str, str | None]]] = {
    "prepare": [
        ("prepare_lines_per_s", "lines/s", None),
        ("prepare_speedup", "x", ">= 5"),
        ("prepare_peak_rss_mb", "MiB", "< 1536"),
        ("prepare_speedup_vs_datasets", "x", ">= 1.5"),
        ("prepare_rss_vs_datasets", "x", "< 1"),
    ],
    "train": [
        ("train_speedup_vs_fastest_peer", "x", ">= 1.0"),
        ("train_loss_gap_vs_best_peer", "", "<= 0.01"),
        ("cpu_matmul_peak_gflops", "GFLOP/s", None),
        ("train_mfu", "of peak", ">= 0.5"),
        ("train_tokens_per_s", "tok/s", None),
        ("template_tokens_per_s", "tok/s", None),
        ("train_speedup_vs_template", "x", ">= 10"),
        ("train_test_loss", "nats/token", None),
        ("template_test_loss", "nats/token", None),
    ],
    "evaluate": [
        ("eval_ppl_speedup", "x", ">= 5"),
        ("eval_mfu", "of peak", ">= 0.6"),
        ("eval_ppl_rel_diff", "", "< 1e-4"),
        ("bleu_gen_speedup", "x", ">= 5"),
    ],
    "operator": list(OPERATOR_FIGURES),  # light to import: the one list of its figures
    "workers": [
        ("workers_1_tokens_per_s", "tok/s", None),
        ("workers_2_tokens_per_s", "tok/s", None),
        ("workers_2_vs_1_speedup", "x", None),
        ("workers_final_loss_rel_diff", "", "< 0.02"),
        ("workers_fitted_vs_default_threads", "x", ">= 1"),
    ],
}
ORDER = ("prepare", "train", "evaluate", "operator", "workers")


def load_bench(name: str) -> Bench:
    if name == "prepare":
        from bench import prepare_bench as mod
    elif name == "train":
        from bench import train_bench as mod  # type: ignore[no-redef]
    elif name == "evaluate":
        from bench import eval_bench as mod  # type: ignore[no-redef]
    elif name == "operator":
        from bench import operator_bench as mod  # type: ignore[no-redef]
    elif name == "workers":
        from bench import workers_bench as mod  # type: ignore[no-redef]
    else:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(ORDER)}")
    return mod.run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes (default)")
    mode.add_argument("--full", action="store_true", help="full sizes (tens of minutes on 2 cores)")
    parser.add_argument(
        "--only", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch/tokenizer threads for both sides (default 1)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "latest.json")
    args = parser.parse_args(argv)
    quick = not args.full
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for name in names:
        if name not in ORDER:
            parser.error(f"--only: unknown benchmark {name!r}; choose from {', '.join(ORDER)}")
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("KUBETUNE_METRICS_PORT", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass

    machine = machine_info(args.threads)
    mode_name = "quick" if quick else "full"
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    started = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        load = os.getloadavg()[0]
        print(
            f"== {name} ({mode_name}, {args.threads} thread(s), load {load:.1f})",
            file=sys.stderr,
            flush=True,
        )
        try:
            figs, info = load_bench(name)(quick, args.threads)
        except Exception as exc:  # record and go on with the next benchmark
            traceback.print_exc()
            reason = f"{type(exc).__name__}: {exc}"
            figs, info = not_measured(PROMISED[name], reason), {"error": reason}
        info["seconds"] = round(time.perf_counter() - t0, 1)
        info["loadavg_1m_before"] = round(load, 2)
        info["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        figures.extend(figs)
        details[name] = info
        print(format_table(figs), file=sys.stderr, flush=True)
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        machine["seconds"] = round(time.perf_counter() - started, 1)
        write_results(results_document(figures, machine, mode_name, details), args.out)
    print(format_table(figures))
    print(
        f"\n{mode_name} run, {machine['seconds']} s, load average {machine['loadavg_start']} "
        f"-> {machine['loadavg_end']}; written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
