"""A small synchronous Kubernetes REST client that speaks plain dicts.

    kube = Kube.from_environment()       # in-cluster service account, else $KUBECONFIG
    job = kube.get(jobs_path("ns", "name"))             # None when 404
    kube.create(jobs_path("ns"), body)                  # raises Conflict on 409
    kube.merge_patch(ftj_path("ns", "x") + "/status", {"status": {"phase": "Training"}})

Built on the official client's configuration loading (kubeconfig, in-cluster token,
TLS), without its generated model classes: the operator builds children as dicts
(see :mod:`kubetune_operator.builders`) and reads them as dicts.

The reconciler depends only on :class:`KubeClient`, the six calls below; ``Kube``
implements it over HTTP and ``tests/unit/fake_kube.py`` in memory, so the reconciler's
tests need no cluster. Errors: a GET of a missing object returns None, ``delete`` of a
missing object is a no-op; every other error status raises :class:`ApiError`
(:class:`Conflict` for 409).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from kubetune.schema import GROUP, PLURAL, VERSION

Obj = dict[str, Any]
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
# The Kubernetes verb of each HTTP method (a GET of a collection is "list": Kube.list says so).
VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


class ApiError(RuntimeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, body: Obj | None, method: str, path: str) -> None:
        self.status = status
        self.body = body or {}
        self.reason = str(self.body.get("reason") or "")
        message = str(self.body.get("message") or f"HTTP {status}")
        super().__init__(f"{method} {path}: {status} {self.reason}: {message}")


class Conflict(ApiError):
    """409: already exists, or a stale resourceVersion."""


def _segment(value: str) -> str:
    """One path segment, percent-encoded whole: ``/`` and ``..`` can never reach another path.

    A name from a spec (``../../kube-system/secrets/x``) becomes one segment that names no
    object (the API server answers 404 or 400), never a request for another namespace's.
    """
    if value in ("", ".", ".."):
        raise ValueError(f"{value!r} is not a Kubernetes object name or namespace")
    return quote(value, safe="")


def _object_path(collection: str, name: str) -> str:
    return f"{collection}/{_segment(name)}" if name else collection


def ftj_path(namespace: str, name: str = "") -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{_segment(namespace)}/{PLURAL}"
    return _object_path(base, name)


def all_ftjs_path() -> str:
    """The FineTuneJobs of every namespace (a cluster-wide list)."""
    return f"/apis/{GROUP}/{VERSION}/{PLURAL}"


def jobs_path(namespace: str, name: str = "") -> str:
    return _object_path(f"/apis/batch/v1/namespaces/{_segment(namespace)}/jobs", name)


def core_path(namespace: str, plural: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{_segment(namespace)}/{_segment(plural)}"
    return _object_path(base, name)


def path_for(obj: Obj) -> str:
    """Collection path of a built object (Job, ConfigMap, Service)."""
    kind, namespace = obj["kind"], obj["metadata"]["namespace"]
    if kind == "Job":
        return jobs_path(namespace)
    plurals = {"ConfigMap": "configmaps", "Service": "services", "Event": "events"}
    return core_path(namespace, plurals[kind])


class KubeClient(Protocol):
    """What the reconciler needs from the API server: plain dicts in, plain dicts out."""

    def get(self, path: str) -> Obj | None:
        """The object at ``path``; None when it does not exist."""
        ...

    def get_metadata(self, path: str) -> Obj | None:
        """Only the object's metadata (a PartialObjectMetadata); None when it does not exist."""
        ...

    def list(self, path: str, label_selector: str = "") -> list[Obj]:
        """Items of a collection matching ``label_selector`` (``k=v,k2=v2``), with ``kind``."""
        ...

    def create(self, path: str, body: Obj) -> Obj:
        """POST ``body`` to collection ``path``; raises :class:`Conflict` if the name exists."""
        ...

    def merge_patch(self, path: str, patch: Obj) -> Obj:
        """Apply a JSON merge patch (RFC 7386); ``<object>/status`` patches the status."""
        ...

    def delete(self, path: str, propagation: str = "Background") -> None:
        """Delete the object at ``path`` (its dependents per ``propagation``); 404 is fine."""
        ...


class Kube:
    """:class:`KubeClient` over HTTP: requests against one API server with one identity."""

    def __init__(self, api_client: Any, on_request: Callable[[str], None] | None = None) -> None:
        self.api = api_client
        # Called with the verb (get, list, create, patch, delete) of each request sent:
        # the operator counts them (kubetune_operator_api_requests_total{verb}).
        self.on_request = on_request

    @classmethod
    def from_environment(cls, on_request: Callable[[str], None] | None = None) -> Kube:
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        return cls(client.ApiClient(configuration), on_request)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: float = 30.0,
        verb: str = "",
    ) -> Obj | None:
        """The decoded JSON answer; None for 404 on GET; raises :class:`ApiError` otherwise.

        ``verb``: the Kubernetes verb for ``on_request`` (default: the method's, see VERBS).
        """
        if self.on_request is not None:
            self.on_request(verb or VERBS.get(method, method.lower()))
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        url_path = path + (f"?{urlencode(query)}" if query else "")
        m, url, hdrs, data, _ = self.api.param_serialize(
            method=method,
            resource_path=url_path,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(m, url, header_params=hdrs, body=data, _request_timeout=timeout)
        raw = resp.read()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = {"message": raw[:500].decode(errors="replace")}
        if resp.status == 404 and method == "GET":
            return None
        if resp.status >= 400:
            err = Conflict if resp.status == 409 else ApiError
            raise err(resp.status, decoded if isinstance(decoded, dict) else None, method, path)
        return decoded if isinstance(decoded, dict) else None

    def get(self, path: str) -> Obj | None:
        return self.request("GET", path)

    def get_metadata(self, path: str) -> Obj | None:
        """Only the object's metadata: used for Secrets, so their values never reach us."""
        return self.request("GET", path, accept=METADATA_ONLY)

    def list(self, path: str, label_selector: str = "") -> list[Obj]:
        """Items of a collection, each with its ``kind`` and ``apiVersion`` (lists omit them)."""
        query = {"labelSelector": label_selector} if label_selector else None
        answer = self.request("GET", path, query=query, verb="list") or {}
        kind = str(answer.get("kind") or "").removesuffix("List")
        items = list(answer.get("items") or [])
        for item in items:
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", answer.get("apiVersion"))
        return items

    def create(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body=body) or {}

    def merge_patch(self, path: str, patch: Obj) -> Obj:
        return (
            self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")
            or {}
        )

    def delete(self, path: str, propagation: str = "Background") -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        try:
            self.request("DELETE", path, body=body)
        except ApiError as exc:
            if exc.status != 404:
                raise
