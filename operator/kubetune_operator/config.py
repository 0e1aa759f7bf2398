"""Operator settings, read once from the environment (documented in README.md).

    cfg = OperatorConfig.from_env()          # or OperatorConfig() for the defaults

Pure: no kopf, no Kubernetes client, so builders and tests can take a config.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from kubetune import __version__

DEFAULT_IMAGE_REPO = "ghcr.io/kubetune/trainer"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; unset it or give a number") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number; unset it or give seconds") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def normalize_endpoint(url: str) -> str:
    """``HTTP://MinIO:9000/`` -> ``http://minio:9000``: the form endpoints are compared in."""
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"


def parse_endpoints(raw: str) -> tuple[str, ...]:
    """The allow-list from ``KUBETUNE_STORAGE_ENDPOINTS`` (comma or whitespace separated)."""
    items = (item for item in raw.replace(",", " ").split() if item)
    normalized = []
    for item in items:
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"KUBETUNE_STORAGE_ENDPOINTS: {item!r} is not an http(s) URL; "
                "give endpoint URLs such as https://minio.storage.svc:9000"
            )
        normalized.append(normalize_endpoint(item))
    return tuple(normalized)


_NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _namespaces(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of namespace names, in order, without repeats."""
    found = [ns.strip() for ns in env.get(name, "").split(",") if ns.strip()]
    bad = [ns for ns in found if not _NAMESPACE_NAME.fullmatch(ns)]
    if bad:
        raise ValueError(
            f"{name}={env[name]!r}: {', '.join(map(repr, bad))} is not a namespace name "
            "(lowercase letters, digits and '-', at most 63 characters; no patterns); "
            "give namespaces comma-separated, e.g. team-a,team-b, or leave it empty to watch "
            "every namespace"
        )
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the operator reads from its environment."""

    # KUBETUNE_NAMESPACE: the namespaces to watch, comma-separated ("team-a,team-b"); empty
    # watches every namespace. Exact names only: kopf would need to list and watch namespaces
    # (cluster-wide rights) to expand patterns, and the chart grants a Role per name.
    namespaces: tuple[str, ...] = ()
    max_concurrent: int = 4  # KUBETUNE_MAX_CONCURRENT: reconcile workers
    progress_interval: float = 15.0  # KUBETUNE_PROGRESS_INTERVAL: seconds between progress reads
    # KUBETUNE_UNSCHEDULABLE_TIMEOUT: seconds a stage pod that no node could ever hold waits
    # for such a node (an autoscaler's) before the run fails; a pod waiting for room never fails.
    unschedulable_timeout: float = 300.0
    trainer_image: str = f"{DEFAULT_IMAGE_REPO}:{__version__}"  # KUBETUNE_TRAINER_IMAGE
    metrics_port: int = 8080  # KUBETUNE_OPERATOR_METRICS_PORT: 0 disables
    health_port: int = 8081  # KUBETUNE_HEALTH_PORT: kopf liveness endpoint, 0 disables
    log_level: str = "INFO"  # KUBETUNE_LOG_LEVEL
    resync_interval: float = 60.0  # KUBETUNE_RESYNC_INTERVAL: re-check idle/finished jobs
    # KUBETUNE_STORAGE_ENDPOINTS: explicit spec.storage.endpoint values the operator may read
    # (with the job's own keys); see kubetune_operator.result_reader.
    storage_endpoints: tuple[str, ...] = ()
    # Not from the environment: accept file:// storage.output and read it directly, for a
    # reconciler embedded in a process that shares its "pods'" file system (the unit tests'
    # in-memory cluster). A real cluster's pods share no file system with anything.
    file_outputs: bool = False

    @property
    def namespace(self) -> str:
        """The watched namespaces as KUBETUNE_NAMESPACE spells them; "" for every namespace."""
        return ",".join(self.namespaces)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        defaults = cls()
        return cls(
            namespaces=_namespaces(env, "KUBETUNE_NAMESPACE"),
            max_concurrent=_int(env, "KUBETUNE_MAX_CONCURRENT", defaults.max_concurrent, 1),
            progress_interval=_float(
                env, "KUBETUNE_PROGRESS_INTERVAL", defaults.progress_interval, 0.5
            ),
            unschedulable_timeout=_float(
                env, "KUBETUNE_UNSCHEDULABLE_TIMEOUT", defaults.unschedulable_timeout, 0.0
            ),
            trainer_image=env.get("KUBETUNE_TRAINER_IMAGE", "").strip() or defaults.trainer_image,
            metrics_port=_int(env, "KUBETUNE_OPERATOR_METRICS_PORT", defaults.metrics_port),
            health_port=_int(env, "KUBETUNE_HEALTH_PORT", defaults.health_port),
            log_level=(env.get("KUBETUNE_LOG_LEVEL", "").strip() or defaults.log_level).upper(),
            resync_interval=_float(env, "KUBETUNE_RESYNC_INTERVAL", defaults.resync_interval, 1.0),
            storage_endpoints=parse_endpoints(env.get("KUBETUNE_STORAGE_ENDPOINTS", "")),
        )
