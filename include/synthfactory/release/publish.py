"""Publish an approved dataset to the sandbox: files first, the manifest last.

The publisher enforces the gate itself, whatever the DAG wiring says: it refuses a file set without an
approved decision record whose sha256 values match the bytes it is about to upload. A reader treats a
version as present only when its ``manifest.json`` exists, so a failed or retried publish never shows
a partial version; a retry rewrites the same keys (idempotent).
"""

from __future__ import annotations

import hashlib
import io
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from synthfactory.storage import Store

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class PublishRefused(RuntimeError):
    """The publisher will not release this file set (not approved, or contents differ from the audit)."""


class ObjectWriter(Protocol):
    """Where releases go. ``uri(key)`` is for display; ``put`` writes bytes under a key."""

    def put(self, key: str, data: bytes) -> None: ...

    def uri(self, key: str) -> str: ...


class Boto3Writer:
    """S3 through a boto3 client (CLI use; the Airflow layer wraps S3Hook instead)."""

    def __init__(self, client: Any, bucket: str):
        self.client, self.bucket = client, bucket

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                               ChecksumAlgorithm="SHA256", ServerSideEncryption="AES256")

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


class LocalWriter:
    """A local folder standing in for the sandbox (``synthfactory run --out``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._store = Store()

    def put(self, key: str, data: bytes) -> None:
        self._store.write_bytes(str(self.root / key), data)

    def uri(self, key: str) -> str:
        return str(self.root / key)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def publish(files: dict[str, str], *, decision: dict, store: Store, writer: ObjectWriter, key_prefix: str,
            manifest_extra: dict) -> dict:
    """Upload ``files`` (release-relative path -> staging URI) under ``key_prefix`` and write the manifest.

    Raises PublishRefused when the decision is not approved or any file's sha256 differs from the
    audited one (a file changed after the gate, or was never audited)."""
    if not decision.get("approved"):
        raise PublishRefused(f"refusing to publish: the gate did not approve this run ({decision.get('message')})")
    audited = decision.get("audited_files") or {}
    payloads: dict[str, bytes] = {}
    for rel, uri in sorted(files.items()):
        data = store.read_bytes(uri)
        digest = sha256_bytes(data)
        if audited.get(rel) != digest:
            raise PublishRefused(f"refusing to publish {rel}: its sha256 does not match the audited record")
        payloads[rel] = data
    if set(audited) - set(payloads):
        missing = sorted(set(audited) - set(payloads))
        raise PublishRefused(f"refusing to publish: audited file(s) missing from the release: {missing}")

    key_prefix = key_prefix.strip("/")
    entries = []
    for rel, data in payloads.items():
        writer.put(f"{key_prefix}/{rel}", data)
        entry = {"path": rel, "sha256": sha256_bytes(data), "bytes": len(data)}
        if rel.endswith(".parquet"):
            entry["rows"] = parquet_rows(data)
        entries.append(entry)
        log.info("uploaded %s (%d bytes)", rel, len(data))
    manifest = {
        **manifest_extra,
        "files": entries,
        "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "gate": {"approved": True, "profile": decision.get("profile"), "checks": decision.get("checks")},
    }
    import orjson

    writer.put(f"{key_prefix}/{MANIFEST}", orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    log.info("released %d files to %s", len(entries), writer.uri(key_prefix + "/"))
    return {"uri": writer.uri(key_prefix + "/"), "manifest_uri": writer.uri(f"{key_prefix}/{MANIFEST}"),
            "files": len(entries)}
