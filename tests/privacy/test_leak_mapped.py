"""The leak scan in parts (plan -> one scan per unit -> merge, the DAG's mapped tasks) gives exactly the result of
the one-process scan: on a release with planted leaks (an MRN in a synthetic column, in two row groups of a
Parquet file cut into ranges, a name in the data card) and on a clean release, whatever the number of parts."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfactory.privacy.leak import (_SCAN_BATCH, LeakMatcher, leak_scan, merge_scan, plan_scan, scan_part)

MRN = "MRN-7730021"
NAME = "Emet Dummett"
IDS = [("3f2b8c1e-9a4d-4e6f-8b1a-2c3d4e5f6a7b", "id"), (MRN, "identifier"), (NAME, "name"), ("Dummett", "family"),
       ("(555) 123-4567", "telecom"), ("42", "identifier")]


@pytest.fixture()
def store():
    from synthfactory.storage import Store

    return Store()


def _release(tmp_path, leaky: bool) -> list[str]:
    """A release: a synthetic Parquet table of 4 row groups (one longer than the scanner's batch, so read in two
    chunks), a second table, a data card (HTML) and two reports (JSON)."""
    n = _SCAN_BATCH + 5_000
    sizes = [n, 10_000, 10_000, 10_000]
    rows = sum(sizes)
    dx = [f"code {i % 37}" for i in range(rows)]
    note = ["seen"] * rows
    if leaky:  # the same MRN in two row groups (one identifier, two occurrences) and a phone in a third
        note[5], note[n + 10] = f"ref {MRN}", MRN.lower()
        dx[n + 10_000 + 7] = "5551234567"
    table = pa.table({"synthetic_id": [f"syn-{i}" for i in range(rows)], "dx": pa.array(dx).dictionary_encode(),
                      "note": note, "tags": [["a", "b"]] * rows, "age": list(range(rows))})
    syn = tmp_path / "synthetic.parquet"
    writer = pq.ParquetWriter(syn, table.schema)
    start = 0
    for size in sizes:
        writer.write_table(table.slice(start, size), row_group_size=size)
        start += size
    writer.close()
    assert pq.ParquetFile(syn).metadata.num_row_groups == 4
    enc = tmp_path / "encounter.parquet"
    pq.write_table(pa.table({"k": ["x", "y"], "kind": ["ambulatory", "emergency"]}), enc)
    card = tmp_path / "datacard.html"
    card.write_text("<html><p>Synthetic cohort; 42 rows shown" + (f", contact {NAME}" if leaky else "")
                    + "</p></html>")
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps({"quality_score": 0.91, "note": "too little real data"}))
    privacy = tmp_path / "privacy.json"
    privacy.write_text(json.dumps({"exact_match_rate": 0.0}))
    return [str(syn), str(enc), str(card), str(quality), str(privacy)]


def _mapped(files, matcher, store, n, tmp_path):
    units = json.loads(json.dumps(plan_scan(files, store, n)))  # through XCom: JSON
    parts = [json.loads(json.dumps(scan_part(matcher, u, store, str(tmp_path / "m" / f"{u['index']}.json"))))
             for u in units]
    return units, parts, merge_scan(files, parts[::-1], store)  # mapped task results come in any order


@pytest.mark.parametrize("leaky", [True, False])
def test_mapped_scan_equals_the_one_process_scan(tmp_path, store, leaky):
    files = _release(tmp_path, leaky)
    matcher = LeakMatcher.from_identifiers([_ident(v, k) for v, k in IDS])
    whole = leak_scan(files, matcher, store)
    for n in (1, 3, 4, 50):
        units, parts, merged = _mapped(files, matcher, store, n, tmp_path)
        assert merged == whole, n
        assert len(units) == len(files) + (min(n, 4) - 1 if n > 1 else 0)  # the big table cut into ranges
    assert [u["row_groups"] for u in units if u["file_index"] == 0] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    if leaky:
        syn = whole["hits"][0]
        # the MRN in two ranges counts once (distinct identifiers); the phone sits in the dictionary of every chunk
        assert (syn["file"], syn["count"]) == (files[0], 2) and syn["occurrences"] >= 3
        assert syn["kinds"] == ["identifier", "telecom"]
        assert [h["file"] for h in whole["hits"]] == [files[0], files[2]] and whole["clean"] is False
        assert whole["hits"][1]["kinds"] == ["family", "name"]  # "Emet Dummett" and "Dummett"
    else:
        assert whole["clean"] is None and whole["hits"] == []  # "42" is unscannable: never certified clean
        assert whole["unscanned_kinds"] == {"identifier": 1}


def test_a_leak_in_one_part_shows_in_the_merge_and_nothing_of_it_in_the_parts(tmp_path, store):
    files = _release(tmp_path, leaky=True)
    matcher = LeakMatcher.from_identifiers([_ident(v, k) for v, k in IDS[:-1]])  # all scannable
    units = plan_scan(files, store, 4)
    parts = [scan_part(matcher, u, store, str(tmp_path / "m" / f"{u['index']}.json")) for u in units]
    with_hits = [p for p in parts if p["hit"]]
    assert [[0, 1], [1, 2]] == [p["row_groups"] for p in with_hits if p["file_index"] == 0][:2]  # the MRN twice
    text = json.dumps(parts).lower()  # what goes through XCom: counts and kinds only
    assert "7730021" not in text and "dummett" not in text and "5551234567" not in text
    merged = merge_scan(files, parts, store)
    assert merged["clean"] is False and merged == leak_scan(files, matcher, store)
    # a missing part fails the merge instead of passing the release unscanned
    with pytest.raises(ValueError, match="no scanned part|do not cover"):
        merge_scan(files, [p for p in parts if p["index"] != 1], store)
    with pytest.raises(ValueError, match="no scanned part"):
        merge_scan(files, [p for p in parts if p["file_index"] != 2], store)


def test_an_unreadable_row_group_range_falls_back_to_the_whole_file_as_the_one_process_scan(tmp_path, store):
    files = _release(tmp_path, leaky=True)
    syn = tmp_path / "synthetic.parquet"
    data = bytearray(syn.read_bytes())
    md = pq.ParquetFile(syn).metadata
    col = md.row_group(1).column(2)  # the "note" column chunk of the second row group: garbage
    at = col.data_page_offset
    data[at:at + 64] = b"\xff" * 64
    syn.write_bytes(bytes(data))
    matcher = LeakMatcher.from_identifiers([_ident(v, k) for v, k in IDS])
    whole = leak_scan(files, matcher, store)
    units, parts, merged = _mapped(files, matcher, store, 4, tmp_path)
    assert len(units) == len(files) + 3 and merged == whole
    assert [p["raw"] for p in parts[:4]] == [False, True, False, False]  # the bad range scanned it whole


def _ident(value, kind):
    from synthfactory.privacy.leak import Identifier

    return Identifier(value, kind)


@pytest.mark.parametrize("sizes, n, ranges", [
    ([88441, 88343, 88258, 88397, 88376, 88456, 88413, 88501], 4, [[0, 2], [2, 4], [4, 6], [6, 8]]),
    ([10, 1, 1, 1, 1, 1, 1, 10], 3, [[0, 1], [1, 7], [7, 8]]),
    ([5, 5, 5], 50, [[0, 1], [1, 2], [2, 3]]),
    ([5, 5, 5], 1, [None]),
    ([7], 8, [None]),
])
def test_plan_cuts_a_big_parquet_file_at_the_row_groups_nearest_equal_bytes(monkeypatch, sizes, n, ranges):
    from synthfactory.privacy import leak

    monkeypatch.setattr(leak, "parquet_row_groups", lambda uri, store: sizes if uri == "big" else None)
    units = plan_scan(["big", "card.html"], None, n)
    assert [u["row_groups"] for u in units] == [*ranges, None]
    assert [u["index"] for u in units] == list(range(len(units))) and units[-1]["file_index"] == 1


def test_mapped_scan_of_s3_staging_equals_the_one_process_scan(tmp_path):
    """Release files in s3:// staging (moto): the plan reads the footers, the ranges their objects."""
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    from pathlib import Path

    from synthfactory.storage import Store

    local = _release(tmp_path, leaky=True)
    matcher = LeakMatcher.from_identifiers([_ident(v, k) for v, k in IDS])
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="staging")
        files = []
        for path in local:
            client.put_object(Bucket="staging", Key=f"run/{Path(path).name}", Body=Path(path).read_bytes())
            files.append(f"s3://staging/run/{Path(path).name}")
        store = Store(s3=client)
        whole = leak_scan(files, matcher, store)
        units = plan_scan(files, store, 4)
        parts = [scan_part(matcher, u, store, f"s3://staging/run/leak_scan/{u['index']}.json") for u in units]
        assert len(units) == len(files) + 3 and merge_scan(files, parts, store) == whole
        assert whole["clean"] is False and [h["file"] for h in whole["hits"]] == [files[0], files[2]]
