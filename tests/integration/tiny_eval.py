"""Tiny artifacts for the evaluate/report tests: a BPE tokenizer, GPT-2 models, a run layout.

Everything is built from real text (tldr-pages) in a few seconds on a CPU:

* :func:`tldr_lines` reads example descriptions and commands from tldr pages;
* :func:`train_tokenizer` trains a byte-level BPE (``tokenizers``) wrapped in
  ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as bos/eos;
* :func:`tiny_gpt2` builds a 2-layer, 64-wide GPT-2; :func:`fit` trains it a few steps;
* :func:`write_run` writes the inputs evaluate and report read (test split,
  token arrays, tokenizer, fine-tuned model, train metrics, prepare/train
  results) under a ``file://`` output with :class:`RunLayout` keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubetune.layout import RunLayout
from kubetune.results import PrepareResult, TrainingRecord, TrainResult
from kubetune.schema import DatasetStats, FineTuneJob, job_manifest, parse_job
from kubetune.storage import open_storage

DATA = Path(__file__).resolve().parents[2] / "../shared/data"
EOS = "<|endoftext|>"
N_POSITIONS = 64
SEED = 7
DATASET_FINGERPRINT = "d" * 64


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: on a shared, busy CPU, more threads spin and run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tldr_lines(limit: int, platform: str = "common") -> list[str]:
    """Description and command lines of tldr pages (markup stripped), in file order."""
    lines: list[str] = []
    for page in sorted((DATA / "tldr-pages" / "pages" / platform).glob("*.md")):
        for raw in page.read_text(encoding="utf-8").splitlines():
            raw = raw.strip()
            if raw.startswith("- "):
                text = raw[2:].rstrip(":")
            elif raw.startswith("`") and raw.endswith("`"):
                text = raw.strip("`").replace("{{", "").replace("}}", "")
            else:
                continue
            if len(text.split()) >= 2:
                lines.append(text)
            if len(lines) >= limit:
                return lines
    return lines


def train_tokenizer(lines: list[str], vocab_size: int = 512) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS)


def tiny_gpt2(vocab_size: int, seed: int = SEED, n_positions: int = N_POSITIONS) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=n_positions,
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def fit(model: Any, token_lines: list[list[int]], eos: int, steps: int = 60) -> Any:
    """A few AdamW steps on eos-separated packed blocks: enough to beat the random init."""
    stream = [t for ids in token_lines for t in [eos, *ids]]
    block = model.config.n_positions
    blocks = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(blocks), (8,), generator=gen)
        loss = model(input_ids=blocks[idx], labels=blocks[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def make_job(output: str, **evaluation: Any) -> FineTuneJob:
    """The job evaluate and report read: a tiny fresh GPT-2 on ``output`` (evaluation overrides)."""
    defaults = {
        "model": {
            "fresh": {
                "nLayer": 2,
                "nHead": 2,
                "nEmbd": 64,
                "nPositions": N_POSITIONS,
                "vocabSize": 512,
            }
        },
        "dataset": {"source": "file:///dev/null/tldr.md"},
        "training": {"maxSeqLength": N_POSITIONS, "seed": SEED, "maxSteps": 40},
        "evaluation": {"bleu": {"maxSamples": 40, "maxNewTokens": 12}},
    }
    return parse_job(
        job_manifest("tiny-eval", defaults, evaluation=evaluation, storage={"output": output})
    )


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_run(root: Path, n_train: int = 1500, n_test: int = 60) -> dict[str, Any]:
    """Write every input of evaluate and report under ``file://root``; returns the pieces."""
    lines = tldr_lines(n_train + n_test)
    train, test = lines[:n_train], lines[n_train:]
    tokenizer = train_tokenizer(train)
    eos = tokenizer.eos_token_id
    store = open_storage(f"file://{root}")
    work = root.parent / f"{root.name}-work"

    store.write_text(
        RunLayout.TEST_TEXT,
        "".join(json.dumps({"text": t, "doc": f"common/{i}"}) + "\n" for i, t in enumerate(test)),
    )
    train_jsonl = "".join(json.dumps({"text": t, "doc": "common/train"}) + "\n" for t in train)
    store.write_text(RunLayout.TRAIN_TEXT, train_jsonl)
    test_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in test]
    offsets = np.cumsum([0] + [len(ids) for ids in test_ids]).astype(np.int64)
    store.write_bytes(
        RunLayout.TEST_TOKENS, _npy(np.array([t for ids in test_ids for t in ids], dtype=np.uint32))
    )
    store.write_bytes(RunLayout.TEST_OFFSETS, _npy(offsets))
    tokenizer.save_pretrained(work / "tokenizer")
    store.upload_dir(work / "tokenizer", RunLayout.TOKENIZER)

    train_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in train]
    with one_thread():
        model = fit(tiny_gpt2(len(tokenizer)), train_ids, eos)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    store.upload_dir(work / "model", RunLayout.MODEL)

    write_stage_results(
        store,
        n_train,
        n_test,
        sum(map(len, train_ids)),
        int(offsets[-1]),
        train_sha256=hashlib.sha256(train_jsonl.encode()).hexdigest(),
    )
    return {
        "tokenizer": tokenizer,
        "model": model,
        "test": test,
        "test_ids": test_ids,
        "train_ids": train_ids,
        "store": store,
    }


