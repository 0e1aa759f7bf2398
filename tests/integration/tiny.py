"""Tiny, real inputs for stage tests: text, a BPE tokenizer, a prepared dataset, GPT-2s, jobs.

Everything is built in a second or two on a CPU from the shared corpora
(``../shared/data``), never from the hub:

* :func:`tldr_lines` / :func:`shakespeare_lines`: real text lines;
* :func:`train_tokenizer`: the byte-level BPE prepare itself trains
  (``tokenizer_build.train_bpe_tokenizer``, ``<|endoftext|>`` = bos/eos/pad);
* :func:`write_prepared`: what the prepare stage leaves under ``dataset/``
  (``{train,test}.jsonl``, ``.tokens.npy``, ``.offsets.npy``, written by
  :mod:`kubetune.dataset_format`; ``tokenizer/``, ``prepare.json``), at the
  :class:`RunLayout` keys, so train/evaluate/report tests do not depend on prepare;
* :func:`save_tiny_model`: a 2-layer, 64-wide GPT-2 ``save_pretrained`` dir (for
  ``model.uri`` jobs: LoRA needs a pre-trained model);
* :func:`make_job`: a FineTuneJob for a tiny fresh GPT-2 (overrides per section).

Example::

    lines = tldr_lines(1200)
    tok = train_tokenizer(lines[:1000])
    write_prepared("file:///tmp/run", lines[:1000], lines[1000:], tok)
    job = make_job("file:///tmp/run", training={"maxSteps": 30})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.dataset_format import TEST, TRAIN, upload_splits, write_split
from kubetune.layout import RunLayout
from kubetune.results import PrepareResult
from kubetune.schema import DatasetStats, FineTuneJob, job_manifest, parse_job
from kubetune.storage import open_storage
from kubetune_trainer.tokenizer_build import EOS, encode_batch, train_bpe_tokenizer

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
N_POSITIONS = 64
VOCAB = 512
SEED = 7

__all__ = [
    "DATA",
    "EOS",
    "N_POSITIONS",
    "SEED",
    "VOCAB",
    "make_job",
    "save_tiny_model",
    "shakespeare_lines",
    "tldr_lines",
    "train_tokenizer",
    "write_prepared",
]


def tldr_lines(limit: int, platform: str = "common", skip: int = 0) -> list[str]:
    """Descriptions and example commands of tldr pages (markup stripped), in file order."""
    lines: list[str] = []
    seen = 0
    for page in sorted((DATA / "tldr-pages" / "pages" / platform).glob("*.md")):
        for raw in page.read_text(encoding="utf-8").splitlines():
            raw = raw.strip()
            if raw.startswith("> ") and not raw.startswith("> More information"):
                text = raw[2:]
            elif raw.startswith("- "):
                text = raw[2:].rstrip(":")
            elif raw.startswith("`") and raw.endswith("`"):
                text = raw.strip("`").replace("{{", "").replace("}}", "")
            else:
                continue
            if len(text) < 8:
                continue
            seen += 1
            if seen <= skip:
                continue
            lines.append(text)
            if len(lines) >= limit:
                return lines
    return lines


def shakespeare_lines(limit: int, skip: int = 0) -> list[str]:
    """Non-empty lines of tiny Shakespeare (speaker names dropped)."""
    out: list[str] = []
    for raw in (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines():
        raw = raw.strip()
        if len(raw) < 8 or raw.endswith(":"):
            continue
        out.append(raw)
    return out[skip : skip + limit]


def train_tokenizer(lines: list[str], vocab_size: int = VOCAB, model_max_length: int = 1024) -> Any:
    """The same byte-level BPE the prepare stage trains for ``model.fresh``."""
    return train_bpe_tokenizer(lines, vocab_size, model_max_length=model_max_length)


def write_prepared(
    output: str, train: list[str], test: list[str], tokenizer: Any, work: Path | None = None
) -> PrepareResult:
    """Write a prepared dataset under ``output`` (a ``file://`` or ``s3://`` URI).

    The files come from :mod:`kubetune.dataset_format`'s writer, built in ``work`` (a
    temporary directory by default) and uploaded.
    """
    store = open_storage(output)
    if work is None:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="tiny-tokenizer-"))
    written = {
        split: write_split(
            work / "dataset",
            split,
            lines,
            encode_batch(tokenizer, lines),
            [f"tldr/{i}" for i in range(len(lines))],
        )
        for split, lines in ((TRAIN, train), (TEST, test))
    }
    upload_splits(store, work / "dataset")
    tokenizer.save_pretrained(str(work / "tokenizer"))
    store.upload_dir(work / "tokenizer", RunLayout.TOKENIZER)
    stats = DatasetStats(
        documents=1,
        lines=len(train) + len(test),
        kept_lines=len(train) + len(test),
        train_lines=len(train),
        test_lines=len(test),
        train_tokens=written[TRAIN].tokens,
        test_tokens=written[TEST].tokens,
    )
    result = PrepareResult(
        stats=stats,
        train_sha256=written[TRAIN].sha256,
        test_sha256=written[TEST].sha256,
        tokenizer=f"byte-level BPE (vocab {len(tokenizer)})",
        dataset_uri=store.uri(RunLayout.DATASET),
    )
    store.write_text(RunLayout.PREPARE_RESULT, result.to_json())
    return result


def save_tiny_model(
    path: Path, tokenizer: Any, seed: int = SEED, n_positions: int = N_POSITIONS
) -> Path:
    """A random 2-layer GPT-2 (64 wide) + tokenizer saved with save_pretrained()."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=n_positions,
        vocab_size=len(tokenizer),
        bos_token_id=eos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def make_job(
    output: str,
    *,
    name: str = "tiny",
    model: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    namespace: str | None = None,
) -> FineTuneJob:
    """A FineTuneJob for a tiny fresh GPT-2 on ``output``; sections override the defaults."""
    tiny_fresh_gpt2 = {
        "fresh": {
            "nLayer": 2,
            "nHead": 2,
            "nEmbd": 64,
            "nPositions": N_POSITIONS,
            "vocabSize": VOCAB,
        }
    }
    defaults = {
        "dataset": {"source": f"file://{DATA}/tldr-pages/pages/common/"},
        "training": {
            "maxSeqLength": N_POSITIONS,
            "batchSize": 8,
            "learningRate": 3e-3,
            "warmupRatio": 0.1,
            "precision": "fp32",
            "seed": SEED,
            "maxSteps": 30,
            "checkpointEverySteps": 10,
            "logEverySteps": 5,
        },
        "evaluation": {"bleu": {"maxSamples": 20, "maxNewTokens": 12}},
    }
    return parse_job(
        job_manifest(
            name,
            defaults,
            namespace=namespace,
            model=model or tiny_fresh_gpt2,  # a whole model section replaces the tiny one
            training=training,
            evaluation=evaluation,
            storage={"output": output},
        )
    )
