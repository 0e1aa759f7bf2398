"""Champion vs challenger (kubetune_trainer.promotion): the rule, versions, pointer, rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.contract import StageError
from kubetune.schema import PromotionSpec, Reason
from kubetune.storage import FileStorage, StorageError, open_storage
from kubetune_trainer.promotion import (
    POINTER,
    Scores,
    VersionRecord,
    decide,
    publish,
    read_current,
    rollback,
)

SPEC = PromotionSpec(target="file:///serving/", min_improvement=0.01)


def champion(version: str = "v0001") -> VersionRecord:
    return VersionRecord(version=version, model_uri=f"file:///serving/versions/{version}")


def model_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"name": name}))
    (d / "model.safetensors").write_bytes(b"weights of " + name.encode())
    return d


def test_the_first_model_is_promoted_when_it_beats_the_baseline() -> None:
    d = decide(Scores(50.0), Scores(100.0), None, None, SPEC)
    assert d.promote and d.reason == Reason.PROMOTED
    assert "vs 100 of the baseline" in d.message


def test_a_model_that_does_not_beat_the_champion_by_the_margin_is_not_promoted() -> None:
    d = decide(Scores(49.8), Scores(100.0), champion(), Scores(50.0), SPEC)
    assert not d.promote and d.reason == Reason.NOT_BETTER
    assert "champion v0001" in d.message and "needs < 49.5" in d.message


def test_beating_both_by_the_margin_promotes() -> None:
    d = decide(Scores(49.0), Scores(100.0), champion(), Scores(50.0), SPEC)
    assert d.promote


def test_bleu_is_checked_only_when_asked() -> None:
    spec = SPEC.model_copy(update={"min_bleu_improvement": 1.0})
    worse_bleu = decide(
        Scores(40.0, bleu=10.0), Scores(100.0, 2.0), champion(), Scores(50.0, 9.5), spec
    )
    assert not worse_bleu.promote and "BLEU 10 vs 9.5 of champion v0001" in worse_bleu.message
    assert decide(
        Scores(40.0, bleu=10.0), Scores(100.0, 2.0), champion(), Scores(50.0, 9.5), SPEC
    ).promote


def test_no_perplexity_is_never_promoted() -> None:
    assert not decide(Scores(None), None, None, None, SPEC).promote


def test_publish_uploads_a_version_then_points_at_it_and_rollback_points_back(
    tmp_path: Path,
) -> None:
    target = open_storage(f"file://{tmp_path}/serving")
    first = publish(target, model_dir(tmp_path, "a"), Scores(50.0), source="file:///runs/a/model")
    assert first.version == "v0001" and first.previous is None
    assert read_current(target) == first
    second = publish(target, model_dir(tmp_path, "b"), Scores(40.0))
    assert (second.version, second.previous) == ("v0002", "v0001")
    assert (tmp_path / "serving/versions/v0002/model.safetensors").read_bytes() == b"weights of b"
    assert (tmp_path / "serving/versions/v0001/model.safetensors").read_bytes() == b"weights of a"
    current = read_current(target)
    assert current is not None and current.model_uri.endswith("versions/v0002")
    back = rollback(target)
    assert back.version == "v0001" and back.rolled_back_from == "v0002"
    assert read_current(target) == back
    with pytest.raises(StageError, match="no previous version"):
        rollback(target)
    third = publish(target, model_dir(tmp_path, "c"), Scores(30.0))
    assert third.version == "v0003"  # never reuses a version number


class FailingUpload(FileStorage):
    """Fails after the first file of a version, as a lost connection would."""

    def upload_file(self, local: Path, key: str) -> None:  # type: ignore[override]
        if key.endswith(".safetensors"):
            raise StorageError(f"connection lost uploading {key}")
        super().upload_file(local, key)


def test_a_failed_upload_leaves_the_current_version_in_place(tmp_path: Path) -> None:
    root = tmp_path / "serving"
    good = open_storage(f"file://{root}")
    publish(good, model_dir(tmp_path, "a"), Scores(50.0))
    failing = FailingUpload(f"file://{root}")
    with pytest.raises(StageError) as err:
        publish(failing, model_dir(tmp_path, "b"), Scores(40.0))
    assert err.value.reason == Reason.PROMOTION_FAILED.value
    assert "current version is unchanged (v0001)" in str(err.value)
    current = read_current(good)
    assert current is not None and current.version == "v0001"
    assert json.loads((root / POINTER).read_text())["version"] == "v0001"
