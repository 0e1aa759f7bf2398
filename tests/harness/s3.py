"""An S3 server on loopback that checks credentials: moto's S3 as a child process.

    from harness.s3 import S3Server
    s3 = S3Server.start(log_dir)        # s3.endpoint_url, e.g. http://127.0.0.1:41234
    s3.make_bucket("data")
    subprocess.run([...], env={**os.environ, **s3.env()})
    s3.stop()

Like real S3, and unlike moto alone, it refuses requests that are not signed with its key:
an unknown access key id gets 403 ``InvalidAccessKeyId``, a wrong secret 403
``SignatureDoesNotMatch``, an unsigned request 403 ``AccessDenied``. :class:`CredentialCheck`
(a WSGI middleware in front of moto's app) verifies each request's AWS Signature Version 4;
``/moto-api/`` (moto's health and reset endpoints) stays open. The harness's credentials are
:data:`ACCESS_KEY`/:data:`SECRET_KEY` in region us-east-1, with path-style addressing (the
endpoint is an IP address); ``s3.add_credentials(key, secret)`` accepts another pair (a test
that needs distinctive keys). Objects live in the server's memory and vanish when it stops.

:class:`OutageProxy` is a TCP proxy in front of a server whose line a test cuts (open
connections closed, new ones refused) and restores on the same port; the server behind it
keeps its objects, so the outage is the network's, not a data loss.

Run the server alone: ``PYTHONPATH=tests python -m harness.s3 --port 9000``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from harness._proc import ManagedProcess, free_port, wait_until

ACCESS_KEY = "kubetune-harness"
SECRET_KEY = "kubetune-harness-secret"
REGION = "us-east-1"
CREDENTIALS_PATH = "/_harness/credentials"  # POST a key pair to accept it too

TESTS_DIR = Path(__file__).resolve().parents[1]


def _server_argv(port: int) -> list[str]:
    """This module's server (moto behind the credential check) in a fresh interpreter."""
    return [sys.executable, "-m", "harness.s3", "--host", "127.0.0.1", "--port", str(port)]


