"""A real node for the test control plane: a kubelet, containerd, runc and CNI on this host.

    from harness.containerd_node import ContainerdNode
    node = ContainerdNode(control_plane, state_dir=control_plane.state_dir / "nodes" / "cn")
    node.start()        # returns when the Node is Ready, untainted and has nvidia.com/gpu
    node.load_image("localhost/kubetune/trainer:dev")   # from podman/buildah, or an archive
    ...
    node.stop()         # leaves no process, mount, netns, cgroup, bridge or iptables rule

What it needs (root; `scripts/install-system-deps.sh` and `scripts/build-tools.sh`): kubelet,
containerd, ctr, containerd-shim-runc-v2, coredns (built from the Go module proxy), pause and
kt-probe (built from tests/harness/node/), Debian's runc and CNI plugins (/usr/lib/cni),
iptables, ip.

How the node is made (docs/test-cluster.md has the why and the traps):

- Network: the harness creates the bridge (the first free `kt-cni<N>`, 10.213.<N>.1/24)
  before anything starts; the CNI bridge plugin plugs each pod's veth into it and host-local
  hands out the addresses. Pods get no default route, only the pod subnet and the Service
  CIDR via the bridge, so they reach nothing but each other and the host. The bridge address
  is the Node's InternalIP (the kubelet refuses a loopback one) and where the kubelet serves.
  An iptables DNAT chain of this node sends the `kubernetes` Service (10.0.0.1:443) to the API
  server on 127.0.0.1 (with route_localnet on the bridge), and `expose_host_port` does the
  same for any loopback service of the host (e.g. the S3 server) at the bridge address.
- containerd: root, state, runc root, shim sockets, network namespaces, CNI config and IPAM
  all under the state dir (or a short /run/kubetune-* dir for the shim sockets, which must
  fit in 42 characters). Its image store lives in ~/.cache/kubetune/node/containerd (override:
  KUBETUNE_NODE_CACHE), so big images survive between runs; one node at a time holds it
  (flock), another gets a private store under its state dir.
- kube-proxy (optional, `kube_proxy=True`; one node per host) for Services of pods.
- Cluster DNS (`cluster_dns=True`, the default): CoreDNS on the host, listening on the bridge
  address, port 53, with the `kubernetes` plugin and no upstream (harness.node.dns); it is
  the kubelet's clusterDNS, so pods resolve Services and the `<hostname>.<subdomain>` names
  of a headless Service's pods (Indexed Jobs: `<job>-<index>.<service>`).
- Sandbox image: `localhost/kubetune/pause:harness`, made here from the pause binary and
  imported before the kubelet starts; no pull is ever attempted (pods should use
  imagePullPolicy IfNotPresent or Never, and images loaded with `load_image`).
- kubelet: identity system:node:<name> with a client cert from the control plane's CA, a
  serving cert for the bridge address, webhook authn/authz (so `kubectl logs/exec` work
  through the API server), cgroupfs driver with a cgroup root of its own, failCgroupV1 false
  (this host is cgroup v1), eviction and image GC thresholds out of the way.
- nvidia.com/gpu: patched into the Node's status capacity, as for any extended resource.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import pki
from harness._proc import ManagedProcess, free_port, kill_process_group, log_tail, wait_until
from harness.cluster import SERVICE_CIDR, ControlPlane, wait_node_ready
from harness.node import dns, images, teardown
from harness.tools import BUILD_SCRIPT, REPO_ROOT, default_bin_dir

NODE_TOOLS = (
    "kubelet", "containerd", "ctr", "containerd-shim-runc-v2", "coredns", "pause", "kt-probe",
)  # fmt: skip
CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
RUNC = "runc"
PAUSE_IMAGE = "localhost/kubetune/pause:harness"
PROBE_IMAGE = "localhost/kubetune/kt-probe:harness"
BRIDGE_ALIAS = "kubetune node "  # + the state dir, on the node's bridge
K8S_NAMESPACE = "k8s.io"  # containerd namespace the CRI plugin uses
START_TIMEOUT = 180.0  # seconds, kubelet start to Node Ready (~10 s warm, more on a busy host)
# The kubelet sets these host sysctls when they differ (it would refuse to start with
# protectKernelDefaults); the node puts the old values back when the last node stops.
KERNEL_TUNABLES = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)


class NodeUnavailable(RuntimeError):
    """A prerequisite of the containerd node is missing; the message says what to run."""


def node_cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_NODE_CACHE") or Path.home() / ".cache/kubetune/node")


def find_node_bin_dir(*, build: bool = True) -> Path:
    """The tools bin dir with the node's binaries too; runs build-tools.sh when one is missing."""
    bin_dir = default_bin_dir()
    missing = [n for n in NODE_TOOLS if not os.access(bin_dir / n, os.X_OK)]
    if missing and build:
        result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
        if result.returncode == 0:
            bin_dir = Path(result.stdout.strip().splitlines()[-1])
            missing = [n for n in NODE_TOOLS if not os.access(bin_dir / n, os.X_OK)]
    if missing:
        script = BUILD_SCRIPT.relative_to(REPO_ROOT)
        raise NodeUnavailable(f"missing {', '.join(missing)} in {bin_dir}; run `bash {script}`")
    return bin_dir


