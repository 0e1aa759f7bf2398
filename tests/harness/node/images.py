"""OCI image archives written in Python, and the config digest of any image archive.

    write_binary_image(archive, ref, binary, path_in_image, ...)  one static binary -> OCI archive
    read_archive(archive) -> ArchiveImage(names, config_digest)    OCI or Docker archive

The node needs a pause image and the tests a small image, and no registry is reachable: both
are one static Go binary (scripts/build-tools.sh builds them from pause.go and probe.go), so
the harness writes the archive itself instead of needing buildah. Timestamps and owners are
fixed, so the same binary always gives the same digests and an import can be skipped when
containerd already has them. `read_archive` understands both layouts `podman save` and
`skopeo copy` write: OCI (index.json) and Docker (manifest.json).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# containerd's own annotation for the full name; OCI's ref.name is meant to hold only the tag.
CONTAINERD_NAME = "io.containerd.image.name"
OCI_REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class ArchiveImage:
    names: tuple[str, ...]  # as written in the archive (may be empty, or bare tags for OCI)
    config_digest: str  # "sha256:<hex>": the image ID, the same in podman and containerd


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _layer(files: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, (data, mode) in sorted(files.items()):
            _add_bytes(tar, name.lstrip("/"), data, mode)
    return buf.getvalue()


def write_binary_image(
    archive: Path,
    ref: str,
    binary: Path,
    path_in_image: str,
    *,
    user: str = "",
    args: tuple[str, ...] = (),
) -> ArchiveImage:
    """Write an OCI archive of a one-layer image holding `binary` as its entrypoint.

    `ref` is the full name (e.g. localhost/kubetune/pause:1) that `ctr images import` gives it;
    `user` ("65534:65534") is the image's default user, empty for root.
    """
    layer = _layer({path_in_image: (binary.read_bytes(), 0o755)})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [path_in_image],
            "Cmd": list(args),
            "User": user,
            "Env": ["PATH=/"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        "history": [{"created_by": f"harness.node.images: {binary.name} as {path_in_image}"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": _digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [{"mediaType": OCI_LAYER, "digest": _digest(layer), "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": _digest(manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {CONTAINERD_NAME: ref, OCI_REF_NAME: tag},
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        for blob in (layer, config_bytes, manifest_bytes):
            _add_bytes(tar, "blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob)
        _add_bytes(tar, "index.json", json.dumps(index, sort_keys=True).encode())
    return ArchiveImage(names=(ref,), config_digest=_digest(config_bytes))


def _read_json(tar: tarfile.TarFile, name: str) -> Any:
    member = tar.extractfile(name.lstrip("./"))
    if member is None:
        raise ValueError(f"{name} is not a regular file")
    return json.load(member)


def _blob_name(digest: str) -> str:
    algorithm, hexdigest = digest.split(":", 1)
    return f"blobs/{algorithm}/{hexdigest}"


def _manifest_config(tar: tarfile.TarFile, descriptor: dict[str, Any]) -> str:
    """Follow an index entry (nested indexes included) to the linux/amd64 image's config."""
    document = _read_json(tar, _blob_name(descriptor["digest"]))
    if document.get("mediaType") in (OCI_INDEX, DOCKER_LIST) or "manifests" in document:
        candidates = document["manifests"]
        chosen = next(
            (
                m
                for m in candidates
                if m.get("platform", {}).get("os", "linux") == "linux"
                and m.get("platform", {}).get("architecture", "amd64") == "amd64"
            ),
            None,
        )
        if chosen is None:
            raise ValueError(f"no linux/amd64 image in index {descriptor['digest']}")
        return _manifest_config(tar, chosen)
    return str(document["config"]["digest"])


def read_archive(archive: Path) -> ArchiveImage:
    """The names and config digest of the (first) image in an OCI or Docker archive."""
    try:
        with tarfile.open(archive) as tar:
            found = _read_tar(tar)
    except (KeyError, ValueError, tarfile.TarError) as err:
        raise ValueError(f"{archive}: not a readable image archive: {err}") from None
    if found is None:
        raise ValueError(
            f"{archive}: neither an OCI archive (index.json) nor a Docker archive "
            "(manifest.json); write one with `podman save --format oci-archive` or "
            "`skopeo copy ... oci-archive:`"
        )
    return found


def _read_tar(tar: tarfile.TarFile) -> ArchiveImage | None:
    members = set(tar.getnames())
    if "index.json" in members:
        index = _read_json(tar, "index.json")
        if not index.get("manifests"):
            raise ValueError("index.json lists no image")
        first = index["manifests"][0]
        annotations = first.get("annotations") or {}
        names = tuple(
            n for n in (annotations.get(CONTAINERD_NAME), annotations.get(OCI_REF_NAME)) if n
        )
        return ArchiveImage(names=names, config_digest=_manifest_config(tar, first))
    if "manifest.json" in members:
        entry = _read_json(tar, "manifest.json")[0]
        config = tar.extractfile(entry["Config"])
        if config is None:
            raise ValueError(f"{entry['Config']} is not a regular file")
        return ArchiveImage(
            names=tuple(entry.get("RepoTags") or ()), config_digest=_digest(config.read())
        )
    return None
