"""What every stage receives: the parsed job, where its outputs go, and a scratch dir.

Stages are plain functions ``run(ctx: StageContext) -> <Stage>Result``. Local
mode (``kubetune run``) builds one context and calls the stages in order, in
process; in a pod, ``kubetune <stage> --job job.json --output URI`` builds the
same context and calls the same function.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.contract import Env
from kubetune.layout import RunLayout
from kubetune.schema import FineTuneJob
from kubetune.storage import Storage, storage_for_job


@dataclass
class StageContext:
    job: FineTuneJob
    output: str
    scratch: Path
    show_progress: bool = False
    storage: Storage = field(init=False)
    layout: RunLayout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = RunLayout(self.output)
        self.storage = storage_for_job(self.output, self.job.spec.storage)

    def open(self, uri: str) -> Storage:
        """Open another URI (dataset source, model prefix) with this job's S3 settings."""
        return storage_for_job(uri, self.job.spec.storage)

    def scratch_dir(self, name: str) -> Path:
        path = self.scratch / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def make_context(
    job: FineTuneJob,
    output: str | None = None,
    scratch: Path | None = None,
    show_progress: bool = False,
) -> StageContext:
    """Context for ``job``; ``output`` overrides spec.storage.output (the operator's run prefix)."""
    if scratch is None:
        base = os.environ.get(Env.SCRATCH)
        if base:
            scratch = Path(base)
        else:
            scratch = Path(tempfile.mkdtemp(prefix=f"kubetune-{job.metadata.name}-"))
    scratch.mkdir(parents=True, exist_ok=True)
    return StageContext(
        job=job,
        output=output or job.spec.storage.output,
        scratch=scratch,
        show_progress=show_progress,
    )
