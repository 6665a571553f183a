"""The sandbox layout: the one place that knows where a dataset's releases live.

Under the sandbox bucket, per dataset::

    <prefix>/<dataset>/<version>/<files>          a committed version (version = v<UTC logical date>)
    <prefix>/<dataset>/<version>/manifest.json    written last: a version exists iff its manifest exists
    <prefix>/<dataset>/latest.json                {"version": ..., "manifest": ...}; only ever moves forward
    <prefix>/<dataset>/_staging/<run_id>/<files>  a publish in progress (run-scoped; readers ignore it)

:class:`SandboxLayout` gives every key of that layout, the ``s3://`` URIs, and the URI that both the release
task's Airflow Asset and its hook-level lineage name (:attr:`SandboxLayout.asset_uri`). Versions follow one
pattern (:data:`VERSION_PATTERN`, what :func:`synthfactory.context.version_for` produces). An empty
``release.prefix`` drops that level everywhere (``<dataset>/<version>/...``). Imports nothing heavy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["LATEST", "MANIFEST", "STAGING", "VERSION_PATTERN", "VERSION_RE", "SandboxLayout", "check_version",
           "find_version", "is_version", "newer"]

MANIFEST = "manifest.json"
LATEST = "latest.json"
STAGING = "_staging"
VERSION_PATTERN = r"v\d{8}T\d{6}Z"  # v<YYYYmmddTHHMMSSZ>: fixed width, so versions sort as strings
VERSION_RE = re.compile(rf"^{VERSION_PATTERN}$")
_VERSION_IN_PATH = re.compile(rf"/({VERSION_PATTERN})/")


def is_version(name: str) -> bool:
    """Versions are ``v<YYYYmmddTHHMMSSZ>`` (see context.version_for): fixed width, so they sort as strings."""
    return bool(VERSION_RE.match(name))


def check_version(version: str) -> str:
    """``version`` if it is a release version, else ValueError (for names that come from a request)."""
    if not is_version(version):
        raise ValueError(f"not a release version: {version!r}")
    return version


def find_version(path: str) -> str | None:
    """The first ``/<version>/`` folder named in a key or URI, or None."""
    m = _VERSION_IN_PATH.search(path)
    return m.group(1) if m else None


def newer(a: str, b: str | None) -> bool:
    """True when version ``a`` is strictly newer than ``b`` (None = no version yet)."""
    return b is None or a > b


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


@dataclass(frozen=True)
class SandboxLayout:
    """Keys and URIs of one dataset in the sandbox. ``dataset_prefix`` is ``<prefix>/<dataset>`` (just
    ``<dataset>`` for an empty prefix); ``bucket`` is needed only for the ``s3://`` URIs."""

    dataset_prefix: str
    bucket: str = ""

    @classmethod
    def of(cls, prefix: str, dataset: str, bucket: str = "") -> "SandboxLayout":
        return cls(_join(prefix, dataset), bucket)

    @classmethod
    def for_spec(cls, spec: Any) -> "SandboxLayout":
        """The layout of a :class:`~synthfactory.spec.DatasetSpec`'s releases (its ``release`` bucket and prefix)."""
        return cls.of(spec.release.prefix, spec.name, spec.release.bucket)

    @property
    def prefix(self) -> str:
        return self.dataset_prefix.rpartition("/")[0]

    @property
    def dataset(self) -> str:
        return self.dataset_prefix.rpartition("/")[2]

    def _k(self, *parts: str) -> str:
        return _join(self.dataset_prefix, *parts)

    # -- keys --------------------------------------------------------------------------------------
    @property
    def root(self) -> str:
        return self._k() + "/"

    @property
    def latest_key(self) -> str:
        return self._k(LATEST)

    def release_prefix(self, version: str) -> str:
        """``<prefix>/<dataset>/<version>``: what :func:`synthfactory.release.publish.publish` takes."""
        return self._k(version)

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

    # -- URIs --------------------------------------------------------------------------------------
    def uri(self, key: str = "") -> str:
        """``s3://<bucket>/<key>`` (a trailing ``/`` of ``key`` is kept)."""
        return f"s3://{_join(self.bucket, key)}" + ("/" if key.endswith("/") else "")

    @property
    def dataset_uri(self) -> str:
        """``s3://<bucket>/<prefix>/<dataset>/``: where the dataset's versions are listed."""
        return self.uri(self.root)

    def version_uri(self, version: str) -> str:
        """``s3://<bucket>/<prefix>/<dataset>/<version>/``: where a released version lives."""
        return self.uri(self.version_prefix(version))

    def manifest_uri(self, version: str) -> str:
        return self.uri(self.manifest_key(version))

    @property
    def latest_uri(self) -> str:
        return self.uri(self.latest_key)

    @property
    def asset_uri(self) -> str:
        """``s3://<bucket>/<prefix>/<dataset>``: the dataset's Airflow Asset, and its lineage output."""
        return self.uri(self._k())
