"""The compiled flatten (synthfactory.ingest.native / _flatc) against the Python path, differentially.

The contract: for any input, ingest with the compiled flatten writes exactly what the Python path writes
(tables, quarantine records, identifiers, report counts). Each test ingests the same extract twice, with
``native=True`` and ``native=False``, and compares every output. The inputs are generated plain resources
(what the compiled path takes) and the same resources put through structural and byte-level mutations
(what it must hand back to Python, or take with the same result).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfactory.ingest import native
from synthfactory.ingest.fhir_ndjson import ingest_extract
from synthfactory.ingest.schemas import OBSERVATION_SCHEMA, TS
from synthfactory.ingest.session import IngestSession
from synthfactory.keys import Keyer

LOINC, SNOMED, ICD = "http://loinc.org", "http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"
OUTPUTS = ("patient.parquet", "encounter.parquet", "condition.parquet", "observation.parquet",
           "identifiers.parquet")
VOLATILE = {"seconds", "resources_per_second", "native_lines", "tables", "quarantine_uri", "identifiers_uri"}


def test_the_compiled_module_is_built_and_used(keyer, tmp_path):
    """`make install` builds it (setup.py); a missing build would silently cost half the throughput."""
    assert native.available(), "synthfactory.ingest._flatc is not built: run `make install`"
    s = IngestSession(str(tmp_path / "out"), keyer=keyer)
    try:
        assert set(s.native) == {"Patient", "Observation", "Encounter", "Condition"}  # the default resources
    finally:
        s.abort()
    s = IngestSession(str(tmp_path / "o4"), keyer=keyer, resources=["Patient", "MedicationRequest", "Procedure"])
    try:
        assert set(s.native) == {"Patient", "MedicationRequest", "Procedure"}
    finally:
        s.abort()
    assert IngestSession(str(tmp_path / "o2"), keyer=keyer, native=False).native == {}
    assert IngestSession(str(tmp_path / "o3"), keyer=keyer, engine="views").native == {}


@pytest.mark.parametrize("sha_ni", ["1", "0"])
def test_keys_equal_the_keyers(sha_ni):
    """HMAC-SHA256 in C (portable and SHA-NI) == Keyer.key, for short, long (multi-block) and non-ASCII ids
    and salts longer than a block. Run in a child so that the SHA-NI switch applies at import."""
    code = """
import json, sys
from synthfactory.ingest import native, _flatc
from synthfactory.keys import Keyer
ids = ["p", "x" * 55, "y" * 56, "z" * 119, "w" * 300, "\\u00e9t\\u00e9-\\u4e2d\\U0001f600", "a/b#c", "0"]
n = 0
for salt in (b"s" * 16, b"t" * 64, b"u" * 65, bytes(range(256))):
    k = Keyer(salt)
    for t in ("Observation", "Encounter", "Condition"):
        f = native.flattener(t, k)
        assert f is not None
        for i in ids:
            for typ in ("Patient", t):
                assert f.key(typ, i) == k.key(typ, i), (salt, typ, i)
                n += 1