def _kube_proxy_lock() -> Path:
    lock = node_cache_dir() / "kube-proxy.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    return lock


def kube_proxy_available() -> bool:
    """Whether no other node on this host runs kube-proxy (only one may: host-wide chains)."""
    with open(_kube_proxy_lock(), "wb") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def check_host() -> None:
    """Raise NodeUnavailable unless this host can run the node (root, runc, CNI, iptables)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (bridges, mounts, cgroups)")
    for tool in (RUNC, "iptables", "ip", "mount", "umount", "flock"):
        if shutil.which(tool) is None:
            problems.append(f"no {tool} on PATH")
    for plugin in CNI_PLUGINS:
        if not os.access(CNI_BIN_DIR / plugin, os.X_OK):
            problems.append(f"no CNI plugin {CNI_BIN_DIR / plugin}")
    if problems:
        raise NodeUnavailable(
            "; ".join(problems) + "; run `sudo bash scripts/install-system-deps.sh`"
        )


def preflight(kube_proxy: bool) -> Path:
    """Raise NodeUnavailable unless a node (with kube-proxy, if asked) can start on this host:
    root, runc, CNI, iptables, the node's binaries (built when one is missing) and, for
    kube-proxy, no other node holding it. Returns the binaries' dir."""
    check_host()
    bin_dir = find_node_bin_dir()
    if kube_proxy and not kube_proxy_available():
        raise NodeUnavailable(
            "another node on this host runs kube-proxy (its iptables chains are host-wide, so "
            "one node may have it): stop that cluster, or start this node without kube-proxy "
            "(`harness up --no-kube-proxy`, kube_proxy=False; then Services of pods carry no "
            "traffic)"
        )
    return bin_dir


