"""Signed release records (issue #18, item 4): the publisher publishes only the gate's own decision, and the
reviewer's own approval, for the run and version it is publishing. An edited, unsigned, re-keyed or copied
record is refused with PublishRefused (exit 5, a UserError: never retried) before anything is written."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest

from synthfactory import pipeline
from synthfactory.errors import EXIT_PUBLISH, UserError, exit_code_for
from synthfactory.release.publish import LocalWriter, PublishRefused
from synthfactory.release.signing import (KEY_FILE, SignatureRefused, canonical, key_id, resolve_signing_key, sign,
                                          verify)
from tests.conftest import write_spec
from tests.release.helpers import PREFIX, SIGNING_KEY, V1, V2, do_publish, make_files, signed


@pytest.fixture
def staged(tmp_path):
    store, files, decision = make_files(tmp_path / "stage")
    return store, files, decision, LocalWriter(tmp_path / "sandbox")


def _nothing_written(tmp_path) -> bool:
    root = tmp_path / "sandbox"
    return not root.exists() or not any(p.is_file() for p in root.rglob("*"))


def _refused(w, store, files, decision, match, version=V1, **kw):
    with pytest.raises(PublishRefused, match=match) as info:
        do_publish(w, store, files, decision, version, **kw)
    assert exit_code_for(info.value) == EXIT_PUBLISH and isinstance(info.value, UserError)  # exit 5, no retries
    return info.value


def test_unedited_signed_decision_publishes(staged, tmp_path):
    store, files, decision, w = staged
    out = do_publish(w, store, files, signed(decision, V1, "run_a"), V1, run_id="run_a")
    assert out["latest"] == V1 and out["noop"] is False
    latest = json.loads((tmp_path / "sandbox" / PREFIX / "ds" / "latest.json").read_text())
    assert latest["version"] == V1


def test_hand_edited_decision_is_refused_and_nothing_moves(staged, tmp_path):
    store, files, decision, w = staged
    refused = signed({**decision, "approved": False, "message": "privacy gate failed"}, V1, "run_a")
    # the measured attack: approve by hand, audited hashes unchanged
    err = _refused(w, store, files, {**refused, "approved": True}, "edited after it was signed", run_id="run_a")
    assert "gate's decision" in str(err)
    # any other field: a threshold, a check, the hashes
    good = signed(decision, V1, "run_a")
    _refused(w, store, files, {**good, "profile": "lenient"}, "edited", run_id="run_a")
    _refused(w, store, files, {**good, "checks": [{"name": "dcr_share", "threshold": 1.0}]}, "edited", run_id="run_a")
    _refused(w, store, files, {**good, "audited_files": {**good["audited_files"], "extra.bin": "0" * 64}}, "edited",
             run_id="run_a")
    assert _nothing_written(tmp_path)


def test_unsigned_or_foreign_key_decision_is_refused(staged, tmp_path):
    store, files, decision, w = staged
    stamped = {**decision, "dataset": "ds", "version": V1, "run_id": "run_a"}
    _refused(w, store, files, {**stamped, "signature": None}, "is not signed", run_id="run_a")
    _refused(w, store, files, {**stamped, "signature": {"alg": "none", "kind": "decision", "value": "x"}},
             "not HMAC-SHA256/decision", run_id="run_a")
    other = sign(stamped, "decision", b"somebody-elses-key-0123456789")
    _refused(w, store, files, other, "signed with another key", run_id="run_a")
    with pytest.raises(PublishRefused, match="no release signing key"):
        do_publish(w, store, files, signed(decision, V1, "run_a"), V1, run_id="run_a", signing_key=None)
    assert _nothing_written(tmp_path)


def test_decision_copied_from_another_run_or_version_is_refused(staged, tmp_path):
    store, files, decision, w = staged
    from_run_a = signed(decision, V1, "run_a")
    err = _refused(w, store, files, from_run_a, "belongs to another run or version", run_id="run_b")
    assert "run_id 'run_a' (publishing 'run_b')" in str(err)
    _refused(w, store, files, from_run_a, "version 'v20240101T000000Z' \\(publishing 'v20240102T000000Z'\\)",
             version=V2, run_id="run_a")
    _refused(w, store, files, from_run_a, "dataset 'ds' \\(publishing 'other'\\)", run_id="run_a", dataset="other")
    assert _nothing_written(tmp_path)


def test_an_approval_record_cannot_pass_for_a_decision(staged):
    store, files, decision, w = staged
    as_approval = sign({**decision, "dataset": "ds", "version": V1, "run_id": "run_a"}, "approval", SIGNING_KEY)
    _refused(w, store, files, as_approval, "not HMAC-SHA256/decision", run_id="run_a")


def test_approval_record_tampering_is_refused(staged, tmp_path):
    store, files, decision, w = staged
    dec = signed(decision, V1, "run_a")

    def approval(**fields):
        record = {"approved": True, "reviewer": "dpo", "reason": "ok", "timed_out": False, "dataset": "ds",
                  "version": V1, "run_id": "run_a", "audited_files": dec["audited_files"],
                  "decision_signature": dec["signature"]["value"], **fields}
        return sign(record, "approval", SIGNING_KEY)

    kw = {"run_id": "run_a", "require_approval": True}
    rejected = approval(approved=False, reason="too few rows")
    _refused(w, store, files, dec, "approval record was edited", approval={**rejected, "approved": True}, **kw)
    _refused(w, store, files, dec, "approval record is not signed",
             approval={**approval(), "signature": None}, **kw)
    _refused(w, store, files, dec, "approval record belongs to another run",
             approval=approval(run_id="run_b"), **kw)
    _refused(w, store, files, dec, "another gate decision", approval=approval(decision_signature="0" * 64), **kw)
    _refused(w, store, files, dec, "not HMAC-SHA256/approval", approval=dec, **kw)
    assert _nothing_written(tmp_path)
    out = do_publish(w, store, files, dec, V1, approval=approval(), **kw)
    assert out["latest"] == V1


def test_signature_survives_json_and_numpy():
    import numpy as np

    record = {"dataset": "ds", "version": V1, "run_id": "r", "approved": np.bool_(True),
              "audited_files": {"a": "b"}, "checks": [{"value": np.float64(0.1) + 0.2, "n": np.int64(3),
                                                       "missing": float("nan")}]}
    s = sign(record, "decision", SIGNING_KEY)
    back = json.loads(json.dumps(s))
    assert verify(back, "decision", SIGNING_KEY, dataset="ds", version=V1, run_id="r") == back
    assert canonical(back, "decision") == canonical(s, "decision")
    with pytest.raises(SignatureRefused):
        verify({**back, "checks": []}, "decision", SIGNING_KEY, dataset="ds", version=V1, run_id="r")


# -- the key --------------------------------------------------------------------------------------------
def test_key_file_is_created_once_private_in_staging(tmp_path, monkeypatch):
    monkeypatch.delenv("SYNTHFACTORY_SIGNING_KEY", raising=False)
    old = __import__("os").umask(0o022)
    try:
        staging = tmp_path / "staging"
        k1 = resolve_signing_key(None, str(staging))
        k2 = resolve_signing_key(None, str(staging))
    finally:
        __import__("os").umask(old)
    assert k1 == k2 and len(k1) >= 32
    path = staging / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(staging.stat().st_mode) == 0o700
    assert resolve_signing_key("from-the-connection-0123", str(staging)) == b"from-the-connection-0123"
    monkeypatch.setenv("SYNTHFACTORY_SIGNING_KEY", "from-the-environment-0123")
    assert resolve_signing_key(None, str(staging)) == b"from-the-environment-0123"
    assert key_id(k1) != key_id(b"from-the-environment-0123") and k1.hex() not in key_id(k1)


def test_s3_staging_needs_a_key_from_a_connection(monkeypatch):
    from synthfactory.errors import ConfigError

    monkeypatch.delenv("SYNTHFACTORY_SIGNING_KEY", raising=False)
    with pytest.raises(ConfigError, match="release.signing_connection_id"):
        resolve_signing_key(None, "s3://phi-staging/x")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        resolve_signing_key("short", "s3://phi-staging/x")


# -- through the pipeline's stages: gate record -> review -> release -------------------------------------
@pytest.fixture
def gated(tmp_path, monkeypatch):
    """A gate-approved run in local staging (files and the gate's signed decision), approval required."""
    monkeypatch.delenv("SYNTHFACTORY_SIGNING_KEY", raising=False)
    from synthfactory.spec import load_spec

    path = write_spec(tmp_path / "specs", "signed_ds", tmp_path / "extract", tmp_path / "staging",
                      release__require_approval=True)
    ctx = pipeline.RunContext(spec=load_spec(path), run_id="manual__1", version=V1)
    store = ctx.store
    for rel, name in (("synthetic", "patients.parquet"), ("reports", "quality.json"), ("reports", "privacy.json"),
                      ("reports", "datacard.html")):
        store.write_bytes(ctx.uri(rel, name), f"{name} bytes".encode())
    sampled = {"synthetic_uri": ctx.uri("synthetic", "patients.parquet"), "rows": 3}
    q = {"report_uri": ctx.uri("reports", "quality.json"), "quality_score": 0.9, "expectation_success_ratio": 1.0}
    p = {"report_uri": ctx.uri("reports", "privacy.json"), "exact_match_rate": 0.0, "dcr_share": 0.5,
         "dcr_ratio": 1.0, "leak_clean": True}
    g = {"approved": True, "decision_uri": ctx.uri("gate", "decision.json"),
         "datacard_uri": ctx.uri("reports", "datacard.html")}
    audited = {rel: hashlib.sha256(store.read_bytes(uri)).hexdigest()
               for rel, uri in pipeline.release_files(sampled, q, p, g).items()}
    decision = {"approved": True, "audited_files": audited, "checks": [], "profile": "default",
                "message": "all gates passed", "dataset": "signed_ds", "version": V1, "run_id": ctx.run_id}
    store.write_json(g["decision_uri"], sign(decision, "decision", pipeline.signing_key(ctx)))
    args = (g, sampled, q, p)
    return ctx, args, LocalWriter(tmp_path / "sandbox"), tmp_path


def _release(ctx, args, w):
    g, sampled, q, p = args
    return pipeline.release(ctx, g, sampled, q, p, {"extract_sha256": "e" * 64}, w)


def test_review_signs_the_approval_and_release_verifies_it(gated):
    ctx, args, w, tmp_path = gated
    pipeline.review(ctx, *args, approved=True, reviewer="dpo", reason="ok")
    record = ctx.store.read_json(pipeline.approval_uri(ctx))
    assert record["signature"]["kind"] == "approval" and record["run_id"] == ctx.run_id
    assert stat.S_IMODE((tmp_path / "staging" / KEY_FILE).stat().st_mode) == 0o600
    assert not (tmp_path / "sandbox").exists() or not list((tmp_path / "sandbox").rglob(KEY_FILE))
    out = _release(ctx, args, w)
    assert out["latest"] == V1
    manifest = json.loads((tmp_path / "sandbox" / "releases" / "signed_ds" / V1 / "manifest.json").read_text())
    assert manifest["approval"]["reviewer"] == "dpo"


def test_edited_approval_or_decision_in_staging_is_refused(gated):
    ctx, args, w, tmp_path = gated
    pipeline.review(ctx, *args, approved=False, reviewer="dpo", reason="too few rows")
    uri = pipeline.approval_uri(ctx)
    ctx.store.write_json(uri, {**ctx.store.read_json(uri), "approved": True})  # approve by hand
    with pytest.raises(PublishRefused, match="approval record was edited"):
        _release(ctx, args, w)
    g = args[0]
    ctx.store.write_json(g["decision_uri"], {**ctx.store.read_json(g["decision_uri"]), "profile": "lenient"})
    with pytest.raises(PublishRefused, match="decision was edited"):
        _release(ctx, args, w)
    with pytest.raises(PublishRefused, match="refusing to record an approval: the gate's decision was edited"):
        pipeline.review(ctx, *args, approved=True, reviewer="dpo")
    assert _nothing_written(tmp_path)


def test_decision_copied_into_another_run_is_refused(gated):
    ctx, args, w, tmp_path = gated
    other = pipeline.RunContext(spec=ctx.spec, run_id="manual__2", version=V2)
    g = args[0]
    g2 = {**g, "decision_uri": other.uri("gate", "decision.json")}
    other.store.write_bytes(g2["decision_uri"], ctx.store.read_bytes(g["decision_uri"]))  # the copy
    with pytest.raises(PublishRefused, match="refusing to record an approval: the gate's decision belongs to another"):
        pipeline.review(other, g2, *args[1:], approved=True, reviewer="dpo")
    pipeline.review(ctx, *args, approved=True, reviewer="dpo")  # run 1's own approval, copied to run 2 as well
    other.store.write_bytes(pipeline.approval_uri(other), ctx.store.read_bytes(pipeline.approval_uri(ctx)))
    with pytest.raises(PublishRefused, match="belongs to another run or version"):
        _release(other, (g2, *args[1:]), w)
    assert _nothing_written(tmp_path)
