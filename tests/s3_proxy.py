"""An HTTP proxy on 127.0.0.1 in front of the moto S3 server, for tests that must see the
requests a store makes (which, how many, how many at once) or make some of them fail.

Each request is forwarded as it came (the Host header too: moto does not check signatures)
and recorded as a :class:`Seen`. ``fail(predicate, count, status, code)`` answers the next
``count`` requests that match with an S3 error instead of forwarding them; ``gate(predicate,
meet)`` holds each matching request until ``meet`` of them are in flight at once (or
:data:`GATE_SECONDS` pass), so that a test can tell parallel requests from sequential ones
without depending on timing: sequential requests never meet, and each waits the full time.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

GATE_SECONDS = 5.0
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass(frozen=True)
class Seen:
    """One request the proxy received: its method, path and query parameters, what it
    answered, and how many requests of its kind were in flight when it arrived."""

    method: str
    path: str
    query: dict[str, list[str]]
    status: int
    in_flight: int

    @property
    def action(self) -> str:
        """The S3 operation, told from method and query as S3 does."""
        q = self.query
        if self.method == "POST" and "uploads" in q:
            return "CreateMultipartUpload"
        if self.method == "PUT" and "partNumber" in q:
            return "UploadPart"
        if self.method == "POST" and "uploadId" in q:
            return "CompleteMultipartUpload"
        if self.method == "DELETE" and "uploadId" in q:
            return "AbortMultipartUpload"
        if self.method == "PUT":
            return "PutObject"
        if self.method == "GET" and ("list-type" in q or "prefix" in q or "delimiter" in q):
            return "ListObjects"
        return {"GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(self.method, self.method)


Predicate = Callable[[Seen], bool]


class S3Proxy:
    """Forwards to ``upstream`` (``http://host:port``); see the module's documentation."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._failures: list[list[Any]] = []  # [predicate, remaining, status, code]
        self._gates: list[tuple[Predicate, int, threading.Condition, list[int]]] = []
        self._in_flight: Counter[str] = Counter()  # by action
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for large bodies

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail(self, predicate: Predicate, count: int, *, status: int = 500, code: str = "InternalError") -> None:
        """Answer the next ``count`` requests matching ``predicate`` with an S3 error."""
        with self._lock:
            self._failures.append([predicate, count, status, code])

    def gate(self, predicate: Predicate, meet: int) -> None:
        """Hold matching requests until ``meet`` of them are in flight at once."""
        self._gates.append((predicate, meet, threading.Condition(), [0]))

    def actions(self) -> list[str]:
        with self._lock:
            return [seen.action for seen in self.seen]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        split = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        probe = Seen(handler.command, split.path, parse_qs(split.query, keep_blank_values=True), 0, 0)
        failure = None
        with self._lock:
            self._in_flight[probe.action] += 1
            for entry in self._failures:
                if entry[1] > 0 and entry[0](probe):
                    entry[1] -= 1
                    failure = entry
                    break
        try:
            for predicate, meet, condition, waiting in self._gates:
                if predicate(probe):
                    with condition:
                        waiting[0] += 1
                        condition.notify_all()
                        condition.wait_for(lambda w=waiting, m=meet: w[0] >= m, timeout=GATE_SECONDS)
            with self._lock:
                in_flight = self._in_flight[probe.action]
            if failure is not None:
                status = failure[2]
                headers = [("Content-Type", "application/xml")]
                payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{failure[3]}</Code>"
                           f"<Message>injected by the test proxy</Message></Error>").encode()
            else:
                status, headers, payload = self._forward(handler, body)
            with self._lock:  # recorded before the client hears back: it may look at once
                self.seen.append(Seen(probe.method, probe.path, probe.query, status, in_flight))
            handler.send_response(status)
            head = handler.command == "HEAD"  # its Content-Length is the object's
            for key, value in headers:
                if key.lower() not in _HOP and (head or key.lower() != "content-length"):
                    handler.send_header(key, value)
            if not head:
                handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            if not head:
                handler.wfile.write(payload)
        finally:
            with self._lock:
                self._in_flight[probe.action] -= 1

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """The upstream server's answer to the request: status, headers, body."""
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            connection.putrequest(handler.command, handler.path, skip_host=True, skip_accept_encoding=True)
            for key, value in handler.headers.items():
                if key.lower() not in _HOP and key.lower() != "content-length":
                    connection.putheader(key, value)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()


@contextmanager
def s3_proxy(options: dict[str, Any]) -> Iterator[tuple[S3Proxy, dict[str, Any]]]:
    """A proxy in front of the server of ``options`` (the ``s3_options`` fixture), and
    storage options that go through it."""
    proxy = S3Proxy(options["client_kwargs"]["endpoint_url"])
    try:
        yield proxy, {**options, "client_kwargs": {**options["client_kwargs"], "endpoint_url": proxy.url}}
    finally:
        proxy.close()
