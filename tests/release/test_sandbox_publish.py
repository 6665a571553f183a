"""The sandbox publish against the S3 emulator (moto's server on loopback): layout, verification, security,
idempotency, ordering of versions, retention, and the readers."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from synthfactory.release.publish import (
    LocalWriter,
    PublishRefused,
    apply_retention,
    composite_sha256,
    verify_object,
)
from synthfactory.release.sandbox import SandboxLayout, list_releases, read_latest, read_pointer
from tests.release.helpers import (
    BUCKET,
    PREFIX,
    V1,
    V2,
    V3,
    V4,
    V5,
    assert_readers_consistent,
    do_publish,
    keys,
    make_files,
    manifest_files,
    writer,
)

PUBLIC = {"http://acs.amazonaws.com/groups/global/AllUsers",
          "http://acs.amazonaws.com/groups/global/AuthenticatedUsers"}


class CountingWriter:
    """Delegates to a writer and counts calls per method (to see what a publish really did)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def wrapped(*a, **kw):
            self.calls.append((name, a[0] if a else None))
            return attr(*a, **kw)
        return wrapped


def test_layout_security_and_manifest(s3, bucket, tmp_path):
    store, files, decision = make_files(tmp_path / "stage")
    out = do_publish(writer(s3.endpoint), store, files, decision, V1, run_id="manual__1")
    assert keys(bucket) == sorted([f"{PREFIX}/ds/latest.json", f"{PREFIX}/ds/{V1}/manifest.json",
                                   f"{PREFIX}/ds/{V1}/data/patients.parquet", f"{PREFIX}/ds/{V1}/reports/quality.json"])
    assert out["uri"] == f"s3://{BUCKET}/{PREFIX}/ds/{V1}/" and out["latest"] == V1 and out["noop"] is False
    for k in keys(bucket):
        head = bucket.head_object(Bucket=BUCKET, Key=k)
        assert head["ServerSideEncryption"] == "AES256", k
        grants = bucket.get_object_acl(Bucket=BUCKET, Key=k)["Grants"]
        assert not [g for g in grants if g["Grantee"].get("URI") in PUBLIC], (k, grants)
        assert [g["Permission"] for g in grants] == ["FULL_CONTROL"]  # the owner only
        tags = {t["Key"]: t["Value"] for t in bucket.get_object_tagging(Bucket=BUCKET, Key=k)["TagSet"]}
        assert tags == {"dataset": "ds", "version": V1, "synthetic": "true"}, k  # readers' policy keys on these
    manifest = json.loads(bucket.get_object(Bucket=BUCKET, Key=f"{PREFIX}/ds/{V1}/manifest.json")["Body"].read())
    assert manifest["version"] == V1 and manifest["encryption"] == "AES256" and manifest["synthetic"] is True
    assert manifest_files(writer(s3.endpoint), V1) == decision["audited_files"]
    pointer = json.loads(bucket.get_object(Bucket=BUCKET, Key=f"{PREFIX}/ds/latest.json")["Body"].read())
    assert pointer["version"] == V1 and pointer["manifest"] == f"{V1}/manifest.json"
    assert_readers_consistent(writer(s3.endpoint))


def test_kms_encryption_with_the_spec_key(s3, bucket, tmp_path):
    store, files, decision = make_files(tmp_path / "stage")
    do_publish(writer(s3.endpoint, encryption="aws:kms", kms_key_id="alias/sandbox-releases"), store, files,
               decision, V1)
    for k in keys(bucket):
        head = bucket.head_object(Bucket=BUCKET, Key=k)
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"].endswith("alias/sandbox-releases"), k


