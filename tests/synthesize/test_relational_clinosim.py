"""Relational mode on a realistic extract no one on the project wrote (clinosim, 85 patients, six tables):
a coded concept is one unit (no unseen (code, system, display, unit)), no real free text is modelled or
released, and the FHIR output stays valid with every reference resolved."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from synthfactory.synthesize import fhir_out, relational

RESOURCES = ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Procedure")
TABLES = ("patient", "encounter", "condition", "observation", "medication_request", "procedure")


@pytest.fixture(scope="module")
def cohort() -> Path:
    """clinosim, population 150, seed 13 (85 patients, ~25 s CPU): generated once into the temp folder and
    reused (the same seed gives the same cohort)."""
    out = Path(tempfile.gettempdir()) / "synthfactory_test_cohorts" / "clinosim_p150_s13"
    if not (out / "fhir_r4" / "Patient.ndjson").exists():
        part = out.with_name(out.name + f".part{os.getpid()}")
        shutil.rmtree(part, ignore_errors=True)
        exe = Path(sys.executable).with_name("clinosim")
        subprocess.run([str(exe), "simulate", "--country", "US", "--population", "150", "--seed", "13", "--end",
                        "2025-12-31", "--format", "fhir-r4", "--output", str(part)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(part, out)
    return out / "fhir_r4"


@pytest.fixture(scope="module")
def real(cohort, tmp_path_factory):
    from synthfactory.ingest.fhir_ndjson import ingest_extract
    from synthfactory.keys import Keyer

    out = tmp_path_factory.mktemp("clinosim_rel_tables")
    ingest_extract(str(cohort), str(out), keyer=Keyer(b"test-salt-0123456789abcdef"), resources=RESOURCES)
    return {t: pd.read_parquet(out / f"{t}.parquet") for t in TABLES}


@pytest.fixture(scope="module")
def free_text(cohort) -> set[str]:
    """Every free-text value of the real extract: valueString, notes, narratives (the Patient's US Core
    race/ethnicity ``text`` extensions are categories, not free text)."""
    found: set[str] = set()

    def walk(x, key=""):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("valueString", "note", "div") or (k == "text" and key == "note"):
                    if isinstance(v, str):
                        found.add(v)
                walk(v, k)
        elif isinstance(x, list):
            for v in x:
                walk(v, key)

    for name in RESOURCES[1:]:
        with open(cohort / f"{name}.ndjson", "rb") as fh:
            for line in fh:
                walk(orjson.loads(line))
    return found


@pytest.fixture(scope="module")
def synthetic(real):
    model = relational.fit(real, root_kind="cart")  # the pipeline default kind; cart children (default)
    return relational.sample(model, 120, batch_size=60, seed=2)


def test_the_cohort_has_the_traps(real, free_text):
    """The real extract has what broke relational mode: free text (which ingest now keeps out of value_code),
    codes without a code."""
    assert free_text  # the extract has valueString / note text ...
    assert not free_text & set(real["observation"]["value_code"].dropna())  # ... which never reaches a table
    assert real["medication_request"]["code"].isna().any()


def test_every_coded_concept_is_a_real_unit(real, synthetic):
    syn, fixes = synthetic
    unseen = relational.unseen_concepts(real, syn)
    assert {"observation.code", "condition.code", "medication_request.code", "procedure.code",
            "encounter.type_code"} <= set(unseen)
    assert all(v["unseen"] == 0 for v in unseen.values()), unseen
    assert unseen["observation.code"]["rows"] > 1000
    obs, r = syn["observation"], real["observation"]
    # display and unit are the real most frequent ones of the code
    top = r.groupby(["code", "display"]).size().reset_index().sort_values(0).drop_duplicates("code", keep="last")
    assert (obs["display"] == obs["code"].map(top.set_index("code")["display"])).all()
    # coded values only where the code has coded values in the real data, and one of them
    pairs = set(zip(r["code"], r["value_code"]))
    coded = obs.dropna(subset=["value_code"])
    assert len(coded) and all(p in pairs for p in zip(coded["code"], coded["value_code"]))
    numeric = set(r.dropna(subset=["value_num"])["code"])
    assert obs.dropna(subset=["value_num"])["code"].isin(numeric).all()


def test_no_real_free_text_in_any_table_or_the_fhir_output(synthetic, free_text, tmp_path):
    syn, _ = synthetic
    assert free_text
    for name, df in syn.items():
        for c in df.columns:
            if df[c].dtype == object:
                leaked = set(df[c].dropna().map(str)) & free_text
                assert not leaked, (name, c, sorted(leaked)[:3])
    out = fhir_out.write_fhir_ndjson(syn, str(tmp_path / "fhir"))
    for rtype, path in out["files"].items():
        for r in fhir_out.read_ndjson(path):
            assert "valueString" not in r or rtype == "Patient"
            if rtype == "Observation" and "valueCodeableConcept" in r:
                assert r["valueCodeableConcept"]["coding"][0]["code"] not in free_text


def test_fhir_output_is_valid_with_references_resolved(synthetic, tmp_path):
    syn, _ = synthetic
    out = fhir_out.write_fhir_ndjson(syn, str(tmp_path / "fhir"))
    assert set(out["resources"]) == set(RESOURCES)
    assert out["structural_checked"] == sum(len(v) for v in syn.values())
    assert all(n > 0 for n in out["validated_r4b"].values())
    ids = {rt: {r["id"] for r in fhir_out.read_ndjson(p)} for rt, p in out["files"].items()}
    for rtype in ("Encounter", "Condition", "Observation", "MedicationRequest", "Procedure"):
        for r in fhir_out.read_ndjson(out["files"][rtype]):
            assert r["subject"]["reference"].split("/")[1] in ids["Patient"]
            if "encounter" in r:
                assert r["encounter"]["reference"].split("/")[1] in ids["Encounter"]


def test_children_counts_values_per_code_and_order_keep_the_record(real, synthetic):
    syn, _ = synthetic
    ks = relational.children_ks(real, syn)
    for name in ("encounter", "condition", "observation", "medication_request"):
        assert ks[name]["ks"] < 0.2, ks  # CART root counts, rows drawn given the patient's context
    r, s = real["observation"], syn["observation"]
    for code in r["code"].value_counts().index[:8]:  # values per code: the real median within 15 % of its spread
        rv, sv = r.loc[r["code"] == code, "value_num"].dropna(), s.loc[s["code"] == code, "value_num"].dropna()
        if len(rv) >= 30 and len(sv) >= 30 and rv.std() > 0:
            assert abs(sv.median() - rv.median()) <= 0.5 * rv.std() + 1e-9, (code, rv.median(), sv.median())
            assert sv.between(rv.min(), rv.max()).all()
    # order within a patient: each patient's rows by time
    for name, t in (("encounter", "start"), ("observation", "effective")):
        d = syn[name]
        assert (d.groupby("patient_key")[t].diff().dropna() >= pd.Timedelta(0)).all()


def test_a_conditions_status_link_and_time_follow_its_code(real, synthetic):
    """Acute conditions (resolved, linked to an encounter of the record's year) and chronic ones (active, an
    onset years before, no encounter): the code decides, in the real data and in the synthetic record. With the
    link drawn at random at the real rate, ~15 % of the chronic conditions were moved to an encounter; without
    the code's profile, CART mixed the status across the 50+ codes."""
    syn, _ = synthetic

    def purity(df: pd.DataFrame, col: str) -> float:
        g = df.groupby("code")[col].agg(lambda x: x.value_counts(normalize=True).iloc[0])
        n = df.groupby("code").size()
        return float((g * n).sum() / n.sum())

    r, s = real["condition"], syn["condition"]
    assert purity(r, "clinical_status") > 0.97
    assert purity(s, "clinical_status") > 0.9
    for df in (r, s):
        linked = df["encounter_key"].notna()
        assert ((df["clinical_status"] == "active") & linked).mean() < 0.03
        assert ((df["clinical_status"] == "resolved") & ~linked).mean() < 0.03
        assert linked.mean() > 0.05


