"""An HTTP proxy on 127.0.0.1 in front of a test S3 server, that records every request and injects faults
into the ones a rule matches: an HTTP 500/503 answer, a reset connection, or a lost response (the request
is performed upstream, then the connection is reset before the answer gets back). Real HTTP, real client:
nothing of s3fs or botocore is mocked."""

from __future__ import annotations

import dataclasses
import http.client
import socket
import struct
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERROR_CODES = {500: "InternalError", 503: "SlowDown"}


@dataclasses.dataclass(frozen=True)
class Request:
    """A request as the proxy saw it."""

    method: str
    path: str  # without the query
    query: str
    range: str | None
    #: Status sent back (0: connection reset), and bytes of body sent back.
    status: int = 0
    nbytes: int = 0
    fault: str | None = None


@dataclasses.dataclass
class Rule:
    """Inject ``action`` ("500", "503", "reset" or "lost") into the next ``times`` matching requests,
    after letting ``skip`` matching requests through."""

    match: Callable[[Request], bool]
    action: str
    times: int = 1
    skip: int = 0
    hits: int = 0


class FaultProxy:
    """Forwards to ``upstream`` (``http://host:port``); ``endpoint`` is the proxy's own URL."""

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.requests: list[Request] = []
        self.rules: list[Rule] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, match: Callable[[Request], bool], action: str, times: int = 1, skip: int = 0) -> Rule:
        """Add a fault rule; returns it (``rule.hits`` counts the faults injected)."""
        rule = Rule(match, action, times, skip)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.requests.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one request --------------------------------------------------------------------------------

    def _pick(self, req: Request) -> str | None:
        with self._lock:
            for rule in self.rules:
                if rule.hits < rule.times and rule.match(req):
                    if rule.skip > 0:
                        rule.skip -= 1
                        continue
                    rule.hits += 1
                    return rule.action
        return None

    def _record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path, _, query = h.path.partition("?")
        req = Request(h.command, path, query, h.headers.get("Range"))
        body = _read_body(h)
        action = self._pick(req)
        if action in ("500", "503"):
            status = int(action)
            xml = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{_ERROR_CODES[status]}</Code>"
                f"<Message>injected by the test proxy</Message></Error>"
            ).encode()
            # Recorded before the answer goes out: once a client has its answer, the request is in the log.
            self._record(dataclasses.replace(req, status=status, fault=action))
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(xml)))
            h.end_headers()
            h.wfile.write(xml)
            return
        if action == "reset":
            self._record(dataclasses.replace(req, fault=action))
            _reset(h)
            return
        status, headers, data = self._forward(h, body)
        if action == "lost":  # performed upstream; the answer never arrives
            self._record(dataclasses.replace(req, status=status, fault=action))
            _reset(h)
            return
        self._record(dataclasses.replace(req, status=status, nbytes=len(data)))  # before the answer, as above
        h.send_response(status)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data) if h.command != "HEAD" else _length(headers)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():
                if k.lower() not in ("connection", "keep-alive"):
                    conn.putheader(k, v)
            conn.endheaders()
            if body:
                conn.send(body)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()


def _length(headers: list[tuple[str, str]]) -> str:
    return next((v for k, v in headers if k.lower() == "content-length"), "0")


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    """The raw body bytes, framing included for chunked bodies (forwarded as they came)."""
    if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
        raw = bytearray()
        while True:
            line = h.rfile.readline()
            raw += line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then an empty line
                    t = h.rfile.readline()
                    raw += t
                    if t in (b"\r\n", b"\n", b""):
                        return bytes(raw)
            raw += h.rfile.read(size + 2)
    n = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(n) if n else b""


def _reset(h: BaseHTTPRequestHandler) -> None:
    """Close the client's connection with a TCP reset (no answer at all)."""
    sock = h.connection
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
    h.close_connection = True
