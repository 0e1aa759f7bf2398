"""Helpers for tests/cluster/test_operator.py: run the operator, upload data, poll FineTuneJobs.

op = OperatorProcess.start(cluster, namespace, s3, log_dir)   # `python -m kubetune_operator`
op.kill()                                                     # SIGKILL, as a crash would
ftj = get_ftj(cluster, namespace, "tldr-tiny")
wait_for(lambda: phase(...) == "Succeeded", 300, "run to succeed", dump=...)
"""

from __future__ import annotations

import functools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from kubetune.schema import job_manifest

REPO = Path(__file__).resolve().parents[2]
TINY_EXAMPLE = REPO / "examples" / "cluster" / "tldr-tiny.yaml"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OperatorProcess:
    """The operator as a child process (``python -m kubetune_operator``) watching one namespace."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    metrics_port: int
    health_port: int

    @classmethod
    def start(
        cls,
        kubeconfig: Path,
        namespace: str,
        s3_env: dict[str, str],
        log_path: Path,
        **extra_env: str,
    ) -> OperatorProcess:
        metrics_port, health_port = free_port(), free_port()
        env = {
            **os.environ,
            **s3_env,  # the operator's own keys, which it must never use on a job's behalf
            # It reads results and progress with each job's keys, at allowed endpoints only.
            "KUBETUNE_STORAGE_ENDPOINTS": s3_env.get("AWS_ENDPOINT_URL", ""),
            "KUBECONFIG": str(kubeconfig),
            "KUBETUNE_NAMESPACE": namespace,
            "KUBETUNE_PROGRESS_INTERVAL": "2",
            "KUBETUNE_RESYNC_INTERVAL": "5",
            "KUBETUNE_TRAINER_IMAGE": "kubetune/trainer:test",
            "KUBETUNE_OPERATOR_METRICS_PORT": str(metrics_port),
            "KUBETUNE_HEALTH_PORT": str(health_port),
            "KUBETUNE_LOG_LEVEL": "DEBUG",
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        op = cls._spawn(env, log_path, metrics_port, health_port)
        op.wait_healthy()
        return op

    @classmethod
    def _spawn(
        cls, env: dict[str, str], log_path: Path, metrics_port: int, health_port: int
    ) -> OperatorProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it open
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune_operator"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        log.close()
        return cls(proc, log_path, env, metrics_port, health_port)

    def restart(self) -> OperatorProcess:
        self.stop()
        op = self._spawn(self.env, self.log_path, self.metrics_port, self.health_port)
        op.wait_healthy()
        return op

    def wait_healthy(self, timeout: float = 60.0) -> None:
        url = f"http://127.0.0.1:{self.health_port}/healthz"

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"operator exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for(healthy, timeout, "operator liveness endpoint", dump=self.log_tail)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def kill(self) -> None:
        """SIGKILL: no cleanup, exactly like a crashed or OOM-killed operator pod."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return (
            self.log_path.read_text(encoding="utf-8", errors="replace")
            if self.log_path.exists()
            else ""
        )

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class HasLog(Protocol):
    """An operator whose log a diagnosis can show (OperatorProcess, chart_operator's)."""

    def log_tail(self, lines: int = 60) -> str: ...


