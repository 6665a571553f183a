"""Bundles through the NDJSON hot loop: each file streamed through the compiled entry scanner (bounded memory,
each entry read once), entries flattened by the compiled path, the validation sample's per-file part,
resources naming a Patient of a later file held back (and spilled to disk past a limit) so the dangling check
still sees every patient; the streamed reader against the whole-file one and the NDJSON path."""

from __future__ import annotations

import gzip

import orjson
import pyarrow.parquet as pq
import pytest

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
    # the sample's fixed part: the extract's first 20 of each type, and every file's first resource (its Patient)
    assert r["validated"] == 30 + 20
    rows = pq.read_table(r["tables"]["observation"]).to_pylist()
    assert {x["patient_key"] for x in rows} == {keyer.key("Patient", f"pat-{i}") for i in range(30)}
    assert {x["observation_key"] for x in rows} == {keyer.key("Observation", f"obs-{i}-{j}")
                                                    for i in range(30) for j in range(3)}
    if native.available():
        r = ingest_bundles(str(src), str(tmp_path / "out2"), keyer=keyer, validate_sample_rate=0.0,
                           validate_max_per_type=10)  # the cap bounds the first-N too
        assert r["validated"] == 20
        # all taken by the compiled commit, the 10 validated (in Python) once they passed
        assert r["native_lines"].get("Observation", 0) == 90


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


def _rows(path: str) -> list:
    return sorted(map(repr, pq.read_table(path).to_pylist()))


def _whole(monkeypatch) -> None:
    """The reader without the compiled scanner: every file parsed whole (the path without a C compiler)."""
    monkeypatch.setattr(bundle_mod, "_scanner", lambda: None)


needs_native = pytest.mark.skipif(not native.available(), reason="the compiled module is not built")


