"""One pod's life on the process node: sandbox, init containers, containers, status, deletion.

A `PodRunner` owns a thread that takes a pod bound to the node from Pending to Succeeded or
Failed, running each container as a local process group (the image is ignored) and writing
kubelet-shaped status back to the API. Used by harness.process_node; not meant to be run directly.

Restart backoff (restartPolicy OnFailure/Always) starts at `BACKOFF_START` seconds and doubles up
to `BACKOFF_MAX`, shorter than the kubelet's 10s..300s so tests stay fast.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import pod_spec
from harness._proc import kill_process_group

if TYPE_CHECKING:
    from harness.process_node import ProcessNode

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerRun:
    """One container (init or regular) and its current process, if any."""

    spec: Mapping[str, Any]
    dir: Path
    popen: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    restart_count: int = 0
    state: dict[str, Any] = field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    restart_at: float | None = None  # monotonic time of the next restart, while backing off
    done: bool = False

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def termination_file(self) -> Path:
        return self.dir / "termination-log"

    def log_path(self, attempt: int | None = None) -> Path:
        return self.dir / "logs" / f"{self.restart_count if attempt is None else attempt}.log"

    def status(self) -> dict[str, Any]:
        running = "running" in self.state
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "containerID": f"process://{self.popen.pid}" if self.popen else "",
            "ready": running,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }


class PodRunner:
    def __init__(self, node: ProcessNode, pod: pod_spec.Pod) -> None:
        self.node = node
        self.pod = pod
        meta = pod["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.sandbox = node.root_dir / "pods" / self.uid
        self.wake = threading.Event()
        self.gone = False  # the API object is deleted: nothing left to report to
        spec = pod["spec"]
        self.init_runs = [
            ContainerRun(c, self.sandbox / "init" / c["name"])
            for c in spec.get("initContainers") or []
        ]
        self.runs = [
            ContainerRun(c, self.sandbox / "containers" / c["name"])
            for c in spec.get("containers") or []
        ]
        self.phase = "Pending"
        self.reason = ""
        self.message = ""
        self.start_time = now_rfc3339()
        self.conditions: dict[str, tuple[str, str, str]] = {}  # type -> (status, reason, since)
        # One status write at a time, in order: a write retried through an API server restart
        # must not land after (and undo) a newer one.
        self._publish_lock = threading.Lock()
        self.thread = threading.Thread(
            target=self._run, name=f"pod-{self.namespace}-{self.name}", daemon=True
        )

    # -- called from the watch thread ----------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def update(self, pod: pod_spec.Pod) -> None:
        self.pod = pod
        self.wake.set()
        if not self.thread.is_alive() and pod["metadata"].get("deletionTimestamp"):
            # Finished before the delete arrived: nothing to kill, just let the object go.
            self.node.delete_pod_now(pod)

    def deleted(self) -> None:
        self.gone = True
        self.wake.set()
        if not self.thread.is_alive():
            shutil.rmtree(self.sandbox, ignore_errors=True)

    def find(self, container: str) -> ContainerRun | None:
        return next((r for r in self.init_runs + self.runs if r.name == container), None)

    @property
    def deleting(self) -> bool:
        return self.gone or bool(self.pod["metadata"].get("deletionTimestamp"))

    # -- the pod's thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            outcome = self._lifecycle()
        except Exception as err:
            self.node.log(f"pod {self.namespace}/{self.name}: internal error {err!r}")
            self.kill_all()
            outcome = "Failed"
            self.reason, self.message = "ProcessNodeError", repr(err)
        if outcome in ("Succeeded", "Failed"):
            self.phase = outcome
        elif any(r.exit_code is not None for r in self.init_runs + self.runs):
            # Deleted after it ran: like the kubelet, report the terminal phase it reached.
            codes = [r.exit_code for r in self.init_runs + self.runs]
            self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        self._publish()
        if self.deleting:
            self._finish_deletion()

    def _lifecycle(self) -> str:
        self._set_condition("Initialized", "False", "ContainersNotInitialized")
        self._set_condition("ContainersReady", "False", "ContainersNotReady")
        self._set_condition("Ready", "False", "ContainersNotReady")
        volumes = self._prepare_volumes()
        if volumes is None:
            return "deleted"
        for run in self.init_runs:
            outcome = self._supervise([run], volumes, init=True)
            if outcome != "Succeeded":
                return outcome
        self._set_condition("Initialized", "True", "")
        outcome = self._supervise(self.runs, volumes, init=False)
        self._set_condition("ContainersReady", "False", "PodCompleted")
        self._set_condition("Ready", "False", "PodCompleted")
        return outcome

    def _prepare_volumes(self) -> dict[str, Path] | None:
        """Materialize volumes, retrying while a referenced ConfigMap/Secret is missing."""
        delay = BACKOFF_START
        while not self.deleting:
            try:
                return pod_spec.materialize_volumes(
                    self.pod,
                    self.sandbox,
                    self.node.lookup,
                    self._request_token,
                    self.node.root_dir,
                )
            except pod_spec.PodConfigError as err:
                self._wait_all("CreateContainerConfigError", str(err))
                self.wake.wait(delay)
                self.wake.clear()
                delay = min(delay * 2, BACKOFF_MAX)
        return None

    def _request_token(self, source: Mapping[str, Any]) -> str:
        return self.node.request_token(self.pod, source)

    def _supervise(self, runs: list[ContainerRun], volumes: dict[str, Path], *, init: bool) -> str:
        """Run `runs` until all are done; returns Succeeded, Failed or deleted.

        A passed activeDeadlineSeconds returns Failed with reason DeadlineExceeded set.
        """
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for run in runs:
            if not self._start_container(run, volumes):
                return "deleted" if self.deleting else "Failed"
        self.phase = "Running" if not init else "Pending"
        self._publish()
        while True:
            if self.deleting:
                self.kill_all()
                return "deleted"
            if self._deadline_passed():
                self.kill_all()
                self.reason, self.message = "DeadlineExceeded", DEADLINE_MESSAGE
                return "Failed"
            changed = False
            for run in runs:
                if (
                    run.popen is not None
                    and not run.done
                    and run.restart_at is None
                    and run.popen.poll() is not None
                ):
                    self._record_exit(run)
                    # Like a runtime tearing down the container: no stray children survive.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(run.popen.pid, signal.SIGKILL)
                    failed = run.exit_code != 0
                    if (policy == "Always" and not init) or (policy != "Never" and failed):
                        run.restart_at = time.monotonic() + min(
                            BACKOFF_START * 2**run.restart_count, BACKOFF_MAX
                        )
                        run.last_state, run.state = (
                            run.state,
                            {"waiting": {"reason": "CrashLoopBackOff"}},
                        )
                    else:
                        run.done = True
                    changed = True
                if run.restart_at is not None and time.monotonic() >= run.restart_at:
                    run.restart_at = None
                    run.restart_count += 1
                    if not self._start_container(run, volumes):
                        return "deleted" if self.deleting else "Failed"
                    changed = True
            if not init:
                ready = all("running" in r.state for r in runs)
                status, reason = ("True", "") if ready else ("False", "ContainersNotReady")
                changed |= self._set_condition("ContainersReady", status, reason)
                changed |= self._set_condition("Ready", status, reason)
            if all(r.done for r in runs):
                return "Failed" if any(r.exit_code for r in runs) else "Succeeded"
            if changed:
                self._publish()
            self.wake.wait(0.2)
            self.wake.clear()

    def _start_container(self, run: ContainerRun, volumes: dict[str, Path]) -> bool:
        while not self.deleting:
            try:
                argv, env, cwd = self._container_process(run, volumes)
                break
            except pod_spec.PodConfigError as err:
                run.state = {
                    "waiting": {"reason": "CreateContainerConfigError", "message": str(err)}
                }
                self._publish()
                self.wake.wait(BACKOFF_START * 2)
                self.wake.clear()
        else:
            return False
        run.log_path().parent.mkdir(parents=True, exist_ok=True)
        run.termination_file.unlink(missing_ok=True)
        run.started_at = now_rfc3339()
        try:
            with open(run.log_path(), "ab") as log:
                run.popen = subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                )
        except OSError as err:
            # Like a container runtime that cannot exec the entrypoint: exit code 128.
            run.popen = None
            run.exit_code = 128
            run.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": str(err),
                    "startedAt": run.started_at,
                    "finishedAt": now_rfc3339(),
                }
            }
            run.done = True
            return False
        threading.Thread(target=self._wait_exit, args=(run.popen,), daemon=True).start()
        run.state = {"running": {"startedAt": run.started_at}}
        run.exit_code = None
        self.node.log(
            f"pod {self.namespace}/{self.name}: started {run.name} "
            f"pid {run.popen.pid}: {shlex.join(argv)}"
        )
        return True

    def _wait_exit(self, popen: subprocess.Popen[bytes]) -> None:
        popen.wait()
        self.wake.set()

    def _container_process(
        self, run: ContainerRun, volumes: dict[str, Path]
    ) -> tuple[list[str], dict[str, str], Path]:
        spec = run.spec
        env = pod_spec.container_env(self.pod, spec, self.node.lookup)
        run.dir.mkdir(parents=True, exist_ok=True)
        paths = pod_spec.container_path_map(spec, volumes, run.termination_file, env)
        env = {k: paths.rewrite(v) for k, v in env.items()}
        argv = [
            paths.rewrite(pod_spec.expand_vars(a, env))
            for a in (spec.get("command") or []) + (spec.get("args") or [])
        ]
        if not argv:
            raise pod_spec.PodConfigError(
                f"container {run.name}: no command (images are ignored, so one is required)"
            )
        workdir = run.dir / "workdir"
        if spec.get("workingDir"):
            mapped = Path(paths.rewrite(spec["workingDir"]))
            # An unmounted absolute workingDir would be the image's; give it a private copy.
            workdir = (
                mapped
                if mapped.is_relative_to(self.sandbox) or mapped.exists()
                else run.dir / "rootfs" / mapped.relative_to("/")
            )
        workdir.mkdir(parents=True, exist_ok=True)
        full_env = pod_spec.host_env(self.node.passthrough_env)
        full_env.update(self.node.service_env)
        full_env["HOSTNAME"] = self.name
        full_env.update(env)
        return argv, full_env, workdir

    def _record_exit(self, run: ContainerRun) -> None:
        assert run.popen is not None
        code = run.popen.wait()
        run.exit_code = (
            128 - code if code < 0 else code
        )  # killed by signal N -> 128+N, like a runtime
        terminated: dict[str, Any] = {
            "exitCode": run.exit_code,
            "reason": "Completed" if run.exit_code == 0 else "Error",
            "startedAt": run.started_at,
            "finishedAt": now_rfc3339(),
            "containerID": f"process://{run.popen.pid}",
        }
        message = self._termination_message(run)
        if message:
            terminated["message"] = message
        run.state = {"terminated": terminated}

    def _termination_message(self, run: ContainerRun) -> str:
        try:
            text = run.termination_file.read_text(errors="replace")[:4096]
        except OSError:
            text = ""
        if (
            not text
            and run.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
            and run.exit_code
        ):
            lines = run.log_path().read_text(errors="replace").splitlines()[-80:]
            text = "\n".join(lines)[-2048:]
        return text

    def _deadline_passed(self) -> bool:
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        return deadline is not None and time.time() - self._start_epoch() >= int(deadline)

    def _start_epoch(self) -> float:
        return (
            datetime.datetime.strptime(self.start_time, "%Y-%m-%dT%H:%M:%SZ")
            .replace(tzinfo=datetime.timezone.utc)
            .timestamp()
        )

    def kill_all(self, grace: float | None = None) -> None:
        """SIGTERM every process group, SIGKILL after the pod's grace period (or `grace`)."""
        if grace is None:
            grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        alive = [
            r for r in self.init_runs + self.runs if r.popen is not None and r.popen.poll() is None
        ]
        threads = [
            threading.Thread(
                target=kill_process_group, args=(r.popen.pid, float(grace)), kwargs={"reap": False}
            )
            for r in alive
            if r.popen
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for run in alive:
            self._record_exit(run)
            run.done = True
        for run in self.init_runs + self.runs:
            if run.restart_at is not None or "waiting" in run.state:
                run.restart_at = None
                run.done = True

    def _finish_deletion(self) -> None:
        """Like the kubelet: once every process is gone, remove the pod for good (grace 0)."""
        if not self.gone:
            self.node.delete_pod_now(self.pod)
        shutil.rmtree(self.sandbox, ignore_errors=True)

    # -- status ------------------------------------------------------------------------

    def _set_condition(self, kind: str, status: str, reason: str) -> bool:
        old = self.conditions.get(kind)
        if old is not None and old[:2] == (status, reason):
            return False
        self.conditions[kind] = (status, reason, now_rfc3339())
        return True

    def _wait_all(self, reason: str, message: str) -> None:
        for run in self.init_runs + self.runs:
            run.state = {"waiting": {"reason": reason, "message": message}}
        self._publish()

    def _publish(self) -> None:
        with self._publish_lock:
            self._publish_now()

    def _publish_now(self) -> None:
        if self.gone:
            return
        conditions = [
            {
                "type": kind,
                "status": status,
                "lastTransitionTime": since,
                **({"reason": reason} if reason else {}),
            }
            for kind, (status, reason, since) in self.conditions.items()
        ]
        status: dict[str, Any] = {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "containerStatuses": [r.status() for r in self.runs],
        }
        if self.init_runs:
            status["initContainerStatuses"] = [r.status() for r in self.init_runs]
        if self.reason:
            status["reason"], status["message"] = self.reason, self.message
        self.node.patch_pod_status(self.pod, status)
