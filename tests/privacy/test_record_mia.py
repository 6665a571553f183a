"""Record-level membership inference (a patient's whole record, an attacker who knows part of it) and the record.*
gate: a release that copies real train records is caught and refused, an independently drawn one passes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synthfactory.privacy.record_mia import attacker_knowledge, exact_matches, partial_distances, record_events, \
    record_mia
from synthfactory.privacy.records import record_audit, summarise_record_audit
from synthfactory.quality.cardtext import NO_MEANING, privacy_rows
from synthfactory.release.gate import decide, record_checks
from synthfactory.spec import PrivacyThresholds, QualityThresholds
from synthfactory.testing.records import relational_tables


def _part(tables, keys):
    keys = set(keys)
    return {n: df[df["patient_key"].isin(keys)].reset_index(drop=True) for n, df in tables.items()}


@pytest.fixture(scope="module")
def real():
    """Real patients in three disjoint parts: train (the synthesizer's), holdout (non-members), fresh (an
    independently drawn release)."""
    t = relational_tables(300, seed=8, with_medications=True)
    keys = t["patient"]["patient_key"]
    return _part(t, keys.iloc[:180]), _part(t, keys.iloc[180:240]), _part(t, keys.iloc[240:])


def _renamed(tables):
    """The same records under new patient keys (a copier does not keep the real keys)."""
    new = {k: f"syn-{i}" for i, k in enumerate(tables["patient"]["patient_key"])}
    return {n: df.assign(patient_key=df["patient_key"].map(new)) for n, df in tables.items()}


@pytest.fixture(scope="module")
def audits(real):
    train, hold, fresh = real
    kw = dict(seed=1, bootstrap=100, resplits=8)
    return {name: summarise_record_audit(record_audit(train, hold, syn, **kw))
            for name, syn in (("copy", _renamed(train)), ("fresh", fresh), ("holdout", hold))}


def test_the_attacker_knows_k_events_and_its_own_record_is_nearest(real):
    train, _, _ = real
    (rec,) = record_events(train)
    know = attacker_knowledge(rec, 3, 30, np.random.default_rng(0))
    assert know.n_known.max() == 3 and (know.n_known == 3).mean() > 0.9
    assert np.abs(know.approx - know.day).max() <= 30 and (know.approx != know.day).any()
    d = partial_distances(know, rec)
    assert d.shape == (len(rec), len(rec)) and (d >= 0).all() and (d <= 1).all()
    assert (d.argmin(axis=1) == np.arange(len(rec))).mean() > 0.9  # known facts point at their own record
    e = exact_matches(know, rec)
    assert e[np.arange(len(rec)), np.arange(len(rec))][know.n_known > 0].all()


def test_a_copying_release_is_caught_and_refused(audits):
    rec = audits["copy"]
    a = rec["mia"]["partial_distance"]
    assert a["auc"] > 0.95 and a["auc_ci"][0] > a["auc_reference"]["mean"] + 0.2
    assert rec["partial_exact_match_rate"] > 0.9 and rec["partial_exact_match_rate_reference"]["mean"] < 0.05
    assert rec["exact_match_rate"] == 1.0
    failed = {c.name for c in record_checks({"record": rec}, PrivacyThresholds()) if not c.passed}
    assert {"record.mia.partial_distance.auc.ci_low", "record.partial_exact_match_rate",
            "record.exact_match_rate"} <= failed


@pytest.mark.parametrize("release", ["fresh", "holdout"])
def test_an_independent_release_passes(audits, release):
    rec = audits[release]
    checks = record_checks({"record": rec}, PrivacyThresholds())
    assert checks and all(c.passed for c in checks), [c.describe() for c in checks if not c.passed]
    assert {c.name for c in checks} >= {"record.exact_match_rate", "record.dcr_share",
                                        "record.partial_exact_match_rate",
                                        "record.mia.partial_distance.auc.ci_low",
                                        "record.mia.partial_domias.auc.ci_low"}
    assert rec["mia"]["partial_distance"]["auc"] < 0.65
    json.dumps(rec)  # XCom-able


def test_the_reference_is_real_against_real_and_near_chance(audits):
    ref = audits["fresh"]["mia"]["partial_distance"]["auc_reference"]
    assert abs(ref["mean"] - 0.5) < 0.1 and ref["sd"] > 0
    assert audits["fresh"]["resplits"] == 8


def test_deterministic_with_seeds(real):
    train, hold, fresh = real
    a = record_mia(train, hold, fresh, seed=4, bootstrap=50, resplits=3)
    b = record_mia(train, hold, fresh, seed=4, bootstrap=50, resplits=3)
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
    c = record_mia(train, hold, fresh, seed=5, bootstrap=50, resplits=3)
    assert json.dumps(a, sort_keys=True, default=str) != json.dumps(c, sort_keys=True, default=str)


def test_the_gate_refuses_a_relational_release_without_record_figures_and_the_card_explains_them(audits):
    quality = {"tables": {"tables": {"encounter": {"passed": True, "checks": []}}, "passed": True}}
    d = decide(quality, {}, QualityThresholds(), PrivacyThresholds(), {})
    assert not d["approved"] and any("record.measured" in f for f in d["failed"])
    privacy = {"record": audits["copy"]}
    d = decide({}, privacy, QualityThresholds(), PrivacyThresholds(), {})
    assert any("record.mia.partial_distance.auc.ci_low" in f for f in d["failed"])
    rows = {r["name"]: r for r in privacy_rows(privacy, d["checks"])}
    for name in ("record.exact_match_rate", "record.partial_exact_match_rate", "record.mia.partial_distance.auc",
                 "record.mia.partial_domias.auc"):
        assert rows[name]["meaning"] != NO_MEANING and rows[name]["reference"] is not None, name
    assert rows["record.mia.partial_distance.auc"]["status"] == "FAIL"
    assert rows["record.mia.partial_distance.auc"]["interval"] is not None
    assert all(r["meaning"] != NO_MEANING for n, r in rows.items() if n.startswith("record.")), \
        [n for n, r in rows.items() if r["meaning"] == NO_MEANING]


def test_record_rates_tolerate_a_coincidence_but_not_a_pattern():
    def rec(rate):
        return {"record": {"exact_match_rate": 0.0, "exact_match_rate_reference": {"mean": 0.0, "sd": 0.0},
                           "synthetic_records": 800, "dcr_share": 0.5, "dcr_share_reference": {"mean": 0.5, "sd": 0.03},
                           "partial_exact_match_rate": rate, "partial_exact_match_targets": 800,
                           "partial_exact_match_rate_reference": {"mean": 0.0, "sd": 0.0},
                           "mia": {a: {"status": "skipped", "reason": "test"} for a in ("partial_distance",
                                                                                     "partial_domias")}}}

    def passed(rate):
        return {c.name: c.passed for c in record_checks(rec(rate), PrivacyThresholds())}
    assert passed(2 / 800)["record.partial_exact_match_rate"]  # two coincidences in 800: binomial noise
    assert not passed(8 / 800)["record.partial_exact_match_rate"]
    assert not any(n.startswith("record.mia.") for n in passed(0.0))  # skipped for a stated reason: no check
    missing = rec(0.0)
    del missing["record"]["mia"]["partial_domias"]
    assert not {c.name: c.passed for c in record_checks(missing, PrivacyThresholds())}[
        "record.mia.partial_domias.measured"]
