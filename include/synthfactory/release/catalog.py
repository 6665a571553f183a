"""What has been released: versions, rows, gate figures, data cards (a catalogue over the sandbox readers).

A version exists once its ``manifest.json`` exists (the publisher writes it last), so listing manifests
lists releases (:func:`synthfactory.release.sandbox.released_versions`). Used by ``synthfactory releases``
(boto3 or a local ``--out`` folder) and by the Airflow UI page (an S3Hook's client on the spec's release
connection). Never imports Airflow, boto3 or pandas.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from synthfactory.release.layout import MANIFEST, SandboxLayout, check_version
from synthfactory.release.sandbox import BucketReader, FolderReader, ObjectReader, released_versions
from synthfactory.spec import DatasetSpec

__all__ = ["DATACARD", "FIGURES", "MANIFEST", "format_table", "local_releases", "local_root", "read_file",
           "releases", "s3_file", "s3_releases", "summarize"]

DATACARD = "reports/datacard.html"
FIGURES = ("quality_score", "expectation_success_ratio", "exact_match_rate", "dcr_share", "dcr_ratio",
           "leak_clean")


def summarize(manifest: dict, version: str | None = None) -> dict:
    """One row per release: version, rows, synthesizer, when, gate profile, figures, data card present."""
    files = {f.get("path"): f for f in manifest.get("files", []) if isinstance(f, dict)}
    figures = dict(manifest.get("figures") or {})
    gate = manifest.get("gate") or {}
    return {
        "dataset": manifest.get("dataset"),
        "version": manifest.get("version") or version,
        "rows": manifest.get("rows"),
        "synthesizer": manifest.get("synthesizer"),
        "published_at": manifest.get("published_at"),
        "profile": gate.get("profile"),
        "approved": bool(gate.get("approved")),
        "figures": {k: figures.get(k) for k in FIGURES if k in figures} | {
            k: v for k, v in figures.items() if k not in FIGURES},
        "datacard": DATACARD in files,
        "files": sorted(files),
        "intended_use": manifest.get("intended_use"),
        "owner": manifest.get("owner"),
        "contact": manifest.get("contact"),
        "licence": manifest.get("licence"),
        "spec_sha256": manifest.get("spec_sha256"),
        "source_extract_sha256": manifest.get("source_extract_sha256"),
    }


def _newest_first(rows: Iterable[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: str(r.get("version")), reverse=True)


def releases(store: ObjectReader, layout: SandboxLayout, limit: int | None = None) -> list[dict]:
    """One :func:`summarize` row per released version, newest first (at most ``limit``)."""
    versions = sorted(released_versions(store, layout), reverse=True)[: limit or None]
    return _newest_first(summarize(json.loads(store.get(layout.manifest_key(v))[0]), v) for v in versions)


def read_file(store: ObjectReader, layout: SandboxLayout, version: str, rel: str) -> bytes | None:
    """A released file's bytes, or None when the version has no such file. ValueError for a bad version."""
    got = store.get(layout.version_key(check_version(version), rel))
    return None if got is None else got[0]


# -- S3 (any boto3 client: boto3's default chain, or S3Hook(aws_conn_id=...).get_conn()) ----------
def s3_releases(client: Any, spec: DatasetSpec, limit: int | None = None) -> list[dict]:
    return releases(BucketReader(client, spec.release.bucket), SandboxLayout.for_spec(spec), limit)


def s3_file(client: Any, spec: DatasetSpec, version: str, rel: str) -> bytes | None:
    return read_file(BucketReader(client, spec.release.bucket), SandboxLayout.for_spec(spec), version, rel)


# -- local (``synthfactory run --out DIR`` writes DIR/release/<prefix>/<dataset>/<version>/) ---------
def local_root(out: str | Path) -> Path:
    return Path(out) / "release"


def local_releases(out: str | Path, spec: DatasetSpec, limit: int | None = None) -> list[dict]:
    return releases(FolderReader(local_root(out)), SandboxLayout.for_spec(spec), limit)


def format_table(rows: list[dict]) -> str:
    """A plain-text table of releases (the CLI's output)."""
    head = ["version", "rows", "synthesizer", "quality", "expectations", "exact_match", "dcr_share", "dcr_ratio",
            "leak_clean", "datacard"]
    table = [head]
    for r in rows:
        f = r["figures"]
        table.append([str(r["version"]), str(r["rows"]), str(r["synthesizer"]),
                      *(str(f.get(k, "-")) for k in FIGURES), "yes" if r["datacard"] else "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)
