"""Benchmark 1, train: useful tokens/s of ``kubetune train`` vs the course template.

The course template is the Hugging Face ``Trainer`` on lines tokenized with
``padding="max_length", max_length=512`` and batch size 8 (what most fine-tuning
tutorials show). kubetune is the real stage, ``kubetune_trainer.train.run(ctx)``, on
a dataset made by the real prepare stage (``prepare.run``) from the tldr pages. Both
sides use the same fresh GPT-2 shape (4 layers, 256 wide, 4 heads, 512 positions),
the same tokenizer, the same seed, optimizer settings (AdamW, cosine, warmup 10%,
grad clip 1.0), fp32 and ``torch.set_num_threads``; they run one after the other in
this process.

Two kubetune runs:

* **same budget** (the headline): one packed row of ``8 * (mean line tokens + 1)``
  tokens per step, i.e. the same ~8 lines per optimizer step as the template, and the
  same number of steps. Both models see the same amount of text in the same number
  of updates, so their held-out losses are comparable (``train_test_loss`` vs
  ``template_test_loss``: the speed does not come from learning less);
* **same shape** (``--full`` and ``--quick``, few steps): batch 8 x 512, the template's
  exact tensor shape, but every position a real token (packing).

Throughput is steady state: kubetune's own interval rate from step 1 to the last
step (``train/metrics.jsonl``), the template's useful (attention-mask) tokens of
steps 2..N over their wall time (a ``TrainerCallback``); step 1 is the warmup.
Held-out loss: summed NLL / predicted tokens over the same test lines for both,
each line scored alone (``perplexity.score_sequences``, no context token).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from bench.assets import bench_tokenizer, scratch_root
from bench.common import TLDR_PAGES, Figure

SEED = 42
LEARNING_RATE = 1e-3
WARMUP_FRACTION = 0.1
MODEL = {"nLayer": 4, "nHead": 4, "nEmbd": 256, "nPositions": 512}
TEMPLATE_BATCH = 8
TEMPLATE_MAX_LENGTH = 512
TEST_LINES = 400


def make_job(output: str, training: dict[str, Any], max_documents: int, vocab: int) -> Any:
    from kubetune.schema import job_manifest, parse_job

    defaults = {
        "training": {
            "precision": "fp32",
            "learningRate": LEARNING_RATE,
            "scheduler": "cosine",
            "warmupRatio": WARMUP_FRACTION,
            "seed": SEED,
            "maxGradNorm": 1.0,
            "weightDecay": 0.0,
        },
    }
    manifest = job_manifest(
        "bench-train",
        defaults,
        model={"fresh": {**MODEL, "vocabSize": vocab}, "tokenizer": f"file://{bench_tokenizer()}"},
        dataset={
            "source": f"file://{TLDR_PAGES}/",
            "format": "markdown",
            "maxDocuments": max_documents,
            "split": {"testFraction": 0.1, "seed": SEED},
        },
        training=training,
        evaluation={"perplexity": True, "bleu": {"enabled": False}, "baseline": False},
        storage={"output": output},
    )
    return parse_job(manifest, source="bench")


def _read_jsonl_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def _steady_tokens_per_s(metrics_path: Path) -> float:
    """The rate of the last logged interval (from the step-1 log to the last step)."""
    records = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    if len(records) < 2:
        raise RuntimeError(f"{metrics_path}: expected a step-1 and a last-step record")
    return float(records[-1]["tokens_per_second"])


def run_kubetune(
    workdir: Path,
    name: str,
    training: dict[str, Any],
    dataset_from: Path | None,
    max_documents: int,
    vocab: int,
) -> dict[str, Any]:
    """prepare (unless ``dataset_from``) + train in their own output; figures of the run."""
    from kubetune_trainer import prepare, train
    from kubetune_trainer.context import make_context

    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    job = make_job(f"file://{out}", training, max_documents, vocab)
    ctx = make_context(job, scratch=workdir / f"{name}-scratch")
    if dataset_from is None:
        prepare.run(ctx)
    else:
        shutil.copytree(dataset_from / "dataset", out / "dataset")
    start = time.perf_counter()
    result = train.run(ctx)
    wall = time.perf_counter() - start
    shutil.rmtree(workdir / f"{name}-scratch", ignore_errors=True)
    return {
        "steady_tokens_per_s": _steady_tokens_per_s(out / "train" / "metrics.jsonl"),
        "loop_tokens_per_s": result.tokens_per_second,
        "train_tokens": result.train_tokens,
        "steps": result.steps,
        "final_train_loss": result.final_loss,
        "wall_s": wall,
        "packing_efficiency": result.config.get("packingEfficiency"),
        "sequences_per_step": result.config.get("sequencesPerStep"),
        "output": out,
    }


def run_template(
    train_texts: list[str], tokenizer_dir: Path, steps: int, vocab: int, workdir: Path
) -> dict[str, Any]:
    """The course template: HF Trainer, padding to 512, batch 8; steady tokens/s and the model."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        GPT2Config,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lines = train_texts[: steps * TEMPLATE_BATCH]
    dataset = Dataset.from_dict({"text": lines}).map(
        lambda b: tokenizer(
            b["text"], padding="max_length", max_length=TEMPLATE_MAX_LENGTH, truncation=True
        ),
        batched=True,
        remove_columns=["text"],
    )
    config = GPT2Config(
        n_layer=MODEL["nLayer"],
        n_head=MODEL["nHead"],
        n_embd=MODEL["nEmbd"],
        n_positions=MODEL["nPositions"],
        vocab_size=vocab,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    set_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")

    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    useful: list[int] = []

    def counting_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        useful.append(int(batch["attention_mask"].sum()))
        return batch

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step_ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(workdir / "template"),
        per_device_train_batch_size=TEMPLATE_BATCH,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(WARMUP_FRACTION * steps),
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(steps, 1),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=SEED,
        data_seed=SEED,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=counting_collator,
        callbacks=[StepClock()],
    )
    start = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - start
    if len(step_ends) < 2:
        raise RuntimeError("the template ran fewer than 2 steps; raise the step count")
    steady_tokens = sum(useful[1 : len(step_ends)])
    steady_seconds = step_ends[-1] - step_ends[0]
    torch.set_grad_enabled(True)
    return {
        "steady_tokens_per_s": steady_tokens / steady_seconds,
        "useful_tokens": sum(useful[: len(step_ends)]),
        "padded_tokens": len(step_ends) * TEMPLATE_BATCH * TEMPLATE_MAX_LENGTH,
        "steps": len(step_ends),
        "final_train_loss": float(out.training_loss),
        "wall_s": wall,
        "model": trainer.model,
    }


