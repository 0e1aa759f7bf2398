"""A small work queue with the semantics of client-go's: the heart of level-triggered reconciling.

    queue = WorkQueue()
    queue.add(("default", "tldr"))            # from any thread (kopf event handlers)
    key = queue.get(timeout=1.0)              # a worker: a due key nobody else is processing
    ...reconcile(key)...
    queue.done(key)                           # a key added meanwhile becomes available again
    queue.add(key, delay=15.0)                # requeue later (progress reads, timeouts)

A key is queued at most once (the earliest due time wins) and is never processed by two
workers at once, so one FineTuneJob is reconciled by one thread at a time and a burst of
watch events collapses into one pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

Key = Hashable


class WorkQueue:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._due: dict[Key, float] = {}
        self._processing: set[Key] = set()
        self._cv = threading.Condition()
        self._closed = False

    def add(self, key: Key, delay: float = 0.0) -> None:
        with self._cv:
            due = self._clock() + max(0.0, delay)
            current = self._due.get(key)
            if current is None or due < current:
                self._due[key] = due
                self._cv.notify_all()

    def forget(self, key: Key) -> None:
        with self._cv:
            self._due.pop(key, None)

    def __len__(self) -> int:
        with self._cv:
            return len(self._due)

    def get(self, timeout: float | None = None) -> Key | None:
        """The next due key not being processed; None on timeout or shutdown."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cv:
            while not self._closed:
                now = self._clock()
                ready = [
                    (due, key)
                    for key, due in self._due.items()
                    if due <= now and key not in self._processing
                ]
                if ready:
                    _, key = min(ready, key=lambda item: item[0])
                    del self._due[key]
                    self._processing.add(key)
                    return key
                waits = [due - now for key, due in self._due.items() if key not in self._processing]
                wait = min(waits) if waits else None
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cv.wait(wait)
            return None

    def done(self, key: Key) -> None:
        with self._cv:
            self._processing.discard(key)
            self._cv.notify_all()

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
