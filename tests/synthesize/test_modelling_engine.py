from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from synthfactory.spec import FeatureSpec, LabFeature
from synthfactory.storage import Store
from synthfactory.synthesize import engine
from synthfactory.spec import condition_column
from synthfactory.synthesize.modelling import KEY, ModellingError, build_modelling_table, split_train_holdout


def _tables(n: int = 60) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    keys = [f"k{i:03d}" for i in range(n)]
    patient = pd.DataFrame({
        KEY: keys,
        "gender": rng.choice(["female", "male"], n),
        "birth_date": pd.to_datetime("1930-01-01") + pd.to_timedelta(rng.integers(0, 30000, n), unit="D"),
        "deceased": [False] * (n - 1) + [True],
        "race": [None] * n,
    })
    patient.loc[0, "birth_date"] = pd.Timestamp("1901-05-05")  # 123 years old -> top-coded
    enc = pd.DataFrame({KEY: keys * 2, "class_code": ["AMB"] * n + ["IMP"] * n,
                        "start": pd.Timestamp("2025-01-01", tz="UTC"), "end": pd.Timestamp("2025-01-02", tz="UTC")})
    cond = pd.DataFrame({KEY: keys[:20] + keys[:5], "code": ["I10"] * 20 + ["E11.9"] * 5,
                         "onset": pd.Timestamp("2020-01-01", tz="UTC")})
    obs = pd.DataFrame({
        KEY: [keys[0], keys[0], keys[1]], "code": ["4548-4"] * 3, "value_num": [6.0, 7.5, 5.2],
        "effective": pd.to_datetime(["2024-01-01", "2025-01-01", "2024-06-01"], utc=True),
    })
    return {"patient": patient, "encounter": enc, "condition": cond, "observation": obs}


def test_modelling_table_features():
    spec = FeatureSpec(top_conditions=1, condition_codes=["E11.9"], labs=[LabFeature(name="hba1c", loinc="4548-4")],
                       reference_date="2026-01-01", min_patients=10)
    table, info = build_modelling_table(_tables(), spec)
    assert len(table) == 60 and table[KEY].is_unique
    assert table.loc[0, "age"] == 90  # top-coded (HIPAA Safe Harbor)
    assert table["age"].dtype == np.int64 and table["age"].max() <= 90
    assert "race" not in table.columns  # all null in the source: left out
    assert table["n_encounters"].eq(2).all()
    assert table["n_enc_inpatient"].eq(1).all()
    assert table[condition_column("I10")].sum() == 20 and table[condition_column("E11.9")].sum() == 5
    assert table.loc[0, "hba1c"] == 7.5  # last value by date
    assert table.loc[1, "hba1c"] == 5.2 and np.isnan(table.loc[2, "hba1c"])
    assert info["condition_flags"] == ["I10", "E11.9"] and info["labs"] == ["hba1c"]
    assert table["deceased"].sum() == 1


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(ModellingError, match="only 60 patients.*min_patients is 100"):
        build_modelling_table(_tables(), FeatureSpec(min_patients=100))


def test_split_is_seeded_disjoint_and_complete():
    df = pd.DataFrame({KEY: [f"k{i}" for i in range(100)], "x": range(100)})
    train, hold = split_train_holdout(df, 0.2, seed=3)
    assert len(hold) == 20 and len(train) == 80
    assert not set(train[KEY]) & set(hold[KEY])
    assert set(train[KEY]) | set(hold[KEY]) == set(df[KEY])
    t2, h2 = split_train_holdout(df, 0.2, seed=3)
    assert list(h2[KEY]) == list(hold[KEY])


def test_fit_save_load_sample_more_rows_than_real(tmp_path):
    rng = np.random.default_rng(1)
    n = 120
    train = pd.DataFrame({
        "gender": rng.choice(["female", "male"], n).astype(object),
        "age": rng.integers(20, 90, n).astype("int64"),
        "deceased": rng.random(n) < 0.1,
        "hba1c": np.where(rng.random(n) < 0.3, np.nan, rng.normal(6, 1, n)),
    })
    meta = engine.metadata_dict(train)
    assert meta["tables"]["patients"]["columns"]["deceased"]["sdtype"] == "boolean"
    synth, seconds = engine.fit(train, "gaussian_copula", {}, meta)
    assert seconds > 0
    store = Store()
    uri = str(tmp_path / "model" / "synthesizer.pkl")
    assert engine.save(synth, uri, store) > 0
    loaded = engine.load(uri, store)
    out = engine.sample(loaded, 250, batch_size=100)  # more than real, in 3 batches
    assert len(out) == 250 and out[engine.SYNTHETIC_ID].is_unique
    assert list(out.columns) == [engine.SYNTHETIC_ID, *train.columns]
    assert set(out["gender"].dropna()) <= {"female", "male"}
    assert out["age"].between(20, 89).all()
    assert 0.1 < out["hba1c"].isna().mean() < 0.5


def test_unknown_synthesizer_and_bad_params():
    meta = engine.metadata_dict(pd.DataFrame({"a": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="synthesizer.kind"):
        engine.make_synthesizer("nope", meta)
    with pytest.raises(ValueError, match="synthesizer.params"):
        engine.make_synthesizer("gaussian_copula", meta, {"no_such_param": 1})
