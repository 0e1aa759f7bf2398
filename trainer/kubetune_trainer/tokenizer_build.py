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

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.contract import StageError
from kubetune.schema import ModelSpec, Reason
from kubetune.storage import Storage, StorageError, StorageNotFound, is_permanent

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


# Model weights and optimizer state: a tokenizer never needs them, and they are most of
# the bytes of a model prefix (prepare loads only the tokenizer).
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
)


def is_weights_file(key: str) -> bool:
    """True for model weight files (``model.safetensors``, ``pytorch_model-0001.bin``, ...)."""
    return key.lower().endswith(WEIGHT_SUFFIXES) or key.endswith(".safetensors.index.json")


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
        what = "a save_pretrained() tokenizer (tokenizer.json or vocab files)"
        try:
            storage = open_storage(name)
            keys = storage.list("")
            files = [key for key in keys if not is_weights_file(key)]
            if not files:
                what_is_there = "only model weights" if keys else "nothing stored"
                raise StorageNotFound(f"{name}: {what_is_there} there")
            for key in files:
                storage.download_file(key, local / key)
        except StorageError as exc:
            reason = Reason.INVALID_SPEC if is_permanent(exc) else Reason.STAGE_FAILED
            raise StageError(
                f"tokenizer {name}: {exc}; it must be a prefix holding {what}", reason=reason
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


# GPT-2's pre-tokenizer pattern restricted to printable ASCII (where \p{L} = [A-Za-z],
# \p{N} = [0-9] and the only whitespace is " "): exactly what the Rust ByteLevel
# pre-tokenizer (use_regex=True) splits such a line into.
_ASCII_WORDS = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
)
_WORD_CACHE_MAX = 1 << 19
# Strings the fast path must tokenize exactly like the Rust tokenizer before it is used.
_PROBES = (
    "Create an archive from files: tar cf target.tar file1 file2",
    "it's what we'll do, they've said I'm sure he'd   see  x  ",
    "a_b-c.d/e~f {{path/to/file}} 123 4567 x86_64 --flag=value ",
    "  leading and trailing  ",
    "<|endoftext|> is special",
)


class FastEncoder:
    """``encode(texts)`` = the tokenizer's ids for each text, no special tokens added.

    Calls the Rust batch encoder, except for printable-ASCII lines of a GPT-2-style
    byte-level BPE tokenizer (no normalizer, ``ByteLevel(add_prefix_space=False,
    use_regex=True)`` pre-tokenizer, BPE without dropout): those are split into
    words with the same pattern in Python and each distinct word is run through the
    BPE model once and cached. Prepare sees the same few thousand words over and
    over, so this is ~2x faster than the Rust call, whose time goes into the regex
    pre-tokenizer. The fast path is checked against the Rust tokenizer on probe
    strings when built, and lines holding an added token (``<|endoftext|>``) always
    go to Rust, so the ids are identical either way.
    """

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import Tokenizer

        self._slow: Any = None
        # Set in forked workers: the Rust batch call's thread pool (rayon) belongs to the
        # parent and may be dead after fork(), so call the single-text encoder instead.
        self.serial = False
        backend: Any = tokenizer if isinstance(tokenizer, Tokenizer) else None
        if backend is None and getattr(tokenizer, "is_fast", False):
            backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            self._slow = tokenizer  # a Python-only tokenizer: its own batch call
        self._backend = backend
        self._cache: dict[str, list[int]] = {}
        self._added: tuple[str, ...] = ()
        self._model: Any = None
        if backend is not None and self._eligible(backend):
            self._model = backend.model
            self._added = tuple(t.content for t in backend.get_added_tokens_decoder().values())
            probes = list(_PROBES)
            mine = self._encode_python(probes)
            if any(a is not None and a != b for a, b in zip(mine, self._rust(probes), strict=True)):
                self._model = None
            self._cache.clear()

    @staticmethod
    def _eligible(backend: Any) -> bool:
        try:
            spec = json.loads(backend.to_str())
        except Exception:  # an exotic tokenizer that cannot serialise: no fast path
            return False
        pre = spec.get("pre_tokenizer") or {}
        model = spec.get("model") or {}
        return (
            spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and pre.get("add_prefix_space") is False
            and pre.get("use_regex", True) is True
            and model.get("type") == "BPE"
            and model.get("dropout") is None
        )

    @property
    def fast_path(self) -> bool:
        """Whether printable-ASCII lines skip the Rust pre-tokenizer."""
        return self._model is not None

    def _rust(self, texts: list[str]) -> list[list[int]]:
        backend = self._backend
        if self.serial:
            return [backend.encode(t, add_special_tokens=False).ids for t in texts]
        fast = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [enc.ids for enc in fast(texts, add_special_tokens=False)]

    def _word(self, word: str) -> list[int]:
        if len(self._cache) >= _WORD_CACHE_MAX:
            self._cache.clear()  # bounded memory; the common words come back at once
        # Byte-level alphabet: printable ASCII maps to itself, the space to "Ġ" (U+0120).
        ids = [t.id for t in self._model.tokenize(word.replace(" ", "\u0120"))]
        self._cache[word] = ids
        return ids

    def _encode_python(self, texts: list[str]) -> list[list[int] | None]:
        """Ids of the texts the fast path handles, None for the others."""
        cache = self._cache
        findall = _ASCII_WORDS.findall
        added = self._added
        out: list[list[int] | None] = []
        for text in texts:
            if not (text.isascii() and text.isprintable()) or (
                added and any(a in text for a in added)
            ):
                out.append(None)
                continue
            ids: list[int] = []
            for word in findall(text):
                cached = cache.get(word)
                ids += cached if cached is not None else self._word(word)
            out.append(ids)
        return out

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._slow is not None:
            return encode_batch(self._slow, texts)
        if self._model is None:
            return self._rust(texts)
        out = self._encode_python(texts)
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            for i, ids in zip(rest, self._rust([texts[i] for i in rest]), strict=True):
                out[i] = ids
        return out  # type: ignore[return-value]  # no None left
