"""Benchmark 5, GPU: GPT-2 124M packed bf16 training, tokens/s and MFU, vs the course template.

Run on a machine with an NVIDIA H100/H200-class GPU and no network (torch, transformers,
accelerate preinstalled; nothing is installed), from a copy of this repository::

    bash bench/gpu.sh                   # = PYTHONPATH=trainer:operator:. python -m bench.gpu
    bash bench/gpu.sh --dry-run         # CPU, tiny model, a few steps: checks the logic anywhere

It finishes in a few minutes (under 8) and writes ``$OUT/gpu.json`` when ``OUT`` is set,
else ``bench/results/gpu.json`` (``gpu-dry-run.json`` for ``--dry-run``), and prints a table.

Steps:

1. **Peak**: the chip's dense bf16 matmul rate, measured here: square bf16 matmuls
   (4096..16384) timed with CUDA events; the best rate is the MFU denominator.
2. **Data**: the tldr pages (``../shared/data/tldr-pages/pages``) when present, cleaned
   with kubetune's Cleaner and tokenized with a byte-level BPE trained here (padded
   with unused tokens to GPT-2's 50,257); if the data is absent, random token ids with
   the tldr length distribution (log-normal, mean ~14 tokens/line), said in the JSON.
3. **kubetune**: the real train stage, ``kubetune_trainer.train.run(ctx)``, on that
   dataset (written in prepare's layout): fresh GPT-2 124M shape (12 x 768, 12 heads,
   1024 positions, vocab 50,257), bf16, packed rows of 1024, batch 16. Throughput is
   the stage's own steady interval rate (``train/metrics.jsonl``, after step 1).
4. **Template**: Hugging Face ``Trainer``, ``bf16=True``, each line padded to 512,
   batch 8, the same model config; useful (attention-mask) tokens/s after step 1.
5. **MFU** = tokens/s x FLOPs/token / peak, FLOPs/token = ``6 N + 12 L E T``
   (``bench/flops.py``: N = parameters without the position table, L layers, E width,
   T the sequence length attended: 1024 packed, 512 for the template). The template
   also gets its hardware utilisation counting padding as work (``template_hfu``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TLDR = REPO_ROOT.parent / "shared" / "data" / "tldr-pages" / "pages"
GPT2_VOCAB = 50257


def log(msg: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- peak


def measure_matmul_flops(device: str, dry_run: bool) -> dict[str, Any]:
    """Best dense matmul rate (FLOP/s): bf16 with CUDA events, or fp32 on CPU for --dry-run."""
    import torch

    from bench.flops import matmul_flops

    results = {}
    if dry_run:
        n = 512
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        a @ b
        start = time.perf_counter()
        iters = 10
        for _ in range(iters):
            a @ b
        seconds = (time.perf_counter() - start) / iters
        results[n] = matmul_flops(n, n, n) / seconds
        return {"peak_flops": max(results.values()), "by_size": results, "dtype": "float32 (CPU)"}
    for n in (4096, 8192, 16384):
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        iters = 20 if n < 16384 else 8
        start_ev = torch.cuda.Event(enable_timing=True)
        end_ev = torch.cuda.Event(enable_timing=True)
        start_ev.record()
        for _ in range(iters):
            a @ b
        end_ev.record()
        torch.cuda.synchronize()
        seconds = start_ev.elapsed_time(end_ev) / 1000 / iters
        results[n] = matmul_flops(n, n, n) / seconds
        del a, b
    torch.cuda.empty_cache()
    return {"peak_flops": max(results.values()), "by_size": results, "dtype": "bfloat16"}


# --------------------------------------------------------------------------- evaluation


def run_eval(
    shape: dict[str, int], ids: list[list[int]], device: str, *, bf16: bool, dry: bool
) -> dict[str, Any]:
    """Perplexity tokens/s of ``score_sequences`` and of a per-line loop (fresh weights)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from kubetune_trainer.perplexity import score_sequences

    config = GPT2Config(
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        n_positions=shape["n_positions"],
        vocab_size=shape["vocab"],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = model.to(device).eval()
    dtype = torch.bfloat16 if bf16 else None
    lines = [x[: shape["n_positions"] - 1] for x in ids[-(300 if dry else 20000) :]]
    baseline = lines[: 30 if dry else 1000]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def ours(seqs: list[list[int]]) -> Any:
        return score_sequences(
            model, seqs, context_token=0, max_length=shape["n_positions"], autocast_dtype=dtype
        )

    ours(lines[:64])
    sync()
    start = time.perf_counter()
    result = ours(lines)
    sync()
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    counted = 0
    with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32, enabled=bf16):
        for seq in baseline:
            x = torch.tensor([[0, *seq]], device=device)
            logits = model(input_ids=x).logits[0, :-1].float()
            torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            counted += len(seq)
    base_seconds = time.perf_counter() - start
    return {
        "lines": len(lines),
        "tokens": result.predicted_tokens,
        "tokens_per_s": result.predicted_tokens / seconds,
        "baseline_lines": len(baseline),
        "baseline_tokens_per_s": counted / base_seconds,
        "mean_attended": sum(len(x) + 1 for x in lines) / len(lines),
        "dtype": "bf16 autocast" if bf16 else "fp32",
        "perplexity": result.perplexity,
    }


