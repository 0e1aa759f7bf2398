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
uses it too, with shorter timeouts. Transient errors are retried with exponential
backoff by botocore's ``standard`` retry mode; an access-denied or missing key raises
:class:`StorageError` naming bucket and key.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune.contract import Env
from kubetune.layout import join_uri

# `Storage.list` shadows the builtin inside the class body; annotations use these.
Keys = list[str]
Versions = list[tuple[str, int, str]]  # (key, size, version) of each file
Paths = list[Path]

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what to do."""


class StorageNotFound(StorageError):
    """Nothing is stored at the key or prefix: a wrong URI, not a passing fault."""


class StorageAccessDenied(StorageError):
    """The credentials (or file permissions) do not allow this: a retry cannot help."""


def is_permanent(exc: BaseException) -> bool:
    """True for storage failures a retry cannot fix: a wrong URI, no permission, read-only."""
    return isinstance(exc, (StorageNotFound, StorageAccessDenied, PermissionError)) or (
        isinstance(exc, OSError) and not isinstance(exc, StorageError)
    )


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

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
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
            shutil.copyfile(source, local)


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
    retries: int = 8,
    connect_timeout: float = 10.0,
    read_timeout: float = 120.0,
) -> Any:
    """A boto3 S3 client for ``endpoint``/``region`` (a job's ``spec.storage``, or None).

    Both are resolved with :func:`s3_endpoint` and :func:`s3_region`, so the stage pods
    and the operator reach the same S3 from the same environment. ``retries`` is
    botocore's ``max_attempts`` (``standard`` mode, exponential backoff); the timeouts
    are in seconds. Path-style addressing, which MinIO and Ceph need.
    """
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint(endpoint),
        region_name=s3_region(region),
        config=Config(
            retries={"max_attempts": retries, "mode": "standard"},
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        ),
    )


class S3Storage(Storage):
    """``s3://bucket/prefix`` storage through boto3."""

    def __init__(
        self,
        root: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        client: Any = None,
    ) -> None:
        super().__init__(root)
        _, rest = split_uri(self.root)
        self.bucket, _, self.prefix = rest.partition("/")
        if not self.bucket:
            raise StorageError(f"{root!r}: no bucket name; use s3://bucket/prefix")
        self.endpoint = s3_endpoint(endpoint)
        self.region = s3_region(region)
        self._client = client

    def _with_root(self, root: str) -> Storage:
        return S3Storage(root, endpoint=self.endpoint, region=self.region, client=self._client)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client(self.endpoint, self.region)
        return self._client

    def _key(self, key: str) -> str:
        return join_uri(self.prefix, key).lstrip("/") if self.prefix else key.strip("/")

    def _error(self, exc: Exception, key: str, action: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"s3://{self.bucket}/{self._key(key)}"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
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
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, storage.credentialsSecret) and the "
                    f"bucket policy of {self.bucket!r}"
                )
            return StorageError(f"{where}: S3 error {code} while {action}: {exc}")
        if isinstance(exc, NoCredentialsError):
            return StorageError(
                f"{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (storage.credentialsSecret in a cluster)"
            )
        if isinstance(exc, EndpointConnectionError):
            return StorageError(
                f"{where}: cannot reach the S3 endpoint {self.endpoint or 'AWS'}; "
                "check storage.endpoint"
            )
        return StorageError(f"{where}: {action} failed: {exc}")

    def read_bytes(self, key: str) -> bytes:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return bytes(body.read())
        except Exception as exc:
            raise self._error(exc, key, "reading") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers see the old object or the new one.
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            raise self._error(exc, key, "writing") from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(exc, key, "checking") from exc

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        for key, _, _ in self._iter_objects(prefix):
            yield key

    def versions(self, prefix: str = "") -> Versions:
        return sorted(self._iter_objects(prefix.strip("/")))

    def _iter_objects(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        """``(key relative to the root, size, ETag)`` of every object under ``prefix``."""
        full = self._key(prefix)
        if full and not full.endswith("/"):
            # A prefix names a "directory"; never match siblings like model2/.
            exact = full
            full = full + "/"
        else:
            exact = None
        paginator = self.client.get_paginator("list_objects_v2")
        base = self._key("")
        base = base + "/" if base and not base.endswith("/") else base
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=exact or full):
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    if exact and k != exact and not k.startswith(full):
                        continue
                    rel = k[len(base) :] if base else k
                    yield rel, int(obj.get("Size", 0)), str(obj.get("ETag", "")).strip('"')
        except Exception as exc:
            raise self._error(exc, prefix, "listing") from exc

    def list(self, prefix: str = "") -> Keys:
        return sorted(self._iter_keys(prefix.strip("/")))

    def delete(self, prefix: str) -> None:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
            except Exception as exc:
                raise self._error(exc, prefix, "deleting") from exc

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK
        )

    def upload_file(self, local: Path, key: str) -> None:
        try:
            self.client.upload_file(
                str(local), self.bucket, self._key(key), Config=self._transfer_config()
            )
        except Exception as exc:
            raise self._error(exc, key, f"uploading {local}") from exc

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")
        try:
            self.client.download_file(
                self.bucket, self._key(key), str(tmp), Config=self._transfer_config()
            )
            os.replace(tmp, local)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise self._error(exc, key, "downloading") from exc


def open_storage(uri: str, *, endpoint: str | None = None, region: str | None = None) -> Storage:
    """A :class:`Storage` rooted at ``uri`` (``s3://`` or ``file://``)."""
    scheme, _ = split_uri(uri)
    if scheme == "file":
        return FileStorage(uri)
    return S3Storage(uri, endpoint=endpoint, region=region)


def storage_for_job(uri: str, storage_spec: Any) -> Storage:
    """Open ``uri`` with the endpoint/region of a job's ``spec.storage``."""
    return open_storage(uri, endpoint=storage_spec.endpoint, region=storage_spec.region)
