"""spec.retrain.keepRuns: delete the artifacts of a FineTuneJob's older runs.

The runs of one FineTuneJob sit side by side under
``<spec.storage.output>/runs/<uid[:8]>-<run>/`` (:func:`kubetune.layout.run_prefix`). Once a
run's evaluation has succeeded, its evaluate pod, with the job's own credentials, keeps the
newest ``keepRuns`` of them (the current run included) and the run whose model is the promoted
champion, and deletes the others::

    result = prune_old_runs(root, ctx.run_identity, keep_runs=2, protected_uris=[source])

Only this FineTuneJob's runs (its uid) are touched: another FineTuneJob's, a deleted and
re-created job's, and anything not named like a run are left alone. Promoted versions live
under ``spec.promotion.target`` as copies and are never deleted here. A run that cannot be
deleted is named in :attr:`RetentionResult.error`; the stage still succeeds, and the next
run tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kubetune.contract import StageError
from kubetune.layout import RUNS, RunLayout, join_uri, parse_run_dir, parse_run_id, run_dir
from kubetune.results import RetentionResult, RunIdentity
from kubetune.storage import Storage, StorageError
from kubetune_trainer.context import StageContext

log = logging.getLogger("kubetune.retention")


def runs_of_job(keys: Iterable[str], uid: str) -> list[str]:
    """The run ids of FineTuneJob ``uid`` that have keys under ``runs/``, newest first."""
    found: set[str] = set()
    for key in keys:
        parts = key.split("/")
        if len(parts) < 3 or parts[0] != RUNS:
            continue
        parsed = parse_run_dir(parts[1])
        if parsed is not None and parsed[0] == uid[:8]:
            found.add(parsed[1])
    return sorted(found, key=lambda run: parse_run_id(run) or (0, 0), reverse=True)


def choose(
    runs: list[str], current: str, keep_runs: int, protected: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """``(kept, deleted)`` of ``runs`` (newest first): the newest ``keep_runs`` are kept,
    and so are ``current`` and ``protected``, whatever their age."""
    keep = set(runs[:keep_runs]) | {current} | set(protected)
    return [r for r in runs if r in keep], [r for r in runs if r not in keep]


def prune_old_runs(
    root: Storage,
    identity: RunIdentity,
    keep_runs: int,
    protected_uris: Iterable[str] = (),
) -> RetentionResult:
    """Delete the runs of ``identity``'s FineTuneJob beyond ``keep_runs`` under ``root``.

    ``root`` is ``spec.storage.output``; ``protected_uris`` are artifacts that must stay
    readable (the champion's source model): the runs holding them are kept.
    """
    uid, current = identity.job_uid or "", identity.run_id or ""
    if not uid or not current:
        return RetentionResult(keep_runs=keep_runs, error="no run identity (local mode)")
    try:
        runs = runs_of_job(root.list(RUNS), uid)
    except StorageError as exc:
        return RetentionResult(keep_runs=keep_runs, error=f"listing {root.uri(RUNS)}: {exc}")
    prefixes = {run: join_uri(root.uri(), run_dir(run, uid)) + "/" for run in runs}
    protected = [r for r in runs if any(u.startswith(prefixes[r]) for u in protected_uris)]
    kept, doomed = choose(runs, current, keep_runs, protected)
    deleted: list[str] = []
    errors: list[str] = []
    for run in doomed:
        try:
            root.delete(run_dir(run, uid) + "/")
        except StorageError as exc:
            errors.append(f"{run}: {exc}")
            continue
        deleted.append(run)
        log.info("retention: deleted run %s (%s)", run, root.uri(run_dir(run, uid)))
    return RetentionResult(
        keep_runs=keep_runs,
        kept=kept,
        deleted=deleted,
        error="; ".join(errors) or None,
    )


def apply_retention(ctx: StageContext) -> RetentionResult | None:
    """The evaluate stage's retention step: None unless spec.retrain.keepRuns applies.

    Runs only for the run's own model (not a checkpoint scored by hand) of an operator run
    (a uid and a run id). The champion named by ``<promotion.target>/current.json`` keeps
    its run; when that pointer cannot be read, nothing is deleted.
    """
    retrain = ctx.job.spec.retrain
    identity = ctx.run_identity
    if retrain is None or retrain.keep_runs is None or ctx.model_key != RunLayout.MODEL:
        return None
    if not identity.job_uid or not identity.run_id:
        return None
    protected: list[str] = []
    if ctx.job.spec.promotion is not None:
        from kubetune_trainer.promotion import read_current

        try:
            champion = read_current(ctx.open(ctx.job.spec.promotion.target))
        except (StageError, StorageError) as exc:
            return RetentionResult(
                keep_runs=retrain.keep_runs,
                error=f"nothing deleted: the champion's run is unknown ({exc})",
            )
        if champion is not None and champion.source:
            protected.append(champion.source)
    root = ctx.open(ctx.job.spec.storage.output)
    return prune_old_runs(root, identity, retrain.keep_runs, protected)
