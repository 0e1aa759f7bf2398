"""Worker threads that drain the work queue into the :class:`Reconciler`.

    controller = Controller(reconciler, workers=4, metrics=metrics)
    controller.start()
    controller.enqueue("default", "tldr")    # from kopf event handlers
    controller.stop()

A failed pass is retried with exponential backoff (1 s doubling to 5 min); a pass that
asks for a requeue (training progress, unschedulable checks) is scheduled after its delay.
Nothing here sleeps in a kopf handler: handlers only enqueue.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kubetune_operator.kube import ApiError
from kubetune_operator.reconcile import Reconciler
from kubetune_operator.workqueue import WorkQueue

log = logging.getLogger("kubetune.operator")
MAX_BACKOFF = 300.0


def key_parts(key: object) -> tuple[str, str]:
    assert isinstance(key, tuple) and len(key) == 2
    return str(key[0]), str(key[1])


def error_reason(exc: BaseException) -> str:
    """A short label for the reconcile_errors_total metric."""
    if isinstance(exc, ApiError):
        return exc.reason or f"HTTP{exc.status}"
    return type(exc).__name__


class Controller:
    """A work queue of FineTuneJob keys, worker threads, and per-key retry backoff."""

    def __init__(self, reconciler: Reconciler, workers: int = 4, metrics: Any = None) -> None:
        self.reconciler = reconciler
        self.queue = WorkQueue()
        self.workers = workers
        self.metrics = metrics
        self._threads: list[threading.Thread] = []
        self._failures: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()

    def enqueue(self, namespace: str, name: str, delay: float = 0.0) -> None:
        self.queue.add((namespace, name), delay)

    def forget(self, namespace: str, name: str) -> None:
        """A FineTuneJob was deleted: drop its queue entry, failure count and caches."""
        self.queue.forget((namespace, name))
        self._failures.pop((namespace, name), None)
        self.reconciler.forget(namespace, name)

    def failures(self, namespace: str, name: str) -> int:
        """Failed passes in a row for this FineTuneJob (its retry backoff is 2**(n-1) s)."""
        return self._failures.get((namespace, name), 0)

    def start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(
                target=self._work, name=f"kubetune-reconcile-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.queue.shutdown()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def process(self, namespace: str, name: str) -> None:
        """One pass for one FineTuneJob, then requeue it: after its delay, or with backoff."""
        key = (namespace, name)
        try:
            requeue = self.reconciler.reconcile(namespace, name)
        except Exception as exc:
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            delay = min(MAX_BACKOFF, 2.0 ** (failures - 1))
            log.warning(
                "reconcile %s/%s failed (%s); retrying in %.0fs", namespace, name, exc, delay
            )
            if self.metrics is not None:
                self.metrics.reconcile_error(error_reason(exc))
            self.queue.add(key, delay)
        else:
            self._failures.pop(key, None)
            if requeue is not None:
                self.queue.add(key, requeue)

    def _work(self) -> None:
        while not self._stop.is_set():
            key = self.queue.get(timeout=1.0)
            if key is None:
                continue
            try:
                self.process(*key_parts(key))
            finally:
                self.queue.done(key)
