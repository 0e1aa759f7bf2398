"""Could a pod ever run on one of the cluster's nodes? Its requests against their allocatable.

    why = never_fits(pod, nodes)       # None: some node could hold it (once it has room)
    # else e.g. "it requests nvidia.com/gpu 3 (spec.resources.gpusPerWorker); the most any
    #            node has is 2 (node gpu-a)"
    cache = NodeCache(kube)            # the cluster's nodes, listed at most every 30 s
    nodes = cache.nodes()              # None when the operator may not list nodes

A pod the scheduler cannot place *now* (other pods hold the CPUs, memory or GPUs) waits; a
pod that no node could hold *even empty* never starts by itself. :func:`never_fits` tells
the two apart the way the scheduler's NodeResourcesFit plugin counts: the pod's effective
requests (the sum over its containers, at least the largest init container, plus
``spec.overhead``; a limit without a request counts as the request, as admission defaults
it) against each node's ``status.allocatable``, among the nodes its ``nodeSelector``
matches. Taints, affinity and volumes are not judged here (the pod then just waits).

Pure except for :class:`NodeCache`, which asks a :class:`~kubetune_operator.kube.KubeClient`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from decimal import Decimal, InvalidOperation
from typing import Any

from kubetune_operator.kube import ApiError, KubeClient

log = logging.getLogger("kubetune.operator")

Obj = dict[str, Any]

NODES_PATH = "/api/v1/nodes"
NODES_TTL = 30.0  # seconds a node listing is reused (nodes change rarely)

# Which FineTuneJob field sets each resource of a stage pod (builders._resources).
SPEC_FIELD = {
    "cpu": "spec.resources.cpu",
    "memory": "spec.resources.memory",
    "nvidia.com/gpu": "spec.resources.gpusPerWorker",
}
# Counted by the scheduler per node, not requested by pods.
NOT_REQUESTED = {"pods"}

_QUANTITY = re.compile(r"^([+-]?[0-9]*\.?[0-9]+)((?:[eE][+-]?[0-9]+)|[KMGTPE]i|[numkMGTPE]?)$")
_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    **{f"{p}i": Decimal(1024**i) for i, p in enumerate("KMGTPE", start=1)},
}


def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes quantity (``500m``, ``2``, ``32Gi``, ``1e3``, ``1.5``) as a Decimal.

    Raises ValueError for anything else.
    """
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = match.groups()
    try:
        if len(suffix) > 1 and suffix[0] in "eE":  # 1e3; a bare E is exa
            return Decimal(number) * Decimal(10) ** int(suffix[1:])
        return Decimal(number) * _SUFFIX[suffix]
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from None


def format_quantity(resource: str, value: Decimal) -> str:
    """A readable quantity: ``500m`` or ``4`` CPUs, ``32Gi`` of memory, ``2`` GPUs."""
    if resource == "cpu" and value != value.to_integral_value():
        return f"{int(value * 1000)}m"
    if resource in ("memory", "ephemeral-storage") or resource.startswith("hugepages-"):
        for power, suffix in ((4, "Ti"), (3, "Gi"), (2, "Mi"), (1, "Ki")):
            unit = Decimal(1024**power)
            if value >= unit and value % unit == 0:
                return f"{int(value / unit)}{suffix}"
    return str(int(value)) if value == value.to_integral_value() else str(value.normalize())


def _container_requests(container: Obj) -> dict[str, Decimal]:
    resources = container.get("resources") or {}
    limits = resources.get("limits") or {}
    requests = {**limits, **(resources.get("requests") or {})}  # a bare limit is the request
    out: dict[str, Decimal] = {}
    for name, raw in requests.items():
        try:
            out[name] = parse_quantity(raw)
        except ValueError:
            continue  # the API server validated it; nothing we could judge better
    return out


