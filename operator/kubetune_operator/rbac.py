"""The operator's RBAC: the one list of rules, and a printer for the objects.

    python -m kubetune_operator.rbac                       # ClusterRole, ServiceAccount, binding
    python -m kubetune_operator.rbac --namespace kubetune --name kubetune-operator
    python -m kubetune_operator.rbac --watch-namespace team-a --watch-namespace team-b
    python -m kubetune_operator.rbac --write-chart         # charts/kubetune/files/rbac-rules.yaml

Two lists, by the scope of the resources they name:

* :data:`NAMESPACED_RULES`: FineTuneJobs and the objects the operator makes next to them.
  Watching every namespace, they go into the ClusterRole; watching named namespaces
  (``KUBETUNE_NAMESPACE=team-a,team-b``, the chart's ``watchNamespaces``), into a Role in
  each of those namespaces, so nothing outside them is readable or writable.
* :data:`CLUSTER_RULES`: cluster-scoped resources (nodes, namespaces, ...), which a Role
  cannot grant; always a ClusterRole. Only ``nodes`` (read while a stage pod cannot be
  scheduled); kopf itself needs none: it runs with
  ``settings.scanning.disabled`` and ``standalone`` peering (handlers.py), so it lists no
  CRDs, namespaces or peering objects, and its API discovery (``/api``, ``/apis``) is open to
  every authenticated client. A rule on a cluster-scoped resource belongs here, never in
  :data:`NAMESPACED_RULES` (a Role silently grants nothing on one).

The Helm chart renders its (Cluster)Roles from these lists too (``make generate`` writes them
to ``charts/kubetune/files/rbac-rules.yaml``), so the two never drift. Why each rule is needed
is said next to it. The only Secret values the operator reads are the storage keys of the
credentials Secret a FineTuneJob names, to read that job's progress with its own keys.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from kubetune.schema import GROUP, PLURAL

NAMESPACED_RULES: list[dict[str, Any]] = [
    # Watch the FineTuneJobs and write their status. (Listing them in every namespace also
    # lets the operator refuse two FineTuneJobs on one storage.output across namespaces; with
    # Roles it compares within the job's namespace only.)
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch", "update"]},
    # blockOwnerDeletion on children needs update on the owner's finalizers subresource.
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    # Stage Jobs: create, watch, suspend/annotate, delete (earlier runs).
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    # Stage pods: read termination messages and waiting reasons.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    # The run's job ConfigMap and the headless Service of multi-worker training.
    {
        "apiGroups": [""],
        "resources": ["configmaps", "services"],
        "verbs": ["get", "list", "create", "delete"],
    },
    # The Secrets a FineTuneJob names: their existence (metadata only) before a stage starts,
    # and the keys of its credentialsSecret, the only ones the operator reads storage with
    # (kubetune_operator.result_reader). No list or watch: only Secrets a spec names.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    # Events with typed reasons about FineTuneJobs.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]
"""Rules on namespaced resources: a ClusterRole, or a Role in each watched namespace."""

CLUSTER_RULES: list[dict[str, Any]] = [
    # Nodes' allocatable, read only while a stage pod cannot be scheduled: a pod that no node
    # could ever hold fails (Unschedulable) instead of waiting forever (kubetune_operator.fit).
    # Without it such a pod just waits.
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]},
]
"""Rules on cluster-scoped resources: always a ClusterRole, whatever is watched."""

RULES: list[dict[str, Any]] = NAMESPACED_RULES + CLUSTER_RULES
"""Every rule: the ClusterRole of an operator that watches every namespace."""

LABELS = {"app.kubernetes.io/name": "kubetune"}


RBAC_API = "rbac.authorization.k8s.io"


def _metadata(name: str, namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = dict(LABELS)
    return meta


def service_account(namespace: str, name: str = "kubetune-operator") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(name, namespace)}


def cluster_role(
    name: str = "kubetune-operator", rules: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A ClusterRole with ``rules``; by default every rule (an operator of every namespace)."""
    return {
        "apiVersion": f"{RBAC_API}/v1",
        "kind": "ClusterRole",
        "metadata": _metadata(name),
        "rules": copy.deepcopy(RULES if rules is None else rules),
    }