@dataclass
class ContainerdNode:
    control_plane: ControlPlane
    state_dir: Path
    bin_dir: Path | None = None  # default: find_node_bin_dir()
    name: str = "containerd-node"
    # The node's bridge and pod subnet. None: the first free kt-cni<N> with 10.213.<N>.0/24,
    # so nodes of several clusters (tests, `python -m harness up`) can share a host.
    bridge: str | None = None  # at most 15 characters (a Linux interface name)
    pod_cidr: str | None = None  # a private range no other network on the host uses
    gpus: int = 2  # nvidia.com/gpu capacity (0: none)
    max_pods: int = 110
    image_store: Path | None = None  # default: the shared cache, else a private one
    # The shared cache's subdirectory: nodes that run side by side on one host (the two CI
    # streams) each keep their images between runs in a store of their own.
    store_name: str = "containerd"
    kube_proxy: bool = False  # Services between pods; one node per host may have it
    cluster_dns: bool = True  # CoreDNS on the bridge address as the pods' name server
    processes: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_dir = self.state_dir.resolve()
        if (self.bridge is None) != (self.pod_cidr is None):
            raise ValueError("give both `bridge` and `pod_cidr`, or neither")
        if self.bridge is not None and len(self.bridge) > 15:
            raise ValueError(f"bridge name {self.bridge!r} is longer than 15 characters")
        self.gateway = ""  # the bridge's address: the node IP and the pods' gateway
        self.api_service_ip = str(ipaddress.ip_network(SERVICE_CIDR)[1])
        self.log_dir = self.control_plane.log_dir
        self.pki_dir = self.state_dir / "pki"
        self.containerd_dir = self.state_dir / "containerd"
        self.socket = self.containerd_dir / "containerd.sock"
        self.kubelet_dir = self.state_dir / "kubelet"
        # Host-wide names: a digest of the state dir keeps two nodes apart. Shim sockets are
        # not under the state dir because containerd wants that dir in <= 42 characters.
        digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:10]
        self.cgroup_root = f"/kubetune-{digest}"
        self.shim_socket_dir = Path(f"/run/kubetune-{digest}")
        self.nat_chain = ""
        self._exposed: set[int] = set()  # host ports expose_host_port has made reachable
        self._started = False
        self.kube_proxy_config: Path | None = None
        self.image_root: Path | None = None  # containerd's root, once chosen

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start containerd and the kubelet; return once the Node is Ready with its GPUs."""
        bin_dir = preflight(self.kube_proxy)  # fail before making anything
        if self.bin_dir is None:
            self.bin_dir = bin_dir
        sweep_abandoned_nodes()
        self._claim_bridge()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._started = True
        try:
            _kernel_tunables_acquire(self.state_dir)
            self._setup_network()
            self._write_pki()
            self._start_containerd()
            self._remove_stale_containers()  # from an earlier run that crashed
            self._load_archive(self._pause_archive(), PAUSE_IMAGE)
            if self.cluster_dns:
                self._start_coredns()
            self._start_kubelet()
            wait_node_ready(self.control_plane, self.name, timeout=START_TIMEOUT)
            if self.kube_proxy:
                self._start_kube_proxy()
            self._advertise_gpus()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> list[str]:
        """Stop everything and remove what the node made on the host; returns what the
        final sweep removed (see harness.node.teardown). Safe to call twice."""
        if not self._started:
            return []
        by_name = {proc.name: proc for proc in self.processes}
        kubelet = by_name.get(f"{self.name}-kubelet")
        containerd = by_name.get(f"{self.name}-containerd")
        for component in ("kube-proxy", "coredns"):  # neither touches pods: stopped first
            if (proc := by_name.get(f"{self.name}-{component}")) is not None:
                proc.stop()
        removed = _teardown(
            self.description(),
            stop_kubelet=kubelet.stop if kubelet else lambda: None,
            stop_containerd=containerd.stop if containerd else lambda: None,
        )
        self.processes.clear()
        self._started = False
        return removed

    def description(self) -> dict[str, Any]:
        """JSON-able: what `stop_detached` needs to tear the node down from another process
        (`python -m harness down`)."""
        return {
            "name": self.name,
            "state_dir": str(self.state_dir),
            "bridge": self.bridge,
            "pod_cidr": self.pod_cidr,
            "cgroup_root": self.cgroup_root,
            "shim_socket_dir": str(self.shim_socket_dir),
            "socket": str(self.socket),
            "bin_dir": str(self.bin_dir),
            "log_dir": str(self.log_dir),
            "gateway": self.gateway,
            "kube_proxy_config": str(self.kube_proxy_config) if self.kube_proxy_config else None,
            "image_root": str(self.image_root) if self.image_root else None,
            "pids": self.pids(),
        }

    def leftovers(self) -> list[str]:
        """What of this node is still on the host (for tests: [] after stop())."""
        found = teardown.leftovers(_scope(self.description()))
        if self.shim_socket_dir.exists():
            found.append(f"shim socket dir {self.shim_socket_dir}")
        if self.kube_proxy:
            found += teardown.kube_proxy_lines()
        return found

    def check_running(self) -> None:
        for proc in self.processes:
            proc.check_running()

    def pids(self) -> dict[str, int]:
        return {proc.name: proc.pid for proc in self.processes}

    # -- network -------------------------------------------------------------------------

    def _claim_bridge(self) -> None:
        """Create the bridge; `ip link add` fails if the name is taken, so this is atomic."""
        if self.bridge is not None and self.pod_cidr is not None:
            wanted = [(self.bridge, self.pod_cidr)]
        else:
            wanted = [(f"kt-cni{n}", f"10.213.{n}.0/24") for n in range(64)]
        for bridge, cidr in wanted:
            if teardown.bridge_exists(bridge):
                continue
            result = subprocess.run(
                ["ip", "link", "add", bridge, "type", "bridge"], capture_output=True, text=True
            )
            if result.returncode == 0:
                self.bridge, self.pod_cidr = bridge, cidr
                self.gateway = str(ipaddress.ip_network(cidr)[1])
                self.nat_chain = _nat_chain(bridge)
                return
        raise NodeUnavailable(
            f"no free bridge among {wanted[0][0]}..{wanted[-1][0]}: other containerd nodes run, "
            "or crashed ones left theirs (`ip -br link | grep kt-cni`; `ip link del NAME`)"
        )

    def _setup_network(self) -> None:
        assert self.bridge is not None and self.pod_cidr is not None
        prefix = ipaddress.ip_network(self.pod_cidr).prefixlen
        # How sweep_abandoned_nodes finds the node if its harness process dies.
        _sh("ip", "link", "set", self.bridge, "alias", f"{BRIDGE_ALIAS}{self.state_dir}")
        _sh("ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        # Lets packets from the bridge be DNATed to 127.0.0.1 (the API server, host services);
        # per interface, so it goes away with the bridge.
        Path(f"/proc/sys/net/ipv4/conf/{self.bridge}/route_localnet").write_text("1\n")
        chain = self.nat_chain
        _sh("iptables", "-w", "-t", "nat", "-N", chain)
        _sh("iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-i", self.bridge, "-j", chain)
        # Processes on the host (the operator a test runs, as the chart's pod would) reach the
        # same bridge address as the pods, so a FineTuneJob's endpoints work for both.
        gateway = f"{self.gateway}/32"
        _sh("iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-d", gateway, "-j", chain)
        api_port = str(self.control_plane.api_port)
        self._dnat(self.api_service_ip, "443", api_port)

    def _dnat(self, address: str, port: str, host_port: str) -> None:
        _sh(
            "iptables", "-w", "-t", "nat", "-A", self.nat_chain,
            "-d", f"{address}/32", "-p", "tcp", "--dport", port,
            "-j", "DNAT", "--to-destination", f"127.0.0.1:{host_port}",
        )  # fmt: skip

    def expose_host_port(self, port: int) -> str:
        """Make a service on the host's 127.0.0.1:`port` reachable from pods (and from the
        host) at the bridge address; returns that "address:port". Once per port."""
        if port not in self._exposed:
            self._dnat(self.gateway, str(port), str(port))
            self._exposed.add(port)
        return f"{self.gateway}:{port}"

    def _write_cni_config(self) -> Path:
        conf_dir = self.state_dir / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        bridge = {
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": True,
            "ipMasq": False,  # nothing leaves the host: no NAT rules, no default route
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.pod_cidr, "gateway": self.gateway}]],
                "routes": [{"dst": SERVICE_CIDR}],  # via the gateway, for the DNAT above
                "dataDir": str(self.state_dir / "cni" / "ipam"),
            },
        }
        config = {"cniVersion": "1.0.0", "name": f"kubetune-{self.name}", "plugins": [bridge]}
        (conf_dir / "10-kubetune.conflist").write_text(json.dumps(config, indent=2) + "\n")
        return conf_dir

    # -- PKI -----------------------------------------------------------------------------

    def _write_pki(self) -> None:
        ca = self.control_plane.ca  # exists once the control plane has started
        self.ca_cert = ca.cert_path
        # The Node authorizer and NodeRestriction know a kubelet by this name and group.
        self.client_cert = ca.issue(
            f"{self.name}-kubelet-client", f"system:node:{self.name}", organization="system:nodes"
        )
        # The API server dials the Node's InternalIP (the bridge address) for logs and exec.
        self.serving_cert = ca.issue(
            f"{self.name}-kubelet-serving",
            f"system:node:{self.name}",
            hosts=(self.gateway, self.name, "127.0.0.1", "localhost"),
            server=True,
        )
        self.kubeconfig = self._write_kubeconfig("kubelet", self.client_cert)

    def _write_kubeconfig(self, component: str, pair: pki.CertPair) -> Path:
        path = self.control_plane.write_kubeconfig(
            self.state_dir / f"{component}.kubeconfig", f"{self.name}-{component}", pair
        )
        return path

    # -- cluster DNS ---------------------------------------------------------------------

    def _start_coredns(self) -> None:
        """CoreDNS on the bridge address: pods reach it on their own subnet, no DNAT needed."""
        assert self.bin_dir is not None
        self.processes.append(
            dns.start_coredns(
                self.control_plane,
                name=self.name,
                address=self.gateway,
                state_dir=self.state_dir,
                bin_dir=self.bin_dir,
                log_dir=self.log_dir,
            )
        )

    # -- kube-proxy ----------------------------------------------------------------------

    def _start_kube_proxy(self) -> None:
        """kube-proxy in iptables mode, so pods reach Services backed by pods.

        Its chains (KUBE-SERVICES, ...) have fixed names in the host's tables, so one node per
        host may run it: a host-wide lock, held by flock(1) as long as kube-proxy runs.
        """
        assert self.bin_dir is not None
        if not kube_proxy_available():
            raise NodeUnavailable(
                "another node on this host runs kube-proxy (its iptables chains are host-wide); "
                "start this node with kube_proxy=False"
            )
        lock = _kube_proxy_lock()
        # Bound by the bootstrap ClusterRoleBinding system:node-proxier.
        cert = self.control_plane.ca.issue(f"{self.name}-kube-proxy", "system:kube-proxy")
        healthz = free_port()
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self._write_kubeconfig("kube-proxy", cert))},
            "mode": "iptables",
            "hostnameOverride": self.name,
            "clusterCIDR": self.pod_cidr,
            "bindAddress": "127.0.0.1",
            "healthzBindAddress": f"127.0.0.1:{healthz}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [f"{self.gateway}/32"],
            # Leave the host's sysctls alone: no route_localnet for all interfaces, no
            # conntrack table size or timeouts.
            "iptables": {"localhostNodePorts": False},
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }
        self.kube_proxy_config = self.state_dir / "kube-proxy-config.json"
        self.kube_proxy_config.write_text(json.dumps(config, indent=2) + "\n")
        self.processes.append(
            ManagedProcess(
                f"{self.name}-kube-proxy",
                [
                    "flock", "--nonblock", "--close", str(lock),
                    str(self.bin_dir / "kube-proxy"), f"--config={self.kube_proxy_config}", "--v=1",
                ],
                self.log_dir / f"{self.name}-kube-proxy.log",
                env=_host_env(self.bin_dir),
            )
        )  # fmt: skip

        def synced() -> bool:  # /healthz is 200 once the first sync wrote the rules
            self.check_running()
            url = f"http://127.0.0.1:{healthz}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)

        wait_until(synced, timeout=60, what="kube-proxy's first iptables sync", interval=0.25)

    # -- containerd ----------------------------------------------------------------------

    def _choose_image_store(self) -> tuple[Path, Path | None]:
        """(containerd root, lock file to hold while containerd runs, if shared)."""
        if self.image_store is not None:
            return self.image_store, None
        cache = node_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        lock = cache / f"{self.store_name}.lock"
        with open(lock, "wb") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another node's containerd uses the cache: go private
                return self.containerd_dir / "root", None
        return cache / self.store_name, lock

    def _write_containerd_config(self) -> Path:
        root = self.image_root
        if len(str(self.socket)) > 100:
            raise NodeUnavailable(f"state dir too deep for a unix socket path: {self.socket}")
        q = json.dumps  # a TOML basic string is a JSON string
        cri_runtime = "plugins.'io.containerd.cri.v1.runtime'"
        runc_options = f"{cri_runtime}.containerd.runtimes.runc.options"
        config = f"""\
