"""The operator's reads of a run's storage: with the job's own credentials, allowed endpoints only.

    reader = ResultReader(kube, allowed_endpoints=["https://minio.storage.svc:9000"])
    data = reader.read_json(job, run_output, "train/progress.json")   # dict, or None

Stage results reach the operator in the stage pods' termination messages; storage is read only
for what those cannot carry (training progress while the train pod runs, a result whose Job is
gone). A FineTuneJob chooses its ``spec.storage.endpoint``, so a read on its behalf must not
become a request the tenant could not make itself:

* **Never the operator's credentials.** A read uses the keys of the job's own
  ``spec.storage.credentialsSecret`` (the same keys its pods get); a job that names no Secret
  is not read at all. An endpoint a tenant controls therefore never sees the operator's keys.
* **Only allowed endpoints.** A job without ``spec.storage.endpoint`` uses the operator's
  configured S3 (``KUBETUNE_S3_ENDPOINT``/``AWS_ENDPOINT_URL``, else AWS); an explicit endpoint
  is read only if it is on the allow-list (``KUBETUNE_STORAGE_ENDPOINTS``, the chart's
  ``operator.storageEndpoints``), so a job cannot point the operator at an address inside the
  cluster network (server-side request forgery).

A job the operator may not read still runs; its status then shows no training progress
until the train stage ends (``kubectl logs`` and the trainer's metrics have it).

``spec.retrain.onDatasetChange`` lists the job's ``spec.dataset.source`` by the same rules
(:meth:`ResultReader.source_versions`): the job's own keys, allowed endpoints only.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from kubetune.contract import S3_KEY_ID, S3_SECRET_KEY, S3_SESSION_TOKEN
from kubetune.schema import FineTuneJob
from kubetune.storage import RetryPolicy, S3Storage, Storage, Versions, open_storage, s3_client
from kubetune_operator.config import normalize_endpoint
from kubetune_operator.kube import ApiError, KubeClient, core_path

log = logging.getLogger("kubetune.operator")

STORAGE_BACKOFF = 60.0  # seconds without storage reads of a FineTuneJob after a failed one
# The operator's reads are optional (termination messages carry the results), so they fail
# fast instead of holding a worker: few retries, short timeouts (seconds).
S3_RETRIES = 2
S3_CONNECT_TIMEOUT = 3.0
S3_READ_TIMEOUT = 10.0
MAX_CLIENTS = 256
NO_RETRY = RetryPolicy(seconds=0)


def secret_credentials(secret: dict[str, Any]) -> dict[str, str] | None:
    """AWS keys from a Secret object's ``data``; None when the two required keys are missing."""
    data = secret.get("data") or {}
    keys: dict[str, str] = {}
    for name in (S3_KEY_ID, S3_SECRET_KEY, S3_SESSION_TOKEN):
        if name in data:
            keys[name] = base64.b64decode(data[name]).decode().strip()
    if not keys.get(S3_KEY_ID) or not keys.get(S3_SECRET_KEY):
        return None
    return keys


class SourceNotPollable(Exception):
    """The operator may not, or cannot, list this job's dataset source (the message says why)."""


class SourceUnreadable(Exception):
    """Listing the source failed this time (keys missing, storage down); try again later."""


