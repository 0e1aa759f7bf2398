"""kopf handlers: settings at startup, and watch events that enqueue FineTuneJobs.

Handlers stay thin: every event (of a FineTuneJob, or of a child Job or pod carrying
``kubetune.io/job``) only puts the FineTuneJob's key on the work queue; the
:class:`~kubetune_operator.reconcile.Reconciler` does the work in worker threads.

Why no ``@kopf.timer``/``@kopf.daemon``: kopf adds a finalizer to every object that has
one, so deleting a FineTuneJob would hang while the operator is down. Periodic work
(progress, timeouts) is a delayed requeue on the same work queue instead, and deletion
needs no finalizer: children carry ownerReferences and the garbage collector removes them.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune.schema import GROUP, PLURAL, VERSION
from kubetune_operator.builders import LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY
from kubetune_operator.config import OperatorConfig
from kubetune_operator.controller import Controller
from kubetune_operator.kube import Kube
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.reconcile import Reconciler

CHILD_LABELS: dict[str, Any] = {
    LABEL_MANAGED_BY: MANAGED_BY,
    LABEL_JOB: kopf.PRESENT,
}


@kopf.on.startup()
def configure(
    settings: kopf.OperatorSettings,
    memo: Any,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    cfg: OperatorConfig = memo.config
    # Our own Events carry typed reasons; kopf's per-log-line Events would only add noise.
    settings.posting.enabled = False
    settings.persistence.finalizer = "kubetune.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetune.io", key="last-handled-configuration"
    )
    # One replica; no KopfPeering objects needed.
    settings.peering.standalone = True
    # The CRD is installed before the operator, and KUBETUNE_NAMESPACE names exact namespaces:
    # watch neither CRDs nor namespaces, so no cluster-scoped RBAC rule is needed (rbac.py).
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # No settings.queueing.worker_limit (kopf's default: none). kopf gives each object a
    # worker that lives queueing.idle_timeout (5 s) after the object's last event, so a
    # limit of N let only N objects per watched kind have events handled at a time: the
    # next object's events waited for another object's worker to idle out (every 5th
    # FineTuneJob created waited ~4.8 s; 50 at once took 62 s). Our handlers only enqueue
    # (microseconds, no I/O); the reconcile workers (KUBETUNE_MAX_CONCURRENT) bound the work.
    # tests/unit/test_handlers.py checks that events of many objects all reach the handlers.

    metrics = OperatorMetrics()
    metrics.serve(cfg.metrics_port)
    reconciler = Reconciler(Kube.from_environment(metrics.api_request), cfg, metrics=metrics)
    controller = Controller(reconciler, workers=cfg.max_concurrent, metrics=metrics)
    controller.start()
    memo.controller = controller
    memo.metrics = metrics
    logger.info(
        "kubetune operator: namespaces=%s workers=%d image=%s metrics=:%d",
        cfg.namespace or "<all>",
        cfg.max_concurrent,
        cfg.trainer_image,
        cfg.metrics_port,
    )


@kopf.on.cleanup()
def stop(memo: Any, **_: Any) -> None:
    controller: Controller | None = getattr(memo, "controller", None)
    if controller is not None:
        controller.stop()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_event(
    event: kopf.RawEvent, name: str, namespace: str | None, memo: Any, **_: Any
) -> None:
    controller: Controller = memo.controller
    if event.get("type") == "DELETED":
        controller.forget(namespace or "", name)
    else:
        controller.enqueue(namespace or "", name)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
async def child_job_event(labels: kopf.Labels, namespace: str | None, memo: Any, **_: Any) -> None:
    memo.controller.enqueue(namespace or "", labels[LABEL_JOB])


@kopf.on.event("v1", "pods", labels=CHILD_LABELS)
async def child_pod_event(labels: kopf.Labels, namespace: str | None, memo: Any, **_: Any) -> None:
    memo.controller.enqueue(namespace or "", labels[LABEL_JOB])
