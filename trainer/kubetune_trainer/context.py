"""What every stage receives: the parsed job, where its outputs go, and a scratch dir.

Stages are plain functions ``run(ctx: StageContext) -> <Stage>Result``. Local
mode (``kubetune run``) builds one context and calls the stages in order, in
process; in a pod, ``kubetune <stage> --job job.json --output URI`` builds the
same context and calls the same function.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.contract import Env, StageError
from kubetune.layout import RunLayout
from kubetune.preflight import probe_write
from kubetune.results import RunIdentity
from kubetune.schema import FineTuneJob, Reason
from kubetune.storage import (
    Storage,
    StorageError,
    is_permanent,
    storage_failure_reason,
    storage_for_job,
)


@dataclass
class StageContext:
    job: FineTuneJob
    output: str
    scratch: Path
    show_progress: bool = False
    owns_scratch: bool = False  # a temporary directory this context made, removed by close()
    # The model evaluate scores: model/, or a checkpoint exported by `evaluate --checkpoint`.
    model_key: str = RunLayout.MODEL
    storage: Storage = field(init=False)
    layout: RunLayout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = RunLayout(self.output)
        self.storage = storage_for_job(self.output, self.job.spec.storage)

    @property
    def run_identity(self) -> RunIdentity:
        """The run this stage works for, stamped into its result (``run``).

        From the job's uid and the operator's annotations in ``job.json``; every field is
        None in local mode (no cluster, no run).
        """
        return RunIdentity.of_job(self.job)

    def open(self, uri: str) -> Storage:
        """Open another URI (dataset source, model prefix) with this job's S3 settings."""
        return storage_for_job(uri, self.job.spec.storage)

    def scratch_dir(self, name: str) -> Path:
        path = self.scratch / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def check_output_writable(self) -> None:
        """Fail before any work when the output cannot be written (a probe, then removed)."""
        try:
            probe_write(self.storage)
        except (StorageError, OSError) as exc:
            raise StageError(
                f"storage.output {self.output}: cannot write there ({exc}); point "
                "storage.output at a writable location (and check its credentials)",
                reason=storage_failure_reason(exc)
                or (Reason.INVALID_SPEC if is_permanent(exc) else Reason.STAGE_FAILED),
            ) from None

    def close(self) -> None:
        """Remove the scratch directory if this context created it (local runs, tests)."""
        if self.owns_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> StageContext:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def make_context(
    job: FineTuneJob,
    output: str | None = None,
    scratch: Path | None = None,
    show_progress: bool = False,
) -> StageContext:
    """Context for ``job``; ``output`` overrides spec.storage.output (the operator's run prefix).

    Without ``scratch`` (and without ``$KUBETUNE_SCRATCH``, which a pod sets to its emptyDir)
    the context makes a temporary directory and removes it on :meth:`StageContext.close`.
    """
    owns_scratch = False
    if scratch is None:
        base = os.environ.get(Env.SCRATCH)
        if base:
            scratch = Path(base)
        else:
            scratch = Path(tempfile.mkdtemp(prefix=f"kubetune-{job.metadata.name}-"))
            owns_scratch = True
    scratch.mkdir(parents=True, exist_ok=True)
    return StageContext(
        job=job,
        output=output or job.spec.storage.output,
        scratch=scratch,
        show_progress=show_progress,
        owns_scratch=owns_scratch,
    )