@needs_native
def test_streamed_equals_whole_file_and_ndjson(carebundle_bundles, carebundle_extract, tmp_path, keyer,
                                               monkeypatch):
    from synthfactory.ingest.fhir_ndjson import ingest_extract

    src = tmp_path / "b"
    src.mkdir()
    for i, p in enumerate(sorted(carebundle_bundles.glob("*.json"))):  # pretty-printed; a third gzipped
        data = p.read_bytes()
        if i % 3 == 0:
            (src / (p.name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (src / p.name).write_bytes(data)
    types = ["Patient", "Encounter", "Condition", "Observation", "MedicationRequest"]
    kw = dict(keyer=keyer, resources=types, validate_sample_rate=0.05)
    monkeypatch.setattr(bundle_mod, "READ_CHUNK", 997)  # every entry spans chunks
    seen = []
    real_scan = bundle_mod._scanner()
    monkeypatch.setattr(bundle_mod, "_scanner", lambda: lambda buf, *a: seen.append(len(buf)) or real_scan(buf, *a))
    s = ingest_bundles(str(src), str(tmp_path / "s"), **kw)
    biggest = max(len(orjson.dumps(e, option=orjson.OPT_INDENT_2)) for p in carebundle_bundles.glob("*.json")
                  for e in orjson.loads(p.read_bytes())["entry"])
    assert max(seen) < 2 * (997 + biggest) + 200  # a chunk and an entry (the buffer doubles to finish one)
    assert max(seen) < min(p.stat().st_size for p in carebundle_bundles.glob("*.json"))
    _whole(monkeypatch)
    w = ingest_bundles(str(src), str(tmp_path / "w"), **kw)
    n = ingest_extract(str(carebundle_extract), str(tmp_path / "n"), keyer=keyer, resources=types,
                       validate_sample_rate=0.0)
    assert s["rows"] == w["rows"] == n["rows"] and s["quarantined_total"] == w["quarantined_total"] == 0
    assert s["validated"] == w["validated"] and s["bundle_stats"] == w["bundle_stats"]
    assert s["file_outcomes"] == w["file_outcomes"] and s["extract_sha256"] == w["extract_sha256"]
    assert s["native_lines"] == w["native_lines"] and sum(s["native_lines"].values()) > 0
    for t in n["tables"]:
        assert _rows(s["tables"][t]) == _rows(w["tables"][t]) == _rows(n["tables"][t]), t


@pytest.mark.parametrize("streamed", [True, False])
def test_every_bundle_file_has_its_sample(tmp_path, keyer, monkeypatch, streamed):
    """The validation sample looks at every file: 30 one-patient Bundles whose Patient is invalid R4B (an
    ``active`` that is no boolean; the flattener does not read it) are all quarantined with the validator's
    reason, rate 0 (an extract-wide "first 20" alone would let 10 of them through)."""
    if not streamed:
        _whole(monkeypatch)
    src = tmp_path / "b"
    src.mkdir()
    for i in range(30):
        pat = {"resourceType": "Patient", "id": f"p{i}", "gender": "female", "birthDate": "1970-01-01",
               "active": "maybe"}
        (src / f"p{i:02d}.json").write_bytes(bundle((None, pat), *[(None, obs(f"o{i}-{j}", f"Patient/p{i}"))
                                                                    for j in range(3)]))
    (src / "z_ok.json").write_bytes(bundle((None, {"resourceType": "Patient", "id": "ok"})))
    r = ingest_bundles(str(src), str(tmp_path / "out"), keyer=keyer, validate_sample_rate=0.0, on_dangling="keep")
    assert r["rows"]["patient"] == 1 and r["rows"]["observation"] == 90
    q = [orjson.loads(x) for x in (tmp_path / "out" / "quarantine.ndjson").read_bytes().splitlines()]
    assert sorted(x["file"] for x in q) == [f"p{i:02d}.json" for i in range(30)]
    assert {(x["line"], x["resource_type"]) for x in q} == {(1, "Patient")}
    assert {x["reason"] for x in q} == {"validation failed at active (bool_parsing)"}
    assert r["validated"] == 31 + 20  # the Patients, and the extract's first 20 Observations
    r = ingest_bundles(str(src), str(tmp_path / "out0"), keyer=keyer, validate_sample_rate=0.0,
                       validate_first=0)  # validate_first=0: no fixed part at all
    assert r["validated"] == 0 and r["rows"]["patient"] == 31


@needs_native
def test_a_malformed_entry_in_a_large_bundle_is_quarantined_not_fatal(tmp_path, keyer, monkeypatch):
    monkeypatch.setattr(bundle_mod, "READ_CHUNK", 4096)
    src = tmp_path / "b"
    src.mkdir()
    pat = {"resourceType": "Patient", "gender": "female"}
    parts = [orjson.dumps({"fullUrl": "urn:uuid:pat", "resource": pat})]
    for j in range(2000):
        o = obs(f"o{j}", "urn:uuid:pat", 5.0)
        parts.append(orjson.dumps({"fullUrl": f"urn:uuid:o{j}", "resource": o}, option=orjson.OPT_INDENT_2))
    parts[501] = b'{"resource": {"resourceType": "Observation", "id": "bad", "status": tru}}'  # invalid JSON
    parts[1001] = b'7'  # not an object
    parts[1501] = orjson.dumps({"fullUrl": "urn:uuid:o1500", "resource": {**obs("o-\u00e9", "urn:uuid:pat")}},
                               option=orjson.OPT_INDENT_2).replace("\u00e9".encode(), b"\\u00e9")  # an escape
    parts[1600] = orjson.dumps({"fullUrl": "urn:uuid:o1599", "resource": {**obs("", "urn:uuid:pat")}})
    parts[1502] = orjson.dumps({"resource": {**obs("o1501", "urn:uuid:later")}})  # names a later entry
    parts.append(orjson.dumps({"fullUrl": "urn:uuid:later", "resource": {"resourceType": "Patient", "id": "q"}}))
    (src / "big.json").write_bytes(b'{"resourceType": "Bundle", "type": "collection", "entry": [\n'
                                   + b",\n".join(parts) + b'\n], "total": 2002}')
    r = ingest_bundles(str(src), str(tmp_path / "out"), keyer=keyer, validate_sample_rate=0.0)
    q = [orjson.loads(x) for x in (tmp_path / "out" / "quarantine.ndjson").read_bytes().splitlines()]
    assert sorted((x["line"], x["reason"]) for x in q) == [
        (502, "invalid JSON"), (1002, "entry without a resource")]
    assert r["rows"]["patient"] == 2 and r["rows"]["observation"] == 2000 - 2
    assert r["file_outcomes"]["big.json"] == {"outcome": "read", "resources": 2002}
    rows = pq.read_table(r["tables"]["observation"]).to_pylist()
    by_key = {x["observation_key"]: x["patient_key"] for x in rows}
    assert by_key[keyer.key("Observation", "o1501")] == keyer.key("Patient", "q")  # the later entry's Patient
    assert by_key[keyer.key("Observation", "o7")] == keyer.key("Patient", "pat")
    assert by_key[keyer.key("Observation", "o-\u00e9")] == keyer.key("Patient", "pat")  # the Python path's
    assert by_key[keyer.key("Observation", "o1599")] == keyer.key("Patient", "pat")  # empty id: from fullUrl
    assert r["native_lines"]["Observation"] > 1900


@needs_native
def test_a_bundle_broken_after_its_entries_is_reported_with_what_was_read(tmp_path, keyer, monkeypatch):
    monkeypatch.setattr(bundle_mod, "READ_CHUNK", 512)
    src = tmp_path / "b"
    src.mkdir()
    entries = [{"resource": {"resourceType": "Patient", "id": "p"}}] + [
        {"resource": obs(f"o{j}", "Patient/p")} for j in range(20)]
    data = orjson.dumps({"resourceType": "Bundle", "entry": entries})
    (src / "cut.json").write_bytes(data[:-300])  # truncated inside its entries
    r = ingest_bundles(str(src), str(tmp_path / "out"), keyer=keyer, validate_sample_rate=0.0)
    got = r["file_outcomes"]["cut.json"]
    n = got["resources"]
    assert got["outcome"] == "quarantined" and 10 < n < 21
    assert got["reason"] == f"invalid JSON after entry {n} (the entries before it were read)"
    assert r["rows"]["observation"] == n - 1 and r["bundle_stats"]["bundles"] == 0
    q = [orjson.loads(x) for x in (tmp_path / "out" / "quarantine.ndjson").read_bytes().splitlines()]
    assert q == [{"file": "cut.json", "line": 0, "resource_type": "Bundle", "reason": got["reason"]}]

    (src / "cut.json").unlink()  # max_bundle_bytes bounds one entry of a streamed Bundle, a whole bare resource
    entries[3]["resource"]["note"] = [{"text": "x" * 5000}]
    (src / "big.json").write_bytes(orjson.dumps({"resourceType": "Bundle", "entry": entries}))
    (src / "bare.json").write_bytes(orjson.dumps({**entries[4]["resource"], "note": [{"text": "y" * 5000}]}))
    r = ingest_bundles(str(src), str(tmp_path / "out2"), keyer=keyer, validate_sample_rate=0.0,
                       max_bundle_bytes=4000)
    assert r["file_outcomes"]["big.json"] == {
        "outcome": "quarantined", "resources": 3,
        "reason": "bundle entry larger than 4000 bytes after entry 3 (the entries before it were read)"}
    assert r["file_outcomes"]["bare.json"] == {"outcome": "quarantined", "reason": "bundle larger than 4000 bytes"}
    assert r["rows"]["patient"] == 1 and r["rows"]["observation"] == 2


@pytest.mark.parametrize("streamed", [True, False])
def test_root_members_the_scanner_leaves_to_orjson(tmp_path, keyer, monkeypatch, streamed):
    """An escaped key before the entries (the whole file goes to orjson) or after them (checked, skipped), and
    ``entry`` before ``resourceType``: read like any Bundle."""
    if not streamed:
        _whole(monkeypatch)
    src = tmp_path / "b"
    src.mkdir()
    e = b'[{"resource": {"resourceType": "Patient", "id": "%s"}}]'
    (src / "a.json").write_bytes(b'{"resourceType": "Bundle", "entry": ' + e % b"a" + b', "\\u0074otal": 1}')
    (src / "b.json").write_bytes(b'{"\\u0074ype": "collection", "resourceType": "Bundle", "entry": ' + e % b"b" + b"}")
    (src / "c.json").write_bytes(b'{"entry": ' + e % b"c" + b', "resourceType": "Bundle"}')
    r = ingest_bundles(str(src), str(tmp_path / "out"), keyer=keyer, validate_sample_rate=0.0)
    assert r["rows"]["patient"] == 3 and r["quarantined_total"] == 0 and r["bundle_stats"]["bundles"] == 3
    assert {f: o["outcome"] for f, o in r["file_outcomes"].items()} == dict.fromkeys(("a.json", "b.json", "c.json"),
                                                                                     "read")


@needs_native
def test_scanner_reads_entries_fields_and_reference_spans():
    scan = bundle_mod._scanner()
    doc = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:a", "request": {"method": "PUT", "url": "Patient/p1"},
         "resource": {"resourceType": "Patient", "id": "p1", "link": [{"other": {"reference": "urn:uuid:b"}}]}},
        {"resource": {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/p1"},
                      "recorder": {"reference": "urn:uuid:x"}}},
        {"resource": {"resourceType": "Observation", "subject": {"display": "no reference"}}},
        {"resource": {"resourceType": "Practitioner", "id": "dr"}},
        {"fullUrl": "urn:uuid:\u00e9", "resource": {"resourceType": "Patient"}},  # non-ASCII: read here
        {"fullUrl": 5, "resource": {"resourceType": "Patient"}},  # a field of another type: orjson's
        {"request": {"method": "DELETE", "url": "Patient/old"}}]}
    data = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    pos, state, got = scan(data, 0, 0, True, {"Patient", "Observation", "AllergyIntolerance"})
    assert pos == len(data) and state & 0xFF == 7 and state & 0x100 and len(got) == 7
    p, a, o, dr, u, odd, dele = got
    assert p[4:12] == ("urn:uuid:a", "PUT", "Patient/p1", "Patient", "p1", 1, None, None)
    assert orjson.loads(p[3]) == doc["entry"][0]["resource"] and b"\n" not in p[3]  # compact bytes
    assert [p[3][p[12][k]:p[12][k + 1]] for k in range(0, len(p[12]), 2)] == [b"urn:uuid:b"]
    assert a[7:12] == ("AllergyIntolerance", None, 0, None, "Patient/p1")
    assert [a[3][a[12][k]:a[12][k + 1]] for k in range(0, len(a[12]), 2)] == [b"Patient/p1", b"urn:uuid:x"]
    assert o[7] == "Observation" and o[10] is None and o[11] is None
    assert dr[3] == b"" and dr[7] == "Practitioner" and dr[12] == ()  # a type not wanted: no bytes
    assert u[0] == 0 and u[4] == "urn:uuid:\u00e9"
    assert odd[0] == 1 and orjson.loads(data[odd[1]:odd[2]]) == doc["entry"][5]
    assert dele[5] == "DELETE" and dele[3] is None
    for cut in range(1, len(data), 97):  # any prefix: whole entries only, the rest once more bytes come
        pos, state, part = scan(data[:cut], 0, 0, False, None)
        assert pos <= cut and state < 1000 and len(part) <= 7
        assert [x[1:3] for x in part] == [x[1:3] for x in got[:len(part)]]
