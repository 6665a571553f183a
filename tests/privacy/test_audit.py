"""The re-identification audit: copiers fail, honest synthesizers pass, and every fast path gives the same
answer as the reference tool (SDMetrics, anonymeter) or as brute force."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from synthfactory.privacy.attacks import (
    _count,
    _space,
    evaluation_results,
    inference_risk,
    linkability_risk,
    render_query,
    singling_out_risk,
    success_rate,
)
from synthfactory.privacy.gower import GowerIndex, encode_gower, gower_nearest
from synthfactory.privacy.encoding import encode
from synthfactory.privacy.metrics import (
    auc_with_ci,
    dcr_baseline_protection,
    privacy_metrics,
    quasi_identifier_risk,
    sdmetrics_random_baseline,
)
from synthfactory.privacy.neighbors import nearest_neighbors
from synthfactory.testing.cohorts import cohort_table
from synthfactory.release.gate import anonymeter_rule, decide, expected_anonymeter_risks, privacy_checks
from synthfactory.spec import MiaThresholds, PrivacyThresholds, QualityThresholds, SpecError, parse_spec

QIS = ["age", "gender"]
SENSITIVE = ["cond_e11_9", "hba1c"]
# the membership-inference battery is tested in test_mia.py
PT = PrivacyThresholds(quasi_identifiers=QIS, sensitive_attributes=SENSITIVE, mia=MiaThresholds(attacks=[]))


# ------------------------------------------------------------------------------------------------
# synthesizers
# ------------------------------------------------------------------------------------------------
def copier(train: pd.DataFrame, n: int, seed: int = 3) -> pd.DataFrame:
    """Emits training rows."""
    rng = np.random.default_rng(seed)
    return train.iloc[rng.integers(0, len(train), n)].reset_index(drop=True)


def noisy_copier(train: pd.DataFrame, n: int, seed: int = 4) -> pd.DataFrame:
    """Training rows with tiny noise on every lab (no exact matches left)."""
    out = copier(train, n, seed)
    rng = np.random.default_rng(seed)
    for c in ("hba1c", "bmi", "systolic_bp", "ldl", "egfr", "glucose"):
        out[c] = out[c] + rng.normal(0, 0.02 * train[c].std(), n)
    return out


@pytest.fixture(scope="module")
def real():
    """train 1200 / holdout 300 rows of one population (the demo modelling table's columns)."""
    full = cohort_table(1500, seed=11, key=None)
    return full.iloc[:1200].reset_index(drop=True), full.iloc[1200:].reset_index(drop=True)


def audit_summary(train, holdout, syn, pt=PT, attacks=2000, sdmetrics=True):
    """The privacy stage's figures for the gate (what pipeline.privacy puts in XCom)."""
    from synthfactory.pipeline import _privacy_audit_figures

    m = privacy_metrics(train, holdout, syn, seed=0, quasi_identifiers=pt.quasi_identifiers,
                        sensitive_attributes=pt.sensitive_attributes, k_anonymity=pt.min_k_anonymity,
                        anonymeter_attacks=attacks, reference_resplits=pt.reference_resplits,
                        sdmetrics_baseline=sdmetrics)
    fig = _privacy_audit_figures(m, pt)
    fig.pop("gate_rules")
    return m, {"exact_match_rate": m["exact_match"]["exact_match_rate"], "dcr_share": m["dcr"]["dcr_share_adjusted"],
               "dcr_ratio": m["dcr"]["dcr_ratio"], "leak_clean": True, **fig}


def failed(summary, pt=PT):
    return sorted(c.name for c in privacy_checks(summary, pt) if not c.passed)


def test_copier_fails_the_audit(real):
    train, holdout = real
    m, s = audit_summary(train, holdout, copier(train, len(train)))
    assert s["exact_match_rate"] == 1.0 and s["dcr_share"] > 0.95 and s["mia_auc"] > 0.75
    assert {"exact_match_rate", "dcr_share", "dcr_ratio", "mia_auc"} <= set(failed(s))
    assert m["dcr"]["nndr_synth_median"] == 0.0 < m["dcr"]["nndr_holdout_median"]
    assert m["mia"]["members_at_zero_distance"] > 0.5 and m["mia"]["nonmembers_at_zero_distance"] == 0.0


def test_noisy_copier_fails_without_exact_matches(real):
    train, holdout = real
    _, s = audit_summary(train, holdout, noisy_copier(train, len(train)))
    assert s["exact_match_rate"] == 0.0
    assert {"dcr_share", "dcr_ratio", "mia_auc"} <= set(failed(s))


def test_independent_sample_passes_every_check(real):
    """An independent draw from the generating distribution is the ideal synthesizer."""
    train, holdout = real
    m, s = audit_summary(train, holdout, cohort_table(1200, seed=99, key=None))
    assert failed(s) == []
    assert abs(s["dcr_share"] - 0.5) < 0.1 and abs(s["mia_auc"] - 0.5) < 0.06
    assert set(s["anonymeter_risks"]) == {"singling_out", "linkability", "inference:cond_e11_9", "inference:hba1c"}
    assert all(r["n"] == 300 for k, r in s["anonymeter_risks"].items() if k != "singling_out")
    json.dumps(m, allow_nan=False)  # the report is plain JSON


def test_gaussian_copula_trained_on_enough_rows_passes(real):
    from synthfactory.synthesize import engine

    train, holdout = real
    meta = engine.metadata_dict(train)
    synth, _ = engine.fit(train, "gaussian_copula", {"default_distribution": "truncnorm"}, meta)
    syn = engine.sample(synth, len(train))
    syn = syn[[c for c in train.columns]]
    _, s = audit_summary(train, holdout, syn, attacks=500)
    assert s["exact_match_rate"] == 0.0
    assert failed(s) == [], s


# ------------------------------------------------------------------------------------------------
# k-anonymity and rare combinations
# ------------------------------------------------------------------------------------------------
def test_rare_combinations_and_k_anonymity():
    common = pd.DataFrame({"age": [40] * 30 + [50] * 30, "sex": ["f"] * 30 + ["m"] * 30})
    rare = pd.DataFrame({"age": [88, 91, 91, 23], "sex": ["m", "f", "f", None]})  # classes of 1, 2, 1
    train = pd.concat([common, rare], ignore_index=True)
    holdout = common.iloc[:20]
    leaky = pd.concat([common.iloc[:40], rare, rare], ignore_index=True)  # 48 rows, 8 in rare real classes
    r = quasi_identifier_risk(train, holdout, leaky, ["age", "sex"], k=5)
    assert r["rare_combination_rows"] == 8 and r["rare_combination_share"] == pytest.approx(8 / 48)
    assert r["unique_real_matches"] == 4  # (88, m) and (23, None) twice each
    assert r["synthetic_k_anonymity"] == 2 and r["train_k_anonymity"] == 1
    assert r["holdout_rare_combination_share"] == 0.0
    safe = pd.DataFrame({"age": [40] * 10 + [50] * 10 + [70] * 3, "sex": ["f"] * 10 + ["m"] * 10 + ["f"] * 3})
    s = quasi_identifier_risk(train, holdout, safe, ["age", "sex"], k=5)
    assert s["rare_combination_share"] == 0.0  # (70, f) is rare in the output but matches no real person
    assert s["synthetic_k_anonymity"] == 3 and s["synthetic_rare_share"] == pytest.approx(3 / 23)
    assert "rare_combination_excess" not in r  # replaced by the rare-record membership test


# ------------------------------------------------------------------------------------------------
# the gate's anonymeter rule
# ------------------------------------------------------------------------------------------------
def test_anonymeter_gate_rule_certifies_only_with_enough_evidence():
    pt = PrivacyThresholds(quasi_identifiers=QIS, sensitive_attributes=SENSITIVE, max_anonymeter_risk=0.1,
                           mia=MiaThresholds(attacks=[]))
    assert expected_anonymeter_risks(pt) == ["singling_out", "linkability", "inference:cond_e11_9",
                                             "inference:hba1c"]
    small_noisy = {"risk": 0.22, "ci_low": 0.0, "ci_high": 0.52, "error": 0.3, "n": 120}
    small_risky = {"risk": 0.6, "ci_low": 0.35, "ci_high": 0.85, "error": 0.25, "n": 120}
    big_clean = {"risk": 0.01, "ci_low": 0.0, "ci_high": 0.05, "error": 0.04, "n": 5000}
    big_risky = {"risk": 0.09, "ci_low": 0.05, "ci_high": 0.13, "error": 0.04, "n": 5000}
    assert anonymeter_rule(small_noisy, pt) == {"powered": False, "certified": False, "bound": "ci_low"}
    assert anonymeter_rule(big_clean, pt) == {"powered": True, "certified": True, "bound": "ci_high"}
    tiny = {"risk": 0.0, "ci_low": 0.0, "ci_high": 0.02, "error": 0.02, "n": 40}
    assert anonymeter_rule(tiny, pt)["certified"] is False  # fewer than anonymeter_min_attacks
    base = {"exact_match_rate": 0.0, "dcr_share": 0.5, "dcr_ratio": 1.0, "leak_clean": True, "mia_auc": 0.5,
            "rare_record_mia_auc": 0.5, "rare_record_mia_se": 0.05}

    def gate(risks, pt=pt):
        return failed({**base, "anonymeter_risks": risks}, pt)

    names = expected_anonymeter_risks(pt)
    assert gate({k: small_noisy for k in names}) == []  # too few records to certify, no evidence of risk
    assert gate({**{k: small_noisy for k in names}, "linkability": small_risky}) == ["anonymeter.linkability.ci_low"]
    assert gate({k: big_clean for k in names}) == []
    assert gate({**{k: big_clean for k in names}, "singling_out": big_risky}) == ["anonymeter.singling_out.ci_high"]
    assert gate({k: big_clean for k in names[:2]}) == ["anonymeter.inference:cond_e11_9.ci_low",
                                                       "anonymeter.inference:hba1c.ci_low"]  # missing -> refuse
    strict = pt.model_copy(update={"require_anonymeter_certification": True})
    assert gate({k: small_noisy for k in names}, strict) == sorted(f"anonymeter.{k}.certified" for k in names)
    assert gate({k: big_clean for k in names}, strict) == []
    off = pt.model_copy(update={"anonymeter_attacks": 0})
    assert expected_anonymeter_risks(off) == [] and gate({}, off) == []
    d = decide({"quality_score": 1.0, "expectation_success_ratio": 1.0, "min_column_score": 1.0,
                "column_pair_trends": 1.0}, {**base, "anonymeter_risks": {k: small_risky for k in names}},
               QualityThresholds(), pt, {})
    assert not d["approved"] and "anonymeter.linkability.ci_low 0.35 > max 0.1 (by 0.25)" in d["message"]


def test_spec_fields_validate():
    base = {"name": "x_spec", "source": {"uri": "x"}, "release": {"bucket": "abc"}}
    spec = parse_spec({**base, "privacy": {"quasi_identifiers": ["age"], "sensitive_attributes": ["hba1c"]},
                       "profiles": {"strict": {"privacy": {"require_anonymeter_certification": True}}}})
    _, pt = spec.thresholds("strict")
    assert pt.quasi_identifiers == ["age"] and pt.require_anonymeter_certification  # a profile keeps the columns
    with pytest.raises(SpecError, match="sensitive_attributes"):
        parse_spec({**base, "privacy": {"quasi_identifiers": ["age"], "sensitive_attributes": ["age"]}})
    with pytest.raises(SpecError, match="privacy.max_mia_auc"):
        parse_spec({**base, "privacy": {"max_mia_auc": 0.3}})
    with pytest.raises(ValueError, match="quasi_identifiers"):
        t = cohort_table(50, 1, key=None)
        privacy_metrics(t, t, t, quasi_identifiers=["zip_code"])


# ------------------------------------------------------------------------------------------------
# SDMetrics DCRBaselineProtection: same score on the fast search
# ------------------------------------------------------------------------------------------------
def test_dcr_baseline_protection_equals_sdmetrics():
    import warnings

    from sdmetrics.single_table import DCRBaselineProtection

    from synthfactory.synthesize.engine import metadata_dict

    real = cohort_table(150, seed=1, key=None)
    syn = cohort_table(120, seed=2, key=None)
    syn.loc[:4] = real.loc[:4].to_numpy()  # a few copies
    syn.loc[7, "bmi"] = 95.0  # outside the real range
    meta = metadata_dict(real)
    DCRBaselineProtection._seed = 5
    np.random.seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = DCRBaselineProtection.compute_breakdown(real, syn, meta, None)
    ours = dcr_baseline_protection(real, syn, meta, seed=5)
    assert ours["score"] == pytest.approx(theirs["score"], abs=1e-6)
    for k in ("synthetic_data", "random_data_baseline"):
        assert ours["median_DCR_to_real_data"][k] == pytest.approx(theirs["median_DCR_to_real_data"][k], abs=1e-6)
    DCRBaselineProtection._seed = 9
    np.random.seed(9)
    pd.testing.assert_frame_equal(sdmetrics_random_baseline(real, 40, 9),
                                  DCRBaselineProtection._generate_random_data(real, 40))
    DCRBaselineProtection._seed = None
    assert dcr_baseline_protection(real, real.iloc[:50], meta)["score"] == 0.0  # copies: distance 0


def test_gower_search_is_exact_and_matches_sdmetrics_distance():
    from sdmetrics.single_table.privacy.dcr_utils import calculate_dcr

    rng = np.random.default_rng(0)
    ref = cohort_table(300, seed=3, key=None)
    qry = cohort_table(120, seed=4, key=None)
    ref["site"] = rng.choice([f"s{i}" for i in range(40)] + [None], len(ref))  # wide categorical -> float codes
    qry["site"] = rng.choice([f"s{i}" for i in range(45)], len(qry))           # some unseen
    ref["const"] = 1.0
    qry["const"] = rng.choice([1.0, 2.0, np.nan], len(qry))
    qry.loc[:3] = ref.loc[:3].to_numpy()
    qry.loc[5, "age"] = 400  # far outside the reference range: the per-column cap applies
    cols = list(ref.columns)
    d, i = gower_nearest(qry, ref, cols)
    meta = {"columns": {c: {"sdtype": t} for c, t in
                        {c: ("boolean" if ref[c].dtype == bool else "numerical"
                             if pd.api.types.is_numeric_dtype(ref[c]) else "categorical") for c in cols}.items()}}
    np.testing.assert_allclose(d, calculate_dcr(qry, ref, meta).to_numpy(), atol=1e-6)
    assert (d[:4] == 0).all() and (i[:4] == np.arange(4)).all()
    # brute force over the packed encoding: the same neighbour (lowest index among ties)
    r, (q,), n_cols = encode_gower(ref, [qry], cols)
    popcount = np.vectorize(lambda v: bin(int(v)).count("1"))
    full = (np.minimum(np.abs(q.floats[:, None, :] - r.floats[None, :, :]), 1).sum(-1)
            + popcount(q.bits[:, None] ^ r.bits[None, :]) + 0.5 * popcount(q.onehot[:, None] ^ r.onehot[None, :]))
    assert (full.argmin(axis=1) == i).all()
    assert GowerIndex(r).groups < len(ref)


def test_gower_matches_anonymeter_distance():
    """anonymeter's own (pure-Python) gower_distance, brute force, on data without missing values."""
    from anonymeter.neighbors.mixed_types_kneighbors import gower_distance
    from anonymeter.preprocessing.transformations import mixed_types_transform

    syn = cohort_table(80, seed=5, key=None).fillna(0.0)
    tgt = cohort_table(15, seed=6, key=None).fillna(0.0)
    num = [c for c in syn.columns if pd.api.types.is_numeric_dtype(syn[c]) and syn[c].dtype != bool]
    cat = [c for c in syn.columns if c not in num]
    a, b = mixed_types_transform(syn, tgt, num_cols=num, cat_cols=cat)
    a, b = a[num + cat].to_numpy(dtype=float), b[num + cat].to_numpy(dtype=float)
    ref = np.array([[gower_distance.py_func(b[i], a[j], len(num)) for j in range(len(a))] for i in range(len(b))])
    d, idx = gower_nearest(tgt, syn, list(syn.columns), numeric_range="union")
    np.testing.assert_allclose(d * syn.shape[1], ref.min(axis=1), atol=1e-5)
    np.testing.assert_allclose(ref[np.arange(len(b)), idx], ref.min(axis=1), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# anonymeter method
# ------------------------------------------------------------------------------------------------
def test_wilson_and_risk_equal_anonymeter():
    from anonymeter.stats.confidence import EvaluationResults, success_rate as anon_rate

    for n, k in ((100, 0), (120, 90), (5000, 1234), (46, 6.8)):
        assert success_rate(n, k, 0.95) == pytest.approx(tuple(anon_rate(n, k, 0.95)), abs=1e-12)
    for args in ((120, 90, 88, 81), (5000, 900, 100, 850), (46, 6.8, 3.8, 7.0), (300, 12, 1, 3)):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            risk = EvaluationResults(*args, confidence_level=0.95).risk()
        ours = evaluation_results(*args, confidence_level=0.95)
        assert ours["risk"] == pytest.approx(risk.value, abs=1e-12)
        assert ours["ci"] == pytest.approx(list(risk.ci), abs=1e-12)


def test_singling_out_queries_count_like_pandas():
    df = cohort_table(300, seed=8, key=None)[QIS + SENSITIVE]
    df.loc[::7, "gender"] = None
    space = _space([df], list(df.columns))
    rng = np.random.default_rng(0)
    from synthfactory.privacy.attacks import _random_queries, _record_queries

    med = np.array([np.nanmedian(space.mats[0][:, j]) if k == "numerical" else np.nan
                    for j, k in enumerate(space.kinds)])
    queries = np.concatenate([_record_queries(space.mats[0], space.kinds, med, 60, 3, rng),
                              _random_queries(space.mats[0], space.kinds, 60, 3, rng)])
    ours = _count(space.mats[0], queries, 10**9)
    pandas = [len(df.query(render_query(q, space), engine="python")) for q in queries]
    assert ours.tolist() == pandas
    assert (_count(space.mats[0], queries, 2) == np.minimum(ours, 2)).all()


def test_attacks_see_a_leak_and_its_absence():
    """Linkability/inference against a copier vs an independent sample, with discriminating columns."""
    full = cohort_table(900, seed=21, key=None).fillna(0.0)
    train, control = full.iloc[:600].reset_index(drop=True), full.iloc[600:].reset_index(drop=True)
    leak = copier(train, 600)
    fresh = cohort_table(600, seed=22, key=None).fillna(0.0)
    aux = ["age", "gender", "bmi", "systolic_bp"]
    link_leak = linkability_risk(train, leak, control, (aux, ["ldl", "egfr", "glucose"]), n_attacks=300, seed=1)
    link_fresh = linkability_risk(train, fresh, control, (aux, ["ldl", "egfr", "glucose"]), n_attacks=300, seed=1)
    assert link_leak["ci"][0] > 0.3 and link_fresh["ci"][1] < 0.1
    inf_leak = inference_risk(train, leak, control, aux + ["ldl"], "hba1c", n_attacks=300, seed=2)
    inf_fresh = inference_risk(train, fresh, control, aux + ["ldl"], "hba1c", n_attacks=300, seed=2)
    assert inf_leak["ci"][0] > 0.2 and inf_fresh["ci"][0] < 0.1
    so = singling_out_risk(train, leak, control, ["age", "bmi", "ldl", "egfr"], n_attacks=200, seed=3)
    assert so["n_attacks"] > 50 and so["risk"] > 0.2
    assert so["population_rows"] == 300  # training records attacked at the control set's size
    same = singling_out_risk(train, leak, control, ["age", "bmi", "ldl", "egfr"], n_attacks=200, seed=3)
    assert same == so  # seeded


# ------------------------------------------------------------------------------------------------
# neighbours and AUC
# ------------------------------------------------------------------------------------------------
def test_two_nearest_neighbours_and_prefix_are_exact():
    rng = np.random.default_rng(1)
    q = rng.random((257, 6)).astype(np.float32)
    r = rng.random((1000, 6)).astype(np.float32)
    r[500] = q[3]
    dist, idx, pre = nearest_neighbors(q, r, k=2, chunk=64, ref_chunk=100, prefix=300)
    full = np.sqrt(((q[:, None, :].astype(np.float64) - r[None]) ** 2).sum(-1))
    srt = np.sort(full, axis=1)
    np.testing.assert_allclose(dist, srt[:, :2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pre[0], full[:, :300].min(axis=1), rtol=1e-5, atol=1e-6)
    assert dist[3, 0] == 0.0 and idx[3, 0] == 500


def test_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    m, n = rng.normal(0.3, 1, 400).round(1), rng.normal(0, 1, 300).round(1)  # rounded: ties
    res = auc_with_ci(m, n)
    assert res["auc"] == pytest.approx(roc_auc_score(np.r_[np.ones(400), np.zeros(300)], np.r_[m, n]))
    assert res["ci"][0] < res["auc"] < res["ci"][1] and res["se"] < 0.05
    x = encode([pd.DataFrame({"a": [0.0, 1.0]})], ["a"])[0]
    assert math.isfinite(x.sum())


def test_pruned_euclidean_search_equals_blas():
    from synthfactory.privacy.encoding import encode_with_layout
    from synthfactory.privacy.metrics import dcr
    from synthfactory.privacy.neighbors import nearest_encoded

    rng = np.random.default_rng(3)
    train = cohort_table(700, seed=31, key=None)
    syn = cohort_table(400, seed=32, key=None)
    train["race"] = rng.choice(["a", "b", "c", None], len(train))
    syn["race"] = rng.choice(["a", "b", "z"], len(syn))  # an unseen category encodes as all zeros
    syn["deceased"] = syn["deceased"].astype(object)
    syn.loc[12, "deceased"] = None                        # a value outside a two-valued column
    syn.loc[:9] = train.loc[:9].to_numpy()
    (xt, xs), layout = encode_with_layout([train, syn], list(train.columns))
    d1, i1 = nearest_encoded(xs, xt, layout, k=2)
    d2, i2, _ = nearest_neighbors(xs, xt, k=2)
    np.testing.assert_allclose(d1, d2, atol=1e-9)
    assert (i1[:, 0] == i2[:, 0]).all() and (d1[:10, 0] == 0).all()
    holdout = cohort_table(200, seed=33, key=None)
    cols = [c for c in holdout.columns]
    assert dcr(train, holdout, syn, cols) == dcr(train, holdout, syn, cols, pruned=False)


def test_singling_out_with_no_query_is_no_evidence_of_risk_not_a_failure_to_measure():
    """A large table on coarse columns (every row repeated many times, as at 2M patients on age and gender):
    no predicate singles out one synthetic record, so the attack has nothing to try. That is reported as 0
    attacks with the interval [0, 1]: the gate's rule for too few attacks (only significant evidence of risk
    refuses) passes it, and a gate that requires certification refuses it as not certified."""
    from synthfactory.pipeline import _privacy_audit_figures

    rng = np.random.default_rng(4)
    grid = pd.MultiIndex.from_product([["18-44", "45-64", "65+"], ["f", "m", "x"], ["a", "b", "c"]],
                                      names=["age_band", "gender", "site"]).to_frame(index=False)
    frame = pd.concat([grid] * 40, ignore_index=True)  # every combination, 40 times each
    # predicates on 2 of the 3 columns: each matches the 3 values of the third (never exactly one record)
    so = singling_out_risk(frame, frame.sample(frac=1.0, random_state=1), frame, ["age_band", "gender", "site"],
                           n_attacks=100, n_cols=2, seed=0, max_attempts=5000)
    assert so["n_attacks"] == 0 and so["no_query"] is True and so["attempts"] > 0
    assert (so["risk"], so["ci"]) == (0.0, [0.0, 1.0]) and "nothing to try" in so["note"]
    pt = PrivacyThresholds(quasi_identifiers=["age_band"], anonymeter_attacks=100)
    figures = _privacy_audit_figures({"mia": {"auc": 0.5, "auc_ci": [0.45, 0.55]},
                                      "dcr": {"nndr_synth_median": 0.9, "nndr_holdout_median": 0.9},
                                      "reference": {"skipped": "not here"},
                                      "anonymeter": {"risks": {"singling_out": so}}}, pt)
    s = figures["anonymeter_risks"]["singling_out"]
    assert (s["n"], s["ci_low"], s["ci_high"]) == (0, 0.0, 1.0)
    rule = anonymeter_rule(s, pt)
    assert rule == {"powered": False, "certified": False, "bound": "ci_low"}
    from synthfactory.release.gate import anonymeter_checks

    [check] = [c for c in anonymeter_checks(figures, pt) if c.name.startswith("anonymeter.singling_out")]
    assert check.passed and check.name == "anonymeter.singling_out.ci_low"
    strict = PrivacyThresholds(quasi_identifiers=["age_band"], anonymeter_attacks=100,
                               require_anonymeter_certification=True)
    assert not all(c.passed for c in anonymeter_checks(figures, strict))
    # a table that does yield queries is measured as before
    varied = pd.DataFrame({"age": rng.integers(18, 90, 600), "bmi": rng.normal(27, 5, 600).round(1)})
    so2 = singling_out_risk(varied, varied.iloc[:300], varied.iloc[300:], ["age", "bmi"], n_attacks=50, seed=0)
    assert so2["n_attacks"] > 0 and "no_query" not in so2
