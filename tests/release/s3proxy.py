"""A tiny fault-injecting HTTP proxy on loopback, in front of the S3 emulator.

Every request is forwarded to the upstream (moto's server) unless a :class:`Rule` matches it; then it gets,
for the rule's next ``times`` matches, one of:

- ``"503"``: an S3 ``ServiceUnavailable`` error (the server answering 5xx);
- ``"drop"``: the connection closed without an answer (a server that died mid-request);
- ``"stop"``: the whole proxy shuts down, so later requests find nothing listening (the server stopped);
- ``"hold"``: the request waits until :meth:`FaultProxy.release` (bounded) and is then forwarded or dropped,
  so a test can kill the client while its request is in flight.

Everything is bounded: holds time out, threads are daemons, ``stop()`` closes the socket.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlparse

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
HOLD_LIMIT_S = 60


@dataclass
class Rule:
    """``match(method, path, headers)`` selects requests; the ``skip`` first matches pass, the next ``times``
    get ``action``."""

    match: Callable[[str, str, dict], bool]
    action: str = "503"
    times: int = 1
    skip: int = 0
    seen: int = 0
    fired: int = 0
    after_hold: str = "forward"  # what a released "hold" does: forward or drop
    arrived: threading.Event = field(default_factory=threading.Event)  # a request matched and was faulted
    finished: threading.Event = field(default_factory=threading.Event)  # ... and its handling is over

    def take(self, method: str, path: str, headers: dict) -> str | None:
        if not self.match(method, path, headers):
            return None
        self.seen += 1
        if self.seen <= self.skip or self.fired >= self.times:
            return None
        self.fired += 1
        self.arrived.set()
        return self.action


def is_copy(method: str, path: str, headers: dict) -> bool:
    return method == "PUT" and "x-amz-copy-source" in headers


def is_upload_part(method: str, path: str, headers: dict) -> bool:
    return method == "PUT" and "partNumber=" in path and "x-amz-copy-source" not in headers


def copy_of(pattern: str) -> Callable[[str, str, dict], bool]:
    """A server-side copy (CopyObject or UploadPartCopy) whose path matches ``pattern``."""
    rx = re.compile(pattern)
    return lambda m, p, h: is_copy(m, p, h) and bool(rx.search(p))


def put_of(pattern: str) -> Callable[[str, str, dict], bool]:
    """A PUT (not a copy) whose path matches ``pattern``."""
    rx = re.compile(pattern)
    return lambda m, p, h: m == "PUT" and "x-amz-copy-source" not in h and bool(rx.search(p))


def any_of(pattern: str) -> Callable[[str, str, dict], bool]:
    rx = re.compile(pattern)
    return lambda m, p, h: bool(rx.search(p))


class FaultProxy:
    def __init__(self, upstream: str, port: int = 0):
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self.port = port
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path, status or -1 for a fault)
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._conns: set = set()

    # -- control
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def release(self) -> None:
        self._release.set()

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._conns.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._conns.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                headers = {k.lower(): v for k, v in self.headers.items()}
                action, fired = None, None
                if proxy._server is None:  # stopped: answer nothing
                    self.close_connection = True
                    return
                with proxy._lock:
                    for rule in proxy.rules:
                        action = rule.take(self.command, self.path, headers)
                        if action:
                            fired = rule
                            break
                try:
                    self._answer(action, fired, body)
                except OSError:  # the client went away (killed) while we answered
                    self.close_connection = True
                finally:
                    if fired is not None:
                        fired.finished.set()

            def _answer(self, action: str | None, hold_rule: Rule | None, body: bytes) -> None:
                if action == "hold":
                    proxy._release.wait(HOLD_LIMIT_S)
                    action = None if hold_rule.after_hold == "forward" else "drop"
                if action == "503":
                    proxy.log.append((self.command, self.path, -1))
                    msg = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
                           b"<Message>injected fault</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(msg)
                    return
                if action in ("drop", "stop"):
                    proxy.log.append((self.command, self.path, -1))
                    self.close_connection = True
                    if action == "stop":
                        threading.Thread(target=proxy.stop, daemon=True).start()
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                fwd = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                fwd["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=fwd)
                resp = conn.getresponse()
                data = resp.read()
                proxy.log.append((self.command, self.path, resp.status))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:  # kept-alive client connections die with the server, as they would
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.stop()
