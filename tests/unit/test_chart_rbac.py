"""The operator's RBAC without a cluster: rbac.py's two lists, the chart's (Cluster)Roles, and
the namespaces the operator is told to watch.

Watching every namespace, the operator gets one ClusterRole with every rule; watching named
namespaces (``watchNamespaces``), a Role and RoleBinding in each and a ClusterRole only for
rules on cluster-scoped resources. The scope of every resource a rule names is checked against
the Kubernetes OpenAPI document of the pinned release (tests/k8s_schemas.py), so a rule on a
cluster-scoped resource (e.g. ``nodes``) cannot end up in a Role, where it would grant nothing.
Run with ``pytest tests/unit/test_chart_rbac.py`` (needs helm, as test_chart_static.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_schemas import SchemasUnavailable, swagger_from_go_module
from test_chart_static import (  # the same chart, release and helpers as the static tests
    CHART,
    NAMESPACE,
    RELEASE,
    ROOT,
    _container,
    _kinds,
    _one,
    _run,
    render,
)

from harness.tools import default_bin_dir
from kubetune.schema import GROUP, PLURAL
from kubetune_operator import rbac
from kubetune_operator.config import OperatorConfig

TEAMS = {"watchNamespaces": "{team-a,team-b}"}
RBAC_KINDS = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
# What an operator of named namespaces must never hold cluster-wide (issue 12): reading
# Secrets, making or deleting workloads and ConfigMaps, reading pods, in every namespace.
NEVER_CLUSTER_WIDE = {"secrets", "jobs", "configmaps", "pods", "services", PLURAL}


@pytest.fixture(scope="module")
def bin_dir(request: pytest.FixtureRequest) -> Path:
    """helm: the built one if present, else the harness builds it (as test_chart_static.py)."""
    found = default_bin_dir()
    if (found / "helm").exists():
        return found
    tools: Path = request.getfixturevalue("tools_bin")
    return tools


def _rbac_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in RBAC_KINDS]


def _resources(rules: list[dict[str, Any]]) -> set[str]:
    return {r.split("/")[0] for rule in rules for r in rule["resources"]}


def _env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container(docs)["env"] if "value" in e}


# ----------------------------------------------------------------------------- rbac.py


@pytest.fixture(scope="module")
def namespaced_resources() -> dict[tuple[str, str], bool]:
    """(group, plural) -> namespaced?, for every resource of the pinned Kubernetes release."""
    try:
        paths = json.loads(swagger_from_go_module().read_text())["paths"]
    except SchemasUnavailable as err:
        pytest.fail(f"no offline Kubernetes OpenAPI document: {err}", pytrace=False)
    scopes: dict[tuple[str, str], bool] = {}
    pattern = re.compile(r"^/api(?:s/(?P<group>[^/]+))?/[^/]+/(?P<ns>namespaces/\{namespace\}/)?")
    for path in paths:
        match = pattern.match(path)
        if match is None or "/watch/" in path:
            continue
        plural = path[match.end() :].split("/")[0]
        if not plural or "{" in plural:
            continue
        key = (match["group"] or "", plural)
        scopes[key] = scopes.get(key, False) or bool(match["ns"])
    crd = yaml.safe_load((ROOT / "crds/finetunejob.yaml").read_text())
    scopes[(GROUP, PLURAL)] = crd["spec"]["scope"] == "Namespaced"
    return scopes


def _scopes(
    rules: list[dict[str, Any]], known: dict[tuple[str, str], bool]
) -> dict[tuple[str, str], bool]:
    found = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                key = (group, resource.split("/")[0])
                assert key in known, f"rbac.py names {key}, which Kubernetes does not serve"
                found[key] = known[key]
    return found


def test_namespaced_rules_name_only_namespaced_resources_and_cluster_rules_only_the_others(
    namespaced_resources: dict[tuple[str, str], bool],
) -> None:
    namespaced = _scopes(rbac.NAMESPACED_RULES, namespaced_resources)
    cluster = _scopes(rbac.CLUSTER_RULES, namespaced_resources)
    misplaced = [k for k, scoped in namespaced.items() if not scoped]
    assert not misplaced, f"cluster-scoped {misplaced} belong in rbac.CLUSTER_RULES"
    misplaced = [k for k, scoped in cluster.items() if scoped]
    assert not misplaced, f"namespaced {misplaced} belong in rbac.NAMESPACED_RULES"
    assert rbac.RULES == rbac.NAMESPACED_RULES + rbac.CLUSTER_RULES
    assert namespaced_resources[("", "nodes")] is False  # the check knows cluster scope
    assert namespaced_resources[("", "secrets")] is True


def test_rbac_rules_file_is_generated_from_rbac_py() -> None:
    text = (CHART / "files/rbac-rules.yaml").read_text()
    assert text == rbac.chart_rules_yaml(), (
        "charts/kubetune/files/rbac-rules.yaml drifted from operator/kubetune_operator/rbac.py: "
        "run `make generate`"
    )


def test_rbac_module_prints_a_role_and_binding_per_watched_namespace() -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "kubetune_operator.rbac", "--namespace", "ops"),
            *("--watch-namespace", "team-a,team-b", "--watch-namespace", "team-a"),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "&id" not in out  # every Role spelt out, no YAML anchors
    docs = list(yaml.safe_load_all(out))
    assert [(d["kind"], d["metadata"].get("namespace")) for d in docs] == [
        ("ServiceAccount", "ops"),
        ("Role", "team-a"),
        ("RoleBinding", "team-a"),
        ("Role", "team-b"),
        ("RoleBinding", "team-b"),
        *([("ClusterRole", None), ("ClusterRoleBinding", None)] if rbac.CLUSTER_RULES else []),
    ]
    assert docs[1]["rules"] == rbac.NAMESPACED_RULES
    assert docs[2]["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": "ops"}
    ]


# ----------------------------------------------------------------------------- chart


def test_cluster_wide_install_binds_a_cluster_role_with_every_rule(bin_dir: Path) -> None:
    docs = render(bin_dir)
    role = _one(docs, "ClusterRole")
    assert role["rules"] == rbac.RULES
    binding = _one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": _one(docs, "ServiceAccount")["metadata"]["name"],
            "namespace": NAMESPACE,
        }
    ]
    assert not {"Role", "RoleBinding"} & set(_kinds(docs))
    assert _env(docs)["KUBETUNE_NAMESPACE"] == ""
    assert OperatorConfig.from_env(_env(docs)).namespaces == ()


def test_watching_named_namespaces_installs_a_role_and_binding_in_each(bin_dir: Path) -> None:
    docs = render(bin_dir, TEAMS)
    account = _one(docs, "ServiceAccount")["metadata"]["name"]
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for namespace, role in roles.items():
        assert role["rules"] == rbac.NAMESPACED_RULES, namespace
        binding = bindings[namespace]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]


def test_strictest_install_has_no_cluster_role_at_all(bin_dir: Path) -> None:
    docs = render(bin_dir, {**TEAMS, "rbac.clusterScoped": "false"})
    kinds = [d["kind"] for d in docs]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    assert kinds.count("Role") == 2
    # Watching every namespace still needs its ClusterRole, without the node rule.
    [cluster_role] = [
        d for d in render(bin_dir, {"rbac.clusterScoped": "false"}) if d["kind"] == "ClusterRole"
    ]
    assert cluster_role["rules"] == rbac.NAMESPACED_RULES


def test_watching_named_namespaces_grants_nothing_cluster_wide_on_namespaced_resources(
    bin_dir: Path,
) -> None:
    docs = render(bin_dir, TEAMS)
    cluster_rules = [r for d in docs if d["kind"] == "ClusterRole" for r in d["rules"]]
    assert not _resources(cluster_rules) & NEVER_CLUSTER_WIDE, cluster_rules
    assert cluster_rules == rbac.CLUSTER_RULES
    assert ("ClusterRole" in _kinds(docs)) == ("ClusterRoleBinding" in _kinds(docs))
    assert ("ClusterRole" in _kinds(docs)) == bool(rbac.CLUSTER_RULES)


def test_a_cluster_scoped_rule_stays_in_a_cluster_role_when_named_namespaces_are_watched(
    bin_dir: Path,
    tmp_path: Path,
) -> None:
    """The chart's handling of a cluster-scoped rule, whatever rbac.CLUSTER_RULES holds now."""
    chart = tmp_path / "kubetune"
    shutil.copytree(CHART, chart)
    extra = {"apiGroups": ["storage.k8s.io"], "resources": ["storageclasses"], "verbs": ["get"]}
    rules = {"namespacedRules": rbac.NAMESPACED_RULES, "clusterRules": [extra]}
    (chart / "files/rbac-rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))

    def rendered(*values: str) -> list[dict[str, Any]]:
        cmd = [str(bin_dir / "helm"), "template", RELEASE, str(chart), "-n", NAMESPACE, *values]
        return [d for d in yaml.safe_load_all(_run(cmd).stdout) if d]

    scoped = rendered("--set", "watchNamespaces={team-a,team-b}")
    assert _one(scoped, "ClusterRole")["rules"] == [extra]
    assert _one(scoped, "ClusterRoleBinding")["roleRef"]["kind"] == "ClusterRole"
    assert all(d["rules"] == rbac.NAMESPACED_RULES for d in scoped if d["kind"] == "Role")
    assert _one(rendered(), "ClusterRole")["rules"] == [*rbac.NAMESPACED_RULES, extra]


def test_chart_and_rbac_py_make_the_same_rbac_objects(bin_dir: Path) -> None:
    for values, watched in (({}, []), (TEAMS, ["team-a", "team-b"])):
        docs = render(bin_dir, values)
        name = _one(docs, "ServiceAccount")["metadata"]["name"]

        def essentials(objs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
            return sorted(
                (
                    o["kind"],
                    o["metadata"].get("namespace", ""),
                    json.dumps(o.get("rules")),
                    json.dumps(o.get("roleRef")),
                    json.dumps(o.get("subjects")),
                )
                for o in objs
            )

        chart = [*_rbac_objects(docs), _one(docs, "ServiceAccount")]
        printed = rbac.manifests(NAMESPACE, name, watched)
        assert essentials(chart) == essentials(printed), values


def test_operator_deployment_watches_exactly_the_named_namespaces(bin_dir: Path) -> None:
    env = _env(render(bin_dir, TEAMS))
    assert env["KUBETUNE_NAMESPACE"] == "team-a,team-b"
    assert OperatorConfig.from_env(env).namespaces == ("team-a", "team-b")


def test_deprecated_watch_namespace_is_added_to_watch_namespaces(bin_dir: Path) -> None:
    alone = render(bin_dir, {"watchNamespace": "ml"})
    assert [d["metadata"]["namespace"] for d in alone if d["kind"] == "Role"] == ["ml"]
    assert _env(alone)["KUBETUNE_NAMESPACE"] == "ml"
    both = render(bin_dir, {**TEAMS, "watchNamespace": "team-a"})
    assert sorted(d["metadata"]["namespace"] for d in both if d["kind"] == "Role") == [
        "team-a",
        "team-b",
    ]
    assert _env(both)["KUBETUNE_NAMESPACE"] == "team-a,team-b"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"watchNamespaces": "{Team_A}"}, "/watchNamespaces/0"),
        ({"watchNamespaces": "{team-*}"}, "/watchNamespaces/0"),  # no patterns: a Role per name
        ({"watchNamespaces": "{a,a}"}, "/watchNamespaces"),
        ({"watchNamespaces": "{team-a,team-b}"}, ""),
    ],
    ids=lambda v: str(v),
)
def test_values_schema_checks_each_watched_namespace(
    bin_dir: Path,
    values: dict[str, str],
    message: str,
) -> None:
    cmd = [str(bin_dir / "helm"), "template", RELEASE, str(CHART)]
    result = _run(cmd + [a for k, v in values.items() for a in ("--set", f"{k}={v}")], check=False)
    if not message:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0, f"{values} was accepted"
    assert message in result.stderr, result.stderr


# ----------------------------------------------------------------------------- operator


def test_operator_reads_a_comma_separated_list_of_namespaces() -> None:
    cfg = OperatorConfig.from_env({"KUBETUNE_NAMESPACE": " team-a, team-b,,team-a "})
    assert cfg.namespaces == ("team-a", "team-b")
    assert cfg.namespace == "team-a,team-b"
    assert OperatorConfig.from_env({"KUBETUNE_NAMESPACE": "ml"}).namespaces == ("ml",)
    assert OperatorConfig.from_env({}).namespaces == ()


@pytest.mark.parametrize("raw", ["Team_A", "team-*", "team-a,-b", "a" * 64])
def test_operator_refuses_a_namespace_that_is_not_an_exact_name(raw: str) -> None:
    with pytest.raises(ValueError, match=r"KUBETUNE_NAMESPACE=.*is not a namespace name"):
        OperatorConfig.from_env({"KUBETUNE_NAMESPACE": f"ok,{raw}"})
