"""Record-level privacy (a patient's whole record as the unit): copied records are caught, fresh ones are not."""

from __future__ import annotations

import pytest

from synthfactory.privacy.records import record_layout, record_privacy, record_vectors
from synthfactory.testing.records import relational_tables


def _split(tables, n_hold):
    keys = tables["patient"]["patient_key"]
    hold = set(keys.iloc[:n_hold])
    part = lambda keep: {n: df[df["patient_key"].isin(keep)].reset_index(drop=True) for n, df in tables.items()}  # noqa: E731
    return part(set(keys) - hold), part(hold)


@pytest.fixture(scope="module")
def real():
    return _split(relational_tables(160, seed=8, with_medications=True), 40)


def test_a_record_is_one_vector_of_the_whole_record(real):
    train, _ = real
    layout = record_layout(train)
    v = record_vectors(train, layout)
    assert len(v) == len(train["patient"]) and v.index.is_unique
    assert {"n_encounter", "n_observation", "n_condition"} <= set(v.columns)
    assert any(c.startswith("observation:") for c in v.columns)


def test_copied_records_are_caught_and_fresh_ones_are_not(real):
    train, hold = real
    copied = record_privacy(train, hold, train, seed=1)
    assert copied["synthetic"]["exact_match_rate"] == 1.0
    assert copied["synthetic"]["dcr_share"] > copied["reference"]["dcr_share"] + 0.1
    fresh_train, _ = _split(relational_tables(160, seed=9, with_medications=True), 40)
    fresh = record_privacy(train, hold, fresh_train, seed=1)
    assert fresh["synthetic"]["exact_match_rate"] == 0.0
    assert abs(fresh["synthetic"]["dcr_share"] - 0.5) < 0.15
    assert fresh["reference"]["exact_match_rate"] == 0.0