print(json.dumps({"sha_ni": _flatc.SHA_NI, "n": n}))
"""
    env = {**os.environ, "SYNTHFACTORY_NO_SHA_NI": "" if sha_ni == "1" else "1"}
    if sha_ni == "1":
        env.pop("SYNTHFACTORY_NO_SHA_NI")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["n"] == 4 * 3 * 8 * 2
    if sha_ni == "0":
        assert res["sha_ni"] == 0


def test_columns_buffer_types_nulls_and_rollback():
    cols = native.columns(OBSERVATION_SCHEMA)
    assert cols.kinds == "ssssssstdss"
    row = ("k1", None, "e", "cat", "loinc", "1-1", "d\u00e9", "2020-01-02T03:04:05+01:00", 1.5, "mg", None)
    cols.append(row)
    cols.extend([("k2", "p", None, None, None, None, None, 86_400_000_000, 2, None, "x")])
    with pytest.raises(TypeError):
        cols.append(("k3", 5) + row[2:])  # an int in a string column: nothing of the row is kept
    with pytest.raises(ValueError):
        cols.append(("k3", None, None, None, None, None, None, "2020-13-01", None, None, None))
    with pytest.raises(TypeError):
        cols.append(("too", "short"))
    assert len(cols) == 2
    arrays = native.arrays(cols, OBSERVATION_SCHEMA)
    assert len(cols) == 0
    t = pa.Table.from_arrays(arrays, schema=OBSERVATION_SCHEMA)
    t.validate(full=True)
    assert t.column("observation_key").to_pylist() == ["k1", "k2"]
    assert t.column("patient_key").to_pylist() == [None, "p"]
    assert t.column("display").to_pylist() == ["d\u00e9", None]
    assert t.column("value_num").to_pylist() == [1.5, 2.0]
    expected = pa.array(["2020-01-02T03:04:05+01:00"], pa.string()).cast(TS).to_pylist()[0]
    assert t.column("effective").to_pylist()[0] == expected
    assert t.column("effective").to_pylist()[1] == pa.scalar(86_400_000_000, TS).as_py()
    assert native.columns(pa.schema([pa.field("i", pa.int64())])) is None


def test_columns_bool_and_date32_with_nulls_and_rollback():
    """The Patient table's bool and date32 columns: bit-packed values across byte boundaries, nulls, and a
    rejected row leaving nothing behind."""
    from synthfactory.ingest.schemas import PATIENT_SCHEMA

    cols = native.columns(PATIENT_SCHEMA)
    assert cols.kinds == "ssDsbDsssss"
    rows = []
    for i in range(21):
        rows.append((f"k{i}", "female" if i % 2 else None, None if i % 5 == 0 else i * 1000 - 700_000,
                     "day", None if i % 7 == 3 else bool(i % 3), -i if i % 4 == 0 else None, None, None, None,
                     None, "MA"))
        cols.append(rows[-1])
        if i == 9:
            with pytest.raises(TypeError):
                cols.append(("bad", None, None, None, 1, None, None, None, None, None, None))  # an int for a bool
            with pytest.raises(TypeError):
                cols.append(("bad", None, "1970-01-01", None, True, None, None, None, None, None, None))
    assert len(cols) == 21
    t = pa.Table.from_arrays(native.arrays(cols, PATIENT_SCHEMA), schema=PATIENT_SCHEMA)
    t.validate(full=True)
    expect = pa.table({n: pa.array([r[j] for r in rows], f.type) for j, (n, f) in
                       enumerate(zip(PATIENT_SCHEMA.names, PATIENT_SCHEMA))}, schema=PATIENT_SCHEMA)
    assert t.equals(expect)


# ------------------------------------------------------------------------------------------------
# generated extracts
# ------------------------------------------------------------------------------------------------
DATES = ["2020-01-02T03:04:05Z", "2019-12-31T23:59:59+14:00", "2021-06-01T00:00:00-05:30", "2020-02-29",
         "2019", "2019-07", "2020-01-02T03:04", "2020-01-02T03:04:05.123456789Z", "2020-01-02T03:04:60Z",
         "2019-02-29", "2020-13-01", "2020-01-02T24:00:00Z", "2020-01-02T03:04:05+15:00", "0000-01-01",
         "2020-01-02T03:04:05", "2020-01-02 03:04:05Z", "20200102", "2020-01-02T03:04:05+01:60", "", 2020]
REFS = ["Patient/p{n}", "Patient/p{n}", "Patient/p{n}", "http://x.org/fhir/Patient/p{n}", "Patient/p{n}/_history/2",
        "urn:uuid:p{n}", "#c1", "Patient/", "p{n}", "Encounter/e{n}", "Patient/nobody", "Patient/p{n}\u00e9"]
SYSTEMS = [LOINC, SNOMED, ICD, "http://www.nlm.nih.gov/research/umls/rxnorm", "urn:oid:2.16.840.1.113883.6.1",
           "http://example.org/local", None]
WEIRD = [None, "", 0, -0.0, 1.5, True, False, [], {}, "x", [{}], {"a": 1}, 12345678901234567890, 1e300]


def _coding(r: random.Random) -> dict:
    c = {"system": r.choice(SYSTEMS), "code": r.choice(["1-1", "E11.9", "8480-6", "\u00e9\u00e8", "x\"y"]),
         "display": r.choice(["Systolic", "", None, "Caf\u00e9", "Blood \\ pressure"])}
    return {k: v for k, v in c.items() if v is not None or r.random() < 0.2}


def _cc(r: random.Random) -> dict:
    cc: dict = {"coding": [_coding(r) for _ in range(r.choice([1, 1, 1, 2, 3, 0]))]}
    if r.random() < 0.4:
        cc["text"] = r.choice(["Text", "", "T\u00e9xt"])
    return cc


def _value(r: random.Random) -> dict:
    k = r.random()
    if k < 0.5:
        q = {"value": r.choice([120, 80.5, 0, -3, 1e-7, 98.6, 10**15, 2.5e10]), "system": UCUM}
        if r.random() < 0.8:
            q["unit"] = r.choice(["mmHg", "kg", "", "\u00b5g"])
        if r.random() < 0.5:
            q["code"] = r.choice(["mm[Hg]", "kg"])
        return {"valueQuantity": q}
    if k < 0.65:
        return {"valueCodeableConcept": _cc(r)}
    if k < 0.75:
        return {"valueString": r.choice(["Detected", "", "n\u00e9gatif"])}
    if k < 0.8:
        return {"valueBoolean": r.choice([True, False])}
    if k < 0.85:
        return {"valueInteger": r.choice([3, 0, -7])}
    return {}


def _ref(r: random.Random, n: int, plain: bool) -> dict:
    tmpl = REFS[0] if plain else r.choice(REFS)
    return {"reference": tmpl.format(n=n)}


def observation(r: random.Random, i: int, plain: bool) -> dict:
    n = r.randrange(30)
    o: dict = {"resourceType": "Observation", "id": f"o{i}", "status": "final",
               "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"]},
               "subject": _ref(r, n, plain), "code": _cc(r),
               "effectiveDateTime": DATES[0] if plain else r.choice(DATES[:8])}
    if r.random() < 0.8:
        o["encounter"] = {"reference": f"Encounter/e{n}"}
    if r.random() < 0.7:
        o["category"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": r.choice(["vital-signs", "laboratory"])}]}]
    o.update(_value(r))
    if r.random() < 0.25:
        o["component"] = [{"code": _cc(r), **_value(r)} for _ in range(r.randint(1, 3))]
    if r.random() < 0.1:
        o["identifier"] = [{"system": "urn:x", "value": f"ACC{i}"}, {"value": ""}]
    if r.random() < 0.1:
        o["performer"] = [{"reference": "Practitioner/dr-1"}]
        o["note"] = [{"text": "free \u00e9 text with \"quotes\" and \\ backslashes \u2028"}]
    return o


def encounter(r: random.Random, i: int, plain: bool) -> dict:
    e: dict = {"resourceType": "Encounter", "id": f"e{i}", "status": r.choice(["finished", "in-progress"]),
               "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": r.choice(["AMB", "IMP"])},
               "subject": _ref(r, i % 30, plain)}
    if r.random() < 0.8:
        e["type"] = [{"coding": [_coding(r)]} if r.random() < 0.8 else {"text": "Walk-in"}]
    if r.random() < 0.9:
        e["period"] = {"start": DATES[0] if plain else r.choice(DATES[:8])}
        if r.random() < 0.7:
            e["period"]["end"] = r.choice(DATES[:3])
    if r.random() < 0.2:
        e["identifier"] = [{"value": f"V{i}"}]
    return e


def condition(r: random.Random, i: int, plain: bool) -> dict:
    n = r.randrange(30)
    c: dict = {"resourceType": "Condition", "id": f"c{i}", "code": _cc(r), "subject": _ref(r, n, plain),
               "clinicalStatus": {"coding": [{"code": r.choice(["active", "resolved"])}]}}
    if r.random() < 0.7:
        c["encounter"] = {"reference": f"Encounter/e{n}"}
    if r.random() < 0.8:
        c["onsetDateTime"] = DATES[0] if plain else r.choice(DATES[:8])
    return c


def medication_request(r: random.Random, i: int, plain: bool) -> dict:
    n = r.randrange(30)
    m: dict = {"resourceType": "MedicationRequest", "id": f"m{i}", "status": r.choice(["active", "completed"]),
               "intent": r.choice(["order", "instance-order"]), "subject": _ref(r, n, plain),
               "medicationCodeableConcept": _cc(r)}
    if r.random() < 0.7:
        m["encounter"] = {"reference": r.choice([f"Encounter/e{n}", f"Encounter/e{n}", "Encounter/",
                                                 f"urn:uuid:e{n}", f"Patient/p{n}"]) if not plain
                          else f"Encounter/e{n}"}
    if r.random() < 0.8:
        m["authoredOn"] = DATES[0] if plain else r.choice(DATES[:8])
    if r.random() < 0.7:
        m["category"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                                      "code": r.choice(["community", "inpatient"])}]}
                         if r.random() < 0.9 else {"text": "Community"}]
    if r.random() < 0.85:
        dose: dict = {}
        k = r.random()
        if k < 0.7:
            q = {"value": r.choice([5.0, 10, 0.25, 1e-3, 2.5e10])}
            if r.random() < 0.8:
                q["system"] = r.choice([UCUM, UCUM, "http://example.org/units"])
            if r.random() < 0.8:
                q["unit"] = r.choice(["mg", "tablet", "\u00b5g"])
            if r.random() < 0.7:
                q["code"] = r.choice(["mg", "{tbl}", "ug"])
            dose["doseQuantity"] = q
        elif k < 0.8:
            dose["doseRange"] = {"low": {"value": 1}, "high": {"value": 2}}
        dose["type"] = {"coding": [{"code": "ordered"}]}
        m["dosageInstruction"] = [{"text": "5mg PO daily", "doseAndRate": [dose] if r.random() < 0.9 else []},
                                  {"doseAndRate": [{"doseQuantity": {"value": 99}}]}][:r.randint(1, 2)]
    if r.random() < 0.1:
        m["identifier"] = [{"value": f"RX{i}"}]
    if r.random() < 0.05:  # a Medication reference (a contained one or not): the Python path
        m.pop("medicationCodeableConcept")
        m["medicationReference"] = r.choice([{"reference": "#med1"}, {"reference": "Medication/med2"}])
        m["contained"] = [{"resourceType": "Medication", "id": "med1", "code": _cc(r)}]
    if r.random() < 0.05:
        m["note"] = [{"text": "take with food, call Mrs Smith"}]
    return m


def procedure(r: random.Random, i: int, plain: bool) -> dict:
    n = r.randrange(30)
    x: dict = {"resourceType": "Procedure", "id": f"x{i}", "status": "completed", "code": _cc(r),
               "subject": _ref(r, n, plain)}
    if r.random() < 0.7:
        x["encounter"] = {"reference": f"Encounter/e{n}"}
    if r.random() < 0.6:
        x["category"] = r.choice([{"coding": [{"system": SNOMED, "code": "277132007"}]}, {"text": "Therapeutic"},
                                  {"coding": [{"code": "387713003"}, {"code": "x"}], "text": "Surgical"}])
    k = r.random()
    if k < 0.6:
        x["performedDateTime"] = DATES[0] if plain else r.choice(DATES[:8])
    elif k < 0.85:
        x["performedPeriod"] = {"start": DATES[0] if plain else r.choice(DATES[:8])}
        if r.random() < 0.7:
            x["performedPeriod"]["end"] = r.choice(DATES[:4])
    elif k < 0.9:
        x["performedString"] = "last spring"
    if r.random() < 0.1:
        x["identifier"] = [{"value": f"PR{i}"}]
    return x


RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
GIVEN = ["Ann", "Jo", "", 'Jo "JJ"', "\u00c9lodie", "Li", "Mar\u00eda Jos\u00e9", "\u674e", "O'Neil"]
FAMILY = ["Smith", "Li", "Ng", "M\u00fcller", "\u738b\u5c0f\u660e", "Abe", "Wu-Hall", "", "Lee", "\u00c5s"]


def _omb(r: random.Random, code: str, display: str) -> dict:
    subs = [{"url": "text", "valueString": display}]
    k = r.random()
    if k < 0.6:
        subs.insert(0, {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                               "code": code, "display": display}})
    elif k < 0.7:
        subs.insert(0, {"url": "ombCategory", "valueCoding": {"code": code, "display": ""}})
    elif k < 0.8:
        subs.append({"url": "ombCategory", "valueCoding": {"code": code}})
    elif k < 0.85:
        subs.append({"url": "ombCategory"})
    elif k < 0.9:
        subs.append({"url": "detailed", "valueCoding": {"code": "x"}})
    return {"url": RACE if code[0] == "2" and code != "2135-2" else ETHNICITY, "extension": subs}


def patient(r: random.Random, i: int, plain: bool) -> dict:
    """A Patient with the members the flattener reads and the identifiers collect_identifiers takes (names,
    address lines, telecoms, identifier values), in the shapes the generators write and around them."""
    o: dict = {"resourceType": "Patient", "id": f"p{i}",
               "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]}}
    if r.random() < 0.9:
        o["gender"] = r.choice(["female", "male", "other", "unknown"])
    if r.random() < 0.9:
        o["birthDate"] = r.choice(["1970-01-01", "1984-02-29", "2001-12-31", "1955", "1962-07", "0001-01-01",
                                   "9999-12-31"] + ([] if plain else ["1983-02-29", "1970-1-1", "19700101", ""]))
    k = r.random()
    if k < 0.15:
        o["deceasedDateTime"] = r.choice(DATES[:4] + ["2024-03-05", "2023", "2023-11"] + ([] if plain else DATES[4:]))
    elif k < 0.3:
        o["deceasedBoolean"] = r.choice([True, False])
    elif k < 0.35:
        o["deceasedBoolean"] = False
        o["deceasedDateTime"] = "2022-05-06T07:08:09+02:00"
    exts = []
    if r.random() < 0.8:
        exts.append(_omb(r, r.choice(["2106-3", "2054-5", "2028-9", "1002-5"]), r.choice(["White", "Asian", "X"])))
    if r.random() < 0.7:
        exts.append(_omb(r, r.choice(["2135-2", "2186-5"]), r.choice(["Hispanic or Latino", "Not Hispanic"])))
    if r.random() < 0.2:
        exts.append(_omb(r, "2106-3", "White"))  # a second race extension: the first one with a category wins
    for _ in range(r.choice([0, 1, 1, 2])):  # birthsex: the last one wins (one without valueCode too)
        exts.append({"url": BIRTHSEX, **({"valueCode": r.choice(["F", "M", "UNK"])} if r.random() < 0.85 else {})})
    if r.random() < 0.3:
        exts.append({"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                     "valueAddress": {"city": "Springfield", "line": ["1 Birth Rd"]}})
    r.shuffle(exts)
    if exts:
        o["extension"] = exts
    k = r.random()
    if k < 0.5:
        o["maritalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                                          "code": r.choice(["M", "S", "D", "W"]), "display": "Married"}],
                              "text": "Married"}
    elif k < 0.65:
        o["maritalStatus"] = {"text": "it's complicated"}  # free text: never in the table
    elif k < 0.7:
        o["maritalStatus"] = {"coding": [], "text": "Never Married"}
    names = []
    for _ in range(r.choice([0, 1, 1, 2])):
        nm: dict = {"use": r.choice(["official", "usual", "maiden"])}
        if r.random() < 0.85:
            nm["given"] = r.sample(GIVEN, r.choice([0, 1, 2, 3]))
        if r.random() < 0.9:
            nm["family"] = r.choice(FAMILY)
        if r.random() < 0.2:
            nm["text"] = r.choice(["Dr Ann Smith", "", "Jo"])
        if r.random() < 0.1:
            nm["prefix"] = ["Mrs."]
        names.append(nm)
    if names:
        o["name"] = names
    if r.random() < 0.9:
        o["telecom"] = [{"system": "phone", "value": f"555-01{i % 100:02d}"}] + (
            [{"system": "email", "value": r.choice([f"p{i}@example.org", ""])}] if r.random() < 0.4 else [])
    if r.random() < 0.9:
        addrs = [{"line": r.sample([f"{i} Main St", "Apt 2", "", "R\u00fce de l'\u00c9glise 3"], r.choice([0, 1, 2])),
                  "city": "Boston", "postalCode": "02101", "country": "US",
                  **({"state": r.choice(["MA", "NY", "", "Qu\u00e9bec"])} if r.random() < 0.9 else {})}]
        if r.random() < 0.2:
            addrs.append({"line": ["PO Box 9"], "state": "VT"})
        o["address"] = addrs
    if r.random() < 0.8:
        o["identifier"] = [{"system": "urn:mrn", "value": f"MRN{i}"}] + (
            [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": f"999-{i:02d}-0000"}] if r.random() < 0.5 else [])
    if r.random() < 0.05:  # a value that is also a name: first kind seen wins in identifiers.parquet
        o.setdefault("identifier", []).append({"value": "Smith"})
    return o


def patients() -> list:
    return [{"resourceType": "Patient", "id": f"p{n}", "gender": "female", "birthDate": "1970-01-01"}
            for n in range(30)]


def mutate(r: random.Random, o: dict) -> dict | bytes:
    """One structural or byte-level change."""
    k = r.random()
    o = json.loads(json.dumps(o))
    if k < 0.35:  # a leaf or member replaced by a value of another type
        node, path = o, []
        while isinstance(node, (dict, list)) and node and r.random() < 0.7:
            key = r.choice(list(node)) if isinstance(node, dict) else r.randrange(len(node))
            path.append((node, key))
            node = node[key]
        if path:
            parent, key = path[-1]
            parent[key] = r.choice(WEIRD + DATES + [{"reference": x.format(n=1)} for x in REFS])
        return o
    if k < 0.45:  # a member dropped
        if len(o) > 2:
            del o[r.choice([x for x in o if x != "resourceType"])]
        return o
    if k < 0.5:
        o["modifierExtension"] = r.choice([[], [{"url": "urn:x", "valueBoolean": True}]])
        return o
    if k < 0.55:
        o.setdefault("code", {})["modifierExtension"] = [{"url": "urn:x"}]
        return o
    if k < 0.6:
        o["id"] = r.choice(["o1", "e1", "c1", "", 5, None, "\u00e9", "a\"b"])
        return o
    if k < 0.65:
        o["resourceType"] = r.choice(["Patient", "observation", None, "Observation "])
        return o
    if k < 0.7:
        o["contained"] = [{"resourceType": "Patient", "id": "c1"}]
        return o
    raw = orjson.dumps(o)
    j = r.randrange(1, len(raw))
    choices = [
        raw[:j],  # truncated
        raw[:j] + b"\xff" + raw[j:],  # invalid UTF-8
        raw[:-1] + b',"id":"dup"}',  # a duplicate key (last wins in orjson)
        raw[:-1] + b',"subject":{"reference":"Patient/p2"}}',
        raw[:-1] + b',"x":NaN}',
        raw[:-1] + b',"x":1e400}',
        raw[:-1] + b',"x":123456789012345678901234567890}',
        raw[:-1] + b',"x":' + b"[" * 300 + b"]" * 300 + b"}",
        raw[:-1] + b',"x":"\\ud800"}',
        raw[:-1] + b',"\\u0069d":"esc"}',
        raw[:-1] + b',}',
        b"  " + raw + b" \r",
        b"\xef\xbb\xbf" + raw,
        raw + b" " + raw,
        raw.replace(b'"status"', b'"st\\u0061tus"', 1),
        raw.replace(b":", b": ", 3),
        b"",
        b"   ",
        b"[" + raw + b"]",
    ]
    return r.choice(choices)


MAKERS = {"Patient": patient, "Observation": observation, "Encounter": encounter, "Condition": condition,
          "MedicationRequest": medication_request, "Procedure": procedure}


def write_extract(folder: Path, seed: int, n: int, mutated: float,
                  types: tuple = ("Observation", "Encounter", "Condition")) -> int:
    r = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if "Patient" not in types:
        (folder / "Patient.ndjson").write_bytes(b"\n".join(orjson.dumps(p) for p in patients()) + b"\n")
    total = 0
    for name, make in ((t, MAKERS[t]) for t in types):
        lines = []
        for i in range(n if name != "Patient" else max(n // 4, 30)):
            plain = r.random() >= mutated
            o = make(r, i, plain)
            item = o if plain else mutate(r, o)
            lines.append(item if isinstance(item, bytes) else orjson.dumps(item))
        (folder / f"{name}.ndjson").write_bytes(b"\n".join(lines) + b"\n")
        total += n
    return total


def ingest_both(src: Path, tmp: Path, keyer: Keyer, **kw) -> tuple[dict, dict]:
    reports = {}
    for flag in (True, False):
        out = tmp / f"out-{flag}"
        reports[flag] = ingest_extract(str(src), str(out), keyer=keyer, native=flag, **kw)
    a, b = tmp / "out-True", tmp / "out-False"
    names = sorted(p.name for p in a.glob("*.parquet"))
    assert names == sorted(p.name for p in b.glob("*.parquet"))
    assert set(OUTPUTS) <= set(names) or "medication_request.parquet" in names
    for name in names:
        ta, tb = pq.read_table(a / name), pq.read_table(b / name)
        assert ta.schema == tb.schema, name
        assert ta.num_rows == tb.num_rows, name
        assert ta.equals(tb), f"{name} differs"
    assert (a / "quarantine.ndjson").read_bytes() == (b / "quarantine.ndjson").read_bytes()
    ra = {k: v for k, v in reports[True].items() if k not in VOLATILE}
    rb = {k: v for k, v in reports[False].items() if k not in VOLATILE}
    assert ra == rb
    assert not any(reports[False]["native_lines"].values())
    return reports[True], reports[False]


def test_plain_extract_same_outputs_and_taken_natively(tmp_path, keyer):
    src = tmp_path / "plain"
    n = write_extract(src, seed=1, n=1500, mutated=0.0)
    rep, _ = ingest_both(src, tmp_path, keyer, validate_first=0, validate_sample_rate=0.0)
    # the generated shapes are what the compiled path covers: it takes most of them
    assert sum(rep["native_lines"].values()) > 0.6 * n
    assert rep["rows"]["observation"] > 1500


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_mutated_extract_same_outputs(tmp_path, keyer, seed):
    src = tmp_path / "mutated"
    write_extract(src, seed=seed, n=1200, mutated=0.5)
    rep, _ = ingest_both(src, tmp_path, keyer, validate_first=5, validate_sample_rate=0.05, batch_rows=97)
    assert rep["quarantined_total"] > 100  # the mutations reach the quarantine ...
    assert sum(rep["native_lines"].values()) > 300  # ... and the plain half still goes native
    assert rep["dangling_references"]


ALL5 = ("Observation", "Encounter", "Condition", "MedicationRequest", "Procedure")


@pytest.mark.parametrize("seed,mutated", [(21, 0.0), (22, 0.5)])
def test_medication_request_and_procedure_same_outputs(tmp_path, keyer, seed, mutated):
    """MedicationRequest and Procedure (the rows of their built-in views) through the compiled flatten and through
    the views, plain and mutated; allow-listed codes change nothing (the views never read a concept's text)."""
    from synthfactory.ingest.flatteners import ValueRules

    src = tmp_path / "mp"
    write_extract(src, seed=seed, n=800, mutated=mutated, types=("Encounter", "MedicationRequest", "Procedure"))
    resources = ["Patient", "Encounter", "MedicationRequest", "Procedure"]
    rep, _ = ingest_both(src, tmp_path / "a", keyer, resources=resources, validate_first=3,
                         validate_sample_rate=0.02, batch_rows=89)
    assert rep["rows"]["medication_request"] > 0 and rep["rows"]["procedure"] > 0
    for t in ("MedicationRequest", "Procedure"):
        assert rep["native_lines"][t] > (0.4 if not mutated else 0.2) * rep["resources_read"][t], t
    rep2, _ = ingest_both(src, tmp_path / "b", keyer, resources=resources, validate_first=0,
                          validate_sample_rate=0.0, value_rules=ValueRules(text_codes=("1-1", "E11.9")))
    assert rep2["native_lines"]["MedicationRequest"] > 0
    if mutated:
        assert rep["quarantined"]["MedicationRequest"] > 0 and rep["quarantined"]["Procedure"] > 0


@pytest.mark.parametrize("seed,mutated", [(31, 0.0), (32, 0.5), (33, 0.5)])
def test_patient_same_table_identifiers_and_patient_keys(tmp_path, keyer, seed, mutated):
    """Patient through the compiled flatten and through the hand-written flattener, plain and mutated: the same
    patient table, the same identifiers.parquet (names, family names, address lines, telecoms and identifier
    values in collect_identifiers' order, first kind wins), the same quarantine, and the same patient keys (the
    Observations after it are kept or quarantined as dangling alike). An allow-list changes nothing: the
    marital status text is never kept."""
    from synthfactory.ingest.flatteners import ValueRules

    src = tmp_path / "pt"
    write_extract(src, seed=seed, n=1200, mutated=mutated, types=("Patient", "Observation", "Encounter", "Condition"))
    resources = ["Patient", "Observation", "Encounter", "Condition"]
    rep, _ = ingest_both(src, tmp_path / "a", keyer, resources=resources, validate_first=3,
                         validate_sample_rate=0.02, batch_rows=53)
    assert rep["native_lines"]["Patient"] > (0.5 if not mutated else 0.2) * rep["resources_read"]["Patient"]
    assert rep["rows"]["patient"] > 120
    if mutated:
        assert rep["quarantined"]["Patient"] > 0 and rep["dangling_references"]
    rep2, _ = ingest_both(src, tmp_path / "b", keyer, resources=resources, validate_first=0,
                          validate_sample_rate=0.0, value_rules=ValueRules(text_codes=("M", "72166-2")))
    assert rep2["native_lines"]["Patient"] > 0
    ids = pq.read_table(tmp_path / "a" / "out-True" / "identifiers.parquet").to_pylist()
    kinds = {row["kind"] for row in ids}
    assert {"id", "identifier", "name", "address", "telecom"} <= kinds
    table = pq.read_table(tmp_path / "a" / "out-True" / "patient.parquet")
    flat = {str(v) for col in table.columns for v in col.to_pylist() if v is not None}
    for row in ids:  # names, address lines and telecoms never reach the table
        if row["kind"] in ("name", "family", "address", "telecom") and len(row["value"]) > 3:
            assert row["value"] not in flat, row["kind"]
    assert "it's complicated" not in flat


def test_patient_lines_the_compiled_flatten_hands_back(keyer):
    """The shapes that go to the Python path line by line (prepare/commit directly): an invalid gender or birthDate,
    an escaped name, a non-list name, a non-string telecom; the plain line next to them is taken, its key added to
    the patient keys given."""
    flat = native.flattener("Patient", keyer)
    from synthfactory.ingest.schemas import PATIENT_SCHEMA

    plain = {"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1980-05",
             "name": [{"given": ["Ann", "B"], "family": "Li"}, {"given": ["\u00c9", ""], "family": "Wu-Hall", "text": "x"}],
             "address": [{"line": ["1 Main"], "state": "MA"}], "telecom": [{"value": "555"}]}
    odd = [dict(plain, gender="f"), dict(plain, birthDate="1980-13"), dict(plain, name=[{"family": "O\"Neil"}]),
           dict(plain, name={"family": "Li"}), dict(plain, telecom=[{"value": 5}]), dict(plain, deceasedBoolean="no")]
    for o in odd:
        prep = flat.prepare([orjson.dumps(o)])
        cols, pkeys = native.columns(PATIENT_SCHEMA), set()
        assert flat.commit(prep, 0, 0, cols, set(), pkeys, {}, 0, 0, -1, 0, 0, 0, 10) == (0, 0, 1), o
        assert len(cols) == 0 and not pkeys
    prep = flat.prepare([orjson.dumps(plain)])
    cols, pkeys, chunk = native.columns(PATIENT_SCHEMA), set(), {}
    assert flat.commit(prep, 0, 0, cols, set(), pkeys, chunk, 0, 0, -1, 0, 0, 0, 10) == (1, 1, 0)
    assert pkeys == {keyer.key("Patient", "p1")}
    assert list(chunk.items()) == [("p1", "id"), ("Ann B Li", "name"), ("\u00c9 Wu-Hall", "name"), ("Wu-Hall", "family"),
                                   ("x", "name"), ("1 Main", "address"), ("555", "telecom")]  # "Li": < 4, no family
    row = pa.Table.from_arrays(native.arrays(cols, PATIENT_SCHEMA), schema=PATIENT_SCHEMA).to_pylist()[0]
    assert row["gender"] == "male" and row["birth_date_precision"] == "month" and row["deceased"] is False
    assert row["state"] == "MA"


def test_patient_lines_taken_give_the_python_flatteners_row_and_identifiers(keyer):
    """Line by line, over generated and (once or twice) mutated Patients: every line the compiled flatten takes is
    one the Python path would take too (no BadResource, no modifierExtension), with the same row, the same
    identifiers in the same order with the same kinds (collect_identifiers), and its key added to the patient
    keys."""
    from synthfactory.fhir.normalize import collect_identifiers, has_modifier_extension
    from synthfactory.ingest.flatteners import make_flatteners
    from synthfactory.ingest.schemas import PATIENT_SCHEMA

    flat, py = native.flattener("Patient", keyer), make_flatteners(keyer.key)["Patient"]
    r = random.Random(41)
    taken = 0
    for i in range(3000):
        item = patient(r, i, r.random() < 0.5)
        for _ in range(r.choice([0, 0, 1, 2])):
            if isinstance(item, dict):
                item = mutate(r, item)
        raw = item if isinstance(item, bytes) else orjson.dumps(item)
        cols, pkeys, chunk = native.columns(PATIENT_SCHEMA), set(), {}
        if flat.commit(flat.prepare([raw]), 0, 0, cols, set(), pkeys, chunk, 0, 0, -1, 0, 0, 0, 10)[1] == 0:
            assert len(cols) == 0 and not pkeys and not chunk
            continue
        taken += 1
        o = orjson.loads(raw)
        assert o.get("resourceType") == "Patient" and not has_modifier_extension(o), raw
        rows = py(o, o["id"])  # raises BadResource if the Python path would quarantine it
        ids = {o["id"]: "id"}
        collect_identifiers(o, True, ids.setdefault)
        assert list(chunk.items()) == list(ids.items()), raw
        want = pa.table([pa.array([row[j] for row in rows], f.type) for j, f in enumerate(PATIENT_SCHEMA)],
                        schema=PATIENT_SCHEMA)
        got = pa.Table.from_arrays(native.arrays(cols, PATIENT_SCHEMA), schema=PATIENT_SCHEMA)
        assert got.equals(want), raw
        assert pkeys == {keyer.key("Patient", o["id"])}
    assert 800 < taken < 2500


def test_keep_dangling_and_full_validation_same_outputs(tmp_path, keyer):
    src = tmp_path / "mix"
    write_extract(src, seed=5, n=600, mutated=0.3)
    ingest_both(src, tmp_path / "a", keyer, on_dangling="keep", validate_first=0, validate_sample_rate=0.0)
    rep, _ = ingest_both(src, tmp_path / "b", keyer, validate_sample_rate=1.0)
    # every line validated (in Python), and those that pass taken by the compiled commit: the same outputs
    assert rep["validated"] > 0.5 * sum(rep["resources_read"].values())
    assert sum(rep["native_lines"].values()) > 0.3 * sum(rep["resources_read"].values())


@pytest.mark.skipif(not native.available(), reason="the compiled module is not built")
def test_a_sampled_line_is_validated_then_taken_by_the_compiled_commit(tmp_path, keyer):
    """A plain line picked for the validation sample comes back from ``commit`` (why 3) unless it is a duplicate
    id or a dangling reference, which stay the Python loop's. It is validated in Python; when it passes, the
    compiled commit takes it; when R4B rejects it (a member the compiled path does not read), it is quarantined
    under its line number with its identifiers kept, as the Python loop does. The same outputs both ways."""
    src = tmp_path / "x"
    src.mkdir()
    (src / "Patient.ndjson").write_bytes(b"\n".join(orjson.dumps(p) for p in patients()) + b"\n")
    obs = [{"resourceType": "Observation", "id": f"o{i}", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "subject": {"reference": f"Patient/p{i}"}, "effectiveDateTime": "2020-01-02T03:04:05Z",
            "valueQuantity": {"value": 6.1, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}
           for i in range(12)]
    obs[3]["bogus"] = 1                                    # valid JSON, plain to the compiled path, not R4B
    obs[3]["identifier"] = [{"value": "lab-77"}]
    obs[6]["id"] = obs[1]["id"]                            # a duplicate id: "duplicate id", never validated
    obs[8]["subject"] = {"reference": "Patient/nobody"}    # dangling: quarantined after its validation
    (src / "Observation.ndjson").write_bytes(b"\n".join(orjson.dumps(o) for o in obs) + b"\n")
    rep, _ = ingest_both(src, tmp_path, keyer, validate_first=100, validate_sample_rate=0.0)
    q = [orjson.loads(x) for x in (tmp_path / "out-True" / "quarantine.ndjson").read_bytes().splitlines()]
    reasons = {x["line"]: x["reason"] for x in q if x.get("resource_type") == "Observation"}
    assert reasons[4].startswith("validation failed at bogus"), reasons
    assert reasons[7] == "duplicate id" and reasons[9] == "dangling reference to Patient", reasons
    assert len(reasons) == 3
    assert rep["validated_by_type"]["Observation"] == 11   # all but the duplicate
    assert rep["native_lines"]["Observation"] == 9         # every line that passed, through the compiled commit
    ids = pq.read_table(tmp_path / "out-True" / "identifiers.parquet").column("value").to_pylist()
    assert "lab-77" in ids and obs[3]["id"] in ids          # a rejected line's identifiers, like the Python loop


def test_key_columns_are_written_without_dictionary_or_statistics(tmp_path, keyer):
    """The pseudonymous keys are unique HMACs: no dictionary and no min/max (they prune nothing); the coded
    columns keep both, times and numbers their min/max."""
    src = tmp_path / "plain"
    write_extract(src, seed=2, n=300, mutated=0.0)
    ingest_extract(str(src), str(tmp_path / "out"), keyer=keyer)
    meta = pq.ParquetFile(tmp_path / "out" / "observation.parquet").metadata
    rg = meta.row_group(0)
    cols = {rg.column(j).path_in_schema: rg.column(j) for j in range(rg.num_columns)}
    keys = [c for c in cols if c.endswith("_key")]
    assert keys and all(cols[c].statistics is None for c in keys)
    assert cols["code"].statistics is not None and cols["code"].statistics.has_min_max
    assert "RLE_DICTIONARY" in str(cols["code"].encodings) and "RLE_DICTIONARY" not in str(cols[keys[0]].encodings)
    assert "RLE_DICTIONARY" not in str(cols["effective"].encodings)  # times and numbers: mostly distinct
    assert cols["effective"].statistics is not None and cols["effective"].statistics.has_min_max


@pytest.mark.skipif(not native.available(), reason="the compiled module is not built")
def test_recycled_block_arrays_give_the_same_prepares(keyer):
    """The per-block arrays a dropped Prepared leaves are reused by the next prepares (larger and smaller blocks,
    after release_scratch too): each prepare commits the same rows as a fresh flattener's."""
    from synthfactory.ingest import _flatc

    r = random.Random(9)
    lines = [orjson.dumps(observation(r, i, True)) for i in range(3000)]
    sizes = [2000, 50, 3000, 1, 700, 2999]

    def rows(flat, block):
        cols = native.columns(OBSERVATION_SCHEMA)
        prep = flat.prepare(block)
        flat.commit(prep, 0, 0, cols, native.id_set(), None, {}, 0, 0, -1, 0, 0, 0, 10 ** 9)
        return pa.Table.from_arrays(native.arrays(cols, OBSERVATION_SCHEMA), schema=OBSERVATION_SCHEMA)

    want = {n: rows(native.flattener("Observation", keyer), b"\n".join(lines[:n])) for n in sizes}
    flat = native.flattener("Observation", keyer)
    for k, n in enumerate(sizes * 2):
        if k == len(sizes):
            _flatc.release_scratch()
        assert rows(flat, b"\n".join(lines[:n])).equals(want[n]), n


def test_real_shaped_extract_same_outputs(carebundle_extract, tmp_path, keyer):
    rep, _ = ingest_both(carebundle_extract, tmp_path, keyer, validate_first=0, validate_sample_rate=0.0)
    assert rep["native_lines"]["Observation"] > 0.9 * rep["resources_read"]["Observation"]


def test_switched_off_by_environment(tmp_path, keyer, monkeypatch):
    monkeypatch.setenv("SYNTHFACTORY_INGEST_NATIVE", "0")
    assert not native.available()
    s = IngestSession(str(tmp_path / "out"), keyer=keyer)
    assert s.native == {}
    s.abort()


def test_commit_refuses_a_block_or_buffer_of_another_shape(keyer):
    from synthfactory.ingest.schemas import ENCOUNTER_SCHEMA

    obs, enc = native.flattener("Observation", keyer), native.flattener("Encounter", keyer)
    line = orjson.dumps({"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"}})
    prep = obs.prepare([line])
    args = (0, 0, native.columns(OBSERVATION_SCHEMA), set(), None, {}, 0, 0, -1, 0, 0, 0, 10)
    with pytest.raises(ValueError):
        enc.commit(prep, *args)  # an Observation block into the Encounter flattener
    with pytest.raises(ValueError):
        obs.commit(prep, 0, 0, native.columns(ENCOUNTER_SCHEMA), *args[3:])
    cols = args[2]
    assert obs.commit(prep, *args) == (1, 1, 0)
    assert len(cols) == 1


BUILTIN = ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Procedure")


@pytest.mark.parametrize("extract,text_codes", [("clinosim", ()), ("carebundle", ()), ("clinosim", ("72166-2",))])
def test_generators_extracts_same_tables_one_by_one(request, tmp_path, keyer, extract, text_codes):
    """clinosim's and carebundle's NDJSON (extracts no one on the project wrote) with the compiled flatten and with
    the Python flatteners: every built-in table, compared one by one (with an allow-list too, which hands the
    strings to the Python loop), with the pipeline's validation sample."""
    from synthfactory.ingest.flatteners import ValueRules

    src = request.getfixturevalue("clinosim_fhir" if extract == "clinosim" else "carebundle_extract")
    present = [t for t in BUILTIN if any(src.glob(f"{t}*.ndjson*"))]
    reports = {}
    for flag in (True, False):
        reports[flag] = ingest_extract(str(src), str(tmp_path / f"out-{flag}"), keyer=keyer, native=flag,
                                       resources=present, on_dangling="keep",
                                       value_rules=ValueRules(text_codes=text_codes))
    tables = reports[True]["tables"]
    assert set(tables) == set(reports[False]["tables"]) and {"patient", "observation"} <= set(tables)
    for name in sorted(tables):
        ta, tb = pq.read_table(tables[name]), pq.read_table(reports[False]["tables"][name])
        assert ta.num_rows == tb.num_rows and ta.equals(tb), f"{extract}: table {name} differs"
    for name in ("identifiers.parquet", "quarantine.ndjson"):
        a, b = tmp_path / "out-True" / name, tmp_path / "out-False" / name
        assert (pq.read_table(a).equals(pq.read_table(b)) if name.endswith(".parquet")
                else a.read_bytes() == b.read_bytes()), name
    assert reports[True]["rows"] == reports[False]["rows"]
    assert reports[True]["native_lines"]["Observation"] > 0.5 * reports[True]["resources_read"]["Observation"]
    for t in ("Patient", "MedicationRequest", "Procedure"):  # small files: the first 20 of each are validated (Python)
        rest = reports[True]["resources_read"].get(t, 0) - 20
        assert reports[True]["native_lines"].get(t, 0) >= 0.8 * rest, t


def test_chunk_blocks_give_the_lines_of_line_blocks():
    """The compiled prepare splits runs of whole lines itself (chunk_blocks): the same lines, in the same order,
    oversize markers included, over random streams cut into random chunks."""
    from synthfactory.ingest.fhir_ndjson import chunk_blocks, line_blocks

    def lines_of(blocks):
        out = []
        for b in blocks:
            out.extend(b if type(b) is list else bytes(b).split(b"\n"))
        return out

    r = random.Random(3)
    for _ in range(1000):
        parts = [r.choice([b"", b"{}", b"x" * r.randint(1, 40), b"\xc3\xa9", b"\r"]) for _ in range(r.randint(0, 30))]
        data = b"\n".join(parts) + r.choice([b"", b"\n", b"\n\n"])
        cuts = sorted(r.sample(range(len(data) + 1), min(len(data), r.randint(0, 20))))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)]) if data[a:b]]
        limit = r.choice([8, 25, 1000])
        assert lines_of(chunk_blocks(iter(chunks), limit)) == lines_of(line_blocks(iter(chunks), limit)), (chunks, limit)


