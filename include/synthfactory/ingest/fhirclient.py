"""A small synchronous FHIR HTTP client (httpx): auth headers, one re-authentication on 401, retries of
transient failures (connection errors, 429, 5xx) that honour ``Retry-After``, and resumable downloads.

Used by the Bulk Data client (:mod:`.bulk`) and REST search (:mod:`.rest`). No Airflow import.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from synthfactory.fhir.normalize import ExtractError
from .smart import AuthConfig, AuthError, SmartAuth

log = logging.getLogger(__name__)

__all__ = ["FhirClient", "FhirHttpError", "RetryPolicy", "parse_retry_after", "backoff_wait"]

FHIR_JSON = "application/fhir+json"
TRANSIENT_STATUS = frozenset((408, 429, 500, 502, 503, 504))


class FhirHttpError(ExtractError):
    """The server refused or failed a request for good. The message carries the status and URL path only."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait between tries: a server's ``Retry-After`` (capped at ``max_wait``, at least
    ``min_wait``) or exponential backoff from ``base`` with jitter."""

    attempts: int = 5
    base: float = 0.5
    min_wait: float = 0.0
    max_wait: float = 300.0
    jitter: float = 0.1


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date. None when absent or
    unreadable; never negative."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def backoff_wait(policy: RetryPolicy, attempt: int, retry_after: float | None) -> float:
    """The wait before try ``attempt + 1`` (attempt counts from 0)."""
    if retry_after is not None:
        wait = retry_after
    else:
        wait = policy.base * (2 ** attempt)
        wait *= 1 + random.uniform(-policy.jitter, policy.jitter) if policy.jitter else 1
    return min(max(wait, policy.min_wait), policy.max_wait)


def outcome_summary(body: Any) -> tuple[list[str], list[str]]:
    """(issue codes, severities) of an OperationOutcome body (no diagnostics: they may name patients)."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return [], []
    codes, sevs = [], []
    for issue in body.get("issue") or ():
        if isinstance(issue, dict):
            codes.append(str(issue.get("code", "")))
            sevs.append(str(issue.get("severity", "")))
    return codes, sevs


def _path(url: str) -> str:
    """The URL without its query (for messages: queries may hold patient ids)."""
    return url.split("?", 1)[0]


