"""One small interface over ``file://`` and ``s3://`` storage.

Usage::

    store = open_storage("s3://runs/tldr/", endpoint="http://127.0.0.1:9000")
    store.write_bytes("dataset/prepare.json", data)      # atomic: readers never see half a file
    store.upload_dir(Path("/scratch/model"), "model")    # multipart for large files
    store.read_bytes("dataset/prepare.json")

Keys are relative to the root URI. ``file://`` paths may be absolute
(``file:///data/x``) or relative to the current directory (``file://runs/x``).

S3 settings come from arguments first, then the environment:
``KUBETUNE_S3_ENDPOINT`` (else ``AWS_ENDPOINT_URL``), ``AWS_REGION`` (else
``AWS_DEFAULT_REGION``, else ``us-east-1``), and boto3's usual credential chain
(``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` from a Secret in cluster mode).
:func:`s3_client` is the one place that turns them into a boto3 client; the operator
uses it too, with shorter timeouts.

**Storage outages ride through.** Every S3 operation of :class:`S3Storage` retries
transient failures (connection refused or reset, timeouts, HTTP 5xx, throttling) with
exponential backoff and jitter for ``$KUBETUNE_STORAGE_RETRY_SECONDS`` (default 300 s,
:class:`RetryPolicy`), logging a WARNING per retry, and then raises
:class:`StorageUnavailable`. botocore's own retries stay few and quick, so our budget
decides how long a stage waits. Permanent answers are not retried: a missing key or bucket
raises :class:`StorageNotFound`, refused credentials :class:`StorageAccessDenied`; each
message names the bucket and key. :func:`storage_failure_reason` turns the last two kinds
into a stage's failure reason.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubetune.contract import (
    S3_CREDENTIAL_KEYS_TEXT,
    S3_KEY_ID,
    S3_SECRET_KEY,
    S3_SESSION_TOKEN,
    Env,
)
from kubetune.layout import join_uri
from kubetune.schema import Reason

# `Storage.list` shadows the builtin inside the class body; annotations use these.
Keys = list[str]
Versions = list[tuple[str, int, str]]  # (key, size, version) of each file
Paths = list[Path]

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what to do."""


class StorageNotFound(StorageError):
    """Nothing is stored at the key or prefix: a wrong URI, not a passing fault."""


class StorageAccessDenied(StorageError):
    """The credentials (or file permissions) do not allow this: a retry cannot help."""


class StoragePathUnusable(StorageError):
    """A local path that cannot be written: a file where a directory must be, a read-only
    file system, no space left. A retry does not change it."""


def is_permanent(exc: BaseException) -> bool:
    """True for storage failures a retry cannot fix: a wrong URI, no permission, read-only."""
    permanent = (StorageNotFound, StorageAccessDenied, StoragePathUnusable, PermissionError)
    return isinstance(exc, permanent) or (
        isinstance(exc, OSError) and not isinstance(exc, StorageError)
    )


class StorageUnavailable(StorageError):
    """Storage kept failing transiently (unreachable, 5xx, throttled) for the whole retry
    budget: this attempt gives up, a later one may succeed."""


def storage_failure_reason(exc: BaseException) -> Reason | None:
    """The failure reason a storage fault decides for a stage, whatever it was reading.

    Refused credentials are :attr:`Reason.STORAGE_ACCESS_DENIED` (a retry cannot help);
    storage unreachable for the whole retry budget is :attr:`Reason.STAGE_FAILED` (a
    retry may). Both are facts about storage, not about the input, so they win over the
    reason a stage gave a storage error it wrapped (``raise StageError(...) from None``
    keeps the storage error as ``__context__``). None for anything else: a missing key
    stays what the stage called it (``DatasetUnusable``, ``InvalidSpec``, ...).
    """
    for cause in _chain(exc):
        if isinstance(cause, StorageAccessDenied):
            return Reason.STORAGE_ACCESS_DENIED
        if isinstance(cause, StorageUnavailable):
            return Reason.STAGE_FAILED
    return None