# --------------------------------------------------------------------------- data


def load_lines(max_lines: int) -> list[str] | None:
    """Cleaned, deduplicated tldr lines, or None when the shared data is not there."""
    if not TLDR.is_dir():
        return None
    from kubetune.schema import CleanSpec
    from kubetune_trainer.cleaning import Cleaner

    cleaner = Cleaner(CleanSpec())
    seen: set[str] = set()
    out: list[str] = []
    for path in sorted(TLDR.glob("*/*.md")):
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            text = cleaner.clean_line(raw)
            if text is not None and text not in seen:
                seen.add(text)
                out.append(text)
                if len(out) >= max_lines:
                    return out
    return out or None


def build_tokenizer(lines: list[str] | None, vocab: int) -> Any:
    """kubetune's byte-level BPE, then unused added tokens up to exactly ``vocab`` entries."""
    from kubetune_trainer.tokenizer_build import train_bpe_tokenizer

    corpus = (
        lines if lines else [f"synthetic line {i} with words {i * 7 % 97}" for i in range(2000)]
    )
    tokenizer = train_bpe_tokenizer(corpus, vocab, model_max_length=1024, length=len(corpus))
    missing = vocab - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([f"<|unused_{i}|>" for i in range(missing)])
    return tokenizer


def synthetic_ids(n_lines: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids with tldr-like line lengths (log-normal, mean ~14, 2..200 tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=2.5, sigma=0.55, size=n_lines).round(), 2, 200)
    return [rng.integers(0, vocab - 1, size=int(n)).tolist() for n in lengths]


def write_dataset(
    out: Path, train_ids: list[list[int]], tokenizer: Any, train_texts: list[str] | None
) -> None:
    """Prepare's outputs (RunLayout keys) for ``train.run``: tokens, offsets, tokenizer, and
    ``dataset/prepare.json`` (the stage reads its train sha256 for the training fingerprint)."""
    from kubetune.dataset_format import TEST, TRAIN, write_split
    from kubetune.layout import RunLayout
    from kubetune.results import PrepareResult
    from kubetune.schema import DatasetStats

    texts = train_texts if train_texts else [""] * len(train_ids)
    train = write_split(out / RunLayout.DATASET, TRAIN, texts[: len(train_ids)], train_ids, "bench")
    test = write_split(out / RunLayout.DATASET, TEST, texts[:1], train_ids[:1], "bench")
    tokenizer.save_pretrained(str(out / RunLayout.TOKENIZER))
    result = PrepareResult(
        stats=DatasetStats(
            lines=train.lines + test.lines,
            kept_lines=train.lines + test.lines,
            train_lines=train.lines,
            test_lines=test.lines,
            train_tokens=train.tokens,
            test_tokens=test.tokens,
        ),
        train_sha256=train.sha256,
        test_sha256=test.sha256,
        tokenizer="bench (trained here)",
        dataset_uri="bench://gpu",
    )
    (out / RunLayout.PREPARE_RESULT).write_text(result.to_json())


