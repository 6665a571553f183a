"""The official SQL-on-FHIR v2 test suite (vendored in tests/ingest/sof_conformance/, see its README), one test per
case, run through the code path ingest uses: ``views.compile_view`` -> ``CompiledView.rows`` per resource of the
view's type (as ingest routes them) -> ``CompiledView.table`` (the Arrow batch ingest writes).

Expectations: ``expect`` rows compared as a multiset (the suite does not fix the row order); ``expectColumns``
the column names in order; ``expectError`` an error at compile time or while producing rows. Typed values are
compared as values: a ``date`` column against ``date.fromisoformat`` of the expected string, a ``dateTime``
column against ``datetime.fromisoformat`` (the same instant), a ``decimal`` column numerically."""

from __future__ import annotations

import json
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from synthfactory.fhir.fhirpath import Env, FhirPathError
from synthfactory.fhir.normalize import BadResource
from synthfactory.fhir.views import ViewError, compile_view

SUITE = Path(__file__).parent / "sof_conformance"


def _cases() -> list:
    out = []
    for f in sorted(SUITE.glob("*.json")):
        doc = json.loads(f.read_text())
        for i, case in enumerate(doc["tests"]):
            out.append(pytest.param(doc["resources"], case, id=f"{f.stem}[{i}] {case['title']}"))
    return out


CASES = _cases()


def raw_key(resource_type: str, source_id: str) -> str:
    return source_id


def run_view(view_def: dict, resources: list[dict]) -> tuple[list[str], list[dict]]:
    view = compile_view(view_def, require_name=False)
    env = Env(raw_key)
    rows: list = []
    for r in resources:
        if r.get("resourceType") == view.resource:
            rows.extend(view.rows(r, env))
    return view.columns, view.table(rows).to_pylist()


def _expected(value, atype: pa.DataType):
    if value is None:
        return None
    if pa.types.is_list(atype):
        return [_expected(v, atype.value_type) for v in value]
    if pa.types.is_date(atype):
        return date.fromisoformat(value[:10])
    if pa.types.is_timestamp(atype):
        return datetime.fromisoformat(value).astimezone(timezone.utc)
    if pa.types.is_floating(atype):
        return float(Decimal(str(value)))
    return value


def _canon(row: dict) -> str:
    return json.dumps(row, sort_keys=True, default=str)


def test_the_whole_suite_is_here() -> None:
    assert len(CASES) == 134
    assert (SUITE / "LICENSE.md").exists()


@pytest.mark.parametrize("resources,case", CASES)
def test_sof_v2(resources: list[dict], case: dict) -> None:
    if case.get("expectError"):
        with pytest.raises((ViewError, FhirPathError, BadResource)):
            run_view(case["view"], resources)
        return
    columns, got = run_view(case["view"], resources)
    if "expectColumns" in case:
        assert columns == case["expectColumns"]
    if "expect" in case:
        view = compile_view(case["view"], require_name=False)
        types = {f.name: f.type for f in view.schema}
        want = [{k: _expected(v, types[k]) if k in types else v for k, v in row.items()} for row in case["expect"]]
        assert sorted(map(_canon, got)) == sorted(map(_canon, want))


# -- beyond the suite: the semantics the fixes added, at their edges ------------------------------------------
@pytest.mark.parametrize("expr,want", [
    ("1.0.lowBoundary()", [0.95]), ("1.0.highBoundary()", [1.05]), ("(-1.0).lowBoundary()", [-1.05]),
    ("1.587.lowBoundary(2)", [1.58]), ("1.587.highBoundary(2)", [1.59]), ("1.lowBoundary()", [0.5]),
    ("'2012'.lowBoundary()", ["2012-01-01"]), ("'2012-02'.highBoundary()", ["2012-02-29"]),
    ("'2014-01-01T08'.highBoundary()", ["2014-01-01T08:59:59.999-12:00"]),
    ("'2014-01-01T08:05:00.5Z'.lowBoundary()", ["2014-01-01T08:05:00.500Z"]),
    ("'2014-01-01T08:05Z'.lowBoundary(8)", ["2014-01-01"]),
    ("'10:30'.highBoundary()", ["10:30:59.999"]), ("'abc'.lowBoundary()", []), ("{}.lowBoundary()", []),
])
def test_boundaries(expr: str, want: list) -> None:
    from synthfactory.fhir.fhirpath import compile_path

    assert compile_path(expr)([{}], Env(raw_key)) == want


def test_repeat_is_depth_first_with_row_index_and_an_undefined_constant_is_refused_at_compile_time() -> None:
    qr = {"resourceType": "QuestionnaireResponse", "id": "q", "item": [
        {"linkId": "1", "item": [{"linkId": "1.1", "answer": [{"item": [{"linkId": "1.1.1"}]}]}]},
        {"linkId": "2"}]}
    view = {"resource": "QuestionnaireResponse", "select": [{"repeat": ["item", "answer.item"], "column": [
        {"name": "i", "path": "%rowIndex", "type": "integer"}, {"name": "link", "path": "linkId"}]}]}
    _, got = run_view(view, [qr])
    assert got == [{"i": 0, "link": "1"}, {"i": 1, "link": "1.1"}, {"i": 2, "link": "1.1.1"}, {"i": 3, "link": "2"}]
    with pytest.raises(ViewError, match=r"select\[0\]\.column\[0\]\.path: unknown constant %x"):
        compile_view({"resource": "Patient", "select": [{"column": [{"name": "a", "path": "%x"}]}]},
                     require_name=False)
