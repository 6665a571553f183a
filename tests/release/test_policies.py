"""The example least-privilege policies in docker/: well-formed, and the writer's IAM policy allows exactly what a
publish calls (recorded from a real publish against the S3 emulator), nothing like ACLs or the PHI side."""

from __future__ import annotations

import fnmatch
import json

import pytest

from synthfactory.testing import dev
from tests.conftest import ROOT
from tests.release.helpers import BUCKET, V1, V2, do_publish, make_files, reset_bucket, writer

# S3 API operation -> IAM action(s) it needs (https://docs.aws.amazon.com/AmazonS3/latest/API/)
NEEDS = {
    "PutObject": ["s3:PutObject"], "CreateMultipartUpload": ["s3:PutObject"], "UploadPart": ["s3:PutObject"],
    "CompleteMultipartUpload": ["s3:PutObject"], "AbortMultipartUpload": ["s3:AbortMultipartUpload"],
    "CopyObject": ["s3:GetObject", "s3:PutObject"], "UploadPartCopy": ["s3:GetObject", "s3:PutObject"],
    "HeadObject": ["s3:GetObject"], "GetObject": ["s3:GetObject"], "ListObjectsV2": ["s3:ListBucket"],
    "DeleteObjects": ["s3:DeleteObject"], "PutObjectTagging": ["s3:PutObjectTagging"],
}


def _load(name: str) -> dict:
    return json.loads((ROOT / "docker" / name).read_text())


def _statements(policy: dict, effect: str) -> list[dict]:
    return [s for s in policy["Statement"] if s["Effect"] == effect]


def _listify(v):
    return v if isinstance(v, list) else [v]


def _allows(policy: dict, action: str, resource: str) -> bool:
    def hit(s):
        return (any(fnmatch.fnmatchcase(action, a) for a in _listify(s["Action"]))
                and any(fnmatch.fnmatchcase(resource, r) for r in _listify(s["Resource"])))
    return any(hit(s) for s in _statements(policy, "Allow")) and not any(hit(s) for s in _statements(policy, "Deny"))


def test_policies_are_well_formed_and_deny_the_dangerous_parts():
    bucket = _load("sandbox-bucket-policy.json")
    sids = {s["Sid"] for s in bucket["Statement"]}
    assert {"DenyInsecureTransport", "OnlyTheSandboxWriterWritesReleases", "DenyAclChanges",
            "ReadersNeverSeeStaging", "ReadersGetSyntheticReleasesOnly"} <= sids
    for s in _statements(bucket, "Allow"):  # readers only read, and only objects tagged synthetic=true
        assert all(a.startswith(("s3:Get", "s3:List")) for a in _listify(s["Action"]))
        assert s["Principal"] != "*"
    iam = _load("sandbox-writer-iam-policy.json")
    for s in _statements(iam, "Allow"):
        assert not any("Acl" in a or a in ("s3:*", "*") for a in _listify(s["Action"]))
        assert all(r.startswith(("arn:aws:s3:::synthetic-sandbox", "arn:aws:kms:")) for r in _listify(s["Resource"]))
    assert not _allows(iam, "s3:PutObjectAcl", "arn:aws:s3:::synthetic-sandbox/releases/x")
    assert not _allows(iam, "s3:GetObject", "arn:aws:s3:::phi-staging/cohort/runs/r/model/train.parquet")
    assert not _allows(iam, "s3:PutObject", "arn:aws:s3:::synthetic-sandbox/elsewhere/x")


@pytest.fixture(scope="module")
def s3():
    with dev.S3Emulator() as emulator:
        reset_bucket(emulator.client())
        yield emulator
        reset_bucket(emulator.client())


def test_writer_policy_covers_every_call_a_publish_makes(s3, tmp_path):
    iam = _load("sandbox-writer-iam-policy.json")
    w = writer(s3.endpoint)
    calls: list[tuple[str, dict]] = []
    w.client.meta.events.register("before-parameter-build.s3.*",  # the API parameters of every call
                                  lambda params, model, **kw: calls.append((model.name, dict(params))))
    store, files, decision = make_files(tmp_path / "a", big_mib=11)
    do_publish(w, store, files, decision, V1, keep_versions=1)
    store, files, decision = make_files(tmp_path / "b", salt="b")
    do_publish(w, store, files, decision, V2, keep_versions=1)  # retention deletes V1
    ops = {name for name, _ in calls}
    assert {"PutObject", "CreateMultipartUpload", "UploadPart", "CopyObject", "HeadObject", "DeleteObjects",
            "ListObjectsV2"} <= ops
    assert any(p.get("Tagging") for _, p in calls) and all(p["Key"].startswith("releases/ds/")
                                                             for _, p in calls if "Key" in p)
    for name, params in calls:
        assert "ACL" not in params and not any(k.startswith("Grant") for k in params), (name, params)
        assert name in NEEDS, f"{name} has no known IAM mapping: add it to NEEDS and check the policy"
        assert params["Bucket"] == BUCKET
        key = params.get("Key") or (params.get("Prefix") if name == "ListObjectsV2" else None) or "releases/"
        bucket = "arn:aws:s3:::synthetic-sandbox"  # the policy's bucket
        resource = bucket if name == "ListObjectsV2" else f"{bucket}/{key}"
        for action in NEEDS[name] + (["s3:PutObjectTagging"] if params.get("Tagging") else []):
            assert _allows(iam, action, resource), (name, action, resource)
