"""Offline JSON schemas for kubeconform, made from the Kubernetes OpenAPI document itself.

kubeconform downloads its schemas from GitHub by default, which CI cannot reach. Instead:

* unit tests read ``api/openapi-spec/swagger.json`` of the ``k8s.io/kubernetes`` Go module
  whose version ``tests/cluster/tools/go.mod`` pins (the same source the harness builds its
  kube-apiserver from; ``go mod download`` fetches it through the Go module proxy when the
  module cache lacks it);
* cluster tests read ``/openapi/v2`` from the running kube-apiserver.

``write_schemas(swagger, out_dir, crds)`` writes one standalone, strict schema per kind
(``{kind}{-group-prefix}-{version}.json``, kubeconform's ``{{ .ResourceKind }}{{ .KindSuffix }}``
naming) and one per version of each given CRD, and returns the ``-schema-location`` template.
Strict means ``additionalProperties: false`` on every object with declared properties, as
kubeconform's own ``-strict`` schemas: a misspelt field is an error.

    python -m k8s_schemas OUT_DIR      # (from tests/) writes the schemas of the pinned release
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOOLS_MODULE = ROOT / "tests/cluster/tools"
LOCATION = "{{ .ResourceKind }}{{ .KindSuffix }}.json"

# Types the OpenAPI document declares as strings but that accept numbers too.
_INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
_QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}


class SchemasUnavailable(RuntimeError):
    """The OpenAPI document could not be found or downloaded."""


def _go() -> str:
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None
    )
    if go is None:
        raise SchemasUnavailable("no `go` on PATH (needed to locate the k8s.io/kubernetes module)")
    return go


def swagger_from_go_module() -> Path:
    """swagger.json of the k8s.io/kubernetes module pinned by tests/cluster/tools/go.mod."""
    result = subprocess.run(
        [_go(), "mod", "download", "-json", "k8s.io/kubernetes"],
        cwd=TOOLS_MODULE,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if result.returncode != 0:
        raise SchemasUnavailable(
            f"go mod download k8s.io/kubernetes failed: {result.stderr[-2000:]}"
        )
    path = Path(json.loads(result.stdout)["Dir"]) / "api/openapi-spec/swagger.json"
    if not path.is_file():
        raise SchemasUnavailable(f"{path} is missing from the module")
    return path


def _kind_file(kind: str, api_version: str) -> str:
    """kubeconform's `{{ .ResourceKind }}{{ .KindSuffix }}.json` for kind and apiVersion."""
    group, _, version = api_version.rpartition("/")
    prefix = (group or version).split(".")[0].lower()
    suffix = f"-{prefix}" + (f"-{version.lower()}" if group else "")
    return f"{kind.lower()}{suffix}.json"


def _strict(node: Any) -> Any:
    """Add additionalProperties: false to objects with properties (recursively)."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _fix_types(name: str, definition: dict[str, Any]) -> dict[str, Any]:
    if name.endswith("util.intstr.IntOrString"):
        return dict(_INT_OR_STRING)
    if name.endswith("api.resource.Quantity"):
        return dict(_QUANTITY)
    return definition


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            yield ref.split("/", 2)[2]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _reachable(definitions: dict[str, Any], root: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    stack = [root]
    while stack:
        name = stack.pop()
        if name in seen or name not in definitions:
            continue
        seen[name] = definitions[name]
        stack.extend(_refs(definitions[name]))
    return seen


def _crd_schemas(crd: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    spec = crd["spec"]
    for version in spec["versions"]:
        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
        props = schema.setdefault("properties", {})
        # ObjectMeta is validated by the API server, not by the CRD's schema.
        props["metadata"] = {"type": "object"}
        props["apiVersion"] = {"type": "string", "enum": [f"{spec['group']}/{version['name']}"]}
        props["kind"] = {"type": "string", "enum": [spec["names"]["kind"]]}
        name = _kind_file(spec["names"]["kind"], f"{spec['group']}/{version['name']}")
        # OpenAPI 3.0 writes exclusive bounds as booleans, as JSON Schema draft-04 does.
        yield name, {"$schema": "http://json-schema.org/draft-04/schema#", **_strict(schema)}


def write_schemas(
    swagger: dict[str, Any], out_dir: Path, crds: Iterable[dict[str, Any]] = ()
) -> str:
    """Write per-kind schemas to out_dir; return kubeconform's `-schema-location` template."""
    out_dir.mkdir(parents=True, exist_ok=True)
    definitions = {
        name: _fix_types(name, _strict(definition))
        for name, definition in swagger["definitions"].items()
    }
    written = 0
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            root = copy.deepcopy(definition)
            props = root.get("properties", {})
            if "apiVersion" in props:
                props["apiVersion"] = {"type": "string", "enum": [api_version]}
            if "kind" in props:
                props["kind"] = {"type": "string", "enum": [gvk["kind"]]}
            # The root stays among the definitions: recursive types refer to themselves.
            root["definitions"] = _reachable(definitions, name)
            root["$schema"] = "http://json-schema.org/draft-04/schema#"
            (out_dir / _kind_file(gvk["kind"], api_version)).write_text(json.dumps(root))
            written += 1
    for crd in crds:
        for file_name, schema in _crd_schemas(crd):
            (out_dir / file_name).write_text(json.dumps(schema))
            written += 1
    if written == 0:
        raise SchemasUnavailable("the OpenAPI document has no x-kubernetes-group-version-kind")
    return str(out_dir / LOCATION)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    doc = json.loads(swagger_from_go_module().read_text())
    print(write_schemas(doc, out))