def wait_for(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    dump: Callable[[], str] | None = None,
    interval: float = 1.0,
) -> Any:
    """Poll ``check`` until truthy; on timeout fail with ``dump()`` for diagnosis."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{dump()}" if dump else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def kubectl(
    kubeconfig: Path,
    *args: str,
    stdin: str | None = None,
    check: bool = True,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result


def apply(
    kubeconfig: Path, namespace: str, obj: dict[str, Any], *extra: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return kubectl(
        kubeconfig,
        "apply",
        "-n",
        namespace,
        *extra,
        "-f",
        "-",
        stdin=yaml.safe_dump(obj),
        check=check,
    )


def get_json(kubeconfig: Path, namespace: str, *what: str) -> dict[str, Any]:
    out = kubectl(kubeconfig, "get", "-n", namespace, *what, "-o", "json").stdout
    return dict(json.loads(out))


@functools.cache
def _api_client(kubeconfig: Path) -> tuple[str, ssl.SSLContext] | None:
    """(server URL, TLS context with the client certificate) of a kubeconfig that names its
    CA and client certificate by file, as the harness writes them; None for any other kind."""
    config = yaml.safe_load(kubeconfig.read_text(encoding="utf-8"))
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    if not {"client-certificate", "client-key"} <= user.keys():
        return None
    context = ssl.create_default_context(cafile=cluster["certificate-authority"])
    context.load_cert_chain(user["client-certificate"], user["client-key"])
    return str(cluster["server"]), context


def get_ftj(kubeconfig: Path, namespace: str, name: str) -> dict[str, Any]:
    """The FineTuneJob as the API server has it. Tests poll this every second, so it asks the
    API itself rather than starting kubectl (a tenth of a CPU-second a call)."""
    client = _api_client(kubeconfig)
    if client is None:
        return get_json(kubeconfig, namespace, "finetunejob", name)
    server, context = client
    url = f"{server}/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs/{name}"
    try:
        with urllib.request.urlopen(url, context=context, timeout=30) as resp:
            return dict(json.load(resp))
    except urllib.error.HTTPError as err:
        detail = f"{err.code} {err.read()!r}"
        raise AssertionError(f"GET finetunejob {namespace}/{name}: {detail}") from None


def phase(kubeconfig: Path, namespace: str, name: str) -> str:
    return str((get_ftj(kubeconfig, namespace, name).get("status") or {}).get("phase") or "")


def child_jobs(kubeconfig: Path, namespace: str, name: str) -> list[dict[str, Any]]:
    items = get_json(kubeconfig, namespace, "jobs", "-l", f"kubetune.io/job={name}")["items"]
    return list(items)


def diagnose(kubeconfig: Path, namespace: str, name: str, op: HasLog | None) -> str:
    """Everything useful when a wait times out."""
    parts = []
    for args in (
        ("get", "ftj", name, "-o", "yaml"),
        ("get", "jobs,pods", "-o", "wide"),
        ("get", "events", "--sort-by=.lastTimestamp"),
    ):
        result = kubectl(kubeconfig, "-n", namespace, *args, check=False)
        parts.append(f"$ kubectl {' '.join(args)}\n{result.stdout}{result.stderr}")
    for pod in get_json(kubeconfig, namespace, "pods").get("items", []):
        pname = pod["metadata"]["name"]
        logs = kubectl(kubeconfig, "-n", namespace, "logs", pname, "--tail=30", check=False)
        parts.append(f"$ kubectl logs {pname}\n{logs.stdout[-3000:]}{logs.stderr[-500:]}")
    if op is not None:
        parts.append(f"operator log:\n{op.log_tail(80)}")
    return "\n".join(parts)


def tiny_job(
    name: str, *, data_uri: str, output: str, endpoint: str, secret: str, **training: Any
) -> dict[str, Any]:
    """examples/cluster/tldr-tiny.yaml pointed at the test's buckets (training overrides)."""
    example = yaml.safe_load(TINY_EXAMPLE.read_text(encoding="utf-8"))
    return job_manifest(
        name,
        example["spec"],
        dataset={"source": data_uri},
        training=training,
        storage={"output": output, "endpoint": endpoint, "credentialsSecret": secret},
    )


def upload_files(s3_client: Any, bucket: str, prefix: str, files: list[Path]) -> None:
    for path in files:
        s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())


def upload_text(s3_client: Any, bucket: str, key: str, text: str) -> None:
    s3_client.put_object(Bucket=bucket, Key=key, Body=text.encode())


def service_account_kubeconfig(
    admin_kubeconfig: Path, namespace: str, name: str, path: Path
) -> Path:
    """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` (a bound token)."""
    raw = yaml.safe_load(kubectl(admin_kubeconfig, "config", "view", "--raw", "--minify").stdout)
    token = kubectl(
        admin_kubeconfig, "-n", namespace, "create", "token", name, "--duration=2h"
    ).stdout.strip()
    cluster = raw["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [
            {
                "name": name,
                "context": {"cluster": cluster["name"], "user": name, "namespace": namespace},
            }
        ],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    path.chmod(0o600)
    return path


