"""Spec rules that hold on a cluster but not in local mode: pure functions over the spec.

The CRD (generated from :mod:`kubetune.schema`) refuses at ``kubectl apply`` everything the
Kubernetes API would refuse in a stage Job. What it cannot refuse is a spec that is fine for
``kubetune run`` on one machine and useless on a cluster, because the same schema serves
both. The reconciler checks these before it creates a stage Job and reports each problem
as an ``InvalidSpec`` condition::

    problems = cluster_spec_problems(job.spec)
    if problems:
        return Reason.INVALID_SPEC.value, "; ".join(problems)

Tested in ``tests/unit/test_spec_checks.py``.
"""

from __future__ import annotations

from kubetune.schema import FineTuneJobSpec


def file_output_problem(output: str) -> str | None:
    """Why a ``file://`` ``spec.storage.output`` cannot work on a cluster; None for s3://.

    Each stage runs in its own pod with a read-only root file system and a scratch
    ``emptyDir`` that is gone when the pod ends: the prepared dataset would be lost before
    training, the model before evaluation, and the operator could not read the results.
    (``file://`` inputs stay allowed: an image may carry a model or a dataset.)
    """
    if not output.strip().lower().startswith("file://"):
        return None
    return (
        f"spec.storage.output {output} is a file:// path, which only local mode (kubetune run) "
        "can use: stage pods share no file system, so each stage's artifacts would be lost "
        "before the next; use an s3:// prefix (with storage.endpoint for MinIO or Ceph)"
    )


def cluster_spec_problems(spec: FineTuneJobSpec, *, allow_file_output: bool = False) -> list[str]:
    """Every reason ``spec`` cannot run on a cluster, each naming its field and the fix.

    ``allow_file_output`` is for setups whose stage pods do share a file system with the
    operator (a test harness running pods as local processes).
    """
    problems: list[str] = []
    if not allow_file_output:
        problem = file_output_problem(spec.storage.output)
        if problem is not None:
            problems.append(problem)
    return problems
