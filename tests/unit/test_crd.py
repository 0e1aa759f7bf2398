"""The generated CRD: no drift from the schema, structural, documented, with CEL rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

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
    assert sorted(rules) == sorted(expected) and len(rules) >= 7
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Progress", "PPL", "Base-PPL", "BLEU", "Age"} <= columns
    assert version["subresources"] == {"status": {}}
    assert doc["spec"]["names"]["shortNames"] == ["ftj"]


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
