"""storage.py against a real moto S3 server on loopback and against the local file system."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from fixtures_s3 import free_port, s3_client

from kubetune.storage import (
    MULTIPART_CHUNK,
    FileStorage,
    S3Storage,
    Storage,
    StorageError,
    open_storage,
)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """The same tests on both backends: a fresh root per test."""
    if request.param == "file":
        return open_storage(f"file://{tmp_path}/root")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/runs/job1")


def test_write_then_read_round_trips_bytes_and_text(store: Storage) -> None:
    store.write_bytes("dataset/prepare.json", b'{"a": 1}')
    store.write_text("notes/ünïcode.txt", "héllo")
    assert store.read_bytes("dataset/prepare.json") == b'{"a": 1}'
    assert store.read_text("notes/ünïcode.txt") == "héllo"
    store.write_bytes("dataset/prepare.json", b"replaced")
    assert store.read_bytes("dataset/prepare.json") == b"replaced"


def test_exists_and_missing_key_error_names_the_uri(store: Storage) -> None:
    assert not store.exists("missing.json")
    store.write_text("present.json", "{}")
    assert store.exists("present.json")
    with pytest.raises(StorageError) as info:
        store.read_bytes("missing.json")
    assert "missing.json" in str(info.value)


def test_list_is_recursive_sorted_and_relative_to_the_root(store: Storage) -> None:
    for key in ("model/b.bin", "model/a.json", "model/sub/c.txt", "model2/x", "top.txt"):
        store.write_text(key, key)
    assert store.list("model") == ["model/a.json", "model/b.bin", "model/sub/c.txt"]
    assert store.list("model/") == ["model/a.json", "model/b.bin", "model/sub/c.txt"]
    assert store.list() == [
        "model/a.json",
        "model/b.bin",
        "model/sub/c.txt",
        "model2/x",
        "top.txt",
    ]
    assert store.list("nothing") == []


def test_delete_removes_a_key_or_a_whole_prefix(store: Storage) -> None:
    for key in ("ckpt/step-1/a", "ckpt/step-1/b", "ckpt/step-2/a", "keep.txt"):
        store.write_text(key, "x")
    store.delete("ckpt/step-1")
    assert store.list() == ["ckpt/step-2/a", "keep.txt"]
    store.delete("keep.txt")
    assert store.list() == ["ckpt/step-2/a"]
    store.delete("not/there")  # deleting nothing is fine (idempotent cleanup)


def test_upload_dir_and_download_dir_round_trip(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "nested").mkdir(parents=True)
    (src / "config.json").write_text('{"n_layer": 2}')
    (src / "nested" / "weights.bin").write_bytes(os.urandom(4096))
    keys = store.upload_dir(src, "model")
    assert keys == ["model/config.json", "model/nested/weights.bin"]
    out = tmp_path / "downloaded"
    files = store.download_dir("model", out)
    assert sorted(p.relative_to(out).as_posix() for p in files) == [
        "config.json",
        "nested/weights.bin",
    ]
    assert (out / "nested" / "weights.bin").read_bytes() == (
        src / "nested" / "weights.bin"
    ).read_bytes()


def test_download_dir_of_an_empty_prefix_says_nothing_is_there(
    store: Storage, tmp_path: Path
) -> None:
    with pytest.raises(StorageError, match="nothing stored there"):
        store.download_dir("model", tmp_path / "out")


def test_sub_storage_is_rooted_at_the_key(store: Storage) -> None:
    sub = store.sub("dataset")
    sub.write_text("train.jsonl", "line")
    assert store.read_text("dataset/train.jsonl") == "line"
    assert sub.uri("train.jsonl") == store.uri("dataset/train.jsonl")
    assert sub.list() == ["train.jsonl"]


def test_download_file_of_missing_key_leaves_no_partial_file(
    store: Storage, tmp_path: Path
) -> None:
    target = tmp_path / "out" / "x.bin"
    with pytest.raises(StorageError):
        store.download_file("x.bin", target)
    assert not target.exists()
    assert not list(tmp_path.rglob("*.part"))


# --------------------------------------------------------------------------- S3 specifics


def test_missing_bucket_error_names_the_bucket(moto_s3: str) -> None:
    store = open_storage("s3://no-such-bucket-kubetune/prefix")
    with pytest.raises(StorageError) as info:
        store.read_bytes("x.json")
    assert "no-such-bucket-kubetune" in str(info.value)


def test_s3_keys_live_under_the_root_prefix(s3_bucket: str, moto_s3: str) -> None:
    store = open_storage(f"s3://{s3_bucket}/runs/job1/")
    store.write_text("dataset/prepare.json", "{}")
    listed = s3_client(moto_s3).list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["runs/job1/dataset/prepare.json"]
    assert store.uri("dataset/prepare.json") == f"s3://{s3_bucket}/runs/job1/dataset/prepare.json"


def test_endpoint_comes_from_the_environment(moto_s3: str) -> None:
    store = open_storage("s3://bucket/x")
    assert isinstance(store, S3Storage)
    assert store.endpoint == moto_s3
    assert store.region == "us-east-1"


def test_unreachable_endpoint_is_named(moto_s3: str) -> None:
    import boto3
    from botocore.config import Config

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # One attempt only: the port is closed, so botocore's retries would just add time.
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    store = S3Storage("s3://bucket/x", endpoint=endpoint, client=client)
    with pytest.raises(StorageError) as info:
        store.read_bytes("k")
    assert endpoint in str(info.value) and "storage.endpoint" in str(info.value)


def test_large_file_upload_is_multipart_and_round_trips(
    s3_bucket: str, moto_s3: str, tmp_path: Path
) -> None:
    size = MULTIPART_CHUNK + 6 * 1024 * 1024  # ~70 MiB: two parts
    big = tmp_path / "model.safetensors"
    sha = hashlib.sha256()
    with open(big, "wb") as fh:
        block = os.urandom(1024 * 1024)
        for i in range(size // len(block)):
            chunk = block[:-8] + i.to_bytes(8, "little")  # every MiB distinct
            fh.write(chunk)
            sha.update(chunk)
    store = open_storage(f"s3://{s3_bucket}/runs/big")
    store.upload_file(big, "model/model.safetensors")
    head = s3_client(moto_s3).head_object(Bucket=s3_bucket, Key="runs/big/model/model.safetensors")
    assert head["ContentLength"] == size
    # A multipart upload's ETag is "<md5 of part md5s>-<number of parts>".
    assert head["ETag"].strip('"').endswith("-2")
    out = tmp_path / "back.bin"
    big.unlink()  # keep the disk footprint to one copy
    store.download_file("model/model.safetensors", out)
    got = hashlib.sha256()
    with open(out, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 * 1024 * 1024), b""):
            got.update(chunk)
    assert got.hexdigest() == sha.hexdigest()
    assert not list(tmp_path.glob(".*.part"))


# --------------------------------------------------------------------------- file specifics


def test_file_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    store = FileStorage(f"file://{tmp_path}")
    store.write_text("a/result.json", "{}")
    store.upload_file(tmp_path / "a" / "result.json", "b/copy.json")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["result.json"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["copy.json"]


def test_relative_file_uri_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_storage("file://runs/local")
    store.write_text("x.txt", "here")
    assert (tmp_path / "runs" / "local" / "x.txt").read_text() == "here"


def test_unsupported_scheme_is_rejected() -> None:
    with pytest.raises(StorageError, match="unsupported scheme"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError, match="not a storage URI"):
        open_storage("/just/a/path")