def _chain(exc: BaseException, limit: int = 8) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, nearest first."""
    seen: BaseException | None = exc
    for _ in range(limit):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


DEFAULT_RETRY_SECONDS = 300.0

# S3 error codes that mean "try again later" (HTTP 5xx and 429 are transient whatever
# their code). Anything else S3 answers (NoSuchKey, NoSuchBucket, AccessDenied,
# InvalidAccessKeyId, SignatureDoesNotMatch, ...) is final.
TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "OperationAborted",  # a conflicting operation on the bucket is in progress
    }
)


def is_transient(exc: BaseException) -> bool:
    """True for S3 failures that may pass: no connection, a timeout, 5xx, throttling.

    Looks through wrappers (boto3's ``S3UploadFailedError`` and ``RetriesExceededError``
    carry the original error as their context).
    """
    from boto3.exceptions import RetriesExceededError
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        SSLError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceeded

    for cause in _chain(exc):
        if isinstance(cause, ClientError):
            code = str(cause.response.get("Error", {}).get("Code", ""))
            status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return code in TRANSIENT_S3_CODES or status >= 500 or status == 429
        if isinstance(cause, SSLError):
            return False  # a certificate that does not verify will not start to
        if isinstance(
            cause,
            (
                HTTPClientError,  # connection closed, read timeout, broken response stream
                BotoConnectionError,  # refused, connect timeout, proxy
                IncompleteReadError,
                RetriesExceededError,
                TransferRetriesExceeded,
                ConnectionError,
                TimeoutError,
            ),
        ):
            return True
    return False


def _describe(exc: BaseException) -> str:
    """A one-line account of an S3 failure for logs and messages."""
    from botocore.exceptions import ClientError

    for cause in _chain(exc):
        if isinstance(cause, ClientError):
            code = cause.response.get("Error", {}).get("Code", "")
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            return f"HTTP {status} {code}".strip()
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _retry_seconds_from_env() -> float:
    raw = os.environ.get(Env.STORAGE_RETRY_SECONDS, "").strip()
    if not raw:
        return DEFAULT_RETRY_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        log.warning(
            "$%s=%r is not a number of seconds >= 0; using the default %g s",
            Env.STORAGE_RETRY_SECONDS,
            raw,
            DEFAULT_RETRY_SECONDS,
        )
        return DEFAULT_RETRY_SECONDS
    return seconds


@dataclass(frozen=True)
class RetryPolicy:
    """How long an S3 operation rides through transient failures, and how it paces retries.

    After the first transient failure the operation is tried again after ``first_delay``,
    then twice that, and so on up to ``max_delay`` seconds, each pause scaled by a random
    factor in [0.5, 1) so that many pods do not retry in step; once ``seconds`` have passed
    since the first failure it gives up with :class:`StorageUnavailable`. The last pause is
    cut short so that one attempt falls on the deadline. ``clock``, ``sleep`` and ``jitter``
    are injectable for tests.
    """

    seconds: float = DEFAULT_RETRY_SECONDS
    first_delay: float = 1.0
    max_delay: float = 30.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[], float] = random.random  # uniform in [0, 1)

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The budget from ``$KUBETUNE_STORAGE_RETRY_SECONDS`` (default 300 s)."""
        return cls(seconds=_retry_seconds_from_env())

    def pause(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...)."""
        ceiling = min(self.max_delay, self.first_delay * 2.0 ** (retry - 1))
        return ceiling * (0.5 + 0.5 * self.jitter())


def _file_mode() -> int:
    """The mode a new file gets from ``open()`` under this process's umask (e.g. 0o644)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("s3", "bucket/a/b"); ``file://x`` -> ("file", "x")."""
    if "://" not in uri:
        raise StorageError(f"{uri!r} is not a storage URI: use s3://bucket/prefix or file://path")
    scheme, rest = uri.split("://", 1)
    if scheme not in ("s3", "file"):
        raise StorageError(f"{uri!r}: unsupported scheme {scheme!r}; use s3:// or file://")
    return scheme, rest


class Storage(ABC):
    """A root URI and operations on keys below it."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def uri(self, key: str = "") -> str:
        return join_uri(self.root, key)

    def sub(self, key: str) -> Storage:
        """The same storage rooted at ``key``."""
        return self._with_root(self.uri(key))

    @abstractmethod
    def _with_root(self, root: str) -> Storage: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Keys:
        """Keys (files, recursively) under ``prefix``, relative to the root, sorted."""

    @abstractmethod
    def versions(self, prefix: str = "") -> Versions:
        """``(key, size, version)`` of every file under ``prefix``, sorted by key.

        ``version`` changes when the content may have: the S3 ETag, a file's mtime in
        nanoseconds. The prepare stage fingerprints its source with these, without
        reading the content twice.
        """

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Delete a key or everything under a prefix."""

    @abstractmethod
    def upload_file(self, local: Path, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, local: Path) -> None: ...

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def upload_dir(self, local_dir: Path, prefix: str) -> Keys:
        """Upload every file below ``local_dir`` to ``prefix``; returns the keys written."""
        keys = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            key = join_uri(prefix, path.relative_to(local_dir).as_posix())
            self.upload_file(path, key)
            keys.append(key)
        return keys

    def download_dir(self, prefix: str, local_dir: Path) -> Paths:
        """Download every key under ``prefix`` into ``local_dir``; returns the files written."""
        prefix = prefix.strip("/")
        keys = self.list(prefix)
        if not keys:
            raise StorageNotFound(
                f"{self.uri(prefix)}: nothing stored there (is the prefix right?)"
            )
        out = []
        for key in keys:
            rel = key[len(prefix) :].lstrip("/") if prefix else key
            target = local_dir / rel
            self.download_file(key, target)
            out.append(target)
        return out


