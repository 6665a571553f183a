"""prepare reads the ingested tables without other tables' row keys (memory): the modelling table, the split and
the metadata are identical to building them from the whole tables."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import yaml

from synthfactory.ingest.fhir_ndjson import ingest_extract
from synthfactory.keys import Keyer
from synthfactory.pipeline import modelling_frame
from synthfactory.spec import parse_spec
from synthfactory.synthesize.modelling import build_modelling_table, split_train_holdout


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
