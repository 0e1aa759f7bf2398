"""The CPU's arithmetic limit: the best fp32 (and bf16) matmul rate at the stages' thread count.

    python -m bench.peak --threads 1          # prints GFLOP/s per size and the best

The denominator of every "fraction of peak" figure (``train_mfu``, ``eval_mfu``): a large
square ``torch.mm`` (2048 in quick mode, 4096 in full) timed after a warm-up, best of a
few repetitions, with ``torch.set_num_threads`` set as for the stages. The best rate is
what the machine's BLAS actually reaches here (not the data-sheet number), so a stage at
1.0 of it does nothing but dense matmuls. On a shared machine the best of several runs
is the least disturbed one. Each benchmark measures it right before its own stage
figure (not once per run), so on a machine shared with other work the peak and the
stage see about the same load.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.flops import matmul_flops


def time_matmul(n: int, dtype: Any, reps: int) -> float:
    """Best FLOP/s of ``reps`` timed ``[n, n] @ [n, n]`` matmuls of ``dtype`` (one warm-up)."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return matmul_flops(n, n, n) / best


def cpu_matmul_peak(threads: int, quick: bool = True) -> dict[str, Any]:
    """``{"fp32_flops", "bf16_flops", "by_size", "threads"}``: best rates at ``threads`` threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sizes = (1024, 2048) if quick else (1024, 2048, 4096)
        reps = 5 if quick else 4
        by_size = {f"fp32_{n}": time_matmul(n, torch.float32, reps) for n in sizes}
        bf16 = None
        if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX") or (
            "AMX" in torch.backends.cpu.get_cpu_capability()
        ):
            bf16 = time_matmul(sizes[-1], torch.bfloat16, reps)
            by_size[f"bf16_{sizes[-1]}"] = bf16
    finally:
        torch.set_num_threads(previous)
    return {
        "fp32_flops": max(v for k, v in by_size.items() if k.startswith("fp32")),
        "bf16_flops": bf16,
        "by_size": by_size,
        "threads": threads,
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def best_peak(*peaks: dict[str, Any]) -> dict[str, Any]:
    """The peak with the highest fp32 rate of those measured around a stage (the least
    disturbed; dividing by it gives the lowest, most conservative fraction of peak)."""
    best = max(peaks, key=lambda p: p["fp32_flops"])
    bf16 = [p["bf16_flops"] for p in peaks if p["bf16_flops"]]
    return {**best, "bf16_flops": max(bf16) if bf16 else None, "measured": len(peaks)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peak", description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="add a 4096 matmul")
    args = parser.parse_args(argv)
    peak = cpu_matmul_peak(args.threads, quick=not args.full)
    for name, rate in peak["by_size"].items():
        print(f"{name:>10}: {rate / 1e9:8.1f} GFLOP/s")
    print(f"best fp32: {peak['fp32_flops'] / 1e9:.1f} GFLOP/s at {args.threads} thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
