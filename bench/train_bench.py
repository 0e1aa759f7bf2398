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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench import peers
from bench.assets import bench_tokenizer, scratch_root
from bench.common import TLDR_PAGES, Figure
from bench.flops import flops_per_token, gpt2_param_count, mfu
from bench.peak import best_peak, cpu_matmul_peak

SEED = 42
LEARNING_RATE = 1e-3
WARMUP_FRACTION = 0.1
MODEL = {"nLayer": 4, "nHead": 4, "nEmbd": 256, "nPositions": 512}
TEMPLATE_BATCH = 8
TEMPLATE_MAX_LENGTH = 512
TEST_LINES = 400
# Against the peers (HF group_texts, TRL SFT packing): rows of PEER_BLOCK tokens, batch 1.
PEER_BLOCK = 512
PEER_STEPS_QUICK = 12
PEER_STEPS_FULL = 60
# One round per seed, the sides alternating within it: each side's rate is its best round,
# its held-out loss the mean over the seeds (at 60 steps one side's loss moves by 1.5-4.5%
# from seed to seed, more than the 1% the comparison is about; bench/RESULTS.md).
PEER_SEEDS_QUICK = (42, 43)
PEER_SEEDS_FULL = (42, 43, 44)
PEER_DROPOUT = 0.0  # on every side of the peer and fraction-of-peak runs
# Fraction of peak: a GPT-2-small-like shape (GPT-2 small is 12 x 768, 12 heads).
MFU_MODEL_QUICK = {"nLayer": 2, "nHead": 12, "nEmbd": 768, "nPositions": 1024}
MFU_MODEL_FULL = {"nLayer": 12, "nHead": 12, "nEmbd": 768, "nPositions": 1024}
MFU_ROW = 512
MFU_STEPS_QUICK = 4
MFU_STEPS_FULL = 8


def make_job(
    output: str,
    training: dict[str, Any],
    max_documents: int,
    vocab: int,
    model: dict[str, int] | None = None,
) -> Any:
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
        model={
            "fresh": {**(model or MODEL), "vocabSize": vocab},
            "tokenizer": f"file://{bench_tokenizer()}",
        },
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
    model: dict[str, int] | None = None,
) -> dict[str, Any]:
    """prepare (unless ``dataset_from``) + train in their own output; figures of the run."""
    from kubetune_trainer import prepare, train
    from kubetune_trainer.context import make_context

    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    job = make_job(f"file://{out}", training, max_documents, vocab, model)
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


def combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's runs (one per seed) as one: the best steady rate, the mean held-out loss.

    The best rate, because a load change on the shared machine can only slow a run down;
    the mean loss, because the seed (initial weights, data order) moves it both ways.
    """
    if not rounds:
        raise ValueError("no rounds to combine")
    rates = [r["steady_tokens_per_s"] for r in rounds]
    losses = [r["test_loss"] for r in rounds]
    return {
        **{k: v for k, v in rounds[0].items() if k != "model"},
        "steady_tokens_per_s": max(rates),
        "rates": rates,
        "test_loss": sum(losses) / len(losses),
        "test_losses": losses,
        "seeds": [r.get("seed") for r in rounds],
    }


def loss_spread(losses: list[float]) -> str:
    """``mean over n seeds (min-max)`` for a figure's note."""
    if len(losses) == 1:
        return "one seed"
    return f"mean of {len(losses)} seeds ({min(losses):.3f}-{max(losses):.3f})"


