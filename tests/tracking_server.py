"""A real MLflow tracking server (``python -m mlflow server``) on loopback for tests.

Use the fixture from a test module or a conftest::

    from tracking_server import mlflow_server  # noqa: F401

``mlflow_server`` (session) starts ``mlflow server`` on 127.0.0.1 and a free port with a
SQLite backend store and proxied artifacts (``--serve-artifacts``) under a temporary
directory, waits for ``/health`` and returns a :class:`MlflowServer` (``url``,
``artifacts``: where uploaded artifacts land on disk). The server and its worker
process are stopped at the end of the session (their own process group: nothing stays).
Starting it takes ~25 s on a small machine (mlflow imports for long), so the whole
session shares one server; tests keep apart by using their own experiment names.

:func:`rest` calls its REST API and :func:`experiment_runs` lists an experiment's runs, so
tests assert on what the server recorded. It needs the ``mlflow`` package (the ``dev``
extra); the code under test does not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

START_TIMEOUT = 180.0  # seconds; the first start after an install also compiles bytecode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """``mlflow server`` in a child process group; a context manager."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.artifacts = root / "artifacts"
        self.db = root / "mlflow.db"
        self.log = root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # No background job runner (huey consumers): nothing here needs it.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env["PYTHONWARNINGS"] = "ignore"
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.artifacts),
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"mlflow server exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(
            f"mlflow server not healthy after {START_TIMEOUT:g}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM to the whole process group (the CLI and its uvicorn), then SIGKILL."""
        process, self.process = self.process, None
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The group leader is gone; make sure no member outlives it.
            deadline = time.monotonic() + wait
            while _group_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _group_alive(process.pid):
                break
        if process.returncode is None:
            process.wait(timeout=5)

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def rest(
    server: MlflowServer, endpoint: str, body: dict[str, Any] | None = None, **query: Any
) -> Any:
    """GET (``query``) or POST (``body``) on the MLflow REST API of ``server``."""
    url = f"{server.url}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


def experiment_runs(server: MlflowServer, experiment: str) -> list[dict[str, Any]]:
    eid = rest(server, "experiments/get-by-name", experiment_name=experiment)["experiment"][
        "experiment_id"
    ]
    return list(rest(server, "runs/search", {"experiment_ids": [eid]}).get("runs", []))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running MLflow tracking server with proxied artifacts, for the whole session."""
    if importlib.util.find_spec("mlflow") is None:  # not imported here: it is slow to import
        pytest.fail("mlflow is not installed: run `make setup` (the dev extra has it)")
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server