class FileStorage(Storage):
    """``file://`` storage on a local (or mounted) file system."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        _, path = split_uri(self.root)
        self.base = Path(path)

    def _with_root(self, root: str) -> Storage:
        return FileStorage(root)

    def path(self, key: str) -> Path:
        return self.base / key if key else self.base

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise StorageNotFound(f"{self.uri(key)}: no such file") from None
        except IsADirectoryError:
            raise StorageError(f"{self.uri(key)}: is a directory, expected a file") from None
        except PermissionError:
            raise StorageAccessDenied(f"{self.uri(key)}: permission denied") from None

    @contextmanager
    def _writing(self, key: str) -> Iterator[None]:
        """File-system errors of a write as StorageError naming the URI (not a bare OSError)."""
        try:
            yield
        except PermissionError:
            raise StorageAccessDenied(f"{self.uri(key)}: permission denied") from None
        except OSError as exc:
            raise StoragePathUnusable(
                f"{self.uri(key)}: cannot write ({exc.strerror or exc})"
            ) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        with self._writing(key):
            target.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a crash never leaves a half-written file behind.
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                # mkstemp makes 0600 files; give them the mode every other file here gets.
                os.fchmod(fd, _file_mode())
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def list(self, prefix: str = "") -> Keys:
        start = self.path(prefix.strip("/"))
        if start.is_file():
            return [prefix.strip("/")]
        if not start.is_dir():
            return []
        return sorted(
            p.relative_to(self.base).as_posix()
            for p in start.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def versions(self, prefix: str = "") -> Versions:
        out = []
        for key in self.list(prefix):
            info = self.path(key).stat()
            out.append((key, info.st_size, str(info.st_mtime_ns)))
        return out

    def delete(self, prefix: str) -> None:
        target = self.path(prefix.strip("/"))
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    def upload_file(self, local: Path, key: str) -> None:
        target = self.path(key)
        with self._writing(key):
            target.parent.mkdir(parents=True, exist_ok=True)
            if local.resolve() == target.resolve():
                return
            tmp = target.with_name(f".{target.name}.part")
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)

    def download_file(self, key: str, local: Path) -> None:
        source = self.path(key)
        if not source.is_file():
            raise StorageNotFound(f"{self.uri(key)}: no such file")
        local.parent.mkdir(parents=True, exist_ok=True)
        if source.resolve() != local.resolve():
            # Copy then rename: processes of one node share a scratch directory, and one that
            # finds the file must never memory-map a half-copied one (SIGBUS, no traceback).
            fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.")
            os.close(fd)
            try:
                shutil.copyfile(source, tmp)
                os.replace(tmp, local)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


def s3_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint URL to use; None means AWS itself.

    ``endpoint`` (a job's ``spec.storage.endpoint``), else ``$KUBETUNE_S3_ENDPOINT``,
    else ``$AWS_ENDPOINT_URL``.
    """
    return endpoint or os.environ.get(Env.S3_ENDPOINT) or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region(region: str | None = None) -> str:
    """The S3 region to use.

    ``region`` (a job's ``spec.storage.region``), else ``$AWS_REGION``, else
    ``$AWS_DEFAULT_REGION``, else ``us-east-1``.
    """
    return (
        region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )


