"""Publish an approved dataset to the sandbox: atomic, versioned, verified, idempotent.

The publisher enforces the gate itself, whatever the DAG wiring says: it refuses a file set without an
approved decision record, signed by the gate for this dataset, version and run (:mod:`.signing`), whose
sha256 values match the bytes it is about to upload (and, when the spec asks for one, without a human
approval signed for this run and bound to that decision and those same hashes).

Then, in this order (layout in :mod:`synthfactory.release.sandbox`):

1. If the version already has a manifest listing the same files and hashes, the publish is a no-op
   (a re-run of the same logical date); a manifest with other contents is refused (versions are immutable).
2. Every file goes to the run-scoped staging prefix ``<dataset>/_staging/<run_id>/`` (SSE, tags, SHA-256
   checksum; multipart above the writer's threshold) and its checksum is verified on the server.
3. Each staged object is copied server-side into ``<dataset>/<version>/`` and verified again.
4. The manifest is created last, conditionally (``If-None-Match: *``): a reader never sees a partial version.
5. ``latest.json`` moves to this version only if it is newer than the one it names (``If-Match`` on its ETag,
   re-read on conflict).
6. The staging prefix is deleted, and retention keeps the newest ``keep_versions`` versions (never ``latest``).

Every step can be repeated: a retry or a killed-and-rerun task skips what is already in place and verified.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

from synthfactory.release.sandbox import (
    MANIFEST,
    SandboxLayout,
    is_version,
    newer,
    pointer_version,
    released_versions,
)
from synthfactory.release.signing import SignatureRefused, verify
from synthfactory.storage import Store
from synthfactory.errors import EXIT_PUBLISH, RefusedError, TransientError

log = logging.getLogger(__name__)

__all__ = ["MANIFEST", "Boto3Writer", "LocalWriter", "ObjectInfo", "ObjectWriter", "PreconditionFailed",
           "PublishError", "PublishRefused", "publish", "sha256_bytes", "verify_object"]

MiB = 1024 * 1024
STALE_AFTER = timedelta(hours=24)  # incomplete versions / staging left by dead runs are swept after this


class PublishRefused(RefusedError, RuntimeError):
    """The publisher will not release this file set (not approved, contents differ from the audit, or the
    version is already released with other contents). Deterministic: retrying does not help."""

    exit_code = EXIT_PUBLISH
    label = "publish refused"


class PublishError(TransientError, RuntimeError):
    """A publish could not complete (checksum mismatch after re-upload, pointer contention). Retryable: nothing
    partial is visible to readers, and a retry picks up where this one stopped."""

    label = "publish failed (retry it)"


class PreconditionFailed(RuntimeError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None = None
    checksum_sha256: str | None = None  # base64; S3 gives "<b64>-<parts>" (composite) after a multipart upload
    last_modified: datetime | None = None


class ObjectWriter(Protocol):
    """Where releases go (also what :mod:`synthfactory.release.sandbox`'s readers read).

    ``put`` creates or replaces an object; ``if_none_match=True`` only creates, ``if_match=etag`` only replaces
    that exact version; both raise :class:`PreconditionFailed` otherwise. ``get`` returns ``(bytes, etag)``
    or None. ``head`` returns an :class:`ObjectInfo` or None. ``copy`` is server-side. ``uri(key)`` is for
    display. ``tags`` are object tags (a writer without tagging may ignore them)."""

    def put(self, key: str, data: bytes, *, tags: dict[str, str] | None = None, if_none_match: bool = False,
            if_match: str | None = None) -> str | None: ...

    def get(self, key: str) -> tuple[bytes, str | None] | None: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def copy(self, src_key: str, dst_key: str, *, tags: dict[str, str] | None = None) -> None: ...

    def delete(self, keys: list[str]) -> None: ...

    def list(self, prefix: str) -> list[ObjectInfo]: ...

    def uri(self, key: str) -> str: ...


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def composite_sha256(data: bytes, part_size: int) -> str:
    """S3's checksum of a multipart object: sha256 over the parts' sha256 digests (base64, no -N suffix)."""
    digests = b"".join(hashlib.sha256(data[i:i + part_size]).digest() for i in range(0, len(data), part_size))
    return base64.b64encode(hashlib.sha256(digests).digest()).decode()


def client_config(max_attempts: int = 8, connect_timeout: float = 10, read_timeout: float = 60) -> Any:
    """botocore config for the sandbox writer: standard retry mode (exponential backoff with jitter, retries on
    throttling, 5xx and connection errors), at most ``max_attempts`` attempts per request in all."""
    from botocore.config import Config

    return Config(retries={"mode": "standard", "total_max_attempts": max_attempts}, connect_timeout=connect_timeout,
                  read_timeout=read_timeout)


# -- writers ----------------------------------------------------------------------------------------
class Boto3Writer:
    """The sandbox bucket through a boto3 S3 client. The CLI builds the client from boto3's default chain; the
    Airflow layer (``SandboxWriter``) from an S3Hook on the sandbox connection. Never passes an ACL: objects
    stay private to the bucket owner, and access is granted by the bucket policy only."""

    def __init__(self, client: Any, bucket: str, *, encryption: str = "AES256", kms_key_id: str | None = None,
                 multipart_threshold: int = 64 * MiB, multipart_chunksize: int = 16 * MiB, max_concurrency: int = 4):
        from boto3.s3.transfer import TransferConfig

        if encryption not in ("AES256", "aws:kms"):
            raise ValueError(f"encryption must be AES256 or aws:kms, not {encryption!r}")
        self.client, self.bucket = client, bucket
        self.encryption, self.kms_key_id = encryption, kms_key_id
        self.multipart_threshold, self.multipart_chunksize = multipart_threshold, multipart_chunksize
        self.transfer_config = TransferConfig(multipart_threshold=multipart_threshold,
                                              multipart_chunksize=multipart_chunksize,
                                              max_concurrency=max_concurrency)

    @classmethod
    def from_spec(cls, client: Any, release: Any) -> "Boto3Writer":
        """A writer with the spec's encryption and multipart settings (``release`` is a ReleaseSpec)."""
        return cls(client, release.bucket, **writer_options(release))

    # -- helpers
    def _sse(self) -> dict[str, str]:
        sse = {"ServerSideEncryption": self.encryption}
        if self.encryption == "aws:kms" and self.kms_key_id:
            sse["SSEKMSKeyId"] = self.kms_key_id
        return sse

    @staticmethod
    def _code(err: Exception) -> str:
        resp = getattr(err, "response", None) or {}
        return str(resp.get("Error", {}).get("Code", ""))

    @staticmethod
    def _status(err: Exception) -> int | None:
        resp = getattr(err, "response", None) or {}
        return resp.get("ResponseMetadata", {}).get("HTTPStatusCode")

    def part_size(self, size: int) -> int | None:
        """The part size a managed transfer of ``size`` bytes uses (None when it is a single part)."""
        if size < self.multipart_threshold:
            return None
        from s3transfer.utils import ChunksizeAdjuster

        return ChunksizeAdjuster().adjust_chunksize(self.multipart_chunksize, size)

    # -- ObjectWriter
    def put(self, key: str, data: bytes, *, tags: dict[str, str] | None = None, if_none_match: bool = False,
            if_match: str | None = None) -> str | None:
        from botocore.exceptions import ClientError

        extra: dict[str, Any] = {"ChecksumAlgorithm": "SHA256", **self._sse()}
        if tags:
            extra["Tagging"] = urlencode(tags)
        if len(data) >= self.multipart_threshold and not (if_none_match or if_match):
            # managed transfer: multipart above the threshold, every part retried by botocore
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, key, ExtraArgs=extra,
                                       Config=self.transfer_config)
            return None
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        if if_match:
            extra["IfMatch"] = if_match
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)
        except ClientError as err:
            # 412: the condition failed; 409 ConditionalRequestConflict: a concurrent conditional write won
            if self._status(err) in (409, 412) or self._code(err) in ("PreconditionFailed",
                                                                       "ConditionalRequestConflict"):
                raise PreconditionFailed(key) from err
            raise
        return resp.get("ETag")

    def get(self, key: str) -> tuple[bytes, str | None] | None:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as err:
            if self._code(err) in ("NoSuchKey", "404") or self._status(err) == 404:
                return None
            raise
        return resp["Body"].read(), resp.get("ETag")

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as err:
            if self._code(err) in ("NoSuchKey", "404", "NotFound") or self._status(err) == 404:
                return None
            raise
        return ObjectInfo(key=key, size=int(resp["ContentLength"]), etag=resp.get("ETag"),
                          checksum_sha256=resp.get("ChecksumSHA256"), last_modified=resp.get("LastModified"))

    def copy(self, src_key: str, dst_key: str, *, tags: dict[str, str] | None = None) -> None:
        extra: dict[str, Any] = {"ChecksumAlgorithm": "SHA256", **self._sse()}
        if tags:
            extra.update({"TaggingDirective": "REPLACE", "Tagging": urlencode(tags)})
        # managed copy: CopyObject, or UploadPartCopy in parts above the multipart threshold (> 5 GB needs it)
        self.client.copy({"Bucket": self.bucket, "Key": src_key}, self.bucket, dst_key, ExtraArgs=extra,
                         Config=self.transfer_config)

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            resp = self.client.delete_objects(Bucket=self.bucket,
                                              Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if resp.get("Errors"):
                raise PublishError(f"could not delete {len(resp['Errors'])} object(s), e.g. {resp['Errors'][0]}")

    def list(self, prefix: str) -> list[ObjectInfo]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out.append(ObjectInfo(key=o["Key"], size=int(o["Size"]), etag=o.get("ETag"),
                                      last_modified=o.get("LastModified")))
        return out

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def writer_options(release: Any) -> dict[str, Any]:
    """Boto3Writer keyword arguments from a ReleaseSpec."""
    return {"encryption": release.encryption, "kms_key_id": release.kms_key_id,
            "multipart_threshold": release.multipart_threshold_mb * MiB,
            "multipart_chunksize": release.multipart_chunksize_mb * MiB}


class LocalWriter:
    """A local folder standing in for the sandbox (``synthfactory run --out``). Same layout and steps; files are
    written atomically (temp file + rename), conditional creates use a hard link (fails if the key exists).
    Tags and encryption do not apply."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._store = Store()

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root.resolve() not in p.parents:
            raise ValueError(f"key {key!r} escapes the release folder")
        return p

    @staticmethod
    def _etag(data: bytes) -> str:
        return '"' + hashlib.md5(data).hexdigest() + '"'  # noqa: S324 (an ETag, as S3's, not security)

    def put(self, key: str, data: bytes, *, tags: dict[str, str] | None = None, if_none_match: bool = False,
            if_match: str | None = None) -> str | None:
        p = self._path(key)
        if if_match is not None:
            cur = self.get(key)
            if cur is None or cur[1] != if_match:
                raise PreconditionFailed(key)
        if if_none_match:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{time.monotonic_ns()}.partial")
            tmp.write_bytes(data)
            try:
                os.link(tmp, p)  # atomic create-if-absent
            except FileExistsError:
                raise PreconditionFailed(key) from None
            finally:
                tmp.unlink(missing_ok=True)
        else:
            self._store.write_bytes(str(p), data)
        return self._etag(data)

    def get(self, key: str) -> tuple[bytes, str | None] | None:
        p = self._path(key)
        if not p.is_file():
            return None
        data = p.read_bytes()
        return data, self._etag(data)

    def head(self, key: str) -> ObjectInfo | None:
        got = self.get(key)
        if got is None:
            return None
        p = self._path(key)
        return ObjectInfo(key=key, size=len(got[0]), etag=got[1], checksum_sha256=_b64_sha256(got[0]),
                          last_modified=datetime.fromtimestamp(p.stat().st_mtime, timezone.utc))

    def copy(self, src_key: str, dst_key: str, *, tags: dict[str, str] | None = None) -> None:
        self._store.write_bytes(str(self._path(dst_key)), self._path(src_key).read_bytes())

    def delete(self, keys: list[str]) -> None:
        root = self.root.resolve()
        for key in keys:
            p = self._path(key)
            p.unlink(missing_ok=True)
            parent = p.parent
            while parent != root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def list(self, prefix: str) -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.rglob("*")):
            key = p.relative_to(self.root).as_posix()
            if p.is_file() and key.startswith(prefix) and not p.name.endswith(".partial"):
                st = p.stat()
                out.append(ObjectInfo(key=key, size=st.st_size,
                                      last_modified=datetime.fromtimestamp(st.st_mtime, timezone.utc)))
        return out

    def uri(self, key: str) -> str:
        return str(self.root / key)


# -- checks -----------------------------------------------------------------------------------------
def verify_object(writer: ObjectWriter, key: str, data: bytes) -> bool:
    """Whether ``key`` holds exactly ``data``: size, then the server's SHA-256 checksum (whole-object, or the
    composite of a multipart upload), else a re-download and compare."""
    info = writer.head(key)
    if info is None or info.size != len(data):
        return False
    if info.checksum_sha256:
        server = info.checksum_sha256.split("-")[0]
        if server == _b64_sha256(data):
            return True
        part_size = getattr(writer, "part_size", lambda n: None)(len(data))
        if part_size and server == composite_sha256(data, part_size):
            return True
    got = writer.get(key)
    return got is not None and got[0] == data


def parquet_rows(data: bytes) -> int | None:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    except Exception:
        return None


def code_version() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("synthfactory", "sdv", "great_expectations", "sdmetrics"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            out[pkg] = None
    return out


def _dumps(obj: dict) -> bytes:
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def _file_map(manifest: dict) -> dict[str, str]:
    return {f.get("path"): f.get("sha256") for f in manifest.get("files", [])}


def _check_approval(decision: dict, approval: dict | None, require_approval: bool) -> None:
    if not require_approval:
        return
    if not approval:
        raise PublishRefused("refusing to publish: the spec requires a human approval "
                             "(release.require_approval) and none is recorded for this run")
    if not approval.get("approved"):
        raise PublishRefused(f"refusing to publish: the release was rejected by a reviewer "
                             f"({approval.get('reason') or 'no reason given'})")
    if approval.get("audited_files") != decision.get("audited_files"):
        raise PublishRefused("refusing to publish: the human approval was given for other file hashes")
    if approval.get("decision_signature") != (decision.get("signature") or {}).get("value"):
        raise PublishRefused("refusing to publish: the human approval was given for another gate decision")


def _stage_and_verify(writer: ObjectWriter, key: str, data: bytes, tags: dict[str, str]) -> None:
    if verify_object(writer, key, data):  # already there from an earlier, interrupted attempt
        return
    for _attempt in range(2):
        writer.put(key, data, tags=tags)
        if verify_object(writer, key, data):
            return
        log.warning("checksum mismatch after uploading %s; uploading again", key)
    raise PublishError(f"{key}: the stored object's checksum does not match the data after 2 uploads")


def _commit_and_verify(writer: ObjectWriter, src: str, dst: str, data: bytes, tags: dict[str, str]) -> None:
    if verify_object(writer, dst, data):
        return
    writer.copy(src, dst, tags=tags)
    if not verify_object(writer, dst, data):
        raise PublishError(f"{dst}: the copied object's checksum does not match the staged data")


def advance_latest(writer: ObjectWriter, layout: SandboxLayout, version: str, attempts: int = 20,
                   tags: dict[str, str] | None = None) -> str:
    """Point ``latest.json`` at ``version`` unless it already names a newer one (it only moves forward).
    Conditional writes make concurrent publishers safe: on a lost race the pointer is re-read and re-checked.
    Returns the version ``latest`` names afterwards."""
    body = {"version": version, "manifest": layout.relative(layout.manifest_key(version)),
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for attempt in range(attempts):
        cur = writer.get(layout.latest_key)
        try:
            if cur is None:
                writer.put(layout.latest_key, _dumps(body), tags=tags, if_none_match=True)
                return version
            try:
                current = json.loads(cur[0]).get("version")
            except ValueError:
                current = None
            if current and is_version(current) and not newer(version, current):
                return current
            writer.put(layout.latest_key, _dumps(body), tags=tags, if_match=cur[1])
            return version
        except PreconditionFailed:
            time.sleep(min(0.05 * 2 ** attempt, 1.0))  # another publisher moved it: re-read and re-check
    raise PublishError(f"could not update {layout.latest_key} after {attempts} attempts (contention)")


def _delete_prefix(writer: ObjectWriter, prefix: str, manifest_first: str | None = None) -> int:
    keys = [o.key for o in writer.list(prefix)]
    if manifest_first and manifest_first in keys:
        writer.delete([manifest_first])  # the version disappears for readers at once
        keys.remove(manifest_first)
    if keys:
        writer.delete(keys)
    return len(keys) + (1 if manifest_first else 0)


def apply_retention(writer: ObjectWriter, layout: SandboxLayout, keep: int, protect: set[str] = frozenset(),
                    now: datetime | None = None) -> list[str]:
    """Keep the newest ``keep`` versions, the one ``latest`` names and ``protect``; delete older versions
    (manifest first). Also sweeps leftovers of dead runs older than a day: version folders without a manifest
    and run-scoped staging prefixes. Returns the deleted versions."""
    now = now or datetime.now(timezone.utc)
    objects = writer.list(layout.root)
    released = released_versions(writer, layout)
    latest = pointer_version(writer, layout)
    keep_set = set(released[-keep:]) | set(protect) | ({latest} if latest else set())
    deleted = []
    for v in released:
        if v not in keep_set:
            _delete_prefix(writer, layout.version_prefix(v), manifest_first=layout.manifest_key(v))
            deleted.append(v)
            log.info("retention: deleted %s (keeping the newest %d)", layout.version_prefix(v), keep)
    # leftovers of dead runs: incomplete versions and staging, older than STALE_AFTER
    groups: dict[str, list[ObjectInfo]] = {}
    for o in objects:
        parts = layout.relative(o.key).split("/")
        if len(parts) >= 2 and is_version(parts[0]) and parts[0] not in released:
            groups.setdefault(layout.version_prefix(parts[0]), []).append(o)
        elif len(parts) >= 3 and parts[0] == "_staging":
            groups.setdefault(layout.staging_prefix(parts[1]), []).append(o)
    for group_prefix, objs in groups.items():
        if all(o.last_modified and now - o.last_modified > STALE_AFTER for o in objs):
            writer.delete([o.key for o in objs])
            log.info("retention: swept %d object(s) left by a dead run under %s", len(objs), group_prefix)
    return deleted


# -- publish ----------------------------------------------------------------------------------------
def publish(files: dict[str, str], *, decision: dict, store: Store, writer: ObjectWriter, key_prefix: str,
            manifest_extra: dict, run_id: str | None = None, keep_versions: int | None = None,
            approval: dict | None = None, require_approval: bool = False, signing_key: bytes | None = None) -> dict:
    """Publish ``files`` (release-relative path -> staging URI) as the version ``key_prefix``
    (``<prefix>/<dataset>/<version>``) and move ``latest`` forward. See the module docstring for the steps.

    Raises PublishRefused when the decision is not signed under ``signing_key`` (the release signing key, see
    :mod:`synthfactory.release.signing`), was edited or belongs to another dataset, version or run, is not
    approved, a file's sha256 differs from the audited one (a file changed after the gate, or was never
    audited), a required human approval is missing, unsigned, edited or for other hashes, or the version
    already exists with other contents; PublishError when a step could not complete (retry it)."""
    key_prefix = key_prefix.strip("/")
    dataset_prefix, _, version = key_prefix.rpartition("/")
    bound_run = run_id or version
    dataset = manifest_extra.get("dataset") or dataset_prefix.rsplit("/", 1)[-1]
    if not signing_key:
        raise PublishRefused("refusing to publish: no release signing key to verify the gate's decision with")
    try:  # before anything is read or written: the records must be the gate's and the reviewer's, for this run
        verify(decision, "decision", signing_key, dataset=str(dataset), version=version, run_id=bound_run)
        if approval is not None:
            verify(approval, "approval", signing_key, dataset=str(dataset), version=version, run_id=bound_run)
    except SignatureRefused as err:
        raise PublishRefused(str(err)) from None
    if not decision.get("approved"):
        raise PublishRefused(f"refusing to publish: the gate did not approve this run ({decision.get('message')})")
    audited = decision.get("audited_files") or {}
    payloads: dict[str, bytes] = {}
    for rel, uri in sorted(files.items()):
        data = store.read_bytes(uri)
        if audited.get(rel) != sha256_bytes(data):
            raise PublishRefused(f"refusing to publish {rel}: its sha256 does not match the audited record")
        payloads[rel] = data
    if set(audited) - set(payloads):
        missing = sorted(set(audited) - set(payloads))
        raise PublishRefused(f"refusing to publish: audited file(s) missing from the release: {missing}")
    _check_approval(decision, approval, require_approval)

    layout = SandboxLayout(dataset_prefix)
    run_id = bound_run.replace("/", "_")
    tags = {"dataset": str(dataset), "version": version, "synthetic": "true"}
    manifest_key = layout.manifest_key(version)
    entries = []
    for rel, data in payloads.items():
        entry: dict[str, Any] = {"path": rel, "sha256": sha256_bytes(data), "bytes": len(data)}
        if rel.endswith(".parquet"):
            entry["rows"] = parquet_rows(data)
        entries.append(entry)
    wanted = {e["path"]: e["sha256"] for e in entries}
    result = {"uri": writer.uri(layout.version_prefix(version)), "manifest_uri": writer.uri(manifest_key),
              "latest_uri": writer.uri(layout.latest_key), "files": len(entries), "version": version}

    def finish(noop: bool) -> dict:
        latest = advance_latest(writer, layout, version, tags=tags)
        _delete_prefix(writer, layout.staging_prefix(run_id))
        pruned = apply_retention(writer, layout, keep_versions, protect={version}) if keep_versions else []
        return {**result, "noop": noop, "latest": latest, "pruned": pruned}

    def already_released() -> bool:
        got = writer.get(manifest_key)
        if got is None:
            return False
        try:
            existing = _file_map(json.loads(got[0]))
        except ValueError:
            existing = None
        if existing == wanted:
            return True
        raise PublishRefused(f"refusing to publish: {version} is already released with other contents "
                             f"({writer.uri(manifest_key)}); released versions are immutable")

    # 1. a re-run of the same logical date with the same bytes is a no-op (after checking the files are intact)
    if already_released():
        damaged = [rel for rel, data in payloads.items()
                   if not verify_object(writer, layout.version_key(version, rel), data)]
        for rel in damaged:  # restore what the manifest promises (it lists these very hashes)
            log.warning("%s: %s is missing or differs from its manifest; restoring it", version, rel)
            _stage_and_verify(writer, layout.staging_key(run_id, rel), payloads[rel], tags)
            _commit_and_verify(writer, layout.staging_key(run_id, rel), layout.version_key(version, rel),
                               payloads[rel], tags)
        if not damaged:
            log.info("%s is already released with identical files: nothing to upload", writer.uri(manifest_key))
        return finish(noop=not damaged)

    # 2. stage and verify; 3. commit (server-side copy) and verify
    for rel, data in payloads.items():
        _stage_and_verify(writer, layout.staging_key(run_id, rel), data, tags)
        log.info("staged %s (%d bytes, sha256 verified)", rel, len(data))
    for rel, data in payloads.items():
        _commit_and_verify(writer, layout.staging_key(run_id, rel), layout.version_key(version, rel), data, tags)

    # 4. the manifest, last and create-only
    manifest = {
        **manifest_extra,
        "version": version,
        "files": entries,
        # every released table (relational mode: one per table) with its row count and hash
        "tables": {e["path"][5:-8]: {"path": e["path"], "rows": e.get("rows"), "sha256": e["sha256"]}
                   for e in entries if e["path"].startswith("data/") and e["path"].endswith(".parquet")},
        "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "gate": {"approved": True, "profile": decision.get("profile"), "checks": decision.get("checks")},
        "encryption": getattr(writer, "encryption", None),
    }
    if approval:
        manifest["approval"] = {k: approval.get(k) for k in ("approved", "reviewer", "decided_at", "reason",
                                                              "timed_out")}
    try:
        writer.put(manifest_key, _dumps(manifest), tags=tags, if_none_match=True)
    except PreconditionFailed:
        if already_released():  # a concurrent or earlier attempt committed the same files
            return finish(noop=True)
        raise PublishError(f"{manifest_key} appeared but is unreadable") from None
    log.info("released %d files to %s", len(entries), writer.uri(layout.version_prefix(version)))
    return finish(noop=False)
