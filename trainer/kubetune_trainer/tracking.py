"""Experiment tracking in MLflow (``spec.tracking.mlflow``) over its REST API.

Only the standard library talks to the server (``urllib``): the trainer image does not
need the ``mlflow`` package. Each stage runs in its own pod, so there is no local state:
every stage finds its MLflow run again by the tag ``kubetune.run`` (``<uid[:8]>-g<N>``
on a cluster, ``local-<hash>`` for ``kubetune run``) and creates it when it is the first.

What each stage records (see docs/tracking.md):

* prepare: the dataset spec and the model as params (``dataset.*``, ``model.*``), the
  dataset statistics as metrics (``dataset.*``), ``dataset/prepare.json`` (the dataset card);
* train: the resolved training configuration as params (``training.*``, ...), the per-step
  history of ``train/metrics.jsonl`` (``train_loss``, ``learning_rate``,
  ``tokens_per_second``, ``epoch``, ``validation_loss``) and the run's totals;
* evaluate: the test metrics of the fine-tuned model (``test_perplexity``, ``test_bleu``,
  ``test_chrf``, ``test_exact_match``), of the baseline (``baseline_test_*``), the
  champion and each compareWith endpoint, and ``eval/evaluate.json``;
* report: ``report.md``, ``report.html`` and ``loss.png``; then the run is FINISHED.

Tracking never fails a stage: :func:`track_stage` and the ``track_*`` functions catch
everything and return a :class:`~kubetune.schema.TrackingStatus` whose ``error`` says
what went wrong, naming the tracking URI and what to check. Credentials come from the
environment (``MLFLOW_TRACKING_TOKEN``, or ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD``, from ``credentialsSecret``) and never appear in a message.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import math
import mimetypes
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from kubetune.contract import MLFLOW_PASSWORD, MLFLOW_TOKEN, MLFLOW_USERNAME, STAGE_ORDER, Stage
from kubetune.layout import RunLayout
from kubetune.results import (
    EvaluateResult,
    ModelScores,
    PrepareResult,
    ReportResult,
    RunIdentity,
    TrainResult,
)
from kubetune.schema import FineTuneJob, MlflowSpec, TrackingStatus
from kubetune.storage import Storage

log = logging.getLogger("kubetune.tracking")

TOKEN_ENV = MLFLOW_TOKEN
USERNAME_ENV = MLFLOW_USERNAME
PASSWORD_ENV = MLFLOW_PASSWORD
INSECURE_TLS_ENV = "MLFLOW_TRACKING_INSECURE_TLS"
CA_BUNDLE_ENV = "MLFLOW_TRACKING_SERVER_CERT_PATH"

JOB_TAG = "kubetune.job"
NAMESPACE_TAG = "kubetune.namespace"
RUN_TAG = "kubetune.run"
STAGE_TAG = "kubetune.stage"
STAGES_TAG = "kubetune.stages"

# MLflow's limits (mlflow/utils/validation.py).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

DEFAULT_TIMEOUT = 10.0  # seconds per request
DEFAULT_ATTEMPTS = 3  # per request, on connection errors, timeouts, 429 and 5xx
DEFAULT_BACKOFF = 0.5  # seconds before the 2nd attempt, doubled for each further one

_API = "/api/2.0/mlflow"
_ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
_KEY_BAD_CHARS = re.compile(r"[^\w.\- /:]")

Metric = tuple[str, float, int, int]
"""``(key, value, step, timestamp in ms)``."""


class TrackingError(Exception):
    """A tracking request failed; the message is safe to show (no credentials)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


# --------------------------------------------------------------------------- client