def s3_client(
    endpoint: str | None = None,
    region: str | None = None,
    *,
    retries: int = 3,
    connect_timeout: float = 10.0,
    read_timeout: float = 120.0,
    credentials: Mapping[str, str] | None = None,
) -> Any:
    """A boto3 S3 client for ``endpoint``/``region`` (a job's ``spec.storage``, or None).

    Both are resolved with :func:`s3_endpoint` and :func:`s3_region`, so the stage pods
    and the operator reach the same S3 from the same environment. ``retries`` is
    botocore's ``max_attempts`` (``standard`` mode, exponential backoff): a few quick
    retries of one request, so that a dropped connection costs no warning; how long an
    outage is ridden through is :class:`S3Storage`'s :class:`RetryPolicy`. The timeouts
    are in seconds. Path-style addressing, which MinIO and Ceph need. ``credentials``
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optionally ``AWS_SESSION_TOKEN``)
    replace boto3's own chain (environment, files, instance role): the operator passes a
    job's own keys so it never reaches a job's storage with its own.
    """
    import boto3
    from botocore.config import Config

    keys: dict[str, str | None] = {}
    if credentials is not None:
        keys = {
            "aws_access_key_id": credentials[S3_KEY_ID],
            "aws_secret_access_key": credentials[S3_SECRET_KEY],
            "aws_session_token": credentials.get(S3_SESSION_TOKEN),
        }
    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint(endpoint),
        **keys,
        region_name=s3_region(region),
        config=Config(
            retries={"max_attempts": retries, "mode": "standard"},
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        ),
    )


