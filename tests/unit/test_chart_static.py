"""The Helm chart without a cluster: helm lint, helm template, kubeconform, values.schema.json.

helm and kubeconform are the harness's (scripts/build-tools.sh, ~/.cache/kubetune/tools/bin or
$KUBETUNE_TOOLS_DIR/bin). kubeconform validates against schemas made offline from the
Kubernetes OpenAPI document of the pinned release (tests/k8s_schemas.py) plus the FineTuneJob
CRD; only the Prometheus Operator's kinds have no schema here and are skipped by name (their
content is checked by the tests below and by promtool in test_alerts.py).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_schemas import SchemasUnavailable, swagger_from_go_module, write_schemas

from harness.tools import default_bin_dir

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/kubetune"
RELEASE = "kubetune"
NAMESPACE = "kubetune-system"
MONITORING = "monitoring.coreos.com/v1"
MONITORING_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")


@pytest.fixture(scope="module")
def bin_dir(request: pytest.FixtureRequest) -> Path:
    """helm and kubeconform: the built ones if present, else the harness builds them."""
    found = default_bin_dir()
    if all((found / name).exists() for name in ("helm", "kubeconform")):
        return found
    tools: Path = request.getfixturevalue("tools_bin")
    return tools


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}")
    return result


def _set_args(values: dict[str, str] | None) -> list[str]:
    return [a for k, v in (values or {}).items() for a in ("--set", f"{k}={v}")]


def render(
    bin_dir: Path, values: dict[str, str] | None = None, api_versions: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    cmd = [str(bin_dir / "helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    cmd += _set_args(values)
    for api in api_versions:
        cmd += ["--api-versions", api]
    return [d for d in yaml.safe_load_all(_run(cmd).stdout) if d]


def _one(docs: list[dict[str, Any]], kind: str, name_part: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]
    assert len(found) == 1, (
        f"expected one {kind} {name_part!r}, got {[d['metadata']['name'] for d in found]}"
    )
    return found[0]


def _kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][
        0
    ]
    return container


# ----------------------------------------------------------------------------- lint


@pytest.mark.parametrize(
    "values",
    [{}, {"watchNamespace": "ml"}, {"watchNamespaces": "{team-a,team-b}"}],
    ids=["cluster-wide", "one-namespace", "named-namespaces"],
)
def test_helm_lint_strict_passes(bin_dir: Path, values: dict[str, str]) -> None:
    result = _run([str(bin_dir / "helm"), "lint", "--strict", str(CHART), *_set_args(values)])
    assert "0 chart(s) failed" in result.stdout


# ----------------------------------------------------------------------------- objects


def test_default_render_has_operator_rbac_crd_metrics_and_dashboards(bin_dir: Path) -> None:
    docs = render(bin_dir)
    assert _kinds(docs) == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "Deployment",
            "Service",
            "ServiceAccount",
        ]
    )
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]


def test_monitoring_objects_render_only_when_the_cluster_serves_their_api(bin_dir: Path) -> None:
    assert not set(MONITORING_KINDS) & set(_kinds(render(bin_dir)))
    docs = render(bin_dir, api_versions=(MONITORING,))
    assert set(MONITORING_KINDS) <= set(_kinds(docs))
    for kind, toggle in zip(
        MONITORING_KINDS, ("serviceMonitor", "podMonitor", "prometheusRule"), strict=True
    ):
        off = render(bin_dir, {f"metrics.{toggle}.enabled": "false"}, api_versions=(MONITORING,))
        kinds = _kinds(off)
        assert kind not in kinds
        assert set(MONITORING_KINDS) - {kind} <= set(kinds)


def test_service_monitor_scrapes_the_operator_metrics_service(bin_dir: Path) -> None:
    docs = render(bin_dir, api_versions=(MONITORING,))
    monitor = _one(docs, "ServiceMonitor")
    service = _one(docs, "Service", "-metrics")
    deployment = _one(docs, "Deployment")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert (
        monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    )
    # The operator's series carry the FineTuneJob's namespace, not the operator's: keep it.
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    from kubetune_operator.config import OperatorConfig

    container = _container(docs)
    listens_on = OperatorConfig.from_env(
        {e["name"]: e["value"] for e in container["env"] if "value" in e}
    ).metrics_port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == listens_on != 0


def test_pod_monitor_selects_the_train_pods_the_operator_builds(bin_dir: Path) -> None:
    from kubetune.contract import Env
    from kubetune.schema import parse_job
    from kubetune_operator.builders import RunRef, build_stage_job
    from kubetune_operator.config import OperatorConfig

    manifest = yaml.safe_load((ROOT / "examples/tldr-gpt2.yaml").read_text())
    manifest["metadata"].update(namespace="ml", uid="0f7c9d52-5b1e-4c0e-9a55-3f1d2b6c7e80")
    job = parse_job(manifest)
    cfg = OperatorConfig()
    monitor = _one(render(bin_dir, api_versions=(MONITORING,)), "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    for stage in ("prepare", "train", "evaluate"):
        pod = build_stage_job(job, RunRef.for_generation(job, 1), stage, cfg)["spec"]["template"]
        selected = selector.items() <= pod["metadata"]["labels"].items()
        assert selected == (stage == "train"), stage
    train = build_stage_job(job, RunRef.for_generation(job, 1), "train", cfg)["spec"]["template"]
    container = train["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert ports[port] == int(env[Env.METRICS_PORT]) != 0  # where the trainer's exporter listens
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    scoped = render(bin_dir, {"watchNamespace": "ml"}, api_versions=(MONITORING,))
    assert _one(scoped, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}


def test_prometheus_rule_embeds_the_promtool_checked_alerts_file(bin_dir: Path) -> None:
    rule = _one(render(bin_dir, api_versions=(MONITORING,)), "PrometheusRule")
    alerts = yaml.safe_load((CHART / "files/alerts.yaml").read_text())
    assert rule["spec"] == alerts


# ----------------------------------------------------------------------------- operator pod


def test_operator_deployment_is_hardened_and_probed(bin_dir: Path) -> None:
    docs = render(bin_dir)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = _container(docs)
    assert container["command"] == ["kubetune", "operator"]
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert set(container["resources"]) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    health = next(p for p in container["ports"] if p["name"] == "health")
    assert health["containerPort"] == 8081
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]


def test_operator_env_sets_every_setting_the_operator_reads(bin_dir: Path) -> None:
    """Every KUBETUNE_* variable config.py reads is set, and OperatorConfig parses the values."""
    from kubetune_operator.config import OperatorConfig

    read = set(
        re.findall(
            r'"(KUBETUNE_[A-Z_]+)"', (ROOT / "operator/kubetune_operator/config.py").read_text()
        )
    )
    assert len(read) >= 9
    values = {
        "watchNamespaces": "{ml,ops}",
        "operator.maxConcurrent": "7",
        "operator.progressInterval": "2.5",
        "operator.unschedulableTimeout": "90",
        "operator.resyncInterval": "30",
        "operator.logLevel": "DEBUG",
        "operator.metricsPort": "9090",
        "operator.healthPort": "9091",
        "operator.trainerImage": "registry.local/trainer:dev",
        "operator.storageEndpoints": "{https://minio.storage.svc:9000,http://ceph:7480}",
    }
    container = _container(render(bin_dir, values))
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert read <= set(env), f"not set by the chart: {sorted(read - set(env))}"
    cfg = OperatorConfig.from_env(env)
    assert (cfg.namespaces, cfg.max_concurrent, cfg.progress_interval) == (("ml", "ops"), 7, 2.5)
    assert (cfg.unschedulable_timeout, cfg.resync_interval, cfg.log_level) == (90.0, 30.0, "DEBUG")
    assert (cfg.metrics_port, cfg.health_port) == (9090, 9091)
    assert cfg.trainer_image == "registry.local/trainer:dev"
    assert cfg.storage_endpoints == ("https://minio.storage.svc:9000", "http://ceph:7480")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "health": 9091}
    default = OperatorConfig.from_env(
        {e["name"]: e["value"] for e in _container(render(bin_dir))["env"] if "value" in e}
    )
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert default.trainer_image == f"ghcr.io/kubetune/trainer:{app_version}"
    assert default == OperatorConfig(trainer_image=default.trainer_image)


# ----------------------------------------------------------------------------- RBAC
# The (Cluster)Roles per watched namespace: test_chart_rbac.py.


def test_rbac_and_service_account_can_be_left_to_the_user(bin_dir: Path) -> None:
    docs = render(
        bin_dir,
        {"rbac.create": "false", "serviceAccount.create": "false", "serviceAccount.name": "ops"},
    )
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"} & set(
        _kinds(docs)
    )
    assert _one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


# ----------------------------------------------------------------------------- CRD, dashboards


def test_crd_is_the_generated_one_kept_on_uninstall_and_optional(bin_dir: Path) -> None:
    crd = _one(render(bin_dir), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    generated = yaml.safe_load((ROOT / "crds/finetunejob.yaml").read_text())
    assert crd["spec"] == generated["spec"]
    assert "CustomResourceDefinition" not in _kinds(render(bin_dir, {"crds.install": "false"}))


def test_dashboards_config_map_is_labelled_for_grafana_with_both_dashboards(bin_dir: Path) -> None:
    docs = render(bin_dir)
    cm = _one(docs, "ConfigMap", "-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    for path in sorted((CHART / "dashboards").glob("*.json")):
        assert json.loads(cm["data"][f"kubetune-{path.name}"]) == json.loads(path.read_text())
    custom = _one(
        render(
            bin_dir,
            {
                "grafana.dashboards.label": "dash",
                "grafana.dashboards.labelValue": "yes",
                "grafana.dashboards.namespace": "monitoring",
            },
        ),
        "ConfigMap",
        "-dashboards",
    )
    assert custom["metadata"]["labels"]["dash"] == "yes"
    assert custom["metadata"]["namespace"] == "monitoring"
    assert "ConfigMap" not in _kinds(render(bin_dir, {"grafana.dashboards.enabled": "false"}))


# ----------------------------------------------------------------------------- kubeconform


@pytest.fixture(scope="module")
def schema_location(tmp_path_factory: pytest.TempPathFactory) -> str:
    try:
        swagger = json.loads(swagger_from_go_module().read_text())
    except SchemasUnavailable as err:
        pytest.fail(f"no offline Kubernetes schemas: {err}", pytrace=False)
    crd = yaml.safe_load((ROOT / "crds/finetunejob.yaml").read_text())
    return write_schemas(swagger, tmp_path_factory.mktemp("schemas"), crds=[crd])


def _kubeconform(
    bin_dir: Path, location: str, files: list[Path], *extra: str
) -> subprocess.CompletedProcess[str]:
    return _run(
        [
            str(bin_dir / "kubeconform"),
            "-strict",
            "-summary",
            "-output",
            "text",
            "-schema-location",
            location,
            *extra,
            *map(str, files),
        ],
        check=False,
    )


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"watchNamespace": "ml"},
        {"watchNamespaces": "{team-a,team-b}"},
        {"metrics.podMonitor.namespaces[0]": "a"},
    ],
    ids=["default", "watch-namespace", "watch-namespaces", "podmonitor-namespaces"],
)
def test_kubeconform_accepts_every_rendered_object(
    bin_dir: Path, schema_location: str, tmp_path: Path, values: dict[str, str]
) -> None:
    docs = render(bin_dir, values, api_versions=(MONITORING,))
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    result = _kubeconform(bin_dir, schema_location, [out], "-skip", ",".join(MONITORING_KINDS))
    assert result.returncode == 0, result.stdout + result.stderr
    validated = len(docs) - sum(d["kind"] in MONITORING_KINDS for d in docs)
    assert f"Valid: {validated}, Invalid: 0, Errors: 0" in result.stdout, result.stdout


def test_kubeconform_schemas_reject_a_misspelt_field(
    bin_dir: Path, schema_location: str, tmp_path: Path
) -> None:
    docs = render(bin_dir)
    deployment = _one(docs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    out = tmp_path / "broken.yaml"
    out.write_text(yaml.safe_dump(deployment))
    result = _kubeconform(bin_dir, schema_location, [out])
    assert result.returncode != 0
    assert "readinesProbe" in result.stdout


def test_kubeconform_validates_the_example_finetunejobs_against_the_crd(
    bin_dir: Path, schema_location: str, tmp_path: Path
) -> None:
    examples = sorted((ROOT / "examples").glob("*.yaml")) + sorted(
        (ROOT / "examples/gitops/jobs").glob("tldr*.yaml")
    )
    jobs = [p for p in examples if "kind: FineTuneJob" in p.read_text()]
    assert len(jobs) >= 2
    result = _kubeconform(bin_dir, schema_location, jobs)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "bad-job.yaml"
    doc = yaml.safe_load(jobs[0].read_text())
    doc["spec"]["training"] = {"batchSize": 0}
    bad.write_text(yaml.safe_dump(doc))
    result = _kubeconform(bin_dir, schema_location, [bad])
    assert result.returncode != 0 and "batchSize" in result.stdout


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": "-1"}, "/replicaCount"),
        ({"replicaCount": "2"}, "/replicaCount"),
        ({"replicaCountt": "1"}, "replicaCountt"),
        ({"operator.logLevel": "LOUD"}, "/operator/logLevel"),
        ({"operator.maxConcurrent": "0"}, "/operator/maxConcurrent"),
        ({"operator.progressInterval": "soon"}, "/operator/progressInterval"),
        ({"operator.progressInterval": "2.5"}, ""),  # --set passes fractions as strings
        ({"operator.healthPort": "70000"}, "/operator/healthPort"),
        ({"image.pullPolicy": "Sometimes"}, "/image/pullPolicy"),
        ({"metrics.serviceMonitor.interval": "soon"}, "/metrics/serviceMonitor/interval"),
        ({"watchNamespace": "Not_A_Namespace"}, "/watchNamespace"),
        ({"grafana.dashboards.labelValue": "1"}, ""),  # --set makes a string: accepted
    ],
    ids=lambda v: str(v),
)
def test_values_schema_rejects_bad_values_with_the_key(
    bin_dir: Path, values: dict[str, str], message: str
) -> None:
    cmd = [str(bin_dir / "helm"), "template", RELEASE, str(CHART), *_set_args(values)]
    result = _run(cmd, check=False)
    if not message:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0, f"{values} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def _value_keys() -> tuple[list[str], dict[str, Any]]:
    """Dotted keys of values.yaml, down to the level where the schema stops listing properties."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    keys: list[str] = []

    def walk(node: Any, sub: dict[str, Any] | None, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            assert sub is not None and key in sub.get("properties", {}), (
                f"{path} missing from values.schema.json"
            )
            child = sub["properties"][key]
            if isinstance(value, dict) and child.get("additionalProperties") is False:
                walk(value, child, path + ".")
            else:
                keys.append(path)

    walk(values, schema, "")
    return keys, schema


def test_every_value_is_in_the_schema_and_the_readme() -> None:
    keys, _ = _value_keys()
    readme = (CHART / "README.md").read_text()
    missing = [k for k in keys if f"| `{k}` |" not in readme]
    assert not missing, f"charts/kubetune/README.md lacks rows for {missing}"
    assert len(keys) > 40


def test_every_schema_property_has_a_default_in_values_yaml() -> None:
    _, schema = _value_keys()
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(sub: dict[str, Any], node: Any, prefix: str) -> None:
        for key, child in sub.get("properties", {}).items():
            if prefix == "" and key == "global":
                continue
            assert isinstance(node, dict) and key in node, (
                f"{prefix}{key} is in the schema but not in values.yaml"
            )
            if child.get("additionalProperties") is False:
                walk(child, node[key], f"{prefix}{key}.")

    walk(schema, values, "")
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
