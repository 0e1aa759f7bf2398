"""The containerd node's cluster DNS: CoreDNS on the host, serving cluster.local to its pods.

    server = start_coredns(control_plane, name="containerd-node", address="10.213.0.1",
                           state_dir=..., bin_dir=..., log_dir=...)   # returns once synced
    ...                                  # the kubelet's clusterDNS is [address]
    server.stop()

CoreDNS (built by scripts/build-tools.sh) runs as a host process with its `kubernetes`
plugin, which watches Services, EndpointSlices and Namespaces through the API server, so pods
resolve `<service>.<namespace>.svc.cluster.local` and, for a headless Service, each pod's
`<hostname>.<subdomain>.<namespace>.svc.cluster.local` (an Indexed Job with `subdomain` set
gives its pods `<job>-<index>.<subdomain>`; the search path lets pods write just that).

It listens on the node's bridge address, port 53 (UDP and TCP): pods reach that address
directly on their own subnet, with no iptables rule, and each node has its own bridge
address, so several nodes on a host never contend for the port. It forwards nothing: names
outside cluster.local get NXDOMAIN at once, so no query leaves the host and a pod never waits
on a resolver it cannot reach.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from harness._proc import ManagedProcess, free_port, wait_until
from harness.cluster import ControlPlane

CLUSTER_DOMAIN = "cluster.local"
DNS_PORT = 53  # pods' resolv.conf has no port: it must be the standard one
READY_TIMEOUT = 60.0  # seconds, start to the kubernetes plugin's first sync (~1 s warm)
# What the kubernetes plugin lists and watches (without `pods verified`, no Pods).
RBAC_NAME = "kubetune:coredns"
RBAC_USER = "system:kubetune:coredns"
RBAC_RULES = [
    {"apiGroups": [""], "resources": ["services", "namespaces"], "verbs": ["list", "watch"]},
    {
        "apiGroups": ["discovery.k8s.io"],
        "resources": ["endpointslices"],
        "verbs": ["list", "watch"],
    },
]


def corefile(*, address: str, kubeconfig: Path, ready_port: int) -> str:
    """The Corefile: cluster.local (and reverse zones) from the API, NXDOMAIN for the rest."""
    return f"""\
# Written by harness.node.dns. Only this node's pods (on {address}) can ask; nothing is forwarded.
{CLUSTER_DOMAIN}:{DNS_PORT} in-addr.arpa:{DNS_PORT} ip6.arpa:{DNS_PORT} {{
    bind {address}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
    }}
}}
.:{DNS_PORT} {{
    bind {address}
    errors
    # No upstream: this host's pods must not reach the outside world, not even its resolvers.
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""


def rbac_manifest() -> dict[str, object]:
    """A ClusterRole with what CoreDNS reads, bound to the user of its client certificate."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": RBAC_NAME},
        "rules": RBAC_RULES,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": RBAC_NAME},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": RBAC_NAME,
        },
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": RBAC_USER}],
    }
    return {"apiVersion": "v1", "kind": "List", "items": [role, binding]}


def start_coredns(
    control_plane: ControlPlane,
    *,
    name: str,
    address: str,
    state_dir: Path,
    bin_dir: Path,
    log_dir: Path,
) -> ManagedProcess:
    """Start CoreDNS for the node `name` on `address`:53; return once it has synced.

    The ClusterRole and its binding are cluster objects that several nodes share (`apply` is
    idempotent); they go with the control plane. Everything on the host is the process and
    files under `state_dir`, whose path is in its argv, so the node's sweep finds it too.
    """
    dns_dir = state_dir / "coredns"
    dns_dir.mkdir(parents=True, exist_ok=True)
    rbac = dns_dir / "rbac.json"
    rbac.write_text(json.dumps(rbac_manifest(), indent=2) + "\n")
    control_plane.kubectl("apply", f"--filename={rbac}")
    cert = control_plane.ca.issue(f"{name}-coredns", RBAC_USER)
    kubeconfig = control_plane.write_kubeconfig(dns_dir / "kubeconfig", RBAC_USER, cert)
    ready_port = free_port()
    config = dns_dir / "Corefile"
    config.write_text(corefile(address=address, kubeconfig=kubeconfig, ready_port=ready_port))
    process = ManagedProcess(
        f"{name}-coredns",
        [str(bin_dir / "coredns"), "-conf", str(config)],
        log_dir / f"{name}-coredns.log",
        cwd=dns_dir,
    )

    def ready() -> bool:  # 200 once the kubernetes plugin has listed everything
        process.check_running()
        with urllib.request.urlopen(f"http://127.0.0.1:{ready_port}/ready", timeout=2) as resp:
            return bool(resp.status == 200)

    try:
        wait_until(ready, timeout=READY_TIMEOUT, what=f"CoreDNS on {address}", interval=0.2)
    except BaseException:
        process.stop()
        raise
    return process
