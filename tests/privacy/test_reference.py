"""The privacy gate judged against fresh real rows: the real-data reference, the two-sided DCR share, exact
matches relative to real data's own, and the rare-record membership test (which replaced
rare_combination_excess). Done-when: copies, noisy copies and a noisy holdout are refused with the demo
thresholds, a GaussianCopula passes, and fresh real rows pass in >= 95 % of random splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthfactory.pipeline import _privacy_audit_figures
from synthfactory.privacy.encoding import encode, row_hashes
from synthfactory.privacy.metrics import (
    privacy_metrics,
    rare_record_membership,
    rare_records,
)
from synthfactory.privacy.reference import pairwise_distances, privacy_reference
from synthfactory.release.gate import Check, privacy_checks
from synthfactory.spec import MiaThresholds, PrivacyThresholds, load_spec
from synthfactory.testing.cohorts import cohort_table

ROOT = Path(__file__).resolve().parents[2]
LABS = ("hba1c", "bmi", "systolic_bp", "ldl", "egfr", "glucose")


@pytest.fixture(scope="module")
def demo_pt() -> PrivacyThresholds:
    """The demo spec's privacy thresholds (anonymeter and the membership-inference battery off: these tests are
    about the other checks; the battery is tested in test_mia.py)."""
    _, pt = load_spec(ROOT / "include/datasets/cohort_demo.yaml").thresholds()
    # cohort_table names the diabetes flag by its ICD-10-CM code, the demo spec by concept
    sensitive = ["cond_e11_9" if c == "cond_t2_diabetes" else c for c in pt.sensitive_attributes]
    return pt.model_copy(update={"anonymeter_attacks": 0, "sensitive_attributes": sensitive,
                                 "mia": pt.mia.model_copy(update={"attacks": []})})


@pytest.fixture(scope="module")
def real():
    """train 800 / holdout 200 rows of one population."""
    full = cohort_table(1000, seed=21, key=None)
    return full.iloc[:800].reset_index(drop=True), full.iloc[800:].reset_index(drop=True)


def noisy(frame: pd.DataFrame, like: pd.DataFrame, seed: int) -> pd.DataFrame:
    """``frame`` with 1 % noise (of the real sd) on every lab: no exact copies left."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    for c in LABS:
        out[c] = out[c] + rng.normal(0, 0.01 * like[c].std(), len(out))
    return out


def audit(train, holdout, syn, pt, seed=0):
    """The privacy stage's gate figures (what pipeline.privacy puts in XCom; leak scan assumed clean)."""
    m = privacy_metrics(train, holdout, syn, seed=seed, quasi_identifiers=pt.quasi_identifiers,
                        sensitive_attributes=pt.sensitive_attributes, k_anonymity=pt.min_k_anonymity,
                        anonymeter_attacks=0, sdmetrics_baseline=False, reference_resplits=pt.reference_resplits)
    fig = _privacy_audit_figures(m, pt)
    fig.pop("gate_rules")
    summary = {"exact_match_rate": m["exact_match"]["exact_match_rate"], "dcr_share": m["dcr"]["dcr_share_adjusted"],
               "dcr_ratio": m["dcr"]["dcr_ratio"], "leak_clean": True, **fig}
    return m, summary, privacy_checks(summary, pt)


def failed(checks: list[Check]) -> set[str]:
    return {c.name for c in checks if not c.passed}


# ------------------------------------------------------------------------------------------------
# done-when (a)-(d)
# ------------------------------------------------------------------------------------------------
def test_copy_of_train_is_refused(real, demo_pt):
    train, holdout = real
    m, s, checks = audit(train, holdout, train.copy(), demo_pt)
    assert s["rare_record_mia_status"] == "measured" and s["rare_record_members"] >= 20
    assert {"exact_match_rate", "dcr_share", "dcr_ratio", "mia_auc", "rare_record_mia_auc.lower_bound"} <= failed(checks)
    assert m["rare_record_mia"]["auc"] > 0.95
    by_name = {c.name: c for c in checks}
    assert by_name["dcr_share"].reference["mean"] == pytest.approx(0.5, abs=0.05)  # the reference rides along
    assert "real data itself" in by_name["dcr_share"].describe()


