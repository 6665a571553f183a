"""The membership-inference battery (privacy/mia.py) and its gate. Done-when (issue #18): a verbatim copy,
a noisy copy, a noisy holdout and an overfitted model are refused; an independent sample passes; the ROC
figures equal sklearn's; the shadow attack sees a memorising synthesizer and not an honest one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from synthfactory.pipeline import _privacy_audit_figures, mia_options
from synthfactory.privacy.metrics import privacy_metrics
from synthfactory.privacy.mia import _roc, mia_battery, roc_figures, shadow_attack, summarise_battery
from synthfactory.release.gate import mia_checks, mia_rule, privacy_checks
from synthfactory.spec import MiaThresholds, PrivacyThresholds, SpecError, parse_spec
from synthfactory.testing.cohorts import cohort_table

LABS = ("hba1c", "bmi", "systolic_bp", "ldl", "egfr", "glucose")
QIS = ["age", "gender"]
PT = PrivacyThresholds(quasi_identifiers=QIS, anonymeter_attacks=0, reference_resplits=8,
                       mia=MiaThresholds(attacks=["distance", "domias"]))  # the shadow attack: tested apart


@pytest.fixture(scope="module")
def real():
    """train 1000 / holdout 400 rows of one population (the demo modelling table's columns)."""
    full = cohort_table(1400, seed=31, key=None)
    return full.iloc[:1000].reset_index(drop=True), full.iloc[1000:].reset_index(drop=True)


def noisy(frame: pd.DataFrame, like: pd.DataFrame, seed: int, share: float = 0.01) -> pd.DataFrame:
    """``frame`` with noise (``share`` of the real sd) on every lab: no exact copies left."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    for c in LABS:
        out[c] = out[c] + rng.normal(0, share * like[c].std(), len(out))
    return out


def audit(train, holdout, syn, pt=PT, fit_sample=None, attacks=None):
    """The privacy stage's gate figures (pipeline.privacy's path; leak scan assumed clean) and its checks."""
    m = privacy_metrics(train, holdout, syn, seed=0, quasi_identifiers=pt.quasi_identifiers,
                        k_anonymity=pt.min_k_anonymity, anonymeter_attacks=0, sdmetrics_baseline=False,
                        reference_resplits=pt.reference_resplits, mia_attacks=attacks or pt.mia.attacks,
                        mia_options=mia_options(pt), fit_sample=fit_sample)
    fig = _privacy_audit_figures(m, pt)
    fig.pop("gate_rules")
    summary = {"exact_match_rate": m["exact_match"]["exact_match_rate"], "dcr_share": m["dcr"]["dcr_share_adjusted"],
               "dcr_ratio": m["dcr"]["dcr_ratio"], "leak_clean": True, **fig}
    return m, summary, privacy_checks(summary, pt)


def failed(checks) -> set[str]:
    return {c.name for c in checks if not c.passed}


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def test_roc_figures_equal_sklearn_and_cover_chance():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    m = np.round(rng.normal(0.5, 1, 700), 1)  # rounded: many ties
    n = np.round(rng.normal(0.0, 1, 900), 1)
    auc, tprs = _roc(m, n)
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    s = np.r_[m, n]
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    assert tprs == pytest.approx(np.interp([0.01, 0.1], fpr, tpr), abs=1e-12)
    rng = np.random.default_rng(1)  # one seeded draw (a 95 % interval misses chance in 5 % of draws)
    same = roc_figures(rng.normal(size=2000), rng.normal(size=2000), bootstrap=200)
    assert same["auc_ci"][0] < 0.5 < same["auc_ci"][1]
    assert same["tpr_at_fpr_01_ci"][0] <= 0.01 <= same["tpr_at_fpr_01_ci"][1]
    assert same["tpr_at_fpr_10_ci"][0] <= 0.10 <= same["tpr_at_fpr_10_ci"][1]
    sep = roc_figures(np.full(50, 1.0), np.zeros(50), bootstrap=50)
    assert sep["auc"] == 1.0 and sep["tpr_at_fpr_01"] == 1.0 and not sep["tpr_at_fpr_01_resolved"]


# ------------------------------------------------------------------------------------------------
# done-when: refused / approved
# ------------------------------------------------------------------------------------------------
def test_verbatim_copy_is_refused_by_the_battery(real):
    train, holdout = real
    _, summary, checks = audit(train, holdout, train.copy())
    mb = summary["mia_battery"]
    assert mb["attacks"]["distance"]["tpr_at_fpr_01"] == 1.0
    assert mb["attacks"]["domias"]["auc_ci"][0] > 0.6
    assert {"mia.max_auc.ci_low", "mia.max_tpr_at_fpr_01.ci_low"} <= failed(checks)
    assert summary["mia_certified"] is False
    # each attack beside its real-data reference (fresh real rows scored as the synthetic table)
    assert 0.4 < mb["attacks"]["domias"]["auc_reference"]["mean"] < 0.6


def test_noisy_copy_is_refused_by_the_battery(real):
    train, holdout = real
    _, summary, checks = audit(train, holdout, noisy(train, train, 3, share=0.05))
    assert summary["mia_max_auc"] > 0.9 and summary["mia_max_tpr_at_fpr_01"] > 0.5
    assert {"mia.max_auc.ci_low", "mia.max_tpr_at_fpr_01.ci_low"} <= failed(checks)


def test_noisy_holdout_is_refused_as_a_leak_not_as_membership(real):
    """Rows of the holdout (never trained on) with noise: the two-sided DCR check refuses; the attacks, which
    look for members, see non-members closer than members (AUC far below 0.5) and do not."""
    train, holdout = real
    syn = noisy(pd.concat([holdout] * 3, ignore_index=True), train, 5)
    _, summary, checks = audit(train, holdout, syn)
    assert "dcr_share.holdout_leak" in failed(checks)
    assert summary["mia_battery"]["attacks"]["distance"]["auc"] < 0.2
    assert not {c for c in failed(checks) if c.startswith("mia.")}


def test_independent_sample_passes_the_battery_and_is_certified(real):
    train, holdout = real
    syn = cohort_table(1000, seed=77, key=None)
    pt = PT.model_copy(update={"mia": PT.mia.model_copy(update={"max_tpr_at_fpr_10": 0.3})})
    _, summary, checks = audit(train, holdout, syn, pt=pt)
    assert not failed(checks), failed(checks)
    for name in ("distance", "domias"):
        a = summary["mia_battery"]["attacks"][name]
        assert a["auc_ci"][0] < 0.5 < a["auc_ci"][1] + 0.02
    assert summary["mia_certified"] is True


def _fit_sample(kind: str, params: dict, train: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    from synthfactory.privacy.mia import spec_fit_sample
    from synthfactory.synthesize import engine

    return spec_fit_sample(kind, params, engine.metadata_dict(train), transforms="ehr")(train, n, seed)


def test_overfitted_model_is_refused_and_a_well_fitted_one_passes():
    """A synthesizer that memorises: CART grown to single-row leaves without smoothing on 200 rows reproduces
    its training patients. The battery refuses it; the same kind with its defaults passes. (Neural
    overfitting, CTGAN for hundreds of epochs on 200 rows, is measured in bench/mia_bench.py: too slow for a
    test on CPU.)"""
    full = cohort_table(1000, seed=41, key=None)
    train, holdout = full.iloc[:200].reset_index(drop=True), full.iloc[200:].reset_index(drop=True)
    over = _fit_sample("cart", {"min_leaf": 1, "smooth": False}, train, 1000)
    _, summary, checks = audit(train, holdout, over)
    assert {"mia.max_auc.ci_low", "mia.max_tpr_at_fpr_01.ci_low"} <= failed(checks), summary["mia_battery"]
    good = _fit_sample("cart", {}, train, 1000)
    _, summary, checks = audit(train, holdout, good)
    assert not {c for c in failed(checks) if c.startswith("mia.")}, summary["mia_battery"]


# ------------------------------------------------------------------------------------------------
# the shadow-model attack
# ------------------------------------------------------------------------------------------------
def _memoriser(train: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A 'synthesizer' that emits its training rows with 5 % lab noise."""
    rng = np.random.default_rng(seed)
    return noisy(train.iloc[rng.integers(0, len(train), n)].reset_index(drop=True), train, seed, share=0.05)


