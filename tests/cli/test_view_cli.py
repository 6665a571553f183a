"""`synthfactory view VIEW RESOURCES [--format ndjson|csv|parquet]`: a ViewDefinition's rows over FHIR files,
through the engine ingest uses, with raw ids as keys; invalid views exit 2, unreadable lines are reported."""

from __future__ import annotations

import csv
import io
import json
from datetime import date, datetime, timezone

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from synthfactory.cli import main
from synthfactory.errors import EXIT_INPUT, EXIT_OK, EXIT_SPEC

PATIENTS = [
    {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-06", "active": True,
     "name": [{"family": "Ames", "given": ["Ann", "Bea"]}, {"family": "Bell"}],
     "managingOrganization": {"reference": "Organization/o1"}},
    {"resourceType": "Patient", "id": "p2", "gender": "male", "birthDate": "1981-02-03", "active": False},
    {"resourceType": "Observation", "id": "x1", "status": "final"},
]
VIEW = {
    "resourceType": "ViewDefinition", "name": "patient_names", "resource": "Patient",
    "select": [
        {"column": [{"name": "key", "path": "getResourceKey()", "type": "string"},
                    {"name": "org", "path": "managingOrganization.getReferenceKey(Organization)", "type": "string"},
                    {"name": "born", "path": "birthDate.lowBoundary()", "type": "date"},
                    {"name": "born_hi", "path": "birthDate.highBoundary()", "type": "date"},
                    {"name": "active", "path": "active", "type": "boolean"},
                    {"name": "given", "path": "name.given", "type": "string", "collection": True}]},
        {"forEachOrNull": "name", "column": [{"name": "n", "path": "%rowIndex", "type": "integer"},
                                             {"name": "family", "path": "family", "type": "string"}]},
    ],
}
WANT = [
    {"key": "p1", "org": "o1", "born": "1970-06-01", "born_hi": "1970-06-30", "active": True,
     "given": ["Ann", "Bea"], "n": 0, "family": "Ames"},
    {"key": "p1", "org": "o1", "born": "1970-06-01", "born_hi": "1970-06-30", "active": True,
     "given": ["Ann", "Bea"], "n": 1, "family": "Bell"},
    {"key": "p2", "org": None, "born": "1981-02-03", "born_hi": "1981-02-03", "active": False, "given": [],
     "n": 0, "family": None},
]


def _files(tmp_path, view=VIEW, extra_lines=()):
    v = tmp_path / "view.json"
    v.write_text(json.dumps(view))
    r = tmp_path / "resources.ndjson"
    r.write_bytes(b"\n".join([orjson.dumps(x) for x in PATIENTS] + list(extra_lines)) + b"\n")
    return str(v), str(r)


def test_view_ndjson_to_stdout_reports_bad_lines(tmp_path, capsysbinary):
    v, r = _files(tmp_path, extra_lines=[b"{not json", b"", b"[1, 2]"])
    assert main(["view", v, r]) == EXIT_OK
    out, err = capsysbinary.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == WANT
    err = err.decode()
    assert "resources.ndjson:4: not JSON" in err  # file and line of each unreadable line
    assert "resources.ndjson:6: not a FHIR resource" in err
    assert "3 row(s) from 2 Patient resource(s); 1 of other types skipped; 2 refused" in err


def test_view_csv_and_parquet(tmp_path, capsys):
    v, r = _files(tmp_path)
    assert main(["view", v, r, "--format", "csv", "--out", str(tmp_path / "o.csv")]) == EXIT_OK
    rows = list(csv.reader(io.StringIO((tmp_path / "o.csv").read_text())))
    assert rows[0] == ["key", "org", "born", "born_hi", "active", "given", "n", "family"]
    assert rows[1] == ["p1", "o1", "1970-06-01", "1970-06-30", "true", '["Ann","Bea"]', "0", "Ames"]
    assert rows[3] == ["p2", "", "1981-02-03", "1981-02-03", "false", "[]", "0", ""]
    assert len(rows) == 4

    assert main(["view", v, r, "--format", "parquet", "--out", str(tmp_path / "o.parquet"), "-q"]) == EXIT_OK
    t = pq.read_table(tmp_path / "o.parquet")
    assert t.schema.field("born").type == pa.date32() and t.schema.field("n").type == pa.int64()
    assert t.schema.field("given").type == pa.list_(pa.string()) and t.schema.field("active").type == pa.bool_()
    got = t.to_pylist()
    assert got[0]["born"] == date(1970, 6, 1) and got[2]["given"] == [] and got[2]["family"] is None
    assert [r["key"] for r in got] == ["p1", "p1", "p2"]


