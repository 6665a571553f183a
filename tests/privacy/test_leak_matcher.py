"""The compact leak matcher (salted hashes, built once) finds exactly what the reference implementation
(token-tuple dict, built per call) finds: same counts, same hits, same kinds and fingerprints, on a corpus of
hits and near misses and on random token soups where identifiers overlap and collide."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfactory.privacy.leak import (Identifier, LeakMatcher, _leak_scan_reference, identifier_index_uri,
                                       leak_scan, load_identifiers, write_identifier_index)

UUID = "3f2b8c1e-9a4d-4e6f-8b1a-2c3d4e5f6a7b"
HMAC = "0123456789abcdef0123456789abcdef"

IDENTS = [
    Identifier(UUID, "id"), Identifier("Amy Jo Ward", "name"), Identifier("Ward Amy", "name"), Identifier("Emet Dummett", "name"),
    Identifier("Ward", "family"), Identifier("May", "family"), Identifier("Zoë Ørsted", "name"),
    Identifier("İpek Şahin", "name"), Identifier("(555) 123-4567", "telecom"), Identifier("555 12", "telecom"),
    Identifier("123 Main St", "address"), Identifier("MRN-00042", "identifier"), Identifier("42", "identifier"),
    Identifier("to", "id"), Identifier("-", "id"), Identifier("Li", "given"), Identifier("Anne", "given"),
    Identifier("x\x1f", "id"), Identifier("  Bob  ", "name"), Identifier("１２３４５６７", "telecom"),
    Identifier("Amy Lee Ward", "name"), Identifier("Annabel Smith", ""),
    HMAC, "a_b c", "Straße 7", "ǅemal Ǆ", Identifier("42 the", "id"), Identifier("１２", "identifier"),
    Identifier("7 to", "id"),
]

TEXTS = [
    # hits: whole names in sentences, reordered names, ids inside references, glued phone digits
    "note: patient AMY  jo ward seen; Ward, Amy; amy ward again; Patient/" + UUID,
    "call 5551234567 or (555) 123 4567; mrn 00042 MRN-00042; 123 main st",
    "Zoë Ørsted and ZOË ØRSTED; i̇pek şahin; İpek Şahin; straße 7; ǆemal ǆ",
    # near misses: partial words, split tokens, other order of a two-token name, digits in other runs
    "Annabelle Smithson; Emet-Dummettx; dummett emet; 555 1234 567; 55512345678; Wardrobe amyjo",
    "the may ward report: 42 rows, to be seen; li; anne; bob; a b c; a_b_c; x",
    HMAC.upper() + " " + "１２３４５６７" + " and 1234567",
]


def _files(tmp_path):
    out = []
    for i, text in enumerate(TEXTS):
        p = tmp_path / f"f{i}.txt"
        p.write_text(text, encoding="utf-8")
        out.append(str(p))
    p = tmp_path / "cells.parquet"  # cells never join: "amy jo" | "ward" is no hit, "amy jo ward" is
    pq.write_table(pa.table({"a": ["amy jo", "x", "Amy Jo Ward"], "b": ["ward", None, "y"],
                             "Emet Dummett": [1, 2, 3]}), p)
    out.append(str(p))
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"k": "ward amy", "n": [555, 1234567], "z": "Zoe Orsted"}))
    out.append(str(p))
    return out


@pytest.fixture()
def store():
    from synthfactory.storage import Store

    return Store()


@pytest.mark.parametrize("kw", [{}, {"common_words": False}, {"min_len": 2}, {"min_len": 8},
                                {"vocabulary": {("ward",), ("smith",)}}])
def test_compact_matcher_agrees_with_reference(tmp_path, store, kw):
    files = _files(tmp_path)
    ref = _leak_scan_reference(files, IDENTS, store, fingerprints=True, **kw)
    new = leak_scan(files, IDENTS, store, fingerprints=True, **kw)
    assert new == ref
    assert ref["hits"] and not ref["clean"]  # the corpus does hit
    # "amy ward" is a form of both "Amy Jo Ward" and "Amy Lee Ward": it reports as the first listed
    assert ref["hits"][0]["count"] >= 3  # the uuid, "Amy Jo Ward" (twice), "Ward Amy" (and "ward")
    # one matcher, built once, reused file by file, gives the same as one scan of all
    matcher = LeakMatcher.from_identifiers(IDENTS, **kw)
    per_file = [leak_scan([f], matcher, store, fingerprints=True)["hits"] for f in files]
    assert [h for hs in per_file for h in hs] == ref["hits"]


def test_compact_matcher_agrees_on_random_token_soups(tmp_path, store):
    rng = random.Random(7)
    words = ["ann", "ward", "amy", "jo", "lee", "5", "55", "123", "4567", "may", "to", "the", "ørsted", "x1"]
    kinds = ["name", "family", "given", "id", "telecom", "address", "identifier", None]
    for trial in range(12):
        idents = []
        for _ in range(rng.randint(20, 60)):
            n = rng.choice([1, 1, 2, 2, 3, 4])
            value = rng.choice([" ", "-", ", ", "."]).join(rng.choice(words) for _ in range(n))
            k = rng.choice(kinds)
            idents.append(Identifier(value, k) if k else value)
        text = " ".join(rng.choice(words + ["zz", "wardx"]) + rng.choice([" ", ",", "-", ""])
                        for _ in range(400))
        f = tmp_path / f"soup{trial}.txt"
        f.write_text(text)
        kw = {"min_len": rng.choice([1, 4, 6, 9])}
        ref = _leak_scan_reference([str(f)], idents, store, fingerprints=True, **kw)
        assert leak_scan([str(f)], idents, store, fingerprints=True, **kw) == ref
        assert ref["hits"]


def test_matcher_from_ingest_index_agrees_and_is_written_once(tmp_path, store):
    files = _files(tmp_path)
    ids_uri = str(tmp_path / "identifiers.parquet")
    plain = [i for i in IDENTS if isinstance(i, Identifier) and i.kind]
    pq.write_table(pa.table({"value": [str(i) for i in plain] + [str(plain[0])],  # a repeated row is dropped
                             "kind": [i.kind for i in plain] + [plain[0].kind]}), ids_uri)
    keys = [HMAC, "fedcba9876543210fedcba9876543210"]
    ref = _leak_scan_reference(files, [*load_identifiers(ids_uri, store), *keys], store, fingerprints=True)
    matcher = LeakMatcher.for_ingest(ids_uri, store, extra=keys)  # builds and writes the index
    idx = identifier_index_uri(ids_uri)
    mtime = (tmp_path / "identifiers.index.parquet").stat().st_mtime_ns
    assert matcher.scan(files, store, fingerprints=True) == ref
    # the index holds hashes, never the values
    raw = (tmp_path / "identifiers.index.parquet").read_bytes().lower()
    assert b"dummett" not in raw and UUID.encode() not in raw
    again = LeakMatcher.for_ingest(ids_uri, store, extra=keys)  # reused, not rebuilt
    assert (tmp_path / "identifiers.index.parquet").stat().st_mtime_ns == mtime
    assert again.scan(files, store, fingerprints=True) == ref
    # a changed identifier list makes the stale index be rebuilt
    pq.write_table(pa.table({"value": ["Emet Dummett"], "kind": ["name"]}), ids_uri)
    third = LeakMatcher.for_ingest(ids_uri, store)
    assert third.scan(files, store)["hits"] == _leak_scan_reference(files, load_identifiers(ids_uri, store),
                                                                    store)["hits"]
    assert idx.endswith("identifiers.index.parquet") and write_identifier_index(ids_uri, store) == idx


@pytest.mark.parametrize("piece,window", [(7, 3), (64, 5), (1 << 20, 1)])
def test_streamed_scan_equals_whole_file_scan(tmp_path, store, monkeypatch, piece, window):
    """A file is matched in pieces (raw text cut after newlines, Parquet per value list) and token windows that
    carry the last L-1 tokens over: the counts equal one match over the whole token list, with identifiers
    spanning piece and window borders, decimals, gzip, a long line, and a corrupt Parquet file."""
    import gzip

    import synthfactory.privacy.leak as leak

    rng = random.Random(11)
    words = ["ann", "ward", "amy", "jo", "lee", "42", "55", "123", "4567", "may", "the", "ørsted", "3.42", "42.0"]
    idents = IDENTS + [Identifier("amy jo lee ward", "name"), Identifier("42 55 123", "identifier")]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) for _ in range(300)]
    files = _files(tmp_path)
    (tmp_path / "soup.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "soup.ndjson.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    (tmp_path / "oneline.txt").write_text(" ".join(lines))  # no newline at all
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + "amy jo ward\n".encode() * 20 + b"PAR1")
    files += [str(tmp_path / n) for n in ("soup.ndjson", "soup.ndjson.gz", "oneline.txt", "bad.parquet")]
    matcher = LeakMatcher.from_identifiers(idents)
    whole = [matcher._match(*leak._file_tokens(f, store)) for f in files]
    monkeypatch.setattr(leak, "RAW_PIECE_BYTES", piece)
    monkeypatch.setattr(leak, "MATCH_WINDOW_TOKENS", window)
    streamed = [matcher.match_file(f, store)[0] for f in files]
    assert streamed == whole
    assert sum(sum(c.values()) for c in whole) > 50  # the corpus hits, across borders too
    assert leak_scan(files, matcher, store) == _leak_scan_reference(files, idents, store)


def test_the_index_of_chunked_identifiers_is_built_batch_by_batch(monkeypatch):
    """A 2M-patient identifier list is ~2.8 GB of text, past a string array's 32-bit offsets: the column is never
    combined into one array (each batch is taken from its own range of the chunks). The index is the same whatever
    the chunks, with repeated identifiers dropped across chunk and batch boundaries (the overflow itself needs
    > 2 GiB of text to show: it was found by the 2M-patient scale run)."""
    import pyarrow as pa

    from synthfactory.privacy import leak

    monkeypatch.setattr(leak, "_BATCH", 3)
    values = ["Amy Jo Ward", "+1 (555) 010-2233", "c31b017e-4435-5833-9792-b3a5c44178d1", "A3665C72", None,
              "Amy Jo Ward", "Ward, Amy", "12 Main Street", "A3665C72", "Bo Li"]
    kinds = ["name", "phone", "id", "identifier", "id", "name", "name", "address", "identifier", "name"]
    whole = leak.compact_identifiers(pa.array(values, pa.string()), pa.array(kinds, pa.string()), "s" * 16, dedup=True)
    assert whole.num_rows > len(set(v for v in values if v))  # identifiers and their match variants
    assert int((whole.column("src").to_numpy() < 0).sum()) == len(set(v for v in values if v))  # repeats dropped
    for cut in (1, 4, 6):
        chunked = leak.compact_identifiers(pa.chunked_array([pa.array(values[:cut]), pa.array(values[cut:])]),
                                           pa.chunked_array([pa.array(kinds[:cut]), pa.array(kinds[cut:])]),
                                           "s" * 16, dedup=True)
        assert chunked.equals(whole), cut