def _honest(train: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A 'synthesizer' that ignores its training rows: fresh draws from the population."""
    return cohort_table(n, seed=10_000 + seed, key=None)


def test_shadow_attack_sees_a_memoriser_and_not_an_honest_model(real):
    train, holdout = real
    kw = dict(shadow_models=6, shadow_targets=30, shadow_rows=500, bootstrap=100)
    cols = list(train.columns)
    mem = shadow_attack(train, holdout, _memoriser(train, 1000, 99), cols, _memoriser, **kw)
    assert mem["status"] == "measured" and mem["targets_per_side"] == 30 and mem["shadow_models"] == 6
    # a draw of n rows from n copies ~63 % of them: the rest are indistinguishable, so AUC ~0.8, not 1
    assert mem["shadow_validation_auc"] > 0.7 and mem["auc"] > 0.7 and mem["auc_ci"][0] > 0.6
    honest = shadow_attack(train, holdout, _honest(train, 1000, 99), cols, _honest, **kw)
    assert honest["auc_ci"][0] < 0.6 and honest["shadow_validation_auc"] < 0.7
    # too few rows or models: skipped with its reason, never a silent pass
    tiny = shadow_attack(train.iloc[:12], holdout.iloc[:6], train.iloc[:12], cols, _honest, **kw)
    assert tiny["status"] == "skipped" and "targets" in tiny["reason"]


def test_battery_runs_the_shadow_attack_through_a_fit_sample(real):
    train, holdout = real
    b = mia_battery(train, holdout, _memoriser(train, 1000, 1), list(train.columns), fit_sample=_memoriser,
                    shadow_models=4, shadow_targets=20, shadow_rows=300, bootstrap=50)
    assert set(b["attacks"]) == {"distance", "domias", "shadow"}
    assert all(a["status"] == "measured" for a in b["attacks"].values())
    assert b["max"]["auc"] > 0.75 and b["max"]["auc_attack"] in b["attacks"]
    s = summarise_battery(b)
    assert s["attacks"]["shadow"]["auc_reference"] == {"mean": 0.5, "sd": None}
    assert "shadow" in set(mia_battery(train, holdout, train, list(train.columns))["attacks"])
    assert mia_battery(train, holdout, train, list(train.columns))["attacks"]["shadow"]["status"] == "skipped"


# ------------------------------------------------------------------------------------------------
# gate rule and spec
# ------------------------------------------------------------------------------------------------
def _attack(auc, ci, tpr=0.01, tci=(0.0, 0.03)):
    return {"status": "measured", "auc": auc, "auc_ci": list(ci), "tpr_at_fpr_01": tpr, "tpr_at_fpr_01_ci": list(tci),
            "tpr_at_fpr_10": 0.1, "tpr_at_fpr_10_ci": [0.05, 0.15]}


def test_gate_uses_the_largest_lower_bound_and_certifies_only_narrow_intervals():
    pt = PrivacyThresholds(mia=MiaThresholds(attacks=["distance", "shadow"]))
    narrow = {"attacks": {"distance": _attack(0.51, (0.49, 0.53)), "shadow": _attack(0.52, (0.45, 0.58))}}
    wide = {"attacks": {"distance": _attack(0.51, (0.49, 0.53)), "shadow": _attack(0.6, (0.4, 0.8))}}
    risky = {"attacks": {"distance": _attack(0.51, (0.49, 0.53)), "shadow": _attack(0.8, (0.7, 0.9))}}

    def run(attacks, pt=pt):
        b = {"attacks": attacks}
        from synthfactory.privacy.mia import _maximum

        b = {**b, **{f"max_{k}": v for k, v in _maximum(attacks).items()}}
        return mia_rule(b, pt), {c.name: c for c in mia_checks({"mia_battery": b}, pt)}

    rule, checks = run(narrow["attacks"])
    assert rule["certified"] and all(c.passed for c in checks.values())
    rule, checks = run(wide["attacks"])
    assert not rule["certified"] and rule["uncertain"] == ["shadow.auc"] and all(c.passed for c in checks.values())
    strict = pt.model_copy(update={"mia": pt.mia.model_copy(update={"require_certification": True})})
    assert not run(wide["attacks"], strict)[1]["mia.certified"].passed
    rule, checks = run(risky["attacks"])
    assert not checks["mia.max_auc.ci_low"].passed and checks["mia.max_auc.ci_low"].value == 0.7
    # an expected attack missing from the summary fails; one skipped for a stated reason does not
    rule, checks = run({"distance": _attack(0.51, (0.49, 0.53))})
    assert "mia.shadow" in checks and not checks["mia.shadow"].passed
    rule, checks = run({**narrow["attacks"], "shadow": {"status": "skipped", "reason": "too few rows"}})
    assert all(c.passed for c in checks.values()) and rule["skipped"] == ["shadow"] and not rule["certified"]
    # a TPR at 1 % FPR over fewer than 100 non-members is not a measurement: not gated, never certified
    few = {**_attack(0.52, (0.45, 0.58), tpr=0.28, tci=(0.17, 0.44)), "tpr_at_fpr_01_resolved": False}
    rule, checks = run({"distance": _attack(0.51, (0.49, 0.53)), "shadow": few})
    assert checks["mia.max_tpr_at_fpr_01.ci_low"].passed and checks["mia.max_tpr_at_fpr_01.ci_low"].value == 0.0
    assert "shadow.tpr_at_fpr_01" in rule["uncertain"] and not rule["certified"]
    assert roc_figures(np.ones(40), np.zeros(40), bootstrap=0)["tpr_at_fpr_01_resolved"] is False
    # no battery at all in the summary: refused; no attacks configured: no check
    assert not mia_checks({}, pt)[0].passed
    assert mia_checks({}, PrivacyThresholds(mia=MiaThresholds(attacks=[]))) == []


def test_spec_mia_fields_validate():
    base = {"name": "ds", "source": {"uri": "/tmp/x"}, "staging": {"uri": "/tmp/stage"},
            "release": {"bucket": "sandbox"}}
    spec = parse_spec({**base, "privacy": {"mia": {"attacks": ["distance", "domias"], "max_auc": 0.55,
                                                   "shadow_models": 4}}})
    assert spec.privacy.mia.attacks == ["distance", "domias"] and not spec.privacy.mia.shadow
    assert PrivacyThresholds().mia.attacks == ["distance", "domias", "shadow"]
    with pytest.raises(SpecError, match="attacks"):
        parse_spec({**base, "privacy": {"mia": {"attacks": ["lira"]}}})
    with pytest.raises(SpecError, match="shadow_models"):
        parse_spec({**base, "privacy": {"mia": {"shadow_models": 1}}})


def test_privacy_stage_is_routed_to_the_gpu_queue_only_for_neural_shadow_training():
    from synthfactory.airflow.routing import stage_gpu_routed

    base = {"name": "ds", "source": {"uri": "/tmp/x"}, "staging": {"uri": "/tmp/stage"},
            "release": {"bucket": "sandbox"}}
    neural = parse_spec({**base, "synthesizer": {"kind": "ctgan"}})
    assert stage_gpu_routed(neural, "fit") and stage_gpu_routed(neural, "privacy")
    no_shadow = parse_spec({**base, "synthesizer": {"kind": "ctgan"}, "privacy": {"mia": {"attacks": ["domias"]}}})
    assert not stage_gpu_routed(no_shadow, "privacy")
    assert not stage_gpu_routed(parse_spec({**base, "synthesizer": {"kind": "cart"}}), "privacy")


def test_kde_and_knn_blocks_bounded_by_reference_size_same_result(monkeypatch):
    """Dense blocks hold at most MAX_BLOCK_ELEMENTS distances whatever the reference size (memory at 200k
    patients), and the figures do not depend on the block size."""
    import synthfactory.privacy.mia as mia_mod

    rng = np.random.default_rng(3)
    q, p = rng.normal(size=(300, 6)), rng.normal(size=(900, 6))
    full_kde, full_knn = mia_mod._log_kde(q, p, 0.7), mia_mod._knn(q, p, 3)
    monkeypatch.setattr(mia_mod, "MAX_BLOCK_ELEMENTS", 900 * 7)
    assert mia_mod._rows_per_block(2048, 900) == 7
    np.testing.assert_allclose(mia_mod._log_kde(q, p, 0.7), full_kde, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mia_mod._knn(q, p, 3), full_knn, rtol=1e-12, atol=1e-12)


def test_exposed_targets_ranked_in_a_bounded_pool_rare_first_radius_exact():
    """Beyond EXPOSURE_POOL real rows the most exposed targets are ranked within a random pool (rare rows
    always in it), and each target's nearest-other distance is still measured over every real row."""
    from synthfactory.privacy.mia import _exposed, _knn

    rng = np.random.default_rng(5)
    x_tr, x_ho = rng.normal(size=(600, 4)), rng.normal(size=(300, 4))
    x_tr[17] += 40.0  # an outlier: ranked first by both
    rare_tr = np.zeros(600, bool)
    rare_tr[[3, 250]] = True
    rare_ho = np.zeros(300, bool)
    full = _exposed(x_tr, x_ho, None, 5, rare_tr, rare_ho)
    assert full[4] == 900 and set(full[0][:2]) == {3, 250}
    pooled = _exposed(x_tr, x_ho, None, 5, rare_tr, rare_ho, pool=200)
    assert pooled[4] == 200
    assert set(pooled[0][:2]) == {3, 250}  # rare rows are always in the pool and ranked first
    everyone = np.concatenate([x_tr, x_ho])
    np.testing.assert_allclose(pooled[2], _knn(x_tr[pooled[0]], everyone, 2)[:, 1], rtol=1e-6)
    np.testing.assert_allclose(pooled[3], _knn(x_ho[pooled[1]], everyone, 2)[:, 1], rtol=1e-6)
    pooled_out = _exposed(x_tr, x_ho, None, 5, None, None, pool=200)
    full_out = _exposed(x_tr, x_ho, None, 5, None, None)
    assert full_out[0][0] == 17 and (17 not in pooled_out[0] or pooled_out[0][0] == 17)