def _server_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), path]))}


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
        proc = ManagedProcess("s3", _server_argv(port), log_dir / "s3.log", env=_server_env())
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

    def add_credentials(self, access_key: str, secret_key: str) -> None:
        """Accept this key pair too (e.g. distinctive keys a leak check looks for)."""
        body = json.dumps({"accessKeyId": access_key, "secretAccessKey": secret_key}).encode()
        request = urllib.request.Request(
            self.endpoint_url + CREDENTIALS_PATH, data=body, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 204, resp.status

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


# --------------------------------------------------------------------------- credentials

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
SIGV4 = "AWS4-HMAC-SHA256"


def _header(environ: dict[str, Any], name: str) -> str | None:
    key = name.upper().replace("-", "_")
    value = environ.get(key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}")
    return None if value is None else str(value)


def sigv4_refusal(
    environ: dict[str, Any], credentials: Mapping[str, str]
) -> tuple[int, str, str] | None:
    """Why S3 would refuse this request's credentials: ``(status, code, message)``; None if
    it is signed (AWS Signature Version 4, Authorization header) with one of ``credentials``
    (access key id -> secret).

    The signature is recomputed from the request as received, as S3 does: the raw path and
    query (S3 does not normalise them), the headers named in ``SignedHeaders``, and the
    payload hash the client declared in ``x-amz-content-sha256``.
    """
    auth = _header(environ, "authorization") or ""
    if not auth.startswith(SIGV4 + " "):
        return 403, "AccessDenied", "Access Denied (the request is not signed with SigV4)"
    try:
        parts = dict(p.strip().split("=", 1) for p in auth[len(SIGV4) + 1 :].split(","))
        key_id, date, region, service, _ = parts["Credential"].split("/")
        signed = parts["SignedHeaders"].split(";")
        signature = parts["Signature"]
    except (KeyError, ValueError):
        return 400, "AuthorizationHeaderMalformed", "The authorization header is malformed"
    secret_key = credentials.get(key_id)
    if secret_key is None:
        return (
            403,
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
        )
    payload_hash = _header(environ, "x-amz-content-sha256")
    amz_date = _header(environ, "x-amz-date")
    if payload_hash is None or amz_date is None:
        return 400, "InvalidRequest", "Missing x-amz-content-sha256 or x-amz-date"
    raw_uri = str(environ.get("RAW_URI") or environ.get("REQUEST_URI") or "/")
    path, _, query = raw_uri.partition("?")
    pairs = sorted(tuple(p.split("=", 1)) if "=" in p else (p, "") for p in query.split("&") if p)
    canonical_request = "\n".join(
        [
            str(environ["REQUEST_METHOD"]),
            path,
            "&".join(f"{k}={v}" for k, v in pairs),
            "".join(f"{n}:{' '.join((_header(environ, n) or '').split())}\n" for n in signed),
            ";".join(signed),
            payload_hash,
        ]
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [SIGV4, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = f"AWS4{secret_key}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return (
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. "
            "Check your key and signing method.",
        )
    return None


class CredentialCheck:
    """WSGI middleware: pass a request on to ``app`` only if its credentials are right.

    ``POST /_harness/credentials`` with ``{"accessKeyId": ..., "secretAccessKey": ...}``
    adds a key pair (:meth:`S3Server.add_credentials`), for a test that needs keys of its own.
    """

    def __init__(self, app: WsgiApp, access_key: str, secret_key: str) -> None:
        self.app = app
        self.credentials = {access_key: secret_key}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = str(environ.get("PATH_INFO", ""))
        if path.startswith("/moto-api"):
            return self.app(environ, start_response)
        if path == CREDENTIALS_PATH and environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            pair = json.loads(environ["wsgi.input"].read(length))
            self.credentials[str(pair["accessKeyId"])] = str(pair["secretAccessKey"])
            start_response("204 No Content", [])
            return [b""]
        refusal = sigv4_refusal(environ, self.credentials)
        if refusal is None:
            return self.app(environ, start_response)
        status, code, message = refusal
        _drain(environ)  # an unread body would reset the connection before the answer arrives
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
            "<RequestId>kubetune-harness</RequestId></Error>"
        ).encode()
        if environ["REQUEST_METHOD"] == "HEAD":
            body = b""
        reason = "Forbidden" if status == 403 else "Bad Request"
        start_response(
            f"{status} {reason}",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
        )
        return [body]


def _drain(environ: dict[str, Any]) -> None:
    stream = environ["wsgi.input"]
    if environ.get("wsgi.input_terminated"):
        while stream.read(64 * 1024):
            pass
        return
    left = int(environ.get("CONTENT_LENGTH") or 0)
    while left > 0:
        chunk = stream.read(min(left, 64 * 1024))
        if not chunk:
            return
        left -= len(chunk)


def checked_moto_app(access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> WsgiApp:
    """moto's WSGI app (every service, dispatched as ``moto_server`` does) behind the check."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return CredentialCheck(DomainDispatcherApplication(create_backend_app), access_key, secret_key)


# --------------------------------------------------------------------------- outages


@dataclass
class OutageProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_url``; a test cuts and restores its line.

        proxy = OutageProxy.start(s3.endpoint_url)     # proxy.endpoint_url for the clients
        proxy.cut_on(b"GET /data/", restore_after=12)  # the first matching request starts it
        proxy.cut(); proxy.restore()                   # or by hand
        proxy.close()

    A cut closes every open connection and the listening socket, so clients see a dropped
    connection, then "connection refused", as when a server goes down; a restore listens on
    the same port again. ``outages`` records ``(start, end)`` monotonic times of each cut
    (``end`` None while it lasts).
    """

    target_url: str
    port: int = 0
    outages: list[tuple[float, float | None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None
    _conns: set[socket.socket] = field(default_factory=set)
    _trigger: tuple[bytes, float | None] | None = None
    _closed: bool = False

    @classmethod
    def start(cls, target_url: str) -> OutageProxy:
        proxy = cls(target_url=target_url, port=free_port())
        proxy.restore()
        return proxy

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def cut_on(self, pattern: bytes, restore_after: float | None) -> None:
        """Cut the line when a client sends ``pattern`` (that request never arrives), and
        restore it ``restore_after`` seconds later (None: stay cut)."""
        with self._lock:
            self._trigger = (pattern, restore_after)

    def cut(self) -> None:
        with self._lock:
            if self._listener is None:
                return
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            self.outages.append((time.monotonic(), None))
        for sock in (listener, *conns):
            _close(sock)

    def restore(self) -> None:
        with self._lock:
            if self._listener is not None or self._closed:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
            if self.outages and self.outages[-1][1] is None:
                self.outages[-1] = (self.outages[-1][0], time.monotonic())
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        target = urlsplit(self.target_url)
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut: the listener is closed
            try:
                upstream = socket.create_connection((target.hostname, target.port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut while this one was being accepted
                    _close(client)
                    _close(upstream)
                    return
                self._conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        tail = b""
        try:
            while chunk := source.recv(64 * 1024):
                if from_client and self._trigger is not None:
                    seen, tail = tail + chunk, (tail + chunk)[-256:]
                    if self._fire(seen):
                        return
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns -= {source, sink}
            _close(source)
            _close(sink)

    def _fire(self, seen: bytes) -> bool:
        with self._lock:
            trigger = self._trigger
            if trigger is None or trigger[0] not in seen:
                return False
            self._trigger = None
        self.cut()
        restore_after = trigger[1]
        if restore_after is not None:
            timer = threading.Timer(restore_after, self.restore)
            timer.daemon = True
            timer.start()
        return True


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv() or accept()
    sock.close()


# --------------------------------------------------------------------------- server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.s3", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))  # moto builds some URLs from it

    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import run_simple

    print(f"S3 on http://{args.host}:{args.port}, access key {ACCESS_KEY}", flush=True)
    run_simple(
        args.host, args.port, checked_moto_app(), threaded=True, request_handler=MotoRequestHandler
    )


if __name__ == "__main__":
    main()
