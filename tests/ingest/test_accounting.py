"""Every line accounted for, no free text in the tables (issue 19, items 3 and 4): valueString, malformed
references and implausible values, on NDJSON (the compiled flatten and the Python loop), Bundles and the
views engine."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from synthfactory.ingest import native
from synthfactory.ingest.bundle import ingest_bundles
from synthfactory.ingest.fhir_ndjson import ingest_extract
from synthfactory.ingest.flatteners import ValueRules, reference_ok

LOINC = "http://loinc.org"
ADDRESS = "1600 Pennsylvania Avenue NW, Washington"


def patient(pid: str) -> dict:
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1970-01-01"}


def obs(oid: str, pid: str = "p1", code: str = "4548-4", **kw) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": LOINC, "code": code, "display": "x"}]},
            "effectiveDateTime": "2020-01-01T10:00:00Z", **kw}


def hba1c(oid: str, value, unit: str = "%") -> dict:
    return obs(oid, valueQuantity={"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit})


def write(folder: Path, name: str, items: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"".join(orjson.dumps(i) + b"\n" for i in items))


def table(out: Path, name: str) -> list[dict]:
    return pq.read_table(os.path.join(out, f"{name}.parquet")).to_pylist()


def quarantine(out: Path) -> list[dict]:
    return [orjson.loads(line) for line in (out / "quarantine.ndjson").read_bytes().splitlines() if line.strip()]


def all_strings(out: Path) -> set[str]:
    cells = set()
    for t in ("patient", "observation"):
        for row in table(out, t):
            cells.update(v for v in row.values() if isinstance(v, str))
    return cells


def address_observations() -> list[dict]:
    """Plain observations (the compiled flatten takes them) with an address valueString (LOINC 56799-0), own
    and in a component, beside ordinary values."""
    return [
        obs("addr", code="56799-0", valueString=ADDRESS),
        obs("addr-comp", code="85354-9", component=[
            {"code": {"coding": [{"system": LOINC, "code": "56799-0"}]}, "valueString": ADDRESS},
            {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": {"value": 120, "unit": "mm[Hg]"}}]),
        hba1c("a1c", 6.1),
        obs("flag", code="1-1", valueString="Detected"),
    ]


@pytest.mark.parametrize("use_native", [True, False], ids=["compiled", "python"])
def test_address_value_string_never_reaches_ndjson_tables(tmp_path, keyer, use_native):
    if use_native:
        assert native.available(), "the compiled flatten must be built for this test (setup.py build_ext)"
    src = tmp_path / "src"
    write(src, "Patient.ndjson", [patient("p1")])
    write(src, "Observation.ndjson", address_observations())
    out = tmp_path / "out"
    rep = ingest_extract(src, out, keyer=keyer, resources=["Patient", "Observation"], validate_first=0,
                         validate_sample_rate=0.0, native=use_native)
    assert rep["quarantined_total"] == 0
    assert rep["native_lines"].get("Observation", 0) == (4 if use_native else 0)  # the compiled path read them
    rows = {r["observation_key"]: r for r in table(out, "observation")}
    assert ADDRESS not in all_strings(out) and "Detected" not in all_strings(out)
    # the address Observation keeps its coded row, without the string; the component without a value is gone
    assert rows[keyer.key("Observation", "addr")]["code"] == "56799-0"
    assert rows[keyer.key("Observation", "addr")]["value_code"] is None
    assert keyer.key("Observation", "addr-comp#0") not in rows
    assert rows[keyer.key("Observation", "addr-comp#1")]["value_num"] == 120.0
    assert rows[keyer.key("Observation", "a1c")]["value_num"] == 6.1


@pytest.mark.parametrize("engine", ["fast", "views"])
def test_notes_and_narrative_never_reach_any_table(tmp_path, keyer, engine):
    narrative = {"status": "generated", "div": f"<div xmlns=\"http://www.w3.org/1999/xhtml\">{ADDRESS}</div>"}
    note = [{"text": ADDRESS}]
    src = tmp_path / "src"
    write(src, "Patient.ndjson", [patient("p1") | {"text": narrative}])
    write(src, "Encounter.ndjson", [{"resourceType": "Encounter", "id": "e1", "status": "finished", "text": narrative,
                                     "subject": {"reference": "Patient/p1"}}])
    write(src, "Condition.ndjson", [{"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
                                     "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                                     "note": note, "text": narrative}])
    write(src, "Observation.ndjson", [hba1c("o1", 6.0) | {"note": note, "text": narrative},
                                      obs("o2", code="56799-0", valueString=ADDRESS, note=note)])
    out = tmp_path / "out"
    rep = ingest_extract(src, out, keyer=keyer, validate_first=0, validate_sample_rate=0.0, engine=engine)
    assert rep["quarantined_total"] == 0 and rep["rows"]["observation"] == 2
    for t in ("patient", "encounter", "condition", "observation"):
        for row in table(out, t):
            assert not any(isinstance(v, str) and ("Pennsylvania" in v or "<div" in v) for v in row.values()), t


def test_allow_listed_codes_keep_their_coded_strings(tmp_path, keyer):
    src = tmp_path / "src"
    write(src, "Patient.ndjson", [patient("p1")])
    write(src, "Observation.ndjson", address_observations())
    out = tmp_path / "out"
    rep = ingest_extract(src, out, keyer=keyer, resources=["Patient", "Observation"], validate_first=0,
                         validate_sample_rate=0.0, value_rules=ValueRules(text_codes=["1-1"]))
    rows = {r["observation_key"]: r for r in table(out, "observation")}
    assert rows[keyer.key("Observation", "flag")]["value_code"] == "Detected"
    assert ADDRESS not in all_strings(out)
    assert rep["native_lines"]["Observation"] == 1  # the lines with a valueString are left to the Python loop


def test_address_value_string_never_reaches_bundle_or_views_tables(tmp_path, keyer):
    src = tmp_path / "bundles"
    src.mkdir()
    entries = [patient("p1"), *address_observations()]
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"urn:uuid:{e['id']}", "resource": e} for e in entries]}
    (src / "one.json").write_bytes(orjson.dumps(bundle))
    out = tmp_path / "out"
    rep = ingest_bundles(src, out, keyer=keyer, resources=["Patient", "Observation"], validate_sample_rate=0.0)
    assert rep["rows"]["observation"] == 4 and ADDRESS not in all_strings(out)
    nd = tmp_path / "nd"
    write(nd, "Patient.ndjson", [patient("p1")])
    write(nd, "Observation.ndjson", address_observations())
    out2 = tmp_path / "views"
    rep2 = ingest_extract(nd, out2, keyer=keyer, resources=["Patient", "Observation"], engine="views",
                          validate_first=0, validate_sample_rate=0.0)
    assert rep2["rows"]["observation"] == 4 and ADDRESS not in all_strings(out2)


@pytest.mark.parametrize("use_native", [True, False], ids=["compiled", "python"])
def test_implausible_values_are_quarantined_with_the_reason(tmp_path, keyer, use_native):
    src = tmp_path / "src"
    write(src, "Patient.ndjson", [patient("p1")])
    write(src, "Observation.ndjson", [
        hba1c("ok", 6.5), hba1c("huge", 1.2e29), hba1c("plus", 1e300), hba1c("minus", -1e300),
        obs("int", valueInteger=10 ** 15), obs("odd-unit", valueQuantity={"value": 1e200, "unit": "furlong"}),
        obs("comp", code="85354-9", component=[
            {"code": {"coding": [{"code": "8480-6"}]}, "valueQuantity": {"value": 1e30, "unit": "mm[Hg]"}}]),
        hba1c("kg", 70, "kg")])
    out = tmp_path / "out"
    rep = ingest_extract(src, out, keyer=keyer, resources=["Patient", "Observation"], validate_first=0,
                         validate_sample_rate=0.0, native=use_native)
    q = {(r["line"], r["reason"]) for r in quarantine(out)}
    assert q == {(2, "value outside the plausible range for unit %"), (3, "value outside the plausible range for unit %"),
                 (4, "value outside the plausible range for unit %"), (5, "value outside the plausible range"),
                 (6, "value outside the plausible range"), (7, "value outside the plausible range for unit mm[Hg]")}
    assert rep["quarantined"]["Observation"] == 6
    assert sorted(r["value_num"] for r in table(out, "observation")) == [6.5, 70.0]
    # configurable: a narrower % range quarantines 6.5 too, a wider one for kg keeps nothing out
    out2 = tmp_path / "out2"
    rep2 = ingest_extract(src, out2, keyer=keyer, resources=["Patient", "Observation"], validate_first=0,
                          validate_sample_rate=0.0, native=use_native,
                          value_rules=ValueRules(ranges={"%": (0, 5)}, default=(-1e300, 1e300)))
    assert rep2["rows"]["observation"] == 3  # kg 70, int 1e15 and 1e200 furlong (now in the default range)
    assert rep2["quarantined"]["Observation"] == 5


def test_implausible_values_and_bad_references_quarantined_on_the_views_engine_and_in_bundles(tmp_path, keyer):
    src = tmp_path / "src"
    items = [hba1c("ok", 6.5), hba1c("huge", 1.2e29)]
    write(src, "Patient.ndjson", [patient("p1")])
    write(src, "Observation.ndjson", items)
    out = tmp_path / "out"
    rep = ingest_extract(src, out, keyer=keyer, resources=["Patient", "Observation"], engine="views",
                         validate_first=0, validate_sample_rate=0.0)
    assert rep["rows"]["observation"] == 1 and rep["quarantined"]["Observation"] == 1
    b = tmp_path / "b"
    b.mkdir()
    bad_ref = obs("bad-ref", pid="../../etc/passwd", valueInteger=1)
    (b / "x.json").write_bytes(orjson.dumps({"resourceType": "Bundle", "type": "collection",
                                             "entry": [{"resource": r} for r in [patient("p1"), *items, bad_ref]]}))
    rep = ingest_bundles(b, tmp_path / "out2", keyer=keyer, resources=["Patient", "Observation"],
                         validate_sample_rate=0.0)
    assert rep["rows"]["observation"] == 1 and rep["quarantined"]["Observation"] == 2
    assert rep["quarantine_reasons"]["Observation"] == {"value outside the plausible range for unit %": 1,
                                                        "malformed reference to Patient": 1}


def test_reference_grammar():
    good = ["Patient/123", "Patient/a.b-C", "Patient/" + "x" * 64, "https://ehr.example/fhir/Patient/9",
            "http://h/fhir/Patient/9/_history/2", "urn:uuid:4b0d8f4c-1f4e-4d7a-9c1a-0f8b2e6c9d11", "urn:oid:1.2.3",
            "#c1", "Patient/7/_history/1"]
    bad = ["Patient/../../etc/passwd", "Patient/a b", "Patient/" + "x" * 65, "patient/1", "Patient/", "/1", "123",
           "Patient/1/", "https://h/fhir/Patient/../x", "urn:uuid:", "#", "Patient/\u00e9", "javascript:alert(1)",
           "https://h with space/Patient/1", "Patient/1/_history/"]
    assert [r for r in good if not reference_ok(r)] == []
    assert [r for r in bad if reference_ok(r)] == []


@pytest.mark.parametrize("use_native,engine", [(True, "fast"), (False, "fast"), (False, "views")],
                         ids=["compiled", "python", "views"])
def test_malformed_references_are_quarantined(tmp_path, keyer, use_native, engine):
    src = tmp_path / "src"
    write(src, "Patient.ndjson", [patient("p1")])
    write(src, "Encounter.ndjson", [
        {"resourceType": "Encounter", "id": "e1", "status": "finished", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Encounter", "id": "e2", "status": "finished",
         "subject": {"reference": "Patient/../../etc/passwd"}}])
    write(src, "Observation.ndjson", [
        hba1c("ok", 6.0), obs("bad-enc", encounter={"reference": "Encounter/e 1"}, valueInteger=1),
        obs("bad-pat", pid="p1/../../x", valueInteger=1)])
    out = tmp_path / "out"
    rep = ingest_extract(src, out, keyer=keyer, resources=["Patient", "Encounter", "Observation"], validate_first=0,
                         validate_sample_rate=0.0, native=use_native, engine=engine)
    q = sorted((r["file"], r["line"], r["reason"]) for r in quarantine(out))
    assert q == [("Encounter.ndjson", 2, "malformed reference to Patient"),
                 ("Observation.ndjson", 2, "malformed reference to Encounter"),
                 ("Observation.ndjson", 3, "malformed reference to Patient")]
    assert rep["rows"] == {"patient": 1, "encounter": 1, "observation": 1}
    assert all(r["patient_key"] == keyer.key("Patient", "p1") for r in table(out, "encounter"))


# ------------------------------------------------------------------------------------------------
# files: each one accounted for
# ------------------------------------------------------------------------------------------------
def test_every_file_has_an_outcome_spaces_unicode_symlinks_and_loops(tmp_path, keyer):
    src = tmp_path / "extract"
    write(src, "Patient.ndjson", [patient("p1")])
    write(src, "Observation extra space.ndjson", [hba1c("o1", 6.0)])
    write(src, "Observation_\u00e9t\u00e9-\u4e2d.ndjson", [hba1c("o2", 6.1)])
    write(src, "ObservationDefinition.ndjson", [{"resourceType": "ObservationDefinition", "id": "d"}])
    write(src, "Practitioner.ndjson", [{"resourceType": "Practitioner", "id": "x"}])
    (src / "notes.txt").write_text("x")
    write(src / "sub", "Observation.ndjson", [hba1c("o3", 6.2)])
    outside = tmp_path / "elsewhere"
    write(outside, "Observation.ndjson", [hba1c("leak", 6.3)])
    (src / "Observation-outside.ndjson").symlink_to(outside / "Observation.ndjson")
    (src / "Observation-loop.ndjson").symlink_to(src / "Observation-loop2.ndjson")
    (src / "Observation-loop2.ndjson").symlink_to(src / "Observation-loop.ndjson")
    (src / "Observation-dangling.ndjson").symlink_to(src / "nowhere.ndjson")
    (src / "dirloop").symlink_to(src)
    (src / "Observation-inside.ndjson").symlink_to(src / "Observation extra space.ndjson")
    out = tmp_path / "out"
    rep = ingest_extract(src, out, keyer=keyer, resources=["Patient", "Observation"], validate_sample_rate=0.0)
    o = rep["file_outcomes"]
    assert o["Observation extra space.ndjson"] == {"outcome": "read", "resources": 1, "quarantined": 0}
    assert o["Observation_\u00e9t\u00e9-\u4e2d.ndjson"]["outcome"] == "read"
    assert o["Observation-outside.ndjson"] == {"outcome": "refused", "reason": "symlink leaves the extract"}
    assert o["Observation-loop.ndjson"] == {"outcome": "refused", "reason": "symlink loop"}
    assert o["Observation-loop2.ndjson"] == {"outcome": "refused", "reason": "symlink loop"}
    assert o["Observation-dangling.ndjson"] == {"outcome": "refused", "reason": "dangling symlink"}
    assert o["dirloop"] == {"outcome": "refused", "reason": "symlink to a folder (not followed)"}
    # a symlink to a file of the extract is read (its resources are duplicates: quarantined, counted)
    assert o["Observation-inside.ndjson"] == {"outcome": "read", "resources": 1, "quarantined": 1}
    assert o["ObservationDefinition.ndjson"]["reason"] == "resource type not requested by the spec"
    assert o["Practitioner.ndjson"]["outcome"] == "skipped"
    assert o["notes.txt"]["reason"].startswith("not an NDJSON file")
    assert o["sub/Observation.ndjson"]["reason"].startswith("in a sub-folder")
    assert sorted(rep["refused_files"]) == ["Observation-dangling.ndjson", "Observation-loop.ndjson",
                                            "Observation-loop2.ndjson", "Observation-outside.ndjson", "dirloop"]
    assert not set(rep["refused_files"]) & set(rep["skipped_files"])
    # every file under the folder, and every symlink, has exactly one outcome
    listed = {str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() or p.is_symlink()}
    assert listed <= set(o), listed - set(o)
    assert rep["rows"]["observation"] == 2 and keyer.key("Observation", "leak") not in {
        r["observation_key"] for r in table(out, "observation")}


def test_unreadable_bundles_counted_once_each(tmp_path, keyer):
    src = tmp_path / "bundles"
    src.mkdir()
    good = {"resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": patient("p1")}, {"resource": hba1c("o1", 6.0)}, {"request": {"method": "POST"}}]}
    (src / "good.json").write_bytes(orjson.dumps(good))
    for i in range(3):
        (src / f"bad {i}.json").write_bytes(b'{"resourceType": "Bundle", "entry": [')
    out = tmp_path / "out"
    rep = ingest_bundles(src, out, keyer=keyer, resources=["Patient", "Observation"], validate_sample_rate=0.0)
    records = quarantine(out)
    assert len(records) == 4 == rep["quarantined_total"]  # 3 unreadable files + 1 entry without a resource
    assert sum(r["reason"] == "invalid JSON" for r in records) == 3
    assert [rep["file_outcomes"][f"bad {i}.json"] for i in range(3)] == [
        {"outcome": "quarantined", "reason": "invalid JSON"}] * 3
    assert rep["file_outcomes"]["good.json"] == {"outcome": "read", "resources": 3}


def test_quarantined_total_equals_the_quarantine_records_on_ndjson(tmp_path, keyer):
    src = tmp_path / "src"
    write(src, "Patient.ndjson", [patient("p1")])
    (src / "Observation.ndjson").write_bytes(b"{not json\n" + orjson.dumps(hba1c("o", 1e300)) + b"\n[1]\n")
    out = tmp_path / "out"
    rep = ingest_extract(src, out, keyer=keyer, resources=["Patient", "Observation"], validate_sample_rate=0.0)
    assert rep["quarantined_total"] == len(quarantine(out)) == 3
    assert rep["file_outcomes"]["Observation.ndjson"] == {"outcome": "read", "resources": 3, "quarantined": 3}


# ------------------------------------------------------------------------------------------------
# an empty resource type that the spec needs: exit 3 before fit
# ------------------------------------------------------------------------------------------------
def test_empty_condition_file_stops_the_run_with_exit_3(tmp_path, capsys):
    from synthfactory.cli import main
    from synthfactory.errors import EXIT_INPUT
    from tests.conftest import write_spec

    src = tmp_path / "extract"
    write(src, "Patient.ndjson", [patient(f"p{i}") for i in range(30)])
    write(src, "Encounter.ndjson", [{"resourceType": "Encounter", "id": f"e{i}", "status": "finished",
                                     "subject": {"reference": f"Patient/p{i}"}} for i in range(30)])
    write(src, "Observation.ndjson", [hba1c(f"o{i}", 6.0) | {"subject": {"reference": f"Patient/p{i}"}}
                                      for i in range(30)])
    (src / "Condition.ndjson").write_bytes(b"")
    spec = write_spec(tmp_path / "specs", "no_conditions", src, tmp_path / "staging")
    out = tmp_path / "out"
    code = main(["run", str(spec), "--out", str(out), "--run-id", "r1", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INPUT
    assert err[-1].startswith("bad input: no usable Condition resource in the extract (0 read, 0 quarantined)")
    assert "features.top_conditions" in err[-1] and "Traceback" not in "\n".join(err)
    assert not list(out.rglob("model/*"))  # stopped before prepare/fit
    report = orjson.loads(next(out.rglob("ingest_report.json")).read_bytes())
    assert report["empty_types"] == ["Condition"]
    assert report["file_outcomes"]["Condition.ndjson"] == {"outcome": "read", "resources": 0, "quarantined": 0}


def test_spec_fields_reach_the_ingest(tmp_path, keyer):
    from synthfactory.ingest.sources import ingest_for_run
    from synthfactory.pipeline import RunContext
    from synthfactory.spec import parse_spec

    src = tmp_path / "src"
    write(src, "Patient.ndjson", [patient("p1")])
    write(src, "Observation.ndjson", [*address_observations(), hba1c("a1c-high", 42.0)])
    spec = parse_spec({"name": "acct", "release": {"bucket": "sandbox-bucket"},
                       "source": {"uri": str(src), "resources": ["Patient", "Observation"], "validate_sample_rate": 0,
                                  "text_codes": ["1-1"], "value_ranges": {"%": [0, 20]}}})
    ctx = RunContext(spec=spec, run_id="r1", version="v1", staging_root=str(tmp_path / "staging"))
    rep = ingest_for_run(ctx, keyer)
    rows = {r["observation_key"]: r for r in pq.read_table(rep["tables"]["observation"]).to_pylist()}
    assert rows[keyer.key("Observation", "flag")]["value_code"] == "Detected"  # allow-listed
    assert rows[keyer.key("Observation", "addr")]["value_code"] is None
    assert rep["quarantine_reasons"]["Observation"] == {"value outside the plausible range for unit %": 1}
    with pytest.raises(Exception, match="low <= high"):
        parse_spec({"name": "x", "release": {"bucket": "sandbox-bucket"}, "source": {"uri": "x", "value_ranges": {"%": [5, 1]}}})
