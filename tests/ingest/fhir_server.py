"""A small, spec-faithful FHIR Bulk Data (STU3) + SMART Backend Services + search server for tests.

Threaded ``http.server`` on 127.0.0.1 (a free port), started and stopped by a fixture, with a safety
timer so it always stops by itself. Behaviour is scripted per test through :class:`Script`:

* SMART: ``/.well-known/smart-configuration``, ``POST /token`` checks the JWT assertion (signature with the
  registered public key, RS384/ES384, iss = sub = client id, aud = token URL, exp <= 5 min, unique jti);
  ``expire_tokens()`` makes the next authenticated request answer 401 (the token is revoked).
* Bulk: ``GET /$export``, ``/Patient/$export``, ``/Group/<id>/$export`` (needs ``Prefer: respond-async``):
  the first ``kickoff_429`` answers are 429 + Retry-After; then 202 + Content-Location. The status URL plays
  ``status_script`` (a list of steps: ``("202", headers)``, ``("error", status, oo_code, headers)``, ...) and
  then answers 200 with the manifest. ``DELETE`` on it answers 202. Files support ``Range``; a file named in
  ``drop_once`` is cut after half its bytes the first time (the socket is closed); one in ``fail_file`` always
  answers its status, one in ``fail_file_once`` the first time only (e.g. 410: the export expired);
  ``count_offset`` makes the manifest's ``count`` of a file wrong. A scope other than ``system/...`` is
  refused with ``invalid_scope``.
* Search: ``GET /<Type>?_count=N`` pages through the served resources of that type with ``next`` links.

Every request is recorded in ``server.log`` (method, path, query, a few headers).
"""

from __future__ import annotations

import email.utils
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:  # dropped connections are expected
        pass


@dataclass
class Script:
    kickoff_429: int = 0
    retry_after: str = "0"
    status_script: list = field(default_factory=list)
    script_jobs: set | None = None  # the jobs that play status_script (None: all)
    requires_token: bool = True
    auth: str = "smart"  # smart | bearer | basic | none
    bearer: str = "static-token"
    basic: tuple[str, str] = ("user", "pass")
    client_id: str = "synthfactory-test"
    public_key: Any = None          # cryptography public key for the assertion
    token_lifetime: int = 300
    drop_once: set = field(default_factory=set)
    fail_file: dict = field(default_factory=dict)     # name -> HTTP status (always)
    fail_file_once: dict = field(default_factory=dict)  # name -> HTTP status (the first request only)
    count_offset: dict = field(default_factory=dict)  # name -> added to the manifest's count (a wrong count)
    errors: list = field(default_factory=list)         # OperationOutcome dicts for error[]
    deleted: list = field(default_factory=list)        # (type, id) for deleted[]
    transaction_time: str = "2026-01-02T03:04:05Z"
    page_size_cap: int = 1000


