"""Bring a test cluster up or down from the shell, detached from this process.

    PYTHONPATH=tests python -m harness up [--state-dir DIR] [--gpus 2]
        [--node process|containerd [--kube-proxy]]
    eval "$(PYTHONPATH=tests python -m harness up)"     # sets KUBECONFIG and AWS_* here
    PYTHONPATH=tests python -m harness down [--state-dir DIR]
    PYTHONPATH=tests python -m harness load-image IMAGE_OR_ARCHIVE [--state-dir DIR]

The state dir (default ${KUBETUNE_CLUSTER_DIR:-/tmp/kubetune-cluster}) holds the PKI,
kubeconfigs, etcd data, logs/ and state.json with the pids that `down` stops.

--node containerd (root) runs a real kubelet with containerd (harness.containerd_node) instead
of the process node; `down` then also removes its mounts, cgroups, bridge and iptables rules.
`load-image` imports an image from podman's storage (or an OCI/Docker archive) into it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness._proc import ManagedProcess, kill_process_groups
from harness.cluster import ControlPlane, start_process_node, wait_node_ready
from harness.containerd_node import ContainerdNode, NodeImages, stop_detached
from harness.node.teardown import mounts_under
from harness.s3 import S3Server
from harness.tools import ToolsMissing, find_bin_dir

NODE_NAME = "process-node"


def _default_state_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CLUSTER_DIR") or "/tmp/kubetune-cluster")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _exports(state: dict[str, object]) -> str:
    env = {"KUBECONFIG": str(state["kubeconfig"])}
    s3 = state["s3"]
    assert isinstance(s3, dict)
    env.update(s3["env"])
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    notes = [f"# S3 endpoint {s3['endpoint_url']} (only these keys work: it checks signatures)"]
    if "s3_from_pods" in s3:
        notes.append(f"# pods on the containerd node reach S3 at {s3['s3_from_pods']}")
    return "\n".join([*lines, *notes])


def up(state_dir: Path, gpus: str, node_kind: str = "process", kube_proxy: bool = False) -> int:
    state_file = state_dir / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if all(_alive(pid) for pid in state["pids"].values()):
            print("# already up", file=sys.stderr)
            print(_exports(state))
            return 0
        down(state_dir)
    try:
        bin_dir = find_bin_dir(build=True)
    except ToolsMissing as err:
        print(f"harness up: {err}", file=sys.stderr)
        return 1
    state_dir.mkdir(parents=True, exist_ok=True)
    control_plane = ControlPlane(state_dir=state_dir, bin_dir=bin_dir)
    extra: list[ManagedProcess] = []
    node: ContainerdNode | None = None
    # moto takes seconds to import: start it while the control plane comes up.
    pool = ThreadPoolExecutor(max_workers=1)
    s3_future = pool.submit(S3Server.start, control_plane.log_dir)
    pool.shutdown(wait=False)
    try:
        control_plane.start()
        if node_kind == "containerd":
            node = ContainerdNode(
                control_plane,
                state_dir=state_dir / "nodes" / "containerd-node",
                gpus=int(gpus),
                kube_proxy=kube_proxy,
            )
            node.start()
        else:
            extra.append(start_process_node(control_plane, name=NODE_NAME, gpus=gpus))
            wait_node_ready(control_plane, NODE_NAME)
        s3 = s3_future.result()
        assert s3.process is not None
        extra.append(s3.process)
    except BaseException as err:
        with contextlib.suppress(Exception):  # it may still be starting: wait, then stop it
            s3_future.result().stop()
        for proc in extra:
            proc.stop()
        if node is not None:
            node.stop()
        control_plane.stop()
        print(f"harness up: failed: {err}", file=sys.stderr)
        return 1
    pids = control_plane.pids() | {proc.name: proc.pid for proc in extra}
    s3_state: dict[str, object] = {
        "endpoint_url": s3.endpoint_url,
        "access_key": s3.access_key,
        "env": s3.env(),
    }
    state = {
        "pids": pids,
        "kubeconfig": str(control_plane.kubeconfig),
        "api_url": control_plane.api_url,
        "s3": s3_state,
    }
    if node is not None:
        pids.update(node.pids())
        port = int(s3.endpoint_url.rsplit(":", 1)[1])
        s3_state["s3_from_pods"] = f"http://{node.expose_host_port(port)}"
        state["containerd_node"] = node.description()
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    print(
        f"# cluster up; logs in {control_plane.log_dir}; stop with: python -m harness down",
        file=sys.stderr,
    )
    print(_exports(state))
    return 0


def down(state_dir: Path) -> int:
    state_file = state_dir / "state.json"
    if not state_file.exists():
        print(f"harness down: nothing running ({state_file} not found)", file=sys.stderr)
        return 0
    state = json.loads(state_file.read_text())
    pids: dict[str, int] = state["pids"]
    if "containerd_node" in state:  # its own order (kubelet, containers, containerd), then sweep
        stop_detached(state["containerd_node"])
    # All at once: each component shuts down cleanly on SIGTERM without the others.
    kill_process_groups(list(pids.values()), grace=5.0)
    print(f"stopped {', '.join(f'{name} ({pid})' for name, pid in pids.items())}", file=sys.stderr)
    if mounts := mounts_under(state_dir):  # never rm -rf through a mount (a hostPath volume)
        print(f"harness down: kept {state_dir}: still mounted: {mounts}", file=sys.stderr)
        return 1
    shutil.rmtree(state_dir, ignore_errors=True)
    return 0


def load_image(state_dir: Path, source: str) -> int:
    state_file = state_dir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if "containerd_node" not in state:
        print(
            f"harness load-image: no containerd node in {state_dir} (`up --node containerd`)",
            file=sys.stderr,
        )
        return 1
    print(NodeImages.of(state["containerd_node"]).load(source))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "load-image"])
    parser.add_argument("source", nargs="?", help="load-image: podman image name or archive")
    parser.add_argument("--state-dir", type=Path, default=_default_state_dir())
    parser.add_argument("--gpus", default="2", help="nvidia.com/gpu capacity of the node")
    parser.add_argument(
        "--node",
        choices=["process", "containerd"],
        default="process",
        help="process: pods as host processes (default); containerd: a real kubelet (root)",
    )
    parser.add_argument(
        "--kube-proxy",
        action="store_true",
        help="with --node containerd: also run kube-proxy, so pods reach Services of pods",
    )
    args = parser.parse_args(argv)
    state_dir = args.state_dir.resolve()
    if args.command == "load-image":
        if not args.source:
            parser.error("load-image needs an image name or archive")
        return load_image(state_dir, args.source)
    if args.command == "up":
        return up(state_dir, args.gpus, args.node, args.kube_proxy)
    return down(state_dir)


if __name__ == "__main__":
    sys.exit(main())
