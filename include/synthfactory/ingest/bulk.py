"""FHIR Bulk Data Access ($export, STU3) client: kick-off, status polling, manifest, downloads, cleanup.

* Kick-off: ``GET [base]/$export``, ``[base]/Patient/$export`` or ``[base]/Group/<id>/$export`` with
  ``Accept: application/fhir+json``, ``Prefer: respond-async`` and ``_outputFormat``, ``_type``, ``_since``,
  ``_typeFilter`` (repeated), ``_elements``. 202 + ``Content-Location`` = the status URL; 429 (and 5xx or a
  ``transient`` OperationOutcome) is retried after ``Retry-After``.
* Polling (:func:`interpret_status`, a pure function shared by the sync :func:`wait_for_export` and the
  async :func:`apoll_export` that the deferrable Airflow trigger runs): 202 = still running (``X-Progress``
  logged, ``Retry-After`` in seconds or as an HTTP-date honoured, capped, else exponential backoff); 200 =
  done, the body is the manifest; 429/5xx/``transient`` = poll again; 404/410 = the export is gone (start
  over); another 4xx = failed.
* Manifest: ``output[]`` (NDJSON per type), ``error[]`` (NDJSON OperationOutcomes: downloaded, counted by
  severity; ``fatal``/``error`` fail the task after the downloads, warnings are reported), ``deleted[]``
  (Bundles of deletions, with ``_since``), ``requiresAccessToken`` (the token is sent to file URLs only
  then), ``transactionTime`` (the next incremental run's ``_since``).
* Resumable: the status URL, the manifest and each file's progress live in a small JSON state file in
  staging, so a retried task resumes the same export and skips finished files; a dropped download is
  resumed with ``Range``. ``DELETE`` on the status URL once every file is down.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Mapping

import orjson

from synthfactory.storage import Store, is_s3, join

from .fhirclient import FhirClient, FhirHttpError, backoff_wait, outcome_summary, parse_retry_after, RetryPolicy
from synthfactory.errors import TransientError
from synthfactory.fhir.normalize import ExtractError
from .smart import SmartAuth

log = logging.getLogger(__name__)

__all__ = ["ExportRequest", "PollPolicy", "PollOutcome", "interpret_kickoff", "interpret_status", "kickoff",
           "wait_for_export", "apoll_export", "BulkExportError", "BulkCountMismatch", "BulkExport", "STATE_FILE",
           "SINCE_FILE", "retryable", "TRANSIENT_CODES"]

NDJSON = "application/fhir+ndjson"
STATE_FILE = "export_state.json"
SINCE_FILE = "since.json"


class BulkExportError(ExtractError):
    """The export failed, expired, or finished with error-severity OperationOutcomes. No patient data in
    the message (issue codes and counts only)."""


class BulkCountMismatch(TransientError):
    """A downloaded file does not hold the manifest's ``count`` of resources (data missing): the file is
    downloaded again on the next try."""


def _count_lines(path: str) -> int:
    """Non-blank lines of a downloaded NDJSON file (``.gz`` inflated)."""
    n = 0
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        for line in fh:
            if line.strip():
                n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportRequest:
    level: str = "patient"  # system | patient | group
    group_id: str | None = None
    types: tuple[str, ...] = ()
    since: str | None = None
    type_filter: tuple[str, ...] = ()
    elements: tuple[str, ...] = ()
    output_format: str = NDJSON

    def path(self) -> str:
        if self.level == "system":
            return "$export"
        if self.level == "patient":
            return "Patient/$export"
        if self.level == "group":
            if not self.group_id:
                raise ValueError("a group export needs a group id")
            return f"Group/{self.group_id}/$export"
        raise ValueError(f"unknown export level {self.level!r}")

    def params(self) -> list[tuple[str, str]]:
        p = [("_outputFormat", self.output_format)]
        if self.types:
            p.append(("_type", ",".join(self.types)))
        if self.since:
            p.append(("_since", self.since))
        for tf in self.type_filter:
            p.append(("_typeFilter", tf))
        if self.elements:
            p.append(("_elements", ",".join(self.elements)))
        return p

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ExportRequest":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --------------------------------------------------------------------------------------------------
# Polling logic (pure: shared by the sync client and the async trigger)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PollPolicy:
    """Waits between status polls: the server's Retry-After capped at ``max_retry_after`` (at least
    ``min_wait``), else exponential backoff from ``min_wait`` up to ``max_backoff``; give up after
    ``max_total`` seconds or ``max_errors`` consecutive transient errors."""

    min_wait: float = 2.0
    max_retry_after: float = 300.0
    max_backoff: float = 120.0
    max_total: float = 24 * 3600.0
    max_errors: int = 10

    def wait(self, retry_after: float | None, attempt: int) -> float:
        if retry_after is not None:
            return min(max(retry_after, self.min_wait), self.max_retry_after)
        return min(max(self.min_wait, 0.5) * (1.5 ** min(attempt, 30)), self.max_backoff)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PollOutcome:
    state: str  # accepted | pending | complete | retry | gone | failed
    wait: float = 0.0
    progress: str | None = None
    manifest: dict | None = None
    status_url: str | None = None
    message: str | None = None
    expires: float | None = None  # the manifest's Expires header (epoch seconds): its files are gone after it


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        import email.utils

        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _body_json(body: bytes | None) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


#: OperationOutcome issue codes that say "try again later"
TRANSIENT_CODES = frozenset({"transient", "throttled", "timeout", "lock-error", "no-store", "incomplete"})


def retryable(status: int, codes: list[str]) -> bool:
    """Whether an error answer is worth retrying: 429, or an OperationOutcome with a ``transient`` code
    (``transient``, ``throttled``, ``timeout``...), or a 5xx that carries no OperationOutcome (a gateway or
    proxy failure). A 5xx whose OperationOutcome names another code (``processing``, ``exception``...) is the
    server's answer: not retried."""
    if status == 429 or any(c in TRANSIENT_CODES for c in codes):
        return True
    return status >= 500 and not any(codes)


