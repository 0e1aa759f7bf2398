"""Training progress for people and machines: Prometheus metrics, progress.json, metrics.jsonl.

Usage::

    metrics = TrainMetrics(job="tldr-gpt2", namespace="ml")
    port = metrics.serve()          # KUBETUNE_METRICS_PORT (default 9400, 0 = off)
    metrics.update(step=10, total_steps=100, epoch=0.1, loss=3.2, learning_rate=5e-5,
                   tokens_per_second=12000.0, eta_seconds=90.0, new_tokens=40960)
    metrics.close()

    progress = ProgressWriter(ctx.storage)
    progress.log({"step": 10, "epoch": 0.1, "loss": 3.2, ...}, Progress(...))  # throttled
    progress.flush()                                                       # at the end

Every series carries ``finetunejob`` and ``namespace`` labels (GPU series also
``gpu``). The names are a contract with the chart's dashboards and alerts; see
the team brief. Scrape by hand: ``curl localhost:9400/metrics``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from kubetune.contract import METRICS_PORT, Env
from kubetune.layout import RunLayout
from kubetune.schema import Progress
from kubetune.storage import Storage, StorageError

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 10.0

METRIC_NAMES = (
    "kubetune_train_loss",
    "kubetune_train_learning_rate",
    "kubetune_train_tokens_per_second",
    "kubetune_train_step",
    "kubetune_train_total_steps",
    "kubetune_train_epoch",
    "kubetune_train_eta_seconds",
    "kubetune_train_tokens_total",
    "kubetune_train_nonfinite_loss_total",
    "kubetune_gpu_memory_used_bytes",
    "kubetune_gpu_utilization_ratio",
)


def metrics_port() -> int:
    """The port from ``KUBETUNE_METRICS_PORT`` (default 9400; 0 disables the endpoint)."""
    raw = os.environ.get(Env.METRICS_PORT, str(METRICS_PORT)).strip()
    try:
        port = int(raw)
    except ValueError:
        log.warning("%s=%r is not a port number; metrics endpoint disabled", Env.METRICS_PORT, raw)
        return 0
    return port if 0 <= port < 65536 else 0


class TrainMetrics:
    """The trainer's Prometheus registry (its own, not the process-global one)."""

    def __init__(self, job: str, namespace: str | None) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"finetunejob": job, "namespace": namespace or "local"}
        names = ["finetunejob", "namespace"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=r)

        self.loss = gauge("kubetune_train_loss", "Training loss (mean token NLL, last interval).")
        self.learning_rate = gauge("kubetune_train_learning_rate", "Current learning rate.")
        self.tokens_per_second = gauge(
            "kubetune_train_tokens_per_second", "Training throughput (real tokens per second)."
        )
        self.step = gauge("kubetune_train_step", "Optimizer steps done.")
        self.total_steps = gauge("kubetune_train_total_steps", "Optimizer steps planned.")
        self.epoch = gauge("kubetune_train_epoch", "Epochs done (fractional).")
        self.eta = gauge("kubetune_train_eta_seconds", "Estimated seconds until training ends.")
        self.tokens = Counter(
            "kubetune_train_tokens", "Real training tokens processed.", names, registry=r
        )
        self.nonfinite = Counter(
            "kubetune_train_nonfinite_loss",
            "Times the training loss was NaN or infinite.",
            names,
            registry=r,
        )
        self.gpu_memory = Gauge(
            "kubetune_gpu_memory_used_bytes", "GPU memory in use.", [*names, "gpu"], registry=r
        )
        self.gpu_utilization = Gauge(
            "kubetune_gpu_utilization_ratio",
            "GPU utilisation (0..1).",
            [*names, "gpu"],
            registry=r,
        )
        # Create the label sets now so every series is exported from the first scrape.
        for metric in (
            self.loss,
            self.learning_rate,
            self.tokens_per_second,
            self.step,
            self.total_steps,
            self.epoch,
            self.eta,
            self.tokens,
            self.nonfinite,
        ):
            metric.labels(**self.labels)
        self._server: Any = None
        self._thread: Any = None
        self._nvml: Any = None
        self._nvml_tried = False

    def serve(self, port: int | None = None, addr: str = "0.0.0.0") -> int | None:
        """Serve ``/metrics``; the bound port, or None when disabled or the port is taken."""
        port = metrics_port() if port is None else port
        if port == 0:
            return None
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            log.warning(
                "metrics endpoint not started: port %d unavailable (%s); training "
                "continues without it",
                port,
                exc,
            )
            return None
        bound: int = self._server.server_port
        log.info("Prometheus metrics on http://%s:%d/metrics", addr, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # best effort at exit
                self._nvml.nvmlShutdown()
            self._nvml = None

    def set_total_steps(self, total: int) -> None:
        self.total_steps.labels(**self.labels).set(total)

    def update(
        self,
        *,
        step: int,
        total_steps: int,
        epoch: float,
        loss: float | None,
        learning_rate: float,
        tokens_per_second: float | None,
        eta_seconds: float | None,
        new_tokens: int,
    ) -> None:
        lab = self.labels
        self.step.labels(**lab).set(step)
        self.total_steps.labels(**lab).set(total_steps)
        self.epoch.labels(**lab).set(epoch)
        if loss is not None:
            self.loss.labels(**lab).set(loss)
        self.learning_rate.labels(**lab).set(learning_rate)
        if tokens_per_second is not None:
            self.tokens_per_second.labels(**lab).set(tokens_per_second)
        if eta_seconds is not None:
            self.eta.labels(**lab).set(eta_seconds)
        if new_tokens > 0:
            self.tokens.labels(**lab).inc(new_tokens)
        self.update_gpus()

    def count_nonfinite(self) -> None:
        self.nonfinite.labels(**self.labels).inc()

    def update_gpus(self) -> None:
        """GPU memory (torch) and utilisation (NVML, when nvidia-ml-py is installed)."""
        try:
            import torch
        except ImportError:  # pragma: no cover
            return
        if not torch.cuda.is_available():
            return
        nvml = self._nvml_module()
        for i in range(torch.cuda.device_count()):
            gpu = {**self.labels, "gpu": str(i)}
            used = None
            util = None
            if nvml is not None:
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(i)
                    used = float(nvml.nvmlDeviceGetMemoryInfo(handle).used)
                    util = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
                except Exception:  # a metric must never stop training
                    pass
            if used is None:
                used = float(torch.cuda.memory_reserved(i))
            self.gpu_memory.labels(**gpu).set(used)
            if util is not None:
                self.gpu_utilization.labels(**gpu).set(util)

    def _nvml_module(self) -> Any:
        if not self._nvml_tried:
            self._nvml_tried = True
            try:
                import pynvml  # from nvidia-ml-py

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # no NVML: utilisation is simply not exported
                self._nvml = None
        return self._nvml


def rfc3339_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class ProgressWriter:
    """``train/progress.json`` and ``train/metrics.jsonl`` in storage, written at most every ~10 s.

    Storage has no append (S3), so the metrics file is rewritten whole; it holds
    one short line per log step. A write failure is logged, never fatal.
    """

    def __init__(self, storage: Storage, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.storage = storage
        self.interval_s = interval_s
        self.lines: list[str] = []
        self._progress: Progress | None = None
        self._last_write = -math.inf  # the first record is written at once
        self._dirty = False

    def resume(self, up_to_step: int) -> None:
        """Keep the metrics lines of an earlier attempt up to the resumed step."""
        try:
            text = self.storage.read_text(RunLayout.TRAIN_METRICS)
        except StorageError:
            return
        for line in text.splitlines():
            try:
                if int(json.loads(line)["step"]) <= up_to_step:
                    self.lines.append(line)
            except (ValueError, KeyError, TypeError):
                continue

    def log(self, record: dict[str, Any], progress: Progress) -> None:
        self.lines.append(json.dumps(record, sort_keys=True))
        self._progress = progress
        self._dirty = True
        if time.monotonic() - self._last_write >= self.interval_s:
            self.flush()

    def set_progress(self, progress: Progress) -> None:
        self._progress = progress
        self._dirty = True

    def flush(self) -> None:
        if not self._dirty:
            return
        self._last_write = time.monotonic()
        self._dirty = False
        try:
            if self.lines:
                self.storage.write_text(RunLayout.TRAIN_METRICS, "\n".join(self.lines) + "\n")
            if self._progress is not None:
                self.storage.write_text(
                    RunLayout.PROGRESS,
                    json.dumps(self._progress.to_wire(), indent=2, sort_keys=True),
                )
        except StorageError as exc:
            log.warning("could not write training progress: %s", exc)
