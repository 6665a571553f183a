"""Source-agnostic features: condition concepts across code systems, labs by LOINC synonyms, features.auto,
and the refusal before fit of what an extract cannot produce."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from synthfactory import pipeline
from synthfactory.errors import InputError
from synthfactory.ingest.fhir_ndjson import ingest_extract
from synthfactory.keys import Keyer
from synthfactory.spec import (ConditionConcept, FeatureSpec, LabFeature, SpecError, condition_column, load_spec,
                               parse_spec)
from synthfactory.synthesize.modelling import KEY, FeatureError, build_modelling_table, check_features
from tests.conftest import ROOT, write_spec

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
#: ICD-10-CM -> SNOMED CT for the codes carebundle writes (type 2 diabetes variants -> T2DM concepts)
ICD_TO_SNOMED = {
    "E11.9": ("313436004", "Type 2 diabetes mellitus without complication"),
    "E11.65": ("44054006", "Diabetes mellitus type 2"),
    "E11.22": ("44054006", "Diabetes mellitus type 2"),
    "I10": ("59621000", "Essential hypertension"),
    "E66.9": ("414916001", "Obesity"),
    "E78.5": ("55822004", "Hyperlipidemia"),
    "E78.00": ("13644009", "Hypercholesterolemia"),
    "I25.10": ("53741008", "Coronary arteriosclerosis"),
    "N18.31": ("433144002", "Chronic kidney disease stage 3"),
    "N18.32": ("433144002", "Chronic kidney disease stage 3"),
    "E03.9": ("40930008", "Hypothyroidism"),
}
TABLES = ("patient", "encounter", "condition", "observation")


def demo_spec(**features):
    data = yaml.safe_load((ROOT / "include/datasets/cohort_demo.yaml").read_text())
    data["features"].update(features)
    return parse_spec(data)


def ingest(src: Path, out: Path) -> dict[str, pd.DataFrame]:
    report = ingest_extract(str(src), str(out), keyer=Keyer(b"k" * 32), resources=["Patient", "Encounter",
                                                                                      "Condition", "Observation"])
    return {name: pd.read_parquet(uri) for name, uri in report["tables"].items() if name in TABLES}


def recode_conditions_to_snomed(src: Path, dest: Path) -> int:
    """Copy an extract, replacing every Condition coding with SNOMED CT (unmapped codes get made-up ones)."""
    shutil.copytree(src, dest)
    path = next(dest.glob("Condition.ndjson*"))
    assert path.suffix == ".ndjson", "test expects plain NDJSON"
    lines, recoded = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        res = json.loads(line)
        codings = []
        for c in res["code"]["coding"]:
            assert c["system"] == ICD10CM
            code, display = ICD_TO_SNOMED.get(c["code"], (f"90{abs(hash(c['code'])) % 10**7:07d}", c.get("display")))
            codings.append({"system": SNOMED, "code": code, "display": display})
            recoded += 1
        res["code"] = {"coding": codings, "text": res["code"].get("text")}
        lines.append(json.dumps(res))
    path.write_text("\n".join(lines) + "\n")
    return recoded


@pytest.fixture(scope="module")
def icd_tables(small_extract, tmp_path_factory):
    return ingest(small_extract, tmp_path_factory.mktemp("icd"))


@pytest.fixture(scope="module")
def snomed_tables(small_extract, tmp_path_factory):
    base = tmp_path_factory.mktemp("snomed")
    assert recode_conditions_to_snomed(small_extract, base / "extract") > 0
    return ingest(base / "extract", base / "ingest")


# -- spec shape -------------------------------------------------------------------------------------
def test_spec_shape_one_or_many_codes_and_system_aliases():
    lab = LabFeature(name="egfr", loinc="98979-8")
    assert lab.loinc == ["98979-8"]
    assert LabFeature(name="egfr", loinc=["98979-8", "48642-3", "98979-8"]).loinc == ["98979-8", "48642-3"]
    c = ConditionConcept(name="t2_diabetes", codes={"icd10cm": "E11*", SNOMED: ["44054006"]})
    assert c.codes == {"icd10cm": ["E11*"], "snomed": ["44054006"]} and c.column == "cond_t2_diabetes"
    for bad, where in [({"labs": [{"name": "x1", "loinc": ["4548-4", "abc"]}]}, "features.labs.0.loinc"),
                       ({"labs": [{"name": "x1", "loinc": []}]}, "at least one LOINC"),
                       ({"labs": [{"name": "age", "loinc": "4548-4"}]}, "another column"),
                       ({"conditions": [{"name": "dm", "codes": {"icd10cm": ["E*11"]}}]}, "prefix pattern"),
                       ({"conditions": [{"name": "dm", "codes": {}}]}, "at least one code system"),
                       ({"conditions": [{"name": "Bad Name", "codes": {"snomed": ["1"]}}]}, "lower_snake_case"),
                       ({"conditions": [{"name": "dm", "codes": {"snomed": ["1"]}},
                                        {"name": "dm", "codes": {"snomed": ["2"]}}]}, "duplicate name")]:
        with pytest.raises(SpecError, match=where.replace(".", r"\.")):
            parse_spec({"name": "x_spec", "source": {"uri": "/tmp/x"}, "release": {"bucket": "sandbox-bucket"},
                        "features": bad})


# -- conditions by concept --------------------------------------------------------------------------
def test_snomed_coded_extract_gives_the_same_concept_flags(icd_tables, snomed_tables):
    assert set(snomed_tables["condition"]["code_system"]) == {"snomed"}
    assert set(icd_tables["condition"]["code_system"]) == {"icd10cm"}
    spec = demo_spec()
    icd, icd_info = build_modelling_table(icd_tables, spec.features)
    sct, sct_info = build_modelling_table(snomed_tables, spec.features)
    assert list(icd[KEY]) == list(sct[KEY])  # same salt, same patients
    for col in ("cond_t2_diabetes", "cond_hypertension"):
        assert icd[col].sum() > 0
        assert icd[col].tolist() == sct[col].tolist(), col
    # ICD-10-CM prefix E11* = every E11.x code
    cond = icd_tables["condition"]
    diabetics = set(cond.loc[cond["code"].str.startswith("E11"), KEY])
    assert set(icd.loc[icd["cond_t2_diabetes"], KEY]) == diabetics
    # the demo spec's features and columns resolve on both extracts (the check prepare runs before fit)
    check_features(spec, icd, icd_info, icd_tables)
    check_features(spec, sct, sct_info, snomed_tables)
    # top_conditions skips codes a concept covers: no cond_i10 / cond_e11_9 next to the concepts
    assert "cond_i10" not in icd.columns and "cond_e11_9" not in icd.columns
    assert "cond_e66_9" in icd.columns and "cond_414916001" in sct.columns


def test_icd10cm_codes_match_with_or_without_the_dot_and_systems_stay_apart():
    keys = ["a", "b", "c", "d"]
    tables = {
        "patient": pd.DataFrame({KEY: keys, "gender": "female", "birth_date": pd.Timestamp("1960-01-01"),
                                 "deceased": False}),
        "condition": pd.DataFrame({KEY: keys, "code_system": ["icd10cm", "icd10cm", "snomed", "http://x.org/cs"],
                                   "code": ["E119", "E11.65", "E11.9", "44054006"]}),
    }
    spec = FeatureSpec(top_conditions=0, min_patients=2, conditions=[
        ConditionConcept(name="dm_exact", codes={"icd10cm": ["E11.9"]}),
        ConditionConcept(name="dm_any", codes={"icd10cm": ["E11*"], "snomed": ["44054006"]}),
        ConditionConcept(name="local", codes={"http://x.org/cs": ["44054006"]}),
        ConditionConcept(name="absent", codes={"snomed": ["73211009"]})])
    table, info = build_modelling_table(tables, spec)
    assert table["cond_dm_exact"].tolist() == [True, False, False, False]
    assert table["cond_dm_any"].tolist() == [True, True, False, False]  # "E11.9" coded as SNOMED is not E11*
    assert table["cond_local"].tolist() == [False, False, False, True]
    assert info["conditions_missing"] == ["absent"] and not table["cond_absent"].any()


# -- labs by concept --------------------------------------------------------------------------------
def test_lab_values_from_any_loinc_synonym_count():
    keys = [f"k{i}" for i in range(4)]
    tables = {
        "patient": pd.DataFrame({KEY: keys, "gender": "male", "birth_date": pd.Timestamp("1950-01-01"),
                                 "deceased": False}),
        "observation": pd.DataFrame({
            KEY: ["k0", "k0", "k1", "k2", "k3"],
            "code_system": ["loinc", "loinc", "loinc", "loinc", "local"],
            "code": ["98979-8", "48642-3", "48642-3", "33914-3", "98979-8"],
            "value_num": [50.0, 61.0, 80.0, 90.0, 5.0],
            "unit": ["mL/min/{1.73_m2}"] * 5,
            "effective": pd.to_datetime(["2024-01-01", "2025-01-01", "2024-01-01", "2024-01-01", "2025-06-01"],
                                        utc=True)}),
    }
    spec = FeatureSpec(min_patients=2, labs=[LabFeature(name="egfr", loinc=["98979-8", "48642-3", "33914-3"]),
                                             LabFeature(name="egfr_2021", loinc="98979-8", agg="max"),
                                             LabFeature(name="ldl", loinc="13457-7")])
    table, info = build_modelling_table(tables, spec)
    assert table["egfr"].tolist()[:3] == [61.0, 80.0, 90.0]  # last value across synonyms
    assert np.isnan(table.loc[3, "egfr"])  # a "98979-8" of another code system is not LOINC
    assert table["egfr_2021"].tolist()[0] == 50.0 and table["egfr_2021"].isna().sum() == 3
    assert info["labs"] == ["egfr", "egfr_2021"] and info["labs_missing"] == ["ldl"]
    assert info["lab_units"]["egfr"] == {"mL/min/{1.73_m2}": 4}


# -- features.auto ----------------------------------------------------------------------------------
def test_auto_discovers_prevalent_conditions_and_measured_labs(icd_tables):
    spec = FeatureSpec(auto=True, top_conditions=4, min_patients=20,
                       labs=[LabFeature(name="a1c", loinc="4548-4")])
    table, info = build_modelling_table(icd_tables, spec)
    cols = set(table.columns)
    assert {"a1c", "egfr", "bmi", "systolic_bp", "ldl", "glucose"} <= cols  # known synonyms by concept name
    assert "hba1c" not in cols  # 4548-4 is the spec's own a1c
    flags = [c for c in table.columns if c.startswith("cond_")]
    assert len(flags) == 4 and "cond_essential_primary_hypertension" in flags
    assert not any(c == condition_column(code) for c in flags for code in icd_tables["condition"]["code"])
    # the resolved features (auto off, choices explicit) rebuild the same columns, e.g. on synthetic tables
    resolved = FeatureSpec.model_validate(info["features"])
    assert resolved.auto is False and resolved.top_conditions == 0
    again, _ = build_modelling_table(icd_tables, resolved)
    assert list(again.columns) == list(table.columns)
    pd.testing.assert_frame_equal(again, table)


# -- refusal before fit -----------------------------------------------------------------------------
def test_check_lists_what_the_extract_has(icd_tables):
    data = yaml.safe_load((ROOT / "include/datasets/cohort_demo.yaml").read_text())
    data["features"]["labs"][4] = {"name": "egfr", "loinc": "62238-1"}
    data["features"]["conditions"][0]["codes"] = {"snomed": ["44054006"]}
    data["privacy"]["quasi_identifiers"] = ["age", "gender", "zip3"]
    data["quality"]["utility"] = {"target": "cond_copd"}
    spec = parse_spec(data)
    table, info = build_modelling_table(icd_tables, spec.features)
    with pytest.raises(FeatureError) as exc:
        check_features(spec, table, info, icd_tables)
    msg = str(exc.value)
    assert isinstance(exc.value, InputError)
    for part in ("features.labs.egfr: no numeric values for LOINC 62238-1",
                 "features.conditions.t2_diabetes: no patient has a condition coded snomed 44054006",
                 "privacy.quasi_identifiers: 'zip3'", "quality.utility.target: 'cond_copd'",
                 "quality.relationships.egfr_by_sex.measure: 'egfr'", "conditions (top", "icd10cm I10",
                 "numeric labs (top", "the extract has this lab as loinc 98979-8"):
        assert part in msg, (part, msg)
    assert "profiles.strict" not in msg  # profiles that do not change a reference are not repeated


def _ctx(tmp_path, extract, name="feat", **spec_kw):
    spec = load_spec(write_spec(tmp_path / "specs", name, extract, tmp_path / "staging", **spec_kw))
    return pipeline.RunContext(spec=spec, run_id="r1", version="v1", salt="s" * 32)


def test_prepare_refuses_before_fit(tmp_path, small_extract):
    ctx = _ctx(tmp_path, small_extract, privacy__sensitive_attributes=["cond_t2_diabetes", "hba1c", "a1c_typo"])
    ingested = pipeline.ingest(ctx)
    with pytest.raises(FeatureError, match="privacy.sensitive_attributes: 'a1c_typo'"):
        pipeline.prepare(ctx, ingested)
    assert not list((tmp_path / "staging").rglob("train.parquet"))  # nothing written for fit


def test_demo_spec_resolves_on_carebundle(tmp_path, small_extract):
    ctx = _ctx(tmp_path, small_extract)
    prepared = pipeline.prepare(ctx, pipeline.ingest(ctx))
    assert prepared["concepts"] == ["t2_diabetes", "hypertension"]
    assert prepared["labs"] == ["hba1c", "bmi", "systolic_bp", "ldl", "egfr", "glucose"]
    assert FeatureSpec.model_validate(ctx.store.read_json(prepared["features_uri"])).top_conditions == 0


@pytest.fixture(scope="module")
def clinosim_cohort(tmp_path_factory) -> Path:
    """A realistic US Core cohort no one on the project wrote: clinosim, seed 13 (~190 patients, ~30 s)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("clinosim")
    exe = Path(sys.executable).with_name("clinosim")
    subprocess.run([str(exe), "simulate", "--country", "US", "--population", "300", "--seed", "13", "--end",
                    "2025-12-31", "--format", "fhir-r4", "--output", str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / "fhir_r4"


def test_demo_spec_resolves_on_a_clinosim_cohort(tmp_path, clinosim_cohort):
    ctx = _ctx(tmp_path, clinosim_cohort, features__min_patients=50)
    prepared = pipeline.prepare(ctx, pipeline.ingest(ctx))
    assert prepared["labs"] == ["hba1c", "bmi", "systolic_bp", "ldl", "egfr", "glucose"]  # egfr: 48642-3
    assert {"cond_t2_diabetes", "cond_hypertension"} <= set(prepared["columns"])


def test_the_shipped_demo_spec_releases_on_a_snomed_coded_extract(small_extract, tmp_path):
    """Issue #16's bar: the shipped spec, with only the extract changed, releases on an extract whose conditions
    are coded only in SNOMED CT (every gate judged against the real-data reference)."""
    from synthfactory.cli import main
    from synthfactory.errors import EXIT_OK

    assert recode_conditions_to_snomed(small_extract, tmp_path / "snomed") > 0
    out = tmp_path / "out"
    code = main(["run", str(ROOT / "include/datasets/cohort_demo.yaml"), "--extract", str(tmp_path / "snomed"),
                 "--out", str(out), "--run-id", "snomed", "-q"])
    assert code == EXIT_OK
    released = next((out / "release").rglob("manifest.json"))
    manifest = json.loads(released.read_text())
    assert manifest["rows"] > 0 and manifest["synthesizer"] == "cart"
    features = json.loads(next((out / "staging").rglob("model/features.json")).read_text())
    assert {"t2_diabetes", "hypertension"} <= {c["name"] for c in features["conditions"]}
