"""Could a pod ever fit a node: quantities, a pod's effective requests, the verdict, the cache."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from fake_kube import FakeKube

from kubetune_operator.fit import (
    NODES_PATH,
    NodeCache,
    format_quantity,
    never_fits,
    parse_quantity,
    pod_requests,
)


def node(name: str, labels: dict[str, str] | None = None, **allocatable: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "status": {"allocatable": {"pods": "110", **allocatable}},
    }


def container(requests: dict[str, Any] | None = None, limits: dict[str, Any] | None = None) -> Any:
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if limits is not None:
        resources["limits"] = limits
    return {"name": "c", "resources": resources}


def pod(*containers: Any, init: list[Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {"spec": {"containers": list(containers), "initContainers": init or [], **spec}}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2", "2"),
        ("500m", "0.5"),
        ("1.5", "1.5"),
        ("32Gi", str(32 * 1024**3)),
        ("100M", "100000000"),
        ("1k", "1000"),
        ("1e3", "1000"),
        ("12E", "12000000000000000000"),
        (3, "3"),
    ],
)
def test_parse_quantity_reads_kubernetes_quantities(text: Any, value: str) -> None:
    assert parse_quantity(text) == Decimal(value)


@pytest.mark.parametrize("text", ["", "abc", "1Qi", "Gi", "1.2.3"])
def test_parse_quantity_rejects_what_is_not_a_quantity(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(text)


def test_format_quantity_is_readable_per_resource() -> None:
    assert format_quantity("cpu", Decimal("0.5")) == "500m"
    assert format_quantity("cpu", Decimal(8)) == "8"
    assert format_quantity("memory", Decimal(32 * 1024**3)) == "32Gi"
    assert format_quantity("memory", Decimal(1000)) == "1000"
    assert format_quantity("nvidia.com/gpu", Decimal(2)) == "2"


def test_pod_requests_sum_containers_take_the_largest_init_container_and_overhead() -> None:
    p = pod(
        container({"cpu": "1", "memory": "1Gi"}),
        container({"cpu": "500m"}),
        init=[container({"cpu": "4"}), container({"memory": "512Mi"})],
        overhead={"cpu": "100m"},
    )
    assert pod_requests(p) == {"cpu": Decimal("4.1"), "memory": Decimal(1024**3)}


def test_a_limit_without_a_request_counts_as_the_request() -> None:
    # As admission defaults it; the operator sets GPUs only as limits.
    p = pod(container({"memory": "1Gi"}, {"memory": "2Gi", "nvidia.com/gpu": 2}))
    assert pod_requests(p) == {"memory": Decimal(1024**3), "nvidia.com/gpu": Decimal(2)}


def test_a_pod_that_fits_an_empty_node_is_not_judged_never_fitting() -> None:
    nodes = [node("small", cpu="2", memory="4Gi"), node("big", cpu="8", memory="32Gi")]
    assert never_fits(pod(container({"cpu": "8", "memory": "16Gi"})), nodes) is None
    assert never_fits(pod(container()), nodes) is None  # no requests at all


def test_too_many_gpus_name_the_field_and_the_most_a_node_has() -> None:
    nodes = [node("cpu-only", cpu="64"), node("gpu-a", cpu="8", **{"nvidia.com/gpu": "2"})]
    why = never_fits(pod(container(limits={"nvidia.com/gpu": 3})), nodes)
    assert why == (
        "it requests nvidia.com/gpu 3 (spec.resources.gpusPerWorker): "
        "the most any node has is 2 (node gpu-a)"
    )


def test_an_extended_resource_no_node_offers_never_fits() -> None:
    why = never_fits(pod(container(limits={"nvidia.com/gpu": 1})), [node("n", cpu="8")])
    assert why is not None and "the most any node has is 0" in why and "(node" not in why


def test_every_request_too_large_is_named() -> None:
    why = never_fits(
        pod(container({"cpu": "16", "memory": "64Gi"})), [node("n", cpu="8", memory="32Gi")]
    )
    assert why is not None
    assert "cpu 16 (spec.resources.cpu): the most any node has is 8 (node n)" in why
    assert "memory 64Gi (spec.resources.memory): the most any node has is 32Gi (node n)" in why


def test_requests_that_each_fit_some_node_but_never_together_never_fit() -> None:
    nodes = [
        node("cpus", cpu="32", **{"nvidia.com/gpu": "0"}),
        node("gpus", cpu="4", **{"nvidia.com/gpu": "8"}),
    ]
    why = never_fits(pod(container({"cpu": "16"}, {"nvidia.com/gpu": 1})), nodes)
    assert why is not None and "no single node has all of that" in why
    assert "node gpus has cpu 4 nvidia.com/gpu 8" in why


def test_only_nodes_matching_the_node_selector_count() -> None:
    nodes = [node("big", {"pool": "cpu"}, cpu="64"), node("small", {"pool": "gpu"}, cpu="4")]
    assert never_fits(pod(container({"cpu": "16"}), nodeSelector={"pool": "cpu"}), nodes) is None
    why = never_fits(pod(container({"cpu": "16"}), nodeSelector={"pool": "gpu"}), nodes)
    assert why is not None and "(node small)" in why
    why = never_fits(pod(container({"cpu": "1"}), nodeSelector={"pool": "tpu"}), nodes)
    assert why == "no node has the labels pool=tpu (spec.resources.nodeSelector)"


def test_a_cluster_without_nodes_can_hold_nothing() -> None:
    assert never_fits(pod(container({"cpu": "1"})), []) == "the cluster has no nodes"


def test_the_node_cache_lists_once_per_ttl() -> None:
    kube = FakeKube()
    kube.add(NODES_PATH, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    cache = NodeCache(kube, ttl=3600)
    first = cache.nodes()
    assert first is not None and [n["metadata"]["name"] for n in first] == ["n1"]
    assert "namespace" not in first[0]["metadata"]  # cluster-scoped
    assert cache.nodes() == first
    assert kube.calls.count(("LIST", NODES_PATH)) == 1
    expired = NodeCache(kube, ttl=0)
    expired.nodes()
    expired.nodes()
    assert kube.calls.count(("LIST", NODES_PATH)) == 3


def test_the_node_cache_gives_up_for_good_when_listing_nodes_is_forbidden(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kube = FakeKube()
    kube.forbidden.add(NODES_PATH)
    cache = NodeCache(kube, ttl=0)
    assert cache.nodes() is None and cache.nodes() is None
    assert kube.calls.count(("LIST", NODES_PATH)) == 1
    assert "may not list nodes" in caplog.text
    # The cluster tests fail on any "Forbidden" or " 403 " in the operator's log.
    assert "Forbidden" not in caplog.text and " 403 " not in caplog.text
