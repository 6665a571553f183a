"""Download a released version and verify it against its manifest (``synthfactory pull``).

The release manifest lists every file with its sha256 and size. :func:`pull` reads the manifest (of the
version ``latest.json`` names, or the one asked for), downloads each file into a temporary folder next to the
destination, checks its size and sha256, and only when every file matches moves the folder into place. A file
whose content differs from the manifest (tampered, truncated, replaced) is an :class:`IntegrityError` naming
it; nothing is left at the destination. Read-only: any :class:`~synthfactory.release.sandbox.ObjectReader`
(the sandbox bucket through boto3, or a local ``run --out`` folder).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from synthfactory.errors import InputError
from synthfactory.release.layout import LATEST, SandboxLayout, is_version

__all__ = ["IntegrityError", "pull"]


class IntegrityError(InputError):
    """A downloaded file does not match the release manifest (or the manifest is unusable)."""

    label = "verification failed"


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise IntegrityError(f"{what} is not valid JSON") from None


def resolve_version(reader: Any, layout: SandboxLayout, version: str | None) -> str:
    """``version``, or the one ``latest.json`` names for None / ``latest``."""
    if version and version != "latest":
        if not is_version(version):
            raise InputError(f"{version!r} is not a release version (v<YYYYMMDD>T<HHMMSS>Z, or latest)")
        return version
    got = reader.get(layout.latest_key)
    if got is None:
        raise InputError(f"{layout.dataset} has no {LATEST} (nothing released yet)")
    name = _json(got[0], LATEST).get("version")
    if not isinstance(name, str) or not is_version(name):
        raise IntegrityError(f"{LATEST} names no valid version ({name!r})")
    return name


def _safe_rel(rel: Any) -> PurePosixPath:
    path = PurePosixPath(str(rel))
    if not rel or path.is_absolute() or ".." in path.parts or "\\" in str(rel):
        raise IntegrityError(f"the manifest lists an unsafe path {rel!r}")
    return path


def pull(reader: Any, layout: SandboxLayout, dest: str | Path, version: str | None = None) -> dict:
    """Download ``version`` (default: latest) into ``dest`` (which must not exist, or be empty) and verify every
    file by the manifest's size and sha256. Returns ``{"version", "dir", "files", "bytes"}``."""
    version = resolve_version(reader, layout, version)
    got = reader.get(layout.manifest_key(version))
    if got is None:
        raise InputError(f"{layout.dataset} {version}: no such release (no manifest)")
    manifest = _json(got[0], f"{version}/manifest.json")
    entries = manifest.get("files")
    if not isinstance(entries, list) or not entries:
        raise IntegrityError(f"{version}/manifest.json lists no files")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest} exists and is not an empty folder: pull into a new folder")
    partial = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    total = 0
    try:
        for entry in entries:
            rel = _safe_rel(entry.get("path"))
            obj = reader.get(layout.version_key(version, str(rel)))
            if obj is None:
                raise IntegrityError(f"{rel}: listed in the manifest but missing from the release")
            data = obj[0]
            sha = hashlib.sha256(data).hexdigest()
            if entry.get("bytes") is not None and len(data) != int(entry["bytes"]):
                raise IntegrityError(f"{rel}: {len(data)} bytes, the manifest says {entry['bytes']} (the file was "
                                     f"changed after the release: do not use it)")
            if sha != entry.get("sha256"):
                raise IntegrityError(f"{rel}: sha256 {sha[:16]}… does not match the manifest's "
                                     f"{str(entry.get('sha256'))[:16]}… (the file was changed after the release: "
                                     f"do not use it)")
            target = partial.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            total += len(data)
        (partial / "manifest.json").write_bytes(got[0])
        if dest.exists():
            dest.rmdir()
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"version": version, "dir": str(dest), "files": len(entries), "bytes": total}