def test_prepare_splits_a_chunk_like_a_list(keyer):
    flat = native.flattener("Observation", keyer)
    r = random.Random(4)
    lines = [orjson.dumps(observation(r, i, True)) for i in range(50)] + [b"", b"not json"]
    a, b = flat.prepare(b"\n".join(lines)), flat.prepare(lines)
    assert len(a) == len(b) == 52 and [a.line(i) for i in range(52)] == lines == [b.line(i) for i in range(52)]
    assert len(flat.prepare(b"")) == 1 and flat.prepare(b"").line(0) == b""
    whole = b"junk\n" + b"\n".join(lines) + b"\ntail"
    c = flat.prepare(memoryview(whole)[5:len(whole) - 5])  # a view of the chunk: no copy
    assert len(c) == 52 and [c.line(i) for i in range(52)] == lines
    with pytest.raises(TypeError):
        flat.prepare(memoryview(bytearray(b"x")))
    with pytest.raises(IndexError):
        a.line(52)


@pytest.mark.parametrize("chunk_rows,threaded,spill_last", [(1_000_000, False, False), (7, False, False),
                                                              (7, True, False), (7, True, True)])
def test_identifier_sink_same_as_the_dict(tmp_path, monkeypatch, chunk_rows, threaded, spill_last):
    """The identifiers as Arrow buffers (what the compiled commit appends to), deduplicated with Arrow when they
    spill, against the dict the module-less install keeps: the same values, each with the kind it was first
    seen as; in first-seen order when nothing spilled. Small chunks force spills and the partitioned close,
    which joins the rows still in memory to their partitions' spills (or finds none left: ``spill_last``)."""
    from synthfactory.ingest import session as S

    monkeypatch.setattr(S, "IDENTIFIER_CHUNK_ROWS", chunk_rows)
    r = random.Random(9)
    adds = [(r.choice(["p1", "p2", "MRN1", "Main St 1", "\u00e9t\u00e9", "x" * 70, f"v{r.randint(0, 60)}"]),
             r.choice(["id", "identifier", "name", "address"])) for _ in range(400)]
    got = {}
    for mode in ("columns", "dict"):
        if mode == "dict":
            monkeypatch.setattr(S.native_flatten, "columns", lambda schema: None)
        bg = S._BackgroundWriter() if threaded else None  # spills written on the session's writer thread
        ids = S._Identifiers(str(tmp_path / f"{mode}.parquet"), bg)
        assert (type(ids.chunk) is dict) == (mode == "dict")
        for i, (v, k) in enumerate(adds):
            ids.add(v, k)
            if i % 5 == 0:
                ids.maybe_spill()
        if spill_last:
            ids._write_chunk()
            assert not len(ids.chunk)
        ids.close()
        if bg is not None:
            bg.shutdown()
        got[mode] = pq.read_table(tmp_path / f"{mode}.parquet").to_pylist()
        assert ids.count == len(got[mode])
    first: dict[str, str] = {}
    for v, k in adds:
        first.setdefault(v, k)
    for mode, rows in got.items():
        assert {row["value"]: row["kind"] for row in rows} == first and len(rows) == len(first), mode
    if chunk_rows > len(adds):
        assert [row["value"] for row in got["columns"]] == list(first) == [row["value"] for row in got["dict"]]


