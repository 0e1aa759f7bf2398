"""pytest fixtures for tests against real Kubernetes, S3 and Prometheus processes.

Load as a plugin: `pytest_plugins = ["harness.fixtures"]` in a conftest.py (with tests/ on
sys.path), or `pytest -p harness.fixtures`. Everything starts on first use and stops at the end
of the session (or test, for function-scoped fixtures). Nothing is skipped: a missing binary that
cannot be built fails the test with what to run.

Two clusters, each a control plane of its own with one real node (a kubelet with containerd,
harness.containerd_node; root, scripts/install-system-deps.sh), so that the two CI streams
(scripts/run-tests.sh) each have one:

    containerd_cluster  the main one: kube-proxy (unless another node on the host has it), the
                        shared image store (the trainer image); FineTuneJobs run here
    k8s_cluster         the light one: no kube-proxy, an image store of its own
                        (~/.cache/kubetune/node/containerd-light), for tests that need the API
                        server, the scheduler, Kueue or the operator image but not the trainer

Both are ContainerdCluster: .kubeconfig .api_url .bin_dir .node_name .kubectl(*args)
.api_client() .node .load_image(src) .probe_image().

    tools_bin           Path of the dir with etcd, kube-*, helm, kubeconform
    k8s_namespace       str: a fresh namespace on k8s_cluster (with its default service
                        account), deleted after
    s3_server           S3Server: .endpoint_url .access_key .secret_key .region .make_bucket()
                        .env()
    prometheus_factory  callable(["host:port", ...]) -> Prometheus: .url .query(expr)
                        .wait_for_target_up(timeout)
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness._proc import install_exit_handlers, wait_until
from harness.cluster import ControlPlane
from harness.containerd_node import ContainerdNode, NodeUnavailable, kube_proxy_available
from harness.prometheus import Prometheus, PrometheusMissing
from harness.s3 import S3Server
from harness.tools import ToolsMissing, find_bin_dir


@dataclass
class K8sCluster:
    control_plane: ControlPlane
    node_name: str

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    @property
    def api_url(self) -> str:
        return self.control_plane.api_url

    @property
    def bin_dir(self) -> Path:
        return self.control_plane.bin_dir

    @property
    def log_dir(self) -> Path:
        return self.control_plane.log_dir

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl with this cluster's admin kubeconfig; raise if `check` fails."""
        return self.control_plane.kubectl(*args, check=check, timeout=timeout)

    def api_client(self) -> Any:
        """A kubernetes.client.ApiClient for this cluster (use it as a context manager)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


@dataclass
class ContainerdCluster(K8sCluster):
    node: ContainerdNode

    def load_image(self, source: str | Path) -> str:
        """Import an image (podman/buildah name or OCI/Docker archive) into the node."""
        return self.node.load_image(source)

    def probe_image(self) -> str:
        """The kt-probe test image (tests/harness/node/probe.go), loaded; returns its name."""
        return self.node.probe_image()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs the real control plane, S3 or Prometheus from harness.fixtures"
    )


@pytest.fixture(scope="session")
def tools_bin() -> Path:
    try:
        return find_bin_dir(build=True)
    except ToolsMissing as err:
        problem = str(err)
    pytest.fail(f"harness binaries unavailable: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def k8s_cluster(
    tools_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ContainerdCluster]:
    """The light real node's cluster: no kube-proxy, an image store of its own."""
    yield from _real_node_cluster(
        tools_bin, tmp_path_factory.mktemp("k8s-light"), "light-node", "containerd-light", False
    )


@pytest.fixture
def k8s_namespace(k8s_cluster: K8sCluster) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    k8s_cluster.kubectl("create", "namespace", name)

    # Pods are rejected until the service-account controller has made `default`.
    def has_default_sa() -> bool:
        status, _ = k8s_cluster.control_plane.get(
            f"/api/v1/namespaces/{name}/serviceaccounts/default"
        )
        return status == 200

    wait_until(has_default_sa, timeout=30, what=f"service account default in {name}")
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    install_exit_handlers()
    server = S3Server.start(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        try:
            prom = Prometheus.start(targets, tmp_path / f"prometheus-{len(started)}")
        except PrometheusMissing as err:
            pytest.fail(str(err), pytrace=False)
        started.append(prom)
        return prom

    yield start
    for prom in started:
        prom.stop()


@pytest.fixture(scope="session")
def containerd_cluster(
    tools_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ContainerdCluster]:
    """The main real node's cluster: kube-proxy, the shared image store."""
    # Only one node per host can run kube-proxy; without it, only Services of pods fail.
    yield from _real_node_cluster(
        tools_bin,
        tmp_path_factory.mktemp("k8s-containerd"),
        "containerd-node",
        "containerd",
        kube_proxy_available(),
    )


def _real_node_cluster(
    tools_bin: Path, state_dir: Path, name: str, store: str, kube_proxy: bool
) -> Iterator[ContainerdCluster]:
    """A control plane of its own plus one real node (kubelet + containerd), stopped after."""
    install_exit_handlers()
    control_plane = ControlPlane(state_dir=state_dir, bin_dir=tools_bin)
    node = ContainerdNode(
        control_plane,
        state_dir=state_dir / "nodes" / name,
        name=name,
        store_name=store,
        kube_proxy=kube_proxy,
    )
    control_plane.start()
    try:
        try:
            node.start()
        except NodeUnavailable as err:
            pytest.fail(f"real node unavailable: {err}", pytrace=False)
        yield ContainerdCluster(control_plane=control_plane, node_name=node.name, node=node)
    finally:
        node.stop()
        control_plane.stop()
    left = node.leftovers()
    assert not left, f"the node {name} left behind: {left}"