class S3Storage(Storage):
    """``s3://bucket/prefix`` storage through boto3; each operation rides through outages.

    ``retry`` is the :class:`RetryPolicy` of every operation (default: from
    ``$KUBETUNE_STORAGE_RETRY_SECONDS``); a caller that must not wait, such as the
    operator, passes ``RetryPolicy(seconds=0)``.
    """

    def __init__(
        self,
        root: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        client: Any = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(root)
        _, rest = split_uri(self.root)
        self.bucket, _, self.prefix = rest.partition("/")
        if not self.bucket:
            raise StorageError(f"{root!r}: no bucket name; use s3://bucket/prefix")
        self.endpoint = s3_endpoint(endpoint)
        self.region = s3_region(region)
        self._client = client
        self.retry = retry if retry is not None else RetryPolicy.from_env()

    def _with_root(self, root: str) -> Storage:
        return S3Storage(
            root,
            endpoint=self.endpoint,
            region=self.region,
            client=self._client,
            retry=self.retry,
        )

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client(self.endpoint, self.region)
        return self._client

    def _key(self, key: str) -> str:
        return join_uri(self.prefix, key).lstrip("/") if self.prefix else key.strip("/")

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _retrying(self, action: str, key: str, operation: Callable[[], T]) -> T:
        """``operation()``, tried again after transient failures until the retry budget is
        spent; every failure leaves as a :class:`StorageError` naming ``key``."""
        policy = self.retry
        first_failure: float | None = None
        retry = 0
        while True:
            try:
                return operation()
            except Exception as exc:
                if not is_transient(exc):
                    raise self._error(exc, key, action) from exc
                now = policy.clock()
                first_failure = now if first_failure is None else first_failure
                elapsed = now - first_failure
                left = policy.seconds - elapsed
                if left <= 0:
                    raise self._unavailable(exc, key, action, elapsed, retry + 1) from exc
                retry += 1
                pause = min(policy.pause(retry), left)
                log.warning(
                    "S3 %s %s failed (%s); retry %d in %.1f s, %.0f s of the %g s storage "
                    "retry budget left ($%s)",
                    action,
                    self._where(key),
                    _describe(exc),
                    retry,
                    pause,
                    left,
                    policy.seconds,
                    Env.STORAGE_RETRY_SECONDS,
                )
                policy.sleep(pause)

    def _unavailable(
        self, exc: Exception, key: str, action: str, elapsed: float, attempts: int
    ) -> StorageUnavailable:
        return StorageUnavailable(
            f"{self._where(key)}: storage was unreachable for {elapsed:.0f} s while {action} "
            f"({attempts} attempt{'s' if attempts != 1 else ''}, last error: {_describe(exc)}; "
            f"endpoint {self.endpoint or 'AWS'}); gave up after the storage retry budget of "
            f"{self.retry.seconds:g} s (${Env.STORAGE_RETRY_SECONDS}). A retry of the stage "
            "may succeed once S3 is back; if it never is, check storage.endpoint"
        )

    def _error(self, exc: Exception, key: str, action: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self._where(key)
        # boto3 wraps an upload's ClientError in S3UploadFailedError (as its context).
        client_error = next((e for e in _chain(exc) if isinstance(e, ClientError)), None)
        if client_error is not None:
            code = str(client_error.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                return StorageNotFound(
                    f"{where}: no such key (bucket {self.bucket!r}) while {action}"
                )
            if code == "NoSuchBucket":
                return StorageNotFound(
                    f"bucket {self.bucket!r} does not exist ({where}); create it "
                    "or fix storage.output / dataset.source"
                )
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageAccessDenied(
                    f"{where}: access denied ({code}) while {action}; check the credentials "
                    f"({S3_KEY_ID}/{S3_SECRET_KEY}, storage.credentialsSecret) and the "
                    f"bucket policy of {self.bucket!r}"
                )
            return StorageError(f"{where}: S3 error {code} while {action}: {exc}")
        if isinstance(exc, NoCredentialsError):
            return StorageAccessDenied(
                f"{where}: no S3 credentials found; set {S3_CREDENTIAL_KEYS_TEXT} "
                "(storage.credentialsSecret in a cluster)"
            )
        if isinstance(exc, EndpointConnectionError):
            return StorageError(
                f"{where}: cannot reach the S3 endpoint {self.endpoint or 'AWS'}; "
                "check storage.endpoint"
            )
        return StorageError(f"{where}: {action} failed: {exc}")

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            # The body is read inside the retry: a stream cut halfway starts over.
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return bytes(body.read())

        return self._retrying("reading", key, get)

    def write_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers see the old object or the new one.
        self._retrying(
            "writing",
            key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data),
        )

    def exists(self, key: str) -> bool:
        try:
            self._retrying(
                "checking",
                key,
                lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)),
            )
        except StorageNotFound:
            return False
        return True

    def versions(self, prefix: str = "") -> Versions:
        return sorted(self._objects(prefix.strip("/")))

    def _objects(self, prefix: str) -> Versions:
        """``(key relative to the root, size, ETag)`` of every object under ``prefix``.

        A listing that fails halfway is retried from its first page.
        """
        full = self._key(prefix)
        if full and not full.endswith("/"):
            # A prefix names a "directory"; never match siblings like model2/.
            exact: str | None = full
            full = full + "/"
        else:
            exact = None
        base = self._key("")
        base = base + "/" if base and not base.endswith("/") else base

        def list_all() -> Versions:
            out = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=exact or full):
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    if exact and k != exact and not k.startswith(full):
                        continue
                    rel = k[len(base) :] if base else k
                    out.append((rel, int(obj.get("Size", 0)), str(obj.get("ETag", "")).strip('"')))
            return out

        return self._retrying("listing", prefix, list_all)

    def list(self, prefix: str = "") -> Keys:
        return sorted(key for key, _, _ in self._objects(prefix.strip("/")))

    def delete(self, prefix: str) -> None:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            remove = functools.partial(
                self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch}
            )
            response = self._retrying("deleting", prefix, remove)
            # DeleteObjects answers 200 even when keys were refused: each refusal is listed.
            errors = (response or {}).get("Errors") or []
            if errors:
                first = errors[0]
                code = str(first.get("Code", ""))
                where = f"s3://{self.bucket}/{first.get('Key', '')}"
                message = (
                    f"{where}: {code} while deleting ({len(errors)} of {len(batch)} keys "
                    f"refused): {first.get('Message', '')}"
                )
                if code == "AccessDenied":
                    raise StorageAccessDenied(message)
                raise StorageError(message)

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK
        )

    def upload_file(self, local: Path, key: str) -> None:
        self._retrying(
            f"uploading {local}",
            key,
            lambda: self.client.upload_file(
                str(local), self.bucket, self._key(key), Config=self._transfer_config()
            ),
        )

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")

        def fetch() -> None:
            try:
                self.client.download_file(
                    self.bucket, self._key(key), str(tmp), Config=self._transfer_config()
                )
                os.replace(tmp, local)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

        self._retrying("downloading", key, fetch)


def open_storage(
    uri: str,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    retry: RetryPolicy | None = None,
) -> Storage:
    """A :class:`Storage` rooted at ``uri`` (``s3://`` or ``file://``).

    ``retry``: how long S3 operations ride through an outage (default: the stage budget,
    ``$KUBETUNE_STORAGE_RETRY_SECONDS``); an interactive check passes a short one.
    """
    scheme, _ = split_uri(uri)
    if scheme == "file":
        return FileStorage(uri)
    return S3Storage(uri, endpoint=endpoint, region=region, retry=retry)


def storage_for_job(uri: str, storage_spec: Any, *, retry: RetryPolicy | None = None) -> Storage:
    """Open ``uri`` with the endpoint/region of a job's ``spec.storage``."""
    return open_storage(
        uri, endpoint=storage_spec.endpoint, region=storage_spec.region, retry=retry
    )