def test_multipart_upload_is_verified_by_its_composite_checksum(s3, bucket, tmp_path):
    store, files, decision = make_files(tmp_path / "stage", big_mib=12)
    w = CountingWriter(writer(s3.endpoint))
    do_publish(w, store, files, decision, V1)
    key = f"{PREFIX}/ds/{V1}/data/big.bin"
    head = bucket.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3")  # 12 MiB + 4 bytes in 5 MiB parts: a multipart object
    data = (tmp_path / "stage/big.bin").read_bytes()
    assert head["ChecksumSHA256"].split("-")[0] == composite_sha256(data, 5 * 1024 * 1024)
    # verified from the server's checksums: the big object was never downloaded again
    assert not [c for c in w.calls if c[0] == "get" and str(c[1]).endswith("big.bin")]
    assert verify_object(w.inner, key, data) and not verify_object(w.inner, key, data[:-1] + b"X")
    assert_readers_consistent(w.inner)


def test_rerun_of_the_same_version_is_a_noop(s3, bucket, tmp_path):
    store, files, decision = make_files(tmp_path / "stage")
    do_publish(writer(s3.endpoint), store, files, decision, V1, run_id="first")
    before = {k: bucket.head_object(Bucket=BUCKET, Key=k)["LastModified"] for k in keys(bucket)}
    w = CountingWriter(writer(s3.endpoint))
    out = do_publish(w, store, files, decision, V1, run_id="second")
    assert out["noop"] is True and out["latest"] == V1
    assert {k: bucket.head_object(Bucket=BUCKET, Key=k)["LastModified"] for k in keys(bucket)} == before
    assert not [c for c in w.calls if c[0] in ("put", "copy")]  # nothing written at all


def test_rerun_restores_a_damaged_released_file(s3, bucket, tmp_path):
    store, files, decision = make_files(tmp_path / "stage")
    w = writer(s3.endpoint)
    do_publish(w, store, files, decision, V1)
    bucket.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/ds/{V1}/reports/quality.json")
    bucket.put_object(Bucket=BUCKET, Key=f"{PREFIX}/ds/{V1}/data/patients.parquet", Body=b"tampered")
    out = do_publish(w, store, files, decision, V1, run_id="again")
    assert out["noop"] is False
    assert assert_readers_consistent(w) == [V1] and not keys(bucket, f"{PREFIX}/ds/_staging/")


def test_same_version_with_other_bytes_is_refused(s3, bucket, tmp_path):
    store, files, decision = make_files(tmp_path / "a")
    do_publish(writer(s3.endpoint), store, files, decision, V1)
    store2, files2, decision2 = make_files(tmp_path / "b", salt="different")
    with pytest.raises(PublishRefused, match="already released with other contents"):
        do_publish(writer(s3.endpoint), store2, files2, decision2, V1, run_id="other")
    assert manifest_files(writer(s3.endpoint), V1) == decision["audited_files"]
    assert not keys(bucket, f"{PREFIX}/ds/_staging/")


def test_latest_only_moves_forward_and_backfills_stay_listed(s3, bucket, tmp_path):
    store, files, decision = make_files(tmp_path / "stage")
    w = writer(s3.endpoint)
    assert do_publish(w, store, files, decision, V2)["latest"] == V2
    out = do_publish(w, store, files, decision, V1)  # a backfill of an older logical date
    assert out["latest"] == V2 and read_pointer(w, PREFIX, "ds")["version"] == V2
    assert list_releases(w, PREFIX, "ds") == [V1, V2]
    assert read_latest(w, PREFIX, "ds")["version"] == V2


def test_retention_keeps_the_newest_n_and_never_latest(s3, bucket, tmp_path):
    store, files, decision = make_files(tmp_path / "stage")
    w = writer(s3.endpoint)
    for v in (V1, V2, V3, V4):
        out = do_publish(w, store, files, decision, v, keep_versions=2)
    assert out["pruned"] == [V2] and list_releases(w, PREFIX, "ds") == [V3, V4]
    assert not keys(bucket, f"{PREFIX}/ds/{V1}/") and not keys(bucket, f"{PREFIX}/ds/{V2}/")
    # latest is never deleted, even when it is not among the newest N (e.g. pinned back after a bad release)
    layout = SandboxLayout.of(PREFIX, "ds")
    w.put(layout.latest_key, json.dumps({"version": V3}).encode())
    do_publish(w, store, files, decision, V5, keep_versions=1)  # V5 > V3: latest moves to V5 ...
    assert list_releases(w, PREFIX, "ds") == [V5]
    w.put(layout.latest_key, json.dumps({"version": V5}).encode())
    assert apply_retention(w, layout, keep=1) == []