def test_bundles_patient_same_outputs_with_and_without_the_compiled_flatten(carebundle_bundles, tmp_path, keyer,
                                                                           monkeypatch):
    """carebundle's transaction Bundles (a Bundle's entries go through the same hot loop): every table,
    identifiers.parquet (the Patients' names, address lines and telecoms) and the quarantine are the same with the
    compiled flatten as without it, and the Patients beyond the validation sample go native (with no per-file sample:
    each file's first entry, its Patient, is validated by default)."""
    from synthfactory.ingest.bundle import ingest_bundles

    types = ["Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Procedure"]
    reps = {}
    for flag in (True, False):
        monkeypatch.setenv("SYNTHFACTORY_INGEST_NATIVE", "1" if flag else "0")
        reps[flag] = ingest_bundles(str(carebundle_bundles), str(tmp_path / f"out-{flag}"), keyer=keyer,
                                    resources=types, validate_first=2, validate_sample_rate=0.0, on_dangling="keep",
                                    validate_first_per_file=0)  # else each file's Patient (its first entry) is validated
    assert reps[True]["rows"] == reps[False]["rows"] and reps[True]["rows"]["patient"] > 0
    for name in sorted(reps[True]["tables"]):
        a, b = pq.read_table(reps[True]["tables"][name]), pq.read_table(reps[False]["tables"][name])
        assert a.equals(b), name
    a, b = tmp_path / "out-True", tmp_path / "out-False"
    assert pq.read_table(a / "identifiers.parquet").equals(pq.read_table(b / "identifiers.parquet"))
    assert (a / "quarantine.ndjson").read_bytes() == (b / "quarantine.ndjson").read_bytes()
    assert reps[True]["native_lines"].get("Patient", 0) > 0 and not any(reps[False]["native_lines"].values())


