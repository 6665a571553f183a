"""No free text in the tables (issue 19, item 4, the leftovers): a CodeableConcept's ``.text`` never stands in for
a missing code or display unless the spec allow-lists the code (``source.text_codes``), and a user ViewDefinition
that selects ``note``, narrative ``text``, a ``valueString`` or a direct identifier is refused unless the spec
allow-lists the column (``source.text_columns``)."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from synthfactory.errors import ConfigError
from synthfactory.fhir.views import BUILTIN_VIEWS, ViewError, free_text_columns
from synthfactory.ingest import native
from synthfactory.ingest.fhir_ndjson import ingest_extract
from synthfactory.ingest.flatteners import ValueRules

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ADDRESS = "1600 Pennsylvania Avenue NW, Washington"
TYPES = ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Procedure")


def write(folder: Path, name: str, items: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"".join(orjson.dumps(i) + b"\n" for i in items))


def strings(out: Path) -> list[str]:
    cells = []
    for f in sorted(os.listdir(out)):
        if f.endswith(".parquet") and f != "identifiers.parquet":
            for row in pq.read_table(out / f).to_pylist():
                cells.extend(v for v in row.values() if isinstance(v, str))
    return cells


def text_only_extract(src: Path, extra_obs: list | None = None) -> None:
    """Every CodeableConcept a built-in table reads, with the address as its ``.text``: alone (no coding), or
    beside a coding without a display."""
    cc_text = {"text": ADDRESS}
    write(src, "Patient.ndjson", [{"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970",
                                   "maritalStatus": cc_text}])
    write(src, "Encounter.ndjson", [
        {"resourceType": "Encounter", "id": "e1", "status": "finished", "subject": {"reference": "Patient/p1"},
         "class": {"code": "AMB"}, "type": [cc_text], "period": {"start": "2020-01-01T10:00:00Z"}},
        {"resourceType": "Encounter", "id": "e2", "status": "finished", "subject": {"reference": "Patient/p1"},
         "type": [{"coding": [{"system": SNOMED, "code": "185349003"}], "text": ADDRESS}]}])
    write(src, "Condition.ndjson", [
        {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}, "code": cc_text,
         "clinicalStatus": cc_text},
        {"resourceType": "Condition", "id": "c2", "subject": {"reference": "Patient/p1"},
         "code": {"coding": [{"system": SNOMED, "code": "44054006"}], "text": ADDRESS}}])
    obs = [
        {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
         "category": [cc_text], "code": {"coding": [{"system": LOINC, "code": "56799-0"}], "text": ADDRESS},
         "valueCodeableConcept": cc_text, "effectiveDateTime": "2020-01-01T10:00:00Z"},
        {"resourceType": "Observation", "id": "o2", "status": "final", "subject": {"reference": "Patient/p1"},
         "code": cc_text, "valueQuantity": {"value": 6.1, "unit": "%"}, "effectiveDateTime": "2020-01-01T10:00:00Z",
         "component": [{"code": cc_text, "valueQuantity": {"value": 120, "unit": "mm[Hg]"}},
                       {"code": {"coding": [{"system": LOINC, "code": "8462-4"}], "text": ADDRESS},
                        "valueCodeableConcept": cc_text}]},
        *(extra_obs or [])]
    write(src, "Observation.ndjson", obs)
    write(src, "MedicationRequest.ndjson", [
        {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
         "subject": {"reference": "Patient/p1"}, "medicationCodeableConcept": cc_text, "category": [cc_text]},
        {"resourceType": "MedicationRequest", "id": "m2", "status": "active", "intent": "order",
         "subject": {"reference": "Patient/p1"},
         "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                   "code": "860975"}], "text": ADDRESS}}])
    write(src, "Procedure.ndjson", [
        {"resourceType": "Procedure", "id": "pr1", "status": "completed", "subject": {"reference": "Patient/p1"},
         "code": cc_text, "category": cc_text}])


@pytest.mark.parametrize("engine,compiled", [("fast", True), ("fast", False), ("views", False)])
def test_codeable_concept_text_never_reaches_a_table(tmp_path, keyer, engine, compiled, monkeypatch):
    if not compiled:
        monkeypatch.setenv("SYNTHFACTORY_INGEST_NATIVE", "0")
    elif not native.available():
        pytest.skip("the compiled flatten is not built")
    src, out = tmp_path / "src", tmp_path / "out"
    text_only_extract(src)
    rep = ingest_extract(src, out, keyer=keyer, resources=TYPES, validate_first=0, validate_sample_rate=0.0,
                         engine=engine)
    assert rep["quarantined_total"] == 0
    assert rep["rows"]["observation"] == 3 and rep["rows"]["condition"] == 2 and rep["rows"]["encounter"] == 2
    if compiled:  # the plain lines went through the compiled flatten, which drops the text itself
        assert rep["native_lines"]["Observation"] + rep["native_lines"]["Condition"] >= 3
    cells = strings(out)
    assert cells and not [c for c in cells if "Pennsylvania" in c]
    # the codes are kept, without the text
    cond = {r["code"]: r for r in pq.read_table(out / "condition.parquet").to_pylist()}
    assert cond["44054006"]["display"] is None and cond[None]["display"] is None


def test_allow_listed_code_keeps_its_text(tmp_path, keyer):
    """``text_codes`` names codes whose strings are coded values: their concept's text stands in for the display
    (and a text-only value of an allow-listed Observation code is its value); everything else stays out."""
    src, out = tmp_path / "src", tmp_path / "out"
    flag = {"resourceType": "Observation", "id": "o3", "status": "final", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": LOINC, "code": "1-1"}]}, "valueCodeableConcept": {"text": "Detected"},
            "effectiveDateTime": "2020-01-01T10:00:00Z"}
    text_only_extract(src, [flag])
    rep = ingest_extract(src, out, keyer=keyer, resources=TYPES, validate_first=0, validate_sample_rate=0.0,
                         value_rules=ValueRules(text_codes=["44054006", "1-1"]))
    assert rep["quarantined_total"] == 0
    cond = {r["code"]: r for r in pq.read_table(out / "condition.parquet").to_pylist()}
    assert cond["44054006"]["display"] == ADDRESS  # allow-listed: the spec says this code's text is a coded value
    obs = {r["observation_key"]: r for r in pq.read_table(out / "observation.parquet").to_pylist()}
    assert obs[keyer.key("Observation", "o3")]["value_code"] == "Detected"
    assert obs[keyer.key("Observation", "o1")]["value_code"] is None  # 56799-0 is not allow-listed
    assert sum("Pennsylvania" in c for c in strings(out)) == 1  # only the allow-listed condition display


NOTE_VIEW = {"resourceType": "ViewDefinition", "name": "obs_notes", "resource": "Observation",
             "select": [{"column": [{"name": "k", "path": "getResourceKey()"},
                                    {"name": "note_text", "path": "note.first().text"}]}]}


@pytest.mark.parametrize("column", [
    {"name": "x", "path": "note.text"},
    {"name": "x", "path": "text.div"},
    {"name": "x", "path": "value.ofType(string)"},
    {"name": "x", "path": "valueString"},
    {"name": "x", "path": "code.text"},
    {"name": "x", "path": "subject.resolve().name.family"},
    {"name": "x", "path": "identifier.where(system = 'urn:mrn').value"},
])
def test_free_text_columns_are_found(column):
    view = {"name": "v", "resource": "Observation", "select": [{"column": [column]}]}
    assert [c for c, _, _ in free_text_columns(view)] == ["x"]


def test_free_text_inside_for_each_and_not_in_literals_or_builtins():
    view = {"name": "v", "resource": "Observation",
            "select": [{"forEach": "note", "column": [{"name": "author", "path": "author.ofType(string)"},
                                                      {"name": "t", "path": "time"}]},
                       {"column": [{"name": "c", "path": "code.coding.where(system = 'http://x/text').code"},
                                   {"name": "k", "path": "%resource.getResourceKey()"}]}]}
    assert sorted(c for c, _, _ in free_text_columns(view)) == ["author", "t"]
    for name, definition in BUILTIN_VIEWS.items():
        assert free_text_columns(definition) == [], name


def test_user_view_selecting_note_is_refused_unless_allow_listed(tmp_path, keyer):
    src = tmp_path / "src"
    write(src, "Patient.ndjson", [{"resourceType": "Patient", "id": "p1"}])
    write(src, "Observation.ndjson", [{"resourceType": "Observation", "id": "o1", "status": "final",
                                       "code": {"coding": [{"code": "1-1"}]}, "subject": {"reference": "Patient/p1"},
                                       "note": [{"text": "Negative"}]}])
    with pytest.raises(ViewError) as exc:
        ingest_extract(src, tmp_path / "out", keyer=keyer, views=[NOTE_VIEW])
    assert isinstance(exc.value, ConfigError) and exc.value.exit_code == 2
    assert "note_text" in str(exc.value) and "source.text_columns" in str(exc.value)
    assert "Negative" not in str(exc.value)
    assert not (tmp_path / "out" / "obs_notes.parquet").exists()
    rep = ingest_extract(src, tmp_path / "ok", keyer=keyer, views=[NOTE_VIEW],
                         value_rules=ValueRules(text_columns=["obs_notes.note_text"]))
    assert pq.read_table(rep["tables"]["obs_notes"]).column("note_text").to_pylist() == ["Negative"]


def test_spec_refuses_a_view_selecting_note_unless_allow_listed():
    from pydantic import ValidationError

    from synthfactory.spec import SourceSpec

    with pytest.raises(ValidationError, match="note_text"):
        SourceSpec(kind="fhir_ndjson", uri="x", views=[NOTE_VIEW])
    spec = SourceSpec(kind="fhir_ndjson", uri="x", views=[NOTE_VIEW], text_columns=["obs_notes.note_text"])
    assert spec.text_columns == ["obs_notes.note_text"]
