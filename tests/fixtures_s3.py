"""A real S3 server (moto's server mode) on loopback for tests; no mocks of boto3.

Expose the fixtures from a conftest::

    from fixtures_s3 import moto_s3, s3_bucket  # noqa: F401

``moto_s3`` (session) serves moto's S3 from a thread of this process on 127.0.0.1 and a
free port, behind the harness's credential check (:mod:`harness.s3`: a request signed with
another key or secret is refused, as real S3 does), sets the harness's credentials
(``AWS_ACCESS_KEY_ID``...) and ``AWS_ENDPOINT_URL`` for the session, and returns the
endpoint URL. ``s3_bucket`` creates a fresh, uniquely named bucket for one test and
returns its name, so tests never see each other's objects.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from harness.s3 import ACCESS_KEY, REGION, SECRET_KEY, checked_moto_app

S3_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on loopback, running for the whole session."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    server = make_server(
        "127.0.0.1", 0, checked_moto_app(), threaded=True, request_handler=MotoRequestHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in S3_ENV.items():
            mp.setenv(name, value)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("KUBETUNE_S3_ENDPOINT", raising=False)
        try:
            yield endpoint
        finally:
            server.shutdown()
            thread.join()


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION)


@pytest.fixture
def s3_bucket(moto_s3: str) -> str:
    """A new empty bucket on the moto server (unique name per test)."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client(moto_s3).create_bucket(Bucket=name)
    return name
