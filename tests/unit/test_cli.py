"""The `kubetune` command: manifest errors, exit codes and termination messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.cli import main
from kubetune.contract import (
    NOT_RETRIABLE_EXIT_CODES,
    ExitCode,
    Interrupted,
    StageError,
    exit_code_for,
    failure_payload,
    write_termination_message,
)
from kubetune.schema import Reason

GOOD = """
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {name: demo}
spec:
  model: {name: gpt2}
  dataset: {source: "file:///nonexistent/corpus/"}
  storage: {output: "file://%s"}
"""


def test_validate_accepts_a_good_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(GOOD % tmp_path)
    assert main(["validate", str(path)]) == 0
    assert "valid FineTuneJob 'demo'" in capsys.readouterr().out


def test_validate_names_every_bad_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text((GOOD % tmp_path) + "  training: {batchSize: 0, precision: fp8}\n")
    assert main(["validate", str(path)]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "spec.training.batchSize" in err and "spec.training.precision" in err
    assert str(path) in err


def test_stage_failure_writes_reason_to_termination_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(GOOD % (tmp_path / "out"))
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    code = main(["prepare", "--job", str(path), "--scratch", str(tmp_path / "scratch")])
    payload = json.loads(log.read_text())
    assert payload["stage"] == "prepare"
    assert "/nonexistent/corpus" in payload["error"]
    assert code in (ExitCode.FAILED, ExitCode.NOT_RETRIABLE)
    assert "/nonexistent/corpus" in capsys.readouterr().err


def test_not_retriable_reasons_map_to_exit_3() -> None:
    assert (
        exit_code_for(StageError("no text", reason=Reason.DATASET_UNUSABLE))
        == ExitCode.NOT_RETRIABLE
    )
    assert exit_code_for(StageError("oom", reason=Reason.STAGE_FAILED)) == ExitCode.FAILED
    assert exit_code_for(RuntimeError("boom")) == ExitCode.FAILED
    assert failure_payload("train", RuntimeError("boom"))["reason"] == "StageFailed"


def test_a_stop_on_sigterm_exits_interrupted_with_its_checkpoint_step() -> None:
    stopped = Interrupted("stopped on SIGTERM after step 12", checkpoint_step=12)
    assert exit_code_for(stopped) == ExitCode.INTERRUPTED == 4
    assert ExitCode.INTERRUPTED not in NOT_RETRIABLE_EXIT_CODES
    payload = failure_payload("train", stopped)
    assert (payload["reason"], payload["checkpointStep"]) == ("Preempted", 12)


def test_termination_message_stays_under_the_kubernetes_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    write_termination_message({"stage": "evaluate", "error": "x" * 10000, "reason": "StageFailed"})
    assert len(log.read_bytes()) <= 4096
    assert json.loads(log.read_text())["reason"] == "StageFailed"


def test_a_stage_whose_caches_are_not_writable_stops_at_once_naming_each_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A read-only root without the /scratch volume: each cache path the pod sets is named.

    Root ignores permission bits, so the unwritable path is one under a regular file (what
    a path on a read-only filesystem is to the stage: mkdir fails)."""
    path = tmp_path / "job.yaml"
    path.write_text(GOOD % (tmp_path / "out"))
    blocker = tmp_path / "read-only"
    blocker.write_text("")
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    monkeypatch.setenv("HF_HOME", str(blocker / "hf"))
    monkeypatch.setenv("MPLCONFIGDIR", str(blocker / "mpl"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fine"))
    code = main(["prepare", "--job", str(path), "--scratch", str(tmp_path / "scratch")])
    assert code == ExitCode.NOT_RETRIABLE
    payload = json.loads(log.read_text())
    assert payload["reason"] == "CacheNotWritable"
    assert f"HF_HOME={blocker}/hf (Not a directory)" in payload["error"]
    assert f"MPLCONFIGDIR={blocker}/mpl" in payload["error"]
    assert "XDG_CACHE_HOME" not in payload["error"]  # that one is fine
    assert not (tmp_path / "out").exists()  # no work started
    assert "CacheNotWritable" in capsys.readouterr().err
