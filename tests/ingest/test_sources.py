"""Bundle files, flat EHR extracts (CSV/Parquet), hostile NDJSON, and the pipeline's dispatch on
source.kind. clinosim itself is not run here (minutes per extract): the EHR tests use hand-written tables in
clinosim's CSV layout; bench/ingest_bench.py --clinosim runs the generator."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfactory.ingest.bundle import ingest_bundles, resolve_bundle
from synthfactory.ingest.ehr import ingest_ehr
from synthfactory.ingest.fhir_ndjson import ingest_extract
from synthfactory.fhir.normalize import ExtractError
from synthfactory.pipeline import RunContext, ingest
from synthfactory.spec import parse_spec

TYPES = ["Patient", "Encounter", "Condition", "Observation", "MedicationRequest"]


def sorted_rows(uri: str) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in pq.read_table(uri).to_pylist())


def quarantine(out: Path | str) -> list[dict]:
    return [orjson.loads(x) for x in Path(out, "quarantine.ndjson").read_bytes().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------------------
# Bundles
# ------------------------------------------------------------------------------------------------
def test_transaction_bundles_give_the_ndjson_tables(carebundle_bundles, carebundle_extract, tmp_path, keyer):
    b = ingest_bundles(str(carebundle_bundles), str(tmp_path / "b"), keyer=keyer, resources=TYPES,
                       validate_sample_rate=0.0)
    n = ingest_extract(str(carebundle_extract), str(tmp_path / "n"), keyer=keyer, resources=TYPES,
                       validate_sample_rate=0.0)
    assert b["rows"] == n["rows"] and b["quarantined_total"] == 0
    for t in n["tables"]:  # urn:uuid references resolved to exactly the NDJSON export's keys
        assert sorted_rows(b["tables"][t]) == sorted_rows(n["tables"][t]), t
    assert b["bundle_stats"]["bundles"] == 40 and b["bundle_stats"]["unresolved_references"] == 0
    assert b["skipped_resources"]["Practitioner"] == 40
    assert b["source_kind"] == "fhir_bundle"


def test_bundle_edge_cases(tmp_path, keyer):
    src = tmp_path / "bundles"
    src.mkdir()
    good = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:obs-1", "resource": {"resourceType": "Observation", "status": "final",
                                                   "code": {"text": "x"}, "valueInteger": 1,
                                                   "subject": {"reference": "urn:uuid:pat-1"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:pat-1", "resource": {"resourceType": "Patient", "gender": "female"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "http://ehr/fhir/Patient/p2", "resource": {"resourceType": "Patient", "id": "p2"},
         "request": {"method": "PUT", "url": "Patient/p2"}},
        {"fullUrl": "urn:uuid:obs-2", "resource": {"resourceType": "Observation", "status": "final",
                                                   "code": {"text": "y"},
                                                   "subject": {"reference": "urn:uuid:not-in-bundle"}}},
        {"request": {"method": "DELETE", "url": "Observation/old"}},
        {"fullUrl": "urn:uuid:nothing"},
    ]}
    (src / "a.json").write_bytes(orjson.dumps(good))
    (src / "b.json.gz").write_bytes(gzip.compress(orjson.dumps(
        {"resourceType": "Patient", "id": "p3", "gender": "male"})))  # a bare resource
    (src / "c.json").write_bytes(b'{"resourceType": "Bundle", "entry": [')  # truncated
    (src / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    r = ingest_bundles(str(src), str(out), keyer=keyer, validate_sample_rate=1.0, on_dangling="keep")
    assert r["rows"]["patient"] == 3 and r["rows"]["observation"] == 2
    obs = {o["observation_key"]: o for o in pq.read_table(r["tables"]["observation"]).to_pylist()}
    assert obs[keyer.key("Observation", "obs-1")]["patient_key"] == keyer.key("Patient", "pat-1")
    assert obs[keyer.key("Observation", "obs-2")]["patient_key"] == keyer.key("Patient", "not-in-bundle")
    assert r["bundle_stats"] == {"bundles": 2, "deleted": 1, "unresolved_references": 1,
                                 "entries_without_resource": 1}
    assert r["dangling_references"] == {"Observation": 1}
    q = {(x["file"], x["line"], x["reason"]) for x in quarantine(out)}
    assert q == {("a.json", 6, "entry without a resource"), ("c.json", 0, "invalid JSON")}
    assert r["skipped_files"] == ["notes.txt"] and len(r["files"]) == 3


def test_resolve_bundle_prefers_ids_and_request_urls():
    entries, stats = resolve_bundle({"resourceType": "Bundle", "entry": [
        {"fullUrl": "urn:uuid:u1", "resource": {"resourceType": "Patient", "id": "real-id"}},
        {"fullUrl": "urn:uuid:u2", "resource": {"resourceType": "Encounter", "subject": {"reference": "urn:uuid:u1"}},
         "request": {"method": "PUT", "url": "Encounter/e-9"}}]})
    assert entries[1][1]["id"] == "e-9" and entries[1][1]["subject"]["reference"] == "Patient/real-id"
    assert stats["unresolved_references"] == 0


# ------------------------------------------------------------------------------------------------
# flat EHR extracts (clinosim's CSV layout)
# ------------------------------------------------------------------------------------------------
def write_clinosim_csv(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "patients.csv").write_text(
        "patient_id,family_name,given_name,display_name,age,sex,blood_type,height_cm,weight_kg,bmi,insurance_type,"
        "smoking_status,alcohol_use,chronic_conditions\n"
        "POP-1,Quixote,Zeb,Zeb Quixote,56,M,O,179.3,68.7,21.4,medicaid,current,social,J44|I10\n"
        "POP-1,Quixote,Zeb,Zeb Quixote,56,M,O,179.3,68.7,21.4,medicaid,current,social,J44|I10\n"
        "POP-2,Brightwater,Ann,Ann Brightwater,71,F,A,160,,,,never,none,\n"
        "POP-3,Odd,Kim,Kim Odd,40,X,B,170,70,24.2,,never,none,\n")
    (folder / "encounters.csv").write_text(
        "encounter_id,patient_id,encounter_type,status,department_id,admission_datetime,discharge_datetime,"
        "chief_complaint,ward_id,bed_number,is_readmission,prior_encounter_id,readmission_number\n"
        "ENC-1,POP-1,outpatient,completed,internal_medicine,2025-07-16T10:44:00,2025-07-16T10:58:00,\"COPD, review\","
        ",,False,,0\n"
        "ENC-2,POP-2,inpatient,completed,surgery,2025-08-01 09:00,2025-08-03 12:00:00,Fall,W1,3,False,,0\n"
        "ENC-3,POP-9,outpatient,completed,x,2025-08-01T09:00:00,,,,,False,,0\n"
        "ENC-4,POP-2,outpatient,completed,x,not-a-date,,,,,False,,0\n")
    (folder / "diagnoses.csv").write_text(
        "patient_id,encounter_id,admission_diagnosis_code,admission_diagnosis_name,discharge_diagnosis_code,"
        "discharge_diagnosis_name,diagnosis_correct,ground_truth_diseases,condition_type,complications,deceased\n"
        "POP-1,ENC-1,J44,COPD,J44,Other chronic obstructive pulmonary disease,True,J44,chronic,,False\n")
    (folder / "lab_results.csv").write_text(
        "patient_id,lab_name,result_datetime,value,unit,flag\n"
        "POP-1,HbA1c,2025-11-01T12:32:00,6.9,%,H\n"
        "POP-2,Mystery,2025-11-02T08:00:00,1.0,U,\n"
        "POP-2,Glucose,2025-11-02T08:00:00,abc,mg/dL,\n")
    (folder / "vital_signs.csv").write_text(
        "patient_id,timestamp,temperature,heart_rate,systolic_bp,diastolic_bp,respiratory_rate,spo2,pain_score,"
        "consciousness_level,on_supplemental_oxygen,oxygen_flow_rate_lpm,nursing_note,data_source,news2_score,"
        "gcs_score\n"
        "POP-1,2025-07-16T10:49:00,,78,133,70,14,99.3,,A,False,,Zeb said hello,manual,0,15\n")


def test_ehr_csv_with_the_clinosim_preset(tmp_path, keyer):
    src = tmp_path / "csv"
    write_clinosim_csv(src)
    out = tmp_path / "out"
    r = ingest_ehr(str(src), str(out), mapping={"preset": "clinosim", "reference_date": "2025-12-31"},
                   keyer=keyer)
    pats = {p["patient_key"]: p for p in pq.read_table(r["tables"]["patient"]).to_pylist()}
    assert set(pats) == {keyer.key("Patient", "POP-1"), keyer.key("Patient", "POP-2")}
    p1 = pats[keyer.key("Patient", "POP-1")]
    assert (p1["gender"], str(p1["birth_date"]), p1["birth_date_precision"], p1["deceased"]) == \
        ("male", "1969-01-01", "year", False)
    encs = pq.read_table(r["tables"]["encounter"]).to_pylist()
    assert [(e["class_code"], e["status"], str(e["start"])) for e in encs] == [
        ("AMB", "finished", "2025-07-16 10:44:00+00:00"), ("IMP", "finished", "2025-08-01 09:00:00+00:00")]
    conds = pq.read_table(r["tables"]["condition"]).to_pylist()
    assert sorted(c["code"] for c in conds) == ["I10", "J44", "J44"]  # diagnosis + exploded chronic list
    obs = pq.read_table(r["tables"]["observation"]).to_pylist()
    by_code = {o["code"]: o for o in obs}
    assert by_code["4548-4"]["value_num"] == 6.9 and by_code["4548-4"]["code_system"] == "loinc"
    assert by_code["Mystery"]["code_system"] == "local"
    assert by_code["8480-6"]["value_num"] == 133.0 and by_code["8480-6"]["unit"] == "mm[Hg]"  # melted vitals
    assert by_code["39156-5"]["value_num"] == 21.4  # BMI from patients.csv, once despite the repeated row
    reasons = sorted((q["file"], q["line"], q["resource_type"], q["reason"]) for q in quarantine(out))
    assert reasons == [("encounters.csv", 4, "Encounter", "dangling reference to Patient"),
                       ("encounters.csv", 5, "Encounter", "invalid date in start"),
                       ("lab_results.csv", 4, "Observation", "invalid value in value_num"),
                       # POP-3 (sex X) is refused, so its melted BMI/height/weight rows point at no patient
                       *[("patients.csv", 5, "Observation", "dangling reference to Patient")] * 3,
                       ("patients.csv", 5, "Patient", "invalid value in gender")]
    assert r["ehr_stats"]["duplicate_rows"] >= 1
    # direct identifiers reach identifiers.parquet, never the tables
    ident = {i["value"] for i in pq.read_table(r["identifiers_uri"]).to_pylist()}
    assert {"Zeb Quixote", "Quixote", "POP-1", "ENC-1"} <= ident
    cells = {v for t in r["tables"].values() for row in pq.read_table(t).to_pylist() for v in row.values()
             if isinstance(v, str)}
    assert not ({"Zeb Quixote", "Quixote", "Zeb", "POP-1", "ENC-1", "Zeb said hello"} & cells)


def test_ehr_parquet_with_an_explicit_mapping(tmp_path, keyer):
    src = tmp_path / "pq"
    src.mkdir()
    pq.write_table(pa.table({"pid": ["a", "b"], "sex": ["female", "male"], "dob": ["1980-02-03", "1975"],
                             "name": ["Alice Zed", "Bob Yew"]}), src / "people.parquet")
    pq.write_table(pa.table({"pid": ["a", "b"], "loinc": ["4548-4", "2345-7"], "val": [6.1, 99.0],
                             "at": pa.array([1_700_000_000_000_000, None], pa.timestamp("us"))}), src / "labs.parquet")
    mapping = {"tables": {
        "patient": [{"file": "people.parquet", "id": "pid", "columns": {"gender": "sex", "birth_date": "dob"},
                     "identifiers": ["name"]}],
        "observation": [{"file": "labs.parquet", "patient": "pid", "columns": {"code": "loinc", "value_num": "val",
                                                                               "effective": "at"},
                         "constants": {"code_system": "loinc", "category": "laboratory"}}]}}
    r = ingest_ehr(str(src), str(tmp_path / "out"), mapping=mapping, keyer=keyer, file_format="parquet")
    pats = pq.read_table(r["tables"]["patient"]).to_pylist()
    assert [(p["birth_date_precision"], p["gender"]) for p in pats] == [("day", "female"), ("year", "male")]
    obs = pq.read_table(r["tables"]["observation"]).to_pylist()
    assert [o["code"] for o in obs] == ["4548-4", "2345-7"] and obs[1]["effective"] is None
    assert obs[0]["patient_key"] == keyer.key("Patient", "a")
    with pytest.raises(ExtractError, match="unknown target column"):
        ingest_ehr(str(src), str(tmp_path / "bad"), keyer=keyer, file_format="parquet",
                   mapping={"tables": {"patient": [{"file": "people.parquet", "id": "pid",
                                                    "columns": {"nickname": "name"}}]}})


# ------------------------------------------------------------------------------------------------
# hostile NDJSON
# ------------------------------------------------------------------------------------------------
def test_a_50_mb_line_is_quarantined_unread_and_the_rest_loads(tmp_path, keyer):
    src = tmp_path / "x"
    src.mkdir()
    huge = orjson.dumps({"resourceType": "Patient", "id": "huge", "text": {"div": "A" * (50 << 20)}})
    with open(src / "Patient.ndjson", "wb") as fh:
        fh.write(orjson.dumps({"resourceType": "Patient", "id": "p1", "gender": "female"}) + b"\n")
        fh.write(huge + b"\n")
        fh.write(orjson.dumps({"resourceType": "Patient", "id": "p2", "gender": "male"}) + b"\n")
        fh.write(huge[:1000])  # a truncated last line, no newline
    del huge
    out = tmp_path / "out"
    r = ingest_extract(str(src), str(out), keyer=keyer, validate_sample_rate=0.0, max_line_bytes=1 << 20)
    assert r["rows"]["patient"] == 2
    assert [(q["line"], q["reason"]) for q in quarantine(out)] == [(2, "line longer than 1048576 bytes"),
                                                                   (4, "invalid JSON")]
    assert r["quarantine_reasons"] == {"Patient": {"line longer than 1048576 bytes": 1, "invalid JSON": 1}}


def test_dangling_references_are_quarantined_or_kept(tmp_path, keyer):
    src = tmp_path / "x"
    src.mkdir()
    (src / "Patient.ndjson").write_bytes(orjson.dumps({"resourceType": "Patient", "id": "p1"}) + b"\n")
    obs = [{"resourceType": "Observation", "id": f"o{i}", "status": "final", "code": {"text": "x"},
            "subject": {"reference": ref}} for i, ref in enumerate(["Patient/p1", "Patient/ghost", "Group/g"])]
    (src / "Observation.ndjson").write_bytes(b"\n".join(orjson.dumps(o) for o in obs) + b"\n")
    out = tmp_path / "q"
    r = ingest_extract(str(src), str(out), keyer=keyer)
    assert r["rows"]["observation"] == 2 and r["dangling_references"] == {"Observation": 1}
    assert [(q["line"], q["reason"]) for q in quarantine(out)] == [(2, "dangling reference to Patient")]
    kept = ingest_extract(str(src), str(tmp_path / "k"), keyer=keyer, on_dangling="keep")
    assert kept["rows"]["observation"] == 3 and kept["quarantined_total"] == 0


# ------------------------------------------------------------------------------------------------
# the pipeline's ingest stage dispatches on source.kind
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fhir_bundle", "ehr_csv"])
def test_pipeline_ingest_dispatches_on_kind(kind, tmp_path, carebundle_bundles):
    src = carebundle_bundles
    extra: dict = {}
    if kind == "ehr_csv":
        src = tmp_path / "csv"
        write_clinosim_csv(src)
        extra = {"ehr": {"preset": "clinosim"}}
    spec = parse_spec({"name": "kind_test", "release": {"bucket": "sandbox-bucket"},
                       "source": {"kind": kind, "uri": str(src), **extra}})
    ctx = RunContext(spec=spec, run_id="r1", version="v1", staging_root=str(tmp_path / "staging"),
                     salt="a-test-salt-of-enough-length")
    m = ingest(ctx)
    assert m["rows"]["patient"] >= 2 and set(m["tables"]) >= {"patient", "encounter", "condition", "observation"}
    report = json.loads(Path(m["report_uri"]).read_text())
    assert report["source_kind"] == kind
