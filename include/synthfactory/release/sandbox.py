"""The sandbox layout, and the readers' side of it.

Under the sandbox bucket, per dataset::

    <prefix>/<dataset>/<version>/<files>          a committed version (version = v<UTC logical date>)
    <prefix>/<dataset>/<version>/manifest.json    written last: a version exists iff its manifest exists
    <prefix>/<dataset>/latest.json                {"version": ..., "manifest": ...}; only ever moves forward
    <prefix>/<dataset>/_staging/<run_id>/<files>  a publish in progress (run-scoped; readers ignore it)

Readers never list files to find a release: they read ``latest.json`` or list manifests. A version whose
files are there but whose manifest is not (a publish that died half way) does not exist for them.

The functions here take any *object store* with ``get(key)`` and ``list(prefix)`` (the writers in
:mod:`synthfactory.release.publish` are ones), so a researcher can do::

    from synthfactory.release.publish import Boto3Writer
    from synthfactory.release.sandbox import read_latest
    manifest = read_latest(Boto3Writer(boto3.client("s3"), "synthetic-sandbox"), "releases", "cohort_demo")
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

MANIFEST = "manifest.json"
LATEST = "latest.json"
STAGING = "_staging"
VERSION_RE = re.compile(r"^v\d{8}T\d{6}Z$")


class ObjectReader(Protocol):
    def get(self, key: str) -> tuple[bytes, str | None] | None: ...

    def list(self, prefix: str) -> list[Any]: ...


def is_version(name: str) -> bool:
    """Versions are ``v<YYYYmmddTHHMMSSZ>`` (see pipeline.version_for): fixed width, so they sort as strings."""
    return bool(VERSION_RE.match(name))


def newer(a: str, b: str | None) -> bool:
    """True when version ``a`` is strictly newer than ``b`` (None = no version yet)."""
    return b is None or a > b


@dataclass(frozen=True)
class SandboxLayout:
    """Keys of one dataset in the sandbox. ``dataset_prefix`` is ``<prefix>/<dataset>``."""

    dataset_prefix: str

    @classmethod
    def of(cls, prefix: str, dataset: str) -> "SandboxLayout":
        return cls("/".join(p.strip("/") for p in (prefix, dataset) if p.strip("/")))

    def _k(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.dataset_prefix, *parts) if p and p.strip("/"))

    @property
    def root(self) -> str:
        return self._k() + "/"

    @property
    def latest_key(self) -> str:
        return self._k(LATEST)

    def version_prefix(self, version: str) -> str:
        return self._k(version) + "/"

    def version_key(self, version: str, rel: str) -> str:
        return self._k(version, rel)

    def manifest_key(self, version: str) -> str:
        return self._k(version, MANIFEST)

    def staging_root(self) -> str:
        return self._k(STAGING) + "/"

    def staging_prefix(self, run_id: str) -> str:
        return self._k(STAGING, run_id) + "/"

    def staging_key(self, run_id: str, rel: str) -> str:
        return self._k(STAGING, run_id, rel)

    def relative(self, key: str) -> str:
        return key[len(self.root):] if key.startswith(self.root) else key


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
