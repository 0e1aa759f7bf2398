"""Bring a test cluster up or down from the shell, detached from this process.

    PYTHONPATH=tests python -m harness up [--state-dir DIR] [--gpus 2]
    eval "$(PYTHONPATH=tests python -m harness up)"     # sets KUBECONFIG and AWS_* here
    PYTHONPATH=tests python -m harness down [--state-dir DIR]

The state dir (default ${KUBETUNE_CLUSTER_DIR:-/tmp/kubetune-cluster}) holds the PKI,
kubeconfigs, etcd data, logs/ and state.json with the pids that `down` stops.
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
    note = f"# S3 endpoint {s3['endpoint_url']} (only these keys work: it checks signatures)"
    return "\n".join([*lines, note])


def up(state_dir: Path, gpus: str) -> int:
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
    # moto takes seconds to import: start it while the control plane comes up.
    pool = ThreadPoolExecutor(max_workers=1)
    s3_future = pool.submit(S3Server.start, control_plane.log_dir)
    pool.shutdown(wait=False)
    try:
        control_plane.start()
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
        control_plane.stop()
        print(f"harness up: failed: {err}", file=sys.stderr)
        return 1
    pids = control_plane.pids() | {proc.name: proc.pid for proc in extra}
    state = {
        "pids": pids,
        "kubeconfig": str(control_plane.kubeconfig),
        "api_url": control_plane.api_url,
        "s3": {"endpoint_url": s3.endpoint_url, "access_key": s3.access_key, "env": s3.env()},
    }
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
    pids: dict[str, int] = json.loads(state_file.read_text())["pids"]
    # All at once: each component shuts down cleanly on SIGTERM without the others.
    kill_process_groups(list(pids.values()), grace=5.0)
    print(f"stopped {', '.join(f'{name} ({pid})' for name, pid in pids.items())}", file=sys.stderr)
    shutil.rmtree(state_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--state-dir", type=Path, default=_default_state_dir())
    parser.add_argument("--gpus", default="2", help="nvidia.com/gpu capacity of the process node")
    args = parser.parse_args(argv)
    state_dir = args.state_dir.resolve()
    return up(state_dir, args.gpus) if args.command == "up" else down(state_dir)


if __name__ == "__main__":
    sys.exit(main())
