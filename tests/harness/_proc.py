"""Process and port helpers shared by the harness's components.

Every long-running helper (etcd, the API server, moto, Prometheus, ...) is a `ManagedProcess`:
started in its own session so that stopping it kills the whole process group, with its output
in a log file whose tail goes into error messages. Not meant to be run directly.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_live: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ProcessExited(RuntimeError):
    """A harness child process died; its log's tail is in the message."""


def wait_until(
    check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.1
) -> T:
    """Call `check` until it returns something other than None/False; raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result is not None and result is not False:
                return result
        except ProcessExited:
            raise  # waiting longer cannot help
        except Exception as err:  # the last one goes into the timeout message
            last_error = err
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def kill_process_group(pid: int, grace: float = 5.0, *, reap: bool = True) -> None:
    """SIGTERM the process group led by `pid`, wait up to `grace` seconds, then SIGKILL it.

    `reap=False` when another thread waits on the leader (subprocess.Popen.wait): reaping it
    here would make that wait report exit code 0.
    """
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        if reap:
            _reap(pid)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if reap:
        _reap(pid)


def kill_process_groups(pids: list[int], grace: float = 5.0) -> None:
    """`kill_process_group` for many groups at once: one shared grace period, not one each."""
    threads = [threading.Thread(target=kill_process_group, args=(pid, grace)) for pid in pids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _reap(pid: int) -> None:
    # Collect our own zombie children so that killpg(pid, 0) stops finding them.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


class ManagedProcess:
    """A child process in its own process group, logging to a file, stopped at exit."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        _live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def check_running(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if not self.running():
            raise ProcessExited(
                f"{self.name} exited with code {self.popen.returncode}; "
                f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
            )

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.poll() is None or _group_alive(self.pid):
            kill_process_group(self.pid, grace)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        _live.discard(self)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_all() -> None:
    """Stop every ManagedProcess still running (atexit and SIGTERM hook)."""
    for proc in list(_live):
        proc.stop(grace=2.0)


_handlers_installed = False


def install_exit_handlers() -> None:
    """Stop children at interpreter exit and on SIGTERM, so nothing outlives a test run."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(stop_all)
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: object) -> None:
        stop_all()
        if callable(previous):
            previous(signum, frame)  # type: ignore[arg-type]
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
