"""The fit and sample stages in both modes: relational tables + FHIR + rebalance land in staging, the sample
summary and reports/synthesis.json, and pipeline.release_files; neural fit records epochs/device and leaves no
checkpoint behind."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from synthfactory import pipeline as p
from synthfactory.spec import SpecError, load_spec
from synthfactory.testing.records import write_extract
from tests.conftest import write_spec

from .conftest import TINY_CTGAN


@pytest.fixture(scope="module")
def extract(tmp_path_factory) -> Path:
    return Path(write_extract(str(tmp_path_factory.mktemp("extract") / "ndjson"), patients=70, seed=5))


def _ctx(tmp_path: Path, extract: Path, name: str, **overrides) -> p.RunContext:
    spec = load_spec(write_spec(tmp_path / "specs", name, extract, tmp_path / "staging",
                                # no eGFR lab in this extract: prepare would refuse the egfr_by_sex relationship
                                features__labs=[{"name": "hba1c", "loinc": "4548-4"}], quality__relationships=[],
                                **overrides))
    return p.RunContext(spec=spec, run_id="r1", version="v1")


def test_relational_mode_writes_every_table_fhir_and_the_synthesis_report(tmp_path, extract):
    ctx = _ctx(tmp_path, extract, "rel_stage", synthesizer__mode="relational", synthesizer__kind="gaussian_copula",
               synthesizer__params={"default_distribution": "norm"},
               synthesizer__relational={"child_kind": "gaussian_copula",
                                        "child_params": {"default_distribution": "norm"}},
               synthesizer__rebalance={"column": "gender", "proportions": {"female": 0.5, "male": 0.5}},
               release__formats=["parquet", "fhir_ndjson"])
    prepared = p.prepare(ctx, p.ingest(ctx))
    assert set(prepared["relational_uris"]) == {"patient", "encounter", "condition", "observation"}
    assert len(ctx.store.read_df(prepared["relational_uris"]["patient"])) == prepared["rows_train"]  # train only
    fitted = p.fit(ctx, prepared)
    assert fitted["mode"] == "relational" and fitted["engine"] == "patient_centred"
    ctx.rows = 80
    sampled = p.sample(ctx, fitted, prepared)
    assert sampled["rows"] == 80 and sampled["referential_integrity"] == 1.0
    assert set(sampled["tables"]) == {"patient", "encounter", "condition", "observation"}
    summary = ctx.store.read_df(sampled["synthetic_uri"])  # patient-level table derived from the synthetic record
    train = ctx.store.read_df(prepared["train_uri"])
    assert list(summary.columns[1:]) == list(train.columns[1:]) and len(summary) == 80
    assert (summary["gender"] == "female").sum() == 40
    report = ctx.store.read_json(sampled["synthesis_report_uri"])
    assert report["conditional"]["achieved"] == {"female": 0.5, "male": 0.5}
    assert set(report["children_per_parent_ks"]) == {"encounter", "condition", "observation"}
    assert all(v == 0 for v in report["constraint_violations"].values())
    assert report["fhir"]["resources"]["Patient"] == 80
    files = p.release_files(sampled, {"report_uri": "q"}, {"report_uri": "pr"})
    assert {"data/patients.parquet", "data/patient.parquet", "data/encounter.parquet", "data/observation.parquet",
            "data/condition.parquet", "reports/synthesis.json", "fhir/Patient.ndjson", "fhir/Encounter.ndjson",
            "fhir/Condition.ndjson", "fhir/Observation.ndjson"} <= set(files)
    assert all(Path(u).exists() for k, u in files.items() if k not in ("reports/quality.json",
                                                                       "reports/privacy.json"))
    json.dumps(sampled)  # XCom-able: URIs and figures only


def test_neural_fit_records_training_and_cleans_its_checkpoint(tmp_path, extract):
    ctx = _ctx(tmp_path, extract, "ctgan_stage", synthesizer__kind="ctgan", synthesizer__params=TINY_CTGAN,
               synthesizer__epochs=2, synthesizer__batch_size=20, synthesizer__checkpoint_every=1,
               synthesizer__oversample={"column": "deceased", "value": False, "factor": 1.0})
    prepared = p.prepare(ctx, p.ingest(ctx))
    fitted = p.fit(ctx, prepared)
    assert fitted["epochs"] == 2 and fitted["device"] == "cpu"
    assert fitted["training"]["epochs_done"] == 2 and fitted["training"]["cpu_seconds_per_epoch"] > 0
    assert not Path(ctx.uri("model", "checkpoint")).exists()
    ctx.rows = 50
    sampled = p.sample(ctx, fitted, prepared)
    assert sampled["rows"] == 50 and "data/patient.parquet" not in p.release_files(sampled, {"report_uri": "q"},
                                                                                  {"report_uri": "r"})
    report = ctx.store.read_json(sampled["synthesis_report_uri"])
    assert report["fit"]["training"]["epochs_target"] == 2


def test_spec_validation_of_synthesis_fields(tmp_path, extract):
    with pytest.raises(SpecError, match="fhir_ndjson needs synthesizer.mode: relational"):
        load_spec(write_spec(tmp_path, "bad_fhir", extract, tmp_path / "s", release__formats=["fhir_ndjson"]))
    with pytest.raises(SpecError, match="either rebalance or oversample"):
        load_spec(write_spec(tmp_path, "bad_both", extract, tmp_path / "s",
                             synthesizer__rebalance={"column": "gender", "proportions": {"female": 1}},
                             synthesizer__oversample={"column": "deceased", "value": True, "factor": 2}))
    with pytest.raises(SpecError, match="inequality needs"):
        load_spec(write_spec(tmp_path, "bad_cons", extract, tmp_path / "s",
                             synthesizer__constraints=[{"type": "inequality", "low": "a"}]))
    with pytest.raises(SpecError, match="mode: patient_table for differential privacy"):
        load_spec(write_spec(tmp_path, "bad_dp", extract, tmp_path / "s", synthesizer__kind="dp_mst",
                             synthesizer__mode="relational"))
    ok = load_spec(write_spec(tmp_path, "good_dp", extract, tmp_path / "s", synthesizer__kind="dp_aim",
                              synthesizer__dp={"epsilon": 1.0, "bounds": {"hba1c": [3, 20]}}))
    assert ok.synthesizer.dp.bounds == {"hba1c": (3.0, 20.0)}
    assert pd.api.types.is_float_dtype(pd.Series([ok.synthesizer.dp.epsilon]))


def test_the_same_seed_gives_the_same_release_bytes_and_another_seed_another_draw(tmp_path, extract):
    """synthesizer.seed reaches the split, the transforms, the fit and the draw: two runs of the same extract,
    spec and seed write byte-identical synthetic tables; a different seed draws different rows."""
    import hashlib

    def synthetic_sha(seed: int, run: str) -> str:
        ctx = _ctx(tmp_path / run, extract, "seeded", synthesizer__seed=seed)
        prepared = p.prepare(ctx, p.ingest(ctx))
        sampled = p.sample(ctx, p.fit(ctx, prepared), prepared)
        return hashlib.sha256(Path(sampled["synthetic_uri"]).read_bytes()).hexdigest()

    first, again, other = synthetic_sha(7, "a"), synthetic_sha(7, "b"), synthetic_sha(8, "c")
    assert first == again and first != other
