"""Bundles through the NDJSON hot loop: each file parsed once, entries flattened by the compiled path, the
validation sample's "first 20" per file, resources naming a Patient of a later file held back (and spilled to
disk past a limit) so the dangling check still sees every patient."""

from __future__ import annotations

import orjson
import pyarrow.parquet as pq

from synthfactory.ingest import bundle as bundle_mod
from synthfactory.ingest import native
from synthfactory.ingest.bundle import _HeldBack, ingest_bundles

LOINC = "http://loinc.org"


def obs(oid: str, ref: str, value: float = 5.0) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "category": [{"coding": [{"code": "laboratory"}]}],
            "code": {"coding": [{"system": LOINC, "code": "4548-4", "display": "HbA1c"}]},
            "subject": {"reference": ref}, "effectiveDateTime": "2024-01-02T03:04:05Z",
            "valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}


def bundle(*entries: tuple[str | None, dict]) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {**({"fullUrl": f} if f else {}), "resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
        for f, r in entries]}, option=orjson.OPT_INDENT_2)


def test_each_file_read_once_compiled_flatten_and_first_n_per_file(tmp_path, keyer, monkeypatch):
    src = tmp_path / "b"
    src.mkdir()
    for i in range(30):  # one patient per file, urn:uuid references, 3 observations each
        pat = {"resourceType": "Patient", "gender": "female", "birthDate": "1970-01-01"}
        (src / f"p{i:02d}.json").write_bytes(bundle(
            (f"urn:uuid:pat-{i}", pat),
            *[(f"urn:uuid:obs-{i}-{j}", {k: v for k, v in obs("x", f"urn:uuid:pat-{i}", j).items() if k != "id"})
              for j in range(3)]))
    reads = []
    real, real_chunks = bundle_mod._read_bundle, bundle_mod._chunks
    monkeypatch.setattr(bundle_mod, "_read_bundle", lambda *a: reads.append(a[1]) or real(*a))
    monkeypatch.setattr(bundle_mod, "_chunks", lambda *a: reads.append(a[1]) or real_chunks(*a))
    r = ingest_bundles(str(src), str(tmp_path / "out"), keyer=keyer, validate_sample_rate=0.0)
    assert sorted(reads) == sorted(f"p{i:02d}.json" for i in range(30))  # each Bundle read (and parsed) once
    assert r["rows"]["patient"] == 30 and r["rows"]["observation"] == 90 and r["quarantined_total"] == 0
    # the sample's fixed part: the extract's first 20 of each type, and every file's first of each type: 30
    # patients; observations: the first 20 (files 0-6) + the first of each of the 23 other files
    assert r["validated"] == 30 + 20 + 23
    rows = pq.read_table(r["tables"]["observation"]).to_pylist()
    assert {x["patient_key"] for x in rows} == {keyer.key("Patient", f"pat-{i}") for i in range(30)}
    assert {x["observation_key"] for x in rows} == {keyer.key("Observation", f"obs-{i}-{j}")
                                                    for i in range(30) for j in range(3)}
    if native.available():
        r = ingest_bundles(str(src), str(tmp_path / "out2"), keyer=keyer, validate_sample_rate=0.0,
                           validate_max_per_type=10)  # the cap bounds the first-N too
        assert r["validated"] == 20
        assert r["native_lines"].get("Observation", 0) == 80  # the others were validated in Python


def test_a_patient_in_a_later_file_is_not_dangling(tmp_path, keyer, monkeypatch):
    src = tmp_path / "b"
    src.mkdir()
    (src / "a_obs.json").write_bytes(bundle(*[(None, obs(f"o{j}", f"Patient/p{j % 3}")) for j in range(9)],
                                            (None, obs("o-lost", "Patient/nobody"))))
    (src / "z_pat.json").write_bytes(bundle(*[(None, {"resourceType": "Patient", "id": f"p{j}"}) for j in range(3)]))
    monkeypatch.setattr(bundle_mod, "HELD_BACK_MEMORY", 200)  # most of them go through the temporary file
    r = ingest_bundles(str(src), str(tmp_path / "out"), keyer=keyer, validate_sample_rate=0.0)
    assert r["rows"]["observation"] == 9 and r["bundle_resources_held_back"] == 10
    assert r["dangling_references"] == {"Observation": 1}
    q = [orjson.loads(x) for x in (tmp_path / "out" / "quarantine.ndjson").read_bytes().splitlines()]
    assert q == [{"file": "a_obs.json", "line": 10, "resource_type": "Observation",
                  "reason": "dangling reference to Patient"}]  # the entry's position in its Bundle


def test_held_back_spills_and_replays_in_order(tmp_path):
    h = _HeldBack(limit=100)
    items = [("a.json", "Observation", i, orjson.dumps({"i": i, "pad": "x" * 30})) for i in range(1, 8)]
    items += [("b.json", "Condition", 1, b'{"j":1}'), ("b.json", "Observation", 2, b'{"j":2}')]
    for f, t, p, line in items:
        h.add(f, t, p, line)
    assert h.spill is not None and h.count == 9
    got = list(h.replay())
    h.close()
    assert got == [("a.json", "Observation", list(range(1, 8)), [x[3] for x in items[:7]]),
                   ("b.json", "Condition", [1], [b'{"j":1}']), ("b.json", "Observation", [2], [b'{"j":2}'])]


def test_reference_rewrite_in_the_bytes():
    from synthfactory.ingest.bundle import _rewrite

    mapping = {"urn:uuid:a": "Patient/a", 'http://x/Patient/"q"': "Patient/q"}
    mb = {k.encode(): v.encode() for k, v in mapping.items()}
    counts = [0]
    line = orjson.dumps({"subject": {"reference": "urn:uuid:a"}, "performer": [{"reference": "urn:uuid:gone"}],
                         "note": [{"text": '"reference":"urn:uuid:a"'}]})  # inside a string: escaped, untouched
    got = orjson.loads(_rewrite(line, mb, mapping, counts))
    assert got["subject"]["reference"] == "Patient/a" and got["performer"][0]["reference"] == "urn:uuid:gone"
    assert got["note"][0]["text"] == '"reference":"urn:uuid:a"' and counts == [1]
    line = orjson.dumps({"subject": {"reference": 'http://x/Patient/"q"'}})  # an escaped value: decoded, compared
    assert orjson.loads(_rewrite(line, mb, mapping, counts)) == {"subject": {"reference": "Patient/q"}}
