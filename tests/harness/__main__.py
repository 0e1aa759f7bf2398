"""Bring a test cluster up or down from the shell, detached from this process (as root).

    PYTHONPATH=tests python -m harness up [--state-dir DIR] [--gpus 2] [--no-kube-proxy]
    eval "$(PYTHONPATH=tests python -m harness up)"   # KUBECONFIG, AWS_*, S3_ENDPOINT_FROM_PODS
    PYTHONPATH=tests python -m harness load-image IMAGE_OR_ARCHIVE... [--state-dir DIR]
    PYTHONPATH=tests python -m harness down [--state-dir DIR]

`up` starts a control plane (etcd, kube-apiserver, controller manager, scheduler), one real
node (harness.containerd_node: a kubelet with containerd, runc and CNI, CoreDNS and kube-proxy;
docs/test-cluster.md) and an S3 server on loopback, which pods reach at the node's bridge
address (S3_ENDPOINT_FROM_PODS). No registry is reachable: pods run images that `load-image`
imported from podman's storage (`make images`) or from an OCI/Docker archive.

The state dir (default ${KUBETUNE_CLUSTER_DIR:-/tmp/kubetune-cluster}) holds the PKI,
kubeconfigs, etcd data, logs/ and state.json with the pids and the node's description; `down`
stops it all and removes the node's mounts, cgroups, bridge and iptables rules.
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
from typing import Any

from harness._proc import kill_process_groups
from harness.cluster import ControlPlane
from harness.containerd_node import (
    ContainerdNode,
    NodeImages,
    NodeUnavailable,
    preflight,
    stop_detached,
)
from harness.node.teardown import mounts_under
from harness.s3 import S3Server
from harness.tools import ToolsMissing, find_bin_dir

NODE = "containerd-node"
STATE_FILE = "state.json"


def _default_state_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CLUSTER_DIR") or "/tmp/kubetune-cluster")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    state_file = state_dir / STATE_FILE
    return json.loads(state_file.read_text()) if state_file.exists() else None


def _exports(state: dict[str, Any]) -> str:
    """Shell lines for `eval`: the kubeconfig and S3 settings, then comments on them."""
    s3 = state["s3"]
    env = {"KUBECONFIG": str(state["kubeconfig"]), **s3["env"]}
    env["S3_ENDPOINT_FROM_PODS"] = s3["s3_from_pods"]
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f"# S3 on the host: {s3['endpoint_url']}; from pods: {s3['s3_from_pods']}")
    lines.append("# (only these keys work: the server checks signatures)")
    return "\n".join(lines)


def _hints(state_dir: Path, log_dir: Path) -> str:
    where = "" if state_dir == _default_state_dir() else f" --state-dir {state_dir}"
    return "\n".join(
        [
            f"# cluster up: node {NODE} (kubelet + containerd); logs in {log_dir}",
            "# pods run only loaded images (no registry), e.g.:",
            f"#   python -m harness load-image localhost/kubetune/trainer:dev{where}",
            f"# stop with: python -m harness down{where}",
        ]
    )


def _start(state_dir: Path, bin_dir: Path, gpus: int, kube_proxy: bool) -> dict[str, Any]:
    """Start everything; return the state `down` needs. Stops what it started on failure."""
    control_plane = ControlPlane(state_dir=state_dir, bin_dir=bin_dir)
    node = ContainerdNode(
        control_plane,
        state_dir=state_dir / "nodes" / NODE,
        name=NODE,
        gpus=gpus,
        kube_proxy=kube_proxy,
    )
    # moto takes seconds to import: start it while the control plane comes up.
    pool = ThreadPoolExecutor(max_workers=1)
    s3_future = pool.submit(S3Server.start, control_plane.log_dir)
    pool.shutdown(wait=False)
    try:
        control_plane.start()
        node.start()
        s3 = s3_future.result()
        assert s3.process is not None
        port = int(s3.endpoint_url.rsplit(":", 1)[1])
        s3_from_pods = f"http://{node.expose_host_port(port)}"
    except BaseException:
        with contextlib.suppress(Exception):  # it may still be starting: wait, then stop it
            s3_future.result().stop()
        node.stop()
        control_plane.stop()
        raise
    return {
        "pids": control_plane.pids() | node.pids() | {s3.process.name: s3.process.pid},
        "kubeconfig": str(control_plane.kubeconfig),
        "api_url": control_plane.api_url,
        "log_dir": str(control_plane.log_dir),
        "s3": {
            "endpoint_url": s3.endpoint_url,
            "access_key": s3.access_key,
            "env": s3.env(),
            "s3_from_pods": s3_from_pods,
        },
        "containerd_node": node.description(),
    }


def up(state_dir: Path, gpus: int = 2, kube_proxy: bool = True) -> int:
    """Start the cluster unless it runs already; print its settings for `eval`."""
    state = _read_state(state_dir)
    if state is not None:
        if "containerd_node" in state and all(_alive(pid) for pid in state["pids"].values()):
            print("# already up", file=sys.stderr)
            print(_exports(state))
            return 0
        down(state_dir)  # a half-dead (or older kind of) cluster: clear it first
    try:
        bin_dir = find_bin_dir(build=True)
        preflight(kube_proxy)  # before the control plane: fail in a second, not a minute
    except (ToolsMissing, NodeUnavailable) as err:
        print(f"harness up: {err}", file=sys.stderr)
        return 1
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        state = _start(state_dir, bin_dir, gpus, kube_proxy)
    except Exception as err:
        print(f"harness up: failed: {err}\n(logs: {state_dir / 'logs'})", file=sys.stderr)
        return 1
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    print(_hints(state_dir, Path(state["log_dir"])), file=sys.stderr)
    print(_exports(state))
    return 0


def down(state_dir: Path) -> int:
    """Stop the cluster in `state_dir` and remove what it left; 0 when nothing is left."""
    state = _read_state(state_dir)
    if state is None:
        print(f"harness down: nothing running (no {state_dir / STATE_FILE})", file=sys.stderr)
        return 0
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


def load_images(state_dir: Path, sources: list[str]) -> int:
    """Import images into the running node's containerd; print the names pods use."""
    state = _read_state(state_dir) or {}
    if "containerd_node" not in state:
        print(
            f"harness load-image: no cluster in {state_dir}: start one with `python -m harness up`"
            " (or pass its --state-dir)",
            file=sys.stderr,
        )
        return 1
    images = NodeImages.of(state["containerd_node"])
    for source in sources:
        try:
            print(images.load(source))
        except (ValueError, RuntimeError) as err:
            print(f"harness load-image: {err}", file=sys.stderr)
            return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=_default_state_dir())
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", parents=[common], help="start the cluster")
    start.add_argument("--gpus", type=int, default=2, help="nvidia.com/gpu capacity of the node")
    start.add_argument(
        "--kube-proxy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run kube-proxy (default); only one node per host may, and without it Services "
        "of pods do not work",
    )
    commands.add_parser("down", parents=[common], help="stop it and remove what it made")
    load = commands.add_parser(
        "load-image", parents=[common], help="import images into the node's containerd"
    )
    load.add_argument("sources", nargs="+", help="podman image name or OCI/Docker archive")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state_dir = args.state_dir.resolve()
    if args.command == "up":
        return up(state_dir, args.gpus, args.kube_proxy)
    if args.command == "load-image":
        return load_images(state_dir, args.sources)
    return down(state_dir)


if __name__ == "__main__":
    sys.exit(main())