def test_id_set_adds_finds_and_counts_like_a_set():
    """The compiled IdSet (128-bit hashes of the UTF-8 id) against a set of str: the same members after 200k
    adds with repeats (growth from an empty table on the way), no id taken for another, and `in` of anything but
    a str is False, as for a set of str."""
    r = random.Random(5)
    s, ref = native.id_set(), set()
    assert type(s).__name__ == "IdSet"
    alphabet = "abcXYZ019-.\u00e9\u4e2d"
    ids = ["", "a", "A", "a" * 16, "a" * 17, "\u00e9t\u00e9"] + [
        "".join(r.choice(alphabet) for _ in range(r.randint(1, 40))) for _ in range(200_000)]
    for i in ids:
        assert (i in s) == (i in ref)
        s.add(i)
        ref.add(i)
    assert len(s) == len(ref) > 150_000
    assert all(i in s for i in ref)
    others = {"".join(r.choice(alphabet) for _ in range(r.randint(1, 40))) for _ in range(100_000)} - ref
    assert not any(o in s for o in others)
    assert 5 not in s and None not in s and b"a" not in s
    assert "\ud800" not in s and "a\udc00" not in s  # lone surrogates (json.loads makes them; orjson refuses)
    s.add("\ud800")
    assert "\ud800" in s and "a\udc00" not in s and "\udc00" not in s
    with pytest.raises(TypeError):
        s.add(b"a")
    assert s.__sizeof__() < 16 / 0.35 * len(s) + 100  # 16 bytes a slot, load 0.35-0.7 (a set of str: ~120 an id)


