"""Derived-suite additions (key uniqueness, quantiles) and the generic multi-table expectation builders
(referential integrity, date ordering), plus GX Data Docs output."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from synthfactory.quality.expectations import (
    add_expectations,
    date_order_expectation,
    derive_suite,
    key_expectations,
    referential_integrity_expectation,
    run_suite,
)


def failures(result: dict) -> set[tuple[str, str | None]]:
    return {(f["expectation"], f["column"]) for f in result["failed"]}


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    n = 300
    return pd.DataFrame({"age": rng.integers(20, 80, n).astype("int64"),
                         "hba1c": np.round(rng.normal(5.8, 0.6, n), 1),
                         "sex": rng.choice(["female", "male"], n).astype(object)})


@pytest.fixture(scope="module")
def keyed_suite(real) -> dict:
    return derive_suite(real, name="keyed", key_columns=["synthetic_id"], quantile_tolerance=0.1)


def test_key_column_joins_the_column_set_and_must_be_unique(keyed_suite, real):
    types = [e["type"] for e in keyed_suite["expectations"]]
    column_set = keyed_suite["expectations"][0]["kwargs"]["column_set"]
    assert column_set[0] == "synthetic_id" and set(column_set[1:]) == set(real.columns)
    assert {("expect_column_values_to_be_unique", "synthetic_id"),
            ("expect_column_values_to_not_be_null", "synthetic_id")} <= {
        (e["type"], e["kwargs"].get("column")) for e in keyed_suite["expectations"]}
    assert types.count("expect_column_quantile_values_to_be_between") == 2  # age, hba1c; not sex
    assert keyed_suite["meta"]["synthfactory"]["key_columns"] == ["synthetic_id"]
    json.dumps(keyed_suite)


def test_quantile_ranges_are_real_quantiles_with_tolerance(keyed_suite, real):
    q = {e["kwargs"]["column"]: e["kwargs"]["quantile_ranges"] for e in keyed_suite["expectations"]
         if e["type"] == "expect_column_quantile_values_to_be_between"}
    assert q["hba1c"]["quantiles"] == [0.1, 0.25, 0.5, 0.75, 0.9]
    med = real["hba1c"].quantile(0.5, interpolation="nearest")
    lo, hi = q["hba1c"]["value_ranges"][2]
    spread = real["hba1c"].quantile(0.9) - real["hba1c"].quantile(0.1)
    assert lo == pytest.approx(med - 0.1 * spread) and hi == pytest.approx(med + 0.1 * spread)
    lo, hi = q["age"]["value_ranges"][2]  # integers move by at least 1
    assert hi - lo >= 2


def test_keyed_suite_passes_good_and_fails_duplicates_and_shifted_quantiles(keyed_suite, real, tmp_path):
    good = real.sample(frac=1.0, random_state=1).reset_index(drop=True)
    good.insert(0, "synthetic_id", [f"syn-{i}" for i in range(len(good))])
    ok = run_suite(keyed_suite, good, data_docs_dir=str(tmp_path / "docs"))
    assert ok["success"], ok["failed"]
    # GX Data Docs: an index page and a validation result page, written where asked
    assert ok["data_docs_index"] == str(tmp_path / "docs" / "index.html")
    pages = list((tmp_path / "docs").rglob("*.html"))
    assert len(pages) >= 3 and any("validations" in str(p) for p in pages)

    bad = good.copy()
    bad.loc[5, "synthetic_id"] = bad.loc[4, "synthetic_id"]  # duplicate key
    bad.loc[7, "synthetic_id"] = None  # missing key
    bad["hba1c"] = np.clip(bad["hba1c"] + 0.5, None, real["hba1c"].max())  # same range, shifted body
    got = failures(run_suite(keyed_suite, bad))
    assert {("expect_column_values_to_be_unique", "synthetic_id"),
            ("expect_column_values_to_not_be_null", "synthetic_id"),
            ("expect_column_quantile_values_to_be_between", "hba1c")} <= got
    assert ("expect_column_values_to_be_between", "hba1c") not in got  # the range alone would miss it


def test_referential_integrity_and_date_order_builders():
    parents = pd.DataFrame({"patient_id": ["p1", "p2", "p3"]})
    start = pd.to_datetime(["2024-01-01", "2024-02-01", "2024-03-01", "2024-04-01", "2024-05-01"])
    child = pd.DataFrame({"encounter_id": ["e1", "e2", "e3", "e4", "e5"],
                          "patient_id": ["p1", "p1", "p2", "p3", None],
                          "start": start, "end": start + pd.Timedelta(hours=2)})
    suite = {"name": "encounters", "expectations": [], "meta": {}}
    fk = referential_integrity_expectation("patient_id", parents["patient_id"])
    assert fk["type"] == "expect_column_values_to_be_in_set" and fk["kwargs"]["value_set"] == ["p1", "p2", "p3"]
    order = date_order_expectation("start", "end")
    assert order["kwargs"] == {"column_A": "end", "column_B": "start", "or_equal": True,
                               "ignore_row_if": "either_value_is_missing"}  # GX omits the default mostly=1
    suite = add_expectations(suite, [*key_expectations("encounter_id"), fk, order])
    assert len(add_expectations(suite, [fk, order])["expectations"]) == 4  # no duplicates
    json.dumps(suite)

    ok = run_suite(suite, child)
    assert ok["success"], ok["failed"]

    broken = child.copy()
    broken.loc[1, "patient_id"] = "p9"  # orphan: no such parent
    broken.loc[2, "end"] = broken.loc[2, "start"] - pd.Timedelta(days=1)  # ends before it starts
    broken.loc[3, "end"] = pd.NaT  # missing end: ignored by the order check
    got = failures(run_suite(suite, broken))
    assert got == {("expect_column_values_to_be_in_set", "patient_id"),
                   ("expect_column_pair_values_a_to_be_greater_than_b", "end,start")}
