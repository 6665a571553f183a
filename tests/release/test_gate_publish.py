from __future__ import annotations

import hashlib
import json

import pytest

from synthfactory.release.gate import decide
from synthfactory.release.publish import LocalWriter, PublishRefused, publish
from synthfactory.spec import PrivacyThresholds, QualityThresholds
from synthfactory.storage import Store
from tests.release.helpers import SIGNING_KEY, signed

GOOD_Q = {"quality_score": 0.86, "expectation_success_ratio": 1.0, "min_column_score": 0.8,
          "column_pair_trends": 0.82}
GOOD_P = {"exact_match_rate": 0.0, "dcr_share": 0.52, "dcr_ratio": 0.97, "leak_clean": True, "mia_auc": 0.51,
          # the membership-inference battery ran and every attack was skipped for a stated reason (no checks)
          "mia_battery": {"attacks": {a: {"status": "skipped", "reason": "stand-in"}
                                      for a in ("distance", "domias", "shadow")}}}


def test_gate_approves_good_figures():
    d = decide(GOOD_Q, GOOD_P, QualityThresholds(), PrivacyThresholds(), {"a": "x"})
    assert d["approved"] and d["failed"] == [] and d["message"] == "all gates passed"
    # without a privacy reference: exact matches, DCR share, DCR ratio, leak scan, MIA (absolute caps)
    assert [c["name"] for c in d["checks"] if c["gate"] == "privacy"] == [
        "exact_match_rate", "dcr_share", "dcr_ratio", "leak_scan_clean", "mia_auc"]
    assert {c["gate"] for c in d["checks"]} == {"quality", "privacy"}


def test_gate_names_each_failed_gate_and_margin():
    p = {**GOOD_P, "dcr_share": 0.91, "exact_match_rate": 0.25, "leak_clean": False}
    q = {**GOOD_Q, "quality_score": 0.5}
    d = decide(q, p, QualityThresholds(min_quality_score=0.75), PrivacyThresholds(max_dcr_share=0.6), {})
    assert not d["approved"]
    msg = d["message"]
    assert "privacy gate failed: dcr_share 0.91 > max 0.6 (by 0.31)" in msg
    assert "privacy gate failed: exact_match_rate 0.25 > max 0 (by 0.25)" in msg
    assert "quality gate failed: quality_score.floor 0.5 < min 0.75 (by 0.25)" in msg  # no reference: the floor
    assert "leak_scan_clean is False" in msg
    assert len(d["failed"]) == 4


def test_gate_puts_the_privacy_reference_beside_each_check():
    ref = {"dcr_share": {"mean": 0.5, "sd": 0.04, "p05": 0.44, "p95": 0.57},
           "exact_match_rate": {"mean": 0.0, "sd": 0.0}, "mia_auc": {"mean": 0.5, "sd": 0.02}}
    d = decide(GOOD_Q, {**GOOD_P, "reference": ref}, QualityThresholds(), PrivacyThresholds(), {})
    checks = {c["name"]: c for c in d["checks"] if c["gate"] == "privacy"}
    assert d["approved"] and checks["dcr_share"]["reference"] == ref["dcr_share"]
    assert checks["dcr_share"]["threshold"] == 0.6 and checks["dcr_share.holdout_leak"]["threshold"] == 0.4
    leak = decide(GOOD_Q, {**GOOD_P, "dcr_share": 0.02, "reference": ref}, QualityThresholds(), PrivacyThresholds(), {})
    assert leak["failed"] == ["privacy gate failed: dcr_share.holdout_leak 0.02 < min 0.4 "
                              "(by 0.38; real data itself: 0.5 ± 0.04)"]


def test_an_uncertified_anonymeter_risk_passes_but_is_never_called_pass():
    """Too few attacks to certify (upper bound 0.257 > 0.1): the gate refuses only on significant evidence of
    risk (lower bound), and says the risk is not certified rather than passed."""
    wide = {"risk": 0.02, "ci_low": 0.0, "ci_high": 0.257, "error": 0.129, "n": 120}
    pt = PrivacyThresholds(quasi_identifiers=["age"], anonymeter_attacks=100)
    p = {**GOOD_P, "rare_record_mia_status": "skipped"}
    d = decide(GOOD_Q, {**p, "anonymeter_risks": {"singling_out": wide}}, QualityThresholds(), pt, {})
    (check,) = [c for c in d["checks"] if c["name"].startswith("anonymeter.")]
    assert d["approved"] and check["name"] == "anonymeter.singling_out.ci_low" and check["passed"]
    assert check["certified"] is False and check["result"] == "not certified"
    assert d["message"] == "all gates passed (1 not certified: anonymeter.singling_out.ci_low)"
    narrow = {"risk": 0.01, "ci_low": 0.0, "ci_high": 0.04, "error": 0.02, "n": 500}
    d = decide(GOOD_Q, {**p, "anonymeter_risks": {"singling_out": narrow}}, QualityThresholds(), pt, {})
    (check,) = [c for c in d["checks"] if c["name"].startswith("anonymeter.")]
    assert check["name"] == "anonymeter.singling_out.ci_high" and check["result"] == "pass"
    strict = pt.model_copy(update={"require_anonymeter_certification": True})
    d = decide(GOOD_Q, {**p, "anonymeter_risks": {"singling_out": wide}}, QualityThresholds(), strict, {})
    assert not d["approved"] and "anonymeter.singling_out.certified is False" in d["message"]


