"""A flat clinical table end to end (``source.kind: table``), the minimal spec (name + source), on a real table:
lifelines' kidney-transplant cohort (863 patients: follow-up time, death, age, and three mutually exclusive
race-sex flags). The same pipeline, gates, card and release as a FHIR dataset; a Parquet and a CSV copy give
the same release; the gate refuses a copy of the table."""

from __future__ import annotations

import os

import pandas as pd
import pytest

lifelines_datasets = pytest.importorskip("lifelines.datasets")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from synthfactory import pipeline
    from synthfactory.release.publish import LocalWriter
    from synthfactory.spec import load_spec

    base = tmp_path_factory.mktemp("flat")
    df = pd.read_csv(os.path.join(os.path.dirname(lifelines_datasets.__file__), "kidney_transplant.csv"))
    df.insert(0, "patient", [f"KT-{i:05d}" for i in range(1, len(df) + 1)])  # the cohort ships without ids
    df.to_csv(base / "kt.csv", index=False)
    df.to_parquet(base / "kt.parquet", index=False)
    out = {"real": df, "base": base}
    for fmt in ("csv", "parquet"):
        spec_path = base / fmt / "include" / "datasets" / "kidney.yaml"
        spec_path.parent.mkdir(parents=True)
        spec_path.write_text(f"name: kidney\nsource: {{kind: table, uri: {base / f'kt.{fmt}'}, id_column: patient}}\n")
        spec = load_spec(spec_path)
        ctx = pipeline.RunContext(spec=spec, run_id=f"run_{fmt}", version="v20260101T000000Z",
                                  staging_root=str(base / "staging"), base_dir=str(spec_path.parents[2]),
                                  salt=b"k" * 32, signing_key=b"s" * 32)
        if fmt == "csv":
            out[fmt] = (ctx, pipeline.run_all(ctx, LocalWriter(base / fmt / "release")))
        else:  # the synthetic table decides every later figure: ingest to sample is enough to compare
            ingested = pipeline.ingest(ctx)
            prepared = pipeline.prepare(ctx, ingested)
            out[fmt] = (ctx, {"ingest": ingested, "prepare": prepared,
                              "sample": pipeline.sample(ctx, pipeline.fit(ctx, prepared), prepared)})
    return out


def test_minimal_spec_releases_the_input_columns(runs):
    ctx, s = runs["csv"]
    real = runs["real"]
    assert s["gate"]["approved"] and s["release"]["version"]
    syn = pd.read_parquet(s["sample"]["synthetic_uri"])
    # the input's columns, names, dtypes and value sets, the id replaced by a fresh synthetic id
    assert list(syn.columns) == ["synthetic_id", *[c for c in real.columns if c != "patient"]]
    for col in real.columns.drop("patient"):
        assert syn[col].dtype == real[col].dtype, col
    for col in ("death", "black_male", "white_male", "black_female"):
        assert set(syn[col].unique()) <= set(real[col].unique()), col
    assert not set(syn["synthetic_id"]) & set(real["patient"])
    # the mutually exclusive flags hold in every synthetic row, and a GX expectation checked each
    flags = syn[["black_male", "white_male", "black_female"]].sum(axis=1)
    assert (flags <= 1).all()
    report = pd.read_json(s["quality"]["report_uri"], typ="series")
    assert s["sample"]["table_rules"] >= 3 and s["quality"]["expectations_failed"] == 0
    assert report["expectations"]["evaluated"] > 3
    # the same figures as a FHIR dataset, each beside its real-data reference
    q, p = s["quality"], s["privacy"]
    assert q["reference"]["quality_score"]["mean"] and q["matched"]["quality_score"] is not None
    assert p["leak_clean"] is True and p["exact_match_rate"] is not None and p["dcr_share"] is not None


def test_parquet_and_csv_copies_give_the_same_result(runs):
    (_, c), (_, p) = runs["csv"], runs["parquet"]
    assert c["ingest"]["extract_sha256"] != p["ingest"]["extract_sha256"]     # two different files
    for uri in ("train_uri", "holdout_uri"):
        pd.testing.assert_frame_equal(pd.read_parquet(c["prepare"][uri]), pd.read_parquet(p["prepare"][uri]))
    pd.testing.assert_frame_equal(pd.read_parquet(c["sample"]["synthetic_uri"]),
                                  pd.read_parquet(p["sample"]["synthetic_uri"]))
    assert c["prepare"]["column_types"] == p["prepare"]["column_types"]


def test_gate_refuses_a_copy_of_the_table(runs):
    from synthfactory import pipeline
    from synthfactory.release.gate import GateRefused
    from synthfactory.synthesize.modelling import KEY

    ctx, s = runs["csv"]
    copy_uri = ctx.uri("synthetic", "copy.parquet")
    train = pd.read_parquet(ctx.train_uri).drop(columns=[KEY])
    train.insert(0, "synthetic_id", [f"syn-{i:07d}" for i in range(1, len(train) + 1)])
    train.to_parquet(copy_uri, index=False)
    sampled = {**s["sample"], "synthetic_uri": copy_uri}
    p = pipeline.privacy(ctx, s["prepare"], sampled, s["ingest"], s["quality"])
    assert p["exact_match_rate"] > 0.5 and p["dcr_share"] > s["privacy"]["dcr_share"]
    with pytest.raises(GateRefused) as err:
        pipeline.gate(ctx, sampled, s["quality"], p, s["ingest"])
    assert "privacy gate failed" in str(err.value) and "exact_match_rate" in str(err.value)
