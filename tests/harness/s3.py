"""An S3 server on loopback: moto's server mode, as a child process.

    from harness.s3 import S3Server
    s3 = S3Server.start(log_dir)        # s3.endpoint_url, e.g. http://127.0.0.1:41234
    s3.make_bucket("data")
    subprocess.run([...], env={**os.environ, **s3.env()})
    s3.stop()

moto accepts any access key and secret; the harness uses `testing`/`testing` in region
us-east-1 and path-style addressing (the endpoint is an IP address). Objects live in the
server's memory and vanish when it stops.
"""

from __future__ import annotations

import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness._proc import ManagedProcess, free_port, wait_until

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def _moto_server_argv() -> list[str]:
    # The console script sits next to the interpreter in a venv; fall back to PATH.
    script = Path(sys.executable).parent / "moto_server"
    found = str(script) if script.exists() else shutil.which("moto_server")
    if found is None:
        raise RuntimeError("moto_server not found: install moto[server] into this environment")
    return [found]


@dataclass
class S3Server:
    endpoint_url: str
    process: ManagedProcess | None = None
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    @classmethod
    def start(cls, log_dir: Path, timeout: float = 30.0) -> S3Server:
        port = free_port()
        proc = ManagedProcess(
            "s3", [*_moto_server_argv(), "-H", "127.0.0.1", "-p", str(port)], log_dir / "s3.log"
        )
        server = cls(endpoint_url=f"http://127.0.0.1:{port}", process=proc)

        def up() -> bool:
            proc.check_running()
            with urllib.request.urlopen(server.endpoint_url + "/moto-api/", timeout=2) as resp:
                return bool(resp.status == 200)

        try:
            wait_until(up, timeout=timeout, what="moto S3 server", interval=0.2)
        except BaseException:
            proc.stop()
            raise
        return server

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3, the AWS CLI and s3fs-style clients here."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name
