"""prepare reads the ingested tables without other tables' row keys, streamed with only the columns and observation
rows the features read (memory): the modelling table, the split, the metadata and a refusal's message are identical
to building them from the whole tables."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from synthfactory.ingest.fhir_ndjson import ingest_extract
from synthfactory.keys import Keyer
from synthfactory.pipeline import modelling_frame
from synthfactory.spec import parse_spec
from synthfactory.storage import Store
from synthfactory.synthesize import modelling
from synthfactory.synthesize.modelling import (FeatureError, build_modelling_table, check_features, observation_codes,
                                               read_modelling_tables, split_train_holdout)


def test_modelling_table_identical_without_row_keys(small_extract, tmp_path, project_root):
    data = yaml.safe_load((project_root / "include/datasets/cohort_demo.yaml").read_text())
    data["features"]["min_patients"] = 10
    spec = parse_spec(data)
    report = ingest_extract(str(small_extract), str(tmp_path / "out"), keyer=Keyer(b"k" * 32),
                            resources=["Patient", "Encounter", "Condition", "Observation"])
    full = {name: pq.read_table(uri).to_pandas() for name, uri in report["tables"].items()}
    lean = {name: modelling_frame(pq.read_table(uri)) for name, uri in report["tables"].items()}
    dropped = {c for name in full for c in set(full[name].columns) - set(lean[name].columns)}
    assert dropped >= {"observation_key", "encounter_key", "condition_key"} and "patient_key" not in dropped
    assert modelling_frame(pq.read_table(report["tables"]["observation"]), keep_keys=True).equals(full["observation"])
    a, info_a = build_modelling_table(full, spec.features)
    b, info_b = build_modelling_table(lean, spec.features)
    pd.testing.assert_frame_equal(a, b)
    assert info_a == info_b
    for x, y in zip(split_train_holdout(a, 0.2, 7), split_train_holdout(b, 0.2, 7)):
        pd.testing.assert_frame_equal(x, y)


# -- streamed reading (read_modelling_tables): only the columns and observation rows the features read --------------
@pytest.fixture(scope="module")
def ingested(small_extract, tmp_path_factory):
    report = ingest_extract(str(small_extract), str(tmp_path_factory.mktemp("ingest") / "out"),
                            keyer=Keyer(b"k" * 32), resources=["Patient", "Encounter", "Condition", "Observation"])
    return report["tables"]


def _demo(project_root, **features):
    data = yaml.safe_load((project_root / "include/datasets/cohort_demo.yaml").read_text())
    data["features"].update({"min_patients": 10, **features})
    return data


@pytest.mark.parametrize("features", [{}, {"auto": True, "auto_max_labs": 4},
                                      {"reference_date": "2020-06-30", "top_conditions": 3}],
                         ids=["demo", "auto", "reference_date"])
def test_streamed_tables_give_the_same_modelling_table(ingested, project_root, monkeypatch, features):
    monkeypatch.setattr(modelling, "BATCH_ROWS", 1000)  # several batches per table
    spec = parse_spec(_demo(project_root, **features))
    whole = {name: pq.read_table(uri).to_pandas() for name, uri in ingested.items()}
    streamed = read_modelling_tables(ingested, Store(), spec.features)
    assert not {"observation_key", "encounter_key", "category"} & set(streamed["observation"].columns)
    if not spec.features.auto:  # only the spec's lab codes (and their synonyms) are kept
        assert 0 < len(streamed["observation"]) < len(whole["observation"]) / 2
        assert set(streamed["observation"]["code"]) <= observation_codes(spec.features)
    a, info_a = build_modelling_table(whole, spec.features)
    b, info_b = build_modelling_table(streamed, spec.features)
    pd.testing.assert_frame_equal(a, b)
    assert info_a == info_b
    if not features:  # the reference date is the latest over the whole columns, not the kept rows
        latest = max(whole[n][c].max() for n, c in modelling.REFERENCE_COLUMNS if whole[n][c].notna().any())
        assert max(streamed.reference_candidates) == latest


def test_refusal_lists_the_whole_extract_when_streamed(ingested, project_root):
    data = _demo(project_root)
    data["features"]["labs"][4] = {"name": "egfr", "loinc": "62238-1"}
    data["privacy"]["quasi_identifiers"] = ["age", "gender", "zip3"]
    spec = parse_spec(data)
    whole = {name: pq.read_table(uri).to_pandas() for name, uri in ingested.items()}
    streamed = read_modelling_tables(ingested, Store(), spec.features)
    messages = []
    for tables in (whole, streamed):
        table, info = build_modelling_table(tables, spec.features)
        with pytest.raises(FeatureError) as exc:
            check_features(spec, table, info, tables)
        messages.append(str(exc.value))
    assert messages[0] == messages[1]
    assert "the extract has this lab as loinc 98979-8" in messages[1] and "numeric labs (top" in messages[1]