def install_crd(kubeconfig: Path) -> None:
    """Apply the generated CRD (server-side) and wait until the API server serves it."""
    kubectl(
        kubeconfig,
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        str(REPO / "crds" / "finetunejob.yaml"),
    )

    def established() -> bool:
        # Read the condition rather than `kubectl wait`, which fails outright when it asks
        # before the API server has written any condition of a just-created CRD.
        crd = get_json(kubeconfig, "default", "crd", "finetunejobs.kubetune.io")
        conditions = (crd.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    wait_for(established, 60, "the FineTuneJob CRD to be established", interval=0.5)


def let_helm_adopt_crd(kubeconfig: Path, release: str, namespace: str) -> None:
    """Let Helm's release adopt the FineTuneJob CRD applied earlier with kubectl (install_crd)."""
    crd = "finetunejobs.kubetune.io"
    if not kubectl(
        kubeconfig, "get", "crd", crd, "--ignore-not-found", "-o", "name"
    ).stdout.strip():
        return
    kubectl(kubeconfig, "label", "--overwrite", "crd", crd, "app.kubernetes.io/managed-by=Helm")
    kubectl(
        kubeconfig,
        "annotate",
        "--overwrite",
        "crd",
        crd,
        f"meta.helm.sh/release-name={release}",
        f"meta.helm.sh/release-namespace={namespace}",
    )


def create_s3_secret(
    kubeconfig: Path, namespace: str, key_id: str, secret: str, name: str = "kubetune-s3"
) -> None:
    """The Secret a FineTuneJob's ``storage.credentialsSecret`` names."""
    kubectl(
        kubeconfig,
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        name,
        f"--from-literal=AWS_ACCESS_KEY_ID={key_id}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={secret}",
    )


def operator_service_account(admin_kubeconfig: Path, namespace: str, path: Path) -> Path:
    """ServiceAccount ``kubetune-operator-<namespace>`` bound to exactly the rules of rbac.py,
    and a kubeconfig (written to ``path``) that acts as it."""
    from kubetune_operator import rbac

    name = f"kubetune-operator-{namespace}"
    for obj in rbac.manifests(namespace, name):
        apply(admin_kubeconfig, namespace, obj)
    return service_account_kubeconfig(admin_kubeconfig, namespace, name, path)


def dry_run(
    kubeconfig: Path, namespace: str, obj: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    """``kubectl apply --dry-run=server``: the API server's verdict, nothing stored."""
    return apply(kubeconfig, namespace, obj, "--dry-run=server", check=False)


def refusal_failures(kubeconfig: Path, namespace: str, cases: list[Any]) -> list[str]:
    """Each case (``manifest()``, ``valid_manifest()``, ``field``, optionally ``rule``) whose
    bad manifest the API server accepts or refuses without naming the field (and the rule's
    message), or whose valid counterpart it refuses; [] when all hold."""
    failures = []
    for case in cases:
        bad = dry_run(kubeconfig, namespace, case.manifest())
        rule = getattr(case, "rule", None)
        named = case.field in bad.stderr and (rule is None or rule.message in bad.stderr)
        if bad.returncode == 0 or not named:
            failures.append(f"{case.id}: rc={bad.returncode} stderr={bad.stderr!r}")
        good = dry_run(kubeconfig, namespace, case.valid_manifest())
        if good.returncode != 0:
            failures.append(f"{case.id} (valid counterpart): stderr={good.stderr!r}")
    return failures


def ftj_events(kubeconfig: Path, namespace: str, name: str, reason: str) -> list[dict[str, Any]]:
    """The Events about FineTuneJob ``name`` with ``reason``."""
    selector = f"involvedObject.kind=FineTuneJob,involvedObject.name={name},reason={reason}"
    items: list[dict[str, Any]] = get_json(
        kubeconfig, namespace, "events", "--field-selector", selector
    )["items"]
    return items
