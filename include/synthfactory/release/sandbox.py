"""The readers' side of the sandbox (the layout itself is :mod:`synthfactory.release.layout`).

Readers never list files to find a release: they read ``latest.json`` or list manifests. A version whose
files are there but whose manifest is not (a publish that died half way) does not exist for them.

The functions here take any *object store* with ``get(key)`` and ``list(prefix)``: the writers in
:mod:`synthfactory.release.publish` are ones, and so are :class:`BucketReader` (a boto3 client) and
:class:`FolderReader` (a local ``run --out`` release folder), so a researcher can do::

    from synthfactory.release.sandbox import BucketReader, read_latest
    manifest = read_latest(BucketReader(boto3.client("s3"), "synthetic-sandbox"), "releases", "cohort_demo")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from synthfactory.release.layout import (  # noqa: F401 (the layout's names, re-exported for readers)
    LATEST,
    MANIFEST,
    STAGING,
    VERSION_RE,
    SandboxLayout,
    is_version,
    newer,
)


class ObjectReader(Protocol):
    def get(self, key: str) -> tuple[bytes, str | None] | None: ...

    def list(self, prefix: str) -> list[Any]: ...


@dataclass(frozen=True)
class ObjectKey:
    key: str


class BucketReader:
    """Read-only :class:`ObjectReader` over a boto3 S3 client (boto3's default chain, or an Airflow
    ``S3Hook(aws_conn_id=...).get_conn()``) and a bucket."""

    def __init__(self, client: Any, bucket: str):
        self.client = client
        self.bucket = bucket

    def get(self, key: str) -> tuple[bytes, str | None] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as err:  # botocore ClientError NoSuchKey/404
            code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
            if code in {"NoSuchKey", "404", "NotFound"}:
                return None
            raise
        return obj["Body"].read(), obj.get("ETag")

    def list(self, prefix: str) -> list[ObjectKey]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [ObjectKey(o["Key"]) for o in page.get("Contents", []) or []]
        return out


class FolderReader:
    """Read-only :class:`ObjectReader` over a local folder holding the sandbox layout (``run --out DIR``
    releases into ``DIR/release``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def get(self, key: str) -> tuple[bytes, str | None] | None:
        path = self.root / key
        return (path.read_bytes(), None) if path.is_file() else None

    def list(self, prefix: str) -> list[ObjectKey]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return [ObjectKey(p.relative_to(self.root).as_posix()) for p in sorted(base.rglob("*")) if p.is_file()]


def _load(store: ObjectReader, key: str) -> dict | None:
    got = store.get(key)
    if got is None:
        return None
    try:
        value = json.loads(got[0])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def list_releases(store: ObjectReader, prefix: str, dataset: str) -> list[str]:
    """Released versions of ``dataset``, oldest first: the version folders that hold a manifest."""
    return released_versions(store, SandboxLayout.of(prefix, dataset))


def released_versions(store: ObjectReader, layout: SandboxLayout) -> list[str]:
    versions = set()
    for obj in store.list(layout.root):
        rel = layout.relative(obj.key)
        parts = rel.split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and is_version(parts[0]):
            versions.add(parts[0])
    return sorted(versions)


def read_manifest(store: ObjectReader, prefix: str, dataset: str, version: str) -> dict | None:
    return _load(store, SandboxLayout.of(prefix, dataset).manifest_key(version))


def read_pointer(store: ObjectReader, prefix: str, dataset: str) -> dict | None:
    """The raw ``latest.json`` pointer, or None."""
    return _load(store, SandboxLayout.of(prefix, dataset).latest_key)


def pointer_version(store: ObjectReader, layout: SandboxLayout) -> str | None:
    """The version ``latest.json`` names (None when absent or unreadable)."""
    pointer = _load(store, layout.latest_key)
    version = str((pointer or {}).get("version", ""))
    return version if is_version(version) else None


def read_latest(store: ObjectReader, prefix: str, dataset: str) -> dict | None:
    """The manifest of the newest release (via ``latest.json``; if the pointer is missing or names a version
    that is not there, the newest version that has a manifest). None when nothing was released."""
    pointer = read_pointer(store, prefix, dataset)
    if pointer and is_version(str(pointer.get("version", ""))):
        manifest = read_manifest(store, prefix, dataset, pointer["version"])
        if manifest is not None:
            return manifest
    versions = list_releases(store, prefix, dataset)
    return read_manifest(store, prefix, dataset, versions[-1]) if versions else None
