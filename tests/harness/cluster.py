"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, controller manager, scheduler.

    from harness.cluster import ControlPlane
    cp = ControlPlane(state_dir=Path("/tmp/cp"), bin_dir=find_bin_dir())
    cp.start()            # returns when /readyz is ok and the default service account exists
    ...                   # cp.kubeconfig is an admin (system:masters) kubeconfig
    cp.stop()

Binaries come from scripts/build-tools.sh (see harness.tools). Every component listens on a
free 127.0.0.1 port and keeps its data and logs under `state_dir`, so several control planes
can run side by side. There is no kubelet here: harness.containerd_node adds the node (a real
kubelet with containerd). For a control plane plus node and S3 from the shell, use
`python -m harness up`.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import pki
from harness._proc import ManagedProcess, free_port, log_tail, wait_until

SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT = 120.0  # seconds; a cold API server on a busy 2-core machine needs ~20s


@dataclass
class ControlPlane:
    state_dir: Path
    bin_dir: Path
    processes: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_dir = self.state_dir.resolve()
        self.pki_dir = self.state_dir / "pki"
        self.log_dir = self.state_dir / "logs"
        self.kubeconfig = self.state_dir / "admin.kubeconfig"
        self.api_port = 0
        self.api_url = ""

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_pki()
        try:
            self._start_etcd()
            self._start_apiserver()  # it retries etcd until that is up
            # Not earlier: the controller manager exits if RBAC's bootstrap roles are missing.
            self._wait_api_ready()
            self._start_controller_manager()
            self._start_scheduler()
            self._wait_default_service_account()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        # Reverse order: controllers first, etcd last, so nothing logs errors about a lost peer.
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def restart_apiserver(
        self, down_seconds: float = 0.0, while_down: Callable[[], object] | None = None
    ) -> None:
        """Stop the API server, call ``while_down``, wait ``down_seconds``, start it again.

        It comes back on the same port, so clients keep their kubeconfig; a node or an
        operator must ride through the gap.
        """
        index = next(i for i, p in enumerate(self.processes) if p.name == "kube-apiserver")
        self.processes.pop(index).stop()
        if while_down is not None:
            while_down()
        time.sleep(down_seconds)
        self._start_apiserver(port=self.api_port)
        self.processes.insert(index, self.processes.pop())  # its place in the stop order
        self._wait_api_ready()
        self._wait_controllers_watching()

    def _wait_controllers_watching(self, timeout: float = 180.0) -> None:
        """Until the controller manager acts on new objects again (its watches back off).

        The next test's namespace needs its ``default`` ServiceAccount within seconds.
        """
        probe = f"probe-{os.urandom(4).hex()}"
        self.kubectl("create", "namespace", probe)
        try:
            wait_until(
                lambda: self.get(f"/api/v1/namespaces/{probe}/serviceaccounts/default")[0] == 200,
                timeout=timeout,
                what="the controller manager to act again after the API server restart",
                interval=0.5,
            )
        finally:
            self.kubectl("delete", "namespace", probe, "--wait=false", check=False)

    def pids(self) -> dict[str, int]:
        return {proc.name: proc.pid for proc in self.processes}

    def check_running(self) -> None:
        for proc in self.processes:
            proc.check_running()

    # -- PKI and kubeconfigs -------------------------------------------------------------

    def _write_pki(self) -> None:
        self.ca = pki.CertificateAuthority(self.pki_dir)
        hosts = (
            "127.0.0.1",
            "localhost",
            "10.0.0.1",  # the `kubernetes` Service's ClusterIP: first address of SERVICE_CIDR
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
        self.serving = self.ca.issue("apiserver", "kube-apiserver", hosts=hosts, server=True)
        self.sa_keys = pki.write_service_account_keys(self.pki_dir)
        self.kubelet_client = self.ca.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            organization="system:masters",
        )
        self.admin = self.ca.issue("admin", "kubetune-admin", organization="system:masters")
        self.kcm = self.ca.issue("controller-manager", "system:kube-controller-manager")
        self.scheduler = self.ca.issue("scheduler", "system:kube-scheduler")

    def write_kubeconfig(self, path: Path, user: str, pair: pki.CertPair) -> Path:
        """A kubeconfig at `path` for `user`, authenticating with `pair` (a cert of this CA)."""
        # JSON is valid YAML, and both kubectl and the Python client read it.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetune-test",
                    "cluster": {
                        "server": self.api_url,
                        "certificate-authority": str(self.ca.cert_path),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {"client-certificate": str(pair.cert), "client-key": str(pair.key)},
                }
            ],
            "contexts": [
                {"name": "kubetune-test", "context": {"cluster": "kubetune-test", "user": user}}
            ],
            "current-context": "kubetune-test",
        }
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)
        return path

    # -- components ----------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.log_dir / f"{name}.log")
        self.processes.append(proc)
        return proc

    def _start_etcd(self) -> None:
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=default",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                # Test data is disposable: skipping fsync makes every API write much faster.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

    def _start_apiserver(self, port: int = 0) -> None:
        self.api_port = port or free_port()
        self.api_url = f"https://127.0.0.1:{self.api_port}"
        self.write_kubeconfig(self.kubeconfig, "kubetune-admin", self.admin)
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--tls-cert-file={self.serving.cert}",
                f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={self.ca.cert_path}",
                "--authorization-mode=Node,RBAC",
                # On top of the default plugins (which include ServiceAccount and PodSecurity).
                "--enable-admission-plugins=NodeRestriction",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # The `kubernetes` Service's endpoint would be 127.0.0.1, which Endpoints reject
                # (loopback); with no kube-proxy it would carry no traffic anyway.
                "--endpoint-reconciler-type=none",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={self.sa_keys.cert}",
                f"--service-account-signing-key-file={self.sa_keys.key}",
                # `kubectl logs` goes API server -> the node's log endpoint on 127.0.0.1.
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={self.kubelet_client.cert}",
                f"--kubelet-client-key={self.kubelet_client.key}",
                f"--kubelet-certificate-authority={self.ca.cert_path}",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )

    def _start_controller_manager(self) -> None:
        kubeconfig = self.write_kubeconfig(
            self.state_dir / "controller-manager.kubeconfig",
            "system:kube-controller-manager",
            self.kcm,
        )
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--controllers=*",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.sa_keys.key}",
                f"--root-ca-file={self.ca.cert_path}",
                f"--cluster-signing-cert-file={self.ca.cert_path}",
                f"--cluster-signing-key-file={self.ca.key_path}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Tests create many objects quickly; the default client rate limit (20 qps) shows.
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "--v=1",
            ],
        )

    def _start_scheduler(self) -> None:
        kubeconfig = self.write_kubeconfig(
            self.state_dir / "scheduler.kubeconfig", "system:kube-scheduler", self.scheduler
        )
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--v=1",
            ],
        )

    # -- readiness -----------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        ctx.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return ctx

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET an API path as the admin user; returns (status, body)."""
        request = urllib.request.Request(self.api_url + path)
        try:
            with urllib.request.urlopen(
                request, context=self._ssl_context(), timeout=timeout
            ) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def _wait_api_ready(self) -> None:
        def ready() -> bool:
            self.check_running()
            status, _ = self.get("/readyz")
            return status == 200

        try:
            wait_until(ready, timeout=START_TIMEOUT, what="kube-apiserver /readyz", interval=0.25)
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n{log_tail(self.log_dir / 'kube-apiserver.log')}") from None

    def _wait_default_service_account(self) -> None:
        # The service-account controller (in the controller manager) creates `default` in every
        # namespace; seeing it proves the controller manager is up and talking to the API.
        def exists() -> bool:
            self.check_running()
            status, _ = self.get("/api/v1/namespaces/default/serviceaccounts/default")
            return status == 200

        wait_until(exists, timeout=START_TIMEOUT, what="the controller manager", interval=0.25)

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this control plane and capture its output."""
        result = subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result


def wait_node_ready(control_plane: ControlPlane, name: str, timeout: float = 60.0) -> None:
    """Wait until Node `name` is Ready and the node controller has lifted its not-ready taint."""

    def ready() -> bool:
        control_plane.check_running()
        status, body = control_plane.get(f"/api/v1/nodes/{name}")
        if status != 200:
            return False
        node = json.loads(body)
        conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        taints = node.get("spec", {}).get("taints") or []
        return conditions.get("Ready") == "True" and not taints

    wait_until(ready, timeout=timeout, what=f"node {name} to be Ready and untainted", interval=0.25)
