"""bench/experiments/columnar_flatten.py (an experiment, not product code) gives exactly the row-wise
flattener's rows on plain data, and refuses every block a product would have to flatten row-wise."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "experiments"))

import columnar_flatten as cf  # noqa: E402
import ingest_bench  # noqa: E402

from synthfactory.ingest.normalize import fast_key  # noqa: E402
from synthfactory.keys import Keyer  # noqa: E402


@pytest.fixture(scope="module")
def col():
    c = cf.Columnar(cf.SALT, fast_key(Keyer(cf.SALT)))
    yield c
    c.close()


def test_equal_to_row_wise_on_the_bench_extract(tmp_path):
    ingest_bench.generate(tmp_path, 400, seed=3)
    report = cf.main(["--extract", str(tmp_path), "--check-lines", "400", "--no-throughput"])
    assert report["equal_to_row_wise"] == dict.fromkeys(("Encounter", "Condition", "Observation"), "equal")


OBS = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
       "code": {"coding": [{"system": "http://loinc.org", "code": "718-7", "display": "Hb"}]},
       "effectiveDateTime": "2020-01-02T03:04:05+01:00", "valueQuantity": {"value": 13.5, "unit": "g/dL"}}


def _lines(*objs: dict) -> list[bytes]:
    return [orjson.dumps(o) for o in objs]


def test_plain_block_is_taken_and_keyed_like_the_row_wise_path(col):
    lines = _lines(OBS, {**OBS, "id": "o2", "valueQuantity": {"value": 7, "code": "g/dL"}})
    assert cf.check(col, "Observation", lines, col.key) == "equal"


@pytest.mark.parametrize("lines", [
    [orjson.dumps(OBS).replace(b"13.5", b"NaN")],                         # orjson refuses NaN
    [orjson.dumps(OBS) + orjson.dumps({**OBS, "id": "o2"})],              # two objects on one line
    [orjson.dumps(OBS), b"", orjson.dumps({**OBS, "id": "o2"})],          # a blank line
    [orjson.dumps(OBS).replace(b'"id":"o1"', b'"id":1')],                 # id of another JSON type
    [orjson.dumps({**OBS, "modifierExtension": [{"url": "x"}]})],
    [b'{"resourceType":"Observation","id":"o1","status":"fin\xffal"}'],  # invalid UTF-8
])
def test_blocks_the_row_wise_path_must_see_are_refused_at_parse(col, lines):
    assert col.parse("Observation", lines) is None


@pytest.mark.parametrize("change", [
    {"effectiveDateTime": "2020-01"},                                       # partial date: row-wise handles it
    {"effectiveDateTime": "2020-02-30T00:00:00Z"},                          # invalid date: quarantined row-wise
    {"subject": {"reference": "#p1"}},                                      # contained reference
    {"subject": {"reference": "http://x.org/fhir/Patient/p1/_history/2"}},  # absolute, versioned
    {"resourceType": "Condition"},
    {"code": {"coding": [None]}},
    {"valueQuantity": {"value": -0.0}},
])
def test_resources_of_another_shape_are_refused_at_flatten(col, change):
    tb = col.parse("Observation", _lines({**OBS, **change}))
    assert tb is not None and col.flatten("Observation", tb) is None