class ResultReader:
    """Reads stage results and training progress of a run, as the module docstring allows."""

    def __init__(
        self,
        kube: KubeClient | None = None,
        allowed_endpoints: Iterable[str] = (),
        *,
        local_files: bool = False,
    ) -> None:
        """``local_files``: also read ``file://`` outputs, for an operator that shares the
        filesystem of its stage pods (a development node whose pods are local processes)."""
        self.kube = kube
        self.local_files = local_files
        self.allowed = frozenset(normalize_endpoint(e) for e in allowed_endpoints)
        self._failed_at: dict[str, float] = {}
        self._refused: dict[str, str] = {}  # FineTuneJob -> why it is not read (logged once)
        self._clients: dict[tuple[str | None, ...], Any] = {}  # one per endpoint and keys

    def refusal(self, job: FineTuneJob) -> str | None:
        """Why the operator must not read this job's storage; None when it may."""
        spec = job.spec.storage
        if spec.endpoint and normalize_endpoint(spec.endpoint) not in self.allowed:
            return (
                f"spec.storage.endpoint {spec.endpoint} is not on the operator's allow-list "
                "(operator.storageEndpoints in the chart, KUBETUNE_STORAGE_ENDPOINTS)"
            )
        if not spec.credentials_secret:
            return "spec.storage.credentialsSecret is not set (the operator reads with it only)"
        return None

    def source_refusal(self, job: FineTuneJob) -> str | None:
        """Why the operator cannot poll ``spec.dataset.source``; None when it may list it."""
        source = job.spec.dataset.source
        if source.startswith("hf://"):
            return (
                f"spec.dataset.source {source} is a Hugging Face hub dataset, which has no "
                "listing to poll; onDatasetChange needs an s3:// source (use "
                "spec.retrain.schedule or the kubetune.io/retrain annotation instead)"
            )
        if source.startswith("file://"):
            if self.local_files:
                return None
            return (
                f"spec.dataset.source {source} is on the stage pods' nodes, not readable by "
                "the operator; onDatasetChange needs an s3:// source"
            )
        if not source.startswith("s3://"):
            return f"spec.dataset.source {source} cannot be listed by the operator"
        refused = self.refusal(job)
        return f"cannot list spec.dataset.source: {refused}" if refused is not None else None

    def source_versions(self, job: FineTuneJob) -> Versions:
        """``Storage.versions("")`` of ``spec.dataset.source``, as the prepare stage lists it.

        With the job's own keys, at an allowed endpoint only (as :meth:`read_json`).
        Raises :class:`SourceNotPollable` (lasting: hf://, an endpoint not allowed, no
        credentials Secret named), :class:`SourceUnreadable` (the Secret is missing or
        incomplete) or the storage's own error (unreachable, access denied).
        """
        refused = self.source_refusal(job)
        if refused is not None:
            raise SourceNotPollable(refused)
        source = job.spec.dataset.source
        if source.startswith("file://"):
            return list(open_storage(source).versions(""))
        credentials = self._job_credentials(job)
        if credentials is None:  # never fall back to the operator's own credentials
            raise SourceUnreadable(
                f"cannot read the keys of Secret {job.spec.storage.credentials_secret} "
                "(spec.storage.credentialsSecret) to list spec.dataset.source"
            )
        return list(self.storage_for(job, source, credentials).versions(""))

    def storage_for(
        self, job: FineTuneJob, output: str, credentials: dict[str, str] | None = None
    ) -> Storage:
        """S3 storage rooted at ``output`` with the job's endpoint/region and ``credentials``."""
        spec = job.spec.storage
        keys = credentials or {}
        names = (S3_KEY_ID, S3_SECRET_KEY, S3_SESSION_TOKEN)
        cache_key = (spec.endpoint, spec.region, *(keys.get(name) for name in names))
        if cache_key not in self._clients:
            if len(self._clients) >= MAX_CLIENTS:
                self._clients.clear()  # rotated keys and deleted jobs: start afresh
            self._clients[cache_key] = s3_client(
                spec.endpoint,
                spec.region,
                retries=S3_RETRIES,
                connect_timeout=S3_CONNECT_TIMEOUT,
                read_timeout=S3_READ_TIMEOUT,
                credentials=credentials,
            )
        # No retry budget: a read that fails waits for the next pass (STORAGE_BACKOFF), it
        # never holds a reconcile worker through an outage.
        return S3Storage(
            output,
            endpoint=spec.endpoint,
            region=spec.region,
            client=self._clients[cache_key],
            retry=NO_RETRY,
        )

    def read_json(self, job: FineTuneJob, output: str, key: str) -> dict[str, Any] | None:
        """``<output>/<key>`` as a JSON object, or None (not there, not allowed, unreachable)."""
        who = f"{job.metadata.namespace}/{job.metadata.name}"
        if not output.startswith("s3://"):
            # A pod's file:// output is on the pod's node, not in the operator's filesystem.
            return self._read_local(output, key) if self.local_files else None
        refused = self.refusal(job)
        if refused is not None:
            if self._refused.get(who) != refused:
                self._refused[who] = refused
                log.info("%s: not reading its storage: %s", who, refused)
            return None
        self._refused.pop(who, None)
        if time.monotonic() - self._failed_at.get(who, -1e9) < STORAGE_BACKOFF:
            return None
        try:
            credentials = self._job_credentials(job)
            if credentials is None:
                return None
            store = self.storage_for(job, output, credentials)
            if not store.exists(key):
                return None
            data = json.loads(store.read_bytes(key))
        except Exception as exc:  # storage is optional for the operator: note it and go on
            self._failed_at[who] = time.monotonic()
            log.info(
                "%s: cannot read %s/%s (%s); relying on termination messages",
                who,
                output,
                key,
                type(exc).__name__,
            )
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _read_local(output: str, key: str) -> dict[str, Any] | None:
        store = open_storage(output)
        try:
            data = json.loads(store.read_bytes(key)) if store.exists(key) else None
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _job_credentials(self, job: FineTuneJob) -> dict[str, str] | None:
        """The keys in the job's credentials Secret (read anew each time: keys rotate)."""
        name = job.spec.storage.credentials_secret
        if self.kube is None or not name:
            return None
        ns = job.metadata.namespace or "default"
        try:
            secret = self.kube.get(core_path(ns, "secrets", name))
        except ApiError as exc:
            if exc.status == 403:
                log.info("%s/%s: not allowed to read Secret %s", ns, job.metadata.name, name)
                return None
            raise
        return secret_credentials(secret) if secret is not None else None