def test_view_datetime_columns_and_bundle_input(tmp_path, capsysbinary):
    view = {"resource": "Observation",  # no name: allowed here (ingest needs one for its table)
            "select": [{"column": [{"name": "id", "path": "id", "type": "id"},
                                   {"name": "at", "path": "effective.ofType(dateTime)", "type": "dateTime"}]}]}
    (tmp_path / "v.json").write_text(json.dumps(view))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "id": "o1", "effectiveDateTime": "2020-01-02T03:04:05+01:00"}},
        {"resource": {"resourceType": "Patient", "id": "p1"}}, {"fullUrl": "urn:uuid:x"}]}
    (tmp_path / "b.json").write_text(json.dumps(bundle, indent=2))
    assert main(["view", str(tmp_path / "v.json"), str(tmp_path / "b.json")]) == EXIT_OK
    out, err = capsysbinary.readouterr()
    assert [json.loads(x) for x in out.splitlines()] == [{"id": "o1", "at": "2020-01-02T02:04:05Z"}]
    assert "b.json entry[2]: a Bundle entry without a resource" in err.decode()
    assert main(["view", str(tmp_path / "v.json"), str(tmp_path / "b.json"), "--format", "parquet",
                 "--out", str(tmp_path / "o.parquet")]) == EXIT_OK
    assert pq.read_table(tmp_path / "o.parquet").column("at").to_pylist() == [
        datetime(2020, 1, 2, 2, 4, 5, tzinfo=timezone.utc)]


def test_view_resources_it_cannot_take_are_reported_not_fatal(tmp_path, capsysbinary):
    view = {"name": "v", "resource": "Patient", "where": [{"path": "iif(active, name.family, true)"}],
            "select": [{"column": [{"name": "id", "path": "id"}]}]}
    v, r = _files(tmp_path, view)
    assert main(["view", v, r]) == EXIT_OK
    out, err = capsysbinary.readouterr()
    assert json.loads(out) == {"id": "p2"}  # p1's where gives two strings: refused, reported
    assert "resources.ndjson:1: where[0].path gives a value that is not a boolean" in err.decode()

    view = {"name": "v", "resource": "Patient", "select": [{"column": [
        {"name": "id", "path": "id"}, {"name": "family", "path": "name.family"}]}]}  # 2 values, not a collection
    v, r = _files(tmp_path, view)
    assert main(["view", v, r]) == EXIT_OK
    out, err = capsysbinary.readouterr()
    assert json.loads(out) == {"id": "p2", "family": None}
    assert "resources.ndjson:1: more than one value in family" in err.decode()


def test_view_invalid_view_exit_2_missing_input_exit_3(tmp_path, capsys):
    _, r = _files(tmp_path)
    cases = {
        "fhirpath.json": ({"resource": "Patient", "select": [{"forEach": "@@", "column": [
            {"name": "a", "path": "id"}]}]}, "select[0].forEach"),
        "constant.json": ({"resource": "Patient", "select": [{"column": [{"name": "a", "path": "%nope"}]}]},
                          "unknown constant %nope"),
        "union.json": ({"resource": "Patient", "select": [{"unionAll": [
            {"column": [{"name": "a", "path": "id"}]}, {"column": [{"name": "b", "path": "id"}]}]}]},
            "select[0].unionAll[1]"),
        "noresource.json": ({"select": [{"column": [{"name": "a", "path": "id"}]}]}, "resource"),
    }
    for fname, (view, reason) in cases.items():
        (tmp_path / fname).write_text(json.dumps(view))
        assert main(["view", str(tmp_path / fname), r]) == EXIT_SPEC, fname
        err = capsys.readouterr().err
        assert err.startswith("invalid view: ") and reason in err, err
    (tmp_path / "broken.json").write_text("{")
    assert main(["view", str(tmp_path / "broken.json"), r]) == EXIT_SPEC
    assert "not a JSON or YAML document" in capsys.readouterr().err
    assert main(["view", str(tmp_path / "absent.json"), r]) == EXIT_SPEC
    assert "cannot read it" in capsys.readouterr().err
    (tmp_path / "ok.json").write_text(json.dumps(VIEW))
    assert main(["view", str(tmp_path / "ok.json"), str(tmp_path / "absent.ndjson")]) == EXIT_INPUT
    assert "absent.ndjson: no such file" in capsys.readouterr().err
