"""Shared helpers for the sandbox release tests: an approved file set, S3 clients on the loopback emulator,
and the readers' invariant (a listed version is always complete)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from synthfactory.release.publish import MiB, Boto3Writer, client_config, publish
from synthfactory.release.sandbox import SandboxLayout, list_releases, read_manifest, read_pointer
from synthfactory.release.signing import sign
from synthfactory.storage import Store

BUCKET = "sf-release-tests"  # its own bucket: moto's state is shared by the whole test session
PREFIX = "releases"
V1, V2, V3, V4, V5 = (f"v2024010{i}T000000Z" for i in range(1, 6))
SIGNING_KEY = b"release-signing-key-for-tests-0123456789"  # the tests' release signing key (the gate's, in a run)


def make_files(folder: Path, *, big_mib: int = 0, salt: str = "") -> tuple[Store, dict[str, str], dict]:
    """Two or three files in a fake staging folder and an approved decision that audits them."""
    import pandas as pd

    store = Store()
    folder.mkdir(parents=True, exist_ok=True)
    store.write_df(str(folder / "patients.parquet"), pd.DataFrame({"v": [1, 2, 3], "s": [salt] * 3}))
    store.write_json(str(folder / "quality.json"), {"quality_score": 0.9, "salt": salt})
    files = {"data/patients.parquet": str(folder / "patients.parquet"),
             "reports/quality.json": str(folder / "quality.json")}
    if big_mib:
        block = hashlib.sha256(salt.encode()).digest() * 32  # 1 KiB
        (folder / "big.bin").write_bytes(block * (1024 * big_mib) + b"tail")
        files["data/big.bin"] = str(folder / "big.bin")
    hashes = {rel: hashlib.sha256(store.read_bytes(uri)).hexdigest() for rel, uri in files.items()}
    return store, files, {"approved": True, "audited_files": hashes, "checks": [], "profile": "default",
                          "message": "all gates passed"}


def s3_client(endpoint: str, max_attempts: int = 3, connect_timeout: float = 2, read_timeout: float = 10) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=client_config(max_attempts, connect_timeout=connect_timeout, read_timeout=read_timeout))


def writer(endpoint: str, **kw: Any) -> Boto3Writer:
    opts = {"multipart_threshold": 5 * MiB, "multipart_chunksize": 5 * MiB}
    max_attempts = kw.pop("max_attempts", 3)
    opts.update(kw)
    return Boto3Writer(s3_client(endpoint, max_attempts=max_attempts), BUCKET, **opts)


def signed(decision: dict, version: str, run_id: str, dataset: str = "ds", key: bytes = SIGNING_KEY) -> dict:
    """``decision`` as the gate writes it for this run: stamped with dataset, version and run id, and signed."""
    return sign({**decision, "dataset": dataset, "version": version, "run_id": run_id}, "decision", key)


def do_publish(w: Any, store: Store, files: dict, decision: dict, version: str, run_id: str | None = None,
               dataset: str = "ds", **kw: Any) -> dict:
    """Publish as the release stage does: a decision (and an approval) without a signature is first signed, as
    the gate (and the review) would, for this dataset, version and run (pass signed ones to test what the
    publisher makes of them)."""
    run_id = run_id or f"run_{version}"
    if "signature" not in decision:
        decision = signed(decision, version, run_id, dataset)
    approval = kw.get("approval")
    if approval is not None and "signature" not in approval:  # as the review stage records it
        kw["approval"] = sign({"audited_files": decision.get("audited_files"), **approval, "dataset": dataset,
                               "version": version, "run_id": run_id,
                               "decision_signature": decision["signature"]["value"]}, "approval", SIGNING_KEY)
    kw.setdefault("signing_key", SIGNING_KEY)
    return publish(files, decision=decision, store=store, writer=w, key_prefix=f"{PREFIX}/{dataset}/{version}",
                   manifest_extra={"dataset": dataset, "synthetic": True}, run_id=run_id, **kw)


def reset_bucket(client: Any) -> None:
    """An empty sandbox bucket. moto's state is per process, shared by every emulator a test session starts, so
    each test module starts from (and leaves) an empty bucket."""
    try:
        for k in keys(client):
            client.delete_object(Bucket=BUCKET, Key=k)
        for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []):
            client.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])
    except client.exceptions.NoSuchBucket:
        client.create_bucket(Bucket=BUCKET)


def keys(client: Any, prefix: str = "") -> list[str]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def assert_readers_consistent(w: Any, dataset: str = "ds") -> list[str]:
    """What a reader can see is always whole: every listed version's manifest names files that are all there
    with the manifest's sha256 and nothing else; ``latest`` names a listed version. Returns the versions."""
    layout = SandboxLayout.of(PREFIX, dataset)
    versions = list_releases(w, PREFIX, dataset)
    for v in versions:
        manifest = read_manifest(w, PREFIX, dataset, v)
        assert manifest is not None and manifest["version"] == v
        for entry in manifest["files"]:
            got = w.get(layout.version_key(v, entry["path"]))
            assert got is not None, (v, entry["path"])
            assert hashlib.sha256(got[0]).hexdigest() == entry["sha256"], (v, entry["path"])
        listed = {layout.relative(o.key) for o in w.list(layout.version_prefix(v))}
        assert listed == {f"{v}/{e['path']}" for e in manifest["files"]} | {f"{v}/manifest.json"}
    pointer = read_pointer(w, PREFIX, dataset)
    if pointer is not None:
        assert pointer["version"] in versions, (pointer, versions)
    return versions


def manifest_files(w: Any, version: str, dataset: str = "ds") -> dict[str, str]:
    m = read_manifest(w, PREFIX, dataset, version)
    return {e["path"]: e["sha256"] for e in m["files"]} if m else {}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