# Written by harness.containerd_node for node {self.name}; nothing outside {self.state_dir}
# except the image store ({root}) and the shim sockets ({self.shim_socket_dir}).
version = 3
root = {q(str(root))}
state = {q(str(self.containerd_dir / "state"))}
temp = {q(str(self.containerd_dir / "tmp"))}
imports = []
# Unused snapshotters and services, some of which would create dirs under /var or /opt.
disabled_plugins = [
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.differ.v1.erofs",
  "io.containerd.mount-handler.v1.erofs",
  "io.containerd.nri.v1.nri",
  "io.containerd.image-verifier.v1.bindir",
]

[grpc]
  address = {q(str(self.socket))}

[ttrpc]
  address = {q(str(self.socket) + ".ttrpc")}

[plugins.'io.containerd.internal.v1.opt']
  path = {q(str(self.containerd_dir / "opt"))}

[plugins.'io.containerd.shim.v1.manager']
  socket_dir = {q(str(self.shim_socket_dir))}

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = {q(PAUSE_IMAGE)}

[{cri_runtime}]
  # Network namespaces under the state dir, not /var/run/netns, so teardown finds them.
  netns_mounts_under_state_dir = true
  # No CAP_SYS_RESOURCE here: never ask for an oom_score_adj below containerd's own.
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  [{cri_runtime}.containerd]
    default_runtime_name = "runc"
    [{cri_runtime}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{runc_options}]
        BinaryName = {q(shutil.which(RUNC) or RUNC)}
        Root = {q(str(self.state_dir / "runc"))}
        SystemdCgroup = false
  [{cri_runtime}.cni]
    bin_dirs = [{q(str(CNI_BIN_DIR))}]
    conf_dir = {q(str(self._write_cni_config()))}
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""
        path = self.containerd_dir / "config.toml"
        path.write_text(config)
        return path

    def _start_containerd(self) -> None:
        assert self.bin_dir is not None
        for sub in ("state", "tmp", "opt"):
            (self.containerd_dir / sub).mkdir(parents=True, exist_ok=True)
        self.image_root, lock = self._choose_image_store()
        config = self._write_containerd_config()
        env = _host_env(self.bin_dir)
        env["TMPDIR"] = str(self.containerd_dir / "tmp")  # unpack mounts land here
        argv = [str(self.bin_dir / "containerd"), f"--config={config}", "--log-level=warn"]
        if lock is not None:
            # flock(1) holds the shared store's lock exactly as long as containerd runs, also
            # when the process that started it is gone (`python -m harness up`).
            argv = ["flock", "--nonblock", "--close", str(lock), *argv]
        self.processes.append(
            ManagedProcess(
                f"{self.name}-containerd",
                argv,
                self.log_dir / f"{self.name}-containerd.log",
                env=env,
            )
        )

        def serving() -> bool:
            self.check_running()
            return self.ctr("version", check=False, timeout=10).returncode == 0

        wait_until(serving, timeout=60, what="containerd to serve", interval=0.2)

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120.0, namespace: str = K8S_NAMESPACE
    ) -> subprocess.CompletedProcess[str]:
        """Run ctr against this node's containerd (in the CRI's namespace by default)."""
        assert self.bin_dir is not None
        return _ctr(self.bin_dir, self.socket, *args, check=check, timeout=timeout, ns=namespace)

    def _remove_stale_containers(self) -> None:
        assert self.bin_dir is not None
        _remove_containers(self.bin_dir, self.socket)

    # -- images --------------------------------------------------------------------------

    @property
    def images(self) -> NodeImages:
        assert self.bin_dir is not None, "start() the node first"
        return NodeImages(self.bin_dir, self.socket)

    def _pause_archive(self) -> Path:
        assert self.bin_dir is not None
        archive = self.state_dir / "images" / "pause.tar"
        images.write_binary_image(archive, PAUSE_IMAGE, self.bin_dir / "pause", "/pause")
        return archive

    def _load_archive(self, archive: Path, ref: str) -> str:
        return self.images.load_archive(archive, ref)

    def probe_image(self) -> str:
        """Load the kt-probe test image (see tests/harness/node/probe.go); returns its name."""
        assert self.bin_dir is not None
        archive = self.state_dir / "images" / "kt-probe.tar"
        images.write_binary_image(
            archive, PROBE_IMAGE, self.bin_dir / "kt-probe", "/kt-probe", user="65534:65534"
        )
        return self._load_archive(archive, PROBE_IMAGE)

    def load_image(self, source: str | Path) -> str:
        """Import an image into the node's containerd; see NodeImages.load."""
        return self.images.load(source)

    # -- kubelet -------------------------------------------------------------------------

    def _prepare_cgroups(self) -> None:
        """The kubelet wants its cgroupRoot to exist in every hierarchy; cpuset needs values."""
        for hierarchy in sorted(teardown.CGROUP_MOUNT.iterdir()):
            if hierarchy.is_symlink() or not hierarchy.is_dir():
                continue
            path = hierarchy / self.cgroup_root.lstrip("/")
            path.mkdir(exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (hierarchy / knob).exists():
                    (path / knob).write_text((hierarchy / knob).read_text())

    def _write_kubelet_config(self, port: int, healthz_port: int) -> Path:
        resolv = self.state_dir / "resolv.conf"
        # The "host" resolv.conf pods inherit (dnsPolicy Default, and the search domains of
        # ClusterFirst ones): no server, as pods have no route to the host's name servers.
        resolv.write_text("# no DNS on the kubetune test node but its cluster DNS\n")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # this host mounts cgroup v1 (unified only as a side mount)
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": self.gateway,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            "tlsCertFile": str(self.serving_cert.cert),
            "tlsPrivateKeyFile": str(self.serving_cert.key),
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "podLogsDir": str(self.state_dir / "pod-logs"),
            "volumePluginDir": str(self.state_dir / "volume-plugins"),
            "resolvConf": str(resolv),
            "clusterDomain": "cluster.local",
            # ClusterFirst pods get this server and search <ns>.svc.cluster.local first.
            "clusterDNS": [self.gateway] if self.cluster_dns else [],
            "maxPods": self.max_pods,
            # A shared, busy disk must not evict test pods; nor may GC delete loaded images.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
                "imagefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "failSwapOn": False,
            "oomScoreAdj": 0,  # lowering it needs CAP_SYS_RESOURCE
            "makeIPTablesUtilChains": False,
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "5s",
            "shutdownGracePeriod": "0s",
        }
        path = self.state_dir / "kubelet-config.json"
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    def _start_kubelet(self) -> None:
        assert self.bin_dir is not None
        self._prepare_cgroups()
        config = self._write_kubelet_config(port=free_port(), healthz_port=free_port())
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        self.processes.append(
            ManagedProcess(
                f"{self.name}-kubelet",
                [
                    str(self.bin_dir / "kubelet"),
                    f"--config={config}",
                    f"--kubeconfig={self.kubeconfig}",
                    f"--hostname-override={self.name}",
                    f"--node-ip={self.gateway}",
                    f"--root-dir={self.kubelet_dir}",
                    f"--cert-dir={self.pki_dir}",
                    "--node-labels=kubetune.io/containerd-node=true",
                    "--v=1",
                ],
                self.log_dir / f"{self.name}-kubelet.log",
                env=_host_env(self.bin_dir),
            )
        )

    def _advertise_gpus(self) -> None:
        if self.gpus <= 0:
            return
        gpus = str(self.gpus)
        # Extended resources: the documented way is to PATCH the Node's status capacity; the
        # kubelet then keeps them and mirrors them into allocatable on its next update.
        patch = {"status": {"capacity": {"nvidia.com/gpu": gpus}}}
        self.control_plane.kubectl(
            "patch", "node", self.name, "--subresource=status", "--type=merge",
            f"--patch={json.dumps(patch)}",
        )  # fmt: skip

        def allocatable() -> bool:
            status, body = self.control_plane.get(f"/api/v1/nodes/{self.name}")
            node = json.loads(body) if status == 200 else {}
            return bool(node.get("status", {}).get("allocatable", {}).get("nvidia.com/gpu") == gpus)

        wait_until(allocatable, timeout=60, what=f"nvidia.com/gpu in {self.name}'s allocatable")

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {proc.log_path}\n{log_tail(proc.log_path)}" for proc in self.processes
        )


