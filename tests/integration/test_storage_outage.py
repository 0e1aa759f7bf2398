"""A stage rides through a storage outage, and says so when it cannot or when its keys are wrong.

Each test runs the prepare stage as a pod does (``python -m kubetune.cli prepare --job``, with
the termination log a pod's kubelet reads) on 30 real tldr pages in S3: the harness's moto
server, which checks credentials like real S3, behind a TCP proxy (``OutageProxy``) that the
test cuts and restores. The server keeps its objects through the cut, as S3 does through a
network outage.

* an outage of ~12 s mid-run (while the stage downloads the source) is ridden through: the
  stage succeeds, with a WARNING per retry, and writes exactly what an undisturbed run writes;
* wrong credentials fail at once with reason ``StorageAccessDenied``, the not-retriable exit
  code and a message naming the credentials and what to check;
* an outage longer than ``KUBETUNE_STORAGE_RETRY_SECONDS`` fails the attempt with the
  retriable exit code and says for how long storage was unreachable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from datapaths import tldr_files

from harness.s3 import OutageProxy, S3Server
from kubetune.contract import Env, ExitCode
from kubetune.layout import RunLayout
from kubetune.schema import Reason

MANIFEST = """
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {{name: outage}}
spec:
  model: {{fresh: {{nLayer: 1, nHead: 2, nEmbd: 16, nPositions: 32, vocabSize: 300}}}}
  dataset: {{source: "{source}", format: markdown}}
  training: {{maxSeqLength: 32}}
  storage: {{output: "{output}"}}
