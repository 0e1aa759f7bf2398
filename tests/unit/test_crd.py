"""The generated CRD: no drift from the schema, structural, documented, with CEL rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from cel_cases import CEL_CASES, FIELD_CASES, CelCase, FieldCase

from kubetune import crd, schema

ROOT = Path(__file__).resolve().parents[2]


def test_generated_files_match_the_schema() -> None:
    for rel, text in crd.outputs().items():
        path = ROOT / rel
        assert path.exists(), f"{rel} missing: run `make generate`"
        assert path.read_text() == text, f"{rel} drifted from schema.py: run `make generate`"


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    if "items" in node:
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def _root() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / crd.CRD_PATH).read_text())
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _node_at(api_path: str) -> dict[str, Any]:
    """The CRD schema node of an API field path (``spec.a.b[0].c``; map keys by name)."""
    node = _root()
    for part in api_path.split("."):
        name, _, index = part.partition("[")
        if "properties" in node and name in node["properties"]:
            node = node["properties"][name]
        else:  # a key of a map
            node = node["additionalProperties"]
        if index:
            node = node["items"]
    return node


def _value_at(manifest: dict[str, Any], api_path: str) -> Any:
    value: Any = manifest
    for part in api_path.split("."):
        name, _, index = part.partition("[")
        value = value[name]
        if index:
            value = value[int(index.rstrip("]"))]
    return value


def _schema_allows(node: dict[str, Any], value: Any) -> bool:
    """The single-field checks the API server makes (pattern, enum, lengths) on a string."""
    if node["type"] != "string" or not isinstance(value, str):
        return False
    if "enum" in node and value not in node["enum"]:
        return False
    if len(value) > node.get("maxLength", len(value)) or len(value) < node.get("minLength", 0):
        return False
    # Go's regexp (RE2) and Python agree on these patterns: no lookaround, no backslashes.
    return "pattern" not in node or re.search(node["pattern"], value) is not None


def test_schema_is_structural() -> None:
    for path, node in _walk(_root()):
        assert "type" in node, f"{path} has no type"
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs"):
            assert banned not in node, f"{path} has {banned}"


def test_every_spec_field_has_a_description() -> None:
    spec = _root()["properties"]["spec"]
    missing = [
        p
        for p, n in _walk(spec)
        if p and "description" not in n and not p.endswith("[]") and not p.endswith("{}")
    ]
    assert not missing, missing


def test_cel_rules_and_printer_columns_are_present() -> None:
    doc = yaml.safe_load((ROOT / crd.CRD_PATH).read_text())
    version = doc["spec"]["versions"][0]
    rules = [
        r["rule"]
        for _, n in _walk(version["schema"]["openAPIV3Schema"])
        for r in n.get("x-kubernetes-validations", [])
    ]
    expected = [
        r.expression
        for m in crd._models_by_name(schema.FineTuneJobSpec).values()
        for r in getattr(m, "cel_rules", ())
    ]
    assert rules and sorted(rules) == sorted(expected)  # tests/cel_cases.py pins each rule
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Progress", "PPL", "Base-PPL", "BLEU", "Age"} <= columns
    assert version["subresources"] == {"status": {}}


def test_resource_names_the_docs_tell_users_to_type_are_registered_by_the_crd() -> None:
    names = yaml.safe_load((ROOT / crd.CRD_PATH).read_text())["spec"]["names"]
    registered = {names["plural"], names["singular"], *names.get("shortNames", [])}
    docs = [ROOT / "README.md", ROOT / "charts/kubetune/README.md", *ROOT.glob("docs/*.md")]
    docs += ROOT.glob("examples/**/*.yaml")
    # Kubernetes' own resources the docs may show beside ours, and Kueue's Workloads.
    builtin = {"pods", "jobs", "events", "configmaps", "secrets", "services", "crd", "nodes"}
    builtin.add("workloads")
    typed = {
        (path.relative_to(ROOT).as_posix(), resource)
        for path in docs
        for resource in re.findall(r"kubectl (?:get|explain) ([a-z]+)", path.read_text())
        if resource not in builtin
    }
    assert typed, "the docs show no `kubectl get` of a FineTuneJob"
    unregistered = sorted((where, r) for where, r in typed if r not in registered)
    assert not unregistered, f"not a name of the FineTuneJob CRD ({registered}): {unregistered}"


@pytest.mark.parametrize("case", CEL_CASES, ids=lambda c: c.id)
def test_crd_carries_each_cross_field_case_rule_where_the_api_server_names_it(
    case: CelCase,
) -> None:
    # tests/cluster/test_operator.py expects case.field in the API server's answer.
    node = _node_at(case.object_path)
    rule = {"rule": case.rule.expression, "message": case.rule.message}
    if case.rule.field:
        rule["fieldPath"] = case.rule.field
    assert rule in node["x-kubernetes-validations"]


@pytest.mark.parametrize("case", FIELD_CASES, ids=lambda c: c.id)
def test_crd_refuses_each_malformed_field_value_and_allows_its_valid_counterpart(
    case: FieldCase,
) -> None:
    # tests/cluster/test_spec_validation.py sends the same cases to a real API server.
    node = _node_at(case.field)
    assert not _schema_allows(node, _value_at(case.manifest(), case.field))
    assert _schema_allows(node, _value_at(case.valid_manifest(), case.field))


def test_crd_patterns_have_no_backslashes_or_lookaround() -> None:
    # The same text is a Go regexp for the API server, a Python one for parse_job, and
    # a CEL string literal in the nodeSelector rule.
    patterns = [n["pattern"] for _, n in _walk(_root()) if "pattern" in n]
    assert len(patterns) > 10
    for pattern in patterns:
        assert "\\" not in pattern and "(?=" not in pattern and "(?!" not in pattern, pattern
        assert pattern.startswith("^"), pattern


def test_job_api_formats_reach_the_crd() -> None:
    resources = _root()["properties"]["spec"]["properties"]["resources"]
    props = resources["properties"]
    assert props["cpu"]["pattern"] == props["memory"]["pattern"] == schema.QUANTITY_PATTERN
    assert props["serviceAccountName"]["pattern"] == schema.DNS_SUBDOMAIN_PATTERN
    assert props["nodeSelector"]["additionalProperties"]["pattern"] == schema.LABEL_VALUE_PATTERN
    assert props["nodeSelector"]["maxProperties"] == 64
    assert props["tolerations"]["maxItems"] == 64
    toleration = props["tolerations"]["items"]["properties"]
    assert toleration["operator"]["enum"] == ["Exists", "Equal"]
    assert toleration["effect"]["enum"] == ["", "NoSchedule", "PreferNoSchedule", "NoExecute"]
    storage = _root()["properties"]["spec"]["properties"]["storage"]["properties"]
    assert storage["credentialsSecret"]["pattern"] == schema.DNS_SUBDOMAIN_PATTERN
    assert storage["output"]["pattern"] == schema.URI_PATTERN
    assert "system-" in props["priorityClassName"]["description"]


def test_bounds_and_enums_reach_the_crd() -> None:
    training = _root()["properties"]["spec"]["properties"]["training"]["properties"]
    assert training["batchSize"]["minimum"] == 1
    assert training["precision"]["enum"] == ["bf16", "fp16", "fp32"]
    assert training["learningRate"]["exclusiveMinimum"] is True
    assert training["batchSize"]["default"] == 8


def test_chart_crd_is_kept_on_uninstall() -> None:
    chart = yaml.safe_load((ROOT / crd.CHART_CRD_PATH).read_text())
    assert chart["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert chart["spec"] == yaml.safe_load((ROOT / crd.CRD_PATH).read_text())["spec"]
