"""Experiment (not used by the product): a columnar flatten of FHIR NDJSON with Arrow's JSON reader and DuckDB,
measured against the row-wise flatteners of ``synthfactory.ingest.fhir_ndjson``.

    .venv/bin/python bench/experiments/columnar_flatten.py                       # 500k extract (bench cache)
    .venv/bin/python bench/experiments/columnar_flatten.py --extract DIR --check-lines 5000 --block 8000

Question: can a block-at-a-time flatten in C reach the ingest issue's 100k resources/s on 2 cores, with
exactly the rows of the row-wise path? Here a block of lines is parsed by ``pyarrow.json`` against an
explicit schema of the elements a table reads (strict: another JSON type refuses the block), then
flattened and keyed (the salted HMAC, in SQL from the key's pads) by one DuckDB query; the references
are keyed once per distinct value in Python. A block is taken only when every resource has the plain shape
whose rows equal the row-wise flattener's; otherwise (invalid JSON or UTF-8, a modifierExtension,
NaN/Infinity, a blank line, two objects on a line, a reference other than ``Type/id``, a partial or
out-of-range date, a null inside a list, ...) it returns None, and a product would hand the block to the
row-wise path. Parsing runs on a helper thread, one block ahead of the flatten.

Answer (2026-11-23, this 2-core machine, 500k-resource bench extract, four runs): the rows equal the row-wise
ones on this extract, on clinosim (1,700 patients) and on carebundle (3,000 patients), and every hostile shape
in tests/bench/test_columnar_experiment.py is refused. Arrow's JSON reader costs about 9.5 us of CPU per
Observation (~925 bytes; orjson ~4 us) and the DuckDB query about 7 us, so the pipeline gives 69k-96k
Observations/s wall and 41k-56k/CPU-s, *before* the Parquet write, identifiers, quarantine, duplicate
checks and sampled validation that the product's 50.7k resources/s (46.8k/CPU-s) include. It buys the
second core, not CPU efficiency, and would not reach 100k/s once complete; not adopted. Wired into the
ingest session once (parse one block ahead on a helper thread, every output and the report identical to
the row-wise path's on the bench extract), it gave 57.3k resources/s against 46.9k row-wise at 500k
(`ingest_bench.py --sizes 500000`, both engines in the same run), for more CPU (12.7 s vs 11.5 s) and more
memory (peak RSS 492 vs 389 MiB); that change was reverted. Two divergences it
found on the way, both guarded here: Arrow's reader accepts NaN/Infinity and does not check UTF-8, orjson
refuses both.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from synthfactory.ingest.normalize import SYSTEM_RANK, SYSTEM_SHORT
from synthfactory.ingest.schemas import TABLES

# --------------------------------------------------------------------------------------------------
# What Arrow parses: only the elements the flatteners read (everything else is skipped unparsed)
# --------------------------------------------------------------------------------------------------
_STR = pa.string()
_CODING = pa.struct([("system", _STR), ("code", _STR), ("display", _STR)])
_CC = pa.struct([("coding", pa.list_(_CODING)), ("text", _STR)])
_REF = pa.struct([("reference", _STR)])
_PERIOD = pa.struct([("start", _STR), ("end", _STR)])
_QTY = pa.struct([("value", pa.float64()), ("unit", _STR), ("code", _STR)])
_IDENT = pa.list_(pa.struct([("value", _STR)]))
_VALUES = [("valueQuantity", _QTY), ("valueCodeableConcept", _CC), ("valueString", _STR),
           ("valueBoolean", pa.bool_()), ("valueInteger", pa.int64())]

PARSE_SCHEMAS: dict[str, pa.Schema] = {
    "Encounter": pa.schema([
        ("resourceType", _STR), ("id", _STR), ("identifier", _IDENT), ("status", _STR),
        ("class", pa.struct([("code", _STR)])), ("type", pa.list_(_CC)), ("subject", _REF),
        ("period", _PERIOD), ("actualPeriod", _PERIOD)]),
    "Condition": pa.schema([
        ("resourceType", _STR), ("id", _STR), ("identifier", _IDENT), ("clinicalStatus", _CC), ("code", _CC),
        ("subject", _REF), ("encounter", _REF), ("context", _REF), ("onsetDateTime", _STR),
        ("onsetPeriod", _PERIOD)]),
    "Observation": pa.schema([
        ("resourceType", _STR), ("id", _STR), ("identifier", _IDENT), ("status", _STR),
        ("category", pa.list_(_CC)), ("code", _CC), ("subject", _REF), ("encounter", _REF), ("context", _REF),
        ("effectiveDateTime", _STR), ("effectivePeriod", _PERIOD), ("effectiveInstant", _STR), *_VALUES,
        ("component", pa.list_(pa.struct([("code", _CC), *_VALUES])))]),
}
COLUMNAR_TYPES = tuple(PARSE_SCHEMAS)

#: the bytes that may precede a NaN/Inf literal in a value position
_BEFORE_VALUE = np.frombuffer(b":,[- \t\r", np.uint8)
#: a reference the columnar path keys itself: ``Type/id`` of the expected type (no URL, version, contained or
#: urn:uuid reference: those go the row-wise way)
_REF_RE = {t: re.compile(re.escape(t) + r"/[^/#][^/]*") for t in ("Patient", "Encounter")}


# --------------------------------------------------------------------------------------------------
# SQL
# --------------------------------------------------------------------------------------------------
def _case(mapping: dict[str, Any], default: str) -> str:
    whens = " ".join(f"WHEN '{k}' THEN {v!r}" if isinstance(v, str) else f"WHEN '{k}' THEN {v}"
                     for k, v in mapping.items())
    return f"CASE s {whens} ELSE {default} END"


_TS_RE = r"\d{4}-\d{2}-\d{2}(T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?(Z|[+-](0\d|1[0-4]):[0-5]\d))?"


def _macros(ipad: bytes, opad: bytes) -> list[str]:
    hmac = f"left(sha256(unhex('{opad.hex()}') || unhex(sha256(unhex('{ipad.hex()}') || encode(m)))), 32)"
    return [
        # the salted HMAC of "Type/id" (synthfactory.keys.Keyer.key), from the key's pads
        f"CREATE OR REPLACE MACRO sf_hmac(m) AS {hmac}",
        f"CREATE OR REPLACE MACRO sf_rank(s) AS {_case(SYSTEM_RANK, '99')}",
        f"CREATE OR REPLACE MACRO sf_short(s) AS {_case(SYSTEM_SHORT, 's')}",
        # a list with a null element (the row-wise flattener would fail on it)
        "CREATE OR REPLACE MACRO sf_has_null(l) AS coalesce(len(l) <> list_count(l), false)",
        # the preferred coding (normalize.concept): the single one, else the first of the best rank
        "CREATE OR REPLACE MACRO sf_best(c) AS CASE WHEN len(c) = 1 THEN c[1] WHEN len(c) > 1 THEN "
        "c[list_position(list_transform(c, lambda x: sf_rank(x.system)), list_min(list_transform(c, lambda x: sf_rank(x.system))))] END",
        "CREATE OR REPLACE MACRO sf_concept_ok(cc) AS NOT sf_has_null(cc.coding)",
        # normalize.first_code
        "CREATE OR REPLACE MACRO sf_first(cc) AS CASE WHEN len(cc.coding) > 0 THEN cc.coding[1].code ELSE cc.text END",
        # a full FHIR date or dateTime -> timestamptz (session time zone UTC); NULL when not that shape
        f"CREATE OR REPLACE MACRO sf_ts(s) AS CASE WHEN regexp_full_match(s, '{_TS_RE}') AND s[1:4] >= '0001' "
        "THEN TRY_CAST(s AS TIMESTAMPTZ) END",
        "CREATE OR REPLACE MACRO sf_ts_ok(s) AS s IS NULL OR sf_ts(s) IS NOT NULL",
        # encounter, else context (an encounter element without reference next to a context is ambiguous)
        "CREATE OR REPLACE MACRO sf_enc(e, c) AS CASE WHEN e IS NOT NULL AND e.reference IS NOT NULL THEN e.reference "
        "WHEN e IS NULL THEN c.reference END",
        "CREATE OR REPLACE MACRO sf_enc_ok(e, c) AS NOT (e IS NOT NULL AND e.reference IS NULL AND c IS NOT NULL)",
        # the value of an Observation or component (fhir_ndjson obs_value): NULL when it has none
        "CREATE OR REPLACE MACRO sf_val(vq, vcc, vs, vb, vi) AS CASE "
        " WHEN vq IS NOT NULL THEN (CASE WHEN vq.value IS NOT NULL THEN struct_pack(num := vq.value,"
        "   unit := CASE WHEN vq.unit IS NULL OR vq.unit = '' THEN vq.code ELSE vq.unit END, code := NULL::VARCHAR) END)"
        " WHEN vcc IS NOT NULL THEN (CASE WHEN sf_first(vcc) IS NOT NULL THEN struct_pack(num := NULL::DOUBLE,"
        "   unit := NULL::VARCHAR, code := sf_first(vcc)) END)"
        " WHEN vs IS NOT NULL THEN struct_pack(num := NULL::DOUBLE, unit := NULL::VARCHAR, code := vs)"
        " WHEN vb IS NOT NULL THEN struct_pack(num := NULL::DOUBLE, unit := NULL::VARCHAR,"
        "   code := CASE WHEN vb THEN 'true' ELSE 'false' END)"
        " WHEN vi IS NOT NULL THEN struct_pack(num := vi::DOUBLE, unit := NULL::VARCHAR, code := NULL::VARCHAR) END",
        "CREATE OR REPLACE MACRO sf_val_ok(vcc) AS vcc IS NULL OR NOT sf_has_null(vcc.coding)",
        # NaN, infinities and -0.0 (orjson refuses the first two and reads an integer -0 as 0)
        "CREATE OR REPLACE MACRO sf_num_ok(x) AS x IS NULL OR (isfinite(x) AND NOT (x = 0 AND signbit(x)))",
    ]


_COMMON_OK = ("resourceType = '{rtype}' AND id IS NOT NULL AND id <> '' AND NOT sf_has_null(identifier)")

# Each query gives the table's columns with the references as strings (``sref``/``eref``, keyed in Python
# on their distinct values) and ``ok``: the resource has the plain shape (see the module docstring).
_SQL = {
    "Encounter": f"""
