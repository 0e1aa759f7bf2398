"""Every cache and temporary directory a stage writes must be writable, before any work.

Stage pods run with a read-only root filesystem: Hugging Face, matplotlib, torch, Triton and
Python's tempfile all write somewhere, and each must point at a volume (the operator mounts
an emptyDir at ``/scratch`` and the trainer image points the caches there). An image or pod
that gets this wrong would otherwise fail deep inside a library, or hang retrying; instead
the stage stops at once with the variables and paths to fix::

    check_caches_writable()    # raises StageError(reason CacheNotWritable) naming each one
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from kubetune.contract import Env, StageError
from kubetune.schema import Reason

# The variables the trainer's libraries read for where to write (unset ones are skipped).
CACHE_VARIABLES = (
    Env.SCRATCH,
    "HOME",
    "TMPDIR",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "MPLCONFIGDIR",
    "TORCH_HOME",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
)


def _not_writable(path: Path) -> str | None:
    """Why ``path`` cannot hold new files (None if it can): made if missing, then probed."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def unwritable_caches(environ: Mapping[str, str] | None = None) -> list[str]:
    """``VAR=path (why)`` for each cache variable whose directory cannot be written."""
    env = os.environ if environ is None else environ
    problems = []
    for name in CACHE_VARIABLES:
        value = env.get(name)
        if value:
            why = _not_writable(Path(value))
            if why is not None:
                problems.append(f"{name}={value} ({why})")
    if not env.get("TMPDIR"):
        try:
            tempfile.gettempdir()
        except FileNotFoundError:
            problems.append("no temporary directory (/tmp, /var/tmp and the cwd are read-only)")
    return problems


def check_caches_writable(environ: Mapping[str, str] | None = None) -> None:
    """Raise a not-retriable StageError naming every cache directory that is not writable."""
    problems = unwritable_caches(environ)
    if problems:
        raise StageError(
            "cannot write where this stage keeps caches and temporary files: "
            + "; ".join(problems)
            + ". With a read-only root filesystem each must be on a writable volume: the "
            "operator's stage pods mount one at /scratch and the kubetune trainer image points "
            "the caches there; a custom image (spec.resources.image) must do the same",
            Reason.CACHE_NOT_WRITABLE,
        )
