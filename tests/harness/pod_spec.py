"""Pure pieces of the process node: kubelet-style `$(VAR)` expansion, env resolution, field refs,
volume materialization and container path remapping. Pods are plain dicts as the API returns
them. Used by harness.process_node; not meant to be run directly.

Path remapping, the rule that makes absolute container paths work without a container runtime:
every volumeMount's `mountPath` (and the container's `terminationMessagePath`) that appears as a
whole path prefix in `command`, `args`, env values or `workingDir` is replaced by the host
directory (or file) that backs it in the pod's sandbox. "/data/x" and "--out=/data" both match
a mount at /data; "/database" and "/x/data" do not. Paths a program builds at run time, or reads
from a library default, are NOT remapped.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Pod = dict[str, Any]
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"


class PodConfigError(Exception):
    """The pod refers to something missing (a ConfigMap key, a Secret): kubelet retries these."""


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Expand `$(NAME)` from `env` like the kubelet: `$$` is a literal `$`, unknown names stay."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 == len(text):
            out.append(char)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(env.get(name, f"$({name})"))
            i = end + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref(pod: Pod, path: str) -> str:
    """Value of a downward-API fieldPath such as `metadata.name` or `metadata.labels['k']`."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        # No pod network: every pod and the node share the loopback address.
        "status.podIP": status.get("podIP") or "127.0.0.1",
        "status.podIPs": status.get("podIP") or "127.0.0.1",
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    match = _SUBSCRIPT.match(path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise PodConfigError(f"unsupported fieldRef.fieldPath {path!r}")


@dataclass
class Lookup:
    """Reads ConfigMaps and Secrets (decoded to text/bytes); injected so tests can fake it."""

    config_map: Callable[[str, str], Mapping[str, bytes] | None]  # (namespace, name) -> data
    secret: Callable[[str, str], Mapping[str, bytes] | None]

    def data(self, kind: str, namespace: str, name: str, optional: bool) -> Mapping[str, bytes]:
        fetch = self.config_map if kind == "configMap" else self.secret
        data = fetch(namespace, name)
        if data is None:
            if optional:
                return {}
            raise PodConfigError(f'{kind} "{name}" not found')
        return data


def container_env(pod: Pod, container: Mapping[str, Any], lookup: Lookup) -> dict[str, str]:
    """The container's environment: envFrom first, then env (later entries see earlier ones)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind = "configMap" if "configMapRef" in source else "secret"
        ref = source.get("configMapRef") or source.get("secretRef") or {}
        data = lookup.data(kind, namespace, ref["name"], bool(ref.get("optional")))
        for key, value in data.items():
            env[source.get("prefix", "") + key] = value.decode(errors="replace")
    for var in container.get("env") or []:
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = expand_vars(var.get("value", ""), env)
        elif "fieldRef" in source:
            env[var["name"]] = field_ref(pod, source["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in source or "secretKeyRef" in source:
            kind = "configMap" if "configMapKeyRef" in source else "secret"
            ref = source.get("configMapKeyRef") or source["secretKeyRef"]
            optional = bool(ref.get("optional"))
            data = lookup.data(kind, namespace, ref["name"], optional)
            if ref["key"] in data:
                env[var["name"]] = data[ref["key"]].decode(errors="replace")
            elif not optional:
                raise PodConfigError(f'key "{ref["key"]}" not found in {kind} "{ref["name"]}"')
        else:
            raise PodConfigError(f"env {var['name']}: unsupported valueFrom {sorted(source)}")
    return env


def _write_items(
    target: Path, data: Mapping[str, bytes], items: Iterable[Mapping[str, Any]] | None
) -> None:
    target.mkdir(parents=True, exist_ok=True)
    wanted = (
        [(item["key"], item["path"], item.get("mode")) for item in items]
        if items
        else [(key, key, None) for key in data]
    )
    for key, rel, mode in wanted:
        if key not in data:
            raise PodConfigError(f'volume item key "{key}" not found')
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[key])
        if mode is not None:
            path.chmod(int(mode))


def materialize_volumes(
    pod: Pod,
    sandbox: Path,
    lookup: Lookup,
    request_token: Callable[[Mapping[str, Any]], str],
    node_root: Path,
) -> dict[str, Path]:
    """Create every pod volume on the host; returns volume name -> host directory."""
    namespace = pod["metadata"]["namespace"]
    volumes: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        target = sandbox / "volumes" / name
        if "emptyDir" in volume:
            target.mkdir(parents=True, exist_ok=True)
        elif "configMap" in volume or "secret" in volume:
            kind = "configMap" if "configMap" in volume else "secret"
            src = volume[kind]
            ref = src.get("name") or src.get("secretName", "")
            data = lookup.data(kind, namespace, ref, bool(src.get("optional")))
            _write_items(target, data, src.get("items"))
        elif "downwardAPI" in volume:
            _write_downward(target, pod, volume["downwardAPI"].get("items") or [])
        elif "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    token_src = source["serviceAccountToken"]
                    _write_items(
                        target,
                        {"t": request_token(token_src).encode()},
                        [{"key": "t", "path": token_src["path"]}],
                    )
                elif "downwardAPI" in source:
                    _write_downward(target, pod, source["downwardAPI"].get("items") or [])
                elif "configMap" in source or "secret" in source:
                    kind = "configMap" if "configMap" in source else "secret"
                    src = source[kind]
                    data = lookup.data(kind, namespace, src["name"], bool(src.get("optional")))
                    _write_items(target, data, src.get("items"))
                else:
                    raise PodConfigError(
                        f"volume {name}: unsupported projected source {sorted(source)}"
                    )
        elif "hostPath" in volume:
            target = Path(volume["hostPath"]["path"])
            target.mkdir(parents=True, exist_ok=True)
        elif "persistentVolumeClaim" in volume:
            # A claim is a directory shared by every pod that names it, kept across pods.
            claim = volume["persistentVolumeClaim"]["claimName"]
            target = node_root / "claims" / namespace / claim
            target.mkdir(parents=True, exist_ok=True)
        else:
            kinds = sorted(set(volume) - {"name"})
            raise PodConfigError(f"volume {name}: unsupported volume type {kinds}")
        volumes[name] = target
    return volumes


def _write_downward(target: Path, pod: Pod, items: Iterable[Mapping[str, Any]]) -> None:
    data = {
        item["path"]: field_ref(pod, item["fieldRef"]["fieldPath"]).encode()
        for item in items
        if "fieldRef" in item
    }
    _write_items(target, data, None)


class PathMap:
    """Rewrites container paths (mount points) to host paths; see the module docstring."""

    def __init__(self, mapping: Mapping[str, Path]) -> None:
        self.mapping = {k.rstrip("/") or "/": v for k, v in mapping.items()}
        # Longest first, so /data/models wins over /data; one pass, so nothing is rewritten twice.
        keys = sorted(self.mapping, key=len, reverse=True)
        alternatives = "|".join(re.escape(k) for k in keys)
        self._pattern = re.compile(rf"(?<![\w.\-/])({alternatives})(?![\w.\-])") if keys else None

    def rewrite(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: str(self.mapping[m.group(1)]), text)


def container_path_map(
    container: Mapping[str, Any],
    volumes: Mapping[str, Path],
    termination_file: Path,
    env: Mapping[str, str],
) -> PathMap:
    mapping: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        host = volumes[mount["name"]]
        sub = mount.get("subPath") or expand_vars(mount.get("subPathExpr", ""), env)
        if sub:
            host = host / sub
            host.mkdir(parents=True, exist_ok=True)
        mapping[mount["mountPath"]] = host
    mapping[container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH] = (
        termination_file
    )
    return PathMap(mapping)


def decode_secret(data: Mapping[str, str | bytes] | None) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (data or {}).items()}


def encode_config_map(
    data: Mapping[str, str | bytes] | None, binary: Mapping[str, str | bytes] | None
) -> dict[str, bytes]:
    out = {k: v.encode() if isinstance(v, str) else v for k, v in (data or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (binary or {}).items()})
    return out


# Host variables a process inherits (the "image" is the host): enough to find the venv's tools.
HOST_ENV_PASSTHROUGH = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "VIRTUAL_ENV",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "XDG_CACHE_HOME",
    "TORCH_HOME",
    "CUDA_VISIBLE_DEVICES",
)


def host_env(extra: Iterable[str] = ()) -> dict[str, str]:
    names = set(HOST_ENV_PASSTHROUGH) | set(extra)
    return {k: v for k, v in os.environ.items() if k in names}