SELECT sf_hmac('Encounter/' || id) AS encounter_key, subject.reference AS sref, status,
       "class".code AS class_code,
       CASE WHEN len("type") > 0 AND len("type"[1].coding) > 0 THEN "type"[1].coding[1].code END AS type_code,
       coalesce(CASE WHEN len("type") > 0 AND len("type"[1].coding) > 0 THEN "type"[1].coding[1].display END,
                CASE WHEN len("type") > 0 THEN "type"[1].text END) AS type_display,
       sf_ts(period.start) AS start, sf_ts(period."end") AS "end",
       ({_COMMON_OK.format(rtype="Encounter")}
        AND NOT sf_has_null("type") AND (len("type") IS NULL OR len("type") = 0
                                          OR NOT sf_has_null("type"[1].coding))
        AND sf_ts_ok(period.start) AND sf_ts_ok(period."end")
        AND NOT (actualPeriod IS NOT NULL AND period.start IS NULL AND period."end" IS NULL)) AS ok
FROM buf ORDER BY rn""",
    "Condition": f"""
WITH r AS (
  SELECT id, subject.reference AS sref, sf_enc(encounter, context) AS eref, sf_best(code.coding) AS best,
         code.text AS text, sf_first(clinicalStatus) AS clinical_status,
         coalesce(onsetDateTime, onsetPeriod.start) AS onset_s, rn,
         ({_COMMON_OK.format(rtype="Condition")} AND sf_enc_ok(encounter, context)
          AND sf_concept_ok(code) AND sf_concept_ok(clinicalStatus)) AS ok
  FROM buf)
