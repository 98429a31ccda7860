"""A fault-injecting HTTP reverse proxy for tests: S3 clients talk to it, it talks to moto's server.

A set fraction of requests (drawn from a seeded RNG) gets a fault instead of, or on top of, the
upstream's answer:

- "503":   no forwarding; an S3-style XML error, SlowDown or ServiceUnavailable, with status 503;
- "reset": no forwarding; the connection is closed with a TCP reset and no response;
- "slow":  forwarded, and the answer is sent `slow_seconds` late;
- "403":   no forwarding; S3's AccessDenied error, with status 403.

Everything is settable while the proxy runs (`proxy.fail_fraction = 0.3`, `proxy.mode = "reset"`);
`outage()` fails every request from now (or after a number of good ones), `heal()` ends it. With
`proxy.only` set (a test of method and path), faults go only to the requests it accepts, and only
those count towards `outage(after=...)`: `only = lambda method, path: method == "GET"` fails reads of
objects and listings, not HEAD requests.

Requests are forwarded as they came: method, path and query, headers (Host included: botocore signs
it, and moto routes path-style requests without looking at it), body. A chunked request body is
de-chunked and sent with a Content-Length. Bodies and answers are held in memory (tests move a few
MiB at a time). Stdlib only.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

MODES = ("503", "reset", "slow", "403")
# Headers that describe one connection, not the message: never forwarded as they are.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",  # the proxy answered 100-continue itself and holds the whole body
}
S3_ERRORS = {
    "SlowDown": "Please reduce your request rate.",
    "ServiceUnavailable": "Service is unable to handle request.",
}


class FaultProxy:
    """Reverse proxy on 127.0.0.1 (a free port) to `upstream` (http://host:port), injecting faults."""

    def __init__(
        self,
        upstream: str,
        *,
        fail_fraction: float = 0.0,
        mode: str = "503",
        slow_seconds: float = 0.5,
        seed: int = 0,
        timeout: float = 60.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self._fail_fraction = 0.0
        self._mode = "503"
        self.fail_fraction = fail_fraction
        self.mode = mode
        self.slow_seconds = slow_seconds
        self.timeout = timeout  # seconds: idle client connections, and each upstream exchange
        self.only: Callable[[str, str], bool] | None = None  # (method, path) -> whether faults apply
        self.requests = 0  # requests received
        self.faults: Counter[str] = Counter()  # faults injected, by mode
        self._good_left: int | None = None  # an outage begins after this many more good requests
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopping = False
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread: threading.Thread | None = None

    @property
    def fail_fraction(self) -> float:
        """The fraction of requests that get a fault; 1.0 is an outage, 0.0 a healthy store."""
        return self._fail_fraction

    @fail_fraction.setter
    def fail_fraction(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"fail_fraction must be within [0, 1], not {value}")
        self._fail_fraction = value

    @property
    def mode(self) -> str:
        """The fault the failing requests get: one of MODES."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {value!r}")
        self._mode = value

    # ---- lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, drop open connections (idle keep-alive ones too), wait for the threads."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        with self._lock:
            self._stopping = True  # a handler starting from now shuts its own connection
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)
        self._server.server_close()  # joins the handler threads, which end once their socket is down

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- faults

    def outage(self, mode: str = "503", after: int = 0) -> None:
        """Fail every request with `mode`, beginning after `after` more requests have gone through."""
        with self._lock:
            self.mode = mode
            if after:
                self._good_left = after
            else:
                self._good_left = None
                self.fail_fraction = 1.0

    def heal(self) -> None:
        with self._lock:
            self.fail_fraction = 0.0
            self._good_left = None

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.faults.clear()

    def _draw(self, method: str, path: str) -> str | None:
        """Count a request and decide its fault (a mode), or None to forward it untouched."""
        with self._lock:
            self.requests += 1
            if self.only is not None and not self.only(method, path):
                return None
            if self._good_left is not None:
                self._good_left -= 1
                if self._good_left < 0:
                    self._good_left = None
                    self.fail_fraction = 1.0
            if self._rng.random() >= self.fail_fraction:
                return None
            self.faults[self.mode] += 1
            return self.mode

    def _s3_error(self) -> tuple[str, str]:
        """SlowDown and ServiceUnavailable in turn (not drawn: the RNG decides only which requests fail)."""
        with self._lock:
            code = sorted(S3_ERRORS)[self.faults["503"] % len(S3_ERRORS)]
        return code, S3_ERRORS[code]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True
    proxy: FaultProxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.proxy.timeout
        super().setup()
        with self.server.proxy._lock:
            self.server.proxy._connections.add(self.connection)
            if self.server.proxy._stopping:
                self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.proxy._lock:
                self.server.proxy._connections.discard(self.connection)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the counters say what happened

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _proxy(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        fault = proxy._draw(self.command, self.path)
        if fault == "503":
            self._send_s3_error(503, *proxy._s3_error())
            return
        if fault == "403":
            self._send_s3_error(403, "AccessDenied", "Access Denied")
            return
        if fault == "reset":
            self._reset()
            return
        try:
            status, reason, headers, payload = self._forward(body)
        except OSError as e:  # upstream gone: what a load balancer in front of a dead store says
            status, reason, headers, payload = 502, "Bad Gateway", [], f"upstream: {e}".encode()
        if fault == "slow":
            time.sleep(proxy.slow_seconds)
        try:
            self._respond(status, reason, headers, payload)
        except OSError:  # the client gave up waiting (its read timeout): nothing left to answer
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers, then the blank line
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        proxy = self.server.proxy
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=proxy.timeout)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            payload = response.read()  # de-chunked; empty for HEAD
            return response.status, response.reason, response.getheaders(), payload
        finally:
            upstream.close()

    def _respond(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes) -> None:
        self.send_response_only(status, reason)
        has_body = self.command != "HEAD" and status not in (204, 304) and status >= 200
        for name, value in headers:
            lower = name.lower()
            if lower in HOP_BY_HOP or (lower == "content-length" and has_body):
                continue
            self.send_header(name, value)
        if has_body:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if has_body:
            self.wfile.write(payload)

    def _send_s3_error(self, status: int, code: str, message: str) -> None:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{self.path.split('?', 1)[0]}</Resource><RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", "fault-proxy")]
        if self.command == "HEAD":  # a HEAD answer has no body; its length is that of the GET's
            headers.append(("Content-Length", str(len(xml))))
        reason = {"SlowDown": "Slow Down", "AccessDenied": "Forbidden"}.get(code, "Service Unavailable")
        self._respond(status, reason, headers, xml)

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0) and no response, as a dropped or crashed peer does."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
