"""Checks that the URIs a FineTuneJob names exist and can be reached, before any work.

    kubetune validate job.yaml --check-uris

:func:`check_uris` lists every problem at once, each naming its field: the dataset
source must hold files, ``model.uri`` a ``save_pretrained()`` model (``config.json``),
a storage ``model.tokenizer`` some files, and ``storage.output`` must accept a write
(a probe object, removed again). Hub ids (``model.name``, ``hf://`` sources) are not
checked: the hub may be reachable only from the cluster.
"""

from __future__ import annotations

from kubetune.schema import FineTuneJob
from kubetune.storage import FileStorage, RetryPolicy, Storage, StorageError, storage_for_job

WRITE_PROBE = ".kubetune-write-probe"
PREFLIGHT_RETRY_S = 10.0
_STORAGE_SCHEMES = ("s3://", "file://")


def missing_path(field: str, uri: str, storage: Storage) -> str | None:
    """The message for a ``file://`` URI whose path does not exist; None otherwise."""
    if isinstance(storage, FileStorage) and not storage.path("").exists():
        return (
            f"{field} {uri}: no such file or directory ({storage.path('')}); check the path "
            "(file:// paths may be relative to the current directory)"
        )
    return None


def probe_write(storage: Storage) -> None:
    """Write and remove a small object at the root of ``storage``; raises what the store raises."""
    storage.write_bytes(WRITE_PROBE, b"")
    storage.delete(WRITE_PROBE)


def _listing(field: str, uri: str, storage: Storage) -> tuple[list[str], str | None]:
    try:
        keys = storage.list("")
    except StorageError as exc:
        return [], f"{field} {uri}: cannot list it: {exc}"
    if not keys:
        missing = missing_path(field, uri, storage)
        return [], missing or f"{field} {uri}: nothing stored there; check the path or prefix"
    return keys, None


def check_uris(job: FineTuneJob) -> list[str]:
    """Every problem with the job's storage URIs, as messages naming the field; [] if none."""
    spec = job.spec
    problems: list[str] = []

    def open_uri(uri: str) -> Storage:
        # A person waits for the answer: a wrong endpoint should say so in seconds, not after
        # a stage's retry budget for each URI.
        return storage_for_job(uri, spec.storage, retry=RetryPolicy(seconds=PREFLIGHT_RETRY_S))

    if spec.dataset.source.startswith(_STORAGE_SCHEMES):
        _, problem = _listing("dataset.source", spec.dataset.source, open_uri(spec.dataset.source))
        problems += [problem] if problem else []
    if spec.model.uri:
        keys, problem = _listing("model.uri", spec.model.uri, open_uri(spec.model.uri))
        if problem:
            problems.append(problem)
        elif "config.json" not in keys:
            problems.append(
                f"model.uri {spec.model.uri}: no config.json there; it must hold a "
                "save_pretrained() model"
            )
    if spec.model.tokenizer and spec.model.tokenizer.startswith(_STORAGE_SCHEMES):
        _, problem = _listing(
            "model.tokenizer", spec.model.tokenizer, open_uri(spec.model.tokenizer)
        )
        problems += [problem] if problem else []
    try:
        probe_write(open_uri(spec.storage.output))
    except (StorageError, OSError) as exc:
        problems.append(f"storage.output {spec.storage.output}: cannot write there: {exc}")
    return problems
