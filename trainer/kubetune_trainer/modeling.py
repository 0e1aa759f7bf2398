"""Load the model and tokenizer a job trains: hub id, storage prefix, or a fresh GPT-2.

Usage::

    tokenizer = load_tokenizer(ctx)                       # dataset/tokenizer/ (from prepare)
    model = load_model(ctx.job.spec.model, ctx, len(tokenizer), seed=42)

* ``model.name``: ``AutoModelForCausalLM.from_pretrained(name, revision=...)`` from
  the Hugging Face hub (needs a reachable hub, or a populated ``HF_HOME`` cache);
* ``model.uri``: an ``s3://``/``file://`` prefix holding a ``save_pretrained()``
  model, downloaded to scratch first (air-gapped clusters);
* ``model.fresh``: a GPT-2 config from the spec, vocabulary size from the
  tokenizer prepare saved, weights initialised from ``seed``.

Attention: ``sdpa`` where the architecture supports it, else ``eager``;
``KUBETUNE_ATTN_IMPLEMENTATION`` (e.g. ``flash_attention_2``) overrides. The tanh GELU
written out in Python (GPT-2's ``gelu_new``) is swapped for torch's fused kernel
(:func:`fuse_activations`): the same function, one kernel instead of six.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.contract import Env, StageError
from kubetune.layout import RunLayout
from kubetune.schema import ModelSpec, Reason
from kubetune.storage import StorageError, is_permanent
from kubetune_trainer.context import StageContext

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PREFERRED_ATTENTION = "sdpa"


def load_tokenizer(ctx: StageContext) -> PreTrainedTokenizerBase:
    """The tokenizer prepare saved under ``dataset/tokenizer/``; pad = eos when missing."""
    from kubetune_trainer.tokenizer_build import load_tokenizer as _load

    uri = ctx.storage.uri(RunLayout.TOKENIZER)
    if not ctx.storage.list(RunLayout.TOKENIZER):
        raise StageError(
            f"{uri}: no tokenizer there; run the prepare stage first (it saves the tokenizer "
            "it used to dataset/tokenizer/)",
            reason=Reason.DATASET_UNUSABLE,
        )
    tokenizer = _load(uri, ctx.open, ctx.scratch_dir("dataset"))
    if tokenizer.eos_token_id is None:
        raise StageError(
            f"{uri}: the tokenizer has no eos token; training appends eos to every line to mark "
            "its end. Use a tokenizer with an eos token (model.tokenizer)",
            reason=Reason.DATASET_UNUSABLE,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation() -> str:
    return os.environ.get(Env.ATTN_IMPLEMENTATION, PREFERRED_ATTENTION)


# Config attributes that are dropout probabilities, across the causal LM families
# (GPT-2/Phi: *_pdrop; Llama/Mistral/Qwen: attention_dropout; NeoX/Falcon/BLOOM: also
# hidden_dropout; OPT: dropout too).
DROPOUT_ATTRIBUTES = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "attention_dropout",
    "hidden_dropout",
    "dropout",
)


def set_dropout(config: Any, p: float) -> list[str]:
    """Set every dropout probability ``config`` has to ``p``; the names it set."""
    names = [
        n
        for n in DROPOUT_ATTRIBUTES
        if isinstance(getattr(config, n, None), (int, float))
        and not isinstance(getattr(config, n), bool)
    ]
    for name in names:
        setattr(config, name, p)
    if not names:
        log.warning(
            "training.dropout: the %s config has none of %s; the model keeps its own dropout",
            type(config).__name__,
            ", ".join(DROPOUT_ATTRIBUTES),
        )
    return names


def _tanh_gelu_classes() -> tuple[type, ...]:
    """transformers' tanh GELUs written in Python (``gelu_new``, ``gelu_fast``)."""
    from transformers import activations

    names = ("NewGELUActivation", "FastGELUActivation")
    return tuple(c for n in names if isinstance(c := getattr(activations, n, None), type))


def fuse_activations(model: Any) -> int:
    """Replace Python tanh-GELU modules with ``torch.nn.GELU(approximate="tanh")``.

    ``gelu_new`` is ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` evaluated as six
    elementwise kernels, forward and backward; torch's fused kernel computes the same
    function (within 3e-7, fp32) in one, which takes ~10% off a GPT-2 training step on a
    CPU. The modules hold no weights, so the saved model and its config are unchanged.
    Returns how many modules were replaced.
    """
    import torch

    classes = _tanh_gelu_classes()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if classes and isinstance(child, classes):
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
                replaced += 1
    return replaced