def interpret_kickoff(status: int, headers: Mapping[str, str], body: bytes | None, policy: PollPolicy,
                      attempt: int, base_url: str = "") -> PollOutcome:
    """What a kick-off response means."""
    if status == 202:
        loc = headers.get("content-location") or headers.get("Content-Location")
        if not loc:
            return PollOutcome("failed", message="kick-off accepted without a Content-Location header")
        if not loc.startswith(("http://", "https://")):
            loc = f"{base_url.rstrip('/')}/{loc.lstrip('/')}"
        return PollOutcome("accepted", status_url=loc)
    ra = parse_retry_after(headers.get("retry-after") or headers.get("Retry-After"))
    codes, _ = outcome_summary(_body_json(body))
    if retryable(status, codes):
        return PollOutcome("retry", wait=policy.wait(ra, attempt),
                           message=f"kick-off HTTP {status}{' (' + ','.join(codes) + ')' if codes else ''}")
    return PollOutcome("failed", message=f"kick-off refused: HTTP {status}"
                                         f"{' (' + ','.join(c for c in codes if c) + ')' if any(codes) else ''}")


def interpret_status(status: int, headers: Mapping[str, str], body: bytes | None, policy: PollPolicy,
                     attempt: int) -> PollOutcome:
    """What a status-URL response means (see the module docstring)."""
    ra = parse_retry_after(headers.get("retry-after") or headers.get("Retry-After"))
    if status == 202:
        return PollOutcome("pending", wait=policy.wait(ra, attempt),
                           progress=headers.get("x-progress") or headers.get("X-Progress"))
    if status == 200:
        manifest = _body_json(body)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("output", []), list):
            return PollOutcome("failed", message="export finished but the manifest is not JSON with output[]")
        return PollOutcome("complete", manifest=manifest,
                           expires=_http_date(headers.get("expires") or headers.get("Expires")))
    codes, _ = outcome_summary(_body_json(body))
    if status in (404, 410):
        return PollOutcome("gone", message=f"status URL answered HTTP {status}: the export expired or was deleted")
    if retryable(status, codes):
        return PollOutcome("retry", wait=policy.wait(ra, attempt),
                           message=f"status HTTP {status}{' (' + ','.join(codes) + ')' if codes else ''}")
    return PollOutcome("failed", message=f"export failed: HTTP {status}"
                                         f"{' (' + ','.join(c for c in codes if c) + ')' if any(codes) else ''}")


