"""Kube counts each request it sends by Kubernetes verb (kubetune_operator_api_requests_total)."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry

from kubetune_operator.kube import Kube, ftj_path, jobs_path
from kubetune_operator.metrics import OperatorMetrics


class _Response:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self._raw = json.dumps(body).encode()

    def read(self) -> bytes:
        return self._raw


class _ApiClient:
    """The two calls of kubernetes.client.ApiClient that Kube uses; answers from a table."""

    def __init__(self, answers: dict[str, tuple[int, dict[str, Any]]]) -> None:
        self.answers = answers
        self.sent: list[tuple[str, str]] = []

    def param_serialize(self, *, method: str, resource_path: str, **_: Any) -> tuple[Any, ...]:
        return method, resource_path, {}, None, None

    def call_api(self, method: str, url: str, **_: Any) -> _Response:
        self.sent.append((method, url))
        status, body = self.answers.get(f"{method} {url.split('?')[0]}", (200, {}))
        return _Response(status, body)


def test_each_request_is_reported_with_its_verb() -> None:
    api = _ApiClient({f"GET {jobs_path('ml', 'gone')}": (404, {"reason": "NotFound"})})
    verbs: list[str] = []
    kube = Kube(api, on_request=verbs.append)
    kube.get(ftj_path("ml", "x"))
    kube.get(jobs_path("ml", "gone"))  # a 404 is a request too
    kube.get_metadata("/api/v1/namespaces/ml/secrets/s")
    kube.list(jobs_path("ml"), "kubetune.io/job=x")
    kube.create(jobs_path("ml"), {"kind": "Job"})
    kube.merge_patch(ftj_path("ml", "x") + "/status", {"status": {}})
    kube.delete(jobs_path("ml", "x-g1-train"))
    assert verbs == ["get", "get", "get", "list", "create", "patch", "delete"]
    assert len(api.sent) == len(verbs)


def test_the_operator_metric_counts_by_verb() -> None:
    metrics = OperatorMetrics(CollectorRegistry())
    kube = Kube(_ApiClient({}), on_request=metrics.api_request)
    kube.list(jobs_path("ml"))
    kube.list(jobs_path("ml"))
    kube.get(ftj_path("ml", "x"))

    def count(verb: str) -> float | None:
        return metrics.registry.get_sample_value(
            "kubetune_operator_api_requests_total", {"verb": verb}
        )

    assert (count("list"), count("get"), count("create")) == (2.0, 1.0, 0.0)


def test_a_kube_without_a_counter_sends_requests_as_before() -> None:
    api = _ApiClient({})
    Kube(api).get(ftj_path("ml", "x"))
    assert api.sent == [("GET", ftj_path("ml", "x"))]