"""
OUTAGE_SECONDS = 12.0


@pytest.fixture(scope="module")
def source(s3_server: S3Server) -> str:
    """Bucket holding 30 tldr pages under ``pages/``."""
    bucket = s3_server.make_bucket(f"outage-src-{uuid.uuid4().hex[:8]}")
    client = s3_server.client()
    for path in tldr_files("common")[:30]:
        client.upload_file(str(path), bucket, f"pages/{path.name}")
    return bucket


@pytest.fixture(scope="module")
def output(s3_server: S3Server) -> str:
    return s3_server.make_bucket(f"outage-out-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[OutageProxy]:
    proxy = OutageProxy.start(s3_server.endpoint_url)
    yield proxy
    proxy.close()


def run_prepare(
    tmp_path: Path,
    name: str,
    *,
    source: str,
    output: str,
    endpoint: str,
    s3_env: dict[str, str],
    **env: str,
) -> tuple[int, dict[str, Any], str]:
    """``kubetune prepare`` in a child process, as a pod runs it: exit code, termination
    message, stderr."""
    work = tmp_path / name
    work.mkdir()
    job = work / "job.yaml"
    job.write_text(MANIFEST.format(source=source, output=output))
    termination = work / "termination-log"
    child_env = {
        **os.environ,
        **s3_env,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        Env.S3_ENDPOINT: endpoint,
        Env.TERMINATION_LOG: str(termination),
        Env.SCRATCH: str(work / "scratch"),
        Env.PREPARE_WORKERS: "1",
        **env,
    }
    child_env.pop("AWS_PROFILE", None)
    done = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "prepare", "--job", str(job)],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    message = json.loads(termination.read_text()) if termination.exists() else {}
    return done.returncode, message, done.stderr


def stored(s3_server: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3_server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    return {
        key[len(prefix) :]: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys
    }


def test_an_outage_mid_run_is_ridden_through_and_changes_nothing(
    tmp_path: Path, s3_server: S3Server, proxy: OutageProxy, source: str, output: str
) -> None:
    common: dict[str, Any] = {
        "source": f"s3://{source}/pages/",
        "endpoint": proxy.endpoint_url,
        "s3_env": s3_server.env(),
    }
    code, _, err = run_prepare(tmp_path, "calm", output=f"s3://{output}/calm/", **common)
    assert code == ExitCode.OK, err
    assert not proxy.outages

    # The line drops at the stage's first download of a source file and comes back ~12 s later.
    proxy.cut_on(f"GET /{source}/pages/".encode(), restore_after=OUTAGE_SECONDS)
    started = time.monotonic()
    code, message, err = run_prepare(tmp_path, "outage", output=f"s3://{output}/outage/", **common)
    assert code == ExitCode.OK, err
    assert len(proxy.outages) == 1
    cut, back = proxy.outages[0]
    assert back is not None and back - cut >= OUTAGE_SECONDS
    assert started < cut < back < time.monotonic()
    assert message.get("stage") == "prepare" and "error" not in message

    # A WARNING per retry, naming the operation, the key, the error and the time left.
    retries = [line for line in err.splitlines() if "storage retry budget left" in line]
    assert retries, err
    assert all("WARNING" in line for line in retries)
    assert all(f"downloading s3://{source}/pages/" in line for line in retries)
    assert any("EndpointConnectionError" in line or "Connection" in line for line in retries)

    calm = stored(s3_server, output, "calm/dataset/")
    after = stored(s3_server, output, "outage/dataset/")
    assert sorted(calm) == sorted(after)
    result = Path(RunLayout.PREPARE_RESULT).name
    assert {k: v for k, v in calm.items() if k != result} == {
        k: v for k, v in after.items() if k != result
    }
    calm_result, after_result = json.loads(calm[result]), json.loads(after[result])
    for field in ("stats", "trainSha256", "testSha256", "fingerprint"):
        assert calm_result[field] == after_result[field], field


@pytest.mark.parametrize("wrong", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
@pytest.mark.parametrize("refused", ["storage.output", "dataset.source"])
def test_wrong_credentials_fail_at_once_with_storage_access_denied(
    tmp_path: Path, s3_server: S3Server, source: str, output: str, wrong: str, refused: str
) -> None:
    # dataset.source: the output is a local directory, so the first refusal is the stage's
    # listing of its source (wrapped as a dataset error) rather than the output probe.
    out = f"s3://{output}/denied/" if refused == "storage.output" else (tmp_path / "out").as_uri()
    started = time.monotonic()
    code, message, err = run_prepare(
        tmp_path,
        "denied",
        source=f"s3://{source}/pages/",
        output=out,
        endpoint=s3_server.endpoint_url,
        s3_env={**s3_server.env(), wrong: "not-the-right-one"},
    )
    assert code == ExitCode.NOT_RETRIABLE, err
    assert message["reason"] == Reason.STORAGE_ACCESS_DENIED.value
    error = message["error"]
    assert refused in error
    expected = "InvalidAccessKeyId" if wrong == "AWS_ACCESS_KEY_ID" else "SignatureDoesNotMatch"
    assert f"access denied ({expected})" in error
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in error
    assert "storage.credentialsSecret" in error and "check the credentials" in error
    assert "storage retry budget" not in err  # refused is final: never retried
    assert time.monotonic() - started < 120


def test_an_outage_longer_than_the_budget_fails_the_attempt_as_retriable(
    tmp_path: Path, s3_server: S3Server, proxy: OutageProxy, source: str, output: str
) -> None:
    proxy.cut_on(f"GET /{source}/pages/".encode(), restore_after=None)
    code, message, err = run_prepare(
        tmp_path,
        "down",
        source=f"s3://{source}/pages/",
        output=f"s3://{output}/down/",
        endpoint=proxy.endpoint_url,
        s3_env=s3_server.env(),
        **{Env.STORAGE_RETRY_SECONDS: "3"},
    )
    assert proxy.is_cut
    assert code == ExitCode.FAILED, err
    assert message["reason"] == Reason.STAGE_FAILED.value
    error = message["error"]
    assert "storage was unreachable for" in error
    seconds = int(error.split("storage was unreachable for ", 1)[1].split(" s", 1)[0])
    assert seconds >= 3
    assert f"retry budget of 3 s (${Env.STORAGE_RETRY_SECONDS})" in error
    assert "A retry of the stage may succeed" in error
    assert "storage retry budget left" in err
