"""Tests for synthfactory.quality: GX suite derivation/validation and the SDMetrics report."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from synthfactory.quality import (
    derive_suite,
    evaluate_quality,
    infer_sdtypes,
    run_suite,
    sdmetrics_quality,
)

N_ROWS = 400
EXCLUDE = ["patient_key"]


def make_table(n: int, seed: int) -> pd.DataFrame:
    """A realistic patient-level modelling table with correlated columns."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 91, n).astype("int64")
    n_conditions = rng.binomial(10, np.clip((age - 10) / 100, 0.05, 0.9)).astype("int64")
    n_encounters = np.clip(3 * n_conditions + rng.poisson(2, n), 0, 40).astype("int64")
    deceased = rng.random(n) < np.clip((age - 40) / 120, 0.01, 0.5)
    has_i10 = rng.random(n) < np.clip((age - 20) / 90, 0.05, 0.8)
    hba1c = np.clip(rng.normal(5.2 + 0.02 * age, 0.9, n), 4.0, 12.0)
    hba1c[rng.random(n) < 0.3] = np.nan
    first_seen = pd.Timestamp("2010-01-01") + pd.to_timedelta(rng.integers(0, 3650, n), unit="D")
    return pd.DataFrame(
        {
            "patient_key": [f"pk-{seed}-{i:05d}" for i in range(n)],
            "gender": pd.Series(
                rng.choice(["female", "male", None], n, p=[0.5, 0.48, 0.02]), dtype=object
            ),
            "race": pd.Series(
                rng.choice(["white", "black", "asian", "other", None], n,
                           p=[0.6, 0.18, 0.1, 0.07, 0.05]),
                dtype=object,
            ),  # fmt: skip
            "age": age,
            "deceased": deceased,
            "n_encounters": n_encounters,
            "n_conditions": n_conditions,
            "has_i10": has_i10,
            "hba1c": hba1c,
            "first_seen": first_seen,
        }
    )


def break_table(df: pd.DataFrame) -> pd.DataFrame:
    """Shifted range, a new category, a wrong dtype, many nulls and a missing column."""
    bad = df.drop(columns=["has_i10"]).copy()
    bad["age"] = bad["age"] + 40  # shifted range
    bad.loc[bad.index[:40], "gender"] = "unknown"  # new category
    bad["n_encounters"] = bad["n_encounters"].astype(str)  # wrong dtype
    bad.loc[bad.sample(frac=0.6, random_state=0).index, "race"] = None  # many nulls
    return bad


def failures(result: dict) -> set[tuple[str, str | None]]:
    return {(f["expectation"], f["column"]) for f in result["failed"]}


def by_type(suite: dict, exp_type: str) -> dict[str | None, dict]:
    return {
        e["kwargs"].get("column"): e["kwargs"] for e in suite["expectations"] if e["type"] == exp_type
    }


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    return make_table(N_ROWS, seed=1)


@pytest.fixture(scope="module")
def good(real) -> pd.DataFrame:
    return make_table(N_ROWS, seed=2)


@pytest.fixture(scope="module")
def broken(good) -> pd.DataFrame:
    return break_table(good)


@pytest.fixture(scope="module")
def suite(real) -> dict:
    return derive_suite(real, name="patients_v1", exclude=EXCLUDE)


@pytest.fixture(scope="module")
def good_eval(real, good, suite) -> dict:
    return evaluate_quality(real, good, suite=suite, exclude=EXCLUDE)


@pytest.fixture(scope="module")
def broken_eval(real, broken, suite) -> dict:
    return evaluate_quality(real, broken, suite=suite, exclude=EXCLUDE)


# --------------------------------------------------------------------------- derive_suite


def test_derive_suite_is_plain_json_gx_suite(suite, real):
    assert json.loads(json.dumps(suite)) == suite
    assert suite["name"] == "patients_v1"
    from great_expectations.core import ExpectationSuite

    rebuilt = ExpectationSuite(**{k: v for k, v in suite.items() if k != "id"})
    assert len(rebuilt.expectations) == len(suite["expectations"])

    cols = by_type(suite, "expect_table_columns_to_match_set")[None]
    assert sorted(cols["column_set"]) == sorted(c for c in real.columns if c != "patient_key")
    assert cols.get("exact_match", True) is True  # GX omits the default (True) from kwargs
    for exp in suite["expectations"]:
        assert exp["kwargs"].get("column") != "patient_key"


