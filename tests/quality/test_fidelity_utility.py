"""Clinical relationships, correlation matrices and TSTR/TRTR utility (pure pandas / scikit-learn: fast)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from synthfactory.quality.fidelity import compare_relationships, correlation_matrices, relationship_groups
from synthfactory.testing.cohorts import RELATIONSHIPS, cohort_table, shift_column, shuffle_column
from synthfactory.quality.utility import ml_utility
from synthfactory.spec import QualityThresholds, Relationship, SpecError, parse_spec


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    return cohort_table(1500, seed=11, key=None)


@pytest.fixture(scope="module")
def good() -> pd.DataFrame:
    return cohort_table(1500, seed=12, key=None)


@pytest.fixture(scope="module")
def holdout() -> pd.DataFrame:
    return cohort_table(500, seed=13, key=None)


def by_name(results: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in results}


def test_good_synthetic_keeps_every_relationship(real, good):
    res = by_name(compare_relationships(real, good, RELATIONSHIPS))
    assert all(r["status"] == "passed" for r in res.values()), res
    hba1c = res["hba1c_by_diabetes"]
    assert [g["group"] for g in hba1c["groups"]] == ["False", "True"]
    true = hba1c["groups"][1]
    assert true["real"] == pytest.approx(real.loc[real.cond_e11_9, "hba1c"].mean())
    assert true["synthetic"] == pytest.approx(good.loc[good.cond_e11_9, "hba1c"].mean())
    assert true["real_rows"] == int(real.loc[real.cond_e11_9, "hba1c"].notna().sum())
    assert hba1c["max_error"] == pytest.approx(max(abs(g["diff"]) for g in hba1c["groups"]))
    # the noise allowance: 2 standard errors of the difference of the two group means
    r_vals = real.loc[real.cond_e11_9, "hba1c"].dropna()
    s_vals = good.loc[good.cond_e11_9, "hba1c"].dropna()
    se = np.sqrt(r_vals.var() / len(r_vals) + s_vals.var() / len(s_vals))
    assert true["noise_allowance"] == pytest.approx(2 * se)
    assert hba1c["max_excess"] == pytest.approx(max(max(0.0, abs(g["diff"]) - g["noise_allowance"])
                                                    for g in hba1c["groups"]))
    assert 0.8 < hba1c["effect_kept"] < 1.2
    bands = res["hypertension_by_age_band"]["groups"]
    assert [g["group"] for g in bands] == ["[0, 45)", "[45, 65)", "[65, 200)"]
    assert bands[2]["real"] > bands[0]["real"] + 0.2  # hypertension rises with age
    json.dumps(list(res.values()), allow_nan=False)


def test_shuffled_lab_breaks_its_relationship_only(real, good):
    res = by_name(compare_relationships(real, shuffle_column(good, "hba1c", seed=1), RELATIONSHIPS))
    broken = res["hba1c_by_diabetes"]
    assert broken["status"] == "failed" and not broken["passed"]
    assert broken["max_error"] > 1.0 > broken["tolerance"]  # diabetics lose ~1.9 %-points of HbA1c
    assert broken["max_excess"] > 1.0  # far beyond sampling noise
    assert broken["worst_group"] == "True" and broken["effect_kept"] < 0.2
    assert res["hypertension_by_age_band"]["passed"] and res["egfr_by_sex"]["passed"]


def test_small_groups_are_not_compared_or_reported(real, good):
    rel = {"name": "egfr_by_ckd", "measure": "egfr", "by": "cond_n18_32", "tolerance": 5.0, "min_group_rows": 10_000}
    (res,) = compare_relationships(real, good, [rel])
    assert res["status"] == "skipped" and res["passed"] and res["groups"] == [] and res["max_error"] is None
    assert res["suppressed_groups"] == 2
    rel["min_group_rows"] = int((real.cond_n18_32 & real.egfr.notna()).sum()) + 1  # only the non-CKD group
    (res,) = compare_relationships(real, good, [rel])
    assert [g["group"] for g in res["groups"]] == ["False"] and res["suppressed_groups"] == 1


def test_noise_allowance_spares_small_groups_only(real, good):
    # 40 real vs 40 synthetic patients: a 0.15 %-point gap in mean HbA1c is within sampling noise ...
    small_r = real[real.hba1c.notna()].iloc[:40].assign(grp="a")
    small_s = good[good.hba1c.notna()].iloc[:40].assign(grp="a")
    small_s = small_s.assign(hba1c=small_s.hba1c - small_s.hba1c.mean() + small_r.hba1c.mean() + 0.15)
    rel = {"name": "hba1c_overall", "measure": "hba1c", "by": "grp", "tolerance": 0.05}
    (res,) = compare_relationships(small_r, small_s, [rel])
    allowance = res["groups"][0]["noise_allowance"]
    assert allowance > 0.15 and res["max_error"] == pytest.approx(0.15) and res["max_excess"] == 0.0
    assert res["passed"]
    # ... but not without the allowance (noise_z 0), nor with 25 times the patients (a fifth of the noise)
    (raw,) = compare_relationships(small_r, small_s, [{**rel, "noise_z": 0}])
    assert raw["max_excess"] == pytest.approx(0.15) and not raw["passed"]
    (big,) = compare_relationships(pd.concat([small_r] * 25), pd.concat([small_s] * 25), [rel])
    assert big["groups"][0]["noise_allowance"] == pytest.approx(allowance / 5, rel=0.05)
    assert big["max_excess"] > 0.05 and not big["passed"]


def test_missing_column_or_group_fails(real, good):
    (res,) = compare_relationships(real, good.drop(columns=["hba1c"]), RELATIONSHIPS[:1])
    assert res["status"] == "failed" and res["max_error"] is None and "missing" in res["note"]
    no_diabetics = good.assign(cond_e11_9=False)
    (res,) = compare_relationships(real, no_diabetics, RELATIONSHIPS[:1])
    assert res["status"] == "failed" and res["max_error"] is None and "absent" in res["note"]


def test_relationship_groups_bins_and_missing():
    df = pd.DataFrame({"age": [10, 44.9, 45, 70, None, 250], "sex": ["f", None, "m", "m", "f", "f"]})
    assert list(relationship_groups(df, "age", [0, 45, 200])) == ["[0, 45)", "[0, 45)", "[45, 200)", "[45, 200)",
                                                                  np.nan, np.nan]
    assert list(relationship_groups(df, "sex", None))[:2] == ["f", None]


def test_spec_relationship_and_utility_fields():
    q = QualityThresholds(relationships=RELATIONSHIPS, utility={"target": "cond_e11_9"})
    assert isinstance(q.relationships[0], Relationship) and q.relationships[1].bins == [0, 45, 65, 200]
    assert q.min_utility_ratio == 0.8 and q.min_column_score is None and q.utility.max_train_rows == 25_000
    assert q.reference.quality_fraction == 0.95 and q.reference.min_values == 50  # relative to real data
    base = {"name": "x_spec", "source": {"uri": "/tmp/x"}, "release": {"bucket": "sandbox-bucket"}}
    for bad, where in [({"relationships": [{**RELATIONSHIPS[0], "tolerance": 0}]}, "quality.relationships.0.tolerance"),
                       ({"relationships": [{**RELATIONSHIPS[1], "bins": [65, 45]}]}, "quality.relationships.0.bins"),
                       ({"relationships": [RELATIONSHIPS[0], RELATIONSHIPS[0]]}, "duplicate name"),
                       ({"relationships": [{**RELATIONSHIPS[0], "colour": "red"}]}, "unknown field"),
                       ({"utility": {"target": "x", "min_ratio": 2}}, "quality.utility.min_ratio")]:
        with pytest.raises(SpecError, match=where.replace(".", r"\.")):
            parse_spec({**base, "quality": bad})
    # a profile overrides only what it sets: the relationships and the utility target stay
    spec = parse_spec({**base, "quality": {"relationships": RELATIONSHIPS, "utility": {"target": "cond_e11_9"}},
                       "profiles": {"lenient": {"quality": {"min_quality_score": 0.5}}}})
    q, _ = spec.thresholds("lenient")
    assert q.min_quality_score == 0.5 and len(q.relationships) == 3 and q.utility.target == "cond_e11_9"


def test_correlation_matrices(real, good):
    same = correlation_matrices(real, real)
    assert same["max_abs_diff"] == 0.0 and "gender" not in same["columns"] and "hba1c" in same["columns"]
    n = len(same["columns"])
    assert len(same["real"]) == n and len(same["real"][0]) == n
    good_c = correlation_matrices(real, good)
    broken = correlation_matrices(real, shuffle_column(good, "hba1c"))
    assert broken["max_abs_diff"] > 0.5 > good_c["max_abs_diff"]
    json.dumps(broken, allow_nan=False)


def test_utility_good_vs_broken_synthetic(real, good, holdout):
    u = ml_utility(real, holdout, good, target="cond_e11_9", seed=0)
    assert u["status"] == "measured" and u["task"] == "binary" and u["metric"] == "roc_auc"
    assert u["trtr"] > 0.85 and u["ratio"] > 0.9
    assert u["rows"] == {"train_real": 1500, "train_synthetic": 1500, "holdout": 500}
    # labels no longer tied to the labs: a model trained on it has no skill on real patients
    noise = ml_utility(real, holdout, shuffle_column(good, "cond_e11_9", seed=3), target="cond_e11_9", seed=0)
    assert noise["ratio"] < 0.75 and noise["tstr"] < u["tstr"]
    # a numeric target is scored with R²; named features only
    reg = ml_utility(real, holdout, good, target="glucose", features=["hba1c", "cond_e11_9", "age"], seed=0)
    assert reg["metric"] == "r2" and reg["features"] == ["hba1c", "cond_e11_9", "age"] and reg["ratio"] > 0.8
    json.dumps([u, noise, reg], allow_nan=False)


def test_utility_skips_when_the_holdout_cannot_score_it(real, good):
    tiny = cohort_table(40, seed=5, key=None)
    u = ml_utility(real, tiny, good, target="cond_e11_9", min_class_rows=10)
    assert u["status"] == "skipped" and u["ratio"] is None and "too few rows of a class" in u["note"]
    missing = ml_utility(real, tiny, good.drop(columns=["cond_e11_9"]), target="cond_e11_9")
    assert missing["status"] == "failed" and "missing" in missing["note"]
    one_class = ml_utility(real, cohort_table(600, seed=6, key=None), good.assign(cond_e11_9=False),
                           target="cond_e11_9")
    assert one_class["status"] == "measured" and one_class["tstr"] == 0.5  # a constant predictor


def test_shifted_distribution_drops_the_column_score(real, good):
    from synthfactory.quality.report import sdmetrics_quality
    from synthfactory.synthesize.engine import metadata_dict

    md = metadata_dict(real)["tables"]["patients"]
    shifted = sdmetrics_quality(real.iloc[:600], shift_column(good, "systolic_bp", 30).iloc[:600], md)
    cols = {c["column"]: c["score"] for c in shifted["columns"]}
    assert cols["systolic_bp"] < 0.4 < min(v for k, v in cols.items() if k != "systolic_bp")
    assert {"column_1", "column_2", "metric", "score", "real_correlation", "synthetic_correlation"} <= set(
        shifted["pairs"][0])


def test_measured_rate_sees_a_lab_given_to_the_wrong_patients(real, good):
    """HbA1c measured in diabetics only. A synthetic table that gives half the diabetics' values to other patients
    keeps the mean HbA1c among the measured diabetics (the mean check passes) but not who is measured."""
    def only_diabetics(df: pd.DataFrame) -> pd.DataFrame:
        return df.assign(hba1c=df["hba1c"].where(df["cond_e11_9"]))

    r, g = only_diabetics(real), only_diabetics(good)
    rng = np.random.default_rng(0)
    diab = np.flatnonzero(g["cond_e11_9"].to_numpy() & g["hba1c"].notna().to_numpy())
    others = np.flatnonzero(~g["cond_e11_9"].to_numpy())
    moved = rng.choice(diab, size=len(diab) // 2, replace=False)
    bad = g.copy()
    col = bad.columns.get_loc("hba1c")
    bad.iloc[rng.choice(others, size=len(moved), replace=False), col] = bad.iloc[moved, col].to_numpy()
    bad.iloc[moved, col] = np.nan
    mean = {"name": "hba1c_by_diabetes", "measure": "hba1c", "by": "cond_e11_9", "tolerance": 0.5}
    measured = {**mean, "name": "hba1c_measured_by_diabetes", "stat": "measured", "tolerance": 0.1}
    res = by_name(compare_relationships(r, g, [mean, measured]))
    assert res["hba1c_by_diabetes"]["passed"] and res["hba1c_measured_by_diabetes"]["passed"]
    groups = {x["group"]: x for x in res["hba1c_measured_by_diabetes"]["groups"]}
    assert groups["True"]["real"] > 0.7 and groups["False"]["real"] == 0.0
    res = by_name(compare_relationships(r, bad, [mean, measured]))
    assert res["hba1c_by_diabetes"]["passed"]  # the mean among the measured cannot see it
    broken = res["hba1c_measured_by_diabetes"]
    assert not broken["passed"] and broken["max_error"] > 0.3
    Relationship.model_validate(measured)
