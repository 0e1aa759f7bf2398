"""The tokenizer of a job: loaded (hub id or storage prefix) or trained fresh (byte-level BPE).

Usage::

    from kubetune_trainer.tokenizer_build import load_tokenizer, train_bpe_tokenizer
    tok = load_tokenizer("gpt2")                                    # hub id
    tok = load_tokenizer("s3://models/gpt2/", ctx.open, ctx.scratch_dir("tokenizer"))
    tok = train_bpe_tokenizer(lines, vocab_size=8192)              # for model.fresh

The prepare stage saves whichever tokenizer it used to ``dataset/tokenizer/``;
train and evaluate load it from there (``AutoTokenizer.from_pretrained``), so
no later stage needs the hub. ``EOS`` is ``<|endoftext|>`` as in GPT-2, and it
doubles as BOS and PAD: GPT-2-style models have no separate pad token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_trainer.context import StageError
from kubetune_trainer.schema import ModelSpec
from kubetune_trainer.storage import Storage, StorageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_bpe_tokenizer(
    lines: Iterable[str],
    vocab_size: int,
    *,
    model_max_length: int = 1024,
    length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer on ``lines`` (streamed, never held).

    Byte-level means every string encodes (no unknown token) and decodes back
    exactly; ``<|endoftext|>`` is the only special token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer, length=length)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _is_storage_uri(name: str) -> bool:
    return name.startswith(("s3://", "file://"))


def load_tokenizer(
    name: str,
    open_storage: Callable[[str], Storage] | None = None,
    scratch: Path | None = None,
    *,
    revision: str | None = None,
) -> PreTrainedTokenizerBase:
    """A tokenizer from a hub id or from an ``s3://``/``file://`` save_pretrained() prefix.

    A storage prefix is downloaded to ``scratch`` first. A tokenizer without a
    pad token gets pad = eos (GPT-2 convention) so batching works downstream.
    """
    from transformers import AutoTokenizer

    source: str = name
    if _is_storage_uri(name):
        if open_storage is None or scratch is None:
            raise ValueError("loading a tokenizer from storage needs open_storage and scratch")
        local = scratch / "tokenizer-download"
        try:
            storage = open_storage(name)
            storage.download_dir("", local)
        except StorageError as exc:
            raise StageError(
                f"tokenizer {name}: {exc}; it must be a prefix holding a save_pretrained() "
                "tokenizer (tokenizer.json or vocab files)"
            ) from None
        source = str(local)
        revision = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, use_fast=True)
    except Exception as exc:
        where = "the hub" if not _is_storage_uri(name) else "that prefix"
        raise StageError(
            f"cannot load tokenizer {name!r} from {where}: {type(exc).__name__}: {exc}. For an "
            "air-gapped cluster, save the model and tokenizer with save_pretrained() to S3 and set "
            "model.uri (or model.tokenizer) to that prefix"
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_name(model: ModelSpec) -> str:
    """What the prepare result records as the tokenizer used."""
    if model.tokenizer:
        return model.tokenizer
    if model.fresh is not None:
        return f"byte-level BPE trained on the train split (vocab {model.fresh.vocab_size})"
    return model.name or model.uri or "unknown"


def model_tokenizer_source(model: ModelSpec) -> str | None:
    """The hub id or URI to load the tokenizer from; None means train a fresh one."""
    if model.tokenizer:
        return model.tokenizer
    if model.fresh is not None:
        return None
    return model.name or model.uri


def encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens; uses the Rust batch call when it can."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is not None:
        fast = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [enc.ids for enc in fast(texts, add_special_tokens=False)]
    ids: list[list[int]] = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)[
        "input_ids"
    ]
    return ids
