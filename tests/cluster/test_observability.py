"""Dashboards and alerts against a real Prometheus that scraped a real job.

A private Prometheus (harness.prometheus, Debian's package) scrapes the operator
(``python -m kubetune_operator``) and the train pod's endpoint (127.0.0.1:9400: the process
node runs pods on the host) while a tiny FineTuneJob runs end to end on the test cluster.
Then every dashboard query and alert expression of the chart runs through the query API:
each must parse, the ones about training and results must return data, and a healthy run must
fire no failure alert. ``promtool check metrics`` lints both endpoints' real output.

    pytest -m cluster tests/cluster/test_observability.py
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from datapaths import tldr_files
from observability_contract import (
    DASHBOARDS,
    OPERATOR_METRICS,
    TRAINER_METRICS,
    alert_rules,
    dashboard_queries,
    grafana_to_promql,
    metric_names,
)
from operator_helpers import (
    OperatorProcess,
    create_s3_secret,
    diagnose,
    get_ftj,
    install_crd,
    kubectl,
    tiny_job,
    upload_files,
    wait_for,
)

from harness.prometheus import Prometheus

pytestmark = pytest.mark.cluster

TRAIN_METRICS = "127.0.0.1:9400"
JOB = "obs-tiny"
MAX_STEPS = 40
RUN_TIMEOUT = 480.0

# Series a healthy CPU run produces; queries reading only these must return data. (No GPU
# here, and a healthy run records no reconcile error.)
PRODUCED = (TRAINER_METRICS | OPERATOR_METRICS) - {
    "kubetune_gpu_memory_used_bytes",
    "kubetune_gpu_utilization_ratio",
    "kubetune_operator_reconcile_errors_total",
}


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


class TrainScraper(threading.Thread):
    """Keeps the last /metrics text of the train pod that had training series in it."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.text = ""
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            try:
                with urllib.request.urlopen(f"http://{TRAIN_METRICS}/metrics", timeout=2) as resp:
                    body = resp.read().decode()
            except OSError:
                continue
            if f'finetunejob="{JOB}"' in body and "kubetune_train_step{" in body:
                self.text = body


def _range_query(url: str, expr: str, start: float, end: float) -> dict[str, Any]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "2"})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=20) as resp:
            return dict(json.load(resp))
    except urllib.error.HTTPError as err:  # 400 carries the parse error in its body
        return dict(json.loads(err.read().decode()))


def _label_values(url: str, label: str, metric: str) -> list[str]:
    params = urllib.parse.urlencode({"match[]": metric})
    with urllib.request.urlopen(f"{url}/api/v1/label/{label}/values?{params}", timeout=10) as resp:
        return list(json.load(resp)["data"])


def _promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run `bash scripts/install-system-deps.sh`"
    return subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


