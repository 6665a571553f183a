"""EHR-aware transforms and the CART synthesizer: sparse labs keep their clinical meaning, counts their zeros,
integers stay integers, and synthesizer.seed reaches every draw."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from synthfactory.storage import Store
from synthfactory.synthesize import engine
from synthfactory.synthesize.cart import CartSynthesizer
from synthfactory.synthesize.transforms import MEASURED, ZERO, ClinicalSynthesizer, EhrTransformer
from synthfactory.testing.cohorts import cohort_table


def sparse_cohort(n: int = 800, seed: int = 0) -> pd.DataFrame:
    """HbA1c measured in almost every diabetic and in 2 % of the others (as in real extracts), higher in
    diabetics; an inpatient count that is zero for most patients."""
    df = cohort_table(n, seed=seed, key=None)
    rng = np.random.default_rng(seed + 1)
    diab = df["cond_e11_9"].to_numpy()
    measured = np.where(diab, rng.random(n) < 0.97, rng.random(n) < 0.02)
    df["hba1c"] = df["hba1c"].where(measured)
    df["n_enc_inpatient"] = np.where(rng.random(n) < 0.85, 0, rng.integers(1, 9, n)).astype("int64")
    return df


def test_transform_flags_gaps_and_fills_only_with_observed_values():
    df = sparse_cohort()
    tf = EhrTransformer(seed=3).fit(df)
    assert tf.plans["hba1c"].kind == "sparse" and tf.plans["n_enc_inpatient"].kind == "zero_inflated"
    x = tf.transform(df)
    assert x["hba1c" + MEASURED].tolist() == df["hba1c"].notna().tolist()
    assert x["hba1c"].notna().all()
    assert set(x["hba1c"]) <= set(df["hba1c"].dropna())          # hot-deck: observed values only, no spike
    assert x["n_enc_inpatient" + ZERO].tolist() == (df["n_enc_inpatient"] == 0).tolist()
    assert (x["n_enc_inpatient"] > 0).all()
    back = tf.inverse_transform(x)
    assert list(back.columns) == list(df.columns)
    pd.testing.assert_series_equal(back["hba1c"], df["hba1c"], check_dtype=False)
    assert back["n_enc_inpatient"].tolist() == df["n_enc_inpatient"].tolist()
    assert back["age"].dtype == np.int64


def test_state_round_trips_and_holds_no_rows():
    df = sparse_cohort()
    tf = EhrTransformer(seed=1).fit(df)
    state = tf.to_dict()
    text = repr(state)
    assert len(text) < 4000                                       # plans and ranges, not rows
    again = EhrTransformer.from_dict(state)
    x = tf.transform(df)
    pd.testing.assert_frame_equal(again.inverse_transform(x), tf.inverse_transform(x))


def test_inverse_clips_to_the_real_range_and_rounds_integers():
    df = sparse_cohort()
    tf = EhrTransformer().fit(df)
    x = tf.transform(df).head(5).copy()
    x["age"] = [-3.2, 200.0, 40.4, 40.6, 55.0]
    back = tf.inverse_transform(x)
    assert back["age"].tolist() == [df["age"].min(), df["age"].max(), 40, 41, 55]


def test_measured_keeps_its_clinical_meaning():
    """With the transforms and CART, "HbA1c measured" stays a diabetic's test and its values keep their
    distribution (a Gaussian copula keeps the marginals but not this binary-binary dependence: see
    bench/cohorts_bench.py)."""
    df = sparse_cohort(1000)
    synth, _ = engine.fit(df, "cart", {"min_leaf": 10}, engine.metadata_dict(df), transforms="ehr", seed=7)
    assert isinstance(synth, ClinicalSynthesizer)
    engine.reseed(synth, 7)
    out = engine.sample_plain(synth, 1000)
    assert list(out.columns) == list(df.columns)
    diab = out["cond_e11_9"].astype(bool)
    assert out.loc[diab, "hba1c"].notna().mean() > 0.8
    assert out.loc[~diab, "hba1c"].notna().mean() < 0.15
    real_q = df["hba1c"].dropna().quantile([0.1, 0.5, 0.9]).to_numpy()
    syn_q = out["hba1c"].dropna().quantile([0.1, 0.5, 0.9]).to_numpy()
    assert np.abs(syn_q - real_q).max() < 0.8                     # no mean spike (SDV alone: p10..p90 collapse)
    assert abs((out["n_enc_inpatient"] == 0).mean() - (df["n_enc_inpatient"] == 0).mean()) < 0.06


def test_gaussian_copula_with_transforms_has_no_mean_spike():
    df = sparse_cohort(1000)
    synth, _ = engine.fit(df, "gaussian_copula", {"default_distribution": "gaussian_kde"}, engine.metadata_dict(df),
                          transforms="ehr", seed=7)
    out = engine.sample_plain(synth, 1000)
    assert abs(out["hba1c"].notna().mean() - df["hba1c"].notna().mean()) < 0.05
    real_q = df["hba1c"].dropna().quantile([0.1, 0.9]).to_numpy()
    syn_q = out["hba1c"].dropna().quantile([0.1, 0.9]).to_numpy()
    assert syn_q[1] - syn_q[0] > 0.6 * (real_q[1] - real_q[0])   # the spread is there, not a spike at the mean


def test_cart_keeps_a_group_effect_and_reproduces_by_seed():
    df = cohort_table(1200, seed=2, key=None)
    df = df.fillna(df.mean(numeric_only=True))
    model = CartSynthesizer(min_leaf=10, seed=5).fit(df)
    a, b, c = model.sample(1200, seed=11), model.sample(1200, seed=11), model.sample(1200, seed=12)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    real = df.groupby("cond_e11_9")["hba1c"].mean()
    syn = a.groupby("cond_e11_9")["hba1c"].mean()
    ratio = (syn[True] - syn[False]) / (real[True] - real[False])
    assert 0.8 <= ratio <= 1.25


def test_cart_refuses_numeric_gaps_and_keeps_missing_categories():
    df = cohort_table(300, seed=1, key=None)
    df = df.fillna(df.mean(numeric_only=True))
    with pytest.raises(ValueError, match="EHR-aware transforms"):
        CartSynthesizer().fit(df.assign(hba1c=np.where(np.arange(300) % 2 == 0, np.nan, 6.0)))
    df["race"] = np.where(np.arange(300) % 5 == 0, None, "white")
    out = CartSynthesizer(seed=1).fit(df).sample(300)
    assert out["race"].isna().any() and set(out["race"].dropna()) == {"white"}


@pytest.mark.parametrize("kind", ["gaussian_copula", "cart"])
def test_seed_reaches_the_draw(kind, tmp_path):
    """The same model and seed give the same bytes; another seed gives another draw (SDV's sampler would
    otherwise always start from one fixed seed)."""
    df = sparse_cohort(400)
    synth, _ = engine.fit(df, kind, {}, engine.metadata_dict(df), transforms="ehr", seed=3)
    store = Store()
    uri = str(tmp_path / "m.pkl")
    engine.save(synth, uri, store)
    digests = []
    for seed in (1, 1, 2):
        model = engine.load(uri, store)
        engine.reseed(model, seed)
        out = tmp_path / f"s{seed}_{len(digests)}.parquet"
        engine.sample_to_parquet(model, 200, str(out), store)
        digests.append(pd.read_parquet(out).drop(columns=[engine.SYNTHETIC_ID]))
    pd.testing.assert_frame_equal(digests[0], digests[1])
    assert not digests[0].equals(digests[2])


def _acute_chronic(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """60 codes in an arbitrary order; half are acute (resolved, onset recent), half chronic (active, years
    before): what decides status and time is which group the code is in, as for conditions."""
    rng = np.random.default_rng(seed)
    codes = np.array([f"C{i:02d}" for i in rng.permutation(60)])
    acute = {c: i % 2 == 0 for i, c in enumerate(sorted(codes))}
    code = rng.choice(codes, size=n)
    is_acute = np.array([acute[c] for c in code])
    return pd.DataFrame({"code": code, "status": np.where(is_acute, "resolved", "active"),
                         "days_before": np.where(is_acute, rng.uniform(0, 365, n), rng.uniform(400, 5000, n))})


def test_a_derived_profile_lets_the_trees_group_many_codes():
    df = _acute_chronic()
    profile = df.groupby("code")["status"].transform(lambda s: (s == "resolved").mean()).rename("p_resolved")
    plain = CartSynthesizer(min_leaf=120, seed=1, visit_sequence=["code", "status", "days_before"]).fit(df)
    with_profile = CartSynthesizer(min_leaf=120, seed=1, visit_sequence=["code", "p_resolved", "status", "days_before"],
                                   derived={"p_resolved": "code"}).fit(df.assign(p_resolved=profile))

    def wrong(out: pd.DataFrame) -> float:  # status not the one of the code's group
        truth = df.drop_duplicates("code").set_index("code")["status"]
        return float((out["status"] != out["code"].map(truth)).mean())

    a, b = plain.sample(3000, seed=2), with_profile.sample(3000, seed=2)
    assert wrong(a) > 0.15  # thresholds on an arbitrary code order mix the groups at 120 rows per leaf
    assert wrong(b) < 0.03
    # the profile is computed from the drawn code, not drawn; a code the model never saw takes the pooled figure
    assert (b["p_resolved"] == b["code"].map(profile.groupby(df["code"]).first())).all()
    given = with_profile.sample_given(pd.DataFrame({"code": ["C00", "unseen"]}), seed=3)
    assert given["p_resolved"].iloc[1] == pytest.approx(float(profile.median()))
    with pytest.raises(ValueError, match="categorical column"):
        CartSynthesizer(visit_sequence=["days_before", "code"], derived={"days_before": "code"}).fit(df)


def test_no_smooth_keeps_the_lumps_of_a_count():
    rng = np.random.default_rng(4)
    n = 2000
    df = pd.DataFrame({"age": rng.uniform(20, 90, n), "n_meds": rng.choice([0, 2, 4, 6, 8], size=n).astype("int64")})
    smooth = CartSynthesizer(min_leaf=50, seed=1, visit_sequence=["age", "n_meds"]).fit(df).sample(n, seed=2)
    exact = CartSynthesizer(min_leaf=50, seed=1, visit_sequence=["age", "n_meds"], no_smooth=["n_meds"]).fit(df) \
        .sample(n, seed=2)
    assert (smooth["n_meds"] % 2 == 1).mean() > 0.05  # the kernel fills the odd counts no patient has
    assert set(exact["n_meds"]) <= {0, 2, 4, 6, 8}


def _heavy_tailed_counts(n: int = 3000, seed: int = 5) -> pd.DataFrame:
    """A zero-inflated count whose long tail belongs to a few patients: 75 % have none; of the others most have
    1-2 and a tenth 5-40 (2.5 % of all: fewer than a leaf holds)."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 90, n)
    has = rng.random(n) < 0.25
    heavy = has & (rng.random(n) < 0.1)
    count = np.where(heavy, rng.integers(5, 41, n), rng.integers(1, 3, n))
    return pd.DataFrame({"age": age, "n_procedure": np.where(has, count, 0).astype("int64")})