class FhirTestServer:
    def __init__(self, files: dict[str, bytes] | None = None, script: Script | None = None,
                 lifetime: float = 120.0):
        self.files = dict(files or {})      # name -> NDJSON bytes (name: <Type>.ndjson)
        self.script = script or Script()
        self.log: list[dict] = []
        self.tokens: set[str] = set()
        self.jtis: set[str] = set()
        self.token_requests = 0
        self.kickoffs = 0
        self.deletes = 0
        self.jobs: dict[str, dict] = {}
        self.dropped: set[str] = set()
        self._expire = False
        self._lock = threading.Lock()
        self.httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def start(self) -> "FhirTestServer":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        try:
            self.httpd.shutdown()
        finally:
            self.httpd.server_close()

    def expire_tokens(self) -> None:
        with self._lock:
            self._expire = True

    # -- resources by type (for search) ------------------------------------------------------------
    def resources(self, rtype: str) -> list[dict]:
        cache = self.__dict__.setdefault("_parsed", {})
        if rtype not in cache:
            out = []
            for name, data in sorted(self.files.items()):
                if name.split(".")[0] == rtype:
                    out += [json.loads(line) for line in data.splitlines() if line.strip()]
            cache[rtype] = out
        return cache[rtype]

    def manifest(self, job: dict) -> dict:
        base = self.base
        types = job["types"]
        out = [{"type": name.split(".")[0], "url": f"{base}/files/{name}",
                "count": len(self.files[name].splitlines()) + self.script.count_offset.get(name, 0)}
               for name in sorted(self.files) if not types or name.split(".")[0] in types]
        m = {"transactionTime": self.script.transaction_time, "request": job["request"],
             "requiresAccessToken": self.script.requires_token, "output": out, "error": [], "deleted": []}
        if self.script.errors:
            self.files["errors.ndjson"] = b"\n".join(json.dumps(o).encode() for o in self.script.errors) + b"\n"
            m["error"] = [{"type": "OperationOutcome", "url": f"{base}/files/errors.ndjson"}]
        if self.script.deleted:
            bundle = {"resourceType": "Bundle", "type": "transaction",
                      "entry": [{"request": {"method": "DELETE", "url": f"{t}/{i}"}} for t, i in self.script.deleted]}
            self.files["deleted.ndjson"] = json.dumps(bundle).encode() + b"\n"
            m["deleted"] = [{"type": "Bundle", "url": f"{base}/files/deleted.ndjson"}]
        return m

    # -- HTTP ----------------------------------------------------------------------------------------
    def _handler(self) -> type:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            # helpers
            def send(self, status: int, body: Any = b"", headers: dict | None = None,
                     ctype: str = "application/fhir+json") -> None:
                if not isinstance(body, (bytes, bytearray)):
                    body = json.dumps(body).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if body:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def outcome(self, status: int, code: str, severity: str = "error", headers: dict | None = None) -> None:
                self.send(status, {"resourceType": "OperationOutcome",
                                   "issue": [{"severity": severity, "code": code, "diagnostics": "test"}]}, headers)

            def authorized(self) -> bool:
                s = server.script
                h = self.headers.get("Authorization", "")
                if s.auth == "none":
                    return True
                if s.auth == "bearer":
                    return h == f"Bearer {s.bearer}"
                if s.auth == "basic":
                    import base64

                    return h == "Basic " + base64.b64encode(f"{s.basic[0]}:{s.basic[1]}".encode()).decode()
                with server._lock:
                    if server._expire:
                        server._expire = False
                        server.tokens.clear()
                        return False
                    return h.startswith("Bearer ") and h[7:] in server.tokens

            def record(self, parsed: urllib.parse.ParseResult) -> None:
                server.log.append({"method": self.command, "path": parsed.path,
                                   "query": urllib.parse.parse_qs(parsed.query, keep_blank_values=True),
                                   "accept": self.headers.get("Accept"), "prefer": self.headers.get("Prefer"),
                                   "range": self.headers.get("Range"),
                                   "auth": bool(self.headers.get("Authorization")), "t": time.time()})

            # verbs
            def do_DELETE(self) -> None:  # noqa: N802
                parsed = urllib.parse.urlparse(self.path)
                self.record(parsed)
                if parsed.path.startswith("/fhir/status/"):
                    server.deletes += 1
                    self.send(202)
                else:
                    self.send(404)

            def do_POST(self) -> None:  # noqa: N802
                parsed = urllib.parse.urlparse(self.path)
                self.record(parsed)
                n = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(n).decode())
                if parsed.path != "/fhir/token":
                    return self.send(404)
                server.token_requests += 1
                s = server.script
                try:
                    assert form["grant_type"] == ["client_credentials"]
                    assert form["client_assertion_type"] == ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]
                    token = form["client_assertion"][0]
                    header = jwt.get_unverified_header(token)
                    assert header["alg"] in ("RS384", "ES384") and header.get("kid")
                    claims = jwt.decode(token, s.public_key, algorithms=["RS384", "ES384"],
                                        audience=f"{server.base}/token")
                    assert claims["iss"] == claims["sub"] == s.client_id
                    assert claims["exp"] - time.time() <= 301
                    assert claims["jti"] not in server.jtis
                    server.jtis.add(claims["jti"])
                except Exception:  # noqa: BLE001
                    return self.send(400, {"error": "invalid_client"}, ctype="application/json")
                if not form["scope"][0].startswith("system/"):
                    return self.send(400, {"error": "invalid_scope"}, ctype="application/json")
                access = f"tok-{len(server.jtis)}"
                with server._lock:
                    server.tokens.add(access)
                self.send(200, {"access_token": access, "token_type": "bearer", "expires_in": s.token_lifetime,
                                "scope": form["scope"][0]}, ctype="application/json")

            def do_GET(self) -> None:  # noqa: N802
                parsed = urllib.parse.urlparse(self.path)
                self.record(parsed)
                path = parsed.path
                q = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
                if path == "/fhir/.well-known/smart-configuration":
                    return self.send(200, {"token_endpoint": f"{server.base}/token",
                                           "grant_types_supported": ["client_credentials"],
                                           "token_endpoint_auth_methods_supported": ["private_key_jwt"]},
                                     ctype="application/json")
                if path.startswith("/fhir/files/"):
                    return self.file(path.rsplit("/", 1)[1])
                if not self.authorized():
                    return self.outcome(401, "login")
                if path.endswith("/$export"):
                    return self.kickoff(path, q)
                if path.startswith("/fhir/status/"):
                    return self.status(path.rsplit("/", 1)[1])
                rtype = path[len("/fhir/"):]
                if rtype.isalpha():
                    return self.search(rtype, q)
                self.send(404)

            def kickoff(self, path: str, q: dict) -> None:
                if self.headers.get("Prefer") != "respond-async":
                    return self.outcome(400, "invalid")
                with server._lock:
                    server.kickoffs += 1
                    n = server.kickoffs
                if n <= server.script.kickoff_429:
                    return self.outcome(429, "throttled", headers={"Retry-After": server.script.retry_after})
                job = f"job{n}"
                types = q.get("_type", [""])[0].split(",") if q.get("_type") else []
                server.jobs[job] = {"types": [t for t in types if t], "step": 0,
                                    "request": f"{server.base}{path[len('/fhir'):]}?{urllib.parse.urlencode(q, doseq=True)}",
                                    "query": q}
                self.send(202, b"", {"Content-Location": f"{server.base}/status/{job}"})

            def status(self, job_id: str) -> None:
                job = server.jobs.get(job_id)
                if job is None:
                    return self.outcome(404, "not-found")
                script = server.script.status_script
                if server.script.script_jobs is not None and job_id not in server.script.script_jobs:
                    script = []
                step = job["step"]
                job["step"] += 1
                if step < len(script):
                    kind, *rest = script[step]
                    if kind == "202":
                        return self.send(202, b"", rest[0] if rest else {"Retry-After": "0", "X-Progress": "working"})
                    if kind == "error":
                        status, code = rest[0], rest[1]
                        return self.outcome(status, code, headers=rest[2] if len(rest) > 2 else None)
                    if kind == "gone":
                        return self.outcome(404, "not-found")
                    if kind == "fail":
                        return self.outcome(500, "exception")
                self.send(200, server.manifest(job), {"Expires": email.utils.formatdate(time.time() + 3600,
                                                                                     usegmt=True)},
                          ctype="application/json")

            def file(self, name: str) -> None:
                s = server.script
                if s.requires_token and not self.authorized():
                    return self.outcome(401, "login")
                if not s.requires_token and self.headers.get("Authorization"):
                    return self.outcome(400, "invalid")  # a presigned-URL host would reject it
                if name in s.fail_file:
                    return self.outcome(s.fail_file[name], "exception")
                if name in s.fail_file_once:
                    return self.outcome(s.fail_file_once.pop(name), "exception")
                data = server.files.get(name)
                if data is None:
                    return self.send(404)
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        return self.send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                body = data[start:]
                headers = {"Accept-Ranges": "bytes"}
                status = 200
                if start:
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                if name in s.drop_once and name not in server.dropped and not start:
                    server.dropped.add(name)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/fhir+ndjson")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                self.send(status, body, headers, ctype="application/fhir+ndjson")

            def search(self, rtype: str, q: dict) -> None:
                items = server.resources(rtype)
                count = min(int(q.get("_count", ["50"])[0]), server.script.page_size_cap)
                offset = int(q.get("_offset", ["0"])[0])
                page = items[offset:offset + count]
                bundle: dict = {"resourceType": "Bundle", "type": "searchset", "total": len(items),
                                "link": [{"relation": "self", "url": f"{server.base}/{rtype}"}],
                                "entry": [{"fullUrl": f"{server.base}/{rtype}/{r['id']}", "resource": r,
                                           "search": {"mode": "match"}} for r in page]}
                if offset + count < len(items):
                    bundle["link"].append({"relation": "next",
                                           "url": f"{server.base}/{rtype}?_count={count}&_offset={offset + count}"})
                self.send(200, bundle)

        return Handler


def files_of(folder: Path, types: tuple[str, ...] = ("Patient", "Encounter", "Condition", "Observation")) -> dict[str, bytes]:
    """The NDJSON files of an extract folder that the server should export (name -> bytes)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.ndjson")) if p.name.split(".")[0] in types}