def write_stage_results(
    store: Any,
    n_train: int,
    n_test: int,
    train_tokens: int,
    test_tokens: int,
    train_sha256: str = "0" * 64,
) -> None:
    """prepare.json, train.json, the model's training record and a 40-step
    train/metrics.jsonl, as the other stages write them."""
    metrics = [
        {
            "step": s,
            "epoch": s / 40,
            "loss": 6.0 * math.exp(-s / 15) + 2.0,
            "lr": 3e-3,
            "tokens_per_second": 5000.0,
            "elapsed": s * 0.1,
        }
        for s in range(1, 41)
    ]
    store.write_text(RunLayout.TRAIN_METRICS, "".join(json.dumps(m) + "\n" for m in metrics))
    stats = DatasetStats(
        documents=10,
        lines=n_train + n_test + 7,
        kept_lines=n_train + n_test,
        dropped_short=4,
        duplicates_removed=3,
        train_lines=n_train,
        test_lines=n_test,
        train_tokens=train_tokens,
        test_tokens=test_tokens,
    )
    store.write_text(
        RunLayout.PREPARE_RESULT,
        PrepareResult(
            stats=stats,
            train_sha256=train_sha256,
            test_sha256="1" * 64,
            tokenizer="trained byte-level BPE",
            dataset_uri=store.uri(RunLayout.DATASET),
            fingerprint=DATASET_FINGERPRINT,
            fingerprint_inputs={"dataset": {"split": {"seed": SEED}}},
            seconds=1.5,
        ).to_json(),
    )
    store.write_text(
        RunLayout.MODEL_RECORD,
        TrainingRecord(
            dataset_fingerprint=DATASET_FINGERPRINT,
            train_sha256=train_sha256,
            training_fingerprint="t" * 64,
            dataset_inputs={"dataset": {"split": {"seed": SEED}}},
            steps=40,
        ).to_json(),
    )
    store.write_text(
        RunLayout.TRAIN_RESULT,
        TrainResult(
            steps=40,
            total_steps=40,
            epochs=1.0,
            final_loss=metrics[-1]["loss"],
            train_tokens=10000,
            tokens_per_second=5000.0,
            model_uri=store.uri(RunLayout.MODEL),
            seconds=4.0,
            config={
                "learningRate": 3e-3,
                "batchSize": 16,
                "maxSeqLength": N_POSITIONS,
                "lora": {"r": 8, "alpha": 16},
            },
        ).to_json(),
    )
