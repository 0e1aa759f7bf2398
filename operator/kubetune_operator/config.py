"""Operator settings, read once from the environment (documented in README.md).

    cfg = OperatorConfig.from_env()          # or OperatorConfig() for the defaults

Pure: no kopf, no Kubernetes client, so builders and tests can take a config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the operator reads from its environment."""

    namespace: str = ""  # KUBETUNE_NAMESPACE: "" watches every namespace
    max_concurrent: int = 4  # KUBETUNE_MAX_CONCURRENT: reconcile workers
    progress_interval: float = 15.0  # KUBETUNE_PROGRESS_INTERVAL: seconds between progress reads
    unschedulable_timeout: float = 300.0  # KUBETUNE_UNSCHEDULABLE_TIMEOUT: seconds
    trainer_image: str = f"{DEFAULT_IMAGE_REPO}:{__version__}"  # KUBETUNE_TRAINER_IMAGE
    metrics_port: int = 8080  # KUBETUNE_OPERATOR_METRICS_PORT: 0 disables
    health_port: int = 8081  # KUBETUNE_HEALTH_PORT: kopf liveness endpoint, 0 disables
    log_level: str = "INFO"  # KUBETUNE_LOG_LEVEL
    resync_interval: float = 60.0  # KUBETUNE_RESYNC_INTERVAL: re-check idle/finished jobs

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        defaults = cls()
        return cls(
            namespace=env.get("KUBETUNE_NAMESPACE", "").strip(),
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
        )