def pod_requests(pod: Obj) -> dict[str, Decimal]:
    """What the scheduler reserves for ``pod``: positive requests by resource name."""
    spec = pod.get("spec") or {}
    total: dict[str, Decimal] = {}
    for container in spec.get("containers") or []:
        for name, value in _container_requests(container).items():
            total[name] = total.get(name, Decimal(0)) + value
    for container in spec.get("initContainers") or []:
        for name, value in _container_requests(container).items():
            total[name] = max(total.get(name, Decimal(0)), value)
    for name, raw in (spec.get("overhead") or {}).items():
        try:
            total[name] = total.get(name, Decimal(0)) + parse_quantity(raw)
        except ValueError:
            continue
    return {k: v for k, v in total.items() if v > 0 and k not in NOT_REQUESTED}


def node_allocatable(node: Obj) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for name, raw in ((node.get("status") or {}).get("allocatable") or {}).items():
        try:
            out[name] = parse_quantity(raw)
        except ValueError:
            continue
    return out


def _matches(node: Obj, selector: dict[str, str]) -> bool:
    labels = (node.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name") or "?")


def _show(resource: str, value: Decimal) -> str:
    field = SPEC_FIELD.get(resource)
    return f"{resource} {format_quantity(resource, value)}" + (f" ({field})" if field else "")


def never_fits(pod: Obj, nodes: list[Obj]) -> str | None:
    """Why no node in ``nodes`` could ever hold ``pod``; None when one could.

    "Could ever": the node's whole allocatable, as if no other pod ran there. The answer
    names the requests that are too large, the FineTuneJob fields that set them and the
    most that any (matching) node offers, so the user knows what to change.
    """
    spec = pod.get("spec") or {}
    selector: dict[str, str] = dict(spec.get("nodeSelector") or {})
    candidates = [n for n in nodes if _matches(n, selector)]
    if not candidates:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
        if not nodes:
            return "the cluster has no nodes"
        return f"no node has the labels {labels} (spec.resources.nodeSelector)"
    wants = pod_requests(pod)
    offers = [(node, node_allocatable(node)) for node in candidates]
    if any(all(have.get(r, Decimal(0)) >= v for r, v in wants.items()) for _, have in offers):
        return None
    too_big = []
    for resource, value in sorted(wants.items()):
        most_node, most = max(
            ((node, have.get(resource, Decimal(0))) for node, have in offers), key=lambda x: x[1]
        )
        if value > most:
            where = f"the most any node has is {format_quantity(resource, most)}"
            if most > 0:
                where += f" (node {_name(most_node)})"
            too_big.append(f"{_show(resource, value)}: {where}")
    if too_big:
        return "it requests " + "; ".join(too_big)
    # Each request fits some node, but no node has all of them at once.
    asked = ", ".join(_show(r, v) for r, v in sorted(wants.items()))
    nearest = ", ".join(
        f"node {_name(node)} has "
        + " ".join(f"{r} {format_quantity(r, have.get(r, Decimal(0)))}" for r in sorted(wants))
        for node, have in offers[:3]
    )
    return f"it requests {asked} and no single node has all of that ({nearest})"


class NodeCache:
    """The cluster's nodes for :func:`never_fits`, listed at most every ``ttl`` seconds.

    Without the right to list nodes (an operator confined to namespaces by RBAC) it answers
    None from then on: the operator cannot tell "no room now" from "no room ever", so a pod
    that cannot be scheduled waits. Thread-safe: reconcile workers share one cache.
    """

    def __init__(self, kube: KubeClient, ttl: float = NODES_TTL) -> None:
        self.kube = kube
        self.ttl = ttl
        self.allowed = True
        self._nodes: list[Obj] | None = None
        self._listed_at = -1e18
        self._lock = threading.Lock()

    def nodes(self) -> list[Obj] | None:
        with self._lock:
            if not self.allowed:
                return None
            if time.monotonic() - self._listed_at < self.ttl:
                return self._nodes
            try:
                self._nodes = self.kube.list(NODES_PATH)
            except ApiError as exc:
                if exc.status in (401, 403):
                    self.allowed = False
                    log.warning(
                        "the operator may not list nodes (no RBAC right on the cluster-scoped "
                        "nodes); a stage pod that no node can hold waits instead of failing"
                    )
                    return None
                log.info("cannot list nodes (%s); judging pod fit later", exc)
                self._nodes = None
            self._listed_at = time.monotonic()
            return self._nodes