@dataclass
class MlflowTracker:
    """A small MLflow REST client bound to one experiment and (after ensure_run) one run."""

    tracking_uri: str
    experiment: str = "kubetune"
    token: str | None = field(default=None, repr=False)
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    attempts: int = DEFAULT_ATTEMPTS
    backoff: float = DEFAULT_BACKOFF
    insecure_tls: bool = False
    ca_bundle: str | None = None
    credentials_secret: str | None = None  # named in messages about refused credentials
    experiment_id: str | None = field(default=None, init=False)
    run_id: str | None = field(default=None, init=False)
    artifact_uri: str | None = field(default=None, init=False)
    run_status: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.tracking_uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TrackingError(f"trackingUri {self.display_uri}: not an http(s):// URL")
        if parts.username is not None or parts.password is not None:
            # http://user:password@host: basic auth, unless the environment gives credentials.
            if not (self.token or self.username):
                self.username = urllib.parse.unquote(parts.username or "")
                self.password = urllib.parse.unquote(parts.password or "")
            netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
            parts = parts._replace(netloc=netloc)
        self.tracking_uri = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc, parts.path.rstrip("/"), "", "")
        )

    @classmethod
    def from_spec(
        cls, spec: MlflowSpec, environ: Mapping[str, str] = os.environ, **options: Any
    ) -> MlflowTracker:
        """A tracker for ``spec.tracking.mlflow`` with the credentials in ``environ``.

        ``options`` override the client's settings (timeout, attempts, backoff).
        """
        insecure = environ.get(INSECURE_TLS_ENV, "").strip().lower() in ("1", "true", "yes")
        return cls(
            tracking_uri=spec.tracking_uri,
            experiment=spec.experiment,
            token=environ.get(TOKEN_ENV) or None,
            username=environ.get(USERNAME_ENV) or None,
            password=environ.get(PASSWORD_ENV) or None,
            insecure_tls=insecure,
            ca_bundle=environ.get(CA_BUNDLE_ENV) or None,
            credentials_secret=spec.credentials_secret,
            **options,
        )

    # ------------------------------------------------------------------ HTTP

    @property
    def display_uri(self) -> str:
        """The tracking URI without any user:password part."""
        parts = urllib.parse.urlsplit(self.tracking_uri)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": "kubetune", "Accept": "application/json"}
        if self.username and self.password is not None:
            pair = f"{self.username}:{self.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        elif self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tracking_uri.startswith("https:"):
            return None
        if self.insecure_tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        return ssl.create_default_context(cafile=self.ca_bundle)

    def _redact(self, text: str) -> str:
        for secret in (self.token, self.password):
            if secret:
                text = text.replace(secret, "***")
        return text

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        data: bytes | None = None,
        content_type: str | None = None,
        url: str | None = None,
    ) -> dict[str, Any]:
        """One REST call (``path`` under the tracking URI, or a full ``url``), retried.

        Connection errors, timeouts, 429 and 5xx answers are retried ``attempts`` times
        in all, with a doubling backoff; any other error answer raises at once.
        """
        target = url or self.tracking_uri + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        headers = self._headers()
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        shown = f"{method} {url or path}"
        context = self._ssl_context()
        attempts = max(1, self.attempts)
        for attempt in range(1, attempts + 1):
            req = urllib.request.Request(target, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout, context=context) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                error = self._http_error(shown, exc)
                if exc.code != 429 and exc.code < 500:
                    raise error from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, TimeoutError):
                    detail = f"no answer within {self.timeout:g}s"
                else:
                    detail = f"cannot connect ({self._redact(str(reason))})"
                error = TrackingError(f"{shown}: {detail}")
            else:
                if not raw.strip():
                    return {}
                try:
                    answer = json.loads(raw)
                except ValueError:
                    raise TrackingError(
                        f"{shown}: the answer is not JSON; is {self.display_uri} an MLflow "
                        "tracking server?"
                    ) from None
                return answer if isinstance(answer, dict) else {}
            if attempt < attempts:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise TrackingError(f"{error} (after {attempts} attempts)", error.status, error.code)

    def _http_error(self, shown: str, exc: urllib.error.HTTPError) -> TrackingError:
        code = message = None
        try:
            answer = json.loads(exc.read())
            if isinstance(answer, dict):
                code, message = answer.get("error_code"), answer.get("message")
        except Exception:
            pass
        finally:
            exc.close()
        text = f"{shown}: HTTP {exc.code}"
        if code:
            text += f" {code}"
        if message:
            text += f": {_shorten(str(message), 300)}"
        return TrackingError(self._redact(text), exc.code, code)

    # ------------------------------------------------------------------ experiment, run

    def ensure_experiment(self) -> str:
        """The id of the experiment named :attr:`experiment`, created if it does not exist."""
        if self.experiment_id is not None:
            return self.experiment_id
        for attempt in range(2):
            try:
                found = self.request(
                    "GET",
                    f"{_API}/experiments/get-by-name",
                    query={"experiment_name": self.experiment},
                )
            except TrackingError as exc:
                if exc.code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            else:
                experiment = found.get("experiment", {})
                if experiment.get("lifecycle_stage") == "deleted":
                    raise TrackingError(
                        f"experiment {self.experiment!r} is deleted on the server; restore it "
                        "or set spec.tracking.mlflow.experiment to another name"
                    )
                self.experiment_id = str(experiment["experiment_id"])
                return self.experiment_id
            try:
                created = self.request(
                    "POST", f"{_API}/experiments/create", body={"name": self.experiment}
                )
            except TrackingError as exc:
                # Another stage (or job) created it in the meantime: look it up again.
                if exc.code == "RESOURCE_ALREADY_EXISTS" and attempt == 0:
                    continue
                raise
            self.experiment_id = str(created["experiment_id"])
            return self.experiment_id
        raise TrackingError(f"experiment {self.experiment!r}: neither found nor created")

    def find_run(self, run_key: str) -> dict[str, Any] | None:
        """The oldest active run of the experiment tagged ``kubetune.run = run_key``."""
        experiment_id = self.ensure_experiment()
        answer = self.request(
            "POST",
            f"{_API}/runs/search",
            body={
                "experiment_ids": [experiment_id],
                "filter": f"tags.`{RUN_TAG}` = '{_quote_filter(run_key)}'",
                "run_view_type": "ACTIVE_ONLY",
                "max_results": 1,
                "order_by": ["attributes.start_time ASC"],
            },
        )
        runs = answer.get("runs") or []
        return runs[0] if runs else None

    def ensure_run(self, name: str, tags: Mapping[str, str], *, reopen: bool = True) -> str:
        """The id of the run tagged ``kubetune.run = tags["kubetune.run"]``, created if new.

        Idempotent: every stage (each in its own pod) gets the same run. ``reopen`` sets a
        FINISHED, FAILED or KILLED run back to RUNNING (a stage is working for it again).
        """
        run_key = tags[RUN_TAG]
        run = self.find_run(run_key)
        if run is None:
            self.request(
                "POST",
                f"{_API}/runs/create",
                body={
                    "experiment_id": self.ensure_experiment(),
                    "run_name": name,
                    "start_time": _now_ms(),
                    "tags": [
                        {"key": k, "value": _shorten(v, MAX_TAG_VALUE)} for k, v in tags.items()
                    ],
                },
            )
            # Search again rather than trusting the answer: if two creations raced (or a
            # retried request created two runs), every stage settles on the oldest.
            run = self.find_run(run_key)
            if run is None:
                raise TrackingError(f"the run tagged {RUN_TAG}={run_key} was created but not found")
        self._use(run)
        if reopen and self.run_status != "RUNNING":
            self.set_terminated("RUNNING")
        return self.run_id or ""

    def _use(self, run: Mapping[str, Any]) -> None:
        info = run.get("info", {})
        self.run_id = str(info.get("run_id") or info.get("run_uuid"))
        self.experiment_id = str(info.get("experiment_id", self.experiment_id))
        self.artifact_uri = info.get("artifact_uri")
        self.run_status = info.get("status")

    def _require_run(self) -> str:
        if not self.run_id:
            raise TrackingError("no run: call ensure_run first")
        return self.run_id

    def get_run(self) -> dict[str, Any]:
        """The run (``info`` and ``data``: params, latest metrics, tags) as the server has it."""
        answer = self.request("GET", f"{_API}/runs/get", query={"run_id": self._require_run()})
        run = answer.get("run", {})
        return run if isinstance(run, dict) else {}

    def run_url(self) -> str | None:
        """The run's page in the MLflow UI."""
        if not (self.run_id and self.experiment_id):
            return None
        return f"{self.display_uri}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def set_terminated(self, status: str = "FINISHED") -> None:
        """Set the run's status: RUNNING, FINISHED, FAILED or KILLED (end time: now)."""
        body: dict[str, Any] = {"run_id": self._require_run(), "status": status}
        if status != "RUNNING":
            body["end_time"] = _now_ms()
        self.request("POST", f"{_API}/runs/update", body=body)
        self.run_status = status

    # ------------------------------------------------------------------ params, tags, metrics

    def log_params(self, params: Mapping[str, Any]) -> list[str]:
        """Log params (nested mappings flattened with dots); returns the keys skipped.

        Values become strings of at most 6000 characters. MLflow params are immutable: a
        key already logged with the same value is left alone, one logged with another
        value is skipped with a warning.
        """
        run_id = self._require_run()
        wanted = {_key(k): _param_value(v) for k, v in flatten(params).items()}
        existing = {
            p["key"]: p.get("value") for p in self.get_run().get("data", {}).get("params", [])
        }
        skipped = sorted(k for k, v in wanted.items() if k in existing and existing[k] != v)
        if skipped:
            log.warning(
                "MLflow run %s already has other values for params %s; kept them (MLflow "
                "params cannot change)",
                run_id,
                ", ".join(skipped),
            )
        new = [{"key": k, "value": v} for k, v in wanted.items() if k not in existing]
        for chunk in _chunks(new, MAX_PARAMS_PER_BATCH):
            try:
                self.request(
                    "POST", f"{_API}/runs/log-batch", body={"run_id": run_id, "params": chunk}
                )
            except TrackingError as exc:
                if exc.code != "INVALID_PARAMETER_VALUE" or len(chunk) == 1:
                    raise
                skipped += self._log_params_one_by_one(run_id, chunk)
        return skipped

    def _log_params_one_by_one(self, run_id: str, params: list[dict[str, str]]) -> list[str]:
        """After a batch was refused (a param logged meanwhile with another value)."""
        skipped = []
        for param in params:
            try:
                self.request(
                    "POST", f"{_API}/runs/log-batch", body={"run_id": run_id, "params": [param]}
                )
            except TrackingError as exc:
                if exc.code != "INVALID_PARAMETER_VALUE":
                    raise
                log.warning("MLflow run %s: param %s not logged: %s", run_id, param["key"], exc)
                skipped.append(param["key"])
        return skipped

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (mutable, unlike params)."""
        run_id = self._require_run()
        items = [
            {"key": _key(k), "value": _shorten(str(v), MAX_TAG_VALUE)}
            for k, v in tags.items()
            if v is not None
        ]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            self.request("POST", f"{_API}/runs/log-batch", body={"run_id": run_id, "tags": chunk})

    def log_metrics(self, metrics: Iterable[Metric]) -> int:
        """Log ``(key, value, step, timestamp_ms)`` metrics in batches of 1000.

        Values that are not finite numbers are left out. Returns how many were logged.
        """
        run_id = self._require_run()
        items = [
            {"key": _key(key), "value": float(value), "step": int(step), "timestamp": int(ts)}
            for key, value, step, ts in metrics
            if _finite(value)
        ]
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self.request(
                "POST", f"{_API}/runs/log-batch", body={"run_id": run_id, "metrics": chunk}
            )
        return len(items)

    # ------------------------------------------------------------------ artifacts

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> str:
        """Upload a file to ``<artifact_path>/<its name>`` in the run's artifacts."""
        path = Path(local_path)
        target = f"{artifact_path.strip('/')}/{path.name}" if artifact_path else path.name
        return self.log_artifact_bytes(path.read_bytes(), target)

    def log_artifact_bytes(self, data: bytes, path: str) -> str:
        """Upload ``data`` as the artifact ``path`` (e.g. ``report/report.md``); returns its URL.

        Through the server's proxied artifact store (``mlflow server --serve-artifacts``):
        ``PUT <trackingUri>/api/2.0/mlflow-artifacts/artifacts/<run's artifact root>/<path>``.
        """
        url = self._artifact_url(path)
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        self.request("PUT", "", url=url, data=data, content_type=content_type)
        return url

    def _artifact_url(self, path: str) -> str:
        self._require_run()
        if not self.artifact_uri:
            self._use(self.get_run())
        root = self.artifact_uri or ""
        parts = urllib.parse.urlsplit(root)
        clean = "/".join(urllib.parse.quote(p) for p in path.strip("/").split("/") if p)
        if not clean or any(p in (".", "..") for p in path.split("/")):
            raise TrackingError(f"artifact path {path!r} is not a relative file path")
        if parts.scheme == "mlflow-artifacts":
            base = urllib.parse.urlsplit(self.tracking_uri)
            netloc = parts.netloc or base.netloc
            tail = parts.path.strip("/")
            prefix = f"{base.path.rstrip('/')}{_ARTIFACTS_API}"
            return urllib.parse.urlunsplit(
                (base.scheme, netloc, f"{prefix}/{tail}/{clean}".replace("//", "/"), "", "")
            )
        if parts.scheme in ("http", "https") and _ARTIFACTS_API in parts.path:
            return f"{root.rstrip('/')}/{clean}"
        raise TrackingError(
            f"the run's artifact location is {root or '(none)'}, which kubetune cannot write "
            "to: it uploads artifacts through the tracking server only; start the server with "
            "--serve-artifacts (and --artifacts-destination) so that new experiments store "
            "artifacts under mlflow-artifacts:/"
        )