# --------------------------------------------------------------------------- sides


def make_job(output: str, shape: dict[str, int], training: dict[str, Any]) -> Any:
    from kubetune.schema import job_manifest, parse_job

    defaults = {
        "training": {
            "learningRate": 6e-4,
            "warmupRatio": 0.1,
            "scheduler": "cosine",
            "seed": 42,
            "logEverySteps": 1_000_000,
            "checkpointEverySteps": 1_000_000,
        },
    }
    manifest = job_manifest(
        "gpu-bench",
        defaults,
        model={
            "fresh": {
                "nLayer": shape["n_layer"],
                "nHead": shape["n_head"],
                "nEmbd": shape["n_embd"],
                "nPositions": shape["n_positions"],
                "vocabSize": shape["vocab"],
            }
        },
        dataset={"source": "file:///unused/"},
        training=training,
        evaluation={"bleu": {"enabled": False}, "baseline": False},
        storage={"output": output},
    )
    return parse_job(manifest, source="gpu bench")


def run_kubetune(
    work: Path,
    shape: dict[str, int],
    train_ids: list[list[int]],
    tokenizer: Any,
    texts: list[str] | None,
    training: dict[str, Any],
) -> dict[str, Any]:
    from kubetune_trainer import train
    from kubetune_trainer.context import make_context

    out = work / "kubetune"
    write_dataset(out, train_ids, tokenizer, texts)
    ctx = make_context(make_job(f"file://{out}", shape, training), scratch=work / "kt-scratch")
    start = time.perf_counter()
    result = train.run(ctx)
    wall = time.perf_counter() - start
    records = [
        json.loads(x)
        for x in (out / "train" / "metrics.jsonl").read_text().splitlines()
        if x.strip()
    ]
    return {
        "steady_tokens_per_s": float(records[-1]["tokens_per_second"]),
        "loop_tokens_per_s": result.tokens_per_second,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "wall_s": wall,
        "device": result.device,
        "mixed_precision": result.config.get("mixedPrecision"),
        "attention": result.config.get("attnImplementation"),
        "packing_efficiency": result.config.get("packingEfficiency"),
        "parameters": result.config.get("parameters"),
    }


