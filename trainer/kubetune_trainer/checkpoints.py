"""Resumable checkpoints in storage: ``checkpoints/step-<8-digit step>/`` + a ``COMPLETE`` marker.

Usage (inside the train loop; only the main process writes)::

    latest = latest_complete(ctx.storage)                  # None, or (step, key)
    state = download_checkpoint(ctx.storage, key, local)   # then accelerator.load_state(local)
    ...
    accelerator.save_state(local)
    save_checkpoint(ctx.storage, local, TrainerState(...))     # files, state, COMPLETE last
    prune_checkpoints(ctx.storage, keep=2, protect={best_step})   # newest 2, and the best
    checkpoint_records(ctx.storage, best_step=120)         # what progress.json and the status list
    load_weights(model, local)                             # a checkpoint's weights into a model

Why a kill never loses the last complete checkpoint: a checkpoint counts only
once its ``COMPLETE`` marker exists, and the marker is written after every other
file; older checkpoints are deleted only after the new marker is written; a
directory without a marker (an upload cut short) is ignored at resume and
removed by the next prune.

A checkpoint also holds the model's weights as Accelerate saved them
(``model.safetensors``: the full state dict of the trained module, a peft model's
included), so it can become a standalone model (:mod:`kubetune_trainer.export`), and
the trainer state carries the training and validation loss at its step and the
early-stopping state (``validation``), so a resumed run makes the same decisions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.layout import RunLayout, join_uri
from kubetune.schema import CheckpointRecord
from kubetune.storage import Storage, StorageError, StorageNotFound

STATE_FILE = "trainer_state.json"
# The model's weights in a checkpoint, as ``Accelerator.save_state`` names them
# (safetensors by default; the pickle form only if a caller turned safetensors off).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


@dataclass
class TrainerState:
    """Where training stands; saved next to the Accelerate state (nanoGPT style, with config)."""

    step: int  # optimizer steps done
    epoch: float  # epochs done (fractional)
    epoch_index: int  # the epoch the next micro-batch belongs to
    batches_done_in_epoch: int  # micro-batches (global) of that epoch already consumed
    tokens_seen: int  # real (non-padding) training tokens consumed, all processes
    elapsed_seconds: float = 0.0  # training seconds before this checkpoint (for the result)
    config: dict[str, Any] = field(default_factory=dict)  # resolved hyperparameters
    loss: float | None = None  # training loss of the log window ending at this step
    validation_loss: float | None = None  # validation loss at this step (if scored here)
    # training.validation: the early-stopping state (validation.EarlyStopping.to_state)
    validation: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False  # training ended here: validation loss stopped improving

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _step_dirs(storage: Storage) -> dict[int, set[str]]:
    """step -> names of the files directly below its directory (or nested, first part)."""
    found: dict[int, set[str]] = {}
    for key in storage.list(RunLayout.CHECKPOINTS):
        parts = key.split("/")
        if len(parts) < 3 or parts[0] != RunLayout.CHECKPOINTS:
            continue
        match = _STEP_DIR.match(parts[1])
        if match:
            found.setdefault(int(match.group(1)), set()).add(parts[2])
    return found


def list_checkpoints(storage: Storage) -> tuple[list[int], list[int]]:
    """(complete steps, incomplete steps), each ascending."""
    complete: list[int] = []
    incomplete: list[int] = []
    for step, names in sorted(_step_dirs(storage).items()):
        (complete if RunLayout.CHECKPOINT_MARKER in names else incomplete).append(step)
    return complete, incomplete


def latest_complete(storage: Storage) -> tuple[int, str] | None:
    """The newest checkpoint with a ``COMPLETE`` marker, as (step, key); None if there is none."""
    complete, _ = list_checkpoints(storage)
    if not complete:
        return None
    step = complete[-1]
    return step, RunLayout.checkpoint_key(step)


def download_checkpoint(storage: Storage, key: str, local_dir: Path) -> TrainerState:
    """Download a checkpoint directory; returns its trainer state."""
    storage.download_dir(key, local_dir)
    return TrainerState.from_json((local_dir / STATE_FILE).read_text(encoding="utf-8"))


def begin_checkpoint(storage: Storage, step: int) -> str:
    """Clear whatever an interrupted earlier upload of ``step`` left, so files never mix."""
    key = RunLayout.checkpoint_key(step)
    storage.delete(join_uri(key, RunLayout.CHECKPOINT_MARKER))
    storage.delete(key)
    return key


def upload_files(storage: Storage, local_dir: Path, step: int, files: list[Path]) -> list[str]:
    """Upload files of ``local_dir`` into the checkpoint of ``step``; returns their names."""
    key = RunLayout.checkpoint_key(step)
    names = []
    for path in files:
        rel = path.relative_to(local_dir).as_posix()
        storage.upload_file(path, join_uri(key, rel))
        names.append(rel)
    return names


def finish_checkpoint(storage: Storage, state: TrainerState) -> str:
    """Write the trainer state, then the ``COMPLETE`` marker: the checkpoint now counts."""
    key = RunLayout.checkpoint_key(state.step)
    storage.write_text(join_uri(key, STATE_FILE), state.to_json())
    names = sorted(k[len(key) + 1 :] for k in storage.list(key))
    marker = {"step": state.step, "files": names}
    storage.write_text(join_uri(key, RunLayout.CHECKPOINT_MARKER), json.dumps(marker, indent=2))
    return key


def save_checkpoint(storage: Storage, local_dir: Path, state: TrainerState) -> str:
    """Single-writer form: clear, upload every file of ``local_dir``, state, marker last."""
    begin_checkpoint(storage, state.step)
    upload_files(
        storage,
        local_dir,
        state.step,
        sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != STATE_FILE),
    )
    return finish_checkpoint(storage, state)


def prune_checkpoints(storage: Storage, keep: int, protect: Iterable[int | None] = ()) -> list[int]:
    """Keep the newest ``keep`` complete checkpoints (and those in ``protect``, e.g. the best
    by validation loss); drop older ones and stale partial ones.

    Partial directories newer than the newest complete checkpoint are left alone:
    another writer may be uploading there right now.
    """
    complete, incomplete = list_checkpoints(storage)
    if not complete:
        return []
    newest = complete[-1]
    kept = {s for s in protect if s is not None}
    doomed = [s for s in (complete[:-keep] if keep > 0 else complete) if s not in kept]
    doomed += [s for s in incomplete if s < newest]
    for step in sorted(doomed):
        key = RunLayout.checkpoint_key(step)
        # Marker first: a checkpoint half-deleted by a kill is then an ignored partial one.
        storage.delete(join_uri(key, RunLayout.CHECKPOINT_MARKER))
        storage.delete(key)
    return sorted(doomed)


def checkpoint_records(storage: Storage, best_step: int | None = None) -> list[CheckpointRecord]:
    """The complete checkpoints in ``storage``, oldest first, with their losses.

    Reads each checkpoint's trainer state (a few small files: pruning bounds them);
    ``best`` marks ``best_step`` (the lowest validation loss), None when there is no
    validation.
    """
    records = []
    for step in list_checkpoints(storage)[0]:
        key = RunLayout.checkpoint_key(step)
        try:
            state = TrainerState.from_json(storage.read_text(join_uri(key, STATE_FILE)))
        except (StorageError, ValueError, TypeError):
            continue  # pruned (or being pruned) by another writer since the listing
        records.append(
            CheckpointRecord(
                step=step,
                loss=_rounded(state.loss),
                validation_loss=_rounded(state.validation_loss),
                uri=storage.uri(key),
                best=(step == best_step) if best_step is not None else None,
            )
        )
    return records


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def download_weights(storage: Storage, key: str, local_dir: Path) -> Path:
    """Download only the model weights file of checkpoint ``key``; its local path."""
    for name in WEIGHT_FILES:
        if storage.exists(join_uri(key, name)):
            local_dir.mkdir(parents=True, exist_ok=True)
            target = local_dir / name
            storage.download_file(join_uri(key, name), target)
            return target
    raise StorageNotFound(
        f"{storage.uri(key)}: no model weights ({' or '.join(WEIGHT_FILES)}) in this checkpoint"
    )


def weights_file(local_dir: Path) -> Path:
    """The weights file of a downloaded checkpoint directory."""
    for name in WEIGHT_FILES:
        if (local_dir / name).is_file():
            return local_dir / name
    raise FileNotFoundError(f"{local_dir}: no {' or '.join(WEIGHT_FILES)} in this checkpoint")


def load_weights(model: Any, path: Path) -> None:
    """Load a checkpoint's weights (a file, or a directory holding one) into ``model``.

    ``model`` must be the module that was trained (the peft model for LoRA), unwrapped.
    Loaded as ``Accelerator.load_state`` does: safetensors' ``load_model`` knows that
    weights tied to another (GPT-2's ``lm_head``) were saved once.
    """
    import torch

    file = weights_file(path) if path.is_dir() else path
    if file.suffix == ".safetensors":
        from safetensors.torch import load_model

        device = next(model.parameters()).device
        load_model(model, str(file), strict=True, device=str(device))
    else:
        model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