def test_noisy_copy_of_train_is_refused(real, demo_pt):
    train, holdout = real
    _, s, checks = audit(train, holdout, noisy(train, train, 1), demo_pt)
    assert s["exact_match_rate"] < 0.05
    assert {"dcr_share", "dcr_ratio", "mia_auc", "rare_record_mia_auc.lower_bound"} <= failed(checks)


def test_noisy_holdout_is_refused_as_a_leak(real, demo_pt):
    """Real rows the model never trained on, lightly perturbed: every upper limit passes, the lower tail of
    the DCR share does not (the old gate let this through)."""
    train, holdout = real
    _, s, checks = audit(train, holdout, noisy(holdout, train, 2), demo_pt)
    assert s["dcr_share"] < 0.05
    assert "dcr_share.holdout_leak" in failed(checks)
    assert not {"dcr_share", "mia_auc", "rare_record_mia_auc.lower_bound"} & failed(checks)


def test_gaussian_copula_passes(real, demo_pt):
    from synthfactory.synthesize import engine

    train, holdout = real
    meta = engine.metadata_dict(train)
    synth, _ = engine.fit(train, "gaussian_copula", {"default_distribution": "truncnorm"}, meta)
    syn = engine.sample(synth, len(train))[list(train.columns)]
    _, _, checks = audit(train, holdout, syn, demo_pt)
    assert failed(checks) == set(), [c.describe() for c in checks if not c.passed]
    assert {c.name for c in checks} >= {"dcr_share", "dcr_share.holdout_leak", "rare_record_mia_auc.lower_bound"}


# ------------------------------------------------------------------------------------------------
# done-when (e): fresh real rows pass in >= 95 % of random splits
# ------------------------------------------------------------------------------------------------
def test_fresh_real_rows_pass_in_95_percent_of_splits(demo_pt):
    """40 seeded splits of a 1,000-patient table into train (600), holdout (150) and fresh rows (250, the
    "synthetic" table): a real patient the model never saw must not look like a leak."""
    real = cohort_table(1000, seed=5, key=None)
    fails: dict[str, int] = {"dcr_share": 0, "rare": 0, "any": 0}
    measured = 0
    for seed in range(40):
        p = np.random.default_rng(1000 + seed).permutation(len(real))
        train, holdout, fresh = (real.iloc[np.sort(ix)].reset_index(drop=True)
                                 for ix in (p[:600], p[600:750], p[750:]))
        _, s, checks = audit(train, holdout, fresh, demo_pt, seed=seed)
        bad = failed(checks)
        fails["dcr_share"] += bool(bad & {"dcr_share", "dcr_share.holdout_leak"})
        fails["rare"] += "rare_record_mia_auc.lower_bound" in bad
        fails["any"] += bool(bad)
        measured += s["rare_record_mia_status"] == "measured"
    assert measured == 40  # the rare-record test ran every time
    assert all(n <= 2 for n in fails.values()), fails


# ------------------------------------------------------------------------------------------------
# the reference and the rare-record test
# ------------------------------------------------------------------------------------------------
def test_pairwise_distances_exact_for_identical_rows():
    x = np.random.default_rng(0).random((30, 7)).astype(np.float32)
    d = pairwise_distances(x, np.concatenate([x[:5], x[:5] + 0.5]))
    assert np.all(np.diag(d[:5, :5]) == 0.0)
    ref = np.sqrt(((x[:, None, :].astype(float) - np.concatenate([x[:5], x[:5] + 0.5])[None].astype(float)) ** 2)
                  .sum(-1))
    assert np.allclose(d, ref, atol=1e-9)


