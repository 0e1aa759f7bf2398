"""A training checkpoint as a standalone model: ``kubetune export`` and ``evaluate --checkpoint``.

Usage::

    kubetune export   --job job.yaml --checkpoint 200 --to s3://models/tldr-step200/
    kubetune evaluate --job job.yaml --checkpoint 200            # scores that checkpoint

or in process::

    exported = export_checkpoint(ctx, "200", ctx.open("file:///tmp/m"))   # or a checkpoint URI
    use_checkpoint(ctx, "200")      # evaluate then scores exports/step-00000200/ (model_key)

A checkpoint (:mod:`kubetune_trainer.checkpoints`) holds the Accelerate state of the
trained module: its full state dict (``model.safetensors``; for LoRA the peft model's,
base weights included), the optimizer and the RNG states, and ``trainer_state.json``
with the resolved configuration, the model's config among it (``modelConfig``). The
export rebuilds that architecture from the config (no base-model download), wraps it
with the checkpoint's LoRA settings when it had any, loads the weights, merges the
adapters and writes ``save_pretrained`` model + the dataset's tokenizer + the
``kubetune-training.json`` record (``modelStep`` is the checkpoint's step), i.e. what
``model/`` holds after training, so evaluate and any Hugging Face loader take it.

A checkpoint is named by its step (looked up in this output's training runs: the one of
``train/train.json`` first, else the only run that has that step) or by its URI (the
``.../checkpoints/step-<8-digit step>`` prefix).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.contract import StageError
from kubetune.layout import RunLayout, join_uri
from kubetune.results import PrepareResult, TrainingRecord, TrainResult
from kubetune.schema import Reason, TrainingSpec
from kubetune.storage import Storage, StorageError
from kubetune_trainer import checkpoints as ckpt
from kubetune_trainer.context import StageContext

log = logging.getLogger(__name__)

EXPORTS = "exports"  # <output>/exports/step-<8-digit step>/: checkpoints exported for evaluate
_CHECKPOINT_URI = re.compile(r"(?:^|/)(checkpoints/step-(\d{8,}))/*$")


def export_key(step: int) -> str:
    """Where :func:`use_checkpoint` exports checkpoint ``step`` (relative to the output)."""
    return f"{EXPORTS}/step-{step:08d}"


# --------------------------------------------------------------------------- the evaluate hook


def model_key(ctx: StageContext) -> str:
    """The key (under the output) of the model evaluate scores: ``model/`` unless
    :func:`use_checkpoint` chose an exported checkpoint."""
    return ctx.model_key


def model_record_key(ctx: StageContext) -> str:
    """The ``kubetune-training.json`` of :func:`model_key`."""
    return join_uri(model_key(ctx), Path(RunLayout.MODEL_RECORD).name)


def use_checkpoint(ctx: StageContext, ref: str) -> Exported:
    """Export checkpoint ``ref`` (a step or a URI) under ``exports/`` and make it the model
    evaluate scores on ``ctx`` (:func:`model_key`)."""
    _, _, step = find_checkpoint(ctx, ref)
    key = export_key(step)
    exported = export_checkpoint(ctx, ref, ctx.storage, key)
    ctx.model_key = key
    log.info("evaluate scores checkpoint step %d (%s), exported to %s", step, exported.source, key)
    return exported


# --------------------------------------------------------------------------- finding it


@dataclass(frozen=True)
class Exported:
    """A checkpoint written as a standalone model."""

    step: int
    source: str  # the checkpoint's URI
    uri: str  # where the model now is
    record: TrainingRecord


def _ref_step(ref: str) -> int | None:
    return int(ref) if ref.strip().isdigit() else None


def find_checkpoint(ctx: StageContext, ref: str) -> tuple[Storage, str, int]:
    """(storage, key, step) of the complete checkpoint ``ref`` names (a step or a URI)."""
    step = _ref_step(ref)
    if step is None:
        return _by_uri(ctx, ref)
    runs = sorted({k.split("/")[1] for k in ctx.storage.list(RunLayout.TRAINING_RUNS)})
    stores = {run: ctx.storage.sub(f"{RunLayout.TRAINING_RUNS}/{run}") for run in runs}
    preferred = _trained_run(ctx)
    if preferred in stores and step in ckpt.list_checkpoints(stores[preferred])[0]:
        return stores[preferred], RunLayout.checkpoint_key(step), step
    having = [run for run, store in stores.items() if step in ckpt.list_checkpoints(store)[0]]
    if len(having) == 1:
        return stores[having[0]], RunLayout.checkpoint_key(step), step
    available = {run: ckpt.list_checkpoints(store)[0] for run, store in stores.items()}
    if not having:
        listing = "; ".join(
            f"{ctx.storage.uri(f'training/{r}')}: {s}" for r, s in available.items()
        )
        raise StageError(
            f"no complete checkpoint at step {step} under {ctx.storage.uri('training')} "
            f"(complete checkpoints: {listing or 'none'}); name one of those steps, or its URI",
            Reason.INVALID_SPEC,
        )
    uris = [stores[r].uri(RunLayout.checkpoint_key(step)) for r in having]
    raise StageError(
        f"step {step} is in {len(having)} training runs ({', '.join(uris)}); name the "
        "checkpoint by its URI",
        Reason.INVALID_SPEC,
    )


def _trained_run(ctx: StageContext) -> str | None:
    """The training run directory of ``train/train.json``'s training fingerprint."""
    try:
        train = TrainResult.model_validate_json(ctx.storage.read_text(RunLayout.TRAIN_RESULT))
    except (StorageError, ValueError):
        return None
    if not train.training_fingerprint:
        return None
    return RunLayout.training_run(train.training_fingerprint).split("/")[1]