@pytest.mark.parametrize("seed", [1, 2])
def test_a_gated_count_is_fitted_on_the_patients_who_have_one(seed):
    df = _heavy_tailed_counts(seed=4 + seed)
    real = df["n_procedure"]
    params = {"min_leaf": 200, "no_smooth": ["n_procedure"]}
    gated, _ = engine.fit(df, "cart", {**params, "gate_missing": True}, engine.metadata_dict(df), transforms="ehr", seed=seed)
    plain, _ = engine.fit(df, "cart", dict(params), engine.metadata_dict(df), transforms="ehr", seed=seed)
    inner = gated.inner
    # the flag is drawn first and the count only where it is positive (its tree never saw a hot-deck fill-in)
    assert inner.gates == {"n_procedure": ("n_procedure" + ZERO, True)}
    order = [m.name for m in inner.models]
    assert order.index("n_procedure" + ZERO) < order.index("n_procedure")
    value = inner.models[order.index("n_procedure")]
    assert value.gate is not None
    # its leaves hold the positive patients' counts and nothing else (no hot-deck fill-in of a zero patient)
    donors = np.sort(np.concatenate(list(value.donors.values())))
    assert np.array_equal(donors, np.sort(real[real > 0].to_numpy().astype("float64")))
    plain_value = next(m for m in plain.inner.models if m.name == "n_procedure")
    seen = plain_value.marginal if plain_value.marginal is not None else np.concatenate(list(plain_value.donors.values()))
    assert seen.size == len(df)  # ungated: every row, the zero patients' fill-ins included
    g, p = gated.sample(len(df))["n_procedure"], plain.sample(len(df))["n_procedure"]

    def tail(s: pd.Series) -> float:  # share of patients with 5 or more
        return float((s >= 5).mean())

    assert set(g) <= set(real)  # real leaf values, never smoothed
    assert (g > 0).mean() == pytest.approx((real > 0).mean(), abs=0.03)
    assert tail(g) == pytest.approx(tail(real), rel=0.25)
    assert g.mean() == pytest.approx(real.mean(), rel=0.15)
    assert (p > 0).mean() == pytest.approx((real > 0).mean(), abs=0.03)


def test_gates_need_the_flag_and_leave_the_other_columns_alone():
    df = _heavy_tailed_counts()
    # a gate naming a flag the table does not have: the value is fitted on every row, as without gates
    synth = CartSynthesizer(min_leaf=60, seed=1, gates={"n_procedure": ("missing_flag", True)}).fit(df)
    assert all(m.gate is None for m in synth.models)
    out = synth.sample(500, seed=2)
    assert list(out.columns) == list(df.columns) and out["n_procedure"].between(0, 40).all()
