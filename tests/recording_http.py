"""A tiny HTTP server on loopback that records every request and answers with a fixed reply.

    with RecordingServer(status=404) as server:      # an "S3 endpoint" that has nothing
        ...  # point a client at server.url
    server.requests                                  # [{"method", "path", headers...}, ...]

    RecordingServer(body={"choices": [{"text": " ok"}]})   # an OpenAI-style completions API

Tests use it to see exactly who called an endpoint and with which credentials.
"""

from __future__ import annotations

import http.server
import json
import threading
from types import TracebackType
from typing import Any


class RecordingServer(http.server.ThreadingHTTPServer):
    """Answers ``status`` (with ``body`` as JSON, if any) to GET, HEAD and POST."""

    def __init__(self, status: int = 200, body: dict[str, Any] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.status = status
        self.body = b"" if body is None else json.dumps(body).encode()
        self.requests: list[dict[str, str]] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def authorizations(self, path_prefix: str = "") -> list[str]:
        """The Authorization header of each request under ``path_prefix`` ("" if none)."""
        return [
            r.get("Authorization", "") for r in self.requests if r["path"].startswith(path_prefix)
        ]

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RecordingServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        request = {"method": self.command, "path": self.path, **dict(self.headers.items())}
        self.server.requests.append(request)
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.server.body)

    do_GET = do_HEAD = do_POST = _answer