@pytest.mark.parametrize("seed", [41, 42])
def test_duplicate_ids_same_outputs_with_the_id_set_and_a_set(tmp_path, keyer, monkeypatch, seed):
    """Duplicate ids (the mutated extract's o1/e1/c1/\u00e9 ids and whole repeated files) are quarantined alike
    whether the ids seen are an IdSet (compiled and Python path: ingest_both) or a plain set (a build without the
    module)."""
    src = tmp_path / "dups"
    write_extract(src, seed=seed, n=900, mutated=0.5)
    obs = (src / "Observation.ndjson").read_bytes()
    (src / "Observation-again.ndjson").write_bytes(obs[: len(obs) // 3].rsplit(b"\n", 1)[0] + b"\n")
    rep, _ = ingest_both(src, tmp_path / "idset", keyer, validate_first=5, validate_sample_rate=0.05, batch_rows=97)
    # of the 300 repeated lines (the others fail a check before the id check, as their first copies did)
    assert rep["quarantine_reasons"]["Observation"]["duplicate id"] >= 150
    monkeypatch.setattr(native, "id_set", set)
    rep_set, _ = ingest_both(src, tmp_path / "set", keyer, validate_first=5, validate_sample_rate=0.05,
                             batch_rows=97)
    assert {k: v for k, v in rep.items() if k not in VOLATILE} == {
        k: v for k, v in rep_set.items() if k not in VOLATILE}
    for name in OUTPUTS + ("quarantine.ndjson",):
        assert (tmp_path / "idset" / "out-True" / name).read_bytes() == (
            tmp_path / "set" / "out-True" / name).read_bytes(), name


def _committed(flat, prep, pkeys=None, schema=OBSERVATION_SCHEMA) -> tuple[list, int, list, list]:
    """What the commit takes from a prepared block, line by line as the hot loop does (the lines it hands back
    skipped): the lines handed back, how many it took, the table rows and the identifiers."""
    from synthfactory.ingest.schemas import IDENTIFIERS_SCHEMA

    cols, idents = native.columns(schema), native.columns(IDENTIFIERS_SCHEMA)
    seen, pos, took, handed = native.id_set(), 0, 0, []
    while pos < len(prep):
        nxt, n, why = flat.commit(prep, pos, pos, cols, seen, pkeys, idents, 0, 0, -1, 0, 0, 0, 1 << 30)
        took += n
        if why == 0:
            break
        handed.append(nxt)
        pos = nxt + 1
    return (handed, took, [a.to_pylist() for a in native.arrays(cols, schema)],
            [a.to_pylist() for a in native.arrays(idents, IDENTIFIERS_SCHEMA)])


def test_start_prepares_like_prepare_on_a_thread_of_its_own(keyer):
    """``Flattener.start`` runs the prepare on a thread that never takes the GIL: the same lines, rows and keys
    as ``prepare``, for a chunk, a view of one and a list of lines; commit and len() join the thread themselves;
    one prepare at a time per flattener; a block dropped while it is being prepared is waited for, not freed
    under the thread."""
    flat, other = native.flattener("Observation", keyer), native.flattener("Observation", keyer)
    r = random.Random(21)
    lines = [orjson.dumps(observation(r, i, True)) for i in range(3000)] + [b"not json", b""]
    whole = b"\n".join(lines)
    for block in (whole, memoryview(b"x\n" + whole + b"\ny")[2:len(whole) + 2], lines):
        want = _committed(other, other.prepare(block))
        assert want[1] > 1500 and len(want[2][0]) >= want[1]  # the plain lines were taken by the commit
        started = flat.start(block)
        assert started.wait() is started and started.done
        assert _committed(other, started) == want  # prepared by one flattener, committed by another
        assert _committed(other, flat.start(block)) == want  # commit joins the thread itself
        s = flat.start(block)
        assert len(s) == len(lines) and s.line(3000) == b"not json"  # so does len()
        s = flat.start(block)
        with pytest.raises(RuntimeError):
            flat.start(block)  # its previous block is still being prepared (or not yet joined)
        with pytest.raises(RuntimeError):
            flat.prepare(block)
        s.wait()
        assert flat.prepare(block) is not None  # joined: the flattener is free again
    for _ in range(50):  # dropped without a wait: the dealloc joins the thread
        flat.start(whole)
    assert _committed(other, flat.start(whole)) == _committed(other, other.prepare(whole))


def test_a_prepare_pool_prepares_like_prepare_in_the_order_blocks_were_started(keyer):
    """``PreparePool``: its workers (one per flattener, never the GIL) prepare started blocks as ``prepare`` does
    (a chunk, a view of one, a list of lines), the oldest first, many queued at once; its flatteners are its own
    while it lives; a block dropped while queued leaves the queue (no wait, the next blocks still come); close()
    prepares what is queued, then start is refused."""
    from synthfactory.ingest import _flatc

    flats = [native.flattener("Observation", keyer) for _ in range(2)]
    other = native.flattener("Observation", keyer)
    r = random.Random(22)
    lines = [orjson.dumps(observation(r, i, True)) for i in range(1500)] + [b"not json", b""]
    whole = b"\n".join(lines)
    want = _committed(other, other.prepare(whole))
    assert want[1] > 700
    pool = native.prepare_pool(flats)
    assert pool.workers == 2
    with pytest.raises(RuntimeError):
        flats[0].prepare(whole)  # the pool's
    with pytest.raises(RuntimeError):
        native.prepare_pool(flats)  # already a pool's
    blocks = [whole, memoryview(b"x\n" + whole + b"\ny")[2:len(whole) + 2], list(lines)] * 4
    started = [pool.start(b) for b in blocks]  # twelve queued at once on two workers
    assert all(_committed(other, p) == want for p in started)
    assert all(p.done for p in started)
    for _ in range(20):  # dropped while queued or being prepared: taken out of the queue, or waited for
        pool.start(whole)
    kept = [pool.start(whole) for _ in range(6)]
    del kept[1:4]
    assert [_committed(other, p) for p in kept] == [want] * 3
    queued = [pool.start(whole) for _ in range(8)]
    pool.close()  # the queued blocks are prepared first
    assert all(p.done for p in queued) and _committed(other, queued[-1]) == want
    with pytest.raises(RuntimeError):
        pool.start(whole)
    del pool, started, kept, queued
    assert flats[0].prepare(whole) is not None  # the pool is gone: its flatteners are free again
    with pytest.raises(ValueError):
        _flatc.PreparePool([flats[0], native.flattener("Condition", keyer)])  # one resource type
    with pytest.raises(ValueError):
        _flatc.PreparePool([flats[0], flats[0]])
    with pytest.raises(ValueError):
        _flatc.PreparePool([])


def test_patient_keys_in_an_idset_take_and_hand_back_the_same_lines_as_in_a_set(keyer):
    """The session's patient keys are an IdSet, which the commit probes without the GIL: a line whose patient is
    not among them (dangling) is handed back, as with a set of the same keys; a Patient's key is added to either."""
    from synthfactory.ingest.schemas import PATIENT_SCHEMA

    flat, pflat = native.flattener("Observation", keyer), native.flattener("Patient", keyer)
    r = random.Random(23)
    whole = b"\n".join(orjson.dumps(observation(r, i, True)) for i in range(3000))
    known = [keyer.key("Patient", f"p{n}") for n in range(0, 30, 2)]  # half of the patients the lines name
    as_set, as_idset = set(known), native.id_set()
    for k in known:
        as_idset.add(k)
    want = _committed(flat, flat.prepare(whole), as_set)
    got = _committed(flat, flat.prepare(whole), as_idset)
    assert got == want and 500 < want[1] < 2000 and len(want[0]) > 1000  # taken and dangling lines alike
    patients = b"\n".join(orjson.dumps(patient(r, i, True)) for i in range(200))
    a, b = set(), native.id_set()
    assert _committed(pflat, pflat.prepare(patients), a, PATIENT_SCHEMA) == \
        _committed(pflat, pflat.prepare(patients), b, PATIENT_SCHEMA)
    assert len(a) == len(b) > 150 and all(k in b for k in a) and "x" * 32 not in b


def test_the_commit_releases_the_gil_with_the_compiled_sets(keyer):
    """With an IdSet of ids, an IdSet of patient keys (or none) and Columns for the identifiers the commit's loop
    touches no Python object and runs without the GIL: a Python thread counts on beside it (with a set it
    cannot). An error inside that loop is raised once the GIL is back."""
    import threading

    flat = native.flattener("Observation", keyer)
    r = random.Random(24)
    lines = [orjson.dumps(observation(r, i, True)) for i in range(60000)]
    pkeys = native.id_set()
    for n in range(30):
        pkeys.add(keyer.key("Patient", f"p{n}"))
    handed = set(_committed(flat, flat.prepare(b"\n".join(lines)), pkeys)[0])
    prep = flat.prepare(b"\n".join(ln for i, ln in enumerate(lines) if i not in handed))  # one call takes them all
    assert len(prep) > 20000 and _committed(flat, prep, pkeys)[:2] == ([], len(prep))
    counted, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counted[0] += 1

    def during_commit(keys) -> int:
        from synthfactory.ingest.schemas import IDENTIFIERS_SCHEMA

        cols, idents, seen = native.columns(OBSERVATION_SCHEMA), native.columns(IDENTIFIERS_SCHEMA), native.id_set()
        before = counted[0]
        assert flat.commit(prep, 0, 0, cols, seen, keys, idents, 0, 0, -1, 0, 0, 0, 1 << 30)[1] == len(prep)
        return counted[0] - before

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.05)  # the GIL changes hands only when a thread lets it go, or every 50 ms
    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        free = max(during_commit(pkeys) for _ in range(3))
        held = min(during_commit({keyer.key("Patient", f"p{n}") for n in range(30)}) for _ in range(5))
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
    assert free > 10 * held + 10000, (free, held)
    bad = native.columns(pa.schema([pa.field(f.name, pa.float64() if i == 0 else f.type)
                                    for i, f in enumerate(OBSERVATION_SCHEMA)]))  # a key into a float column
    from synthfactory.ingest.schemas import IDENTIFIERS_SCHEMA
    with pytest.raises(TypeError, match="non-string column"):
        flat.commit(prep, 0, 0, bad, native.id_set(), pkeys, native.columns(IDENTIFIERS_SCHEMA),
                    0, 0, -1, 0, 0, 0, 1 << 30)


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("pooled", [False, True])
def test_prepared_yields_every_block_in_order_with_several_flatteners(keyer, m, pooled):
    """``native.prepared`` with m flatteners (block i prepared by flattener i % m, up to m blocks ahead of the
    commit), or a pool of m workers (up to ``AHEAD_PER_WORKER * m`` blocks queued): every block, in order, each
    with its own lines, whatever the number of blocks."""
    r = random.Random(5)
    flats = [native.flattener("Observation", keyer) for _ in range(m)]
    if pooled:
        flats = native.prepare_pool(flats)
    for nblocks in (0, 1, 2, 3, 7, 20):
        blocks = [b"\n".join(orjson.dumps(observation(r, 100 * k + i, True)) for i in range(1 + k % 4))
                  for k in range(nblocks)]
        got = list(native.prepared(iter(blocks), flats))
        assert [b for b, _ in got] == blocks
        for block, prep in got:
            assert [prep.line(i) for i in range(len(prep))] == block.split(b"\n")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ingest_same_outputs_whatever_the_number_of_prepare_threads(tmp_path, keyer, monkeypatch, threads):
    """Small read blocks (4 KiB: hundreds of blocks per file) through 1, 2 or 3 prepare threads: the same tables,
    quarantine and report as the Python path, on a mutated extract with the validation sample on."""
    from synthfactory.ingest import fhir_ndjson, session as S

    monkeypatch.setattr(S, "PREPARE_THREADS", threads)
    monkeypatch.setattr(S.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    real = fhir_ndjson.prefetched
    monkeypatch.setattr(fhir_ndjson, "prefetched", lambda stream: real(stream, block=4096))
    src = tmp_path / "mutated"
    write_extract(src, seed=31, n=1500, mutated=0.3)
    rep, _ = ingest_both(src, tmp_path, keyer, validate_first=5, validate_sample_rate=0.05, batch_rows=97)
    assert sum(rep["native_lines"].values()) > 500 and rep["quarantined_total"] > 50


def test_first_seen_mask_marks_each_values_first_string():
    """The identifiers' deduplication (session._first_seen): the compiled one-pass mask against Arrow's hash memo
    (dictionary order is first-seen order) on repeats, empty and non-ASCII strings and sliced arrays; None for a
    null value (the Arrow path takes it)."""
    import numpy as np
    import pyarrow.compute as pc

    from synthfactory.ingest import session as S

    r = random.Random(3)
    values = pa.array([r.choice(["", "a", "\u00e9t\u00e9", "x" * 300, f"v{r.randint(0, 400)}"]) for _ in range(5000)])
    kinds = pa.array([r.choice(["id", "identifier", "name"]) for _ in range(5000)])
    for v, k in ((values, kinds), (values.slice(17, 3000), kinds.slice(17, 3000)), (values.slice(0, 0), kinds.slice(0, 0))):
        mask = native.first_seen_mask(v)
        enc = pc.dictionary_encode(v)
        _, first = np.unique(enc.indices.to_numpy(zero_copy_only=False), return_index=True)
        assert mask.tolist() == [i in set(first.tolist()) for i in range(len(v))]
        got = S._first_seen(v, k)
        assert got[0].equals(enc.dictionary) and got[1].equals(k.take(pa.array(first, pa.int64())))
    assert native.first_seen_mask(pa.array(["a", None, "a"])) is None
    assert S._first_seen(pa.array(["a", None, "a"]), pa.array(["id", "id", "name"]))[0].to_pylist() == ["a"]


def test_a_started_block_keeps_what_it_reads(keyer):
    """While a block is being prepared on its own thread the caller may change its list (the Prepared holds the
    lines as they were) and cannot release a memoryview it was given (its buffer is exported until the Prepared
    goes); two threads may wait for the same block."""
    import threading

    flat, other = native.flattener("Observation", keyer), native.flattener("Observation", keyer)
    r = random.Random(8)
    lines = [orjson.dumps(observation(r, i, True)) for i in range(2000)]
    want = _committed(other, other.prepare(list(lines)))
    block = list(lines)
    prep = flat.start(block)
    block[:] = [b"{}"] * 10  # the caller reuses its list
    assert _committed(other, prep) == want and [prep.line(i) for i in range(len(prep))] == lines
    whole = bytes(b"\n".join(lines))
    view = memoryview(whole)
    prep = flat.start(view)
    with pytest.raises(BufferError):
        view.release()
    got = []
    waiters = [threading.Thread(target=lambda p=prep: got.append(p.wait() is p)) for _ in range(4)]
    for t in waiters:
        t.start()
    for t in waiters:
        t.join()
    assert got == [True] * 4 and _committed(other, prep) == want
    del prep, waiters
    view.release()  # the Prepared is gone: so is its export


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("pooled", [False, True])
def test_a_block_started_before_a_fork_is_an_error_in_the_child_not_a_hang(keyer, pooled):
    """In a forked child the thread preparing a started block is not there: waiting for the block is a RuntimeError.
    The flattener is free again; a pool starts workers of the child's own."""
    flat = native.flattener("Observation", keyer)
    starter = native.prepare_pool([flat]) if pooled else flat
    r = random.Random(9)
    whole = b"\n".join(orjson.dumps(observation(r, i, True)) for i in range(20000))
    prep = starter.start(whole)
    pid = os.fork()
    if pid == 0:  # the child: the worker thread is not here; joining it would wait forever
        code = 3
        try:
            prep.wait()
        except RuntimeError:
            if pooled:
                code = 0 if len(starter.start(whole).wait()) == 20000 else 4
            else:
                code = 0 if flat.prepare(b"") is not None else 4
        except BaseException:  # noqa: BLE001
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert prep.wait() is prep and len(prep) == 20000


def test_first_seen_is_exact_and_checks_its_offsets():
    """Strings of equal hash are compared byte for byte (the mask is exact); offsets outside the data, or too
    few of them, are a ValueError, not a read out of bounds."""
    from synthfactory.ingest import _flatc

    import numpy as np

    values = pa.array(["a", "b", "a", "", "", "ab", "b"])
    _, offsets, data = values.buffers()
    assert bytes(_flatc.first_seen(offsets, data, 7)) == bytes([1, 1, 0, 1, 0, 1, 0])
    bad = np.array([0, 1, 99], dtype=np.int32).tobytes()
    with pytest.raises(ValueError):
        _flatc.first_seen(bad, b"ab", 2)
    with pytest.raises(ValueError):
        _flatc.first_seen(np.array([0, 1], dtype=np.int32).tobytes(), b"ab", 2)
    assert native.first_seen_mask(pa.array(["a", "a"], pa.large_string())) is None  # not int32 offsets
