"""Bad input is stopped before the work, with an exit code and a message naming the field.

Each test runs the real ``kubetune`` entrypoint (``kubetune.cli.main``) on a small real
corpus (30 tldr pages) and asserts the exit code, the message and that nothing was lost
or left behind.
"""

from __future__ import annotations

import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from datapaths import tldr_files

from kubetune.cli import main
from kubetune.contract import ExitCode
from kubetune.layout import RunLayout
from kubetune.storage import open_storage
from kubetune_trainer.tokenizer_build import load_tokenizer, train_bpe_tokenizer

MANIFEST = """
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {{name: bad-input}}
spec:
  model: {model}
  dataset: {{source: "{source}", format: markdown}}
  training: {{maxSteps: 2, batchSize: 2, maxSeqLength: 32}}
  evaluation: {{bleu: {{enabled: false}}, baseline: false}}
  storage: {{output: "{output}"}}
"""
FRESH = "{fresh: {nLayer: 1, nHead: 2, nEmbd: 16, nPositions: 32, vocabSize: 300}}"


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    pages = tmp_path / "pages"
    pages.mkdir()
    for path in tldr_files("common")[:30]:
        shutil.copy(path, pages / path.name)
    return pages.as_uri() + "/"


def write_manifest(tmp_path: Path, *, source: str, output: str, model: str = FRESH) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(MANIFEST.format(model=model, source=source, output=output))
    return str(path)


def test_unwritable_output_fails_before_prepare_naming_storage_output(
    tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    output = (blocker / "out").as_uri()
    code = main(["run", write_manifest(tmp_path, source=corpus, output=output), "--no-progress"])
    err = capsys.readouterr()
    assert code == ExitCode.NOT_RETRIABLE
    assert f"storage.output {output}: cannot write there" in err.err
    # Nothing ran: no prepare timing in the summary.
    assert "prepare time" not in err.out


def test_model_uri_with_nothing_there_is_not_retriable(
    tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "no-model"
    empty.mkdir()
    manifest = write_manifest(
        tmp_path,
        source=corpus,
        output=(tmp_path / "out").as_uri(),
        model=f'{{uri: "{empty.as_uri()}/"}}',
    )
    code = main(["run", manifest, "--no-progress"])
    err = capsys.readouterr().err
    assert code == ExitCode.NOT_RETRIABLE
    assert empty.as_uri() in err and "nothing stored there" in err


def test_missing_source_path_says_it_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = (tmp_path / "no-such-corpus").as_uri() + "/"
    manifest = write_manifest(tmp_path, source=source, output=(tmp_path / "out").as_uri())
    code = main(["run", manifest, "--no-progress"])
    err = capsys.readouterr().err
    assert code == ExitCode.NOT_RETRIABLE
    assert "no such file or directory" in err and "no-such-corpus" in err


def test_validate_check_uris_lists_every_missing_uri(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    manifest = write_manifest(
        tmp_path,
        source=(tmp_path / "nowhere").as_uri() + "/",
        output=(blocker / "out").as_uri(),
        model=f'{{uri: "{(tmp_path / "no-model").as_uri()}/"}}',
    )
    assert main(["validate", manifest]) == ExitCode.OK  # the manifest itself is valid
    capsys.readouterr()
    assert main(["validate", manifest, "--check-uris"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    for field in ("dataset.source", "model.uri", "storage.output"):
        assert f"  - {field} " in err


def test_validate_check_uris_passes_for_reachable_uris(
    tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    manifest = write_manifest(tmp_path, source=corpus, output=output.as_uri())
    assert main(["validate", manifest, "--check-uris"]) == ExitCode.OK
    assert "valid FineTuneJob" in capsys.readouterr().out
    assert list(output.iterdir()) == []  # the write probe was removed


def test_local_run_removes_its_scratch_directory(
    tmp_path: Path, corpus: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.delenv("KUBETUNE_SCRATCH", raising=False)
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, source=corpus, output=out.as_uri())
    assert main(["run", manifest, "--stages", "prepare", "--no-progress"]) == ExitCode.OK
    assert (out / RunLayout.PREPARE_RESULT).is_file()
    assert list(temp.iterdir()) == []


def test_tokenizer_from_storage_downloads_no_weights(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    tokenizer = train_bpe_tokenizer(["some text for a tokenizer"] * 50, vocab_size=300)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"\0" * 1024)
    (model_dir / "pytorch_model-00001-of-00002.bin").write_bytes(b"\0" * 1024)
    scratch = tmp_path / "scratch"
    loaded = load_tokenizer(model_dir.as_uri(), open_storage, scratch)
    assert loaded("some text").input_ids == tokenizer("some text").input_ids
    downloaded = {p.name for p in scratch.rglob("*") if p.is_file()}
    assert "tokenizer.json" in downloaded
    assert not any(name.endswith((".safetensors", ".bin")) for name in downloaded)


def test_files_written_to_file_storage_get_one_mode(tmp_path: Path) -> None:
    storage = open_storage(tmp_path.as_uri())
    storage.write_text("written.json", "{}")
    local = tmp_path / "local.txt"
    local.write_text("x")
    storage.upload_file(local, "uploaded/local.txt")
    modes = {
        stat.S_IMODE((tmp_path / key).stat().st_mode)
        for key in ("written.json", "uploaded/local.txt")
    }
    assert len(modes) == 1
    assert modes.pop() & 0o044  # readable by group and others, as under any usual umask