@dataclass(frozen=True)
class NodeImages:
    """The images of a node's containerd (namespace k8s.io, the one the CRI plugin uses)."""

    bin_dir: Path
    socket: Path

    @classmethod
    def of(cls, node: dict[str, Any]) -> NodeImages:
        """For a node known only by its `description()` (e.g. from the CLI's state.json)."""
        return cls(Path(node["bin_dir"]), Path(node["socket"]))

    def ctr(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        return _ctr(self.bin_dir, self.socket, *args, check=check, timeout=timeout).stdout

    def config_digest(self, ref: str) -> str | None:
        """The config digest (image ID) containerd has for `ref`, or None."""
        listing = self.ctr("images", "ls", f"name=={ref}", check=False).splitlines()
        if len(listing) < 2:
            return None
        digest = listing[1].split()[2]
        while True:  # down through indexes to the linux/amd64 manifest
            blob = self.ctr("content", "get", digest, check=False)
            if not blob:
                return None
            document: dict[str, Any] = json.loads(blob)
            if "manifests" not in document:
                return str(document["config"]["digest"])
            amd64 = [
                m
                for m in document["manifests"]
                if m.get("platform", {}).get("architecture", "amd64") == "amd64"
            ]
            if not amd64:
                return None
            digest = amd64[0]["digest"]

    def load(self, source: str | Path) -> str:
        """Import an image; returns the name pods use (with imagePullPolicy Never/IfNotPresent).

        `source` is an OCI or Docker archive (`podman save`, `skopeo copy ... oci-archive:`)
        that names its image in full, or the name of an image in podman's/buildah's storage
        (exported with `podman save --format oci-archive`). Skipped when containerd already
        has that name with the same image ID (config digest), so a second load is ~0.1 s.
        """
        path = Path(source)
        if path.is_file():
            found = images.read_archive(path)
            full = [name for name in found.names if "/" in name]
            if not full:
                raise ValueError(
                    f"{path}: the archive names no full image reference (found {found.names}); "
                    "save it with its full name, e.g. `podman save --format oci-archive "
                    "localhost/kubetune/trainer:dev`"
                )
            return self.load_archive(path, full[0], found.config_digest)
        ref = str(source)
        inspect = subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Id}}", ref],
            capture_output=True,
            text=True,
            check=False,
        )
        if inspect.returncode != 0:
            raise ValueError(
                f"{ref}: not a file and not an image in podman's storage "
                f"({inspect.stderr.strip()}); build it first (scripts/build-images.sh)"
            )
        image_id = "sha256:" + inspect.stdout.strip()
        if self.config_digest(ref) == image_id:
            return ref
        return self.stream_from_podman(ref, image_id)

    def stream_from_podman(self, ref: str, image_id: str) -> str:
        """`podman save | ctr import -`: the image goes through a pipe, never to disk.

        A docker-archive, because podman writes it as it goes (an oci-archive is assembled in
        a temporary directory first, so nothing would flow until the whole image is written):
        the import runs while the save does, which halves the time for the 6.5 GB trainer.
        The archive keeps the config, so the image ID, as it is; uncompressed, because gzip
        is the slow part of a save and the import unpacks at once anyway.
        """
        argv = [str(self.bin_dir / "ctr"), f"--address={self.socket}"]
        argv += [f"--namespace={K8S_NAMESPACE}", "images", "import", "--local"]
        argv += ["--discard-unpacked-layers", "--platform=linux/amd64", "-"]
        with (
            tempfile.TemporaryFile() as save_errors,
            subprocess.Popen(
                ["podman", "save", "--quiet", "--uncompressed", "--format=docker-archive", ref],
                stdout=subprocess.PIPE,
                stderr=save_errors,
            ) as save,
        ):
            assert save.stdout is not None
            imported = subprocess.run(
                argv, stdin=save.stdout, capture_output=True, text=True, timeout=3600, check=False
            )
            save.stdout.close()
            saved = save.wait(timeout=600)
            save_errors.seek(0)
            errors = save_errors.read().decode(errors="replace")
        if saved != 0 or imported.returncode != 0:
            raise RuntimeError(
                f"podman save {ref} | ctr images import - failed ({saved}, "
                f"{imported.returncode}): {errors} {imported.stderr}"
            )
        if self.config_digest(ref) != image_id:
            listing = self.ctr("images", "ls", "-q")
            raise RuntimeError(
                f"imported {ref} but containerd has no such image; it has:\n{listing}"
            )
        return ref

    def load_archive(self, archive: Path, ref: str, config_digest: str | None = None) -> str:
        """Import `archive`, whose image is named `ref`, unless containerd already has it."""
        if config_digest is None:
            config_digest = images.read_archive(archive).config_digest
        if self.config_digest(ref) == config_digest:
            return ref
        # Unpacked into overlayfs snapshots right away (the first pod does not wait for it),
        # then the layer blobs are dropped: only the snapshots take disk space. --local
        # imports in this process rather than through containerd's transfer service, which
        # is also several times faster here.
        self.ctr(
            "images", "import", "--local", "--discard-unpacked-layers", "--platform=linux/amd64",
            str(archive), timeout=3600,
        )  # fmt: skip
        if self.config_digest(ref) != config_digest:
            listing = self.ctr("images", "ls", "-q")
            raise RuntimeError(
                f"imported {archive} but containerd has no {ref}; it has:\n{listing}"
            )
        return ref