def test_derive_suite_column_expectations(suite, real):
    types = by_type(suite, "expect_column_values_to_be_in_type_list")
    assert "int64" in types["age"]["type_list"]
    assert "float64" in types["hba1c"]["type_list"]
    assert "bool" in types["deceased"]["type_list"]
    assert {"object", "str"} <= set(types["gender"]["type_list"])
    assert "datetime64[ns]" in types["first_seen"]["type_list"]

    between = by_type(suite, "expect_column_values_to_be_between")
    assert between["age"]["min_value"] == int(real["age"].min())
    assert between["age"]["max_value"] == int(real["age"].max())
    assert between["hba1c"]["min_value"] == pytest.approx(real["hba1c"].min())
    assert "first_seen" in between
    assert "gender" not in between and "deceased" not in between

    sets = by_type(suite, "expect_column_values_to_be_in_set")
    assert sorted(sets["gender"]["value_set"]) == ["female", "male"]
    assert sorted(sets["race"]["value_set"]) == ["asian", "black", "other", "white"]
    assert sorted(sets["deceased"]["value_set"]) == [False, True]
    assert "age" not in sets

    not_null = by_type(suite, "expect_column_values_to_not_be_null")
    hba1c_null = real["hba1c"].isna().mean()
    assert not_null["hba1c"]["mostly"] == pytest.approx(1 - hba1c_null - 0.05, abs=1e-5)
    assert not_null["age"]["mostly"] == pytest.approx(0.95)


def test_derive_suite_tolerances(real):
    wide = derive_suite(real, name="wide", exclude=EXCLUDE, range_tolerance=0.5,
                        null_tolerance=0.2)  # fmt: skip
    lo, hi = real["age"].min(), real["age"].max()
    between = by_type(wide, "expect_column_values_to_be_between")
    assert between["age"]["min_value"] <= lo - 0.5 * (hi - lo) + 1
    assert between["age"]["max_value"] >= hi + 0.5 * (hi - lo) - 1
    assert by_type(wide, "expect_column_values_to_not_be_null")["age"]["mostly"] == pytest.approx(
        0.8
    )


def test_real_table_passes_its_own_suite(suite, real):
    result = run_suite(suite, real.drop(columns=EXCLUDE))
    assert result["failed"] == []
    assert result["success"] is True
    assert result["success_ratio"] == 1.0
    assert result["evaluated"] == result["successful"] == len(suite["expectations"])


def test_awkward_dtypes_round_trip():
    """String/category storage, tz-aware datetimes, nullable ints, all-null and bool+None."""
    n = 60
    rng = np.random.default_rng(7)
    df = pd.DataFrame(
        {
            "code": pd.array(rng.choice(["a", "b", "c"], n), dtype="string"),
            "grade": pd.Categorical(rng.choice(["lo", "hi"], n)),
            "seen_at": pd.date_range("2024-01-01", periods=n, freq="h", tz="UTC"),
            "visits": pd.array(np.where(rng.random(n) < 0.2, None, rng.integers(0, 9, n)),
                               dtype="Int64"),  # fmt: skip
            "empty": pd.Series([None] * n, dtype=object),
            "smoker": pd.Series(rng.choice([True, False, None], n), dtype=object),
        }
    )
    suite = derive_suite(df, name="awkward")
    json.dumps(suite)
    assert "empty" not in by_type(suite, "expect_column_values_to_not_be_null")
    assert sorted(by_type(suite, "expect_column_values_to_be_in_set")["smoker"]["value_set"]) == [
        False,
        True,
    ]
    result = run_suite(suite, df)
    assert result["failed"] == [], result["failed"]
    assert result["success_ratio"] == 1.0

    late = df.copy()
    late["seen_at"] = late["seen_at"] + pd.Timedelta(days=30)
    late["visits"] = late["visits"].astype("float64")
    assert {("expect_column_values_to_be_between", "seen_at"),
            ("expect_column_values_to_be_in_type_list", "visits")} <= failures(
        run_suite(suite, late)
    )  # fmt: skip


# --------------------------------------------------------------------------- good vs broken


def test_good_synthetic_passes_and_scores_high(good_eval):
    exp = good_eval["expectations"]
    # independent draws may step just outside the real min/max; nothing else may fail
    assert {f["expectation"] for f in exp["failed"]} <= {"expect_column_values_to_be_between"}
    assert exp["success_ratio"] >= 0.9
    assert good_eval["expectation_success_ratio"] == exp["success_ratio"]

    sdm = good_eval["sdmetrics"]
    assert good_eval["quality_score"] == sdm["score"]
    assert good_eval["quality_score"] > 0.8
    assert set(sdm["properties"]) == {"Column Shapes", "Column Pair Trends"}
    assert sdm["properties"]["Column Shapes"] > 0.8
    assert sdm["properties"]["Column Pair Trends"] is not None
    assert sdm["properties"]["Column Pair Trends"] > 0.7
    assert len(sdm["worst_columns"]) == 5
    scores = [w["score"] for w in sdm["worst_columns"]]
    assert scores == sorted(scores)
    assert {"column", "metric", "score"} <= set(sdm["worst_columns"][0])
    assert sdm["missing_columns"] == []
    json.dumps(good_eval, allow_nan=False)


