"""An in-memory API server behind :class:`kubetune_operator.kube.KubeClient`, for unit tests.

    kube = FakeKube()
    kube.add(ftj_path("ml"), {"apiVersion": ..., "kind": "FineTuneJob", "metadata": {...}})
    Reconciler(kube, OperatorConfig()).reconcile("ml", "x")
    kube.objects(jobs_path("ml"))                       # what the reconciler created

It answers like the API server where the reconciler can tell: GET of a missing object is
None, creating an existing name raises :class:`Conflict` (409), patching a missing object
raises :class:`ApiError` (404), deleting a missing one is a no-op. Objects get a uid,
``resourceVersion``, ``creationTimestamp`` and ``generation`` (bumped when a patch changes
``spec``); ``generateName`` is honoured (Events). A merge patch of ``<object>/status``
changes only the status, a patch of the object everything but the status. Deleting an
object deletes its dependents (ownerReferences), as the garbage collector does; with
``kube.finalizing = True`` deleted objects only get a ``deletionTimestamp`` until
:meth:`FakeKube.finish_deletions`. Label selectors: ``k=v`` terms joined by commas.
A collection path without ``namespaces/<ns>`` (``/apis/kubetune.io/v1alpha1/finetunejobs``)
lists that collection of every namespace; :attr:`FakeKube.forbidden` holds paths whose
GET/LIST answer 403, as missing RBAC rights would. Cluster-scoped collections
(:data:`CLUSTER_SCOPED`: ``/api/v1/nodes``) hold objects without a namespace.

Simulate the Job controller and the kubelet by editing objects in place
(:meth:`FakeKube.edit`) or adding pods (:meth:`FakeKube.add`). ``calls`` records every
request as ``(verb, path)``.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from kubetune_operator.kube import ApiError, Conflict, Obj

Objs = list[Obj]  # `FakeKube.list` shadows the builtin inside the class body

CREATED_AT = "2025-01-01T00:00:00Z"
# Kinds whose status is a subresource: a patch of the object leaves the status alone.
STATUS_SUBRESOURCE = {"FineTuneJob", "Job", "Pod"}
# Collections of cluster-scoped objects (no namespaces/<ns> in their paths).
CLUSTER_SCOPED = {"/api/v1/nodes"}


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


def selector_matches(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selector (``a=b,c=d``), the only kind the reconciler uses."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, sep, value = term.partition("=")
        if not sep or "!" in key:
            raise ValueError(f"FakeKube supports only k=v selectors, got {term!r}")
        if labels.get(key) != value.lstrip("="):
            return False
    return True


def _split(path: str) -> tuple[str, str, str]:
    """``.../namespaces/ns/jobs/name/status`` -> (collection path, name, subresource)."""
    parts = path.rstrip("/").split("/")
    i = parts.index("namespaces")
    collection = "/".join(parts[: i + 3])
    rest = parts[i + 3 :]
    name = rest[0] if rest else ""
    sub = rest[1] if len(rest) > 1 else ""
    return collection, name, sub


class FakeKube:
    """A dict of objects keyed by path; see the module docstring."""

    def __init__(self) -> None:
        self.store: dict[str, Obj] = {}  # "<collection>/<name>" -> object
        self.calls: list[tuple[str, str]] = []
        self.finalizing = False
        self.forbidden: set[str] = set()  # paths answered with 403 (no RBAC right)
        # Collection path -> (status, message): creations refused as invalid, as admission
        # or the API's own validation would (422 Invalid, 400 BadRequest).
        self.refuse_create: dict[str, tuple[int, str]] = {}
        self._uids = itertools.count(1)
        self._versions = itertools.count(1)

    # ------------------------------------------------------------------ KubeClient

    def get(self, path: str) -> Obj | None:
        self.calls.append(("GET", path))
        obj = self.store.get(path.rstrip("/"))
        return copy.deepcopy(obj) if obj is not None else None

    def get_metadata(self, path: str) -> Obj | None:
        self.calls.append(("GET metadata", path))
        obj = self.store.get(path.rstrip("/"))
        if obj is None:
            return None
        return {
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": copy.deepcopy(obj["metadata"]),
        }

    def list(self, path: str, label_selector: str = "") -> Objs:
        self.calls.append(("LIST", path))
        if path.rstrip("/") in self.forbidden:
            raise ApiError(403, {"reason": "Forbidden", "message": "forbidden"}, "GET", path)
        return [
            copy.deepcopy(obj)
            for obj in self.objects(path)
            if selector_matches(obj["metadata"].get("labels") or {}, label_selector)
        ]

    def create(self, path: str, body: Obj) -> Obj:
        self.calls.append(("POST", path))
        refused = self.refuse_create.get(path.rstrip("/"))
        if refused is not None:
            status, message = refused
            raise ApiError(status, {"reason": "Invalid", "message": message}, "POST", path)
        return copy.deepcopy(self.add(path, body))

    def merge_patch(self, path: str, patch: Obj) -> Obj:
        self.calls.append(("PATCH", path))
        collection, name, sub = _split(path)
        key = f"{collection}/{name}"
        obj = self.store.get(key)
        if obj is None:
            raise ApiError(404, {"reason": "NotFound", "message": "not found"}, "PATCH", path)
        if sub == "status":
            patched = dict(obj)
            if "status" in patch:
                patched["status"] = apply_merge_patch(obj.get("status"), patch["status"])
        else:
            changes = {k: v for k, v in patch.items() if k != "status"}
            if obj["kind"] not in STATUS_SUBRESOURCE and "status" in patch:
                changes["status"] = patch["status"]
            patched = apply_merge_patch(obj, changes)
            if patched.get("spec") != obj.get("spec"):
                meta = patched["metadata"]
                meta["generation"] = int(meta.get("generation") or 1) + 1
        patched["metadata"]["resourceVersion"] = str(next(self._versions))
        self.store[key] = patched
        return copy.deepcopy(patched)

    def delete(self, path: str, propagation: str = "Background") -> None:
        self.calls.append(("DELETE", path))
        obj = self.store.get(path.rstrip("/"))
        if obj is None:
            return
        if self.finalizing:
            obj["metadata"].setdefault("deletionTimestamp", CREATED_AT)
            return
        self._remove(path.rstrip("/"))

    # ------------------------------------------------------------------ test helpers

    def add(self, collection: str, body: Obj) -> Obj:
        """Store ``body`` in ``collection`` as the API server would; 409 if the name exists."""
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            meta["name"] = f"{meta.get('generateName', 'obj-')}{next(self._uids):05d}"
        key = f"{collection.rstrip('/')}/{meta['name']}"
        if key in self.store:
            raise Conflict(
                409,
                {"reason": "AlreadyExists", "message": f"{meta['name']} already exists"},
                "POST",
                collection,
            )
        if collection.rstrip("/") not in CLUSTER_SCOPED:
            meta.setdefault("namespace", _split(key)[0].split("/")[-2])
        meta.setdefault("uid", f"uid-{next(self._uids)}")
        meta.setdefault("creationTimestamp", CREATED_AT)
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._versions))
        self.store[key] = obj
        return obj

    def objects(self, collection: str) -> Objs:
        """The stored objects of a collection (live references: edit them to simulate).

        Without ``namespaces/<ns>`` in ``collection``: that collection in every namespace.
        """
        collection = collection.rstrip("/")
        if "/namespaces/" in collection or collection in CLUSTER_SCOPED:
            return [
                obj
                for key, obj in sorted(self.store.items())
                if key.rpartition("/")[0] == collection
            ]
        api, _, plural = collection.rpartition("/")
        found = []
        for key, obj in sorted(self.store.items()):
            parent = key.rpartition("/")[0]  # <api>/namespaces/<ns>/<plural>
            rest = parent.removeprefix(f"{api}/namespaces/")
            if rest != parent and rest.count("/") == 1 and rest.endswith(f"/{plural}"):
                found.append(obj)
        return found

    def edit(self, path: str) -> Obj:
        """The stored object itself, to change as a controller or kubelet would."""
        return self.store[path.rstrip("/")]

    def finish_deletions(self) -> None:
        """Remove every object that has a deletionTimestamp (finalizers done)."""
        for key in [k for k, o in self.store.items() if o["metadata"].get("deletionTimestamp")]:
            if key in self.store:
                self._remove(key)

    def _remove(self, key: str) -> None:
        obj = self.store.pop(key)
        uid = obj["metadata"].get("uid")
        for other_key, other in list(self.store.items()):
            owners = other["metadata"].get("ownerReferences") or []
            if other_key in self.store and any(ref.get("uid") == uid for ref in owners):
                self._remove(other_key)