def role(watch_namespace: str, name: str = "kubetune-operator") -> dict[str, Any]:
    """A Role with :data:`NAMESPACED_RULES` in one watched namespace."""
    return {
        "apiVersion": f"{RBAC_API}/v1",
        "kind": "Role",
        "metadata": _metadata(name, watch_namespace),
        "rules": copy.deepcopy(NAMESPACED_RULES),  # a copy each: no YAML anchors between Roles
    }


def _subjects(namespace: str, name: str) -> list[dict[str, Any]]:
    return [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]


def cluster_role_binding(namespace: str, name: str = "kubetune-operator") -> dict[str, Any]:
    """Binds ClusterRole ``name`` to ServiceAccount ``namespace/name``."""
    return {
        "apiVersion": f"{RBAC_API}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _metadata(name),
        "roleRef": {"apiGroup": RBAC_API, "kind": "ClusterRole", "name": name},
        "subjects": _subjects(namespace, name),
    }


def role_binding(
    watch_namespace: str, namespace: str, name: str = "kubetune-operator"
) -> dict[str, Any]:
    """Binds Role ``watch_namespace/name`` to ServiceAccount ``namespace/name``."""
    return {
        "apiVersion": f"{RBAC_API}/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(name, watch_namespace),
        "roleRef": {"apiGroup": RBAC_API, "kind": "Role", "name": name},
        "subjects": _subjects(namespace, name),
    }


def manifests(
    namespace: str, name: str = "kubetune-operator", watch_namespaces: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The ServiceAccount ``namespace/name`` and its permissions, as the chart installs them.

    No ``watch_namespaces``: one ClusterRole with every rule. Otherwise a Role and RoleBinding
    in each watched namespace, plus a ClusterRole for :data:`CLUSTER_RULES` only if any.
    """
    objects = [service_account(namespace, name)]
    if not watch_namespaces:
        return [*objects, cluster_role(name), cluster_role_binding(namespace, name)]
    for watched in dict.fromkeys(watch_namespaces):
        objects += [role(watched, name), role_binding(watched, namespace, name)]
    if CLUSTER_RULES:
        objects += [cluster_role(name, CLUSTER_RULES), cluster_role_binding(namespace, name)]
    return objects


CHART_RULES_PATH = Path("charts/kubetune/files/rbac-rules.yaml")
"""Where ``make generate`` writes the rules for the chart (relative to the repo root)."""


def chart_rules_yaml() -> str:
    """The chart's ``files/rbac-rules.yaml``: ``namespacedRules`` and ``clusterRules``."""
    header = (
        "# Generated by `make generate` from operator/kubetune_operator/rbac.py. Do not edit.\n"
    )
    return header + yaml.safe_dump(
        {"namespacedRules": NAMESPACED_RULES, "clusterRules": CLUSTER_RULES},
        sort_keys=False,
        width=100,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the operator's RBAC objects as YAML.")
    parser.add_argument("--namespace", default="kubetune", help="namespace of the ServiceAccount")
    parser.add_argument("--name", default="kubetune-operator", help="name of every object")
    parser.add_argument(
        "--watch-namespace",
        action="append",
        default=[],
        metavar="NS[,NS...]",
        help="a namespace the operator watches (repeat, or comma-separate): a Role there "
        "instead of the ClusterRole; as KUBETUNE_NAMESPACE",
    )
    parser.add_argument(
        "--write-chart",
        action="store_true",
        help=f"write the rules to {CHART_RULES_PATH} (under the repo root) instead",
    )
    args = parser.parse_args(argv)
    if args.write_chart:
        path = Path(__file__).resolve().parents[2] / CHART_RULES_PATH
        path.write_text(chart_rules_yaml())
        print(f"wrote {CHART_RULES_PATH}")
        return 0
    watched = [ns.strip() for arg in args.watch_namespace for ns in arg.split(",") if ns.strip()]
    objects = manifests(args.namespace, args.name, watched)
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
