"""Torch profile of a training run: kubetune's ``train.run`` or HF ``Trainer`` + ``group_texts``.

    python -m bench.profile_train kubetune        # or: group_texts
    python -m bench.profile_train kubetune --steps 12 --rows 20

Prepares the train benchmark's tldr dataset (the real prepare stage, in scratch), then
runs 12 steps of one packed row of 512 tokens (the peer comparison's shape: 4 x 256 GPT-2,
fp32, 1 thread, dropout 0 unless ``--dropout``) under ``torch.profiler`` and prints the
operators by self CPU time. The shares (not the absolute times, which include setup and
the machine's load) are what ``bench/RESULTS.md`` quotes: matmuls, dropout, attention,
GELU, optimizer.
"""

from __future__ import annotations

import argparse
import os
import shutil

from bench import peers
from bench import train_bench as tb
from bench.assets import bench_tokenizer, scratch_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_train", description=__doc__)
    parser.add_argument("side", choices=["kubetune", "group_texts"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rows", type=int, default=22, help="operators to print")
    parser.add_argument(
        "--dropout", type=float, default=tb.PEER_DROPOUT, help="on both sides (the comparison's)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("KUBETUNE_METRICS_PORT", "0")
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    from kubetune_trainer import prepare
    from kubetune_trainer.context import make_context

    torch.set_num_threads(1)
    work = scratch_root() / "profile-train"
    shutil.rmtree(work, ignore_errors=True)
    tokenizer_dir = bench_tokenizer()
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    data = work / "data"
    data.mkdir(parents=True)
    job = tb.make_job(f"file://{data}", {"maxSteps": 1}, 1500, vocab)
    prepare.run(make_context(job, scratch=work / "data-scratch"))
    training = {
        "maxSteps": args.steps,
        "batchSize": 1,
        "maxSeqLength": tb.PEER_BLOCK,
        "packing": True,
        "logEverySteps": 100_000,
        "checkpointEverySteps": 100_000,
        "dropout": args.dropout,
    }
    texts = tb._read_jsonl_texts(data / "dataset" / "train.jsonl")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        if args.side == "kubetune":
            result = tb.run_kubetune(work, "kubetune", training, data, 1500, vocab)
        else:
            result = peers.run_group_texts(
                texts, tokenizer_dir, tb.MODEL, tb.PEER_BLOCK, args.steps, work, args.dropout
            )
            result.pop("model")
    print(f"{args.side}: steady {result['steady_tokens_per_s']:.1f} tok/s (under the profiler)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