# --------------------------------------------------------------------------- stage tracking


def run_key(job: FineTuneJob, identity: RunIdentity | None = None, output: str = "") -> str:
    """The ``kubetune.run`` tag: ``<uid[:8]>-g<N>`` for an operator's run.

    Local runs (no uid, no run id) get ``local-<hash>`` of the spec and the output, so the
    stages of one ``kubetune run`` (and later ``--stages`` runs of the same manifest and
    output) share a run, and a changed spec gets a new one.
    """
    identity = identity or RunIdentity.of_job(job)
    if identity.run_id:
        uid = identity.job_uid or job.metadata.uid
        return f"{uid[:8]}-{identity.run_id}" if uid else identity.run_id
    wire = job.spec.to_wire()
    for key in ("suspend", "ttlSecondsAfterFinished"):
        wire.pop(key, None)
    payload = json.dumps(
        {"name": job.metadata.name, "spec": wire, "output": output}, sort_keys=True
    )
    return "local-" + hashlib.sha256(payload.encode()).hexdigest()[:8]


def run_name(job: FineTuneJob, identity: RunIdentity | None = None) -> str:
    """The MLflow run name: ``<FineTuneJob name> <run id>`` (``... local`` for local runs)."""
    identity = identity or RunIdentity.of_job(job)
    return f"{job.metadata.name} {identity.run_id or 'local'}"


