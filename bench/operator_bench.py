"""Benchmark 4, operator: first child Job, alone and in a crowd; status latency; RSS; API load.

    python -m bench.run --quick --only operator           # with the other benchmarks' table
    python -m bench.operator_bench --quick                # alone: 30 singles, 50 at once
    python -m bench.operator_bench --full                 # 200 singles, 200 at once
    python -m bench.operator_bench --singles 50 --burst 100 --source /tmp/old-checkout

Starts a real etcd and kube-apiserver on loopback with the test harness
(``tests/harness``; no controller manager, scheduler or node: child Jobs then create no
pods, so this measures the operator, not the pods), installs the CRD from ``crds/``,
runs the operator (``python -m kubetune_operator``, from ``--source``: this checkout by
default, or e.g. an older commit's ``git archive`` for a before/after) as a child process
and samples its RSS every 0.1 s with psutil. Watches on Jobs and FineTuneJobs record when
each thing is first seen.

* ``apply_to_job_p50_s`` / ``apply_to_job_p99_s``: FineTuneJobs created one at a time
  (the next after the previous one's prepare Job appeared; 30 in --quick, 200 in --full);
  the time from sending the create request to the first child Job being seen by a watch.
* ``fleet200_seconds``: N FineTuneJobs created at once (200 in --full, 50 in --quick),
  until every one has its first child Job (all Jobs created within, target 60 s).
* ``api_requests_per_ftj_per_min``: with every FineTuneJob waiting for its first stage
  (its Job exists, no pod) and the operator settled (no request for 3 s), the requests the
  operator sends in one quiet minute (its ``kubetune_operator_api_requests_total``: the
  reconciler's requests; kopf's watches are a few long-lived requests per kind, not per
  FineTuneJob) divided by the number of FineTuneJobs.
* ``status_update_p50_s`` / ``status_update_p99_s``: the first FineTuneJobs' prepare Jobs
  are completed one at a time as the Job controller would (``Complete`` and
  ``SuccessCriteriaMet`` written through the ``/status`` subresource with the admin client);
  the time from that request to a watch seeing ``status.stages.prepare.state: Succeeded``.
* ``operator_peak_rss_mb``: the operator process's peak RSS over the whole run.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, Figure, not_measured, percentile

NAMESPACE = "bench"
LABEL_JOB = "kubetune.io/job"
REQUESTS_METRIC = "kubetune_operator_api_requests_total"
FIGURES = [
    ("apply_to_job_p50_s", "s", "< 0.3"),
    ("apply_to_job_p99_s", "s", "< 1"),
    ("fleet200_seconds", "s", "< 60"),
    ("status_update_p50_s", "s", None),
    ("status_update_p99_s", "s", "< 2"),
    ("operator_peak_rss_mb", "MiB", "< 150"),
    ("api_requests_per_ftj_per_min", "req/min", None),
]
TARGETS = {name: target for name, _, target in FIGURES}


@dataclass(frozen=True)
class Sizes:
    """How much load each part of the benchmark applies."""

    singles: int  # FineTuneJobs created one at a time (apply -> first Job)
    burst: int  # FineTuneJobs created at once (all Jobs created within ... s)
    status_updates: int  # prepare Jobs completed one at a time (at most `singles`)
    quiet_s: float  # the steady-state window in which the operator's requests are counted


QUICK = Sizes(singles=30, burst=50, status_updates=30, quiet_s=60.0)
FULL = Sizes(singles=200, burst=200, status_updates=200, quiet_s=60.0)


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


# ---------------------------------------------------------------------- pure helpers


def job_complete_status(now: datetime) -> dict[str, Any]:
    """The status the Job controller writes when a one-pod Job succeeds.

    kube-apiserver (1.31+) only accepts ``Complete`` on a Job together with ``startTime``,
    ``completionTime``, the succeeded count and the ``SuccessCriteriaMet`` condition.
    """
    stamp = now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {"status": "True", "lastProbeTime": stamp, "lastTransitionTime": stamp}
    return {
        "startTime": stamp,
        "completionTime": stamp,
        "succeeded": 1,
        "active": 0,
        "ready": 0,
        "terminating": 0,
        "uncountedTerminatedPods": {},
        "conditions": [
            {**condition, "type": "SuccessCriteriaMet", "reason": "CompletionsReached"},
            {**condition, "type": "Complete", "reason": "CompletionsReached"},
        ],
    }


def stage_state(ftj: dict[str, Any], stage: str) -> str | None:
    """``status.stages.<stage>.state`` of a FineTuneJob (a dict as the API returns it)."""
    stages = (ftj.get("status") or {}).get("stages") or {}
    return (stages.get(stage) or {}).get("state")


def counter_by_label(text: str, name: str, label: str) -> dict[str, float]:
    """The samples of counter ``name`` (with or without ``_total``) in Prometheus text, by label.

    ``{}`` when the exposition has no such counter (an operator without it).
    """
    from prometheus_client.parser import text_string_to_metric_families

    family = name.removesuffix("_total")
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for sample in fam.samples:
            if sample.name == f"{family}_total":
                key = sample.labels.get(label, "")
                out[key] = out.get(key, 0.0) + sample.value
    return out


def per_object_per_minute(
    before: dict[str, float], after: dict[str, float], objects: int, seconds: float
) -> float:
    """Requests per object per minute between two counter readings (by label)."""
    if objects <= 0 or seconds <= 0:
        raise ValueError("objects and seconds must be positive")
    sent = sum(after.values()) - sum(before.values())
    return sent / objects / (seconds / 60.0)


# ---------------------------------------------------------------------- measuring threads


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


class FirstSeen(threading.Thread):
    """Watches a collection; records when each key first has an object for which ``ready`` holds.

    ``key`` maps an object (a dict, as the API sends it) to its key (None: not ours);
    ``first_seen[key]`` is the ``time.perf_counter()`` of that event and ``objects[key]`` the
    object then.
    """

    def __init__(
        self,
        list_call: Callable[..., Any],
        args: tuple[Any, ...],
        key: Callable[[dict[str, Any]], str | None],
        ready: Callable[[dict[str, Any]], bool] = lambda _: True,
        **kwargs: Any,
    ) -> None:
        super().__init__(daemon=True)
        self.list_call, self.args, self.kwargs = list_call, args, kwargs
        self.key, self.ready = key, ready
        self.first_seen: dict[str, float] = {}
        self.objects: dict[str, dict[str, Any]] = {}
        self.cond = threading.Condition()
        self._stopping = False

    def run(self) -> None:
        from kubernetes import watch

        while not self._stopping:
            w = watch.Watch()
            try:
                for event in w.stream(
                    self.list_call, *self.args, timeout_seconds=30, **self.kwargs
                ):
                    obj = event["raw_object"]
                    key = self.key(obj)
                    if key is not None and self.ready(obj):
                        with self.cond:
                            if key not in self.first_seen:
                                self.first_seen[key] = time.perf_counter()
                                self.objects[key] = obj
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


def _owner_label(obj: dict[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_JOB)


def _name(obj: dict[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("name")


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return counter_by_label(resp.read().decode(), REQUESTS_METRIC, "verb")


def _settle(port: int, quiet_for: float = 3.0, limit: float = 30.0) -> bool:
    """Wait until the operator has sent no request for ``quiet_for`` s (at most ``limit`` s)."""
    deadline = time.perf_counter() + limit
    last, since = sum(_scrape(port).values()), time.perf_counter()
    while time.perf_counter() < deadline:
        time.sleep(0.5)
        now = sum(_scrape(port).values())
        if now != last:
            last, since = now, time.perf_counter()
        elif time.perf_counter() - since >= quiet_for:
            return True
    return False


# ---------------------------------------------------------------------- the benchmark


def measure(sizes: Sizes, source: Path = REPO_ROOT) -> tuple[list[Figure], dict[str, Any]]:
    import shutil
    import tempfile

    from kubernetes import client, config

    state_dir = Path(tempfile.mkdtemp(prefix="kubetune-bench-api-"))
    cp = _start_api(state_dir)
    operator = None
    sampler = None
    watches: list[FirstSeen] = []
    metrics_port = _free_port()
    details: dict[str, Any] = {"sizes": asdict(sizes), "source": str(source)}
    try:
        cp.kubectl("apply", "-f", str(installable_crd(state_dir)))
        cp.kubectl(
            "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s"
        )
        cp.kubectl("create", "namespace", NAMESPACE)
        env = dict(
            os.environ,
            KUBECONFIG=str(cp.kubeconfig),
            KUBETUNE_OPERATOR_METRICS_PORT=str(metrics_port),
            KUBETUNE_HEALTH_PORT="0",
            KUBETUNE_NAMESPACE=NAMESPACE,
        )
        paths = [str(source / "core"), str(source / "trainer"), str(source / "operator")]
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

        def new_client() -> Any:  # one per thread: ApiClient is not shared across threads
            return config.new_client_from_config(config_file=str(cp.kubeconfig))

        custom = client.CustomObjectsApi(new_client())
        batch = client.BatchV1Api(new_client())
        jobs = FirstSeen(
            client.BatchV1Api(new_client()).list_namespaced_job,
            (NAMESPACE,),
            _owner_label,
            label_selector=LABEL_JOB,
        )
        prepared = FirstSeen(
            client.CustomObjectsApi(new_client()).list_namespaced_custom_object,
            ("kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs"),
            _name,
            lambda ftj: stage_state(ftj, "prepare") == "Succeeded",
        )
        watches = [jobs, prepared]
        for w in watches:
            w.start()

        def create(name: str) -> float:
            sent = time.perf_counter()
            custom.create_namespaced_custom_object(
                "kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs", finetunejob(name)
            )
            return sent

        # Warm-up: the operator's first object (imports, informers) is not a steady figure.
        warm = create("warmup")
        if not jobs.wait_for({"warmup"}, timeout=120):
            raise RuntimeError(
                f"no child Job for the first FineTuneJob in 120 s; see {state_dir / 'operator.log'}"
            )
        details["first_object_s"] = jobs.first_seen["warmup"] - warm

        # 1. One at a time: apply -> first Job.
        latencies = []
        singles = [f"single-{i:03d}" for i in range(sizes.singles)]
        for name in singles:
            sent = create(name)
            if not jobs.wait_for({name}, timeout=60):
                raise RuntimeError(f"{name}: no child Job within 60 s")
            latencies.append(jobs.first_seen[name] - sent)
        details["latencies_s"] = [round(x, 4) for x in latencies]

        # 2. A burst: all at once, until each has its first Job.
        names = [f"fleet-{i:03d}" for i in range(sizes.burst)]
        start = time.perf_counter()
        for name in names:
            create(name)
        details["fleet_create_s"] = time.perf_counter() - start
        if not jobs.wait_for(set(names), timeout=600):
            raise RuntimeError(
                f"{sizes.burst - len(set(names) & jobs.first_seen.keys())} of "
                f"{sizes.burst} FineTuneJobs have no child Job after 600 s"
            )
        fleet_s = max(jobs.first_seen[n] for n in names) - start

        # 3. Steady state: every FineTuneJob waits for its first stage; count requests.
        objects = 1 + len(singles) + len(names)
        rate: float | None = None
        if _scrape(metrics_port):
            details["settled"] = _settle(metrics_port)
            before, t0 = _scrape(metrics_port), time.perf_counter()
            time.sleep(sizes.quiet_s)
            after, window = _scrape(metrics_port), time.perf_counter() - t0
            rate = per_object_per_minute(before, after, objects, window)
            details["quiet_requests_by_verb"] = {
                verb: after[verb] - before.get(verb, 0.0) for verb in after
            }
            details["quiet_window_s"] = round(window, 1)
        details["idle_finetunejobs"] = objects

        # 4. Job status -> FineTuneJob status, one at a time.
        status_latencies = []
        for name in singles[: sizes.status_updates]:
            job_name = _name(jobs.objects[name])
            assert job_name is not None, f"{name}: its Job has no name"
            body = {"status": job_complete_status(datetime.now(timezone.utc))}
            sent = time.perf_counter()
            batch.patch_namespaced_job_status(job_name, NAMESPACE, body)
            if not prepared.wait_for({name}, timeout=60):
                raise RuntimeError(f"{name}: status.stages.prepare not Succeeded within 60 s")
            status_latencies.append(prepared.first_seen[name] - sent)
        details["status_latencies_s"] = [round(x, 4) for x in status_latencies]
        peak = sampler.stop()
    finally:
        for w in watches:
            w.stop()
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                operator.kill()
        cp.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    n, s = sizes.singles, len(status_latencies)
    figures = [
        Figure(
            "apply_to_job_p50_s",
            percentile(latencies, 50),
            "s",
            TARGETS["apply_to_job_p50_s"],
            f"{n} creates, one at a time",
        ),
        Figure(
            "apply_to_job_p99_s",
            percentile(latencies, 99),
            "s",
            TARGETS["apply_to_job_p99_s"],
            f"{n} creates, one at a time; max {max(latencies):.3f} s",
        ),
        Figure(
            "fleet200_seconds",
            fleet_s,
            "s",
            TARGETS["fleet200_seconds"],
            f"{sizes.burst} FineTuneJobs at once until each has its first Job",
        ),
        Figure(
            "status_update_p50_s",
            percentile(status_latencies, 50) if s else None,
            "s",
            TARGETS["status_update_p50_s"],
            f"{s} prepare Jobs set Complete via /status, one at a time",
        ),
        Figure(
            "status_update_p99_s",
            percentile(status_latencies, 99) if s else None,
            "s",
            TARGETS["status_update_p99_s"],
            f"{s} updates; max {max(status_latencies, default=0.0):.3f} s",
        ),
        Figure("operator_peak_rss_mb", peak, "MiB", TARGETS["operator_peak_rss_mb"], "every 0.1 s"),
        Figure(
            "api_requests_per_ftj_per_min",
            rate,
            "req/min",
            TARGETS["api_requests_per_ftj_per_min"],
            f"{objects} FineTuneJobs waiting for their first stage, "
            f"{details.get('quiet_window_s', sizes.quiet_s)} s window"
            if rate is not None
            else f"not measured: the operator exports no {REQUESTS_METRIC}",
        ),
    ]
    return figures, details


def run(quick: bool, threads: int) -> tuple[list[Figure], dict[str, Any]]:
    try:
        return measure(QUICK if quick else FULL)
    except Exception as exc:  # the harness or the operator is not ready: say so, do not fail
        reason = f"{type(exc).__name__}: {exc}"
        return not_measured(FIGURES, reason), {"error": reason}


def main(argv: list[str] | None = None) -> int:
    from bench.common import format_table, machine_info, results_document, write_results

    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--full", action="store_true", help="full sizes (default: quick)")
    parser.add_argument("--quick", action="store_true", help="quick sizes (the default)")
    parser.add_argument("--singles", type=int, help="FineTuneJobs created one at a time")
    parser.add_argument("--burst", type=int, help="FineTuneJobs created at once")
    parser.add_argument("--status-updates", type=int, help="prepare Jobs completed one at a time")
    parser.add_argument("--quiet-seconds", type=float, help="steady-state window (s)")
    parser.add_argument(
        "--source",
        type=Path,
        default=REPO_ROOT,
        help="checkout whose core/, trainer/, operator/ run as the operator (default: this one)",
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    base = FULL if args.full else QUICK
    sizes = Sizes(
        singles=args.singles if args.singles is not None else base.singles,
        burst=args.burst if args.burst is not None else base.burst,
        status_updates=args.status_updates
        if args.status_updates is not None
        else base.status_updates,
        quiet_s=args.quiet_seconds if args.quiet_seconds is not None else base.quiet_s,
    )
    machine = machine_info()
    figures, details = measure(sizes, args.source.resolve())
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(format_table(figures))
    print(f"load average {machine['loadavg_start']} -> {machine['loadavg_end']}; sizes {sizes}")
    if args.out is not None:
        write_results(results_document(figures, machine, "operator", details), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