SELECT sf_hmac('Condition/' || id) AS condition_key, sref, eref, sf_short(best.system) AS code_system,
       best.code AS code, CASE WHEN best.display IS NULL OR best.display = '' THEN text ELSE best.display END AS display,
       clinical_status, sf_ts(onset_s) AS onset, ok AND sf_ts_ok(onset_s) AS ok
FROM r ORDER BY rn""",
    # own rows and component rows (a resource's components with a value, by index, then its own row, which is
    # absent when it has components and no value of its own), each with ``emit`` (the row-wise path writes it)
    "Observation": f"""
WITH r AS (
  SELECT rn, id, subject.reference AS sref, sf_enc(encounter, context) AS eref,
    CASE WHEN len(category) > 0 THEN (CASE WHEN len(category[1].coding) > 0 THEN category[1].coding[1].code
                                           ELSE category[1].text END) END AS category,
    sf_best(code.coding) AS best, code.text AS text,
    CASE WHEN effectiveDateTime IS NOT NULL THEN effectiveDateTime WHEN effectivePeriod.start IS NOT NULL
         THEN effectivePeriod.start ELSE effectiveInstant END AS eff_s,
    sf_val(valueQuantity, valueCodeableConcept, valueString, valueBoolean, valueInteger) AS v, component,
    ({_COMMON_OK.format(rtype="Observation")} AND sf_enc_ok(encounter, context)
     AND NOT sf_has_null(category) AND (len(category) IS NULL OR len(category) = 0
                                         OR NOT sf_has_null(category[1].coding))
     AND sf_concept_ok(code) AND sf_val_ok(valueCodeableConcept) AND sf_num_ok(valueQuantity.value)
     AND NOT sf_has_null(component)) AS ok
  FROM buf),
