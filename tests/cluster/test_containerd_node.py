"""The harness's real node (harness.containerd_node): kubelet + containerd + runc + CNI.

    PYTHONPATH=tests ~/.cache/kubetune/venv/bin/python -m pytest -m cluster \
        tests/cluster/test_containerd_node.py -q

Needs root and scripts/install-system-deps.sh; the binaries come from scripts/build-tools.sh.
Pods here use the kt-probe image (tests/harness/node/probe.go), which the harness builds and
imports itself, so nothing is pulled. The trainer image of this tree (`make images`) runs too.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import re
import subprocess
import textwrap
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from built_images import built_image

from harness._proc import wait_until
from harness.containerd_node import ContainerdNode
from harness.fixtures import ContainerdCluster

pytestmark = pytest.mark.cluster

RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": 65534,
    "runAsGroup": 65534,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.fixture
def namespace(containerd_cluster: ContainerdCluster) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    containerd_cluster.kubectl("create", "namespace", name)
    wait_until(
        lambda: (
            containerd_cluster.control_plane.get(
                f"/api/v1/namespaces/{name}/serviceaccounts/default"
            )[0]
            == 200
        ),
        timeout=30,
        what=f"service account default in {name}",
    )
    yield name
    containerd_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def probe_image(containerd_cluster: ContainerdCluster) -> str:
    return containerd_cluster.node.probe_image()


def probe_pod(
    name: str,
    image: str,
    args: list[str],
    *,
    resources: dict[str, Any] | None = None,
    restart: str = "Never",
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",  # loaded into the node; there is no registry
        "args": args,
        "securityContext": RESTRICTED,
    }
    if resources:
        container["resources"] = resources
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 2,
            "containers": [container],
        },
    }


def create(cluster: ContainerdCluster, namespace: str, manifest: dict[str, Any]) -> None:
    subprocess.run(
        ["kubectl", f"--kubeconfig={cluster.kubeconfig}", "-n", namespace, "create", "-f", "-"],
        input=json.dumps(manifest),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )


def get_pod(cluster: ContainerdCluster, namespace: str, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = json.loads(
        cluster.kubectl("-n", namespace, "get", "pod", name, "-o", "json").stdout
    )
    return pod


def wait_pod(
    cluster: ContainerdCluster,
    namespace: str,
    name: str,
    phases: tuple[str, ...],
    timeout: float = 90.0,
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        cluster.node.check_running()
        pod = get_pod(cluster, namespace, name)
        return pod if pod.get("status", {}).get("phase") in phases else None

    try:
        return wait_until(reached, timeout=timeout, what=f"pod {name} in {phases}", interval=0.5)
    except TimeoutError as err:
        describe = cluster.kubectl("-n", namespace, "describe", "pod", name, check=False).stdout
        raise AssertionError(f"{err}\n{describe}\n{cluster.node.log_tails()}") from None


def logs_contain(cluster: ContainerdCluster, namespace: str, name: str, text: str) -> str:
    def found() -> str | None:
        out = cluster.kubectl("-n", namespace, "logs", name, check=False).stdout
        return out if text in out else None

    return wait_until(found, timeout=30, what=f"{text!r} in the logs of {name}", interval=0.5)


def test_node_is_ready_with_containerd_2(containerd_cluster: ContainerdCluster) -> None:
    wide = containerd_cluster.kubectl("get", "nodes", "-o", "wide").stdout
    row = next(line for line in wide.splitlines() if line.startswith(containerd_cluster.node_name))
    assert " Ready " in row, wide
    assert re.search(r"containerd://v?2\.\d+\.\d+", row), wide
    node = json.loads(
        containerd_cluster.kubectl("get", "node", containerd_cluster.node_name, "-o", "json").stdout
    )
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.36.3"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    assert not node["spec"].get("taints")


def test_pod_runs_as_non_root_on_read_only_rootfs_and_reaches_the_api(
    containerd_cluster: ContainerdCluster, namespace: str, probe_image: str
) -> None:
    args = ["whoami", "say:hello from the containerd node", "api", "sleep"]
    create(containerd_cluster, namespace, probe_pod("probe", probe_image, args))
    pod = wait_pod(containerd_cluster, namespace, "probe", ("Running", "Failed", "Succeeded"))
    assert pod["status"]["phase"] == "Running", pod["status"]
    node = containerd_cluster.node
    assert node.pod_cidr is not None
    pod_ip = ipaddress.ip_address(pod["status"]["podIP"])
    assert pod_ip in ipaddress.ip_network(node.pod_cidr), pod["status"]

    logs = logs_contain(containerd_cluster, namespace, "probe", "gitVersion=")
    assert "uid=65534 gid=65534 rootfs=read-only" in logs
    assert "hello from the containerd node" in logs
    # Through the `kubernetes` Service address, DNATed to the API server on 127.0.0.1.
    assert "api 10.0.0.1:443 gitVersion=v1.36.3" in logs

    result = containerd_cluster.kubectl(
        "-n", namespace, "exec", "probe", "--", "/kt-probe", "say:exec works", "whoami"
    )
    assert result.stdout.splitlines() == ["exec works", "uid=65534 gid=65534 rootfs=read-only"]


def test_memory_limit_oom_kills_the_container(
    containerd_cluster: ContainerdCluster, namespace: str, probe_image: str
) -> None:
    limits = {"limits": {"memory": "64Mi", "cpu": "500m"}}
    manifest = probe_pod("hog", probe_image, ["alloc:512"], resources=limits)
    create(containerd_cluster, namespace, manifest)
    pod = wait_pod(containerd_cluster, namespace, "hog", ("Failed", "Succeeded"))
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Failed"
    assert terminated["reason"] == "OOMKilled", terminated
    assert terminated["exitCode"] == 137


def test_gpu_requests_schedule_up_to_capacity(
    containerd_cluster: ContainerdCluster, namespace: str, probe_image: str
) -> None:
    fits = probe_pod(
        "one-gpu", probe_image, ["say:got a gpu"], resources={"limits": {"nvidia.com/gpu": "1"}}
    )
    too_many = probe_pod(
        "three-gpus", probe_image, ["say:never"], resources={"limits": {"nvidia.com/gpu": "3"}}
    )
    create(containerd_cluster, namespace, fits)
    create(containerd_cluster, namespace, too_many)
    assert (
        wait_pod(containerd_cluster, namespace, "one-gpu", ("Succeeded", "Failed"))["status"][
            "phase"
        ]
        == "Succeeded"
    )

    def unschedulable() -> dict[str, Any] | None:
        pod = get_pod(containerd_cluster, namespace, "three-gpus")
        conditions = {c["type"]: c for c in pod["status"].get("conditions", [])}
        scheduled = conditions.get("PodScheduled", {})
        return scheduled if scheduled.get("reason") == "Unschedulable" else None

    condition = wait_until(unschedulable, timeout=30, what="three-gpus to be Unschedulable")
    assert condition["status"] == "False"
    assert "nvidia.com/gpu" in condition["message"]
    assert get_pod(containerd_cluster, namespace, "three-gpus")["status"]["phase"] == "Pending"


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def test_pod_reaches_a_loopback_service_of_the_host(
    containerd_cluster: ContainerdCluster, namespace: str, probe_image: str
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = containerd_cluster.node.expose_host_port(server.server_address[1])
        create(
            containerd_cluster, namespace, probe_pod("get", probe_image, [f"get:http://{address}/"])
        )
        pod = wait_pod(containerd_cluster, namespace, "get", ("Succeeded", "Failed"))
        logs = containerd_cluster.kubectl("-n", namespace, "logs", "get").stdout
        assert pod["status"]["phase"] == "Succeeded", logs
        assert "status=200 body=hello from the host" in logs
    finally:
        server.shutdown()


def test_pod_reaches_a_service_of_pods_through_kube_proxy(
    containerd_cluster: ContainerdCluster, namespace: str, probe_image: str
) -> None:
    if not containerd_cluster.node.kube_proxy:
        pytest.fail(
            "the node runs without kube-proxy: another node on this host has it "
            "(`python -m harness up`?)",
            pytrace=False,
        )
    server = probe_pod("web", probe_image, ["serve:8080"])
    server["metadata"]["labels"] = {"app": "web"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    create(containerd_cluster, namespace, server)
    create(containerd_cluster, namespace, service)
    wait_pod(containerd_cluster, namespace, "web", ("Running",))
    cluster_ip = containerd_cluster.kubectl(
        "-n", namespace, "get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"
    ).stdout
    create(
        containerd_cluster,
        namespace,
        probe_pod("client", probe_image, [f"get:http://{cluster_ip}/"]),
    )
    pod = wait_pod(containerd_cluster, namespace, "client", ("Succeeded", "Failed"))
    logs = containerd_cluster.kubectl("-n", namespace, "logs", "client").stdout
    assert pod["status"]["phase"] == "Succeeded", logs
    assert "status=200 body=kt-probe on web" in logs


# Each pod of an Indexed Job looks up both peers by the names their subdomain gives them, then
# pod 0 listens and pod 1 connects by name; a name outside cluster.local must fail at once.
PEERS_SCRIPT = textwrap.dedent(
    """\
    import os, socket, time
    index = int(os.environ["JOB_COMPLETION_INDEX"])
    job, service = os.environ["JOB"], os.environ["SERVICE"]
    print("resolv.conf:", " | ".join(open("/etc/resolv.conf").read().strip().splitlines()))
    deadline = time.monotonic() + 60  # the peer's record appears once its pod has an IP

    def retry(what, call):
        while True:
            try:
                return call()
            except OSError as err:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{what}: {err}")
                time.sleep(0.2)

    peers = [f"{job}-{i}.{service}" for i in range(2)]
    for name in ["kubernetes.default", *peers]:
        print(f"resolved {name} {retry(name, lambda: socket.gethostbyname(name))}", flush=True)
    start = time.monotonic()
    try:
        print(f"outside resolved {socket.gethostbyname('example.com')}")
    except socket.gaierror as err:
        print(f"outside failed in {time.monotonic() - start:.2f}s: {err.strerror}", flush=True)
    if index == 0:
        with socket.create_server(("", 7777)) as server:
            server.settimeout(60)
            conn, (peer, _) = server.accept()
            with conn:
                print(f"accepted {conn.recv(64).decode()} from {peer}")
                conn.sendall(b"hello from " + peers[0].encode())
    else:
        conn = retry("connect", lambda: socket.create_connection((peers[0], 7777), timeout=5))
        with conn:
            conn.sendall(b"hello from " + peers[1].encode())
            print(f"received {conn.recv(64).decode()}")
    """
)


def test_indexed_job_pods_find_each_other_by_name_through_cluster_dns(
    containerd_cluster: ContainerdCluster, namespace: str
) -> None:
    image = containerd_cluster.load_image(built_image("operator"))  # any image with python3
    # Headless, and publishing pods before they are Ready: peers need each other's names to
    # start at all (as torch.distributed's rendezvous on pod 0 does).
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "workers"},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"kubetune.io/peers": "peers"},
            "ports": [{"name": "peer", "port": 7777}],
        },
    }
    container = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["python3", "-c", PEERS_SCRIPT],
        "env": [{"name": "JOB", "value": "peers"}, {"name": "SERVICE", "value": "workers"}],
        "securityContext": RESTRICTED | {"runAsUser": 65532, "runAsGroup": 65532},
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "peers"},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"kubetune.io/peers": "peers"}},
                "spec": {
                    "subdomain": "workers",  # the pods' names: peers-<index>.workers
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 2,
                    "containers": [container],
                },
            },
        },
    }
    create(containerd_cluster, namespace, service)
    create(containerd_cluster, namespace, job)

    def finished() -> dict[str, Any] | None:
        containerd_cluster.node.check_running()
        status = json.loads(
            containerd_cluster.kubectl("-n", namespace, "get", "job", "peers", "-o", "json").stdout
        )["status"]
        done = status.get("succeeded", 0) == 2 or status.get("failed", 0) > 0
        return status if done else None

    status = wait_until(finished, timeout=180, what="job peers to finish", interval=0.5)
    pods = json.loads(
        containerd_cluster.kubectl(
            "-n", namespace, "get", "pods", "-l", "job-name=peers", "-o", "json"
        ).stdout
    )["items"]
    by_index = {
        int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]): p
        for p in pods
    }
    logs = {
        i: containerd_cluster.kubectl(
            "-n", namespace, "logs", p["metadata"]["name"], check=False
        ).stdout
        for i, p in by_index.items()
    }
    assert status.get("succeeded") == 2, f"{status}\n{logs}"
    gateway = containerd_cluster.node.gateway
    ips = {i: by_index[i]["status"]["podIP"] for i in (0, 1)}
    for i in (0, 1):
        assert f"nameserver {gateway}" in logs[i], logs[i]
        assert f"search {namespace}.svc.cluster.local svc.cluster.local" in logs[i], logs[i]
        assert "resolved kubernetes.default 10.0.0.1" in logs[i], logs[i]
        assert f"resolved peers-0.workers {ips[0]}" in logs[i], logs[i]
        assert f"resolved peers-1.workers {ips[1]}" in logs[i], logs[i]
        outside = re.search(r"outside failed in ([\d.]+)s", logs[i])
        assert outside and float(outside.group(1)) < 2.0, logs[i]  # NXDOMAIN, no upstream
    assert f"accepted hello from peers-1.workers from {ips[1]}" in logs[0], logs[0]
    assert "received hello from peers-0.workers" in logs[1], logs[1]


def test_trainer_image_runs_kubetune_version(
    containerd_cluster: ContainerdCluster, namespace: str
) -> None:
    image = containerd_cluster.load_image(built_image("trainer"))
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "trainer-version"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["kubetune", "--version"],
                    "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True},
                }
            ],
        },
    }
    create(containerd_cluster, namespace, pod)
    done = wait_pod(containerd_cluster, namespace, "trainer-version", ("Succeeded", "Failed"), 300)
    logs = containerd_cluster.kubectl("-n", namespace, "logs", "trainer-version").stdout
    assert done["status"]["phase"] == "Succeeded", logs
    assert re.search(r"\d+\.\d+", logs), logs


def test_stop_leaves_nothing_behind(
    containerd_cluster: ContainerdCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A second node on the same control plane: it picks the next free bridge and subnet, and
    # (the first holding the shared image store) gets an image store of its own.
    state_dir = tmp_path_factory.mktemp("second-node")
    node = ContainerdNode(
        containerd_cluster.control_plane, state_dir=state_dir, name="second-node", gpus=0
    )
    node.start()
    try:
        # Cordoned: its pod names it, and the scheduler must never send another test's pod to
        # a node that is about to go (one that did waited five minutes for an eviction).
        containerd_cluster.kubectl("cordon", node.name)
        image = node.probe_image()
        manifest = probe_pod("sleeper", image, ["say:up", "sleep"])
        manifest["spec"]["nodeName"] = node.name
        namespace = f"test-{uuid.uuid4().hex[:8]}"
        containerd_cluster.kubectl("create", "namespace", namespace)
        wait_until(
            lambda: (
                containerd_cluster.control_plane.get(
                    f"/api/v1/namespaces/{namespace}/serviceaccounts/default"
                )[0]
                == 200
            ),
            timeout=30,
            what="the default service account",
        )
        create(containerd_cluster, namespace, manifest)
        wait_pod(containerd_cluster, namespace, "sleeper", ("Running",))
        assert node.bridge != containerd_cluster.node.bridge
        assert node.image_root != containerd_cluster.node.image_root
        running = node.leftovers()  # the same probe must see a live node
        assert any(line.startswith("process") for line in running), running
        assert any("netns" in line for line in running), running
        assert any(line.startswith("bridge") for line in running), running
    finally:
        node.stop()
        # A node that leaves the cluster leaves the API too (as `kubectl drain` + delete would).
        containerd_cluster.kubectl("delete", "node", node.name, "--wait=false", check=False)
    assert node.leftovers() == []
    nodes = containerd_cluster.kubectl("get", "nodes", "-o", "name").stdout.split()
    assert nodes == [f"node/{containerd_cluster.node_name}"], nodes