def test_which_labs_a_patient_has_is_a_patient_level_decision(real, monkeypatch):
    """A second patient-level model draws each patient's count of the observation codes whose presence varies
    most between patients and of the near-universal ones (and of the other codes), given its context and children
    counts, so the share of patients with a lab and its rows per patient follow the real ones; drawn row by row,
    a lab measured in few patients many times (HbA1c in diabetics) spread thinly over many patients. (From 300
    patients by default; this cohort has 85.)"""
    assert relational.derive_layout(real).children["observation"].count_codes == {}  # 85 < 300 patients
    monkeypatch.setattr(relational, "COUNT_CODES_MIN_PATIENTS", 50)
    layout = relational.derive_layout(real)
    counted = layout.children["observation"].count_codes
    assert counted and not layout.children["medication_request"].count_codes
    root = relational.root_frame(real, layout)
    frame = relational.code_count_frame(real, layout, root, relational.context_frame(root, layout))
    other = frame[relational.other_count_column("observation")]
    assert (other >= 0).all()
    assert (frame[list(counted)].sum(axis=1) + other == frame[relational.count_column("observation")]).all()
    model = relational.fit(real, root_kind="cart")
    assert model.code_counts is not None
    syn, _ = relational.sample(model, 120, batch_size=60, seed=2)
    assert syn["observation"]["code"].isin(set(counted.values())).mean() > 0.5
    gaps = []
    for code in counted.values():
        shares = [df["observation"].loc[df["observation"]["code"] == code, "patient_key"].nunique()
                  / len(df["patient"]) for df in (real, syn)]
        gaps.append(abs(shares[0] - shares[1]))
    assert max(gaps) < 0.2 and float(np.mean(gaps)) < 0.07, gaps