def _by_uri(ctx: StageContext, uri: str) -> tuple[Storage, str, int]:
    match = _CHECKPOINT_URI.search(uri)
    if match is None:
        raise StageError(
            f"--checkpoint {uri}: expected a step number or a checkpoint URI ending in "
            "checkpoints/step-<8-digit step>",
            Reason.INVALID_SPEC,
        )
    store = ctx.open(uri[: match.start(1)])  # the training run the checkpoint belongs to
    key = match.group(1)
    if not store.exists(join_uri(key, RunLayout.CHECKPOINT_MARKER)):
        raise StageError(
            f"{uri}: not a complete checkpoint (no {RunLayout.CHECKPOINT_MARKER} marker)",
            Reason.INVALID_SPEC,
        )
    return store, key, int(match.group(2))


# --------------------------------------------------------------------------- exporting


def build_model(config: dict[str, Any]) -> Any:
    """The trained module's architecture from a checkpoint's resolved config (random init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune_trainer.train import apply_lora_spec

    model_config = dict(config.get("modelConfig") or {})
    model_type = model_config.pop("model_type", None)
    if not model_type:
        raise StageError(
            "the checkpoint's trainer_state.json has no modelConfig (written by an older "
            "kubetune?); it cannot be exported",
            Reason.INVALID_SPEC,
        )
    arch = AutoConfig.for_model(model_type, **model_config)
    attn = config.get("attnImplementation") or "eager"
    try:
        model = AutoModelForCausalLM.from_config(arch, attn_implementation=attn)
    except (ValueError, ImportError):  # e.g. flash attention not installed here
        model = AutoModelForCausalLM.from_config(arch, attn_implementation="eager")
    model = model.float()
    lora = TrainingSpec.model_validate(config.get("training") or {}).lora
    if lora is not None:
        model = apply_lora_spec(model, lora)
    return model


def _record(
    ctx: StageContext, state: ckpt.TrainerState, validation_loss: float | None
) -> TrainingRecord:
    """kubetune-training.json of an exported checkpoint: what its training trained on."""
    inputs = state.config.get("trainingInputs") or {}
    train_sha = str(inputs.get("trainSha256") or "")
    dataset_fp = inputs.get("datasetFingerprint")
    prepared: PrepareResult | None = None
    try:
        prepared = PrepareResult.model_validate_json(
            ctx.storage.read_text(RunLayout.PREPARE_RESULT)
        )
    except (StorageError, ValueError):
        prepared = None
    same = prepared is not None and prepared.train_sha256 == train_sha
    return TrainingRecord(
        # prepare's fingerprint (None for an old prepare: then the training used train_sha256)
        dataset_fingerprint=prepared.fingerprint
        if same and prepared is not None
        else (dataset_fp if dataset_fp != train_sha else None),
        train_sha256=train_sha,
        training_fingerprint=str(state.config.get("trainingFingerprint") or ""),
        dataset_inputs=prepared.fingerprint_inputs if same and prepared is not None else None,
        training_inputs=inputs,
        steps=state.step,
        model_step=state.step,
        validation_loss=validation_loss,
    )


def _clear_target(target: Storage, key: str) -> None:
    """Remove an earlier model at the target; refuse to mix with anything else there."""
    record = Path(RunLayout.MODEL_RECORD).name
    existing = target.list(key)
    if not existing:
        return
    if not any(k.rsplit("/", 1)[-1] == record for k in existing):
        raise StageError(
            f"{target.uri(key)} already holds files that are not a kubetune model "
            f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); export into "
            "an empty location",
            Reason.INVALID_SPEC,
        )
    for k in existing:  # an earlier export or model: replaced whole, so files never mix
        target.delete(k)


def export_checkpoint(ctx: StageContext, ref: str, target: Storage, key: str = "") -> Exported:
    """Write checkpoint ``ref`` as a ``save_pretrained`` model + tokenizer under ``target/key``."""
    from kubetune_trainer.modeling import load_tokenizer, save_model

    store, ckpt_key, step = find_checkpoint(ctx, ref)
    source = store.uri(ckpt_key)
    local = ctx.scratch / "export-checkpoint"
    shutil.rmtree(local, ignore_errors=True)
    try:
        state = ckpt.TrainerState.from_json(store.read_text(join_uri(ckpt_key, ckpt.STATE_FILE)))
        weights = ckpt.download_weights(store, ckpt_key, local)
    except StorageError as exc:
        raise StageError(f"{source}: {exc}", Reason.INVALID_SPEC) from None
    model = build_model(state.config)
    ckpt.load_weights(model, weights)
    tokenizer = load_tokenizer(ctx)
    out = local / "model"
    save_model(model, tokenizer, out)
    record = _record(ctx, state, state.validation_loss)
    (out / Path(RunLayout.MODEL_RECORD).name).write_text(record.to_json())
    _clear_target(target, key)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        target.upload_file(path, join_uri(key, rel) if key else rel)
    uri = target.uri(key) if key else target.uri("")
    shutil.rmtree(local, ignore_errors=True)
    log.info("exported checkpoint %s (step %d) to %s", source, step, uri)
    return Exported(step, source, uri, record)