class FhirClient:
    """Sync client for one FHIR base URL."""

    def __init__(self, base_url: str, auth: AuthConfig | None = None, *, http: httpx.Client | None = None,
                 retry: RetryPolicy | None = None, timeout: float = 60.0, sleep: Callable[[float], None] = time.sleep,
                 verify: bool | str = True):
        self.base_url = base_url.rstrip("/")
        self.auth = SmartAuth(auth or AuthConfig(), self.base_url)
        self.http = http or httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
                                         follow_redirects=True, verify=verify)
        self._own_http = http is None
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.stats = {"requests": 0, "retries": 0, "reauth": 0}

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def __enter__(self) -> "FhirClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def _auth_headers(self, with_auth: bool) -> dict[str, str]:
        if not with_auth:
            return {}
        try:
            return self.auth.headers(self.http)
        except httpx.TransportError as exc:
            raise FhirHttpError(f"cannot reach the token endpoint ({type(exc).__name__})") from None

    def request(self, method: str, path: str, *, params: Any = None, headers: dict | None = None,
                json: Any = None, with_auth: bool = True, ok: tuple[int, ...] = (200,),
                retry_status: frozenset[int] = TRANSIENT_STATUS) -> httpx.Response:
        """Send a request; retry transient failures; re-authenticate once on 401. Returns the response
        when its status is in ``ok``; raises FhirHttpError otherwise."""
        url = self.url(path)
        reauthed = False
        attempt = 0
        while True:
            h = {"Accept": FHIR_JSON, **(headers or {}), **self._auth_headers(with_auth)}
            self.stats["requests"] += 1
            try:
                r = self.http.request(method, url, params=params, headers=h, json=json)
            except httpx.TransportError as exc:
                if attempt + 1 >= self.retry.attempts:
                    raise FhirHttpError(f"{method} {_path(url)} failed after {attempt + 1} tries "
                                        f"({type(exc).__name__})") from None
                wait = backoff_wait(self.retry, attempt, None)
                log.warning("%s %s: %s; retrying in %.1fs", method, _path(url), type(exc).__name__, wait)
                self.stats["retries"] += 1
                self.sleep(wait)
                attempt += 1
                continue
            if r.status_code == 401 and with_auth and not reauthed and self.auth.invalidate():
                reauthed = True
                self.stats["reauth"] += 1
                log.info("%s %s: 401, authenticating again", method, _path(url))
                continue
            if r.status_code in ok:
                return r
            codes, _ = outcome_summary(_json(r))
            transient = r.status_code in retry_status or "transient" in codes or "throttled" in codes
            if transient and attempt + 1 < self.retry.attempts:
                wait = backoff_wait(self.retry, attempt, parse_retry_after(r.headers.get("Retry-After")))
                log.warning("%s %s: HTTP %d%s; retrying in %.1fs", method, _path(url), r.status_code,
                            f" ({','.join(codes)})" if codes else "", wait)
                self.stats["retries"] += 1
                self.sleep(wait)
                attempt += 1
                continue
            raise FhirHttpError(f"{method} {_path(url)}: HTTP {r.status_code}"
                                f"{' (' + ','.join(c for c in codes if c) + ')' if any(codes) else ''}",
                                status=r.status_code)

    def get_json(self, path: str, params: Any = None) -> Any:
        r = self.request("GET", path, params=params)
        try:
            return r.json()
        except ValueError:
            raise FhirHttpError(f"GET {_path(self.url(path))}: the response is not JSON") from None

    # -- downloads ---------------------------------------------------------------------------------
    def download(self, url: str, dest: str, *, with_auth: bool, attempts: int | None = None,
                 accept: str = "application/fhir+ndjson", progress: Callable[[int], None] | None = None) -> dict:
        """Stream ``url`` into ``dest`` (via ``dest + '.part'``). A dropped connection is retried and the
        download resumes where it stopped (``Range``); a server that ignores the range restarts it. A
        gzip ``Content-Encoding`` is kept as is (``dest`` gets ``.gz``). Returns {bytes, sha256, resumed, path}."""
        part = dest + ".part"
        gz = False
        attempts = attempts or self.retry.attempts
        resumed = 0
        reauthed = False
        attempt = 0
        while True:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            h = {"Accept": accept, **self._auth_headers(with_auth)}
            if have:
                h["Range"] = f"bytes={have}-"
            self.stats["requests"] += 1
            try:
                with self.http.stream("GET", url, headers=h) as r:
                    if r.status_code == 401 and with_auth and not reauthed and self.auth.invalidate():
                        reauthed = True
                        self.stats["reauth"] += 1
                        continue
                    if r.status_code == 416 and have:  # already complete
                        break
                    if r.status_code not in (200, 206):
                        transient = r.status_code in TRANSIENT_STATUS
                        if transient and attempt + 1 < attempts:
                            wait = backoff_wait(self.retry, attempt, parse_retry_after(r.headers.get("Retry-After")))
                            self.stats["retries"] += 1
                            self.sleep(wait)
                            attempt += 1
                            continue
                        raise FhirHttpError(f"download {_path(url)}: HTTP {r.status_code}", status=r.status_code)
                    mode = "ab" if (r.status_code == 206 and have) else "wb"
                    if mode == "ab":
                        resumed += 1
                    encoding = r.headers.get("Content-Encoding", "").lower()
                    if encoding == "gzip":  # kept compressed (a Range applies to the encoded bytes)
                        gz = True
                    elif encoding not in ("", "identity"):
                        raise FhirHttpError(f"download {_path(url)}: unsupported Content-Encoding {encoding}")
                    with open(part, mode) as fh:
                        for chunk in r.iter_raw():
                            fh.write(chunk)
                            if progress:
                                progress(len(chunk))
                break
            except httpx.TransportError as exc:
                if attempt + 1 >= attempts:
                    raise FhirHttpError(f"download {_path(url)} failed after {attempt + 1} tries "
                                        f"({type(exc).__name__})") from None
                wait = backoff_wait(self.retry, attempt, None)
                log.warning("download %s: %s after %d bytes; resuming in %.1fs", _path(url), type(exc).__name__,
                            os.path.getsize(part) if os.path.exists(part) else 0, wait)
                self.stats["retries"] += 1
                self.sleep(wait)
                attempt += 1
        h = hashlib.sha256()
        size = 0
        with open(part, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
        if gz and not dest.endswith(".gz"):
            dest += ".gz"
        os.replace(part, dest)
        return {"bytes": size, "sha256": h.hexdigest(), "resumed": resumed, "path": dest}


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except Exception:  # noqa: BLE001
        return None


__all__ += ["outcome_summary", "AuthError"]
