"""Benchmark 4, operator: how fast a FineTuneJob gets its first child Job, alone and in a crowd.

Starts a real etcd and kube-apiserver on loopback with the test harness
(``tests/harness``; no controller manager, scheduler or node: child Jobs then create no
pods, so this measures the operator, not the pods), installs the CRD from ``crds/``,
runs the operator (``python -m kubetune_operator``) as a child process and samples its
RSS every 0.1 s with psutil.

* ``apply_to_job_p50_s`` / ``apply_to_job_p99_s``: FineTuneJobs created one at a time
  (the next after the previous one's prepare Job appeared); the time from sending the
  create request to the first child Job being seen by a watch on Jobs.
* ``fleet200_seconds``: N FineTuneJobs created at once (200 in --full, 50 in --quick),
  until every one has its first child Job.
* ``operator_peak_rss_mb``: the operator process's peak RSS over the whole run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, Figure, not_measured, percentile

NAMESPACE = "bench"
FIGURES = [
    ("apply_to_job_p50_s", "s", "< 1"),
    ("apply_to_job_p99_s", "s", "< 5"),
    ("fleet200_seconds", "s", None),
    ("operator_peak_rss_mb", "MiB", "< 300"),
]


def finetunejob(name: str) -> dict[str, Any]:
    """A valid FineTuneJob whose pods could never be placed (no such node)."""
    from kubetune.schema import job_manifest

    return job_manifest(
        name,
        namespace=NAMESPACE,
        model={"fresh": {"nLayer": 2, "nHead": 2, "nEmbd": 64, "nPositions": 64, "vocabSize": 512}},
        dataset={"source": "s3://bench/corpus/"},
        training={"maxSteps": 1, "precision": "fp32", "maxSeqLength": 64},
        evaluation={"bleu": {"enabled": False}, "baseline": False},
        resources={"gpusPerWorker": 0, "nodeSelector": {"kubetune.io/bench": "no-such-node"}},
        storage={"output": f"s3://bench/runs/{name}/"},
    )


class RssSampler(threading.Thread):
    """Peak RSS (MiB) of one process, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak_mb = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                rss = self.process.memory_info().rss / (1024 * 1024)
            except Exception:  # the process ended
                return
            self.peak_mb = max(self.peak_mb, rss)
            self._halt.wait(self.interval)

    def stop(self) -> float:
        self._halt.set()
        self.join(timeout=2)
        return self.peak_mb


class JobWatch(threading.Thread):
    """Records when each FineTuneJob's first child Job is first seen (label kubetune.io/job)."""

    def __init__(self, api_client: Any) -> None:
        super().__init__(daemon=True)
        self.api_client = api_client
        self.first_seen: dict[str, float] = {}
        self.cond = threading.Condition()
        self._stopping = False

    def run(self) -> None:
        from kubernetes import client, watch

        batch = client.BatchV1Api(self.api_client)
        while not self._stopping:
            w = watch.Watch()
            try:
                for event in w.stream(
                    batch.list_namespaced_job,
                    NAMESPACE,
                    label_selector="kubetune.io/job",
                    timeout_seconds=30,
                ):
                    owner = event["object"].metadata.labels.get("kubetune.io/job")
                    with self.cond:
                        self.first_seen.setdefault(owner, time.perf_counter())
                        self.cond.notify_all()
                    if self._stopping:
                        break
            except Exception:
                if self._stopping:
                    return
                time.sleep(0.2)

    def wait_for(self, names: set[str], timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        with self.cond:
            while not names <= self.first_seen.keys():
                left = deadline - time.perf_counter()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def stop(self) -> None:
        self._stopping = True


def _drop_empty_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _drop_empty_defaults(v) for k, v in node.items() if not (k == "default" and v == {})
        }
    if isinstance(node, list):
        return [_drop_empty_defaults(v) for v in node]
    return node


def installable_crd(state_dir: Path) -> Path:
    """crds/finetunejob.yaml, or a copy without ``default: {}`` if the API server rejects it.

    The generated CRD (at the time of writing) gives ``spec.evaluation`` and
    ``spec.resources`` a ``default: {}`` whose CEL rules then read a missing key, which
    kube-apiserver refuses at install time; the copy only drops those empty defaults.
    """
    import yaml

    source = REPO_ROOT / "crds" / "finetunejob.yaml"
    docs = [d for d in yaml.safe_load_all(source.read_text()) if d]
    fixed = [_drop_empty_defaults(d) for d in docs]
    if fixed == docs:
        return source
    target = state_dir / "finetunejob.yaml"
    target.write_text(yaml.safe_dump_all(fixed, sort_keys=False))
    return target


