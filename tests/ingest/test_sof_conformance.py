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
