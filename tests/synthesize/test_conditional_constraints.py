"""Rebalancing, oversampling, constraints, PII columns, differential privacy and bounded-memory sampling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from synthfactory.spec import ConstraintSpec
from synthfactory.storage import Store
from synthfactory.synthesize import engine
from synthfactory.synthesize.conditional import ConditionalError, conditional_sampler, plan_target
from synthfactory.synthesize.constraints import (ConstraintError, bounded_sampler, bounds_for, sdv_constraints)


@pytest.fixture(scope="module")
def copula(small_table):
    synth, _ = engine.fit(small_table, "gaussian_copula", {"default_distribution": "norm"},
                          engine.metadata_dict(small_table))
    return synth


def test_target_distributions():
    s = pd.Series([True] * 10 + [False] * 90, name="cond_e11_9")
    over = plan_target(s, oversample={"column": "cond_e11_9", "value": "true", "factor": 3})
    assert over.target == pytest.approx({True: 0.3, False: 0.7})
    assert sum(over.counts(101).values()) == 101 and over.counts(100) == {True: 30, False: 70}
    g = pd.Series(["female"] * 70 + ["male"] * 30, name="gender")
    re = plan_target(g, rebalance={"column": "gender", "proportions": {"female": 1, "male": 1}})
    assert re.target == {"female": 0.5, "male": 0.5} and re.counts(7) in ({"female": 4, "male": 3},
                                                                          {"female": 3, "male": 4})
    with pytest.raises(ConditionalError, match="value 'other' does not occur"):
        plan_target(g, rebalance={"column": "gender", "proportions": {"other": 1}})
    with pytest.raises(ConditionalError, match="categorical or boolean"):
        plan_target(pd.Series(np.linspace(0, 1, 50), name="hba1c"), oversample={"column": "hba1c", "value": 1,
                                                                                 "factor": 2})


def test_rebalance_and_oversample_hit_their_targets(copula, small_table):
    target = plan_target(small_table["gender"], rebalance={"column": "gender",
                                                           "proportions": {"female": 0.5, "male": 0.5}})
    out = engine.sample(copula, 301, batch_size=150, sampler=conditional_sampler(target))
    target.record(out)
    assert len(out) == 301 and abs(out["gender"].eq("female").sum() - 150.5) <= 1  # real share was 0.7
    assert target.report()["achieved"]["female"] == pytest.approx(0.5, abs=0.01)
    rare = plan_target(small_table["cond_e11_9"], oversample={"column": "cond_e11_9", "value": True, "factor": 3})
    out = engine.sample(copula, 200, sampler=conditional_sampler(rare))
    real_share = small_table["cond_e11_9"].mean()
    assert out["cond_e11_9"].mean() == pytest.approx(min(1, 3 * real_share), abs=0.01)


def test_sdv_constraints_and_bounds(small_table):
    df = small_table.assign(age_dx=small_table["age"] - 5)
    specs = [ConstraintSpec(type="inequality", low="age_dx", high="age"),
             ConstraintSpec(type="bounds", column="hba1c", min=5.0, max=7.0, action="reject"),
             ConstraintSpec(type="bounds", column="age_dx", min=20, action="clip")]
    cons = sdv_constraints(specs, df, "patients")
    assert [type(c).__name__ for c in cons] == ["Inequality"]
    synth, _ = engine.fit(df, "gaussian_copula", {"default_distribution": "norm"}, engine.metadata_dict(df),
                          constraints=cons)
    counts: dict[str, int] = {}
    sampler = bounded_sampler(lambda s, n: engine.sample_plain(s, n), bounds_for(specs, "patients"), counts)
    out = engine.sample(synth, 300, sampler=sampler)
    assert len(out) == 300 and (out["age_dx"] <= out["age"]).all()
    assert out["hba1c"].between(5.0, 7.0).all() and out["age_dx"].min() >= 20
    assert counts["bounds_hba1c_reject"] > 0 and "bounds_age_dx_clip" in counts  # recorded for the report
    with pytest.raises(ConstraintError, match="broken by 100 real row"):
        sdv_constraints([ConstraintSpec(type="inequality", low="age", high="age_dx")], df, "patients")
    with pytest.raises(ConstraintError, match="unknown column"):
        sdv_constraints([ConstraintSpec(type="fixed_combinations", columns=["gender", "nope"])], df, "patients")


def test_pii_columns_get_synthetic_values_never_copies(small_table):
    rng = np.random.default_rng(0)
    df = small_table.assign(phone=[f"555-01{i:02d}" for i in rng.permutation(100)])
    meta = engine.metadata_dict(df, overrides={"phone": {"sdtype": "phone_number", "pii": True}})
    synth, _ = engine.fit(df, "gaussian_copula", {"default_distribution": "norm"}, meta)
    out = engine.sample(synth, 200)
    assert out["phone"].notna().all() and not set(out["phone"]) & set(df["phone"])


def test_dp_mst_records_epsilon_delta_and_rebalances_by_reject_sampling(small_table):
    synth, _ = engine.fit(small_table[["gender", "age", "hba1c"]], "dp_mst", {"epsilon": 2.0, "bins": 5},
                          engine.metadata_dict(small_table[["gender", "age", "hba1c"]]))
    p = synth.privacy
    assert p["mechanism"] == "mst" and p["epsilon"] == 2.0 and 0 < p["delta"] < 1e-2
    assert p["dp_bounds"] == ["hba1c"] and p["epsilon_bounds"] == pytest.approx(0.5)  # no public bounds: DP (25 %)
    assert p["public_bounds"] == ["age"] and p["epsilon_marginals"] == pytest.approx(1.5)
    target = plan_target(small_table["gender"], rebalance={"column": "gender", "proportions": {"male": 1}})
    out = engine.sample(synth, 40, sampler=conditional_sampler(target))
    assert (out["gender"] == "male").all() and out["age"].dtype == np.int64 and out["age"].between(0, 90).all()


def test_sample_to_parquet_streams_row_groups_with_unique_ids(copula, tmp_path):
    uri = str(tmp_path / "synthetic" / "patients.parquet")
    info = engine.sample_to_parquet(copula, 2500, uri, Store(), batch_size=1000)
    pf = pq.ParquetFile(uri)
    assert info["rows"] == 2500 and pf.metadata.num_rows == 2500 and pf.metadata.num_row_groups == 3
    ids = pq.read_table(uri, columns=[engine.SYNTHETIC_ID]).column(0).to_pylist()
    assert ids[0] == "syn-0000001" and ids[-1] == "syn-0002500" and len(set(ids)) == 2500
    assert not (tmp_path / "synthetic" / "patients.parquet.partial").exists()