c AS (SELECT rn, id, sref, eref, category, eff_s, unnest(component) AS c, generate_subscripts(component, 1) - 1 AS sub
      FROM r WHERE len(component) > 0),
rows AS (
  SELECT rn, sub, id || '#' || sub::VARCHAR AS kid, sref, eref, category, sf_best(c.code.coding) AS best,
         c.code.text AS text, eff_s,
         sf_val(c.valueQuantity, c.valueCodeableConcept, c.valueString, c.valueBoolean, c.valueInteger) AS v,
         (c IS NOT NULL AND sf_concept_ok(c.code) AND sf_val_ok(c.valueCodeableConcept)
          AND sf_num_ok(c.valueQuantity.value)) AS ok,
         sf_val(c.valueQuantity, c.valueCodeableConcept, c.valueString, c.valueBoolean, c.valueInteger)
           IS NOT NULL AS emit
  FROM c
  UNION ALL
  SELECT rn, 1 << 30, id, sref, eref, category, best, text, eff_s, v, ok,
         NOT (coalesce(len(component) > 0, false) AND v IS NULL) FROM r
)
SELECT sf_hmac('Observation/' || kid) AS observation_key, sref, eref, category,
       sf_short(best.system) AS code_system, best.code AS code,
       CASE WHEN best.display IS NULL OR best.display = '' THEN text ELSE best.display END AS display,
       sf_ts(eff_s) AS effective, v.num AS value_num, v.unit AS unit, v.code AS value_code,
       ok AND sf_ts_ok(eff_s) AS ok, emit
