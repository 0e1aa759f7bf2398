"""Dashboards and alerts against a real Prometheus that found and scraped a real job's pods.

``helm install`` on the real node runs the operator from its image; a tiny FineTuneJob runs
end to end, every stage in the trainer image. A private Prometheus (harness.prometheus,
Debian's package) scrapes the pods the chart's PodMonitor (train pods) and ServiceMonitor (the
operator's metrics Service) select, by their pod addresses: the monitors are rendered from the
chart, and ``MonitorDiscovery`` finds their targets through the test cluster's API with the
monitors' selectors, port names and ``honorLabels``, as the Prometheus Operator's Kubernetes
discovery would, so a selector that misses the pods or a port name that does not match fails
here. Then every dashboard query and alert expression of the chart runs through the query
API: each must parse, the ones about training and results must return data, and a healthy run
must fire no failure alert. ``promtool check metrics`` lints both endpoints' real output.

    pytest -m cluster tests/cluster/test_observability.py    # root, `make images`
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from built_images import built_image
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
    REPO,
    apply,
    diagnose,
    get_ftj,
    get_json,
    kubectl,
    let_helm_adopt_crd,
    wait_for,
)
from real_node_env import RUN_TIMEOUT, node_job, restricted_namespace, tenant_data

from harness.fixtures import ContainerdCluster
from harness.prometheus import Prometheus

pytestmark = pytest.mark.cluster

JOB = "obs-tiny"
MAX_STEPS = 40
RELEASE = "kt"
TRAIN_SCRAPE, OPERATOR_SCRAPE = "kubetune-train", "kubetune-operator"

# Series a healthy CPU run produces; queries reading only these must return data. (No GPU
# here, and a healthy run records no reconcile error.)
PRODUCED = (TRAINER_METRICS | OPERATOR_METRICS) - {
    "kubetune_gpu_memory_used_bytes",
    "kubetune_gpu_utilization_ratio",
    "kubetune_operator_reconcile_errors_total",
}


class MonitorDiscovery(threading.Thread):
    """Kubernetes service discovery for the chart's monitors, as the Prometheus Operator sets it
    up, written as ``file_sd`` target files (Debian's Prometheus is built without the
    Kubernetes discovery).

    Every second: the pods a PodMonitor's selector matches, or the endpoints of the Services a
    ServiceMonitor's selector matches (label selectors answered by the API server), in the
    monitor's namespaces, each at its pod address and the port the monitor names, labelled
    ``namespace`` and ``pod`` as the Prometheus Operator labels them.
    """

    def __init__(
        self, cluster: ContainerdCluster, monitors: list[dict[str, Any]], directory: Path
    ) -> None:
        super().__init__(daemon=True)
        self.cluster, self.monitors, self.directory = cluster, monitors, directory
        self.stopping = threading.Event()
        directory.mkdir(parents=True, exist_ok=True)
        self.discover()  # the files exist before Prometheus reads its config

    def _list(self, path: str, selector: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"labelSelector": selector})
        status, body = self.cluster.control_plane.get(f"{path}?{query}")
        assert status == 200, (path, status, body[:300])
        return list(json.loads(body)["items"])

    def targets(self, monitor: dict[str, Any]) -> list[dict[str, Any]]:
        spec, endpoint = monitor["spec"], monitor_endpoint(monitor)
        pods = monitor["kind"] == "PodMonitor"
        selector = ",".join(f"{k}={v}" for k, v in spec["selector"]["matchLabels"].items())
        found = []
        for ns in spec["namespaceSelector"]["matchNames"]:
            if pods:
                for pod in self._list(f"/api/v1/namespaces/{ns}/pods", selector):
                    ip = pod["status"].get("podIP")
                    for container in pod["spec"]["containers"]:
                        for port in container.get("ports", []):
                            if ip and port.get("name") == endpoint["port"]:
                                address = f"{ip}:{port['containerPort']}"
                                found.append((address, ns, pod["metadata"]["name"]))
                continue
            for service in self._list(f"/api/v1/namespaces/{ns}/services", selector):
                name = service["metadata"]["name"]
                status, body = self.cluster.control_plane.get(
                    f"/api/v1/namespaces/{ns}/endpoints/{name}"
                )
                if status != 200:
                    continue  # not made yet
                for subset in json.loads(body).get("subsets") or []:
                    for port in subset.get("ports", []):
                        if port.get("name") != endpoint["port"]:
                            continue
                        for address in subset.get("addresses", []):
                            pod_name = (address.get("targetRef") or {}).get("name", "")
                            found.append((f"{address['ip']}:{port['port']}", ns, pod_name))
        return [
            {"targets": [address], "labels": {"namespace": ns, "pod": pod}}
            for address, ns, pod in found
        ]

    def discover(self) -> None:
        for monitor in self.monitors:
            path = self.directory / f"{scrape_job(monitor)}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.targets(monitor)))
            tmp.replace(path)  # Prometheus never reads half a file

    def run(self) -> None:
        while not self.stopping.wait(1.0):
            try:
                self.discover()
            except (OSError, AssertionError, ValueError):
                continue  # the next round tries again

    def scrape_configs(self) -> list[dict[str, Any]]:
        """One scrape job a monitor, with the monitor's path and ``honorLabels``."""
        return [
            {
                "job_name": scrape_job(monitor),
                "honor_labels": bool(monitor_endpoint(monitor).get("honorLabels", False)),
                "metrics_path": monitor_endpoint(monitor).get("path", "/metrics"),
                "file_sd_configs": [
                    {
                        "files": [str(self.directory / f"{scrape_job(monitor)}.json")],
                        "refresh_interval": "1s",
                    }
                ],
            }
            for monitor in self.monitors
        ]


