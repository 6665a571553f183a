"""Read what has been released: versions, rows, gate figures, data cards.

A version exists once its ``manifest.json`` exists (the publisher writes it last), so listing manifests
lists releases. Used by ``synthfactory releases`` (boto3 or a local ``--out`` folder) and by the Airflow UI
page (an S3Hook's client on the spec's release connection). Never imports Airflow.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from synthfactory.spec import DatasetSpec

MANIFEST = "manifest.json"
DATACARD = "reports/datacard.html"
VERSION_RE = re.compile(r"^v[0-9A-Za-z._-]{1,80}$")
FIGURES = ("quality_score", "expectation_success_ratio", "exact_match_rate", "dcr_share", "dcr_ratio",
           "leak_clean")


def dataset_prefix(spec: DatasetSpec) -> str:
    """Key prefix of a dataset's versions in the sandbox bucket: ``<prefix>/<dataset>``."""
    return "/".join(p for p in (spec.release.prefix.strip("/"), spec.name) if p)


def version_key(spec: DatasetSpec, version: str, rel: str = "") -> str:
    if not VERSION_RE.match(version):
        raise ValueError(f"not a release version: {version!r}")
    return "/".join(p for p in (dataset_prefix(spec), version, rel) if p)


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
        "spec_sha256": manifest.get("spec_sha256"),
        "source_extract_sha256": manifest.get("source_extract_sha256"),
    }


def _newest_first(rows: Iterable[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: str(r.get("version")), reverse=True)


# -- S3 (any boto3 client: boto3's default chain, or S3Hook(aws_conn_id=...).get_conn()) ----------
def s3_versions(client: Any, bucket: str, spec: DatasetSpec) -> list[str]:
    """Versions with a manifest under ``<prefix>/<dataset>/`` (newest first)."""
    base = dataset_prefix(spec) + "/"
    versions: set[str] = set()
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=base, Delimiter="/"):
        for cp in page.get("CommonPrefixes", []) or []:
            v = cp["Prefix"][len(base):].strip("/")
            if VERSION_RE.match(v):
                versions.add(v)
    present = []
    for v in versions:
        resp = client.list_objects_v2(Bucket=bucket, Prefix=f"{base}{v}/{MANIFEST}", MaxKeys=1)
        if resp.get("KeyCount", 0):
            present.append(v)
    return sorted(present, reverse=True)


def s3_manifest(client: Any, bucket: str, spec: DatasetSpec, version: str) -> dict:
    body = client.get_object(Bucket=bucket, Key=version_key(spec, version, MANIFEST))["Body"].read()
    return json.loads(body)


def s3_releases(client: Any, spec: DatasetSpec, limit: int | None = None) -> list[dict]:
    bucket = spec.release.bucket
    versions = s3_versions(client, bucket, spec)[: limit or None]
    return _newest_first(summarize(s3_manifest(client, bucket, spec, v), v) for v in versions)


def s3_file(client: Any, spec: DatasetSpec, version: str, rel: str) -> bytes | None:
    """A released file's bytes, or None when the version has no such file."""
    try:
        obj = client.get_object(Bucket=spec.release.bucket, Key=version_key(spec, version, rel))
    except Exception as err:  # botocore ClientError NoSuchKey/404
        code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
        if code in {"NoSuchKey", "404", "NotFound"}:
            return None
        raise
    return obj["Body"].read()


# -- local (``synthfactory run --out DIR`` writes DIR/release/<prefix>/<dataset>/<version>/) ---------
def local_root(out: str | Path) -> Path:
    return Path(out) / "release"


def local_releases(out: str | Path, spec: DatasetSpec, limit: int | None = None) -> list[dict]:
    base = local_root(out) / dataset_prefix(spec)
    rows = []
    for manifest in sorted(base.glob(f"*/{MANIFEST}")):
        version = manifest.parent.name
        if VERSION_RE.match(version):
            rows.append(summarize(json.loads(manifest.read_text()), version))
    return _newest_first(rows)[: limit or None]


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
