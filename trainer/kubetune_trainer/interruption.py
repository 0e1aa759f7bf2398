"""Stopping training on SIGTERM with a checkpoint, and meeting the other workers in time.

Kubernetes sends SIGTERM before it kills a pod (scheduler preemption, an eviction, a drained
node, a Job that Kueue suspends to make room for a higher priority) and kills it
``terminationGracePeriodSeconds`` later. The train stage uses that time::

    stop = StopRequest.install()          # main thread, before the loop
    for step in ...:
        ...one optimizer step...
        if stop.agreed(accelerator):      # any process was asked: every process stops here
            save a checkpoint, raise Interrupted (exit code INTERRUPTED)
    stop.restore()

A step is never cut in half: the signal only sets a flag, and the loop looks at it between
steps. With several processes the flags are combined every step (a one-number all-reduce),
because a signal may reach one pod only (``kubectl delete pod``) and a checkpoint is a
collective: all processes must stop at the same step.

:func:`process_group_kwargs` bounds how long the processes of a multi-worker Job wait for each
other (``KUBETUNE_RENDEZVOUS_TIMEOUT_SECONDS``, default 600 s): at the start, and at every
collective afterwards, so a lost worker fails the others instead of hanging them.
:func:`rendezvous_error` turns the failure into a message that names the address they met at.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any

from kubetune.contract import Env, StageError
from kubetune.schema import Reason

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_DEFAULT_S = 600


class StopRequest:
    """Remembers a SIGTERM until the training loop can stop at a step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: Any = None
        self._installed = False

    @classmethod
    def install(cls) -> StopRequest:
        """Catch SIGTERM from now on (a no-op outside the main thread, where Python forbids it)."""
        stop = cls()
        if threading.current_thread() is threading.main_thread():
            stop._previous = signal.signal(signal.SIGTERM, stop._handle)
            stop._installed = True
        return stop

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning(
                "received %s: finishing this step, then saving a checkpoint",
                signal.Signals(signum).name,
            )
        self.signum = signum

    @property
    def requested(self) -> bool:
        """This process was asked to stop."""
        return self.signum is not None

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop; every process gets the same answer."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor(1 if self.requested else 0, device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="max").item())

    def restore(self) -> None:
        """Put back the SIGTERM handler that was there before ``install``."""
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def rendezvous_timeout_s() -> int:
    """``KUBETUNE_RENDEZVOUS_TIMEOUT_SECONDS`` as a positive int (the default when unset or bad)."""
    name = Env.RENDEZVOUS_TIMEOUT_SECONDS
    raw = os.environ.get(name, "").strip()
    if not raw:
        return RENDEZVOUS_TIMEOUT_DEFAULT_S
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning(
            "%s=%r is not a positive number of seconds; using %d",
            name,
            raw,
            RENDEZVOUS_TIMEOUT_DEFAULT_S,
        )
        return RENDEZVOUS_TIMEOUT_DEFAULT_S
    return value


def is_distributed_launch() -> bool:
    """Started as one of several processes (``WORLD_SIZE`` > 1, as torchrun and the pods set)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def process_group_kwargs() -> list[Any]:
    """Accelerator kwargs handlers bounding the rendezvous and collectives (several processes)."""
    if not is_distributed_launch():
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(seconds=rendezvous_timeout_s()))]


def rendezvous_error(exc: BaseException) -> StageError:
    """The error of a process that could not join the others, naming where it tried."""
    addr = os.environ.get("MASTER_ADDR", "?")
    port = os.environ.get("MASTER_PORT", "?")
    rank = os.environ.get("RANK", "?")
    world = os.environ.get("WORLD_SIZE", "?")
    return StageError(
        f"training process {rank} of {world} could not meet the others at {addr}:{port} "
        f"within {rendezvous_timeout_s()}s ({type(exc).__name__}: {exc}); check that the "
        "training pod of index 0 runs and that its name resolves through the Job's headless "
        "Service (cluster DNS), or raise "
        f"{Env.RENDEZVOUS_TIMEOUT_SECONDS} when pods start slowly",
        Reason.RENDEZVOUS_FAILED,
    )
