"""The kopf side of the operator: its settings let events of many objects reach the handlers.

The stall of issue 16: ``settings.queueing.worker_limit = 4`` let kopf handle the events of
only 4 objects of a kind at a time, and kopf keeps an object's worker alive for
``queueing.idle_timeout`` (5 s) after its last event, so every 5th FineTuneJob created
waited ~5 s before its first event reached us. These tests feed kopf's own per-object
multiplexer (``kopf._core.reactor.queueing.watcher``, with a watch stream of our own and
the settings our startup handler writes) events of many objects and count how many reach
the processor while every worker is still alive: no clock, no timing assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from fake_kube import FakeKube
from kopf._cogs.structs import references
from kopf._core.reactor import queueing

from kubetune.schema import GROUP, PLURAL, VERSION
from kubetune_operator import handlers
from kubetune_operator.config import OperatorConfig

OBJECTS = 50  # FineTuneJobs created at once; more than any reconcile worker count


def operator_settings(monkeypatch: pytest.MonkeyPatch) -> kopf.OperatorSettings:
    """The settings our startup handler writes (on a fake cluster, metrics off)."""
    monkeypatch.setattr(handlers.Kube, "from_environment", lambda on_request=None: FakeKube())
    settings = kopf.OperatorSettings()
    memo = SimpleNamespace(config=OperatorConfig(metrics_port=0, max_concurrent=4))
    handlers.configure(settings=settings, memo=memo, logger=logging.getLogger("test"))
    handlers.stop(memo=memo)  # the reconcile worker threads are not needed here
    return settings


def objects_handled(
    settings: kopf.OperatorSettings, monkeypatch: pytest.MonkeyPatch, count: int
) -> int:
    """How many of ``count`` objects, each with one event, kopf hands to the processor.

    The workers never idle out during the test (``idle_timeout`` of an hour), so an object
    whose event waits for a free worker is never handled here, however slow the machine.
    """
    settings.queueing.idle_timeout = 3600.0
    handled: set[str] = set()

    async def processor(*, raw_event: kopf.RawEvent, **_: Any) -> None:
        handled.add(raw_event["object"]["metadata"]["uid"])

    async def scenario() -> int:
        sent = asyncio.Event()

        async def watch_stream(**_: Any) -> AsyncIterator[Any]:
            for i in range(count):
                meta = {"uid": f"uid-{i}", "name": f"ftj-{i}", "namespace": "ml"}
                yield {"type": "ADDED", "object": {"metadata": meta}}
            sent.set()
            await asyncio.Event().wait()  # the watch stays open, with nothing more to say

        monkeypatch.setattr(queueing.watching, "infinite_watch", watch_stream)
        watcher = asyncio.create_task(
            queueing.watcher(
                namespace="ml",
                settings=settings,
                resource=references.Resource(GROUP, VERSION, PLURAL),
                processor=processor,  # type: ignore[arg-type]
            )
        )
        await sent.wait()
        # Let every spawnable worker run: a bounded number of event-loop turns, no clock.
        for _ in range(20 * count):
            if len(handled) == count:
                break
            await asyncio.sleep(0)
        seen = len(handled)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        return seen

    return asyncio.run(scenario())


def test_startup_sets_no_kopf_worker_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # kopf's default (None) is no limit; a limit makes the next object wait for an idle
    # worker of another object to exit (queueing.idle_timeout) before its events are handled.
    assert operator_settings(monkeypatch).queueing.worker_limit is None


def test_events_of_many_objects_all_reach_the_handlers_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = operator_settings(monkeypatch)
    assert objects_handled(settings, monkeypatch, OBJECTS) == OBJECTS


def test_the_check_detects_a_worker_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stall's setting: only 4 objects handled until a worker idles out.
    settings = operator_settings(monkeypatch)
    settings.queueing.worker_limit = 4
    assert objects_handled(settings, monkeypatch, OBJECTS) == 4