def test_reference_is_centred_and_json(real):
    train, holdout = real
    cols = list(train.columns)
    x_train, x_hold = encode([train, holdout], cols)
    h_train, h_hold = row_hashes(train, holdout, cols)
    rt, rh = rare_records(train, holdout, ["age", "gender"], k=5)
    ref = privacy_reference(x_train, x_hold, h_train, h_hold, rare_train=rt, rare_hold=rh, resplits=30, seed=1)
    assert abs(ref["dcr_share"]["mean"] - 0.5) < 0.04 and 0.01 < ref["dcr_share"]["sd"] < 0.1
    assert abs(ref["mia_auc"]["mean"] - 0.5) < 0.04 and abs(ref["rare_record_mia_auc"]["mean"] - 0.5) < 0.06
    assert ref["dcr_share"]["p05"] <= ref["dcr_share"]["mean"] <= ref["dcr_share"]["p95"]
    assert ref["exact_match_rate"]["mean"] == 0.0 and ref["resplits"] == 30
    assert ref["train_rows"] + ref["holdout_rows"] + ref["fresh_rows"] == 1000
    json.dumps(ref, allow_nan=False)
    assert privacy_reference(x_train, x_hold, h_train, h_hold, resplits=0) == {"skipped": "reference_resplits is 0"}


def test_reference_sees_real_duplicates():
    """Discrete tables put real patients on top of each other; the reference's exact-match rate says how often."""
    rng = np.random.default_rng(3)
    real = pd.DataFrame({"age": rng.integers(60, 63, 600), "sex": rng.choice(["f", "m"], 600),
                         "flag": rng.random(600) < 0.3})
    m = privacy_metrics(real.iloc[:400], real.iloc[400:500], real.iloc[500:].reset_index(drop=True),
                        sdmetrics_baseline=False, reference_resplits=10)
    assert m["exact_match"]["exact_match_rate"] == 1.0 and m["reference"]["exact_match_rate"]["mean"] == 1.0
    pt = PrivacyThresholds()
    summary = {"exact_match_rate": 1.0, "dcr_share": m["dcr"]["dcr_share_adjusted"], "dcr_ratio": 1.0,
               "leak_clean": True, "mia_auc": 0.5,
               "reference": {"exact_match_rate": m["reference"]["exact_match_rate"]}}
    assert "exact_match_rate" not in failed(privacy_checks(summary, pt))  # as real data itself
    capped = pt.model_copy(update={"max_exact_match_rate": 0.5})
    assert "exact_match_rate" in failed(privacy_checks(summary, capped))  # the absolute cap still holds


def test_rare_records_and_skip():
    train = pd.DataFrame({"age": [40] * 30 + [88, 91], "sex": ["f"] * 30 + ["m", "f"]})
    holdout = pd.DataFrame({"age": [40] * 10 + [88, 23], "sex": ["f"] * 10 + ["m", None]})
    rt, rh = rare_records(train, holdout, ["age", "sex"], k=3)
    assert rt.tolist() == [False] * 30 + [True, True]  # (88, m) twice in train + holdout: still rare at k=3
    assert rh.tolist() == [False] * 10 + [True, True]
    x_t, x_h, x_s = encode([train, holdout, train], ["age", "sex"])
    r = rare_record_membership(x_t, x_h, x_s, rt, rh)
    assert r["status"] == "skipped" and "fewer than 5" in r["reason"] and r["auc"] is None


def test_rare_record_test_targets_rare_records(real):
    """A synthesizer that copies only its rare training patients (and samples the rest fresh) is invisible
    table-wide but caught by the rare-record test."""
    train, holdout = real
    rt, rh = rare_records(train, holdout, ["age", "gender"], k=5)
    fresh = cohort_table(800, seed=77, key=None)
    syn = pd.concat([fresh.iloc[:800 - int(rt.sum())], train[rt]], ignore_index=True)
    x_t, x_h, x_s = encode([train, holdout, syn], list(train.columns))
    r = rare_record_membership(x_t, x_h, x_s, rt, rh)
    assert r["status"] == "measured" and r["auc"] > 0.9 and r["z"] > 5 and r["p_value"] < 1e-6
    x_t, x_h, x_f = encode([train, holdout, fresh], list(train.columns))
    ok = rare_record_membership(x_t, x_h, x_f, rt, rh)
    assert abs(ok["auc"] - 0.5) < 3 * ok["auc_se"]


# ------------------------------------------------------------------------------------------------
# the gate rules
# ------------------------------------------------------------------------------------------------
REF = {"exact_match_rate": {"mean": 0.01, "sd": 0.004}, "dcr_share": {"mean": 0.5, "sd": 0.04},
       "mia_auc": {"mean": 0.5, "sd": 0.02}, "dcr_ratio": {"mean": 1.0, "sd": 0.1},
       "rare_record_mia_auc": {"mean": 0.5, "sd": 0.05}}
