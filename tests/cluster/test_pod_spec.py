"""Pure rules of the process node (no cluster needed): `$(VAR)` expansion, env, paths, volumes.

cd /work/main && ~/.cache/kubetune/venv/bin/python -m pytest tests/cluster/test_pod_spec.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness import pod_spec

INDEX_KEY = "batch.kubernetes.io/job-completion-index"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)/x", "1/x"),
        ("$$(A)", "$(A)"),
        ("$(MISSING)", "$(MISSING)"),
        ("cost $5 $", "cost $5 $"),
        ("$(A", "$(A"),
        ("$(A)$(B)", "12"),
    ],
)
def test_expand_vars_follows_kubelet_rules(text: str, expected: str) -> None:
    assert pod_spec.expand_vars(text, {"A": "1", "B": "2"}) == expected


def test_path_map_rewrites_whole_path_prefixes_only(tmp_path: Path) -> None:
    paths = pod_spec.PathMap(
        {
            "/data": tmp_path / "d",
            "/data/models": tmp_path / "m",
            "/dev/termination-log": tmp_path / "t",
        }
    )
    assert paths.rewrite("/data/x.txt") == f"{tmp_path}/d/x.txt"
    assert paths.rewrite("--out=/data") == f"--out={tmp_path}/d"
    assert paths.rewrite("/data/models/gpt2") == f"{tmp_path}/m/gpt2"
    assert paths.rewrite("open('/dev/termination-log')") == f"open('{tmp_path}/t')"
    for untouched in ("/database", "/x/data", "data/x", "/data.bak"):
        assert paths.rewrite(untouched) == untouched


def _pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "uid": "u-1",
            "annotations": {"batch.kubernetes.io/job-completion-index": "3"},
        },
        "spec": {"nodeName": "n", **spec},
        "status": {},
    }


def _lookup(
    config_maps: dict[str, dict[str, bytes]], secrets: dict[str, dict[str, bytes]]
) -> pod_spec.Lookup:
    return pod_spec.Lookup(
        config_map=lambda _ns, name: config_maps.get(name),
        secret=lambda _ns, name: secrets.get(name),
    )


def test_container_env_resolves_sources_in_kubelet_order() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "s"}, "prefix": "S_"}],
        "env": [
            {
                "name": "INDEX",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_KEY}']"}},
            },
            {"name": "URL", "value": "http://$(HOST):$(PORT)/$(INDEX)"},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "key"}}},
            {
                "name": "OPT",
                "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
        ],
    }
    lookup = _lookup({"cm": {"HOST": b"h", "PORT": b"80"}}, {"s": {"key": b"k3y"}})
    env = pod_spec.container_env(_pod(), container, lookup)
    assert env == {
        "HOST": "h",
        "PORT": "80",
        "S_key": "k3y",
        "INDEX": "3",
        "URL": "http://h:80/3",
        "KEY": "k3y",
    }


def test_missing_required_secret_is_a_config_error() -> None:
    container = {
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}]
    }
    with pytest.raises(pod_spec.PodConfigError, match='secret "gone" not found'):
        pod_spec.container_env(_pod(), container, _lookup({}, {}))


def test_volumes_materialize_items_and_empty_dirs(tmp_path: Path) -> None:
    pod = _pod(
        volumes=[
            {
                "name": "cfg",
                "configMap": {"name": "cm", "items": [{"key": "a", "path": "sub/a.txt"}]},
            },
            {"name": "scratch", "emptyDir": {}},
            {
                "name": "info",
                "downwardAPI": {
                    "items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]
                },
            },
        ]
    )
    volumes = pod_spec.materialize_volumes(
        pod,
        tmp_path / "sandbox",
        _lookup({"cm": {"a": b"A", "b": b"B"}}, {}),
        lambda _src: "tok",
        tmp_path,
    )
    assert (volumes["cfg"] / "sub/a.txt").read_bytes() == b"A"
    assert not (volumes["cfg"] / "b").exists()
    assert volumes["scratch"].is_dir()
    assert (volumes["info"] / "name").read_text() == "p"


def test_unsupported_volume_type_is_reported_by_name(tmp_path: Path) -> None:
    pod = _pod(volumes=[{"name": "blk", "iscsi": {}}])
    with pytest.raises(
        pod_spec.PodConfigError, match=r"volume blk: unsupported volume type \['iscsi'\]"
    ):
        pod_spec.materialize_volumes(pod, tmp_path, _lookup({}, {}), lambda _src: "", tmp_path)