def test_gate_treats_missing_figure_as_failure():
    d = decide({}, GOOD_P, QualityThresholds(), PrivacyThresholds(), {})
    assert not d["approved"] and "quality_score could not be measured" in d["message"]


class RecordingWriter(LocalWriter):
    """Records every write (put, copy, delete) in order."""

    def __init__(self, root):
        super().__init__(root)
        self.order: list[str] = []
        self.ops: list[tuple[str, str]] = []

    def put(self, key, data, **kw):
        self.order.append(key)
        self.ops.append(("put", key))
        return super().put(key, data, **kw)

    def copy(self, src, dst, **kw):
        self.ops.append(("copy", dst))
        return super().copy(src, dst, **kw)

    def delete(self, keys):
        self.ops += [("delete", k) for k in keys]
        return super().delete(keys)


def _files(tmp_path):
    store = Store()
    a, b = tmp_path / "stage/a.json", tmp_path / "stage/b.parquet"
    store.write_json(str(a), {"x": 1})
    import pandas as pd

    store.write_df(str(b), pd.DataFrame({"v": [1, 2, 3]}))
    files = {"reports/a.json": str(a), "data/b.parquet": str(b)}
    hashes = {rel: hashlib.sha256(store.read_bytes(u)).hexdigest() for rel, u in files.items()}
    return store, files, hashes


def test_publish_writes_files_then_manifest_last(tmp_path):
    store, files, hashes = _files(tmp_path)
    decision = signed({"approved": True, "audited_files": hashes, "checks": [], "profile": "default"}, "v1", "run1")
    w = RecordingWriter(tmp_path / "sandbox")
    out = publish(files, decision=decision, store=store, writer=w, key_prefix="rel/ds/v1", manifest_extra={"x": 1},
                  run_id="run1", signing_key=SIGNING_KEY)
    # staged under the run, copied into the version, then the manifest, then the latest pointer, then cleanup
    writes = [op for op in w.ops if op[0] != "delete"]
    assert writes[:2] == [("put", "rel/ds/_staging/run1/data/b.parquet"), ("put", "rel/ds/_staging/run1/reports/a.json")]
    assert {k for op, k in writes[2:4]} == {"rel/ds/v1/data/b.parquet", "rel/ds/v1/reports/a.json"}
    assert writes[4:] == [("put", "rel/ds/v1/manifest.json"), ("put", "rel/ds/latest.json")]
    assert {k for op, k in w.ops if op == "delete"} == {"rel/ds/_staging/run1/data/b.parquet",
                                                        "rel/ds/_staging/run1/reports/a.json"}
    assert not (tmp_path / "sandbox/rel/ds/_staging").exists()
    manifest = json.loads((tmp_path / "sandbox/rel/ds/v1/manifest.json").read_text())
    for entry in manifest["files"]:
        data = (tmp_path / "sandbox/rel/ds/v1" / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert {e["path"]: e.get("rows") for e in manifest["files"]}["data/b.parquet"] == 3
    assert manifest["x"] == 1 and manifest["code_version"]["sdv"] and manifest["version"] == "v1"
    assert json.loads((tmp_path / "sandbox/rel/ds/latest.json").read_text())["version"] == "v1"
    assert out["files"] == 2 and out["noop"] is False and out["latest"] == "v1"


def test_publisher_refuses_unapproved_and_tampered(tmp_path):
    store, files, hashes = _files(tmp_path)
    w = RecordingWriter(tmp_path / "sandbox")
    kw = {"store": store, "writer": w, "key_prefix": "p", "manifest_extra": {}, "signing_key": SIGNING_KEY}
    with pytest.raises(PublishRefused, match="did not approve"):
        publish(files, decision=signed({"approved": False, "message": "x", "audited_files": hashes}, "p", "p", ""),
                **kw)
    (tmp_path / "stage/a.json").write_text('{"x": 2}')  # changed after the audit
    with pytest.raises(PublishRefused, match="reports/a.json: its sha256 does not match"):
        publish(files, decision=signed({"approved": True, "audited_files": hashes}, "p", "p", ""), **kw)
    with pytest.raises(PublishRefused, match="does not match"):  # never audited at all
        publish(files, decision=signed({"approved": True, "audited_files": {}}, "p", "p", ""), **kw)
    assert w.order == []  # nothing was uploaded


def test_expectations_are_judged_at_the_held_out_row_count():
    """The whole synthetic table's share is reported; the gate judges the share on held-out-sized subsets."""
    ref = {"expectation_success_ratio": {"mean": 0.96, "sd": 0.01, "n": 1}}
    q = {**GOOD_Q, "expectation_success_ratio": 0.89, "reference": ref,
         "matched": {"expectation_success_ratio": 0.95}}
    d = decide(q, GOOD_P, QualityThresholds(), PrivacyThresholds(), {})
    check = next(c for c in d["checks"] if c["name"] == "expectation_success_ratio")
    assert check["value"] == 0.95 and check["passed"]
    d = decide({**q, "matched": {"expectation_success_ratio": None}}, GOOD_P, QualityThresholds(),
               PrivacyThresholds(), {})
    check = next(c for c in d["checks"] if c["name"] == "expectation_success_ratio")
    assert check["value"] == 0.89 and not check["passed"]  # no matched share: the whole table's
