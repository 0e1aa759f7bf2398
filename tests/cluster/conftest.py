"""Fixtures shared by the cluster tests (the harness's own are in tests/harness/fixtures.py)."""

from __future__ import annotations

from typing import Any

import pytest
from operator_helpers import install_crd
from real_node_env import (  # noqa: F401  (the real node's fixtures)
    cluster_wide_env,
    env,
    light_env,
    loaded_image,
    node_namespace,
)

from harness.kueue_fixtures import kueue, node_kueue  # noqa: F401  (real Kueues)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test on the main real node (``containerd_cluster``) ``real_node``:
    scripts/run-tests.sh runs them in one stream and the rest, with the light node
    (``k8s_cluster``), in the other."""
    for item in items:
        if "containerd_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_node)


@pytest.fixture(scope="session")
def crd_installed(k8s_cluster: Any) -> None:
    """The FineTuneJob CRD, generated from the schema, served by the test cluster."""
    install_crd(k8s_cluster.kubeconfig)
