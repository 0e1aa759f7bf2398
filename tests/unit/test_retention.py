"""spec.retrain.keepRuns (trainer/kubetune_trainer/retention.py) on local files and on S3."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.layout import run_dir
from kubetune.results import RunIdentity
from kubetune.storage import FileStorage, Storage, StorageAccessDenied, open_storage
from kubetune_trainer.retention import choose, prune_old_runs, runs_of_job

UID = "0b4c8f9e-1111-2222-3333-444455556666"
OTHER = "77aa0000-1111-2222-3333-444455556666"


def seed(root: Storage, uid: str, *runs: str) -> None:
    for run in runs:
        root.write_text(f"{run_dir(run, uid)}/model/config.json", "{}")
        root.write_text(f"{run_dir(run, uid)}/eval/evaluate.json", "{}")


def present(root: Storage, uid: str) -> list[str]:
    return runs_of_job(root.list("runs"), uid)


def test_runs_are_ordered_by_generation_then_retrain_and_filtered_by_uid() -> None:
    keys = [
        "runs/0b4c8f9e-g2/model/a",
        "runs/0b4c8f9e-g10/model/a",
        "runs/0b4c8f9e-g2-r1/model/a",
        "runs/77aa0000-g11/model/a",  # another FineTuneJob
        "runs/notes.txt",
        "runs/0b4c8f9e-latest/x",
        "dataset/x",
    ]
    assert runs_of_job(keys, UID) == ["g10", "g2-r1", "g2"]
    assert choose(["g10", "g2-r1", "g2", "g1"], "g10", 2) == (["g10", "g2-r1"], ["g2", "g1"])
    # The current run and protected runs are kept whatever their age.
    kept, deleted = choose(["g10", "g2-r1", "g2", "g1"], "g2", 1, ["g1"])
    assert kept == ["g10", "g2", "g1"] and deleted == ["g2-r1"]


def test_prune_keeps_the_newest_runs_the_champions_run_and_other_jobs(tmp_path: Path) -> None:
    root = FileStorage(f"file://{tmp_path}/out")
    seed(root, UID, "g1", "g2", "g2-r1", "g3")
    seed(root, OTHER, "g1")
    root.write_text("runs/README", "not a run")
    identity = RunIdentity(job_uid=UID, run_id="g3", spec_hash="h")
    champion = root.uri(f"{run_dir('g1', UID)}/model")
    result = prune_old_runs(root, identity, 2, [champion])
    assert result.kept == ["g3", "g2-r1", "g1"] and result.deleted == ["g2"]
    assert result.error is None
    assert present(root, UID) == ["g3", "g2-r1", "g1"]
    assert present(root, OTHER) == ["g1"] and root.exists("runs/README")
    # Idempotent: a retried evaluate pod deletes nothing more.
    again = prune_old_runs(root, identity, 2, [champion])
    assert again.deleted == [] and present(root, UID) == ["g3", "g2-r1", "g1"]


def test_a_run_that_cannot_be_deleted_is_reported_and_the_others_go(tmp_path: Path) -> None:
    class Refusing(FileStorage):
        def delete(self, prefix: str) -> None:
            if "-g1/" in prefix:
                raise StorageAccessDenied(f"{self.uri(prefix)}: access denied (AccessDenied)")
            super().delete(prefix)

    root = Refusing(f"file://{tmp_path}/out")
    seed(root, UID, "g1", "g2", "g3")
    result = prune_old_runs(root, RunIdentity(job_uid=UID, run_id="g3"), 1)
    assert result.deleted == ["g2"]
    assert result.error is not None and "g1" in result.error and "access denied" in result.error
    assert present(root, UID) == ["g3", "g1"]


def test_local_runs_have_no_identity_and_delete_nothing(tmp_path: Path) -> None:
    root = FileStorage(f"file://{tmp_path}/out")
    seed(root, UID, "g1", "g2")
    result = prune_old_runs(root, RunIdentity(), 1)
    assert result.deleted == [] and result.error is not None
    assert present(root, UID) == ["g2", "g1"]


def test_on_s3_a_run_is_deleted_without_its_prefix_siblings(s3_bucket: str, moto_s3: str) -> None:
    """``runs/<uid>-g1`` is a prefix of ``runs/<uid>-g10`` as a string; only g1 may go."""
    root = open_storage(f"s3://{s3_bucket}/team/out", endpoint=moto_s3)
    seed(root, UID, *(f"g{n}" for n in range(1, 11)))
    result = prune_old_runs(root, RunIdentity(job_uid=UID, run_id="g10"), 9)
    assert result.deleted == ["g1"] and result.error is None
    assert present(root, UID) == [f"g{n}" for n in range(10, 1, -1)]
    assert root.exists(f"{run_dir('g10', UID)}/model/config.json")


@pytest.mark.parametrize("keep", [1, 3])
def test_the_current_run_is_never_deleted_even_when_older_runs_sort_after_it(
    tmp_path: Path, keep: int
) -> None:
    root = FileStorage(f"file://{tmp_path}/out")
    seed(root, UID, "g1", "g2", "g3")
    result = prune_old_runs(root, RunIdentity(job_uid=UID, run_id="g1"), keep)
    assert "g1" in result.kept and "g1" not in result.deleted
    assert len(present(root, UID)) == (2 if keep == 1 else 3)
