"""storage.py against a real moto S3 server on loopback and against the local file system;
its retries through S3 outages against a fake client and a fake clock."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from fixtures_s3 import free_port, s3_client

from harness.s3 import ACCESS_KEY, SECRET_KEY
from kubetune.contract import Env, ExitCode, StageError, exit_code_for
from kubetune.schema import Reason
from kubetune.storage import (
    DEFAULT_RETRY_SECONDS,
    MULTIPART_CHUNK,
    FileStorage,
    RetryPolicy,
    S3Storage,
    Storage,
    StorageAccessDenied,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
    is_permanent,
    open_storage,
    storage_failure_reason,
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
    store = S3Storage(
        "s3://bucket/x", endpoint=endpoint, client=client, retry=RetryPolicy(seconds=0)
    )
    with pytest.raises(StorageUnavailable) as info:
        store.read_bytes("k")
    assert endpoint in str(info.value) and "storage.endpoint" in str(info.value)


@pytest.mark.parametrize(
    ("key_id", "secret", "code"),
    [
        ("not-the-key", SECRET_KEY, "InvalidAccessKeyId"),
        (ACCESS_KEY, "not-the-secret", "SignatureDoesNotMatch"),
    ],
)
def test_the_test_s3_server_refuses_wrong_credentials_as_s3_does(
    s3_bucket: str, moto_s3: str, key_id: str, secret: str, code: str
) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=moto_s3,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )
    store = S3Storage(f"s3://{s3_bucket}/runs", client=client, retry=RetryPolicy(seconds=0))
    with pytest.raises(StorageAccessDenied, match=f"access denied \\({code}\\) while writing"):
        store.write_text("x.json", "{}")
    with pytest.raises(StorageAccessDenied, match="access denied"):
        store.exists("x.json")  # a refused HEAD is not "missing"
    assert s3_client(moto_s3).list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


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


# --------------------------------------------------------------------------- riding through outages
# A fake client raising botocore's real exceptions, and a fake clock whose sleep() advances it.


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FlakyClient:
    """An S3 client whose calls raise ``failures`` in order (forever if ``endless``), then work."""

    def __init__(self, *failures: Exception, endless: bool = False) -> None:
        self.failures = list(failures)
        self.endless = endless
        self.calls = 0

    def _call(self, result: Any) -> Any:
        self.calls += 1
        if self.failures:
            raise self.failures[0] if self.endless else self.failures.pop(0)
        return result

    def get_object(self, **_: Any) -> Any:
        return self._call({"Body": io.BytesIO(b"data")})

    def put_object(self, **_: Any) -> Any:
        return self._call({})

    def head_object(self, **_: Any) -> Any:
        return self._call({})

    def upload_file(self, *_: Any, **__: Any) -> Any:
        return self._call(None)


def s3_error(code: str, status: int, operation: str = "GetObject") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


ENDPOINT = "http://s3.test:9000"
REFUSED = EndpointConnectionError(endpoint_url=f"{ENDPOINT}/bucket/runs/k.json")


def flaky_store(client: FlakyClient, fake: FakeTime, seconds: float = 300.0) -> S3Storage:
    # jitter 1.0: every pause at the top of its range, so the schedule is exact.
    policy = RetryPolicy(seconds=seconds, clock=fake.clock, sleep=fake.sleep, jitter=lambda: 1.0)
    return S3Storage("s3://bucket/runs", endpoint=ENDPOINT, client=client, retry=policy)


def test_a_transient_outage_is_ridden_through_with_exponential_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeTime()
    client = FlakyClient(REFUSED, REFUSED, REFUSED, REFUSED)
    with caplog.at_level(logging.WARNING, logger="kubetune.storage"):
        assert flaky_store(client, fake).read_bytes("k.json") == b"data"
    assert fake.sleeps == [1.0, 2.0, 4.0, 8.0]
    assert client.calls == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    # Each names the operation, the key, the error and the time left.
    assert all("reading s3://bucket/runs/k.json failed" in w for w in warnings)
    assert all("EndpointConnectionError" in w for w in warnings)
    assert "300 s of the 300 s storage retry budget left" in warnings[0]
    assert "293 s of the 300 s storage retry budget left" in warnings[3]  # 1 + 2 + 4 slept
    assert all(Env.STORAGE_RETRY_SECONDS in w for w in warnings)


def test_pauses_double_up_to_the_cap_and_jitter_scales_them_between_half_and_all() -> None:
    top = RetryPolicy(first_delay=1.0, max_delay=30.0, jitter=lambda: 1.0)
    assert [top.pause(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    bottom = RetryPolicy(first_delay=1.0, max_delay=30.0, jitter=lambda: 0.0)
    assert [bottom.pause(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_storage_unreachable_for_the_whole_budget_gives_up_the_attempt() -> None:
    fake = FakeTime()
    client = FlakyClient(REFUSED, endless=True)
    with pytest.raises(StorageUnavailable) as info:
        flaky_store(client, fake, seconds=20).write_bytes("k.json", b"x")
    # 1 + 2 + 4 + 8, then the last pause is cut to the 5 s left: one attempt on the deadline.
    assert fake.sleeps == [1.0, 2.0, 4.0, 8.0, 5.0]
    assert client.calls == 6
    message = str(info.value)
    assert "s3://bucket/runs/k.json: storage was unreachable for 20 s while writing" in message
    assert "6 attempts" in message and ENDPOINT in message
    assert f"retry budget of 20 s (${Env.STORAGE_RETRY_SECONDS})" in message
    assert not is_permanent(info.value)
    assert storage_failure_reason(info.value) == Reason.STAGE_FAILED


def test_a_zero_budget_gives_up_at_the_first_transient_failure() -> None:
    fake = FakeTime()
    client = FlakyClient(REFUSED, endless=True)
    with pytest.raises(StorageUnavailable, match="unreachable for 0 s"):
        flaky_store(client, fake, seconds=0).read_bytes("k.json")
    assert fake.sleeps == [] and client.calls == 1


@pytest.mark.parametrize(
    "failure",
    [
        REFUSED,
        ConnectionClosedError(endpoint_url=ENDPOINT),
        ConnectTimeoutError(endpoint_url=ENDPOINT),
        ReadTimeoutError(endpoint_url=ENDPOINT),
        ResponseStreamingError(error="connection reset by peer"),
        s3_error("InternalError", 500),
        s3_error("ServiceUnavailable", 503),
        s3_error("SlowDown", 503),
        s3_error("BadGateway", 502),
        s3_error("TooManyRequests", 429),
        s3_error("RequestTimeout", 400),
    ],
    ids=lambda failure: type(failure).__name__ + "-" + str(getattr(failure, "response", ""))[:40],
)
def test_connection_errors_timeouts_5xx_and_throttling_are_retried(failure: Exception) -> None:
    fake = FakeTime()
    client = FlakyClient(failure)
    assert flaky_store(client, fake).read_bytes("k.json") == b"data"
    assert fake.sleeps == [1.0] and client.calls == 2


@pytest.mark.parametrize(
    ("code", "status", "raised"),
    [
        ("NoSuchKey", 404, StorageNotFound),
        ("NoSuchBucket", 404, StorageNotFound),
        ("AccessDenied", 403, StorageAccessDenied),
        ("InvalidAccessKeyId", 403, StorageAccessDenied),
        ("SignatureDoesNotMatch", 403, StorageAccessDenied),
    ],
)
def test_permanent_errors_are_not_retried(
    code: str, status: int, raised: type[StorageError]
) -> None:
    fake = FakeTime()
    client = FlakyClient(s3_error(code, status), endless=True)
    with pytest.raises(raised):
        flaky_store(client, fake).read_bytes("k.json")
    assert fake.sleeps == [] and client.calls == 1


def test_refused_credentials_name_the_variables_and_the_secret() -> None:
    client = FlakyClient(s3_error("InvalidAccessKeyId", 403, "PutObject"), endless=True)
    with pytest.raises(StorageAccessDenied) as info:
        flaky_store(client, FakeTime()).write_bytes("k.json", b"x")
    message = str(info.value)
    assert "AWS_ACCESS_KEY_ID" in message and "storage.credentialsSecret" in message
    assert storage_failure_reason(info.value) == Reason.STORAGE_ACCESS_DENIED


def test_an_upload_refused_inside_boto3s_wrapper_is_still_access_denied() -> None:
    # boto3 raises S3UploadFailedError while handling the ClientError (its __context__).
    def refused_upload() -> Exception:
        try:
            raise s3_error("AccessDenied", 403, "PutObject")
        except ClientError as exc:
            try:
                raise S3UploadFailedError(f"Failed to upload: {exc}")
            except S3UploadFailedError as wrapped:
                return wrapped

    fake = FakeTime()
    client = FlakyClient(refused_upload(), endless=True)
    with pytest.raises(StorageAccessDenied):
        flaky_store(client, fake).upload_file(Path("/tmp/x"), "model/x")
    assert fake.sleeps == []


def test_exists_rides_through_and_a_404_is_false_not_a_retry() -> None:
    fake = FakeTime()
    client = FlakyClient(REFUSED, s3_error("404", 404, "HeadObject"))
    assert flaky_store(client, fake).exists("k.json") is False
    assert fake.sleeps == [1.0] and client.calls == 2


def test_the_budget_comes_from_the_environment_and_sub_storage_keeps_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(Env.STORAGE_RETRY_SECONDS, raising=False)
    assert S3Storage("s3://bucket/x").retry.seconds == DEFAULT_RETRY_SECONDS == 300
    monkeypatch.setenv(Env.STORAGE_RETRY_SECONDS, "7.5")
    store = open_storage("s3://bucket/x")
    assert isinstance(store, S3Storage) and store.retry.seconds == 7.5
    sub = store.sub("dataset")
    assert isinstance(sub, S3Storage) and sub.retry is store.retry
    # A caller that must not wait (the operator, an interactive check) passes its own.
    quick = open_storage("s3://bucket/x", retry=RetryPolicy(seconds=0))
    assert isinstance(quick, S3Storage) and quick.retry.seconds == 0
    monkeypatch.setenv(Env.STORAGE_RETRY_SECONDS, "five minutes")
    with caplog.at_level(logging.WARNING, logger="kubetune.storage"):
        assert S3Storage("s3://bucket/x").retry.seconds == DEFAULT_RETRY_SECONDS
    assert Env.STORAGE_RETRY_SECONDS in caplog.text and "'five minutes'" in caplog.text


def test_a_stage_error_wrapping_a_storage_fault_gets_the_reason_storage_decides() -> None:
    def wrapped(fault: StorageError) -> StageError:
        try:
            raise fault
        except StorageError as exc:
            try:
                raise StageError(f"dataset.source: {exc}", Reason.DATASET_UNUSABLE) from None
            except StageError as stage_error:
                return stage_error

    denied = wrapped(StorageAccessDenied("access denied"))
    assert storage_failure_reason(denied) == Reason.STORAGE_ACCESS_DENIED
    assert exit_code_for(StageError("x", Reason.STORAGE_ACCESS_DENIED)) == ExitCode.NOT_RETRIABLE
    assert storage_failure_reason(wrapped(StorageUnavailable("down"))) == Reason.STAGE_FAILED
    # A missing key stays what the stage called it.
    assert storage_failure_reason(wrapped(StorageNotFound("no such key"))) is None


def test_s3_delete_reports_keys_the_server_refused(s3_bucket: str, moto_s3: str) -> None:
    """DeleteObjects answers 200 and lists refused keys; they must not pass as deleted."""
    real = s3_client(moto_s3)

    class RefusesDeletes:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def delete_objects(self, Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:
            errors = [
                {"Key": o["Key"], "Code": "AccessDenied", "Message": "Access Denied"}
                for o in Delete["Objects"]
            ]
            return {"Errors": errors}

    store = S3Storage(f"s3://{s3_bucket}/out", endpoint=moto_s3, client=RefusesDeletes())
    store.write_text("runs/a/x", "1")
    store.write_text("runs/a/y", "2")
    with pytest.raises(StorageAccessDenied, match=r"2 of 2 keys refused"):
        store.delete("runs/a/")
    assert store.list("runs/a") == ["runs/a/x", "runs/a/y"]
