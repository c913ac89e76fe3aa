"""A fault-injecting HTTP proxy for tests: put it between s3fs and the S3-protocol test server
(moto on loopback) and it answers a chosen fraction of requests with a fault instead of the
server's answer. Test code only; it listens on 127.0.0.1 and forwards to one upstream.

Which requests fail is drawn at random (seeded) at ``rate``; the kinds take turns, so any four
faults cover all four. ``max_consecutive=k`` never fails the same request (method, path,
range) more than k times in a row: with k below the clients' retry count every fault is one
that retries survive, which keeps a "transient faults" test deterministic in its outcome.

Faults:

- ``503``: ``503 SlowDown`` (S3's throttling answer), the request never reaches the server.
- ``500``: ``500 InternalError``, the request never reaches the server.
- ``reset``: the connection is reset (RST) before any answer; the server never sees it.
- ``truncate``: the request is forwarded and applied; the answer's headers promise the whole
  body but only half of it is sent before the connection is reset. An answer without a body
  (a PUT's, a HEAD's) is lost entirely, after the server applied the request.

``rate`` can be changed while it runs; ``arm(pattern, n, rate)`` switches to ``rate`` right
after the n-th PUT whose path contains ``pattern`` has been forwarded (e.g. "all storage fails
after the third shard record"). ``stats`` counts requests and faults by kind.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("503", "500", "reset", "truncate")
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
       "upgrade", "expect", "content-length"}
ERRORS = {
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError",
            "We encountered an internal error. Please try again."),
}


class FaultProxy:
    def __init__(self, upstream: str, rate: float = 0.0, kinds: tuple[str, ...] = KINDS,
                 seed: int = 0, max_consecutive: int | None = None) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.rate = rate
        self.kinds = tuple(kinds)
        self.max_consecutive = max_consecutive
        self._streak: dict[tuple[str, str, str], int] = {}
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._armed: tuple[str, int, float] | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def arm(self, pattern: str, n: int, rate: float) -> None:
        with self._lock:
            self._armed = (pattern, n, rate)

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name="faultproxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- per request ----------------------------------------------------------------------
    def _decide(self, method: str, path: str, rng: str) -> str | None:
        key = (method, path, rng)
        with self._lock:
            self.stats["requests"] += 1
            self.stats[f"requests:{method}"] += 1
            streak = self._streak.pop(key, 0)
            if self.rate > 0 and self._rng.random() < self.rate and (
                    self.max_consecutive is None or streak < self.max_consecutive):
                kind = self.kinds[self.stats["faults"] % len(self.kinds)]
                self.stats["faults"] += 1
                self.stats[kind] += 1
                self._streak[key] = streak + 1
                return kind
            return None

    def _forwarded(self, method: str, path: str) -> None:
        with self._lock:
            if self._armed and method == "PUT" and self._armed[0] in path:
                pattern, n, rate = self._armed
                if n <= 1:
                    self.rate, self._armed = rate, None
                else:
                    self._armed = (pattern, n - 1, rate)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients use it

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _close(self, reset: bool = True) -> None:
        """End the connection: with RST (SO_LINGER 0: the client sees 'connection reset by
        peer'), or with a plain FIN after what was sent (the client sees a short body)."""
        try:
            self.wfile.flush()
        except OSError:
            pass
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR if reset else socket.SHUT_WR)
        except OSError:
            pass

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes,
              length: int | None = None) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() not in HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _upstream(self, body: bytes):
        host, port = self.owner.upstream
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in HOP:
                    conn.putheader(k, v)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _handle(self) -> None:
        body = self._body()
        kind = self.owner._decide(self.command, self.path, self.headers.get("Range", ""))
        if kind in ERRORS:
            status, reason, code, msg = ERRORS[kind]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>{msg}</Message><RequestId>faultproxy</RequestId></Error>").encode()
            self._send(status, reason, [("Content-Type", "application/xml")], xml)
            return
        if kind == "reset":
            self._close(reset=True)
            return
        status, reason, headers, data = self._upstream(body)
        self.owner._forwarded(self.command, self.path)
        length = dict((k.lower(), v) for k, v in headers).get("content-length")
        if self.command == "HEAD":
            self._send(status, reason, headers, b"", int(length) if length else 0)
            if kind == "truncate":
                self._close(reset=True)
            return
        if kind == "truncate":
            if len(data) >= 2:  # headers promise len(data); half of it, then end of stream
                self._send(status, reason, headers, data[:len(data) // 2], len(data))
                self._close(reset=False)
            else:  # nothing to cut short: the answer is lost after the server applied it
                self._close(reset=True)
            return
        self._send(status, reason, headers, data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