def test_retention_sweeps_leftovers_of_dead_runs_only_when_stale(s3, bucket, tmp_path):
    store, files, decision = make_files(tmp_path / "stage")
    w = writer(s3.endpoint)
    do_publish(w, store, files, decision, V2)
    layout = SandboxLayout.of(PREFIX, "ds")
    w.put(layout.version_key(V1, "data/patients.parquet"), b"orphan of a publish that died before its manifest")
    w.put(layout.staging_key("dead_run", "data/patients.parquet"), b"orphan staging")
    assert apply_retention(w, layout, keep=10) == []
    assert len(keys(bucket)) == 6  # young leftovers may belong to a publish in progress: kept
    apply_retention(w, layout, keep=10, now=datetime.now(timezone.utc) + timedelta(hours=25))
    assert keys(bucket) == sorted([f"{PREFIX}/ds/latest.json", *(f"{PREFIX}/ds/{V2}/{p}" for p in
                                   ("manifest.json", "data/patients.parquet", "reports/quality.json"))])


def test_readers_ignore_partial_versions_and_staging(s3, bucket, tmp_path):
    store, files, decision = make_files(tmp_path / "stage")
    w = writer(s3.endpoint)
    assert read_latest(w, PREFIX, "ds") is None and list_releases(w, PREFIX, "ds") == []
    do_publish(w, store, files, decision, V1)
    layout = SandboxLayout.of(PREFIX, "ds")
    w.put(layout.version_key(V2, "data/patients.parquet"), b"partial")  # no manifest: not a version
    w.put(layout.staging_key("r", "manifest.json"), b"{}")
    assert list_releases(w, PREFIX, "ds") == [V1]
    w.delete([layout.latest_key])  # without the pointer, readers fall back to the newest manifest
    assert read_latest(w, PREFIX, "ds")["version"] == V1


def test_required_human_approval_is_enforced_by_the_publisher(s3, bucket, tmp_path):
    store, files, decision = make_files(tmp_path / "stage")
    w = writer(s3.endpoint)
    with pytest.raises(PublishRefused, match="requires a human approval"):
        do_publish(w, store, files, decision, V1, require_approval=True)
    with pytest.raises(PublishRefused, match="rejected by a reviewer .not synthetic enough"):
        do_publish(w, store, files, decision, V1, require_approval=True,
                   approval={"approved": False, "reason": "not synthetic enough"})
    with pytest.raises(PublishRefused, match="other file hashes"):
        do_publish(w, store, files, decision, V1, require_approval=True,
                   approval={"approved": True, "audited_files": {"data/patients.parquet": "0" * 64}})
    assert keys(bucket) == []
    approval = {"approved": True, "reviewer": "dpo", "audited_files": decision["audited_files"], "reason": "ok"}
    do_publish(w, store, files, decision, V1, require_approval=True, approval=approval)
    assert read_latest(w, PREFIX, "ds")["approval"]["reviewer"] == "dpo"


def test_local_writer_has_the_same_layout_and_conditional_writes(tmp_path):
    from synthfactory.release.publish import PreconditionFailed

    store, files, decision = make_files(tmp_path / "stage")
    w = LocalWriter(tmp_path / "sandbox")
    do_publish(w, store, files, decision, V2)
    assert do_publish(w, store, files, decision, V2, run_id="again")["noop"] is True
    assert do_publish(w, store, files, decision, V1)["latest"] == V2
    assert assert_readers_consistent(w) == [V1, V2]
    assert not (tmp_path / "sandbox" / PREFIX / "ds" / "_staging").exists()
    with pytest.raises(PreconditionFailed):
        w.put(f"{PREFIX}/ds/{V1}/manifest.json", b"{}", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        w.put(f"{PREFIX}/ds/latest.json", b"{}", if_match='"stale"')
    assert not list((tmp_path / "sandbox").rglob("*.partial"))