def without_start_token(train_run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``train_run()`` with rows built without the bos kubetune puts before every line.

    An ablation, not a setting: each line is then ``tokens eos`` from position 0 and its
    first token is context (the segment start is never predicted), as in TRL's packing.
    """
    from kubetune_trainer import train

    original = train.build_rows

    def no_bos(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "bos_id": None})

    train.build_rows = no_bos
    try:
        return train_run()
    finally:
        train.build_rows = original


def no_bos_figures(kt_no_bos: dict[str, Any], runs: dict[str, dict[str, Any]]) -> list[Figure]:
    """The start-token ablation: its held-out loss, and its gap to the best peer."""
    figures = [
        Figure(
            "train_peer_kubetune_no_bos_test_loss",
            kt_no_bos["test_loss"],
            "nats/token",
            None,
            "ablation: kubetune rows without the start token (lines from position 0, "
            "TRL's layout), scored without context, tokens 2..n; "
            + loss_spread(kt_no_bos["test_losses"]),
        )
    ]
    if runs:
        best = min(runs, key=lambda n: runs[n]["test_loss"])
        figures.append(
            Figure(
                "train_loss_gap_no_bos_vs_best_peer",
                kt_no_bos["test_loss"] / runs[best]["test_loss"] - 1.0,
                "",
                None,
                f"ablation: (kubetune without bos / {best}) - 1",
            )
        )
    return figures


def test_loss(model: Any, tokenizer: Any, texts: list[str], context: int | None = None) -> float:
    """Summed NLL / predicted tokens of each text scored alone: tokens 2..n of every line.

    ``context``: the token a line follows in training (kubetune: its bos = eos;
    ``group_texts``: the previous line's eos), put before the line as context; None for
    a model trained on lines that start at position 0 (TRL's packing, the template).
    The first token is never counted, so every model is scored on the same targets,
    each in the layout it was trained on.
    """
    from kubetune_trainer.perplexity import score_sequences
    from kubetune_trainer.tokenizer_build import encode_batch

    ids = [x for x in encode_batch(tokenizer, texts) if len(x) > 1]
    masks = [[0] + [1] * (len(x) - 1) for x in ids] if context is not None else None
    result = score_sequences(
        model,
        ids,
        context_token=context,
        max_length=MODEL["nPositions"],
        batch_size=8,
        target_masks=masks,
    )
    return result.nll_sum / result.predicted_tokens


def peer_figures(
    kt: dict[str, Any],
    runs: dict[str, dict[str, Any]],
    errors: dict[str, str],
    steps: int,
    threads: int,
) -> list[Figure]:
    """kubetune vs the faster peer (tokens/s) and vs the best peer loss, plus each peer's rate.

    Every side is :func:`combine_rounds` of its runs: best rate, mean loss over the seeds.
    """
    shape = (
        f"1 x {PEER_BLOCK}, {steps} steps, fp32, dropout {PEER_DROPOUT:g}, {threads} thread(s); "
        f"every side: best of {len(kt['rates'])} runs (one per seed), the sides alternating"
    )
    labels = {
        "group_texts": "HF Trainer + run_clm group_texts",
        "trl_sft": "TRL SFTTrainer packing=True (bfd, padding-free)",
    }
    figures = [
        Figure(
            "train_peer_kubetune_tokens_per_s",
            kt["steady_tokens_per_s"],
            "tok/s",
            None,
            f"kubetune train.run packed, {shape}",
        ),
        Figure(
            "train_peer_kubetune_test_loss",
            kt["test_loss"],
            "nats/token",
            None,
            "lines kept apart; scored after its bos (eos), tokens 2..n; "
            + loss_spread(kt["test_losses"]),
        ),
    ]
    for name, label in labels.items():
        if name in runs:
            r = runs[name]
            figures.append(
                Figure(f"{name}_tokens_per_s", r["steady_tokens_per_s"], "tok/s", None, label)
            )
            apart = (
                "lines cross rows; scored after an eos, tokens 2..n"
                if name == "group_texts"
                else "lines kept apart, start at position 0; scored without context, tokens 2..n"
            )
            figures.append(
                Figure(
                    f"{name}_test_loss",
                    r["test_loss"],
                    "nats/token",
                    None,
                    f"{apart}; {loss_spread(r['test_losses'])}",
                )
            )
        else:
            figures.append(
                Figure(f"{name}_tokens_per_s", None, "tok/s", None, f"not measured: {errors[name]}")
            )
    if runs:
        fastest = max(runs, key=lambda n: runs[n]["steady_tokens_per_s"])
        best_loss = min(runs, key=lambda n: runs[n]["test_loss"])
        figures.append(
            Figure(
                "train_speedup_vs_fastest_peer",
                kt["steady_tokens_per_s"] / runs[fastest]["steady_tokens_per_s"],
                "x",
                ">= 1.0",
                f"vs {fastest}, same tokens and steps",
            )
        )
        figures.append(
            Figure(
                "train_loss_gap_vs_best_peer",
                kt["test_loss"] / runs[best_loss]["test_loss"] - 1.0,
                "",
                "<= 0.01",
                f"(kubetune / {best_loss}) - 1 on {TEST_LINES} held-out lines, "
                f"losses averaged over seeds {', '.join(map(str, kt['seeds']))}",
            )
        )
    else:
        figures += [
            Figure("train_speedup_vs_fastest_peer", None, "x", ">= 1.0", "no peer ran"),
            Figure("train_loss_gap_vs_best_peer", None, "", "<= 0.01", "no peer ran"),
        ]
    return figures


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

    # Against the peers: same rows of PEER_BLOCK tokens, batch 1, same steps (= tokens),
    # dropout 0 on every side. One round per seed, the sides alternating within it
    # (kubetune, peers, ablation, kubetune, ...): a load change on the shared machine then
    # moves every side, not one. Each run is scored on the held-out lines as it ends.
    peer_steps = PEER_STEPS_QUICK if quick else PEER_STEPS_FULL
    peer_seeds = PEER_SEEDS_QUICK if quick else PEER_SEEDS_FULL
    peer_training = {
        **shape,
        "maxSteps": peer_steps,
        "batchSize": 1,
        "maxSeqLength": PEER_BLOCK,
        "dropout": PEER_DROPOUT,
    }
    eos = int(tokenizer.eos_token_id)

    def kubetune_round(name: str, seed: int, context: int | None) -> dict[str, Any]:
        got = run_kubetune(
            workdir, name, {**peer_training, "seed": seed}, data_dir, max_documents, vocab
        )
        model = AutoModelForCausalLM.from_pretrained(str(got["output"] / "model"))
        got["output"] = str(got["output"])
        return {**got, "seed": seed, "test_loss": test_loss(model, tokenizer, test_texts, context)}

    kt_rounds: list[dict[str, Any]] = []
    no_bos_rounds: list[dict[str, Any]] = []
    peer_rounds: dict[str, list[dict[str, Any]]] = {}
    peer_errors: dict[str, str] = {}
    for seed in peer_seeds:
        kt_rounds.append(kubetune_round(f"peer-{seed}", seed, context=eos))
        for peer_name, peer_fn in (
            ("group_texts", peers.run_group_texts),
            ("trl_sft", peers.run_trl_sft),
        ):
            if peer_name in peer_errors:
                continue
            if peer_name == "trl_sft" and peers.trl_version() is None:
                peer_errors[peer_name] = "trl is not installed (pip install -e '.[bench]')"
                continue
            torch.set_num_threads(threads)
            try:
                got = peer_fn(
                    train_texts,
                    tokenizer_dir,
                    MODEL,
                    PEER_BLOCK,
                    peer_steps,
                    workdir,
                    dropout=PEER_DROPOUT,
                    seed=seed,
                )
            except Exception as exc:  # a peer that fails is reported, the others still run
                peer_errors[peer_name] = f"{type(exc).__name__}: {exc}"
                continue
            peer_model = got.pop("model")
            # Each scored in its training layout: group_texts lines follow an eos, TRL's
            # start at position 0 (the other layout is kept in the details).
            after_eos = test_loss(peer_model, tokenizer, test_texts, context=eos)
            no_context = test_loss(peer_model, tokenizer, test_texts)
            got.update(seed=seed, test_loss_after_eos=after_eos, test_loss_no_context=no_context)
            got["test_loss"] = after_eos if peer_name == "group_texts" else no_context
            peer_rounds.setdefault(peer_name, []).append(got)
        # Ablation: kubetune's layout without the start token (TRL's layout: a line starts
        # at position 0 and its first token is context): what the bos costs at equal tokens.
        no_bos_rounds.append(
            without_start_token(partial(kubetune_round, f"peer-no-bos-{seed}", seed, None))
        )
    kt_peer = combine_rounds(kt_rounds)
    kt_no_bos = combine_rounds(no_bos_rounds)
    peer_runs = {name: combine_rounds(rounds) for name, rounds in peer_rounds.items()}

    # Fraction of the CPU's matmul peak at a GPT-2-small-like shape (the real stage).
    mfu_model = MFU_MODEL_QUICK if quick else MFU_MODEL_FULL
    mfu_training = {
        **shape,
        "maxSteps": MFU_STEPS_QUICK if quick else MFU_STEPS_FULL,
        "batchSize": 1,
        "maxSeqLength": MFU_ROW,
    }
    peak_before = cpu_matmul_peak(threads, quick)
    kt_mfu = run_kubetune(
        workdir,
        "mfu",
        {**mfu_training, "dropout": PEER_DROPOUT},
        data_dir,
        max_documents,
        vocab,
        model=mfu_model,
    )
    kt_mfu_dropout = run_kubetune(
        workdir, "mfu-dropout", mfu_training, data_dir, max_documents, vocab, model=mfu_model
    )
    peak = best_peak(peak_before, cpu_matmul_peak(threads, quick))
    n_params = gpt2_param_count(
        mfu_model["nLayer"],
        mfu_model["nEmbd"],
        vocab,
        mfu_model["nPositions"],
        include_positions=False,
    )
    mfu_flops = flops_per_token(n_params, mfu_model["nLayer"], mfu_model["nEmbd"], MFU_ROW)
    train_mfu = mfu(kt_mfu["steady_tokens_per_s"], mfu_flops, peak["fp32_flops"])
    train_mfu_dropout = mfu(kt_mfu_dropout["steady_tokens_per_s"], mfu_flops, peak["fp32_flops"])

    torch.set_num_threads(threads)
    tpl = run_template(train_texts, tokenizer_dir, steps, vocab, workdir)

    kt_model = AutoModelForCausalLM.from_pretrained(str(kt["output"] / "model"))
    kt_loss = test_loss(kt_model, tokenizer, test_texts, context=int(tokenizer.eos_token_id))
    tpl_loss = test_loss(tpl.pop("model"), tokenizer, test_texts)
    speedup = kt["steady_tokens_per_s"] / tpl["steady_tokens_per_s"]
    shape_speedup = kt_shape["steady_tokens_per_s"] / tpl["steady_tokens_per_s"]
    note = f"{steps} steps each, ~8 lines/step, fp32, {threads} threads"
    figures = peer_figures(kt_peer, peer_runs, peer_errors, peer_steps, threads)
    figures += no_bos_figures(kt_no_bos, peer_runs)
    figures += [
        Figure(
            "cpu_matmul_peak_gflops",
            peak["fp32_flops"] / 1e9,
            "GFLOP/s",
            None,
            f"best fp32 torch.mm, square {max(int(k.split('_')[1]) for k in peak['by_size'])}, "
            f"{threads} thread(s); bf16 "
            + (f"{peak['bf16_flops'] / 1e9:.0f}" if peak["bf16_flops"] else "n/a"),
        ),
        Figure(
            "train_mfu",
            train_mfu,
            "of peak",
            ">= 0.5",
            f"kubetune train.run, GPT-2-small-like {mfu_model['nLayer']} x {mfu_model['nEmbd']}, "
            f"{mfu_model['nHead']} heads, vocab {vocab}, 1 x {MFU_ROW} packed, fp32, "
            f"dropout 0, {kt_mfu['steady_tokens_per_s']:.1f} tok/s x "
            f"{mfu_flops / 1e6:.0f} MFLOP/token",
        ),
        Figure(
            "train_mfu_default_dropout",
            train_mfu_dropout,
            "of peak",
            None,
            f"same, with GPT-2's dropout 0.1 (training.dropout unset), "
            f"{kt_mfu_dropout['steady_tokens_per_s']:.1f} tok/s",
        ),
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
            f"{len(test_texts)} held-out lines, tokens 2..n after its bos, {kt['steps']} steps",
        ),
        Figure(
            "template_test_loss",
            tpl_loss,
            "nats/token",
            None,
            f"same lines and targets, no context (its layout), {tpl['steps']} steps",
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
    for d in (kt, kt_shape, kt_mfu, kt_mfu_dropout):
        d["output"] = str(d["output"])
    details = {
        "kubetune_budget": kt,
        "kubetune_shape": kt_shape,
        "template": tpl,
        "kubetune_peer": kt_peer,
        "peers": peer_runs,
        "peer_errors": peer_errors,
        "kubetune_peer_no_bos": kt_no_bos,
        "peer_seeds": list(peer_seeds),
        "kubetune_mfu": {**kt_mfu, "model": mfu_model, "flops_per_token": mfu_flops},
        "kubetune_mfu_default_dropout": kt_mfu_dropout,
        "peak": peak,
        "row_tokens": row,
        "mean_line_tokens": mean_line,
        "dataset": stats.to_wire(),
    }
    shutil.rmtree(workdir, ignore_errors=True)
    return figures, details