def scrape_job(monitor: dict[str, Any]) -> str:
    return TRAIN_SCRAPE if monitor["kind"] == "PodMonitor" else OPERATOR_SCRAPE


def monitor_endpoint(monitor: dict[str, Any]) -> dict[str, Any]:
    """The one endpoint the chart's PodMonitor or ServiceMonitor declares."""
    key = "podMetricsEndpoints" if monitor["kind"] == "PodMonitor" else "endpoints"
    (endpoint,) = monitor["spec"][key]
    return dict(endpoint)


def chart_monitors(helm: list[str], values_file: Path) -> dict[str, dict[str, Any]]:
    """The chart's PodMonitor and ServiceMonitor as `helm template` renders them for a cluster
    with the Prometheus Operator's API."""
    rendered = subprocess.run(
        [
            *helm,
            "template",
            RELEASE,
            str(REPO / "charts/kubetune"),
            "-f",
            str(values_file),
            "--api-versions",
            "monitoring.coreos.com/v1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    return {d["kind"]: d for d in docs if d["kind"] in ("PodMonitor", "ServiceMonitor")}


def scraped_urls(prom: Prometheus, job: str) -> list[str]:
    return [t["scrapeUrl"] for t in prom.targets() if t["labels"].get("job") == job]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return str(resp.read().decode())


class TrainScraper(threading.Thread):
    """Keeps the last /metrics text of a train pod Prometheus found that had training series."""

    def __init__(self, prom: Prometheus) -> None:
        super().__init__(daemon=True)
        self.prom = prom
        self.text = ""
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            try:
                for url in scraped_urls(self.prom, TRAIN_SCRAPE):
                    body = fetch(url)
                    if f'finetunejob="{JOB}"' in body and "kubetune_train_step{" in body:
                        self.text = body
            except (OSError, RuntimeError):
                continue


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
    containerd_cluster: ContainerdCluster,
    s3_server: Any,
    loaded_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """The chart's operator runs one tiny job end to end while Prometheus scrapes its pods."""
    cluster, kc = containerd_cluster, containerd_cluster.kubeconfig
    workdir = tmp_path_factory.mktemp("observability")
    operator_ref = built_image("operator")
    cluster.load_image(operator_ref)
    suffix = uuid.uuid4().hex[:6]
    op_ns, ns = f"kubetune-{suffix}", f"obs-{suffix}"
    for namespace in (op_ns, ns):
        restricted_namespace(cluster, namespace)
    data = tenant_data(cluster, s3_server, ns, f"obs-{suffix}")
    repository, tag = operator_ref.rsplit(":", 1)
    values = {
        "watchNamespaces": [ns],
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "operator": {
            "trainerImage": loaded_image,
            "storageEndpoints": [data["endpoint"]],
            "progressInterval": 2,
            "resyncInterval": 5,
        },
    }
    values_file = workdir / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm = [str(cluster.bin_dir / "helm"), "--kubeconfig", str(kc), "--namespace", op_ns]
    monitors = chart_monitors(helm, values_file)
    let_helm_adopt_crd(kc, RELEASE, op_ns)
    discovery = MonitorDiscovery(cluster, list(monitors.values()), workdir / "targets")
    prom: Prometheus | None = None
    scraper: TrainScraper | None = None
    start = time.time()
    try:
        installed = subprocess.run(
            [
                *helm,
                "install",
                RELEASE,
                str(REPO / "charts/kubetune"),
                "-f",
                str(values_file),
                "--wait",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=240,
        )
        assert installed.returncode == 0, installed.stdout + installed.stderr
        (op_pod,) = get_json(kc, op_ns, "pods", "-l", "app.kubernetes.io/name=kubetune")["items"]
        discovery.start()
        prom = Prometheus.start([], workdir / "prom", scrape_configs=discovery.scrape_configs())
        scraper = TrainScraper(prom)
        scraper.start()

        def dump() -> str:
            name = op_pod["metadata"]["name"]
            op_logs = kubectl(kc, "-n", op_ns, "logs", name, "--tail=60", check=False).stdout
            return f"{diagnose(kc, ns, JOB, None)}\noperator pod log:\n{op_logs}"

        # With BLEU, as the example has it: the results panels show it.
        apply(kc, ns, node_job(data, JOB, bleu=True, maxSteps=MAX_STEPS))

        def finished() -> dict[str, Any] | None:
            ftj = get_ftj(kc, ns, JOB)
            phase = (ftj.get("status") or {}).get("phase")
            return ftj if phase in ("Succeeded", "Failed") else None

        ftj = wait_for(finished, RUN_TIMEOUT, f"{JOB} to finish", dump=dump, interval=2)
        assert ftj["status"]["phase"] == "Succeeded", dump()
        # The operator's result gauges reach Prometheus within a few scrapes.
        wait_for(
            lambda: prom.query(f'kubetune_finetunejob_bleu{{finetunejob="{JOB}"}}'),
            60,
            "the result gauges in Prometheus",
            dump=dump,
        )
        (operator_url,) = scraped_urls(prom, OPERATOR_SCRAPE)
        yield {
            "kubeconfig": kc,
            "prom": prom,
            "ns": ns,
            "op_ns": op_ns,
            "op_pod": get_json(kc, op_ns, "pod", op_pod["metadata"]["name"]),
            "operator_ref": operator_ref,
            "trainer_ref": loaded_image,
            "ftj": ftj,
            "start": start,
            # A little past now: range-query points are aligned to `start`, and the last
            # one must not fall just before the first sample of a gauge that appeared late.
            "end": time.time() + 4,
            "train_text": scraper.text,
            "operator_text": fetch(operator_url),
        }
    finally:
        discovery.stopping.set()
        if scraper is not None:
            scraper.stopping.set()
        if prom is not None:
            prom.stop()
        subprocess.run([*helm, "uninstall", RELEASE, "--wait"], capture_output=True, check=False)
        for namespace in (op_ns, ns):
            kubectl(kc, "delete", "namespace", namespace, "--wait=false", check=False)


def test_the_charts_operator_runs_from_its_image_and_its_finetunejob_succeeds(
    observed_run: dict[str, Any],
) -> None:
    """`helm install` on the real node: the operator pod runs the operator image (non-root,
    read-only root, the chart's probes), logs in with its ServiceAccount and the chart's RBAC,
    and runs a FineTuneJob whose stage pods run the trainer image: nothing on the host."""
    kc, ns = observed_run["kubeconfig"], observed_run["ns"]
    (op_status,) = observed_run["op_pod"]["status"]["containerStatuses"]
    assert op_status["ready"]
    assert op_status["image"].endswith(observed_run["operator_ref"].split("/", 1)[1])
    results = observed_run["ftj"]["status"]["results"]
    assert results["perplexity"] < results["baselinePerplexity"]
    pods = get_json(kc, ns, "pods", "-l", f"kubetune.io/job={JOB}")["items"]
    images = {p["status"]["containerStatuses"][0]["image"] for p in pods}
    assert images == {observed_run["trainer_ref"]}, images


def test_prometheus_finds_the_pods_the_charts_monitors_select_by_their_pod_addresses(
    observed_run: dict[str, Any],
) -> None:
    prom, kc = observed_run["prom"], observed_run["kubeconfig"]
    (operator_target,) = [t for t in prom.targets() if t["labels"]["job"] == OPERATOR_SCRAPE]
    op_pod = observed_run["op_pod"]
    assert operator_target["health"] == "up", operator_target
    assert operator_target["labels"]["pod"] == op_pod["metadata"]["name"]
    host = urllib.parse.urlsplit(operator_target["scrapeUrl"]).hostname
    assert host == op_pod["status"]["podIP"] != "127.0.0.1"
    # The train pod has finished, so it is gone from the targets; its series name it.
    ns = observed_run["ns"]
    pods = get_json(kc, ns, "pods", "-l", f"kubetune.io/job={JOB},kubetune.io/stage=train")
    train_pods = {p["metadata"]["name"] for p in pods["items"]}
    series = prom.query(
        f'max_over_time(kubetune_train_step{{finetunejob="{JOB}", job="{TRAIN_SCRAPE}"}}[30m])'
    )
    assert series, "no train pod was scraped"
    for labels in (s["metric"] for s in series):
        assert labels["pod"] in train_pods, (labels, train_pods)
        assert labels["namespace"] == ns and "exported_namespace" not in labels, labels
    # honorLabels: the operator's series keep the FineTuneJob's namespace, not the operator's.
    (ppl,) = prom.query(
        f'kubetune_finetunejob_perplexity{{finetunejob="{JOB}", model="fine_tuned"}}'
    )
    assert ppl["metric"]["namespace"] == ns != observed_run["op_ns"], ppl["metric"]


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