FROM rows ORDER BY rn, sub""",
}

#: table -> (patient reference column, encounter reference column or None)
_REFS = {"Encounter": ("sref", None), "Condition": ("sref", "eref"), "Observation": ("sref", "eref")}


class Columnar:
    """Flatten blocks of NDJSON lines of one of :data:`COLUMNAR_TYPES` into their table (see the module
    docstring). One per ingest session; :meth:`parse` may run on a helper thread, :meth:`flatten` on one."""

    def __init__(self, salt: bytes, key: Callable[[str, str], str], threads: int = 1):
        from synthfactory.keys import Keyer

        ipad, opad = Keyer(salt).hmac_pads()
        self.key = key
        self.con = duckdb.connect(config={"threads": max(int(threads), 1)})
        self.con.execute("SET TimeZone = 'UTC'")
        for sql in _macros(ipad, opad):
            self.con.execute(sql)
        self._read = pj.ReadOptions(use_threads=False, block_size=1 << 20)
        self._parse = {t: pj.ParseOptions(explicit_schema=s, unexpected_field_behavior="ignore")
                       for t, s in PARSE_SCHEMAS.items()}
        self._ref_cache: dict[str, dict[str, str]] = {"Patient": {}, "Encounter": {}}
        # the SQL key must be the Keyer's key, to the character
        probes = [("Patient", "probe-1"), ("Observation", "x#0"), ("Encounter", "\u00e9t\u00e9 \U0001f600")]
        got = self.con.execute("SELECT sf_hmac(unnest($m))", {"m": [f"{t}/{i}" for t, i in probes]}).fetchall()
        if [g[0] for g in got] != [key(t, i) for t, i in probes]:
            raise RuntimeError("the SQL HMAC does not match the Keyer")

    def close(self) -> None:
        try:
            self.con.close()
        except Exception:  # noqa: BLE001
            pass

    def parse(self, rtype: str, lines: list) -> pa.Table | None:
        """Arrow table of the block (one row per line, in order, plus ``rn``), or None when the block must go
        the row-wise way: a line over the size limit (None) or not starting with ``{``, a modifierExtension,
        a ``NaN``/``Inf`` literal, invalid JSON or UTF-8, an element of another JSON type than the schema's."""
        if not lines or None in lines:
            return None
        buf = b"\n".join(lines)
        if buf[:1] != b"{" or b'"modifierExtension"' in buf:
            return None
        try:  # Arrow's reader does not check UTF-8 (orjson does, per line)
            buf.decode("utf-8")
        except UnicodeDecodeError:
            return None
        arr = np.frombuffer(buf, np.uint8)
        nl = np.flatnonzero(arr == 10)
        if len(nl) != len(lines) - 1 or (len(nl) and not (arr[nl + 1] == 123).all()):
            return None  # every line starts with "{": no blank or whitespace-only line
        for a, b, c in ((78, 97, 78), (73, 110, 102)):  # NaN, Inf(inity): Arrow reads them, orjson does not
            p = np.flatnonzero(arr[1:-2] == a) + 1  # in a value position: after : , [ - or blank
            if len(p) and ((arr[p + 1] == b) & (arr[p + 2] == c) & np.isin(arr[p - 1], _BEFORE_VALUE)).any():
                return None
        try:
            tb = pj.read_json(io.BytesIO(buf), read_options=self._read, parse_options=self._parse[rtype])
        except Exception:  # noqa: BLE001 - the row-wise path says which line and why
            return None
        if tb.num_rows != len(lines):  # two objects on a line (every line gives at least one row)
            return None
        return tb.append_column("rn", pa.array(np.arange(len(lines), dtype=np.int64)))

    def _ref_keys(self, col: Any, rtype: str) -> pa.Array | None:
        """Keys of a column of ``Type/id`` references (computed once per distinct reference), or None when one
        is not of that plain form."""
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if col.null_count == len(col):
            return pa.nulls(len(col), pa.string())
        enc = col.dictionary_encode()
        cache = self._ref_cache[rtype]
        match = _REF_RE[rtype].fullmatch
        key = self.key
        cut = len(rtype) + 1
        keys = []
        for ref in enc.dictionary.to_pylist():
            k = cache.get(ref)
            if k is None:
                if match(ref) is None:
                    return None
                k = key(rtype, ref[cut:])
                if len(cache) >= 1 << 18:
                    cache.clear()
                cache[ref] = k
            keys.append(k)
        return pc.take(pa.array(keys, pa.string()), enc.indices)

    def flatten(self, rtype: str, tb: pa.Table) -> pa.Table | None:
        """The table's rows for a parsed block, in the row-wise order and the table's schema; None when a
        resource is not of the plain shape (see the module docstring)."""
        con = self.con
        con.register("buf", tb)
        try:
            out = con.sql(_SQL[rtype]).to_arrow_table()
        finally:
            con.unregister("buf")
        ok = out.column("ok")
        if ok.null_count or (len(ok) and not pc.all(ok).as_py()):
            return None
        if "emit" in out.column_names:
            out = out.filter(out.column("emit"))
        pref, eref = _REFS[rtype]
        pk = self._ref_keys(out.column(pref), "Patient")
        if pk is None:
            return None
        out = out.set_column(out.column_names.index(pref), "patient_key", pk)
        if eref is not None:
            ek = self._ref_keys(out.column(eref), "Encounter")
            if ek is None:
                return None
            out = out.set_column(out.column_names.index(eref), "encounter_key", ek)
        schema = TABLES[rtype][1]
        return out.select(schema.names).cast(schema)


# --------------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------------
SALT = b"bench-salt-0123456789abcdef"


def row_wise(rtype: str, lines: list, key: Callable[[str, str], str]) -> pa.Table:
    """The same lines through the product's row-wise flattener."""
    import orjson

    from synthfactory.ingest.fhir_ndjson import _make_flatteners
    from synthfactory.ingest.normalize import timestamp_array

    flat = _make_flatteners(key)[rtype]
    rows: list = []
    for line in lines:
        o = orjson.loads(line)
        rows.extend(flat(o, o["id"]))
    schema = TABLES[rtype][1]
    cols = list(zip(*rows)) if rows else [[] for _ in schema]
    return pa.table([timestamp_array(list(c), f.type) if pa.types.is_timestamp(f.type) else pa.array(c, type=f.type)
                     for c, f in zip(cols, schema)], schema=schema)


def check(col: Columnar, rtype: str, lines: list, key: Callable[[str, str], str]) -> str:
    """``equal``, ``refused`` (a product would flatten the block row-wise) or ``DIFFERENT`` (a defect)."""
    tb = col.parse(rtype, lines)
    out = col.flatten(rtype, tb) if tb is not None else None
    if out is None:
        return "refused at parse" if tb is None else "refused at flatten"
    return "equal" if out.equals(row_wise(rtype, lines, key)) else "DIFFERENT"


def throughput(col: Columnar, path: Path, rtype: str, block_lines: int) -> dict:
    from synthfactory.ingest.fhir_ndjson import line_blocks, prefetched

    def blocks():
        acc: list = []
        with open(path, "rb") as fh:
            for b in line_blocks(prefetched(fh)):
                acc.extend(b)
                if len(acc) >= block_lines:
                    yield acc
                    acc = []
        if acc:
            yield acc

    pool = ThreadPoolExecutor(1)
    t, c = time.perf_counter(), time.process_time()
    n = rows = refused = 0
    pending = None
    try:
        for lines in itertools.chain(blocks(), [None]):
            fut = pool.submit(col.parse, rtype, lines) if lines is not None else None
            if pending is not None:
                tb = pending.result()
                out = col.flatten(rtype, tb) if tb is not None else None
                if out is None:
                    refused += 1
                else:
                    rows += out.num_rows
            pending = fut
            n += len(lines or ())
    finally:
        pool.shutdown()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"resource_type": rtype, "resources": n, "rows": rows, "blocks_refused": refused,
            "seconds": round(wall, 3), "resources_per_s": round(n / wall), "resources_per_cpu_s": round(n / cpu)}


def main(argv: list[str] | None = None) -> dict:
    from synthfactory.keys import Keyer
    from synthfactory.ingest.normalize import fast_key

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extract", type=Path,
                    default=Path(__file__).resolve().parents[1] / ".cache" / "ingest" / "synthetic-s42-n500000")
    ap.add_argument("--check-lines", type=int, default=5000)
    ap.add_argument("--block", type=int, default=8000, help="lines per block")
    ap.add_argument("--no-throughput", action="store_true")
    a = ap.parse_args(argv)
    key = fast_key(Keyer(SALT))
    col = Columnar(SALT, key)
    report: dict = {"extract": str(a.extract), "equal_to_row_wise": {}, "throughput": []}
    for rtype in COLUMNAR_TYPES:
        path = a.extract / f"{rtype}.ndjson"
        if not path.exists():
            continue
        with open(path, "rb") as fh:
            lines = [ln.rstrip(b"\n") for ln in itertools.islice(fh, a.check_lines)]
        report["equal_to_row_wise"][rtype] = check(col, rtype, lines, key)
        if not a.no_throughput:
            report["throughput"].append(throughput(col, path, rtype, a.block))
    col.close()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "include"))
    main()