def test_loss(model: Any, tokenizer: Any, texts: list[str]) -> float:
    """Summed NLL / predicted tokens of each text scored alone (no context token)."""
    from kubetune_trainer.perplexity import score_sequences
    from kubetune_trainer.tokenizer_build import encode_batch

    ids = encode_batch(tokenizer, texts)
    result = score_sequences(
        model, ids, context_token=None, max_length=MODEL["nPositions"], batch_size=8
    )
    return result.nll_sum / result.predicted_tokens


def run(quick: bool, threads: int) -> tuple[list[Figure], dict[str, Any]]:
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("kubetune_trainer").setLevel(logging.WARNING)
    os.environ.setdefault("KUBETUNE_METRICS_PORT", "0")
    torch.set_num_threads(threads)
    steps = 6 if quick else 40
    shape_steps = 3 if quick else 8
    max_documents = 1500 if quick else 4000
    workdir = scratch_root() / "train"
    shutil.rmtree(workdir, ignore_errors=True)
    tokenizer_dir = bench_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = len(tokenizer)

    # Prepare once (the real stage) to learn the mean line length, then size the row.
    from kubetune_trainer import prepare
    from kubetune_trainer.context import make_context

    data_dir = workdir / "data"
    data_dir.mkdir(parents=True)
    prep_job = make_job(f"file://{data_dir}", {"maxSteps": 1}, max_documents, vocab)
    stats = prepare.run(make_context(prep_job, scratch=workdir / "data-scratch")).stats
    mean_line = stats.train_tokens / stats.train_lines
    row = int(round(TEMPLATE_BATCH * (mean_line + 1) / 8) * 8)
    budget = {
        "maxSteps": steps,
        "batchSize": 1,
        "maxSeqLength": row,
        "packing": True,
        "logEverySteps": 100_000,
        "checkpointEverySteps": 100_000,
    }
    kt = run_kubetune(workdir, "budget", budget, data_dir, max_documents, vocab)
    shape = {
        "maxSteps": shape_steps,
        "batchSize": TEMPLATE_BATCH,
        "maxSeqLength": TEMPLATE_MAX_LENGTH,
        "packing": True,
        "logEverySteps": 100_000,
        "checkpointEverySteps": 100_000,
    }
    kt_shape = run_kubetune(workdir, "shape", shape, data_dir, max_documents, vocab)

    train_texts = _read_jsonl_texts(data_dir / "dataset" / "train.jsonl")
    test_texts = _read_jsonl_texts(data_dir / "dataset" / "test.jsonl")[:TEST_LINES]
    torch.set_num_threads(threads)
    tpl = run_template(train_texts, tokenizer_dir, steps, vocab, workdir)

    kt_model = AutoModelForCausalLM.from_pretrained(str(kt["output"] / "model"))
    kt_loss = test_loss(kt_model, tokenizer, test_texts)
    tpl_loss = test_loss(tpl.pop("model"), tokenizer, test_texts)
    speedup = kt["steady_tokens_per_s"] / tpl["steady_tokens_per_s"]
    shape_speedup = kt_shape["steady_tokens_per_s"] / tpl["steady_tokens_per_s"]
    note = f"{steps} steps each, ~8 lines/step, fp32, {threads} threads"
    figures = [
        Figure(
            "train_tokens_per_s",
            kt["steady_tokens_per_s"],
            "tok/s",
            None,
            f"kubetune packed, 1 x {row} tokens/step (~8 lines), steady state",
        ),
        Figure(
            "template_tokens_per_s",
            tpl["steady_tokens_per_s"],
            "tok/s",
            None,
            "HF Trainer, 8 x 512 padded, useful tokens only, steady state",
        ),
        Figure("train_speedup_vs_template", speedup, "x", ">= 10", note),
        Figure(
            "train_test_loss",
            kt_loss,
            "nats/token",
            None,
            f"{len(test_texts)} held-out lines, after {kt['steps']} steps",
        ),
        Figure(
            "template_test_loss",
            tpl_loss,
            "nats/token",
            None,
            f"same lines, after {tpl['steps']} steps",
        ),
        Figure(
            "train_tokens_per_s_8x512",
            kt_shape["steady_tokens_per_s"],
            "tok/s",
            None,
            f"kubetune packed at the template's shape 8 x 512, {shape_steps} steps",
        ),
        Figure(
            "train_speedup_same_shape",
            shape_speedup,
            "x",
            ">= 10",
            "8 x 512 packed vs 8 x 512 padded",
        ),
    ]
    for d in (kt, kt_shape):
        d["output"] = str(d["output"])
    details = {
        "kubetune_budget": kt,
        "kubetune_shape": kt_shape,
        "template": tpl,
        "row_tokens": row,
        "mean_line_tokens": mean_line,
        "dataset": stats.to_wire(),
    }
    shutil.rmtree(workdir, ignore_errors=True)
    return figures, details