@pytest.fixture(scope="module")
def observed_run(
    k8s_cluster: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One tiny job run end to end with Prometheus scraping the operator and the trainer."""
    kc = k8s_cluster.kubeconfig
    install_crd(kc)
    ns = f"obs-{os.urandom(3).hex()}"
    k8s_cluster.kubectl("create", "namespace", ns)
    wait_for(
        lambda: k8s_cluster.kubectl("-n", ns, "get", "sa", "default", check=False).returncode == 0,
        30,
        "the default service account",
    )
    client = s3_server.client()
    data_bucket = s3_server.make_bucket(f"{ns}-data")
    out_bucket = s3_server.make_bucket(f"{ns}-runs")
    upload_files(client, data_bucket, "tldr/common", tldr_files("common")[:150])
    create_s3_secret(kc, ns, s3_server.access_key, s3_server.secret_key)
    workdir = tmp_path_factory.mktemp("observability")
    scraper = TrainScraper()
    op: OperatorProcess | None = None
    prom: Prometheus | None = None
    start = time.time()
    try:
        op = OperatorProcess.start(kc, ns, s3_server.env(), workdir / "operator.log")
        # (prometheus_factory is function-scoped; this run is shared by the module's tests.)
        prom = Prometheus.start([f"127.0.0.1:{op.metrics_port}", TRAIN_METRICS], workdir / "prom")
        scraper.start()
        # Pods of the process node share the host's network: the train pod can serve its
        # metrics only if nothing else on this machine (e.g. a `kubetune run`) holds 9400.
        port = int(TRAIN_METRICS.rsplit(":", 1)[1])
        wait_for(lambda: _port_free(port), 300, f"port {port} to be free for the train pod")
        job = tiny_job(
            JOB,
            data_uri=f"s3://{data_bucket}/tldr/common/",
            output=f"s3://{out_bucket}/{JOB}/",
            endpoint=s3_server.endpoint_url,
            secret="kubetune-s3",
            maxSteps=MAX_STEPS,
        )
        kubectl(kc, "apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(job))

        def finished() -> str | None:
            phase = (get_ftj(kc, ns, JOB).get("status") or {}).get("phase")
            return phase if phase in ("Succeeded", "Failed") else None

        dump = lambda: diagnose(kc, ns, JOB, op)  # noqa: E731
        phase = wait_for(finished, RUN_TIMEOUT, f"{JOB} to finish", dump=dump, interval=2)
        assert phase == "Succeeded", dump()
        # The operator's result gauges reach Prometheus within a few scrapes.
        wait_for(
            lambda: prom.query(f'kubetune_finetunejob_bleu{{finetunejob="{JOB}"}}'),
            60,
            "the result gauges in Prometheus",
            dump=dump,
        )
        yield {
            "prom": prom,
            "op": op,
            "ns": ns,
            "start": start,
            # A little past now: range-query points are aligned to `start`, and the last
            # one must not fall just before the first sample of a gauge that appeared late.
            "end": time.time() + 4,
            "train_text": scraper.text,
            "operator_text": op.metrics(),
        }
    finally:
        scraper.stopping.set()
        if prom is not None:
            prom.stop()
        if op is not None:
            op.stop()
        k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_prometheus_scraped_the_trainer_through_the_whole_run(observed_run: dict[str, Any]) -> None:
    prom, ns = observed_run["prom"], observed_run["ns"]
    sel = f'{{finetunejob="{JOB}", namespace="{ns}"}}'
    steps = prom.query(f"max_over_time(kubetune_train_step{sel}[30m])")
    total = prom.query(f"max_over_time(kubetune_train_total_steps{sel}[30m])")
    assert steps and total, "the train pod's metrics were never scraped"
    assert float(total[0]["value"][1]) == MAX_STEPS
    # The trainer may exit between its last update and the next 1s scrape.
    assert 0 < float(steps[0]["value"][1]) <= MAX_STEPS
    moved = prom.query(f"changes(kubetune_train_step{sel}[30m])")
    assert float(moved[0]["value"][1]) >= 1, "the step gauge never moved while scraped"
    samples = prom.query(f"count_over_time(kubetune_train_loss{sel}[30m])")
    assert int(samples[0]["value"][1]) >= 2, "expected several scrapes during training"


def test_every_dashboard_query_runs_and_the_training_and_result_panels_have_data(
    observed_run: dict[str, Any],
) -> None:
    prom = observed_run["prom"]
    empty = []
    for path in DASHBOARDS:
        for where, expr in dashboard_queries(path):
            if " panel " not in where:
                continue
            body = _range_query(
                prom.url, grafana_to_promql(expr), observed_run["start"], observed_run["end"]
            )
            assert body["status"] == "success", f"{where}: {body.get('error')}"
            expects_data = metric_names(expr) <= PRODUCED and 'outcome="failed"' not in expr
            if expects_data and not body["data"]["result"]:
                empty.append(where)
    assert not empty, f"queries with no data after a successful run: {empty}"


def test_dashboard_variables_find_the_job_and_its_namespace(observed_run: dict[str, Any]) -> None:
    prom, ns = observed_run["prom"], observed_run["ns"]
    for metric in ("kubetune_train_step", "kubetune_finetunejob_perplexity"):
        assert ns in _label_values(prom.url, "namespace", metric)
        assert JOB in _label_values(prom.url, "finetunejob", metric)


def test_alert_expressions_run_and_a_healthy_run_fires_no_failure_alert(
    observed_run: dict[str, Any],
) -> None:
    prom = observed_run["prom"]
    for rule in alert_rules():
        result = prom.query(rule["expr"])  # raises unless the API answered success
        if rule["alert"] in (
            "KubetuneFineTuneJobFailed",
            "KubetuneTrainingLossNonFinite",
            "KubetuneTrainingStalled",
        ):
            assert result == [], f"{rule['alert']} fires for a healthy run: {result}"
    runs = prom.query('kubetune_operator_runs_total{outcome="succeeded"}')
    assert runs and float(runs[0]["value"][1]) >= 1


def test_promtool_check_metrics_passes_on_both_endpoints(observed_run: dict[str, Any]) -> None:
    train_text, operator_text = observed_run["train_text"], observed_run["operator_text"]
    assert "kubetune_train_loss{" in train_text, "no scrape of the train pod was captured"
    assert "kubetune_finetunejob_perplexity{" in operator_text
    for name, text in (("trainer", train_text), ("operator", operator_text)):
        result = _promtool_check_metrics(text)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