def run_tags(
    job: FineTuneJob, identity: RunIdentity | None = None, output: str = ""
) -> dict[str, str]:
    """The tags a run is created with (``kubetune.run`` finds it again)."""
    identity = identity or RunIdentity.of_job(job)
    tags = {JOB_TAG: job.metadata.name, RUN_TAG: run_key(job, identity, output)}
    if job.metadata.namespace:
        tags[NAMESPACE_TAG] = job.metadata.namespace
    if identity.job_uid:
        tags["kubetune.uid"] = identity.job_uid
    if identity.spec_hash:
        tags["kubetune.specHash"] = identity.spec_hash
    return tags


def tracker_for(
    job: FineTuneJob, environ: Mapping[str, str] | None = None, **options: Any
) -> MlflowTracker | None:
    """The job's tracker, or None without ``spec.tracking.mlflow``."""
    tracking = job.spec.tracking
    if tracking is None or tracking.mlflow is None:
        return None
    return MlflowTracker.from_spec(
        tracking.mlflow, os.environ if environ is None else environ, **options
    )


def track_prepare(
    job: FineTuneJob,
    result: PrepareResult,
    storage: Storage,
    identity: RunIdentity | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> TrackingStatus | None:
    """After prepare: params ``dataset.*`` (the spec used) and ``model.*``; the statistics
    as metrics ``dataset.*``; ``dataset/prepare.json`` as the dataset card."""
    return _track(job, Stage.PREPARE, storage, identity, environ, options, _prepare, result)


def track_train(
    job: FineTuneJob,
    result: TrainResult,
    storage: Storage,
    identity: RunIdentity | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> TrackingStatus | None:
    """After train: the resolved configuration as params, the per-step history of
    ``train/metrics.jsonl`` (steps not logged yet only), the totals, ``train/train.json``."""
    return _track(job, Stage.TRAIN, storage, identity, environ, options, _train, result)


def track_evaluate(
    job: FineTuneJob,
    result: EvaluateResult,
    storage: Storage,
    identity: RunIdentity | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> TrackingStatus | None:
    """After evaluate: ``evaluation.*`` params; ``test_*`` metrics of the fine-tuned model,
    ``baseline_test_*``, ``champion_test_*``, ``compare.<name>.test_*``; evaluate.json."""
    return _track(job, Stage.EVALUATE, storage, identity, environ, options, _evaluate, result)


def track_report(
    job: FineTuneJob,
    result: ReportResult,
    storage: Storage,
    identity: RunIdentity | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> TrackingStatus | None:
    """After report: report.md, report.html and loss.png under ``report/``; run FINISHED."""
    return _track(job, Stage.REPORT, storage, identity, environ, options, _report, result)


def track_stage(
    job: FineTuneJob,
    stage: str | Stage,
    result: PrepareResult | TrainResult | EvaluateResult | ReportResult,
    storage: Storage,
    identity: RunIdentity | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> TrackingStatus | None:
    """Record what ``stage`` produced (``result``; the files under ``storage``, the run's
    output root). None when the job has no ``spec.tracking.mlflow``; never raises."""
    recorders: dict[Stage, Any] = {
        Stage.PREPARE: _prepare,
        Stage.TRAIN: _train,
        Stage.EVALUATE: _evaluate,
        Stage.REPORT: _report,
    }
    try:
        which = Stage(stage)
    except ValueError:
        return TrackingStatus(error=f"MLflow tracking: unknown stage {stage!r}")
    return _track(job, which, storage, identity, environ, options, recorders[which], result)


def track_failure(
    job: FineTuneJob,
    stage: str | Stage,
    error: str | BaseException,
    storage: Storage | None = None,
    identity: RunIdentity | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> TrackingStatus | None:
    """A stage failed for good: tag ``kubetune.error`` and mark the run FAILED. Never raises."""
    message = _shorten(str(error), 2000)
    try:
        which = Stage(stage)
    except ValueError:
        return TrackingStatus(error=f"MLflow tracking: unknown stage {stage!r}")

    def failed(tracker: MlflowTracker, *_: Any) -> None:
        tracker.set_tags({"kubetune.error": f"{which.value}: {message}"})
        tracker.set_terminated("FAILED")

    return _track(job, which, storage, identity, environ, options, failed, None, done=False)


def _track(
    job: FineTuneJob,
    stage: Stage,
    storage: Storage | None,
    identity: RunIdentity | None,
    environ: Mapping[str, str] | None,
    options: Mapping[str, Any],
    record: Any,
    result: Any,
    done: bool = True,
) -> TrackingStatus | None:
    tracker: MlflowTracker | None = None
    where = "MLflow tracking"
    try:
        tracker = tracker_for(job, environ, **options)
        if tracker is None:
            return None
        where = f"MLflow tracking at {tracker.display_uri}"
        identity = identity or RunIdentity.of_job(job)
        output = storage.root if storage is not None else job.spec.storage.output
        tracker.ensure_run(
            run_name(job, identity),
            run_tags(job, identity, output),
            reopen=done and stage is not Stage.REPORT,
        )
        record(tracker, job, result, storage)
        if done:
            _mark_stage(tracker, stage)
        return TrackingStatus(run_id=tracker.run_id, url=tracker.run_url())
    except Exception as exc:
        message = f"{where}, {stage.value} stage: {_describe(exc, tracker)}"
        if tracker is not None:
            message = tracker._redact(message)
        log.warning("%s", message)
        return TrackingStatus(
            run_id=tracker.run_id if tracker else None,
            url=tracker.run_url() if tracker else None,
            error=message,
        )


def _describe(exc: BaseException, tracker: MlflowTracker | None) -> str:
    """What failed and what to check."""
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, TrackingError):
        return f"{type(exc).__name__}: {text}"
    secret = tracker.credentials_secret if tracker else None
    if exc.status in (401, 403):
        where = f"Secret {secret}" if secret else "spec.tracking.mlflow.credentialsSecret"
        return (
            f"{text}; the server refused the credentials: check {where} (keys {TOKEN_ENV}, or "
            f"{USERNAME_ENV} and {PASSWORD_ENV}) and the user's permissions on the experiment"
        )
    if exc.status is None and ("cannot connect" in text or "no answer" in text):
        return (
            f"{text}; check spec.tracking.mlflow.trackingUri, that the MLflow server is "
            "running and that this pod can reach it (DNS, NetworkPolicy, proxy)"
        )
    if exc.status == 404 and _ARTIFACTS_API in text:
        return f"{text}; the server does not serve artifacts: start it with --serve-artifacts"
    if exc.status == 404:
        return f"{text}; is spec.tracking.mlflow.trackingUri the MLflow server's root URL?"
    return text


def _mark_stage(tracker: MlflowTracker, stage: Stage) -> None:
    tags = {
        t["key"]: t.get("value", "")
        for t in tracker.get_run().get("data", {}).get("tags", [])
        if isinstance(t, dict)
    }
    done = {s for s in tags.get(STAGES_TAG, "").split(",") if s} | {stage.value}
    tracker.set_tags(
        {STAGE_TAG: stage.value, STAGES_TAG: ",".join(s for s in STAGE_ORDER if s in done)}
    )


def _prepare(
    tracker: MlflowTracker, job: FineTuneJob, result: PrepareResult, storage: Storage | None
) -> None:
    params: dict[str, Any] = {
        "dataset": result.config or job.spec.dataset.to_wire(),
        "model": job.spec.model.to_wire(),
    }
    params["dataset"] = {**params["dataset"], "tokenizer": result.tokenizer}
    tracker.log_params(params)
    now = _now_ms()
    stats = {k: v for k, v in flatten(result.stats.to_wire(), "dataset").items() if _finite(v)}
    stats["dataset.prepareSeconds"] = result.seconds
    tracker.log_metrics((k, float(v), 0, now) for k, v in stats.items())
    tracker.set_tags(
        {
            "kubetune.dataset.fingerprint": result.fingerprint,
            "kubetune.dataset.uri": result.dataset_uri,
            "kubetune.dataset.trainSha256": result.train_sha256,
            "kubetune.dataset.testSha256": result.test_sha256,
        }
    )
    card = _read(storage, RunLayout.PREPARE_RESULT) or result.to_json().encode()
    tracker.log_artifact_bytes(card, RunLayout.PREPARE_RESULT)


# Columns of train/metrics.jsonl and their MLflow names; other numeric columns keep theirs.
STEP_METRICS = {
    "loss": "train_loss",
    "lr": "learning_rate",
    "learning_rate": "learning_rate",
    "learningRate": "learning_rate",
    "tokens_per_second": "tokens_per_second",
    "tokensPerSecond": "tokens_per_second",
    "epoch": "epoch",
    "validation_loss": "validation_loss",
    "validationLoss": "validation_loss",
}
_NOT_METRICS = {"step", "elapsed", "time", "timestamp"}


def step_metrics(rows: Sequence[Mapping[str, Any]], end_ms: int | None = None) -> list[Metric]:
    """The per-step metrics of ``train/metrics.jsonl`` rows.

    The rows carry seconds since training began (``elapsed``), not wall time: a row's
    timestamp is ``end_ms`` (default now: the stage has just finished) minus the seconds
    between it and the last row.
    """
    end_ms = _now_ms() if end_ms is None else end_ms
    elapsed = [r["elapsed"] for r in rows if _finite(r.get("elapsed"))]
    last = max(elapsed) if elapsed else None
    out: list[Metric] = []
    for row in rows:
        step = row.get("step")
        if not isinstance(step, int | float) or isinstance(step, bool):
            continue
        ts = end_ms
        if last is not None and _finite(row.get("elapsed")):
            ts = end_ms - round((last - float(row["elapsed"])) * 1000)
        for column, value in row.items():
            if column in _NOT_METRICS or not _finite(value):
                continue
            out.append((STEP_METRICS.get(column, _snake(column)), float(value), int(step), ts))
    return out


def _train(
    tracker: MlflowTracker, job: FineTuneJob, result: TrainResult, storage: Storage | None
) -> None:
    config = {k: v for k, v in result.config.items() if k not in ("job", "trainingInputs")}
    if not config:
        config = {"training": job.spec.training.to_wire()}
    tracker.log_params(config)
    rows = _read_jsonl(storage, RunLayout.TRAIN_METRICS)
    history = step_metrics(rows)
    # Idempotent: a stage tracked again (a retried pod) logs only the steps not logged yet.
    latest: dict[str, int] = {}
    for m in tracker.get_run().get("data", {}).get("metrics", []):
        latest[m["key"]] = max(latest.get(m["key"], -1), int(m.get("step", 0)))
    history = [m for m in history if m[2] > latest.get(_key(m[0]), -1)]
    now, step = _now_ms(), result.steps
    totals = {
        "final_loss": result.final_loss,
        "train_tokens": result.train_tokens,
        "train_tokens_per_second": result.tokens_per_second,
        "train_seconds": result.seconds,
        "train_steps": result.steps,
        "total_steps": result.total_steps,
        "epochs": result.epochs,
        "best_validation_loss": result.best_validation_loss,
        "best_step": result.best_step,
        "final_validation_loss": result.validation_loss,
    }
    history += [(k, float(v), step, now) for k, v in totals.items() if _finite(v)]
    tracker.log_metrics(history)
    tracker.set_tags(
        {
            "kubetune.device": result.device,
            "kubetune.modelUri": result.model_uri,
            "kubetune.modelStep": result.model_step,
            "kubetune.stoppedEarly": str(result.stopped_early).lower(),
            "kubetune.trainingFingerprint": result.training_fingerprint,
        }
    )
    for key in (RunLayout.TRAIN_RESULT, RunLayout.TRAIN_METRICS):
        data = _read(storage, key)
        if data is not None:
            tracker.log_artifact_bytes(data, key)


SCORE_METRICS = {
    "perplexity": "test_perplexity",
    "bleu": "test_bleu",
    "chrf": "test_chrf",
    "exact_match": "test_exact_match",
    "tokens_per_second": "eval_tokens_per_second",
}


def score_metrics(scores: ModelScores | None, prefix: str = "") -> dict[str, float]:
    """``test_perplexity``, ``test_bleu``, ... of one model, with ``prefix``."""
    if scores is None:
        return {}
    out = {}
    for field_name, metric in SCORE_METRICS.items():
        value = getattr(scores, field_name)
        if _finite(value):
            out[prefix + metric] = float(value)
    return out


def _evaluate(
    tracker: MlflowTracker, job: FineTuneJob, result: EvaluateResult, storage: Storage | None
) -> None:
    tracker.log_params({"evaluation": job.spec.evaluation.to_wire()})
    metrics = score_metrics(result.fine_tuned)
    metrics |= score_metrics(result.baseline, "baseline_")
    metrics |= score_metrics(result.champion, "champion_")
    for comparison in result.comparisons:
        prefix = f"compare.{_key(comparison.name).replace('/', '_')}."
        for name in ("perplexity", "bleu", "chrf", "exact_match"):
            value = getattr(comparison, name)
            if _finite(value):
                metrics[prefix + SCORE_METRICS[name]] = float(value)
    for name, value in (
        ("test_lines", result.test_lines),
        ("train_test_overlap", result.train_test_overlap),
        ("evaluate_seconds", result.seconds),
    ):
        if _finite(value):
            metrics[name] = float(value)
    now = _now_ms()
    tracker.log_metrics((k, v, 0, now) for k, v in metrics.items())
    promotion = result.promotion
    tracker.set_tags(
        {
            "kubetune.evaluation.kind": result.kind,
            "kubetune.bleuSignature": result.bleu_signature,
            "kubetune.chrfSignature": result.chrf_signature,
            "kubetune.promotion": promotion.reason if promotion else None,
            "kubetune.promotion.version": promotion.version if promotion else None,
        }
    )
    data = _read(storage, RunLayout.EVAL_RESULT) or result.to_json().encode()
    tracker.log_artifact_bytes(data, RunLayout.EVAL_RESULT)


def _report(
    tracker: MlflowTracker, job: FineTuneJob, result: ReportResult, storage: Storage | None
) -> None:
    missing = []
    for key in (RunLayout.REPORT_MD, RunLayout.REPORT_HTML, RunLayout.LOSS_PNG):
        data = _read(storage, key)
        if data is None:
            if key != RunLayout.LOSS_PNG or result.loss_curve_uri:
                missing.append(key)
            continue
        tracker.log_artifact_bytes(data, key)
    tracker.set_terminated("FINISHED")
    if missing:
        raise TrackingError(f"{', '.join(missing)}: not found in the run's output, not uploaded")


# --------------------------------------------------------------------------- helpers


def flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, Mapping):
            out.update(flatten(item, name))
        else:
            out[name] = item
    return out


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple | dict):
        text = json.dumps(value, separators=(",", ":"), default=str)
    else:
        text = str(value)
    return _shorten(text, MAX_PARAM_VALUE)


def _key(name: str) -> str:
    """A valid MLflow param/metric/tag key: [\\w.- /:], no empty or '..' segments."""
    key = _KEY_BAD_CHARS.sub("_", str(name))
    key = "/".join(p if p not in ("", ".", "..") else "_" for p in key.split("/"))
    return key[:MAX_KEY] or "_"


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote_filter(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _finite(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _read(storage: Storage | None, key: str) -> bytes | None:
    """A file of the run's output, or None when it is not there (or unreadable)."""
    if storage is None:
        return None
    try:
        return storage.read_bytes(key)
    except Exception as exc:
        log.debug("tracking: %s not read: %s", key, exc)
        return None


def _read_jsonl(storage: Storage | None, key: str) -> list[dict[str, Any]]:
    data = _read(storage, key)
    rows = []
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