# --------------------------------------------------------------------------------------------------
# Sync client
# --------------------------------------------------------------------------------------------------
_ANY = tuple(range(100, 600))


def kickoff(client: FhirClient, request: ExportRequest, policy: PollPolicy, *, max_attempts: int = 20,
            sleep: Callable[[float], None] = time.sleep) -> str:
    """Start an export; returns its status URL. Retries 429/5xx/transient after Retry-After."""
    for attempt in range(max_attempts):
        r = client.request("GET", request.path(), params=request.params(), ok=_ANY, retry_status=frozenset(),
                           headers={"Accept": "application/fhir+json", "Prefer": "respond-async"})
        out = interpret_kickoff(r.status_code, r.headers, r.content, policy, attempt, client.base_url)
        if out.state == "accepted":
            log.info("bulk export kicked off: %s", out.status_url)
            return out.status_url  # type: ignore[return-value]
        if out.state == "retry":
            log.warning("bulk export %s; kicking off again in %.1fs", out.message, out.wait)
            sleep(out.wait)
            continue
        raise BulkExportError(out.message or "kick-off failed")
    raise BulkExportError(f"kick-off still refused after {max_attempts} tries (server busy)")


def wait_for_export(client: FhirClient, status_url: str, policy: PollPolicy, *,
                    sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> PollOutcome:
    """Poll until the export completes (returns the ``complete`` outcome with its manifest) or is gone
    (returns ``gone``: start a new export). Raises BulkExportError when it failed or took too long."""
    start = clock()
    attempt = errors = 0
    while True:
        r = client.request("GET", status_url, ok=_ANY, retry_status=frozenset())
        out = interpret_status(r.status_code, r.headers, r.content, policy, attempt)
        if out.state in ("complete", "gone"):
            return out
        if out.state == "failed":
            raise BulkExportError(out.message or "export failed")
        if out.state == "retry":
            errors += 1
            if errors > policy.max_errors:
                raise BulkExportError(f"export status kept failing ({out.message}) {errors} times in a row")
            log.warning("bulk export %s; polling again in %.1fs", out.message, out.wait)
        else:
            errors = 0
            log.info("bulk export in progress%s; next poll in %.1fs",
                     f" ({out.progress})" if out.progress else "", out.wait)
        if clock() - start + out.wait > policy.max_total:
            raise BulkExportError(f"export not finished after {policy.max_total:.0f}s (max_wait_minutes)")
        sleep(out.wait)
        attempt += 1


async def apoll_export(http: Any, auth: SmartAuth, status_url: str, policy: PollPolicy, *,
                       asleep: Callable[[float], Awaitable[Any]] | None = None,
                       clock: Callable[[], float] = time.monotonic,
                       on_progress: Callable[[PollOutcome], None] | None = None) -> PollOutcome:
    """The async twin of :func:`wait_for_export` (``http`` is an ``httpx.AsyncClient``), for the Airflow
    trigger. Returns the final outcome (``complete``, ``gone`` or ``failed``); never raises for HTTP
    statuses. Connection errors count as transient."""
    import asyncio

    import httpx

    asleep = asleep or asyncio.sleep
    start = clock()
    attempt = errors = 0
    reauthed = False
    while True:
        try:
            headers = {"Accept": "application/fhir+json", **(await auth.aheaders(http))}
            r = await http.get(status_url, headers=headers)
            if r.status_code == 401 and not reauthed and auth.invalidate():
                reauthed = True
                continue
            out = interpret_status(r.status_code, r.headers, r.content, policy, attempt)
        except httpx.TransportError as exc:
            out = PollOutcome("retry", wait=policy.wait(None, attempt), message=f"connection error ({type(exc).__name__})")
        except Exception as exc:  # noqa: BLE001 - e.g. the token endpoint refused: report, do not crash the triggerer
            return PollOutcome("failed", message=f"{type(exc).__name__}: {exc}")
        if out.state in ("complete", "gone", "failed"):
            return out
        if out.state == "retry":
            errors += 1
            if errors > policy.max_errors:
                return PollOutcome("failed", message=f"export status kept failing ({out.message})")
        else:
            errors = 0
            reauthed = False
        if on_progress is not None:
            on_progress(out)
        if clock() - start + out.wait > policy.max_total:
            return PollOutcome("failed", message=f"export not finished after {policy.max_total:.0f}s")
        await asleep(out.wait)
        attempt += 1


# --------------------------------------------------------------------------------------------------
# A staged, resumable export
# --------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _safe_type(t: Any) -> str:
    t = str(t or "Resource")
    return "".join(c for c in t if c.isalnum()) or "Resource"


@dataclass
class BulkExport:
    """One dataset's export, persisted in ``<state_dir>/export_state.json``; files land in
    ``<state_dir>/files/<export id>/`` (``errors/`` and ``deleted/`` beside the NDJSON)."""

    client: FhirClient
    store: Store
    state_dir: str
    request: ExportRequest
    policy: PollPolicy = field(default_factory=PollPolicy)
    download_retries: int = 5
    sleep: Callable[[float], None] = time.sleep

    @property
    def state_uri(self) -> str:
        return join(self.state_dir, STATE_FILE)

    @property
    def since_uri(self) -> str:
        return join(self.state_dir, SINCE_FILE)

    # -- state -------------------------------------------------------------------------------------
    def load(self) -> dict | None:
        if not self.store.exists(self.state_uri):
            return None
        try:
            return self.store.read_json(self.state_uri)
        except Exception:  # noqa: BLE001 - a corrupt state file: start over
            log.warning("bulk export state at %s is unreadable; starting a new export", self.state_uri)
            return None

    def save(self, state: dict) -> None:
        state["updated_at"] = _now()
        self.store.write_json(self.state_uri, state)

    def previous_since(self) -> str | None:
        if not self.store.exists(self.since_uri):
            return None
        return self.store.read_json(self.since_uri).get("transactionTime")

    def active_state(self) -> dict | None:
        """The state of an export of this same request that has not been ingested yet (to resume)."""
        state = self.load()
        if not state or state.get("phase") == "ingested":
            return None
        if state.get("base_url") != self.client.base_url or state.get("request") != self.request.to_dict():
            log.info("bulk export: the request changed since the unfinished export; starting a new one")
            return None
        return state

    # -- phases ------------------------------------------------------------------------------------
    def start(self) -> dict:
        """Resume the unfinished export of this request, or kick off a new one. Returns its state."""
        state = self.active_state()
        if state is not None:
            log.info("bulk export: resuming %s (phase %s)", state.get("status_url"), state.get("phase"))
            return state
        status_url = kickoff(self.client, self.request, self.policy, sleep=self.sleep)
        state = {"version": 1, "export_id": hashlib.sha256(status_url.encode()).hexdigest()[:16],
                 "base_url": self.client.base_url, "request": self.request.to_dict(), "status_url": status_url,
                 "kicked_off_at": _now(), "phase": "exporting", "manifest": None, "files": {}}
        self.save(state)
        return state

    def accept_manifest(self, state: dict, manifest: dict, expires: float | None = None) -> dict:
        files: dict[str, dict] = {}
        counters: dict[str, int] = {}
        for kind in ("output", "error", "deleted"):
            for entry in manifest.get(kind) or []:
                if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                    continue
                t = _safe_type(entry.get("type"))
                n = counters[f"{kind}/{t}"] = counters.get(f"{kind}/{t}", 0) + 1
                sub = {"output": "", "error": "errors/", "deleted": "deleted/"}[kind]
                files[entry["url"]] = {"name": f"{sub}{t}.{n:03d}.ndjson", "kind": kind, "type": t,
                                       "count": entry.get("count"), "done": False}
        state.update(manifest=manifest, files=files, phase="downloading", completed_at=_now(), expires_at=expires)
        self.save(state)
        return state

    def expired(self, state: dict) -> bool:
        """The manifest's files are past their ``Expires`` (the server has removed them)."""
        exp = state.get("expires_at")
        return exp is not None and time.time() > float(exp)

    def restart(self, state: dict, why: str) -> dict:
        """Abandon ``state``'s export (expired: its files are gone) and kick off a new one; waits for it."""
        log.warning("bulk export %s: %s; kicking off a new export (an expired export cannot be resumed)",
                    state.get("export_id"), why)
        self.store.write_json(self.state_uri, {**state, "phase": "ingested", "abandoned": True, "abandoned_why": why})
        new = self.start()
        new["restarted_from"] = state.get("export_id")
        new["restart_reason"] = why
        self.save(new)
        return self.wait(new)

    def wait(self, state: dict) -> dict:
        """Block (sync) until the export is complete; restarts it once if the server forgot it."""
        if state.get("manifest") is not None:
            return state
        out = wait_for_export(self.client, state["status_url"], self.policy, sleep=self.sleep)
        if out.state == "gone":
            log.warning("bulk export %s is gone (%s); kicking off a new one", state["status_url"], out.message)
            self.store.write_json(self.state_uri, {**state, "phase": "ingested", "abandoned": True})
            state = self.start()
            out = wait_for_export(self.client, state["status_url"], self.policy, sleep=self.sleep)
            if out.state != "complete":
                raise BulkExportError(out.message or "export gone twice")
        return self.accept_manifest(state, out.manifest or {}, out.expires)

    def files_uri(self, state: dict) -> str:
        return join(self.state_dir, "files", state["export_id"])

    def download(self, state: dict, *, on_count_mismatch: str = "fail", _restarts: int = 1) -> dict:
        """Fetch every manifest file not yet done (each one recorded in the state as it completes, with its
        line count checked against the manifest's ``count``), then DELETE the status URL. Returns the state
        (a new export's when this one had expired: a file answering 404/410, or a manifest past its
        ``Expires``, starts a new export, once).

        A file whose lines differ from its ``count`` is data missing (or extra): with ``on_count_mismatch``
        ``fail`` it is marked for download again and :class:`BulkCountMismatch` (transient) is raised after
        the other files; with ``report`` it is kept and listed in ``state["count_mismatches"]``."""
        if self.expired(state) and not all(f.get("done") for f in state["files"].values()):
            if _restarts <= 0:
                raise BulkExportError("the new bulk export expired too before its files were downloaded")
            state = self.restart(state, "the manifest expired before its files were downloaded")
            return self.download(state, on_count_mismatch=on_count_mismatch, _restarts=_restarts - 1)
        manifest = state["manifest"] or {}
        with_auth = bool(manifest.get("requiresAccessToken", True))
        dest_root = self.files_uri(state)
        local_root = tempfile.mkdtemp(prefix="synthfactory-bulk-") if is_s3(dest_root) else dest_root
        failed: list[FhirHttpError] = []
        gone: list[FhirHttpError] = []
        try:
            for url, f in state["files"].items():
                if f.get("done"):
                    continue
                local = os.path.join(local_root, f["name"])
                os.makedirs(os.path.dirname(local), exist_ok=True)
                try:
                    info = self.client.download(url, local, with_auth=with_auth, attempts=self.download_retries + 1)
                except FhirHttpError as exc:  # fetch the others first: a retried task then needs only this one
                    if exc.status in (404, 410):  # the export expired: no retry of this one can fetch it
                        gone.append(exc)
                        break
                    log.warning("bulk export: %s", exc)
                    failed.append(exc)
                    continue
                if info["path"] != local:  # kept gzip-encoded
                    f["name"] += ".gz"
                    local = info["path"]
                lines = _count_lines(local)
                f["lines"] = lines
                expected = f.get("count")
                if isinstance(expected, int) and expected != lines and f["kind"] == "output":
                    log.warning("bulk export: %s has %d line(s), the manifest says %d", f["name"], lines, expected)
                    if on_count_mismatch == "fail":
                        os.unlink(local)
                        continue
                if is_s3(dest_root):
                    with open(local, "rb") as fh:
                        self.store.write_bytes(join(dest_root, f["name"]), fh.read())
                    os.unlink(local)
                f.update(done=True, bytes=info["bytes"], sha256=info["sha256"], resumed=info["resumed"])
                self.save(state)
                log.info("bulk export: downloaded %s (%d bytes%s)", f["name"], info["bytes"],
                         f", resumed {info['resumed']}x" if info["resumed"] else "")
        finally:
            if local_root != dest_root:
                shutil.rmtree(local_root, ignore_errors=True)
        if gone:
            if _restarts <= 0:
                raise BulkExportError(f"the new bulk export's files are gone too ({gone[0]})")
            state = self.restart(state, f"a file answered HTTP {gone[0].status} (the export expired)")
            return self.download(state, on_count_mismatch=on_count_mismatch, _restarts=_restarts - 1)
        mismatches = [{"file": f["name"], "type": f["type"], "count": f["count"], "lines": f["lines"]}
                      for f in state["files"].values() if f["kind"] == "output" and isinstance(f.get("count"), int)
                      and f.get("lines") is not None and f["lines"] != f["count"]]
        state["count_mismatches"] = mismatches
        self.save(state)
        if failed:
            raise FhirHttpError(f"{len(failed)} bulk export file(s) could not be downloaded; the next try resumes. "
                                f"First: {failed[0]}", status=failed[0].status)
        if mismatches and on_count_mismatch == "fail":
            first = mismatches[0]
            raise BulkCountMismatch(
                f"{len(mismatches)} bulk export file(s) do not hold the manifest's count of resources (first: "
                f"{first['file']}: {first['lines']} line(s), manifest count {first['count']}): data is missing; "
                f"the next try downloads them again (source.bulk.on_count_mismatch: report accepts them)")
        state["phase"] = "downloaded"
        self.save(state)
        if not state.get("deleted_status"):
            try:
                self.client.request("DELETE", state["status_url"], ok=(200, 202, 204, 404, 410))
                state["deleted_status"] = True
                self.save(state)
            except FhirHttpError as exc:  # the server cleans up on its own later; not fatal
                log.warning("bulk export: DELETE of the status URL failed (%s)", exc)
        return state

    def outcomes(self, state: dict) -> dict:
        """Counts of the error files' OperationOutcome issues by severity and code."""
        by_sev: dict[str, int] = {}
        by_code: dict[str, int] = {}
        root = self.files_uri(state)
        for f in state["files"].values():
            if f["kind"] != "error":
                continue
            data = self.store.read_bytes(join(root, f["name"]))
            if f["name"].endswith(".gz"):
                data = gzip.decompress(data)
            for line in data.splitlines():
                if not line.strip():
                    continue
                try:
                    oo = orjson.loads(line)
                except orjson.JSONDecodeError:
                    by_sev["unreadable"] = by_sev.get("unreadable", 0) + 1
                    continue
                codes, sevs = outcome_summary(oo)
                for c, s in zip(codes, sevs):
                    by_sev[s] = by_sev.get(s, 0) + 1
                    by_code[c] = by_code.get(c, 0) + 1
        return {"by_severity": by_sev, "by_code": by_code}

    def deletions(self, state: dict) -> list[tuple[str, str]]:
        """(type, id) of every resource the ``deleted[]`` Bundles name, each once (first-seen order; how many
        repeats were dropped: :meth:`deletion_repeats`)."""
        raw = self._deletions(state)
        out = list(dict.fromkeys(raw))
        self.deletion_repeats = len(raw) - len(out)
        return out

    deletion_repeats = 0

    def _deletions(self, state: dict) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        root = self.files_uri(state)
        for f in state["files"].values():
            if f["kind"] != "deleted":
                continue
            data = self.store.read_bytes(join(root, f["name"]))
            for line in (gzip.decompress(data) if f["name"].endswith(".gz") else data).splitlines():
                try:
                    b = orjson.loads(line) if line.strip() else None
                except orjson.JSONDecodeError:
                    continue
                for e in (b or {}).get("entry") or []:
                    url = ((e or {}).get("request") or {}).get("url")
                    if isinstance(url, str) and "/" in url:
                        t, _, rid = url.split("?", 1)[0].rstrip("/").rpartition("/")
                        out.append((t.rsplit("/", 1)[-1], rid))
        return out

    def finish(self, state: dict) -> None:
        """After a successful ingest: remember ``transactionTime`` for the next ``_since``."""
        tt = (state.get("manifest") or {}).get("transactionTime")
        if tt:
            self.store.write_json(self.since_uri, {"transactionTime": tt, "export_id": state["export_id"],
                                                   "recorded_at": _now()})
        state["phase"] = "ingested"
        self.save(state)


__all__ += ["RetryPolicy", "backoff_wait"]
