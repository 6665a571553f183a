"""bench/relational_cli_check.py (issue 17's done-when read off CLI runs): its FHIR and free-text scans."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import relational_cli_check as check  # noqa: E402


def _write(path: Path, rows: list[dict]) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def test_free_text_and_fhir_references(tmp_path):
    extract = tmp_path / "extract"
    extract.mkdir()
    _write(extract / "Observation.ndjson", [
        {"resourceType": "Observation", "id": "o1", "valueString": "12 Elm Street"},
        {"resourceType": "Observation", "id": "o2", "note": [{"text": "seen by Dr Who"}], "valueQuantity": {"value": 1}},
        {"resourceType": "Observation", "id": "o3", "valueQuantity": {"value": 2}}])
    free = check.free_text(extract)
    assert free == {"12 Elm Street", "seen by Dr Who"}
    fhir = tmp_path / "fhir"
    fhir.mkdir()
    _write(fhir / "Patient.ndjson", [{"resourceType": "Patient", "id": "p1"}])
    _write(fhir / "Observation.ndjson", [
        {"resourceType": "Observation", "id": "x1", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Observation", "id": "x2", "subject": {"reference": "Patient/p2"},
         "component": [{"valueString": "12 Elm Street"}]}])
    out = check.fhir_check(fhir, free)
    assert out == {"resources": 3, "references": 2, "unresolved": 1, "free_text_leaked": 1}
