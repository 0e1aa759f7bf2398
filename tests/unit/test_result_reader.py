"""The operator reads a job's storage with the job's own keys, and only at allowed endpoints.

A local HTTP server stands in for a tenant's "S3 endpoint" and records every request; the
operator's own AWS keys are in its environment, as they would be in a careless install.

Run: ``python -m pytest tests/unit/test_result_reader.py -q``
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from fake_kube import FakeKube
from recording_http import RecordingServer

from kubetune.schema import API_VERSION, KIND, FineTuneJob, parse_job
from kubetune_operator.config import OperatorConfig, normalize_endpoint, parse_endpoints
from kubetune_operator.kube import core_path
from kubetune_operator.result_reader import ResultReader

NS = "team-a"
OPERATOR_KEY = "AKIAOPERATOROWNKEY00"
TENANT_KEY = "AKIATENANTKEY0000000"


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingServer]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": OPERATOR_KEY,
        "AWS_SECRET_ACCESS_KEY": "operator-secret",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("KUBETUNE_S3_ENDPOINT", raising=False)
    with RecordingServer(status=404) as server:  # an S3 that has nothing yet
        yield server


def job(endpoint: str | None, secret: str | None = "team-a-s3") -> FineTuneJob:
    storage: dict[str, Any] = {"output": "s3://runs/tldr/"}
    if endpoint:
        storage["endpoint"] = endpoint
    if secret:
        storage["credentialsSecret"] = secret
    return parse_job(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": "tldr", "namespace": NS},
            "spec": {
                "model": {"name": "gpt2"},
                "dataset": {"source": "s3://data/tldr/"},
                "storage": storage,
            },
        }
    )


def kube_with_secret(**keys: str) -> FakeKube:
    kube = FakeKube()
    data = {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}
    kube.add(
        core_path(NS, "secrets"),
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-a-s3"}, "data": data},
    )
    return kube


def read(reader: ResultReader, j: FineTuneJob) -> dict[str, Any] | None:
    return reader.read_json(j, "s3://runs/tldr/runs/abc-g1", "train/progress.json")


def test_an_endpoint_off_the_allow_list_is_never_contacted(endpoint: RecordingServer) -> None:
    kube = kube_with_secret(AWS_ACCESS_KEY_ID=TENANT_KEY, AWS_SECRET_ACCESS_KEY="tenant")
    reader = ResultReader(kube, allowed_endpoints=["http://minio.storage.svc:9000"])
    assert reader.refusal(job(endpoint.url)) is not None
    assert read(reader, job(endpoint.url)) is None
    assert endpoint.requests == []


def test_an_allowed_endpoint_is_read_with_the_jobs_own_keys_never_the_operators(
    endpoint: RecordingServer,
) -> None:
    kube = kube_with_secret(AWS_ACCESS_KEY_ID=TENANT_KEY, AWS_SECRET_ACCESS_KEY="tenant")
    reader = ResultReader(kube, allowed_endpoints=[endpoint.url + "/"])
    assert read(reader, job(endpoint.url)) is None  # 404: no progress yet
    assert endpoint.requests, "the allowed endpoint was not read"
    for request in endpoint.requests:
        auth = request.get("Authorization", "")
        assert f"Credential={TENANT_KEY}/" in auth
        assert OPERATOR_KEY not in str(request)


@pytest.mark.parametrize(
    ("secret", "keys"),
    [
        (None, {"AWS_ACCESS_KEY_ID": TENANT_KEY, "AWS_SECRET_ACCESS_KEY": "tenant"}),
        ("team-a-s3", {"AWS_ACCESS_KEY_ID": TENANT_KEY}),  # no secret key: unusable
        ("other", {"AWS_ACCESS_KEY_ID": TENANT_KEY, "AWS_SECRET_ACCESS_KEY": "tenant"}),
    ],
    ids=["no-secret-named", "secret-without-keys", "secret-missing"],
)
def test_without_the_jobs_own_keys_nothing_is_read(
    endpoint: RecordingServer, secret: str | None, keys: dict[str, str]
) -> None:
    reader = ResultReader(kube_with_secret(**keys), allowed_endpoints=[endpoint.url])
    assert read(reader, job(endpoint.url, secret=secret)) is None
    assert endpoint.requests == [], "the operator fell back to its own credentials"


def test_a_job_without_an_endpoint_uses_the_operators_configured_s3(
    endpoint: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The platform's S3 (the operator's AWS_ENDPOINT_URL) needs no allow-list entry, but the
    # job's keys are still the ones used.
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
    kube = kube_with_secret(AWS_ACCESS_KEY_ID=TENANT_KEY, AWS_SECRET_ACCESS_KEY="tenant")
    reader = ResultReader(kube)
    assert reader.refusal(job(None)) is None
    read(reader, job(None))
    assert endpoint.requests
    assert all(f"Credential={TENANT_KEY}/" in r.get("Authorization", "") for r in endpoint.requests)


def test_file_outputs_are_not_read_by_a_cluster_operator(tmp_path: Any) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "progress.json").write_text('{"step": 3}')
    out = f"file://{tmp_path}"
    j = job(None)
    assert ResultReader(FakeKube()).read_json(j, out, "train/progress.json") is None
    local = ResultReader(FakeKube(), local_files=True)
    assert local.read_json(j, out, "train/progress.json") == {"step": 3}


def test_the_allow_list_comes_from_the_environment() -> None:
    cfg = OperatorConfig.from_env(
        {"KUBETUNE_STORAGE_ENDPOINTS": "https://MinIO.storage.svc:9000/, http://ceph:7480"}
    )
    assert cfg.storage_endpoints == ("https://minio.storage.svc:9000", "http://ceph:7480")
    assert OperatorConfig.from_env({}).storage_endpoints == ()
    with pytest.raises(ValueError, match=r"KUBETUNE_STORAGE_ENDPOINTS.*not an http"):
        parse_endpoints("minio:9000")
    assert normalize_endpoint("HTTP://Host:1/path/") == "http://host:1/path"
