"""FHIRPath compiler and SQL-on-FHIR ViewDefinitions: semantics, errors, built-in views, and the proof that
the view engine gives exactly the hand-written fast path's rows for the four built-in tables."""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfactory.ingest.fhir_ndjson import ingest_extract
from synthfactory.fhir.fhirpath import Env, FhirPathError, compile_path
from synthfactory.fhir.normalize import BadResource, timestamp_array
from synthfactory.fhir.views import ViewError, compile_view
from synthfactory.spec import SpecError, parse_spec

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"

OBS = {
    "resourceType": "Observation", "id": "o1", "status": "final",
    "subject": {"reference": "http://x.org/fhir/Patient/p1/_history/2"}, "encounter": {"reference": "Encounter/e1"},
    "code": {"coding": [{"system": SNOMED, "code": "271649006"}, {"system": LOINC, "code": "8480-6",
                                                                   "display": "Systolic"}], "text": "SBP"},
    "valueQuantity": {"value": 120, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
    "effectivePeriod": {"start": "2020-01-02T03:04:05+01:00"},
    "component": [{"code": {"text": "a"}, "valueString": "x"}, {"code": {"text": "b"}},
                  {"code": {"text": "c"}, "valueBoolean": False}],
    "extension": [{"url": "http://e/1", "valueInteger": 7}, {"url": "http://e/2", "valueString": "s"}],
    "contained": [{"resourceType": "Patient", "id": "cp"}],
    "performer": [{"reference": "#cp"}, {"reference": "urn:uuid:abc"}, {"identifier": {"value": "only-id"}}],
}


def key(t: str, i: str) -> str:
    return f"K[{t}/{i}]"


def ev(expr: str, resource: dict = OBS, constants: dict | None = None) -> list:
    env = Env(key, constants)
    env.resource = resource
    env.this = resource
    return compile_path(expr)([resource], env)


@pytest.mark.parametrize("expr, expected", [
    ("id", ["o1"]),
    ("Observation.id", ["o1"]),
    ("Patient.id", []),
    ("code.coding.code", ["271649006", "8480-6"]),
    ("code.coding[1].display", ["Systolic"]),
    ("code.coding.first().system", [SNOMED]),
    ("code.coding.last().code", ["8480-6"]),
    ("code.coding.count()", [2]),
    ("code.coding.where(system = 'http://loinc.org').code", ["8480-6"]),
    ("code.coding.where(system = %loinc).exists()", [True]),
    ("code.coding.select(code & '|' & system.substring(7, 4))", ["271649006|snom", "8480-6|loin"]),
    ("code.coding.code.join(',')", ["271649006,8480-6"]),
    ("code.preferredCoding().code", ["8480-6"]),
    ("code.preferredCoding().system.systemAlias()", ["loinc"]),
    ("value.ofType(Quantity).value", [120]),
    ("(value as Quantity).unit", ["mmHg"]),
    ("value.unit", ["mmHg"]),
    ("value.ofType(string)", []),
    ("value is Quantity", [True]),
    ("effective.ofType(Period).start", ["2020-01-02T03:04:05+01:00"]),
    ("effective.ofType(dateTime)", []),
    ("component.where(value.exists()).code.text", ["a", "c"]),
    ("component.value.ofType(boolean)", [False]),
    ("component.where(value.empty()).count()", [1]),
    ("component.all(code.exists())", [True]),
    ("extension('http://e/1').value.ofType(integer)", [7]),
    ("extension.where(url = 'http://e/2').value.ofType(string).upper()", ["S"]),
    ("iif(value.exists(), 'has', 'none')", ["has"]),
    ("iif({}, 1)", []),
    ("status = 'final' and id != 'x'", [True]),
    ("status = 'draft' or {}", []),
    ("{} and false", [False]),
    ("true implies {}", []),
    ("false xor true", [True]),
    ("(1 + 2) * 3 - 4 / 2", [7.0]),
    ("7 div 2 = 3 and 7 mod 2 = 1", [True]),
    ("'a' | 'b' | 'a'", ["a", "b"]),
    ("'b' in ('a' | 'b')", [True]),
    ("('a' | 'b') contains 'c'", [False]),
    ("id.startsWith('o') and id.endsWith('1') and id.length() = 2", [True]),
    ("id.matches('^o[0-9]$')", [True]),
    ("'ABC' ~ 'abc'", [True]),
    ("code.coding.code.distinct().count()", [2]),
    ("1.5.toString()", ["1.5"]),
    ("'12'.toInteger() + 1", [13]),
    ("'true'.toBoolean()", [True]),
    ("effective.ofType(Period).start.datePrecision()", ["second"]),
    ("subject.getReferenceKey(Patient)", ["K[Patient/p1]"]),
    ("subject.getReferenceKey(Group)", []),
    ("encounter.getReferenceKey()", ["K[Encounter/e1]"]),
    ("performer.getReferenceKey(Patient)", ["K[Patient/Observation/o1#cp]", "K[Patient/abc]"]),
    ("performer.first().resolve().id", ["cp"]),
    ("getResourceKey()", ["K[Observation/o1]"]),
    ("%resource.getResourceKey('#' + %rowIndex.toString())", ["K[Observation/o1#0]"]),
    ("%threshold >= 100", [True]),
    ("code.coding.skip(1).take(1).code", ["8480-6"]),
    ("code.coding.tail().code.single()", ["8480-6"]),
    ("-value.ofType(Quantity).value", [-120]),
    ("code.text.replace('S', 'Z')", ["ZBP"]),
])
def test_fhirpath(expr, expected):
    assert ev(expr, constants={"threshold": 100}) == expected


@pytest.mark.parametrize("bad", ["", "code.", "where(", "foo(1)", "1 +", "code[", "'unterminated", "$nope",
                                 "first(1)", "a ^ b"])
def test_fhirpath_compile_errors(bad):
    with pytest.raises(FhirPathError):
        compile_path(bad)


def test_fhirpath_runtime_single_value_errors():
    with pytest.raises(FhirPathError):
        ev("code.coding.single()")
    with pytest.raises(FhirPathError, match="unknown constant"):
        ev("%missing")


# ------------------------------------------------------------------------------------------------
# ViewDefinitions
# ------------------------------------------------------------------------------------------------
def rows(view: dict, resource: dict, **kw) -> list[dict]:
    cv = compile_view(view, **kw)
    env = Env(key)
    return [dict(zip(cv.columns, r)) for r in cv.rows(resource, env)]


def test_view_foreach_ornull_unionall_where_constants_collection():
    view = {
        "resourceType": "ViewDefinition", "name": "obs_parts", "resource": "Observation",
        "constant": [{"name": "sys", "valueString": LOINC}],
        "where": [{"path": "status = 'final'"}],
        "select": [
            {"column": [{"name": "id", "path": "getResourceKey()"},
                        {"name": "codes", "path": "code.coding.code", "collection": True},
                        {"name": "loinc", "path": "code.coding.where(system = %sys).code.first()"}]},
            {"forEachOrNull": "extension.where(url = 'http://none')",
             "column": [{"name": "ext_url", "path": "url"}]},
            {"unionAll": [
                {"forEach": "component", "column": [{"name": "part", "path": "code.text"},
                                                    {"name": "pos", "path": "%rowIndex", "type": "integer"}]},
                {"forEach": "extension", "column": [{"name": "part", "path": "url"},
                                                    {"name": "pos", "path": "%rowIndex", "type": "integer"}]},
            ]},
        ],
    }
    got = rows(view, OBS)
    assert [(r["part"], r["pos"]) for r in got] == [("a", 0), ("b", 1), ("c", 2), ("http://e/1", 0),
                                                     ("http://e/2", 1)]
    assert all(r["id"] == "K[Observation/o1]" and r["codes"] == ["271649006", "8480-6"] and r["loinc"] == "8480-6"
               and r["ext_url"] is None for r in got)
    assert rows(view, {**OBS, "status": "draft"}) == []  # the view-level where
    cv = compile_view(view)
    assert cv.schema.field("codes").type == pa.list_(pa.string()) and cv.schema.field("pos").type == pa.int64()


def test_view_foreach_without_items_drops_the_row():
    view = {"name": "t", "resource": "Observation",
            "select": [{"column": [{"name": "id", "path": "id"}]},
                       {"forEach": "note", "column": [{"name": "note", "path": "text"}]}]}
    assert rows(view, OBS) == []


def test_view_column_types_and_quarantine_reasons():
    view = {"name": "typed", "resource": "Observation", "select": [{"column": [
        {"name": "when", "path": "effective.ofType(Period).start", "type": "dateTime"},
        {"name": "day", "path": "effective.ofType(Period).start", "type": "date"},
        {"name": "num", "path": "value.ofType(Quantity).value", "type": "decimal"},
        {"name": "flag", "path": "component[2].value.ofType(boolean)", "type": "boolean"},
    ]}]}
    (r,) = rows(view, OBS)
    # timestamps come as validated canonical strings (Arrow converts a batch at once) or microseconds
    assert timestamp_array([r["when"]], pa.timestamp("us", tz="UTC")).to_pylist() == \
        [datetime(2020, 1, 2, 2, 4, 5, tzinfo=timezone.utc)]
    r["when"] = 1577930645000000
    assert r == {"when": 1577930645000000, "day": (date(2020, 1, 2) - date(1970, 1, 1)).days, "num": 120.0,
                 "flag": False}
    with pytest.raises(BadResource, match="invalid date in when"):
        rows(view, {**OBS, "effectivePeriod": {"start": "2020-13-01"}})
    with pytest.raises(BadResource, match="invalid value in num"):
        rows(view, {**OBS, "valueQuantity": {"value": "120"}})
    multi = {"name": "m", "resource": "Observation", "select": [{"column": [{"name": "c", "path": "code.coding.code"}]}]}
    with pytest.raises(BadResource, match="more than one value in c"):
        rows(multi, OBS)


@pytest.mark.parametrize("view, where", [
    ({"name": "Bad-Name", "resource": "Patient", "select": [{"column": [{"name": "a", "path": "id"}]}]}, "name"),
    ({"name": "t", "resource": "patient", "select": [{"column": [{"name": "a", "path": "id"}]}]}, "resource"),
    ({"name": "t", "resource": "Patient", "select": []}, "select"),
    ({"name": "t", "resource": "Patient", "select": [{"column": [{"name": "a", "path": "id.("}]}]},
     "select[0].column[0].path"),
    ({"name": "t", "resource": "Patient", "select": [{"column": [{"name": "a", "path": "id", "type": "blob"}]}]},
     "select[0].column[0].type"),
    ({"name": "t", "resource": "Patient", "select": [{"column": [{"name": "a", "path": "id"}]},
                                                     {"column": [{"name": "a", "path": "gender"}]}]}, "duplicate"),
    ({"name": "t", "resource": "Patient", "select": [{"unionAll": [{"column": [{"name": "a", "path": "id"}]},
                                                                   {"column": [{"name": "b", "path": "id"}]}]}]},
     "unionAll[1]"),
    ({"name": "t", "resource": "Patient", "select": [{"column": [{"name": "a", "path": "id"}], "nope": 1}]},
     "unknown field"),
])
def test_view_errors_name_the_element(view, where):
    with pytest.raises(ViewError, match=where.replace("[", r"\[").replace("]", r"\]")):
        compile_view(view)


def test_user_views_in_the_spec_are_validated():
    base = {"name": "v_test", "release": {"bucket": "sandbox-bucket"}}
    good = {"name": "allergy", "resource": "AllergyIntolerance",
            "select": [{"column": [{"name": "allergy_key", "path": "getResourceKey()"},
                                   {"name": "patient_key", "path": "patient.getReferenceKey(Patient)"}]}]}
    spec = parse_spec({**base, "source": {"uri": "x", "resources": ["Patient", "AllergyIntolerance"],
                                          "views": [good]}})
    assert spec.source.views[0]["name"] == "allergy"
    with pytest.raises(SpecError, match=r"source.views: .*\[0\]: select\[0\].column\[0\].path"):
        parse_spec({**base, "source": {"uri": "x", "views": [{**good, "select": [{"column": [
            {"name": "a", "path": "where("}]}]}]}})
    with pytest.raises(SpecError, match="no table for \\['Immunization'\\]"):
        parse_spec({**base, "source": {"uri": "x", "resources": ["Patient", "Immunization"]}})
    with pytest.raises(SpecError, match="source.validate_sample_rate"):
        parse_spec({**base, "source": {"uri": "x", "validate_sample_rate": 2}})
    assert parse_spec({**base, "source": {"uri": "x", "views": ["views/allergy.yaml"]}}).source.views


# ------------------------------------------------------------------------------------------------
# built-in views: the same rows as the hand-written fast path
# ------------------------------------------------------------------------------------------------
def assert_same_tables(src: Path, tmp_path: Path, keyer, **kw) -> dict:
    fast = ingest_extract(str(src), str(tmp_path / "fast"), keyer=keyer, engine="fast", validate_sample_rate=0.0,
                          **kw)
    views = ingest_extract(str(src), str(tmp_path / "views"), keyer=keyer, engine="views", validate_sample_rate=0.0,
                           **kw)
    assert fast["rows"] == views["rows"]
    assert fast["quarantined"] == views["quarantined"]
    for t in fast["tables"]:
        a, b = pq.read_table(fast["tables"][t]), pq.read_table(views["tables"][t])
        assert a.schema.equals(b.schema), t
        assert a.equals(b), t
    return fast


def test_view_engine_equals_fast_path_on_carebundle(carebundle_extract, tmp_path, keyer):
    fast = assert_same_tables(carebundle_extract, tmp_path, keyer)
    assert fast["rows"]["observation"] > 1000


def test_view_engine_equals_fast_path_on_edge_cases(tmp_path, keyer):
    src = tmp_path / "edge"
    src.mkdir()
    pats = [
        {"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1950",
         "deceasedDateTime": "2020-03-04T23:30:00-05:00", "address": [{"state": "MA"}],
         "maritalStatus": {"coding": [{"code": "M"}]},
         "extension": [
             {"url": US_CORE + "us-core-race", "extension": [
                 {"url": "ombCategory", "valueCoding": {"code": "2106-3", "display": "White"}},
                 {"url": "ombCategory", "valueCoding": {"code": "2054-5"}}]},
             {"url": US_CORE + "us-core-ethnicity", "extension": [
                 {"url": "detailed", "valueCoding": {"code": "x"}},
                 {"url": "ombCategory", "valueCoding": {"code": "2186-5"}}]},
             {"url": US_CORE + "us-core-birthsex", "valueCode": "M"}]},
        {"resourceType": "Patient", "id": "p2", "birthDate": "1988-07", "deceasedBoolean": False,
         "maritalStatus": {"text": "Single"}},
        {"resourceType": "Patient", "id": "p3", "gender": "unknown", "birthDate": "2001-02-03", "deceasedBoolean": True},
    ]
    encs = [
        {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "IMP"},
         "type": [{"coding": [{"code": "99213", "display": "Office"}, {"code": "x"}], "text": "t"}],
         "subject": {"reference": "Patient/p1"}, "period": {"start": "2020-01-01T10:00:00+02:00",
                                                          "end": "2020-01-01T12:30:00.5+02:00"}},
        {"resourceType": "Encounter", "id": "e2", "status": "planned", "class": [{"coding": [{"code": "AMB"}]}],
         "type": [{"text": "Walk-in"}], "subject": {"reference": "urn:uuid:p2"}, "actualPeriod": {"start": "2021-05"}},
        {"resourceType": "Encounter", "id": "e3", "status": "finished", "subject": {"reference": "#c"},
         "contained": [{"resourceType": "Patient", "id": "c"}], "type": [{"coding": [{"code": "z"}]}]},
    ]
    conds = [
        {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
         "encounter": {"reference": "Encounter/e1/_history/1"}, "onsetPeriod": {"start": "2019-06-01"},
         "clinicalStatus": {"coding": [{"code": "active"}]},
         "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"},
                             {"system": SNOMED, "code": "44054006", "display": "DM2"}]}},
        {"resourceType": "Condition", "id": "c2", "subject": {"reference": "Patient/p2"}, "onsetDateTime": "2018",
         "context": {"reference": "Encounter/e2"}, "code": {"coding": [{"code": "I10"}], "text": "HTN"}},
        {"resourceType": "Condition", "id": "c3", "subject": {"reference": "Patient/p3"},
         "code": {"text": "free text"}, "clinicalStatus": {"text": "resolved"}},
    ]

    def obs(oid: str, **kw) -> dict:
        return {"resourceType": "Observation", "id": oid, "status": "final", "subject": {"reference": "Patient/p1"},
                "code": {"coding": [{"system": LOINC, "code": "1-1"}]}, **kw}

    observations = [
        obs("bp", category=[{"coding": [{"code": "vital-signs"}]}], effectiveDateTime="2020-01-01T10:05:00Z",
            component=[{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": {"value": 120}},
                       {"code": {"coding": [{"code": "8462-4"}]}, "dataAbsentReason": {"text": "x"}},
                       {"code": {"text": "d"}, "valueQuantity": {"value": 80.5, "code": "mm[Hg]"}}]),
        obs("bp-own", component=[{"code": {"text": "x"}, "valueInteger": 3}], valueString="panel note",
            effectiveInstant="2020-01-01T10:05:00.123456789Z"),
        obs("panel-empty", component=[{"code": {"text": "x"}}]),
        obs("cc", valueCodeableConcept={"coding": [{"code": "Y"}]}, effectivePeriod={"start": "2020-02-02"}),
        obs("cc-text", valueCodeableConcept={"text": "yellowish"}, category=[{"text": "lab"}]),
        obs("cc-empty", valueCodeableConcept={"coding": [{"system": "s"}]}),
        obs("bool", valueBoolean=True, encounter={"reference": "Encounter/e1"}),
        obs("int", valueInteger=3, context={"reference": "Encounter/e2"}),
        obs("qty-novalue", valueQuantity={"unit": "kg"}),
        obs("range", valueRange={"low": {"value": 1}}),
        obs("multi", code={"coding": [{"system": SNOMED, "code": "s", "display": "S"},
                                      {"system": LOINC, "code": "l"}], "text": "T"}, valueQuantity={"value": 1.5}),
        obs("dangling", subject={"reference": "Patient/nobody"}, valueInteger=1),
    ]
    for name, items in (("Patient.ndjson", pats), ("Encounter.ndjson", encs), ("Condition.ndjson", conds),
                        ("Observation.ndjson", observations)):
        (src / name).write_bytes(b"\n".join(orjson.dumps(i) for i in items) + b"\n")
    # not validated: R5 shapes (class as a list, actualPeriod) and R4 context must reach the flatteners
    fast = assert_same_tables(src, tmp_path, keyer, on_dangling="keep", validate_first=0)
    assert fast["quarantined_total"] == 0
    # 12: bp-own's valueString ("panel note") is free text, so its own row (no other value) is not written
    assert fast["rows"] == {"patient": 3, "encounter": 3, "condition": 3, "observation": 12}
    assert fast["dangling_references"] == {"Encounter": 1, "Observation": 1}
    enc3 = [r for r in pq.read_table(fast["tables"]["encounter"]).to_pylist()
            if r["encounter_key"] == keyer.key("Encounter", "e3")][0]
    assert enc3["patient_key"] == keyer.key("Patient", "Encounter/e3#c")  # a contained patient


def test_view_engine_equals_fast_path_on_clinosim(tmp_path, keyer, clinosim_fhir):
    """On realistic US Core data (26 resource types; SYNTHFACTORY_CLINOSIM_FHIR may name a larger cohort)."""
    report = assert_same_tables(clinosim_fhir, tmp_path, keyer, on_dangling="keep")
    assert report["rows"]["patient"] >= 10 and report["rows"]["observation"] > 0


# ------------------------------------------------------------------------------------------------
# the other built-in views and user views
# ------------------------------------------------------------------------------------------------
def test_medication_request_and_procedure_views(tmp_path, keyer, carebundle_extract):
    src = tmp_path / "x"
    src.mkdir()
    (src / "Patient.ndjson").write_bytes(orjson.dumps({"resourceType": "Patient", "id": "p"}) + b"\n")
    meds = [
        {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
         "subject": {"reference": "Patient/p"}, "authoredOn": "2024-05",
         "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                   "code": "314076", "display": "lisinopril 10 MG"}]},
         "dosageInstruction": [{"doseAndRate": [{"doseQuantity": {"value": 10, "unit": "mg",
                                                                  "system": "http://unitsofmeasure.org",
                                                                  "code": "mg"}}]}]},
        {"resourceType": "MedicationRequest", "id": "m2", "status": "stopped", "intent": "order",
         "subject": {"reference": "Patient/p"}, "medicationReference": {"reference": "#med"},
         "contained": [{"resourceType": "Medication", "id": "med",
                        "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                             "code": "860975"}], "text": "metformin"}}]},
    ]
    (src / "MedicationRequest.ndjson").write_bytes(b"\n".join(orjson.dumps(m) for m in meds) + b"\n")
    (src / "Procedure.ndjson").write_bytes(orjson.dumps(
        {"resourceType": "Procedure", "id": "pr", "status": "completed", "subject": {"reference": "Patient/p"},
         "code": {"coding": [{"system": SNOMED, "code": "80146002", "display": "Appendectomy"}]},
         "performedPeriod": {"start": "2023-01-02T10:00:00Z", "end": "2023-01-02T11:00:00Z"}}) + b"\n")
    report = ingest_extract(str(src), str(tmp_path / "out"), keyer=keyer, validate_sample_rate=1.0,
                            resources=["Patient", "MedicationRequest", "Procedure"])
    assert report["quarantined_total"] == 0
    m1, m2 = pq.read_table(report["tables"]["medication_request"]).to_pylist()
    assert (m1["code_system"], m1["code"], m1["display"], m1["dose_value"], m1["dose_unit"]) == \
        ("rxnorm", "314076", "lisinopril 10 MG", 10.0, "mg")
    assert m1["authored_on"] == datetime(2024, 5, 1, tzinfo=timezone.utc) and m1["authored_on_precision"] == "month"
    assert (m2["code"], m2["display"], m2["medication_key"]) == \
        ("860975", None, keyer.key("Medication", "MedicationRequest/m2#med"))  # code.text is free text
    (pr,) = pq.read_table(report["tables"]["procedure"]).to_pylist()
    assert (pr["code_system"], pr["code"], pr["performed_precision"]) == ("snomed", "80146002", "second")
    assert pr["performed_end"] == datetime(2023, 1, 2, 11, tzinfo=timezone.utc)
    # carebundle's MedicationRequests through the built-in view
    cb = ingest_extract(str(carebundle_extract), str(tmp_path / "cb"), keyer=keyer, validate_sample_rate=0.0,
                        resources=["Patient", "MedicationRequest"])
    rows_ = pq.read_table(cb["tables"]["medication_request"]).to_pylist()
    assert rows_ and all(r["code_system"] == "rxnorm" and r["patient_key"] for r in rows_)


def test_user_view_adds_a_table_and_can_replace_a_builtin(tmp_path, keyer, carebundle_extract):
    allergy = {"resourceType": "ViewDefinition", "name": "allergy", "resource": "AllergyIntolerance",
               "select": [{"column": [
                   {"name": "allergy_key", "path": "getResourceKey()"},
                   {"name": "patient_key", "path": "patient.getReferenceKey(Patient)"},
                   {"name": "code", "path": "code.preferredCoding().code"},
                   {"name": "recorded", "path": "recordedDate", "type": "dateTime"}]}]}
    slim_patient = {"name": "patient", "resource": "Patient", "select": [{"column": [
        {"name": "patient_key", "path": "getResourceKey()"}, {"name": "gender", "path": "gender"}]}]}
    report = ingest_extract(str(carebundle_extract), str(tmp_path / "out"), keyer=keyer, validate_sample_rate=0.0,
                            resources=["Patient"], views=[allergy, slim_patient])
    assert set(report["tables"]) == {"patient", "allergy"}
    assert pq.read_table(report["tables"]["patient"]).column_names == ["patient_key", "gender"]
    allergies = pq.read_table(report["tables"]["allergy"]).to_pylist()
    n_lines = len((carebundle_extract / "AllergyIntolerance.ndjson").read_bytes().splitlines())
    assert len(allergies) == n_lines and all(len(a["allergy_key"]) == 32 for a in allergies)
    assert "AllergyIntolerance.ndjson" in report["files"]