def test_good_synthetic_passes_with_range_tolerance(real, good):
    suite = derive_suite(real, name="tolerant", exclude=EXCLUDE, range_tolerance=0.25)
    result = run_suite(suite, good.drop(columns=EXCLUDE))
    assert result["success"] is True, result["failed"]


def test_broken_synthetic_fails_the_right_expectations(broken_eval, good_eval):
    exp = broken_eval["expectations"]
    assert exp["success"] is False
    got = failures(exp)
    expected = {
        ("expect_table_columns_to_match_set", None),
        ("expect_column_values_to_be_between", "age"),
        ("expect_column_values_to_be_in_set", "gender"),
        ("expect_column_values_to_be_in_type_list", "n_encounters"),
        ("expect_column_values_to_not_be_null", "race"),
        ("expect_column_values_to_not_be_null", "has_i10"),
    }
    assert expected <= got, got
    # untouched columns fail exactly what they fail in the good copy (chance range misses)
    untouched = {"deceased", "n_conditions", "hba1c", "first_seen"}
    good_got = failures(good_eval["expectations"])
    assert {f for f in got if f[1] in untouched} == {f for f in good_got if f[1] in untouched}

    fails = {(f["expectation"], f["column"]): f["observed"] for f in exp["failed"]}
    assert fails[("expect_table_columns_to_match_set", None)]["mismatched"]["missing"] == [
        "has_i10"
    ]
    assert "unknown" in fails[("expect_column_values_to_be_in_set", "gender")][
        "partial_unexpected_list"
    ]
    assert fails[("expect_column_values_to_be_between", "age")]["unexpected_percent"] > 30
    assert fails[("expect_column_values_to_not_be_null", "race")]["unexpected_percent"] > 50
    assert fails[("expect_column_values_to_not_be_null", "has_i10")]["errors"]
    for obs in fails.values():
        assert len(obs.get("partial_unexpected_list", [])) <= 5

    assert broken_eval["expectation_success_ratio"] < good_eval["expectation_success_ratio"]
    assert broken_eval["quality_score"] < good_eval["quality_score"]
    sdm = broken_eval["sdmetrics"]
    assert sdm["missing_columns"] == ["has_i10"]
    worst = [w["column"] for w in sdm["worst_columns"][:2]]
    assert set(worst) == {"n_encounters", "age"}
    json.dumps(broken_eval, allow_nan=False)


# --------------------------------------------------------------------------- sdmetrics helpers


def test_infer_sdtypes(real):
    md = infer_sdtypes(real, exclude=EXCLUDE)
    assert "patient_key" not in md["columns"]
    sd = {c: m["sdtype"] for c, m in md["columns"].items()}
    assert sd == {
        "gender": "categorical",
        "race": "categorical",
        "age": "numerical",
        "deceased": "boolean",
        "n_encounters": "numerical",
        "n_conditions": "numerical",
        "has_i10": "boolean",
        "hba1c": "numerical",
        "first_seen": "datetime",
    }
    assert infer_sdtypes(real)["columns"]["patient_key"]["sdtype"] == "id"


def test_sdmetrics_accepts_sdv_multi_table_metadata(real, good):
    cols = infer_sdtypes(real)["columns"]
    multi = {
        "METADATA_SPEC_VERSION": "V1",
        "tables": {"patients": {"columns": cols, "primary_key": "patient_key"}},
        "relationships": [],
    }
    small_real, small_good = real.iloc[:150], good.iloc[:150]
    out = sdmetrics_quality(small_real, small_good, multi)
    single = sdmetrics_quality(small_real, small_good, multi["tables"]["patients"])
    assert out["score"] == pytest.approx(single["score"])
    assert 0.0 < out["score"] <= 1.0
    assert all(w["column"] != "patient_key" for w in out["worst_columns"])
    json.dumps(out, allow_nan=False)


def test_package_import_is_light_and_airflow_free():
    code = (
        "import sys, synthfactory.quality as q; "
        "assert callable(q.evaluate_quality); "
        "bad = [m for m in ('airflow', 'great_expectations', 'sdmetrics') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
