"""Tests of the streaming FHIR NDJSON ingest (synthfactory.ingest.fhir_ndjson)."""

from __future__ import annotations

import gzip
import hashlib
import os
from datetime import date, datetime, timezone
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from synthfactory.ingest import schemas
from synthfactory.ingest.fhir_ndjson import ingest_extract
from synthfactory.fhir.normalize import ExtractError, parse_fhir_date, parse_fhir_datetime
from synthfactory.keys import Keyer
from synthfactory.storage import Store

SALT = b"test-salt-0123456789abcdef"
TABLE_NAMES = ("patient", "encounter", "condition", "observation")
SCHEMA_OF = {"patient": schemas.PATIENT_SCHEMA, "encounter": schemas.ENCOUNTER_SCHEMA,
             "condition": schemas.CONDITION_SCHEMA, "observation": schemas.OBSERVATION_SCHEMA}

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"


# ------------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------------
def write_ndjson(folder: Path, name: str, items: list, gz: bool = False) -> Path:
    """Write NDJSON: dict items are serialised, str/bytes items are written verbatim (malformed lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for it in items:
        if isinstance(it, (dict, list)):
            lines.append(orjson.dumps(it))
        elif isinstance(it, str):
            lines.append(it.encode())
        else:
            lines.append(it)
    data = b"\n".join(lines) + b"\n"
    path = folder / name
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def read(out: Path | str, table: str) -> list[dict]:
    return pq.read_table(os.path.join(out, f"{table}.parquet")).to_pylist()


def string_cells(out: Path | str) -> set[str]:
    cells: set[str] = set()
    for t in TABLE_NAMES:
        tbl = pq.read_table(os.path.join(out, f"{t}.parquet"))
        for field in tbl.schema:
            if str(field.type) == "string":
                cells.update(v for v in tbl.column(field.name).to_pylist() if v is not None)
    return cells


def quarantine_records(out: Path | str) -> list[dict]:
    data = Path(out, "quarantine.ndjson").read_bytes()
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def patient(pid: str, **extra) -> dict:
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1970-01-01", **extra}


@pytest.fixture(scope="session")
def carebundle_ingested(carebundle_extract, tmp_path_factory, keyer) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cb_out") / "staging"
    report = ingest_extract(str(carebundle_extract), str(out), keyer=keyer)
    return out, report


@pytest.fixture(scope="session")
def edge_extract(tmp_path_factory) -> Path:
    """A hand-written extract covering the flattening rules."""
    src = tmp_path_factory.mktemp("edge") / "extract"
    pat1 = {
        "resourceType": "Patient", "id": "pat-one",
        "identifier": [{"system": "urn:example:mrn", "value": "MRN-778899"}],
        "name": [{"family": "Quixotebury", "given": ["Zebulon", "Quincy"]}, {"family": "Ng", "given": ["Zeb"]}],
        "telecom": [{"system": "phone", "value": "555-0100-777"}, {"system": "email", "value": "zeb@example.org"}],
        "gender": "male", "birthDate": "1950",
        "address": [{"line": ["12 Hidden Lane", "Apt 9"], "city": "Springfield", "state": "MA"}],
        "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                                      "code": "M"}]},
        "deceasedDateTime": "2020-03-04T23:30:00-05:00",
        "extension": [
            {"url": US_CORE + "us-core-race", "extension": [
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                       "code": "2106-3", "display": "White"}},
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                       "code": "2054-5", "display": "Black or African American"}},
                {"url": "text", "valueString": "Mixed"}]},
            {"url": US_CORE + "us-core-ethnicity", "extension": [
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                       "code": "2186-5", "display": "Not Hispanic or Latino"}},
                {"url": "text", "valueString": "Not Hispanic or Latino"}]},
            {"url": US_CORE + "us-core-birthsex", "valueCode": "M"},
        ],
    }
    pat2 = {"resourceType": "Patient", "id": "pat-two", "gender": "female", "birthDate": "1988-07",
            "deceasedBoolean": False, "maritalStatus": {"text": "Single"}}
    pat3 = {"resourceType": "Patient", "id": "pat-three", "gender": "unknown", "birthDate": "2001-02-03",
            "deceasedBoolean": True}
    write_ndjson(src, "Patient.ndjson", [pat1, pat2])
    write_ndjson(src, "Patient-2.ndjson.gz", [pat3], gz=True)

    enc1 = {"resourceType": "Encounter", "id": "enc-one", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "type": [{"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99213",
                                  "display": "Office visit"},
                                 {"system": SNOMED, "code": "185349003"}], "text": "Checkup"}],
            "subject": {"reference": "http://example.org/fhir/Patient/pat-one/_history/3"},
            "period": {"start": "2020-01-01T10:00:00+02:00", "end": "2020-01-01T12:30:00.5+02:00"}}
    enc2 = {"resourceType": "Encounter", "id": "enc-two", "status": "in-progress",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [{"text": "Walk-in"}],
            "subject": {"reference": "Patient/pat-two"}, "period": {"start": "2021-05"}}
    write_ndjson(src, "Encounter.000.ndjson", [enc1])
    write_ndjson(src, "Encounter_001.ndjson", [enc2])

    cond1 = {"resourceType": "Condition", "id": "cond-one",
             "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                            "code": "active"}]},
             "code": {"coding": [{"system": ICD10CM, "code": "E11.9", "display": "Type 2 diabetes (ICD)"},
                                 {"system": SNOMED, "code": "44054006", "display": "Diabetes mellitus type 2"}]},
             "subject": {"reference": "Patient/pat-one"}, "encounter": {"reference": "Encounter/enc-one/_history/1"},
             "onsetPeriod": {"start": "2019-06-01"}}
    cond2 = {"resourceType": "Condition", "id": "cond-two",
             "code": {"coding": [{"system": ICD10CM, "code": "I10"}], "text": "Hypertension"},
             "subject": {"reference": "Patient/pat-two"}, "onsetDateTime": "2018"}
    write_ndjson(src, "Condition.ndjson", [cond1, cond2])

    def obs(oid, **kw):
        base = {"resourceType": "Observation", "id": oid, "status": "final",
                "subject": {"reference": "Patient/pat-one"}, "encounter": {"reference": "Encounter/enc-one"},
                "effectiveDateTime": "2020-01-01T10:05:00Z"}
        base.update(kw)
        return base

    def cc(system, code, display=None):
        c = {"system": system, "code": code}
        if display:
            c["display"] = display
        return {"coding": [c]}

    observations = [
        obs("obs-bp", category=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                             "code": "vital-signs"}]}],
            code=cc(LOINC, "85354-9", "Blood pressure panel"),
            component=[{"code": cc(LOINC, "8480-6", "Systolic"), "valueQuantity": {"value": 120, "unit": "mmHg"}},
                       {"code": cc(LOINC, "8462-4", "Diastolic"),
                        "valueQuantity": {"value": 80.5, "code": "mm[Hg]"}}]),
        obs("obs-bp-partial", code=cc(LOINC, "85354-9"),
            component=[{"code": cc(LOINC, "8480-6"), "dataAbsentReason": {"text": "not measured"}},
                       {"code": cc(LOINC, "8462-4"), "valueQuantity": {"value": 70}}]),
        obs("obs-cc", code=cc(LOINC, "5778-6"), valueCodeableConcept=cc(SNOMED, "371244009", "Yellow"),
            effectiveDateTime=None, effectivePeriod={"start": "2020-02-02T08:00:00+01:00"}),
        obs("obs-str", code=cc(LOINC, "94500-6"), valueString="Detected",
            effectiveDateTime=None, effectiveInstant="2020-01-01T10:05:00.123456789Z"),
        obs("obs-bool", code=cc(LOINC, "11111-1"), valueBoolean=True),
        obs("obs-int", code=cc(LOINC, "22222-2"), valueInteger=3),
        obs("obs-multi", code={"coding": [{"system": SNOMED, "code": "27113001", "display": "Body weight (sct)"},
                                          {"system": LOINC, "code": "29463-7", "display": "Body weight"}]},
            valueQuantity={"value": 72.5, "unit": "kg"}),
        obs("obs-noval", code=cc(LOINC, "33333-3"), subject={"reference": "urn:uuid:pat-two"}),
    ]
    for o in observations:
        if o.get("effectiveDateTime") is None:
            o.pop("effectiveDateTime", None)
    write_ndjson(src, "Observation.ndjson", observations[:4])
    write_ndjson(src, "Observation-2.ndjson.gz", observations[4:], gz=True)

    # files that are not ingested
    write_ndjson(src, "Practitioner.ndjson", [{"resourceType": "Practitioner", "id": "doc"}])
    write_ndjson(src, "PatientNotes.ndjson", [patient("not-ingested")])
    (src / "README.txt").write_text("not data")
    write_ndjson(src / "nested", "Patient.ndjson", [patient("nested-patient")])
    return src


@pytest.fixture(scope="session")
def edge_ingested(edge_extract, tmp_path_factory, keyer) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("edge_out") / "staging"
    report = ingest_extract(str(edge_extract), str(out), keyer=keyer, validate_sample_rate=1.0)
    return out, report


# ------------------------------------------------------------------------------------------------
# a real generated extract
# ------------------------------------------------------------------------------------------------
def test_carebundle_counts_schemas_and_report(carebundle_extract, carebundle_ingested):
    out, report = carebundle_ingested
    n_lines = {t: sum(1 for line in (carebundle_extract / f"{t}.ndjson").read_bytes().splitlines() if line.strip())
               for t in ("Patient", "Encounter", "Condition", "Observation")}
    assert report["resources_read"] == n_lines
    assert report["quarantined_total"] == 0
    assert report["quarantined"] == {t: 0 for t in n_lines}
    assert report["files"] == ["Condition.ndjson", "Encounter.ndjson", "Observation.ndjson", "Patient.ndjson"]
    assert "Practitioner.ndjson" in report["skipped_files"]
    assert "DiagnosticReport.ndjson" in report["skipped_files"]
    assert report["rows"]["patient"] == n_lines["Patient"]
    assert report["rows"]["encounter"] == n_lines["Encounter"]
    assert report["rows"]["condition"] == n_lines["Condition"]
    assert report["validated"] >= sum(min(20, n) for n in n_lines.values())
    assert report["resources_per_second"] > 0
    # the report on disk is the returned dict
    assert orjson.loads(Path(out, "ingest_report.json").read_bytes()) == report
    for t in TABLE_NAMES:
        assert report["tables"][t] == str(Path(out, f"{t}.parquet"))
        tbl = pq.read_table(report["tables"][t])
        assert tbl.schema.equals(SCHEMA_OF[t]), t
        assert tbl.num_rows == report["rows"][t]
    assert not list(Path(out).glob("*.partial"))


def test_carebundle_observation_rows_and_components(carebundle_extract, carebundle_ingested):
    out, report = carebundle_ingested
    expected = 0
    panel_codes: set[str] = set()
    for line in (carebundle_extract / "Observation.ndjson").read_bytes().splitlines():
        o = orjson.loads(line)
        comps = [c for c in o.get("component", []) if "valueQuantity" in c or "valueCodeableConcept" in c]
        if o.get("component"):
            panel_codes.add(o["code"]["coding"][0]["code"])
        expected += len(comps) + (1 if not o.get("component") else 0)
    rows = read(out, "observation")
    assert len(rows) == expected == report["rows"]["observation"]
    codes = {r["code"] for r in rows}
    assert panel_codes and not (panel_codes & codes)  # the BP panel itself gives no row
    assert {"8480-6", "8462-4"} <= codes
    assert all(r["code_system"] == "loinc" for r in rows)
    assert len({r["observation_key"] for r in rows}) == len(rows)
    bp = [r for r in rows if r["code"] == "8480-6"]
    assert all(r["value_num"] is not None and r["unit"] == "mmHg" for r in bp)


def test_carebundle_keys_join_and_match_keyer(carebundle_extract, carebundle_ingested, keyer):
    out, _ = carebundle_ingested
    pats = read(out, "patient")
    encs = read(out, "encounter")
    conds = read(out, "condition")
    obs = read(out, "observation")
    pkeys = {r["patient_key"] for r in pats}
    ekeys = {r["encounter_key"] for r in encs}
    assert len(pkeys) == len(pats)
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in pkeys | ekeys)
    assert {r["patient_key"] for r in encs} <= pkeys
    assert {r["patient_key"] for r in conds} <= pkeys
    assert {r["patient_key"] for r in obs} <= pkeys
    assert {r["encounter_key"] for r in obs if r["encounter_key"]} <= ekeys
    assert {r["encounter_key"] for r in conds if r["encounter_key"]} <= ekeys
    assert all(r["patient_key"] for r in encs + conds + obs)
    # keys are exactly Keyer("Patient", id)
    ids = [orjson.loads(line)["id"] for line in (carebundle_extract / "Patient.ndjson").read_bytes().splitlines()]
    assert pkeys == {keyer.key("Patient", i) for i in ids}
    assert all(r["birth_date_precision"] == "day" and r["birth_date"] is not None for r in pats)
    assert {r["gender"] for r in pats} <= {"male", "female", "other", "unknown"}
    assert all(r["deceased"] is False for r in pats)


def test_carebundle_no_direct_identifier_leaks(carebundle_extract, carebundle_ingested):
    out, report = carebundle_ingested
    ident = pq.read_table(report["identifiers_uri"]).to_pylist()
    values = {r["value"] for r in ident}
    assert len(values) == len(ident)  # deduplicated
    kinds = {r["kind"] for r in ident}
    assert {"id", "identifier", "name", "family"} <= kinds
    real: set[str] = set()
    for t in ("Patient", "Encounter", "Condition", "Observation"):
        for line in (carebundle_extract / f"{t}.ndjson").read_bytes().splitlines():
            o = orjson.loads(line)
            real.add(o["id"])
            real.update(i["value"] for i in o.get("identifier", []))
            for n in o.get("name", []):
                real.add(" ".join([*n.get("given", []), n["family"]]))
    assert real <= values
    cells = string_cells(out)
    assert not (cells & values)
    ids_and_mrns = {r["value"] for r in ident if r["kind"] in ("id", "identifier")}
    for cell in cells:  # no id hidden inside a longer string either
        assert not any(v in cell for v in ids_and_mrns if len(v) >= 8), "a source id leaked into a table"


def test_carebundle_sha256_over_sorted_files(carebundle_extract, carebundle_ingested):
    _, report = carebundle_ingested
    h = hashlib.sha256()
    for name in sorted(report["files"]):
        file_sha = hashlib.sha256((carebundle_extract / name).read_bytes()).hexdigest()
        assert report["file_sha256"][name] == file_sha
        h.update(f"{name}\0{file_sha}\n".encode())
    assert report["extract_sha256"] == h.hexdigest()


def test_same_salt_same_keys_other_salt_other_keys(carebundle_extract, carebundle_ingested, tmp_path):
    out, _ = carebundle_ingested
    again = tmp_path / "again"
    ingest_extract(str(carebundle_extract), str(again), keyer=Keyer(SALT), resources=["Patient"],
                   validate_sample_rate=0.0)
    assert read(again, "patient") == read(out, "patient")
    other = tmp_path / "other"
    ingest_extract(str(carebundle_extract), str(other), keyer=Keyer(b"another-salt-9876543210"),
                   resources=["Patient"], validate_sample_rate=0.0)
    assert not ({r["patient_key"] for r in read(other, "patient")} & {r["patient_key"] for r in read(out, "patient")})


def test_small_batches_give_same_rows_in_many_row_groups(carebundle_extract, carebundle_ingested, tmp_path, keyer):
    out, _ = carebundle_ingested
    small = tmp_path / "small"
    report = ingest_extract(str(carebundle_extract), str(small), keyer=keyer, batch_rows=97)
    assert pq.ParquetFile(report["tables"]["observation"]).num_row_groups > 5
    for t in TABLE_NAMES:
        assert read(small, t) == read(out, t)


# ------------------------------------------------------------------------------------------------
# hand-written edge cases
# ------------------------------------------------------------------------------------------------
def test_edge_files_matched_and_skipped(edge_extract, edge_ingested):
    _, report = edge_ingested
    assert report["files"] == ["Condition.ndjson", "Encounter.000.ndjson", "Encounter_001.ndjson",
                               "Observation-2.ndjson.gz", "Observation.ndjson", "Patient-2.ndjson.gz",
                               "Patient.ndjson"]
    assert report["skipped_files"] == ["PatientNotes.ndjson", "Practitioner.ndjson", "README.txt",
                                       "nested/Patient.ndjson"]
    assert report["quarantined_total"] == 0
    assert report["resources_read"] == {"Patient": 3, "Encounter": 2, "Condition": 2, "Observation": 8}
    assert report["validated"] == 15  # rate 1.0: everything
    h = hashlib.sha256()  # over each file's stored bytes (gzip files compressed), in sorted name order
    for name in report["files"]:
        h.update(f"{name}\0{hashlib.sha256((edge_extract / name).read_bytes()).hexdigest()}\n".encode())
    assert report["extract_sha256"] == h.hexdigest()


def test_edge_patient_columns(edge_ingested, keyer):
    out, _ = edge_ingested
    pats = {r["patient_key"]: r for r in read(out, "patient")}
    assert set(pats) == {keyer.key("Patient", p) for p in ("pat-one", "pat-two", "pat-three")}
    one = pats[keyer.key("Patient", "pat-one")]
    assert one == {
        "patient_key": keyer.key("Patient", "pat-one"), "gender": "male",
        "birth_date": date(1950, 1, 1), "birth_date_precision": "year",
        "deceased": True, "deceased_date": date(2020, 3, 4),
        "race": "White", "ethnicity": "Not Hispanic or Latino", "birth_sex": "M",
        "marital_status": "M", "state": "MA",
    }
    two = pats[keyer.key("Patient", "pat-two")]
    assert (two["birth_date"], two["birth_date_precision"]) == (date(1988, 7, 1), "month")
    assert two["deceased"] is False and two["deceased_date"] is None
    assert two["race"] is None and two["ethnicity"] is None and two["birth_sex"] is None
    assert two["marital_status"] is None  # maritalStatus.text alone is free text: never in a table
    three = pats[keyer.key("Patient", "pat-three")]
    assert (three["birth_date"], three["birth_date_precision"]) == (date(2001, 2, 3), "day")
    assert three["deceased"] is True and three["deceased_date"] is None


def test_edge_encounters_references_and_utc(edge_ingested, keyer):
    out, _ = edge_ingested
    encs = {r["encounter_key"]: r for r in read(out, "encounter")}
    one = encs[keyer.key("Encounter", "enc-one")]
    # absolute URL with /_history/ resolves to the same key as Patient/pat-one
    assert one["patient_key"] == keyer.key("Patient", "pat-one")
    assert (one["status"], one["class_code"]) == ("finished", "IMP")
    assert (one["type_code"], one["type_display"]) == ("99213", "Office visit")  # first coding of type[0]
    assert one["start"] == datetime(2020, 1, 1, 8, 0, tzinfo=timezone.utc)
    assert one["end"] == datetime(2020, 1, 1, 10, 30, 0, 500000, tzinfo=timezone.utc)
    two = encs[keyer.key("Encounter", "enc-two")]
    assert two["patient_key"] == keyer.key("Patient", "pat-two")
    assert (two["type_code"], two["type_display"]) == (None, None)  # type[0].text is free text
    assert two["start"] == datetime(2021, 5, 1, tzinfo=timezone.utc) and two["end"] is None


def test_edge_conditions_preferred_coding(edge_ingested, keyer):
    out, _ = edge_ingested
    conds = {r["condition_key"]: r for r in read(out, "condition")}
    one = conds[keyer.key("Condition", "cond-one")]
    assert (one["code_system"], one["code"], one["display"]) == ("snomed", "44054006", "Diabetes mellitus type 2")
    assert one["encounter_key"] == keyer.key("Encounter", "enc-one")
    assert one["clinical_status"] == "active"
    assert one["onset"] == datetime(2019, 6, 1, tzinfo=timezone.utc)
    two = conds[keyer.key("Condition", "cond-two")]
    assert (two["code_system"], two["code"], two["display"]) == ("icd10cm", "I10", None)  # no display: .text is free text
    assert two["encounter_key"] is None and two["clinical_status"] is None
    assert two["onset"] == datetime(2018, 1, 1, tzinfo=timezone.utc)


def test_edge_observations_components_and_values(edge_ingested, keyer):
    out, _ = edge_ingested
    rows = read(out, "observation")
    by_key = {r["observation_key"]: r for r in rows}
    assert len(rows) == 9
    assert keyer.key("Observation", "obs-bp") not in by_key  # panel without own value: no row
    sys_ = by_key[keyer.key("Observation", "obs-bp#0")]
    dia = by_key[keyer.key("Observation", "obs-bp#1")]
    assert (sys_["code"], sys_["display"], sys_["value_num"], sys_["unit"]) == ("8480-6", "Systolic", 120.0, "mmHg")
    assert (dia["code"], dia["value_num"], dia["unit"]) == ("8462-4", 80.5, "mm[Hg]")
    for r in (sys_, dia):
        assert r["category"] == "vital-signs"
        assert r["patient_key"] == keyer.key("Patient", "pat-one")
        assert r["encounter_key"] == keyer.key("Encounter", "enc-one")
        assert r["effective"] == datetime(2020, 1, 1, 10, 5, tzinfo=timezone.utc)
    # a component without a value gives no row; the index of the kept one is its position in component[]
    assert keyer.key("Observation", "obs-bp-partial#0") not in by_key
    assert by_key[keyer.key("Observation", "obs-bp-partial#1")]["value_num"] == 70.0
    cc = by_key[keyer.key("Observation", "obs-cc")]
    assert (cc["value_code"], cc["value_num"]) == ("371244009", None)
    assert cc["effective"] == datetime(2020, 2, 2, 7, 0, tzinfo=timezone.utc)
    st = by_key[keyer.key("Observation", "obs-str")]
    assert st["value_code"] is None  # a valueString is free text: the row keeps its code, never the string
    assert st["effective"] == datetime(2020, 1, 1, 10, 5, 0, 123456, tzinfo=timezone.utc)
    assert by_key[keyer.key("Observation", "obs-bool")]["value_code"] == "true"
    assert by_key[keyer.key("Observation", "obs-int")]["value_num"] == 3.0
    multi = by_key[keyer.key("Observation", "obs-multi")]
    assert (multi["code_system"], multi["code"], multi["display"]) == ("loinc", "29463-7", "Body weight")
    assert (multi["value_num"], multi["unit"]) == (72.5, "kg")
    noval = by_key[keyer.key("Observation", "obs-noval")]
    assert (noval["value_num"], noval["value_code"], noval["unit"]) == (None, None, None)
    assert noval["patient_key"] == keyer.key("Patient", "pat-two")  # urn:uuid reference


def test_edge_identifiers_collected_and_never_output(edge_ingested):
    out, report = edge_ingested
    ident = {r["value"]: r["kind"] for r in pq.read_table(report["identifiers_uri"]).to_pylist()}
    assert ident["pat-one"] == "id" and ident["enc-one"] == "id" and ident["obs-bp"] == "id"
    assert ident["MRN-778899"] == "identifier"
    assert ident["Zebulon Quincy Quixotebury"] == "name"
    assert ident["Quixotebury"] == "family"
    assert ident["Zeb Ng"] == "name" and "Ng" not in ident  # short family names only as part of the full name
    assert ident["12 Hidden Lane"] == "address" and ident["Apt 9"] == "address"
    assert ident["555-0100-777"] == "telecom" and ident["zeb@example.org"] == "telecom"
    assert "not-ingested" not in ident and "nested-patient" not in ident
    cells = string_cells(out)
    for value in ident:
        assert value not in cells
        if len(value) >= 6:
            assert not any(value in c for c in cells)


# ------------------------------------------------------------------------------------------------
# quarantine
# ------------------------------------------------------------------------------------------------
def test_quarantine_records_lines_and_reasons(tmp_path, keyer):
    src = tmp_path / "extract"
    write_ndjson(src, "Patient.ndjson", [
        patient("pat-good", name=[{"family": "Secretname", "given": ["Hidden"]}]),  # 1
        "{not json at all Secretname",                                              # 2
        "",                                                                         # 3 blank: ignored
        "[1, 2, 3]",                                                                # 4
        {"resourceType": "Encounter", "id": "enc-in-wrong-file", "status": "finished"},  # 5
        {"resourceType": "Patient", "gender": "male"},                              # 6
        patient("pat-good", gender="male"),                                         # 7 duplicate
        patient("pat-mod", modifierExtension=[{"url": "http://example.org/x", "valueBoolean": True}]),  # 8
        patient("pat-badval", name=[{"family": 12345}]),                            # 9 fails validation
        patient("pat-robot", gender="robot"),                                       # 10
        {"id": "pat-no-type", "gender": "male"},                                    # 11
        "   ",                                                                      # 12 blank
        patient("pat-good-2"),                                                      # 13
    ])
    write_ndjson(src, "Observation.ndjson", [
        {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
         "subject": {"reference": "Patient/pat-good"}, "effectiveDateTime": "2020-02-30T10:00:00Z"},  # 1
        {"resourceType": "Observation", "id": "o2", "status": "final", "code": {"text": "x"},
         "subject": {"reference": "Patient/pat-good"}, "valueQuantity": {"value": 1.5}},              # 2
    ])
    out = tmp_path / "out"
    report = ingest_extract(str(src), str(out), keyer=keyer, validate_sample_rate=0.0)
    recs = quarantine_records(out)
    assert all(set(r) == {"file", "line", "resource_type", "reason"} for r in recs)
    # validation reasons name the location and the error type; the type wording comes from pydantic
    recs.sort(key=lambda r: (r["file"], r["line"]))  # patients are ingested first: sort for the check
    got = [(r["file"], r["line"], r["reason"].split(" (")[0]) for r in recs]
    assert recs[0]["reason"].startswith("validation failed at effectiveDateTime (")
    assert got[:9] == [
        ("Observation.ndjson", 1, "validation failed at effectiveDateTime"),
        ("Patient.ndjson", 2, "invalid JSON"),
        ("Patient.ndjson", 4, "not a JSON object"),
        ("Patient.ndjson", 5, "resourceType mismatch"),
        ("Patient.ndjson", 6, "missing id"),
        ("Patient.ndjson", 7, "duplicate id"),
        ("Patient.ndjson", 8, "unknown modifierExtension"),
        ("Patient.ndjson", 9, "validation failed at name.0.family"),
        ("Patient.ndjson", 10, "invalid value in gender"),
    ]
    assert got[9] == ("Patient.ndjson", 11, "missing resourceType")
    assert len(recs) == 10
    assert report["quarantined"] == {"Patient": 9, "Encounter": 0, "Condition": 0, "Observation": 1}
    assert report["quarantined_total"] == 10
    assert report["resources_read"]["Patient"] == 11  # blank lines are not resources
    assert report["rows"]["patient"] == 2
    assert {r["patient_key"] for r in read(out, "patient")} == {keyer.key("Patient", "pat-good"),
                                                                 keyer.key("Patient", "pat-good-2")}
    # the kept duplicate is the first one (female), not the later male one
    assert read(out, "patient")[0]["gender"] == "female"
    # no raw line nor any value in the quarantine file
    text = Path(out, "quarantine.ndjson").read_text()
    for secret in ("Secretname", "pat-", "enc-in-wrong-file", "robot", "12345", "2020-02-30"):
        assert secret not in text
    # encounters/conditions had no file: empty tables with the right schema
    assert pq.read_table(report["tables"]["encounter"]).schema.equals(schemas.ENCOUNTER_SCHEMA)
    assert report["rows"]["encounter"] == 0


def test_unvalidated_bad_dates_quarantined_by_flattener(tmp_path, keyer):
    src = tmp_path / "extract"
    good = [patient(f"p{i}") for i in range(20)]  # the first 20 are always validated
    write_ndjson(src, "Patient.ndjson", good + [
        patient("p-bad-birth", birthDate="1990-13-45"),       # 21
        patient("p-bad-death", deceasedDateTime="yesterday"),  # 22
        patient("p-ok", birthDate="1990-12"),                  # 23
    ])
    write_ndjson(src, "Encounter.ndjson", [
        {"resourceType": "Encounter", "id": f"e{i}", "status": "finished",
         "class": {"code": "AMB"}, "subject": {"reference": "Patient/p0"},
         "period": {"start": "2020-01-01T00:00:00Z"}} for i in range(20)] + [
        {"resourceType": "Encounter", "id": "e-bad", "status": "finished", "class": {"code": "AMB"},
         "period": {"start": "2020-01-01T25:00:00Z"}},  # 21
        {"resourceType": "Encounter", "id": "e-bad-tz", "status": "finished", "class": {"code": "AMB"},
         "period": {"start": "2020-01-01T10:00:00Z", "end": "2020-01-01T10:00:00+1:00"}},  # 22
        # offset minutes 60: datetime.fromisoformat takes it, FHIR does not (it once crashed the flush)
        {"resourceType": "Encounter", "id": "e-bad-min", "status": "finished", "class": {"code": "AMB"},
         "period": {"start": "2020-01-01T10:00:00+01:60"}},  # 23
    ])
    out = tmp_path / "out"
    report = ingest_extract(str(src), str(out), keyer=keyer, validate_sample_rate=0.0)
    assert report["validated"] == 40
    got = sorted((r["file"], r["line"], r["reason"]) for r in quarantine_records(out))
    assert got == [
        ("Encounter.ndjson", 21, "invalid date in period.start"),
        ("Encounter.ndjson", 22, "invalid date in period.end"),
        ("Encounter.ndjson", 23, "invalid date in period.start"),
        ("Patient.ndjson", 21, "invalid date in birthDate"),
        ("Patient.ndjson", 22, "invalid date in deceasedDateTime"),
    ]
    assert report["rows"] == {"patient": 21, "encounter": 20, "condition": 0, "observation": 0}


def test_validation_sample_is_deterministic(carebundle_extract, tmp_path, keyer):
    r1 = ingest_extract(str(carebundle_extract), str(tmp_path / "a"), keyer=keyer, validate_sample_rate=0.3)
    r2 = ingest_extract(str(carebundle_extract), str(tmp_path / "b"), keyer=keyer, validate_sample_rate=0.3)
    r0 = ingest_extract(str(carebundle_extract), str(tmp_path / "c"), keyer=keyer, validate_sample_rate=0.0)
    total = sum(r1["resources_read"].values())
    assert r0["validated"] == sum(min(20, n) for n in r0["resources_read"].values())
    assert r1["validated"] == r2["validated"]
    assert r0["validated"] + 0.15 * (total - r0["validated"]) < r1["validated"] < total


@pytest.mark.parametrize("engine", ["fast", "views"])
def test_validation_cap_bounds_the_sample_per_type(carebundle_extract, tmp_path, keyer, engine):
    """validate_max_per_type: full validation stops at the cap for each type (the first N count toward it)."""
    capped = ingest_extract(str(carebundle_extract), str(tmp_path / "a"), keyer=keyer, validate_sample_rate=1.0,
                            validate_first=3, validate_max_per_type=7, engine=engine)
    assert capped["validated_by_type"] == {t: min(7, n) for t, n in capped["resources_read"].items()}
    full = ingest_extract(str(carebundle_extract), str(tmp_path / "b"), keyer=keyer, validate_sample_rate=1.0,
                          validate_max_per_type=0, engine=engine)
    assert full["validated_by_type"] == full["resources_read"]  # no cap: every resource
    assert capped["rows"] == full["rows"]
    from synthfactory.spec import SourceSpec

    assert SourceSpec(uri="x").validate_max_per_type == 1000  # the pipeline's default


def test_zero_valid_patients_is_an_error_and_leaves_no_tables(tmp_path, keyer):
    src = tmp_path / "extract"
    write_ndjson(src, "Patient.ndjson", ["{broken", {"resourceType": "Patient"}])
    write_ndjson(src, "Observation.ndjson", [{"resourceType": "Observation", "id": "o", "status": "final",
                                              "code": {"text": "x"}}])
    out = tmp_path / "out"
    with pytest.raises(ExtractError, match="extract is empty") as exc:
        ingest_extract(str(src), str(out), keyer=keyer)
    assert "broken" not in str(exc.value)
    assert not list(out.glob("*.parquet")) and not list(out.glob("*.partial"))
    assert len(quarantine_records(out)) == 2  # kept to explain why


# ------------------------------------------------------------------------------------------------
# missing / empty / unsupported
# ------------------------------------------------------------------------------------------------
def test_byte_order_mark_and_crlf_lines(tmp_path, keyer):
    src = tmp_path / "extract"
    src.mkdir()
    (src / "Patient.ndjson").write_bytes(b"\xef\xbb\xbf" + orjson.dumps(patient("bom-1")) + b"\r\n"
                                         + orjson.dumps(patient("crlf-2")) + b"\r\n")
    report = ingest_extract(str(src), str(tmp_path / "out"), keyer=keyer)
    assert report["quarantined_total"] == 0 and report["rows"]["patient"] == 2


def test_corrupt_gzip_is_a_clear_error(tmp_path, keyer):
    src = tmp_path / "extract"
    write_ndjson(src, "Patient.ndjson", [patient("p1")])
    (src / "Observation.ndjson.gz").write_bytes(gzip.compress(b'{"resourceType": "Observation"}\n' * 50)[:40])
    with pytest.raises(ExtractError, match="Observation.ndjson.gz is not valid gzip or is truncated"):
        ingest_extract(str(src), str(tmp_path / "out"), keyer=keyer)
    assert not list((tmp_path / "out").glob("*.parquet")) and not list((tmp_path / "out").glob("*.partial"))


def test_missing_folder(tmp_path, keyer):
    with pytest.raises(ExtractError, match="extract not found: .*nope"):
        ingest_extract(str(tmp_path / "nope"), str(tmp_path / "out"), keyer=keyer)


def test_empty_folder_and_folder_without_requested_types(tmp_path, keyer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExtractError, match="extract is empty"):
        ingest_extract(str(tmp_path / "empty"), str(tmp_path / "out"), keyer=keyer)
    write_ndjson(tmp_path / "other", "Practitioner.ndjson", [{"resourceType": "Practitioner", "id": "d"}])
    with pytest.raises(ExtractError, match="extract is empty: no NDJSON file"):
        ingest_extract(str(tmp_path / "other"), str(tmp_path / "out"), keyer=keyer)
    assert not (tmp_path / "out").exists()


def test_unsupported_resource_type(tmp_path, keyer):
    write_ndjson(tmp_path / "x", "Patient.ndjson", [patient("a")])
    with pytest.raises(ExtractError, match="unsupported resource type"):
        ingest_extract(str(tmp_path / "x"), str(tmp_path / "out"), keyer=keyer, resources=["Practitioner"])


def test_subset_of_resources(tmp_path, keyer, edge_extract):
    report = ingest_extract(str(edge_extract), str(tmp_path / "out"), keyer=keyer, resources=["Patient", "Condition"])
    assert set(report["tables"]) == {"patient", "condition"}
    assert "Observation.ndjson" in report["skipped_files"]
    assert not (tmp_path / "out" / "observation.parquet").exists()


# ------------------------------------------------------------------------------------------------
# date parsing
# ------------------------------------------------------------------------------------------------
def test_parse_fhir_date():
    epoch = date(1970, 1, 1).toordinal()
    assert parse_fhir_date("2020") == (date(2020, 1, 1).toordinal() - epoch, "year")
    assert parse_fhir_date("2020-02") == (date(2020, 2, 1).toordinal() - epoch, "month")
    assert parse_fhir_date("2020-02-29") == (date(2020, 2, 29).toordinal() - epoch, "day")
    for bad in ("2020-2", "20200229", "2021-02-29", "2020-00", "0000", "2020-01-01T00:00:00Z", "", "２０２０", 2020):
        with pytest.raises(ValueError):
            parse_fhir_date(bad)


def test_parse_fhir_datetime():
    def us(dt: datetime) -> int:
        return int(dt.timestamp()) * 1_000_000 + dt.microsecond

    utc = timezone.utc
    assert parse_fhir_datetime("2020-01-02T03:04:05Z") == us(datetime(2020, 1, 2, 3, 4, 5, tzinfo=utc))
    assert parse_fhir_datetime("2020-01-02T03:04:05.25-05:30") == us(datetime(2020, 1, 2, 8, 34, 5, 250000, tzinfo=utc))
    assert parse_fhir_datetime("2020-01-02T03:04:05+14:00") == us(datetime(2020, 1, 1, 13, 4, 5, tzinfo=utc))
    assert parse_fhir_datetime("2020-01-02T03:04:05") == us(datetime(2020, 1, 2, 3, 4, 5, tzinfo=utc))
    assert parse_fhir_datetime("2020-01-02") == us(datetime(2020, 1, 2, tzinfo=utc))
    assert parse_fhir_datetime("2020-03") == us(datetime(2020, 3, 1, tzinfo=utc))
    assert parse_fhir_datetime("1969") == us(datetime(1969, 1, 1, tzinfo=utc))
    for bad in ("2020-01-02T24:00:00Z", "2020-01-02 03:04:05Z", "2020-01-02T03:04:05+15:00", "2020-13",
                "2020-01-02T03:04:05+0100", "2020-01-02T03:04:05+01:60", "tomorrow", "", None):
        with pytest.raises(ValueError):
            parse_fhir_datetime(bad)


# ------------------------------------------------------------------------------------------------
# S3 source and staging (moto, in process)
# ------------------------------------------------------------------------------------------------
def test_s3_source_and_output_match_local(edge_extract, edge_ingested, keyer):
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    local_out, local_report = edge_ingested
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="phi-extracts")
        for path in sorted(edge_extract.rglob("*")):
            if path.is_file():
                client.put_object(Bucket="phi-extracts", Key=f"exports/2024/{path.relative_to(edge_extract)}",
                                  Body=path.read_bytes())
        store = Store(s3=client)
        out = "s3://phi-extracts/staging/run-1"
        report = ingest_extract("s3://phi-extracts/exports/2024", out, keyer=keyer, store=store,
                                validate_sample_rate=1.0)
        assert report["files"] == local_report["files"]
        assert report["skipped_files"] == local_report["skipped_files"]
        assert report["extract_sha256"] == local_report["extract_sha256"]
        assert report["rows"] == local_report["rows"]
        assert report["tables"]["patient"] == "s3://phi-extracts/staging/run-1/patient.parquet"
        for t in TABLE_NAMES:
            assert store.read_table(report["tables"][t]).to_pylist() == read(local_out, t)
        listed = {u.rsplit("/", 1)[-1] for u in store.listdir(out)}
        assert listed == {"patient.parquet", "encounter.parquet", "condition.parquet", "observation.parquet",
                          "quarantine.ndjson", "identifiers.parquet", "ingest_report.json"}
        assert store.read_json(f"{out}/ingest_report.json") == report
        ident = store.read_table(report["identifiers_uri"]).to_pylist()
        assert {r["value"] for r in ident} == {r["value"] for r in pq.read_table(local_report["identifiers_uri"]).to_pylist()}

        with pytest.raises(ExtractError, match="extract not found: s3://phi-extracts/missing"):
            ingest_extract("s3://phi-extracts/missing", out, keyer=keyer, store=store)
        with pytest.raises(ExtractError, match="extract not found: s3://no-such-bucket/x"):
            ingest_extract("s3://no-such-bucket/x", out, keyer=keyer, store=store)