def _nat_chain(bridge: str) -> str:
    return f"KT-{bridge.upper()}"  # iptables chain names: at most 28 characters


def _scope(node: dict[str, Any]) -> teardown.NodeScope:
    """Where a node's things are, from its `description()`."""
    state_dir, shim_dir = Path(node["state_dir"]), Path(node["shim_socket_dir"])
    image_root = node.get("image_root")
    return teardown.NodeScope(
        state_dir=state_dir,
        cgroup_root=node["cgroup_root"],
        bridge=node["bridge"] or "",  # None: the node failed before it claimed one
        nat_chain=_nat_chain(node["bridge"]) if node["bridge"] else "",
        markers=(str(state_dir), str(shim_dir)),
        mount_dirs=(Path(image_root) / "tmpmounts",) if image_root else (),
    )


def _ctr(
    bin_dir: Path, socket: Path, *args: str, check: bool, timeout: float, ns: str = K8S_NAMESPACE
) -> subprocess.CompletedProcess[str]:
    argv = [str(bin_dir / "ctr"), f"--address={socket}", f"--namespace={ns}", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def _remove_containers(bin_dir: Path, socket: Path) -> None:
    """Kill and remove every CRI container and sandbox (tasks, snapshots, metadata).

    The image store may persist between runs; this keeps an earlier run's pods out of it, and
    lets each shim exit on its own (removing its socket) before containerd stops.
    """

    def ctr(*args: str) -> str:
        return _ctr(bin_dir, socket, *args, check=False, timeout=60).stdout

    for task in ctr("tasks", "ls", "-q").split():
        ctr("tasks", "kill", "--all", "--signal=SIGKILL", task)
    for task in ctr("tasks", "ls", "-q").split():
        ctr("tasks", "delete", "--force", task)
    if containers := ctr("containers", "ls", "-q").split():
        ctr("containers", "delete", *containers)
    if sandboxes := ctr("sandboxes", "ls", "-q").split():
        ctr("sandboxes", "rm", "--force", *sandboxes)


def _teardown(
    node: dict[str, Any], *, stop_kubelet: Callable[[], None], stop_containerd: Callable[[], None]
) -> list[str]:
    state_dir = Path(node["state_dir"])
    shim_dir = Path(node["shim_socket_dir"])
    stop_kubelet()  # first: it would restart the containers we are about to remove
    with contextlib.suppress(Exception):  # containerd may be down already
        _remove_containers(Path(node["bin_dir"]), Path(node["socket"]))
    stop_containerd()
    removed = []
    if node.get("kube_proxy_config"):
        removed += teardown.remove_kube_proxy_rules(
            Path(node["bin_dir"]) / "kube-proxy", Path(node["kube_proxy_config"])
        )
    removed += teardown.sweep(_scope(node))
    shutil.rmtree(shim_dir, ignore_errors=True)
    _kernel_tunables_release(state_dir)
    log = Path(node["log_dir"]) / f"{node['name']}-teardown.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(f"removed {line}\n" for line in removed))
    return removed


def _runs_node_daemon(state_dir: str) -> bool:
    """Whether a kubelet or containerd of the node with this state dir is still running."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if Path(os.fsdecode(argv[0])).name in ("kubelet", "containerd") and any(
                state_dir in os.fsdecode(arg) for arg in argv
            ):
                return True
    return False


def sweep_abandoned_nodes() -> list[str]:
    """Tear down what nodes whose harness process died (SIGKILL, a crash) left behind.

    Such a node's bridge names its state dir in its alias; with no kubelet or containerd of
    that state dir running any more, everything else is found from there: its containers
    (still running under their shims), mounts, cgroups, bridge and nat chain.
    """
    removed: list[str] = []
    for link in sorted(Path("/sys/class/net").glob("kt-cni*")):
        alias = (link / "ifalias").read_text().strip() if (link / "ifalias").exists() else ""
        if not alias.startswith(BRIDGE_ALIAS):
            continue
        state_dir = alias.removeprefix(BRIDGE_ALIAS)
        if _runs_node_daemon(state_dir):
            continue
        digest = hashlib.sha256(state_dir.encode()).hexdigest()[:10]
        node = {
            "state_dir": state_dir,
            "shim_socket_dir": f"/run/kubetune-{digest}",
            "cgroup_root": f"/kubetune-{digest}",
            "bridge": link.name,
        }
        removed += teardown.sweep(_scope(node))
        shutil.rmtree(node["shim_socket_dir"], ignore_errors=True)
        _kernel_tunables_release(Path(state_dir))
    return removed


def stop_detached(node: dict[str, Any]) -> list[str]:
    """Tear down a node from its `description()`, e.g. one `python -m harness up` started."""
    pids = node["pids"]

    def stopper(component: str) -> Callable[[], None]:
        pid = pids.get(f"{node['name']}-{component}")
        return (lambda: kill_process_group(pid)) if pid else (lambda: None)

    stopper("kube-proxy")()
    stopper("coredns")()
    return _teardown(node, stop_kubelet=stopper("kubelet"), stop_containerd=stopper("containerd"))


def _sh(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
        )


def _host_env(bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # containerd finds its shim on PATH; the kubelet needs mount/umount.
    system = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", ""), system])
    return env


# -- host sysctls the kubelet changes --------------------------------------------------------


def _tunables_file() -> Path:
    return node_cache_dir() / "kernel-tunables.json"


@contextlib.contextmanager
def _tunables_locked() -> Any:
    path = _tunables_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = json.loads(path.read_text()) if path.exists() else None
        yield record, path


def _node_alive(state_dir: str) -> bool:
    scope = teardown.NodeScope(Path(state_dir), "/-", "-", "-", markers=(state_dir,))
    return bool(teardown.node_processes(scope))


def _kernel_tunables_acquire(state_dir: Path) -> None:
    """Record the host's values (once, for all nodes) and this node as a user of them."""
    with _tunables_locked() as (record, path):
        if record is None:
            values = {k: Path("/proc/sys", k).read_text().strip() for k in KERNEL_TUNABLES}
            record = {"values": values, "nodes": []}
        # Nodes that crashed without stop() hold nothing any more.
        record["nodes"] = [n for n in record["nodes"] if _node_alive(n)] + [str(state_dir)]
        path.write_text(json.dumps(record, indent=2) + "\n")


def _kernel_tunables_release(state_dir: Path) -> None:
    """Drop this node; the last live node puts the host's values back."""
    with _tunables_locked() as (record, path):
        if record is None:
            return
        record["nodes"] = [n for n in record["nodes"] if n != str(state_dir) and _node_alive(n)]
        if record["nodes"]:
            path.write_text(json.dumps(record, indent=2) + "\n")
            return
        for key, value in record["values"].items():
            with contextlib.suppress(OSError):
                Path("/proc/sys", key).write_text(value + "\n")
        path.unlink()