def run_template(
    work: Path,
    shape: dict[str, int],
    train_ids: list[list[int]],
    tokenizer: Any,
    steps: int,
    batch: int,
    max_length: int,
    bf16: bool,
) -> dict[str, Any]:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    pad = int(tokenizer.pad_token_id)
    rows = train_ids[: steps * batch]

    class Padded(torch.utils.data.Dataset):
        """Each line padded to max_length (what tokenizer(padding="max_length") returns)."""

        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, list[int]]:
            ids = rows[i][:max_length]
            n = len(ids)
            return {
                "input_ids": ids + [pad] * (max_length - n),
                "attention_mask": [1] * n + [0] * (max_length - n),
            }

    useful: list[int] = []

    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([f["input_ids"] for f in features])
        mask = torch.tensor([f["attention_mask"] for f in features])
        labels = ids.masked_fill(mask == 0, -100)
        useful.append(int(mask.sum()))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    config = GPT2Config(
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        n_positions=shape["n_positions"],
        vocab_size=len(tokenizer),
        bos_token_id=pad,
        eos_token_id=pad,
    )
    set_seed(42)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    args = TrainingArguments(
        output_dir=str(work / "template"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=6e-4,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        bf16=bf16,
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=42,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Padded(), data_collator=collate, callbacks=[Clock()]
    )
    start = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - start
    tokens = sum(useful[1 : len(ends)])
    seconds = ends[-1] - ends[0]
    result = {
        "steady_tokens_per_s": tokens / seconds,
        "steady_positions_per_s": (len(ends) - 1) * batch * max_length / seconds,
        "steps": len(ends),
        "final_loss": float(out.training_loss),
        "wall_s": wall,
        "matmul_params": None,
    }
    from bench.flops import matmul_params

    result["matmul_params"] = matmul_params(trainer.model)
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, tiny model, a few steps: checks the script without a GPU",
    )
    parser.add_argument("--steps", type=int, default=None, help="kubetune optimizer steps")
    parser.add_argument("--template-steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="kubetune rows of 1024 per step")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("KUBETUNE_METRICS_PORT", "0")

    import torch

    from bench.common import Figure, format_table, machine_info, results_document, write_results
    from bench.flops import flops_per_token, forward_flops_per_token, gpt2_param_count

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(
            "bench.gpu: no CUDA device; run on a GPU machine, or pass --dry-run to check the "
            "script on a CPU",
            file=sys.stderr,
        )
        return 2
    dry = args.dry_run
    if dry:
        shape = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128, "vocab": 1024}
        seq, kt_batch, steps, tpl_steps, tpl_len = (
            128,
            args.batch or 2,
            args.steps or 3,
            args.template_steps or 3,
            64,
        )
    else:
        shape = {
            "n_layer": 12,
            "n_head": 12,
            "n_embd": 768,
            "n_positions": 1024,
            "vocab": GPT2_VOCAB,
        }
        seq, kt_batch, steps, tpl_steps, tpl_len = (
            1024,
            args.batch or 16,
            args.steps or 40,
            args.template_steps or 40,
            512,
        )
    device = "cuda" if cuda and not dry else "cpu"
    machine = machine_info()
    if cuda:
        machine["gpu"] = torch.cuda.get_device_name(0)
        machine["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    figures: list[Figure] = []
    details: dict[str, Any] = {
        "dry_run": dry,
        "shape": shape,
        "seq": seq,
        "kubetune_batch": kt_batch,
        "template_batch": 8,
        "template_max_length": tpl_len,
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO_ROOT / "bench" / "results"
    out_path = out_dir / ("gpu-dry-run.json" if dry else "gpu.json")

    def save() -> None:
        write_results(
            results_document(figures, machine, "gpu-dry-run" if dry else "gpu", details), out_path
        )

    log("measuring the matmul peak")
    peak = measure_matmul_flops(device, dry)
    details["peak"] = peak
    figures.append(
        Figure(
            "gpu_bf16_matmul_tflops",
            peak["peak_flops"] / 1e12,
            "TFLOP/s",
            None,
            f"best square {peak['dtype']} matmul, CUDA events"
            if not dry
            else "dry run: CPU fp32 matmul",
        )
    )
    save()

    log("data and tokenizer")
    n_lines = 4000 if dry else 120_000
    lines = load_lines(n_lines)
    details["data"] = (
        "tldr pages, cleaned"
        if lines
        else "SYNTHETIC: ../shared/data absent, random ids with tldr-like lengths"
    )
    tokenizer = build_tokenizer(lines, shape["vocab"])
    from kubetune_trainer.tokenizer_build import encode_batch

    ids = encode_batch(tokenizer, lines) if lines else synthetic_ids(n_lines, shape["vocab"])
    ids = [x for x in ids if x]
    details["lines"] = len(ids)
    details["mean_line_tokens"] = sum(map(len, ids)) / len(ids)

    work = Path(tempfile.mkdtemp(prefix="kubetune-gpu-bench-"))
    n_params = gpt2_param_count(
        shape["n_layer"],
        shape["n_embd"],
        shape["vocab"],
        shape["n_positions"],
        include_positions=False,
    )
    fpt_kt = flops_per_token(n_params, shape["n_layer"], shape["n_embd"], seq)
    fpt_tpl = flops_per_token(n_params, shape["n_layer"], shape["n_embd"], tpl_len)
    details["flops_per_token"] = {
        "formula": "6*N + 12*n_layer*n_embd*seq",
        "N": n_params,
        "kubetune": fpt_kt,
        "template": fpt_tpl,
    }
    kt: dict[str, Any] | None = None
    tpl: dict[str, Any] | None = None
    try:
        log(f"kubetune train stage: {steps} steps of {kt_batch} x {seq}")
        try:
            precision = "bf16" if (cuda and not dry) else "fp32"
            kt = run_kubetune(
                work,
                shape,
                ids,
                tokenizer,
                lines,
                {
                    "maxSteps": steps,
                    "batchSize": kt_batch,
                    "maxSeqLength": seq,
                    "packing": True,
                    "precision": precision,
                },
            )
            details["kubetune"] = kt
            figures += [
                Figure(
                    "gpu_train_tokens_per_s",
                    kt["steady_tokens_per_s"],
                    "tok/s",
                    None,
                    f"kubetune train.run, {kt_batch} x {seq} packed, {precision}",
                ),
                Figure(
                    "gpu_train_mfu",
                    kt["steady_tokens_per_s"] * fpt_kt / peak["peak_flops"],
                    "share",
                    None,
                    "6N + 12*L*E*T FLOPs/token over the measured peak",
                ),
            ]
        except Exception as exc:
            details["kubetune_error"] = f"{type(exc).__name__}: {exc}"
            log(f"kubetune side failed: {details['kubetune_error']}")
        save()
        log(f"template: HF Trainer, {tpl_steps} steps of 8 x {tpl_len} padded")
        try:
            tpl = run_template(
                work, shape, ids, tokenizer, tpl_steps, 8, tpl_len, bf16=cuda and not dry
            )
            details["template"] = tpl
            figures += [
                Figure(
                    "gpu_template_tokens_per_s",
                    tpl["steady_tokens_per_s"],
                    "tok/s",
                    None,
                    f"HF Trainer, 8 x {tpl_len} padded, useful tokens",
                ),
                Figure(
                    "gpu_template_mfu",
                    tpl["steady_tokens_per_s"] * fpt_tpl / peak["peak_flops"],
                    "share",
                    None,
                    "useful tokens only",
                ),
                Figure(
                    "gpu_template_hfu",
                    tpl["steady_positions_per_s"] * fpt_tpl / peak["peak_flops"],
                    "share",
                    None,
                    "padding counted as work",
                ),
            ]
            if kt is not None:
                details["n_params_check"] = {"formula": n_params, "model": tpl["matmul_params"]}
                figures.append(
                    Figure(
                        "gpu_train_speedup_vs_template",
                        kt["steady_tokens_per_s"] / tpl["steady_tokens_per_s"],
                        "x",
                        ">= 10",
                        "useful tokens/s, same chip",
                    )
                )
        except Exception as exc:
            details["template_error"] = f"{type(exc).__name__}: {exc}"
            log(f"template side failed: {details['template_error']}")
        save()
        log("evaluation: perplexity, batched vs one line per forward")
        try:
            ev = run_eval(shape, ids, device, bf16=cuda and not dry, dry=dry)
            details["evaluation"] = ev
            fpt_eval = forward_flops_per_token(
                n_params, shape["n_layer"], shape["n_embd"], ev["mean_attended"]
            )
            figures += [
                Figure(
                    "gpu_eval_tokens_per_s",
                    ev["tokens_per_s"],
                    "tok/s",
                    None,
                    f"score_sequences, {ev['lines']} lines, {ev['dtype']}",
                ),
                Figure(
                    "gpu_eval_mfu",
                    ev["tokens_per_s"] * fpt_eval / peak["peak_flops"],
                    "share",
                    None,
                    "2N + 4*L*E*T forward FLOPs/token over the measured peak",
                ),
                Figure(
                    "gpu_eval_speedup_vs_per_line",
                    ev["tokens_per_s"] / ev["baseline_tokens_per_s"],
                    "x",
                    ">= 5",
                    f"one line per forward on {ev['baseline_lines']} lines, same dtype",
                ),
            ]
        except Exception as exc:
            details["evaluation_error"] = f"{type(exc).__name__}: {exc}"
            log(f"evaluation failed: {details['evaluation_error']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    print(format_table(figures))
    print(
        f"\nwritten to {out_path}"
        + ("  (DRY RUN: CPU, tiny model; not GPU figures)" if dry else "")
    )
    ok = (
        kt is not None
        and tpl is not None
        and all(math.isfinite(f.value) for f in figures if f.value is not None)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
