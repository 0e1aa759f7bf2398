"""pytest fixture: a real Kueue on the session's test cluster (harness.kueue).

    kueue        on the light real node's cluster (k8s_cluster)
    node_kueue   on the main real node's cluster (containerd_cluster)

    Kueue: .create_resource_flavor() .create_cluster_queue() .create_local_queue()
            .create_priority_class() .delete() .get() .workload_of(); started on first use
            (after building it with scripts/build-kueue.sh if needed), stopped at the end of
            the session with its webhooks removed

Registered for tests/cluster by an import in tests/cluster/conftest.py. Queues are
cluster-wide objects: a test deletes the ResourceFlavors, ClusterQueues and
WorkloadPriorityClasses it makes (names unique per test), so tests do not see each other's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from harness.kueue import Kueue, KueueMissing, find_kueue


@pytest.fixture(scope="session")
def kueue(k8s_cluster: Any) -> Iterator[Kueue]:
    yield from _running_kueue(k8s_cluster.control_plane)


@pytest.fixture(scope="session")
def node_kueue(containerd_cluster: Any) -> Iterator[Kueue]:
    """Kueue on the main real node's cluster (FineTuneJobs whose pods run the trainer image)."""
    yield from _running_kueue(containerd_cluster.control_plane)


def _running_kueue(control_plane: Any) -> Iterator[Kueue]:
    try:
        install = find_kueue(build=True)
    except KueueMissing as err:
        pytest.fail(f"Kueue unavailable: {err}", pytrace=False)
    instance = Kueue(control_plane, install)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
