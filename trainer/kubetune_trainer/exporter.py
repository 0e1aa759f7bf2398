"""Training progress for people and machines: Prometheus metrics, progress.json, metrics.jsonl.

Usage::

    metrics = TrainMetrics(job="tldr-gpt2", namespace="ml")
    port = metrics.serve()          # KUBETUNE_METRICS_PORT (default 9400, 0 = off)
    metrics.update(step=10, total_steps=100, epoch=0.1, loss=3.2, learning_rate=5e-5,
                   tokens_per_second=12000.0, eta_seconds=90.0, new_tokens=40960)
    metrics.close()                 # after one more scrape, if Prometheus is scraping

    progress = ProgressWriter(ctx.storage)
    progress.log({"step": 10, "epoch": 0.1, "loss": 3.2, ...}, Progress(...))  # throttled
    progress.set_checkpoints(records)        # the complete checkpoints, into progress.json
    progress.flush()                                                       # at the end

Every series carries ``finetunejob`` and ``namespace`` labels (GPU series also
``gpu``). The names are a contract with the chart's dashboards and alerts; see
the team brief. Scrape by hand: ``curl localhost:9400/metrics``.

A short run can end between two scrapes, and its final step and loss would never reach
Prometheus. So ``close()`` waits for one more scrape when something has been scraping the
endpoint: at most one and a half observed scrape intervals, never longer than
``KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS`` (default 30; 0 skips the wait). An endpoint nobody
scraped closes at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from kubetune.contract import METRICS_PORT, Env
from kubetune.layout import RunLayout
from kubetune.schema import CheckpointRecord, Progress
from kubetune.storage import Storage, StorageError

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 10.0
FINAL_SCRAPE_DEFAULT_S = 30.0
RESPONSE_GRACE_S = 0.2

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
    "kubetune_train_validation_loss",
    "kubetune_train_best_validation_loss",
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


def final_scrape_limit() -> float:
    """Seconds ``close()`` may wait for a last scrape (env ``METRICS_FINAL_SCRAPE_SECONDS``)."""
    name = Env.METRICS_FINAL_SCRAPE_SECONDS
    raw = os.environ.get(name, str(FINAL_SCRAPE_DEFAULT_S)).strip()
    try:
        limit = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %s", name, raw, FINAL_SCRAPE_DEFAULT_S)
        return FINAL_SCRAPE_DEFAULT_S
    return limit if math.isfinite(limit) and limit > 0 else 0.0


class ScrapeClock:
    """A collector that exports nothing and notes when the registry was scraped."""

    def __init__(self) -> None:
        self._scraped = threading.Condition()
        self.times: list[float] = []  # monotonic; the last two are enough

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        with self._scraped:
            self.times = [*self.times[-1:], time.monotonic()]
            self._scraped.notify_all()
        return iter(())

    def wait_for_scrape_after(self, since: float, limit: float) -> bool:
        """Block until a scrape later than ``since`` (monotonic), or ``limit`` seconds."""
        deadline = time.monotonic() + limit
        with self._scraped:
            while not (self.times and self.times[-1] > since):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._scraped.wait(left)
        return True

    def next_scrape_budget(self, limit: float) -> float:
        """How long to wait for the next scrape: 1.5 observed intervals, at most ``limit``.

        Zero when nothing has scraped (nobody is watching); ``limit`` after a single scrape.
        """
        with self._scraped:
            times = list(self.times)
        if not times:
            return 0.0
        if len(times) == 1:
            return limit
        return min(limit, 1.5 * (times[1] - times[0]))


class TrainMetrics:
    """The trainer's Prometheus registry (its own, not the process-global one)."""

    def __init__(self, job: str, namespace: str | None, rank: int = 0) -> None:
        self.registry = CollectorRegistry()
        # rank: which training process (pod) of a multi-worker job serves these values.
        self.labels = {"finetunejob": job, "namespace": namespace or "local", "rank": str(rank)}
        names = ["finetunejob", "namespace", "rank"]
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
        # training.validation only: exported from the first validation on (a job without
        # validation shows none, rather than a 0 that reads as a perfect loss).
        self.validation_loss = gauge(
            "kubetune_train_validation_loss",
            "Validation loss (token NLL over the validation split) at the latest validation.",
        )
        self.best_validation_loss = gauge(
            "kubetune_train_best_validation_loss", "Lowest validation loss so far."
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
        # Registered last: a scrape is noted once every value in it has been read.
        self.scrapes = ScrapeClock()
        self.registry.register(self.scrapes)
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

    def close(self, final_scrape_limit_s: float | None = None) -> None:
        """Stop serving, after one more scrape when something is scraping (module docstring)."""
        if self._server is not None:
            self._await_final_scrape(
                final_scrape_limit() if final_scrape_limit_s is None else final_scrape_limit_s
            )
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # best effort at exit
                self._nvml.nvmlShutdown()
            self._nvml = None

    def _await_final_scrape(self, limit: float) -> None:
        budget = self.scrapes.next_scrape_budget(limit)
        if budget <= 0:
            return
        log.info(
            "waiting up to %.0fs for a last scrape of the final metrics (%s=0 skips it)",
            budget,
            Env.METRICS_FINAL_SCRAPE_SECONDS,
        )
        if self.scrapes.wait_for_scrape_after(time.monotonic(), budget):
            # The handler thread still has to send the body; it dies with the process.
            time.sleep(RESPONSE_GRACE_S)
        else:
            log.info("no scrape came within %.0fs; the final values may be missing", budget)

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

    def update_validation(self, loss: float, best: float | None) -> None:
        """The latest validation loss and the best so far (training.validation)."""
        self.validation_loss.labels(**self.labels).set(loss)
        if best is not None:
            self.best_validation_loss.labels(**self.labels).set(best)

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

    progress.json is the :class:`~kubetune.schema.Progress` (camelCase) plus
    ``checkpoints``: the complete checkpoints (:class:`~kubetune.schema.CheckpointRecord`,
    oldest first) once there are any.
    """

    def __init__(self, storage: Storage, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.storage = storage
        self.interval_s = interval_s
        self.lines: list[str] = []
        self._progress: Progress | None = None
        self._checkpoints: list[CheckpointRecord] | None = None
        self._last_write = -math.inf  # the first record is written at once
        self._dirty = False
        self.preemptions = 0  # stops on SIGTERM so far, earlier attempts included
        self.resumed_from: int | None = None  # the checkpoint step this attempt started from

    def resume(self, up_to_step: int) -> None:
        """Keep the metrics lines of an earlier attempt up to the resumed step, and its count
        of preemptions (only progress.json remembers them: the stopped pods are gone)."""
        self.resumed_from = up_to_step
        try:
            earlier = json.loads(self.storage.read_text(RunLayout.PROGRESS))
            self.preemptions = int(earlier.get("preemptions") or 0)
        except (StorageError, ValueError, TypeError, AttributeError):
            pass
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

    def set_checkpoints(self, records: list[CheckpointRecord]) -> None:
        """The complete checkpoints, written into progress.json with the next flush."""
        self._checkpoints = list(records)
        self._dirty = True

    def count_preemption(self) -> None:
        """This attempt stops on SIGTERM: one more preemption, written with the next flush."""
        self.preemptions += 1
        self._dirty = True

    def progress_document(self) -> dict[str, Any] | None:
        """What progress.json holds: the progress and the checkpoint list."""
        if self._progress is None:
            return None
        data = self._progress.model_copy(
            update={
                "preemptions": self.preemptions or None,
                "resumed_from_step": self.resumed_from,
            }
        ).to_wire()
        if self._checkpoints:
            data["checkpoints"] = [c.to_wire() for c in self._checkpoints]
        return data

    def flush(self) -> None:
        if not self._dirty:
            return
        self._last_write = time.monotonic()
        self._dirty = False
        try:
            if self.lines:
                self.storage.write_text(RunLayout.TRAIN_METRICS, "\n".join(self.lines) + "\n")
            document = self.progress_document()
            if document is not None:
                self.storage.write_text(
                    RunLayout.PROGRESS, json.dumps(document, indent=2, sort_keys=True)
                )
        except StorageError as exc:
            log.warning("could not write training progress: %s", exc)
