"""What users pick instead of kubetune's train stage: Hugging Face ``Trainer`` with run_clm's
``group_texts`` packing, and TRL's ``SFTTrainer`` with packing (best-fit decreasing,
padding-free, per-example ``position_ids``). Used by ``bench.train_bench``.

Both get what kubetune gets: the same fresh GPT-2 config and seed, tokenizer, training
lines (the prepared ``train.jsonl``), AdamW lr/cosine/warmup/clip, fp32, thread count,
rows of ``block`` tokens, batch 1 and the same number of optimizer steps, so the same
number of tokens. Throughput is useful (non-padding) tokens per second of steps 2..N
(step 1 is the warm-up), timed by a ``TrainerCallback``; the tokens are counted in the
data collator. Nothing here is tuned down: each peer runs as its documentation shows.

``dropout`` sets the model's dropout on every side alike (the comparison uses 0, which is
what ``training.dropout: 0`` gives kubetune; None keeps GPT-2's 0.1). ``seed`` seeds the
initial weights and the data order (kubetune's ``training.seed``): at 60 steps the held-out
loss of one side moves by 1.5-4.5% from seed to seed, so the comparison averages seeds.

Differences that are the peers' design, not the benchmark's: ``group_texts`` cuts the
concatenated lines into blocks with no regard to line boundaries (a line may start in
one row and end in the next; attention crosses lines), kubetune and TRL keep lines apart.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

SEED = 42
LEARNING_RATE = 1e-3
WARMUP_FRACTION = 0.1


def gpt2_config(model: dict[str, int], vocab: int, eos: int, dropout: float | None = None) -> Any:
    """GPT-2 config of the benchmark's shape; ``dropout`` (None: GPT-2's 0.1) on every layer."""
    from transformers import GPT2Config

    config = GPT2Config(
        n_layer=model["nLayer"],
        n_head=model["nHead"],
        n_embd=model["nEmbd"],
        n_positions=model["nPositions"],
        vocab_size=vocab,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    if dropout is not None:
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
    return config


def fresh_model(
    model: dict[str, int], vocab: int, eos: int, dropout: float | None = None, seed: int = SEED
) -> Any:
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(seed)
    return AutoModelForCausalLM.from_config(
        gpt2_config(model, vocab, eos, dropout), attn_implementation="sdpa"
    )


def lines_for_tokens(texts: list[str], tokenizer: Any, tokens: int) -> list[str]:
    """The first lines of ``texts`` that hold at least ``tokens`` tokens (+1 eos each), +10%."""
    out: list[str] = []
    total = 0
    for start in range(0, len(texts), 1000):
        chunk = texts[start : start + 1000]
        for text, ids in zip(chunk, tokenizer(chunk)["input_ids"], strict=True):
            out.append(text)
            total += len(ids) + 1
            if total >= tokens * 1.1:
                return out
    return out


def training_arguments(output: Path, steps: int, seed: int = SEED) -> dict[str, Any]:
    """``TrainingArguments`` keywords shared by both peers (and the template)."""
    return {
        "output_dir": str(output),
        "per_device_train_batch_size": 1,
        "max_steps": steps,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "cosine",
        "warmup_steps": math.ceil(WARMUP_FRACTION * steps),
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "logging_steps": max(steps, 1),
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": seed,
        "data_seed": seed,
    }


def timed_train(trainer: Any) -> dict[str, Any]:
    """Run ``trainer.train()``; useful tokens/s of steps 2..N, counted in its collator."""
    from transformers import TrainerCallback

    collate = trainer.data_collator
    useful: list[int] = []
    keys: list[str] = []

    def counting_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        keys[:] = sorted(batch)
        mask = batch.get("attention_mask")
        useful.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step_ends.append(time.perf_counter())

    trainer.data_collator = counting_collator
    trainer.add_callback(StepClock())
    start = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - start
    if len(step_ends) < 2:
        raise RuntimeError("fewer than 2 steps ran; raise the step count")
    steps = len(step_ends)
    return {
        "steady_tokens_per_s": sum(useful[1:steps]) / (step_ends[-1] - step_ends[0]),
        "useful_tokens": sum(useful[:steps]),
        "steps": steps,
        "final_train_loss": float(out.training_loss),
        "wall_s": wall,
        "batch_keys": keys,
        "model": trainer.model,
    }


def run_group_texts(
    texts: list[str],
    tokenizer_dir: Path,
    model: dict[str, int],
    block: int,
    steps: int,
    workdir: Path,
    dropout: float | None = None,
    seed: int = SEED,
) -> dict[str, Any]:
    """HF ``Trainer`` + run_clm's ``tokenize_function`` / ``group_texts`` (eos after each line)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = int(tokenizer.eos_token_id)
    lines = lines_for_tokens(texts, tokenizer, steps * block)

    def tokenize_function(batch: dict[str, list[str]]) -> dict[str, Any]:
        return {"input_ids": [[*ids, eos] for ids in tokenizer(batch["text"])["input_ids"]]}

    def group_texts(examples: dict[str, list[list[int]]]) -> dict[str, Any]:
        # run_clm.py's group_texts: concatenate, drop the remainder, cut into blocks.
        concatenated = {k: list(itertools.chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block) * block
        result = {
            k: [t[i : i + block] for i in range(0, total, block)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = Dataset.from_dict({"text": lines}).map(
        tokenize_function, batched=True, remove_columns=["text"]
    )
    dataset = tokenized.map(group_texts, batched=True, batch_size=1000)
    trainer = Trainer(
        model=fresh_model(model, len(tokenizer), eos, dropout, seed),
        args=TrainingArguments(**training_arguments(workdir / "group-texts", steps, seed)),
        train_dataset=dataset,
        data_collator=default_data_collator,
    )
    result = timed_train(trainer)
    result["rows"] = len(dataset)
    return result


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return str(trl.__version__)


def run_trl_sft(
    texts: list[str],
    tokenizer_dir: Path,
    model: dict[str, int],
    block: int,
    steps: int,
    workdir: Path,
    dropout: float | None = None,
    seed: int = SEED,
) -> dict[str, Any]:
    """TRL ``SFTTrainer``, ``packing=True`` (bfd: padding-free, per-example position ids)."""
    import warnings

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = int(tokenizer.eos_token_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lines = lines_for_tokens(texts, tokenizer, steps * block)
    config = SFTConfig(
        **training_arguments(workdir / "trl-sft", steps, seed),
        packing=True,
        packing_strategy="bfd",
        # SFTConfig's own defaults are bf16=True and gradient checkpointing; the comparison
        # is fp32 on every side, and checkpointing would only slow TRL down (recompute).
        bf16=False,
        activation_checkpointing=False,  # transformers 5 name of gradient_checkpointing
        max_length=block,
        dataset_text_field="text",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(
            model=fresh_model(model, len(tokenizer), eos, dropout, seed),
            args=config,
            train_dataset=Dataset.from_dict({"text": lines}),
            processing_class=tokenizer,
        )
        result = timed_train(trainer)
    result["padding_free"] = bool(getattr(trainer.args, "padding_free", False))
    result["trl"] = trl_version()
    return result