GOOD = {"exact_match_rate": 0.0, "dcr_share": 0.52, "dcr_ratio": 0.97, "leak_clean": True, "mia_auc": 0.51,
        "rare_record_mia_status": "measured", "rare_record_mia_auc": 0.55, "rare_record_mia_se": 0.04,
        "reference": REF}
QPT = PrivacyThresholds(quasi_identifiers=["age", "gender"], anonymeter_attacks=0,
                        mia=MiaThresholds(attacks=[]))  # the battery's gate: tests/privacy/test_mia.py


def test_gate_is_relative_and_two_sided():
    checks = {c.name: c for c in privacy_checks(GOOD, QPT)}
    assert all(c.passed for c in checks.values())
    assert checks["dcr_share"].threshold == pytest.approx(0.6) and checks["dcr_share"].reference == REF["dcr_share"]
    assert checks["dcr_share.holdout_leak"].threshold == pytest.approx(0.4)
    assert checks["exact_match_rate"].threshold == pytest.approx(0.02)
    assert checks["mia_auc"].threshold == pytest.approx(0.55)
    assert checks["rare_record_mia_auc.lower_bound"].value == pytest.approx(0.45)
    assert failed(privacy_checks({**GOOD, "dcr_share": 0.62}, QPT)) == {"dcr_share"}
    assert failed(privacy_checks({**GOOD, "dcr_share": 0.35}, QPT)) == {"dcr_share.holdout_leak"}
    assert failed(privacy_checks({**GOOD, "exact_match_rate": 0.03}, QPT)) == {"exact_match_rate"}
    assert failed(privacy_checks({**GOOD, "rare_record_mia_auc": 0.65}, QPT)) == set()  # lower bound 0.55: not material
    assert failed(privacy_checks({**GOOD, "rare_record_mia_auc": 0.7}, QPT)) == {"rare_record_mia_auc.lower_bound"}
    # the cap: never looser than max_dcr_share / max_mia_auc, however noisy the reference
    wide = {**REF, "dcr_share": {"mean": 0.5, "sd": 0.2}, "mia_auc": {"mean": 0.5, "sd": 0.2}}
    checks = {c.name: c for c in privacy_checks({**GOOD, "reference": wide}, QPT)}
    assert checks["dcr_share"].threshold == QPT.max_dcr_share and checks["mia_auc"].threshold == QPT.max_mia_auc
    msg = next(c.describe() for c in privacy_checks({**GOOD, "dcr_share": 0.1}, QPT) if not c.passed)
    assert msg == ("privacy gate failed: dcr_share.holdout_leak 0.1 < min 0.4 (by 0.3; real data itself: 0.5 ± 0.04)")


def test_gate_without_reference_uses_the_caps():
    no_ref = {k: v for k, v in GOOD.items() if k != "reference"}
    checks = {c.name: c for c in privacy_checks(no_ref, QPT)}
    assert "dcr_share.holdout_leak" not in checks and checks["dcr_share"].threshold == QPT.max_dcr_share
    assert checks["exact_match_rate"].threshold == 0.0 and checks["exact_match_rate"].reference is None


def test_gate_rare_record_skipped_or_missing():
    skipped = {**GOOD, "rare_record_mia_status": "skipped", "rare_record_mia_auc": None, "rare_record_mia_se": None}
    assert "rare_record_mia_auc.lower_bound" not in {c.name for c in privacy_checks(skipped, QPT)}
    missing = {k: v for k, v in GOOD.items() if not k.startswith("rare_record")}
    assert failed(privacy_checks(missing, QPT)) == {"rare_record_mia_auc.lower_bound"}  # configured, not measured
    assert "rare_record_mia_auc.lower_bound" not in {c.name for c in privacy_checks(
        missing, PrivacyThresholds(mia=MiaThresholds(attacks=[])))}


def test_removed_rare_combination_excess_is_a_clear_error():
    with pytest.raises(ValueError, match="max_rare_combination_excess was removed.*max_rare_record_mia_auc"):
        PrivacyThresholds(max_rare_combination_excess=0.05)
