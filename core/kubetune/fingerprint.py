"""Fingerprints that bind every result to the data and settings that produced it.

Two fingerprints, each a sha256 of canonical JSON of its inputs (kept beside it, so a
mismatch can say which setting changed):

* the **dataset fingerprint** (prepare, in ``dataset/prepare.json``): the source listing
  (key, size and ETag or mtime of every file), format, text field, document limit,
  cleaning and dedup, split settings, and the tokenizer;
* the **training fingerprint** (train, in each checkpoint's ``trainer_state.json``, in
  ``train/train.json`` and in ``model/kubetune-training.json``): the dataset fingerprint,
  the model, every training setting that changes the result (not the checkpoint or
  logging cadence) and the number of processes.

Train resumes only from checkpoints of the same training fingerprint (they live under
``checkpoints/<fingerprint>/``); evaluate refuses a model whose dataset fingerprint is
not the test split's. Usage::

    inputs = dataset_inputs(job.spec, source_versions)
    fp = fingerprint(inputs)
    changed(old_inputs, inputs)      # ["dataset.split.seed: 42 -> 7", ...]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from kubetune.schema import FineTuneJobSpec

# Training settings that do not change the trained model: how often it is saved or logged.
CADENCE_KEYS = frozenset({"checkpointEverySteps", "keepCheckpoints", "logEverySteps"})
SHORT = 16  # hex digits of a fingerprint in paths and messages


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``inputs``."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dataset_inputs(
    spec: FineTuneJobSpec, source_versions: list[tuple[str, int, str]] | None
) -> dict[str, Any]:
    """What decides the prepared splits: the source's files and the dataset/tokenizer spec.

    ``source_versions`` is :meth:`kubetune.storage.Storage.versions` of the source (None
    for a hub dataset, which is identified by its URI alone).
    """
    dataset = spec.dataset.to_wire()
    validation = spec.training.validation
    if validation is not None:
        # The validation split is carved out of training by prepare.
        dataset["validation"] = {"fraction": validation.fraction}
    if spec.dataset.is_instruction:
        # Examples that do not fit a training row are dropped, so the row size decides the split.
        dataset["maxSeqLength"] = spec.training.max_seq_length
    model = spec.model
    return {
        "dataset": dataset,
        "sourceFiles": [list(v) for v in source_versions] if source_versions else None,
        "tokenizer": {
            "tokenizer": model.tokenizer,
            "name": model.name,
            "uri": model.uri,
            "revision": model.revision,
            "fresh": model.fresh.to_wire() if model.fresh else None,
        },
    }


def training_inputs(
    spec: FineTuneJobSpec, dataset_fingerprint: str, num_processes: int
) -> dict[str, Any]:
    """What decides the trained model: the data, the model, the training settings."""
    training = {k: v for k, v in spec.training.to_wire().items() if k not in CADENCE_KEYS}
    return {
        "datasetFingerprint": dataset_fingerprint,
        "model": spec.model.to_wire(),
        "training": training,
        "numProcesses": num_processes,
    }


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def changed(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> list[str]:
    """The settings that differ, as ``"path: old -> new"`` (at most ``limit``, then "...")."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if key == "sourceFiles":
                out.append("the source files (added, removed or modified)")
            else:
                out.append(f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}")
    if len(out) > limit:
        out = [*out[:limit], f"... and {len(out) - limit} more"]
    return out


def _short(value: Any) -> str:
    if value is None:  # not in the inputs: the setting is unset
        return "unset"
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
