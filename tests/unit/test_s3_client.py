"""One S3 client factory (kubetune.storage.s3_client) for the stage pods and the operator.

The operator reads result files and training progress with its own short-timeout client
(:class:`kubetune_operator.reconcile.ResultReader`); it must reach the same S3 as the pods
from the same environment and spec. No request is sent: these compare the clients.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.contract import Env
from kubetune.schema import API_VERSION, KIND, FineTuneJob, parse_job
from kubetune.storage import S3Storage, storage_for_job
from kubetune_operator.reconcile import ResultReader

OUTPUT = "s3://runs/tldr/runs/g1"
S3_VARIABLES = (Env.S3_ENDPOINT, "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


def job_with(**storage: Any) -> FineTuneJob:
    return parse_job(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": "tldr", "namespace": "ml"},
            "spec": {
                "model": {"name": "gpt2"},
                "dataset": {"source": "s3://data/tldr/"},
                "storage": {"output": "s3://runs/tldr/", **storage},
            },
        }
    )


@pytest.mark.parametrize(
    ("env", "storage", "endpoint", "region"),
    [
        (
            {Env.S3_ENDPOINT: "http://minio.a:9000", "AWS_ENDPOINT_URL": "http://b:9000"},
            {},
            "http://minio.a:9000",
            "us-east-1",
        ),
        (
            {"AWS_ENDPOINT_URL": "http://b:9000", "AWS_DEFAULT_REGION": "eu-west-3"},
            {},
            "http://b:9000",
            "eu-west-3",
        ),
        (
            {Env.S3_ENDPOINT: "http://minio.a:9000", "AWS_REGION": "eu-west-3"},
            {"endpoint": "http://spec:9000", "region": "ap-south-1"},
            "http://spec:9000",
            "ap-south-1",
        ),
    ],
)
def test_operator_and_stage_pods_resolve_the_same_s3_endpoint_and_region(
    env: dict[str, str],
    storage: dict[str, str],
    endpoint: str,
    region: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in S3_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    job = job_with(**storage)
    pods = storage_for_job(OUTPUT, job.spec.storage)
    operator = ResultReader().storage_for(job, OUTPUT)
    assert isinstance(pods, S3Storage) and isinstance(operator, S3Storage)
    assert pods.client.meta.endpoint_url == operator.client.meta.endpoint_url == endpoint
    assert pods.client.meta.region_name == operator.client.meta.region_name == region


def test_the_operator_keeps_short_timeouts_and_few_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://b:9000")
    job = job_with()
    pods = storage_for_job(OUTPUT, job.spec.storage)
    operator = ResultReader().storage_for(job, OUTPUT)
    assert isinstance(pods, S3Storage) and isinstance(operator, S3Storage)
    ours, theirs = operator.client.meta.config, pods.client.meta.config
    assert ours.read_timeout < theirs.read_timeout
    assert ours.connect_timeout < theirs.connect_timeout
    assert ours.retries["total_max_attempts"] < theirs.retries["total_max_attempts"]
    # ...and no retry budget of its own: a failed read waits for the next pass.
    assert operator.retry.seconds == 0 < pods.retry.seconds


def test_stage_pods_keep_botocores_retries_few_so_the_storage_retry_budget_governs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://b:9000")
    monkeypatch.setenv(Env.STORAGE_RETRY_SECONDS, "120")
    pods = storage_for_job(OUTPUT, job_with().spec.storage)
    assert isinstance(pods, S3Storage)
    # botocore's standard mode retries one request a few times within seconds; minutes of
    # outage are S3Storage's RetryPolicy, with a warning per retry.
    assert pods.client.meta.config.retries["total_max_attempts"] <= 4
    assert pods.retry.seconds == 120