def _start_api(state_dir: Path) -> Any:
    """etcd + kube-apiserver only (harness.cluster.ControlPlane's own steps)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from harness.cluster import ControlPlane
    from harness.tools import default_bin_dir, missing_tools

    bin_dir = default_bin_dir()
    missing = [m for m in missing_tools(bin_dir) if m in ("etcd", "kube-apiserver")]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)} in {bin_dir}; run `make tools`")
    cp = ControlPlane(state_dir=state_dir, bin_dir=bin_dir)
    cp.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        cp._write_pki()
        cp._start_etcd()
        cp._start_apiserver()
        cp._wait_api_ready()
    except BaseException:
        cp.stop()
        raise
    return cp


def measure(quick: bool) -> tuple[list[Figure], dict[str, Any]]:
    import shutil
    import tempfile

    from kubernetes import client, config

    singles = 20
    fleet = 50 if quick else 200
    state_dir = Path(tempfile.mkdtemp(prefix="kubetune-bench-api-"))
    cp = _start_api(state_dir)
    operator = None
    sampler = None
    watcher = None
    try:
        cp.kubectl("apply", "-f", str(installable_crd(state_dir)))
        cp.kubectl(
            "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s"
        )
        cp.kubectl("create", "namespace", NAMESPACE)
        env = dict(
            os.environ,
            KUBECONFIG=str(cp.kubeconfig),
            KUBETUNE_OPERATOR_METRICS_PORT="0",
            KUBETUNE_HEALTH_PORT="0",
            KUBETUNE_NAMESPACE=NAMESPACE,
        )
        paths = [str(REPO_ROOT / "trainer"), str(REPO_ROOT / "operator")]
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
        log = open(state_dir / "operator.log", "w")  # noqa: SIM115 - closed with the process
        operator = subprocess.Popen(
            [sys.executable, "-m", "kubetune_operator", "--quiet"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        sampler = RssSampler(operator.pid)
        sampler.start()
        api_client = config.new_client_from_config(config_file=str(cp.kubeconfig))
        custom = client.CustomObjectsApi(api_client)
        watcher = JobWatch(config.new_client_from_config(config_file=str(cp.kubeconfig)))
        watcher.start()

        def create(name: str) -> float:
            sent = time.perf_counter()
            custom.create_namespaced_custom_object(
                "kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs", finetunejob(name)
            )
            return sent

        # Warm-up: the operator's first object (imports, informers) is not a steady figure.
        warm = create("warmup")
        if not watcher.wait_for({"warmup"}, timeout=120):
            raise RuntimeError(
                f"no child Job for the first FineTuneJob in 120 s; see {state_dir / 'operator.log'}"
            )
        first_s = watcher.first_seen["warmup"] - warm
        latencies = []
        for i in range(singles):
            name = f"single-{i:03d}"
            sent = create(name)
            if not watcher.wait_for({name}, timeout=60):
                raise RuntimeError(f"{name}: no child Job within 60 s")
            latencies.append(watcher.first_seen[name] - sent)
        names = [f"fleet-{i:03d}" for i in range(fleet)]
        start = time.perf_counter()
        for name in names:
            create(name)
        created = time.perf_counter() - start
        if not watcher.wait_for(set(names), timeout=600):
            raise RuntimeError(
                f"{fleet - len(set(names) & watcher.first_seen.keys())} of "
                f"{fleet} FineTuneJobs have no child Job after 600 s"
            )
        fleet_s = max(watcher.first_seen[n] for n in names) - start
        peak = sampler.stop()
    finally:
        if watcher is not None:
            watcher.stop()
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                operator.kill()
        cp.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    figures = [
        Figure(
            "apply_to_job_p50_s",
            percentile(latencies, 50),
            "s",
            "< 1",
            f"{singles} creates, one at a time",
        ),
        Figure(
            "apply_to_job_p99_s",
            percentile(latencies, 99),
            "s",
            "< 5",
            f"{singles} creates (p99 of {singles} = about the max)",
        ),
        Figure(
            "fleet200_seconds",
            fleet_s,
            "s",
            None,
            f"{fleet} FineTuneJobs at once" + (" (quick: 50, not 200)" if quick else ""),
        ),
        Figure("operator_peak_rss_mb", peak, "MiB", "< 300", "sampled every 0.1 s"),
    ]
    details = {
        "latencies_s": latencies,
        "first_object_s": first_s,
        "fleet": fleet,
        "fleet_create_s": created,
    }
    return figures, details


def run(quick: bool, threads: int) -> tuple[list[Figure], dict[str, Any]]:
    try:
        return measure(quick)
    except Exception as exc:  # the harness or the operator is not ready: say so, do not fail
        reason = f"{type(exc).__name__}: {exc}"
        return not_measured(FIGURES, reason), {"error": reason}