def _from_pretrained(
    source: str, revision: str | None, what: str, dropout: float | None = None
) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    impl = attention_implementation()
    try:
        extra: dict[str, Any] = {}
        if dropout is not None:  # before the model is built: its Dropout modules read it
            extra["config"] = AutoConfig.from_pretrained(source, revision=revision)
            set_dropout(extra["config"], dropout)
        try:
            return AutoModelForCausalLM.from_pretrained(
                source, revision=revision, attn_implementation=impl, **extra
            )
        except ValueError as exc:
            # Architectures without SDPA support say so with a ValueError; eager always works.
            message = str(exc)
            if impl == "eager" or ("attn_implementation" not in message and "SDPA" not in message):
                raise
            log.warning("%s does not support attention %r (%s); using eager", what, impl, exc)
            return AutoModelForCausalLM.from_pretrained(
                source, revision=revision, attn_implementation="eager", **extra
            )
    except StageError:
        raise
    except Exception as exc:
        raise StageError(
            f"cannot load model {what}: {type(exc).__name__}: {exc}. For an air-gapped cluster, "
            "save the model with save_pretrained() to S3 and set model.uri to that prefix"
        ) from None


def _fresh_model(
    spec: ModelSpec, vocab_size: int, seed: int, dropout: float | None = None
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM, GPT2Config, set_seed

    assert spec.fresh is not None
    f = spec.fresh
    config = GPT2Config(
        n_layer=f.n_layer,
        n_head=f.n_head,
        n_embd=f.n_embd,
        n_positions=f.n_positions,
        vocab_size=vocab_size,
        # Our tokenizers use one <|endoftext|> for bos/eos; its id comes from the tokenizer.
        bos_token_id=None,
        eos_token_id=None,
    )
    if dropout is not None:
        set_dropout(config, dropout)
    set_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(
        config, attn_implementation=attention_implementation()
    )
    return model


def load_model(
    spec: ModelSpec,
    ctx: StageContext,
    tokenizer_vocab_size: int,
    *,
    seed: int = 42,
    eos_token_id: int | None = None,
    dropout: float | None = None,
) -> PreTrainedModel:
    """The model to train, in fp32, with its embeddings covering the tokenizer's vocabulary.

    ``dropout`` (training.dropout) replaces the model's dropout probabilities; None keeps them.
    """
    if spec.fresh is not None:
        model = _fresh_model(spec, tokenizer_vocab_size, seed, dropout)
    elif spec.uri:
        local = ctx.scratch_dir("base-model")
        try:
            ctx.open(spec.uri).download_dir("", local)
        except StorageError as exc:
            # Nothing there is a wrong spec (a retry cannot help); a lost connection is not.
            raise StageError(
                f"model.uri {spec.uri}: {exc}; it must be a prefix holding a save_pretrained() "
                "model (config.json and model.safetensors)",
                reason=Reason.INVALID_SPEC if is_permanent(exc) else Reason.STAGE_FAILED,
            ) from None
        if not (local / "config.json").is_file():
            raise StageError(
                f"model.uri {spec.uri}: no config.json there; it must be a prefix holding a "
                "save_pretrained() model (config.json and model.safetensors)",
                reason=Reason.INVALID_SPEC,
            )
        model = _from_pretrained(str(local), None, spec.uri, dropout)
    elif spec.name:
        model = _from_pretrained(spec.name, spec.revision, repr(spec.name), dropout)
    else:  # the schema's CEL rule makes this unreachable
        raise StageError(
            "exactly one of model.name, model.uri or model.fresh must be set",
            reason=Reason.INVALID_SPEC,
        )
    if eos_token_id is not None:
        model.config.eos_token_id = eos_token_id
        model.config.bos_token_id = eos_token_id
        model.config.pad_token_id = eos_token_id
        if model.generation_config is not None:
            model.generation_config.eos_token_id = eos_token_id
            model.generation_config.bos_token_id = eos_token_id
            model.generation_config.pad_token_id = eos_token_id
    n_embeddings = embedding_rows(model)
    if tokenizer_vocab_size > n_embeddings:
        # A tokenizer with added tokens (model.tokenizer): grow the embedding table.
        log.info(
            "resizing embeddings %d -> %d for the tokenizer", n_embeddings, tokenizer_vocab_size
        )
        model.resize_token_embeddings(tokenizer_vocab_size)
    fuse_activations(model)
    return model.float()


def embedding_rows(model: Any) -> int:
    """Rows of the input embedding table (the vocabulary the model can read)."""
    return int(model.get_input_embeddings().weight.shape[0])


def model_config_dict(model: Any) -> dict[str, Any]:
    """The model's config as plain JSON data (for the resolved config)."""
    import json

    config = getattr(model, "config", None)
    if config is None:
        return {}
    data: dict[str, Any] = json.loads(config.to_json_string(use_diff=False))
    return data


def save_model(model: Any, tokenizer: Any, local_dir: Path) -> None:
    """``save_pretrained`` a standalone model (LoRA adapters merged) and its tokenizer."""
    if hasattr(model, "merge_and_unload"):  # a peft model: fold the adapters into the weights
        model = model.merge_and_unload()
    local_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(local_dir))
    tokenizer.save_pretrained(str(local_dir))
