"""Sharded NDJSON ingest: the same outputs as :func:`.fhir_ndjson.ingest_extract`, computed by workers.

Three steps, each a pipeline stage (:mod:`synthfactory.pipeline`) and, in the DAG, a task: ``plan`` ->
``ingest_shard`` mapped over the plan's shards (Airflow's dynamic task mapping) -> ``merge``.

* :func:`plan_shards` reads every file of the extract once (its sha256, its size and the byte offsets of line
  ends about every ``piece_bytes``) and cuts the files, in ingest's processing order (Patient first), into at
  most ``n`` shards of about equal bytes. A shard is a list of segments ``(file, byte range, first line
  number)``; a cut is always just after a newline, so no line is split and each line keeps the number it has
  in its file. Deterministic: the same extract and ``n`` give the same plan.
* :func:`ingest_shard` flattens its segments into shard-scoped Parquet parts (``shards/<i>/<table>.parquet``,
  through an :class:`~.session.IngestSession`) and writes ``decisions.parquet``: one record per line read
  with what can be decided from the line alone (its quarantine reason when it is bad on its own: invalid
  JSON, missing id ...; its id; a modifierExtension; the validation result when it may be validated; the
  flatten's failure reason; the patient keys it references; how many rows it put in each table). Nothing
  that depends on other lines is decided there: rows are written provisionally.
* :func:`merge` replays, in the single-process order (shard by shard, line by line), the decisions that
  depend on the whole extract, exactly as :func:`.fhir_ndjson._ingest_lines` takes them: a duplicate id
  (an earlier *accepted* resource of the type with that id, in any shard), the first
  ``validate_first`` candidates of a type always validated and the sampled ones up to
  ``validate_max_per_type`` (a line the shard did not validate is read again and validated here: rare),
  a reference to a Patient that no shard accepted (``on_dangling``). It then keeps the accepted resources'
  rows of each part, writes the quarantine in line order, merges the identifiers (first kind seen wins, as
  in one process) and writes the report with the same counts.

So the tables hold the same rows (row order within a table can differ), the quarantine the same records in
the same order, the identifiers the same (value, kind) pairs, the report the same counts. Rows are flattened
by the Python path in the shards (the compiled flatten takes the duplicate and dangling decisions itself),
which writes the same rows: tests/ingest/test_sharded.py compares both against a one-process ingest.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import time
import zlib
from typing import Any, Iterable, Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from synthfactory.fhir.normalize import (BadResource, ExtractError, collect_identifiers, fast_key,
                                         has_modifier_extension)
from synthfactory.fhir.views import BUILTIN_BY_RESOURCE
from synthfactory.keys import Keyer
from synthfactory.storage import Store, is_s3, join

from . import native as native_flatten
from .fhir_ndjson import _OVERSIZE, READ_BLOCK, discover_ndjson_files, line_blocks, prefetched, wanted_types
from .schemas import IDENTIFIERS_SCHEMA
from .session import (ALWAYS_VALIDATE_FIRST, DEFAULT_MAX_LINE_BYTES, DEFAULT_RESOURCES, IDENTIFIER_CHUNK_ROWS,
                      IDENTIFIERS_FILE, QUARANTINE_FILE, REPORT_FILE, IngestSession, _commit, _Identifiers,
                      gc_paused, validation_failure)

log = logging.getLogger(__name__)

__all__ = ["plan_shards", "ingest_shard", "merge", "DECISIONS_FILE", "PIECE_BYTES"]

DECISIONS_FILE = "decisions.parquet"
#: a cut point (the end of a line) about every this many bytes of a file
PIECE_BYTES = 1 << 20
_LOG_FLUSH = 100_000

_DECISION_FIELDS = [
    ("seg", pa.int32()), ("line", pa.int64()), ("rid", pa.string()), ("reason", pa.string()),
    ("modext", pa.bool_()), ("hsel", pa.bool_()), ("vdone", pa.bool_()), ("vres", pa.string()),
    ("freason", pa.string()), ("pks", pa.list_(pa.string()))]


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------
def _open_decompressed(store: Store, uri: str, name: str) -> tuple[Any, Any]:
    raw = store.open_read(uri)
    return raw, (gzip.GzipFile(fileobj=raw) if name.endswith(".gz") else raw)


def _scan_file(store: Store, name: str, uri: str, piece_bytes: int) -> dict:
    """sha256 of the file's bytes, its (decompressed) size and line count, and its pieces
    ``[start, end, first_line]`` cut just after a newline about every ``piece_bytes`` bytes."""
    h = hashlib.sha256()

    class _Hashing:
        def __init__(self, raw: Any):
            self.raw = raw

        def read(self, n: int = -1) -> bytes:
            b = self.raw.read(n)
            h.update(b)
            return b

    raw = store.open_read(uri)
    hashed = _Hashing(raw)
    stream: Any = gzip.GzipFile(fileobj=hashed) if name.endswith(".gz") else hashed
    block = max(1, min(READ_BLOCK, piece_bytes))
    pieces: list[list[int]] = []
    pos = lines = 0
    start, start_line = 0, 0
    try:
        for chunk in iter(lambda: stream.read(block), b""):
            n = chunk.count(b"\n")
            end = pos + len(chunk)
            if end - start >= piece_bytes and n:
                last = chunk.rfind(b"\n")
                cut = pos + last + 1
                cut_lines = lines + n  # every newline of this chunk is at or before `last`
                pieces.append([start, cut, start_line])
                start, start_line = cut, cut_lines
            pos, lines = end, lines + n
        while raw.read(1 << 20):  # every byte of the file in its hash (after a trailing gzip member)
            pass
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise ExtractError(f"extract file {name} is not valid gzip or is truncated") from None
    finally:
        raw.close()
    if pos > start or not pieces:
        pieces.append([start, pos, start_line])
    return {"sha256": h.hexdigest(), "size": pos, "lines": lines, "pieces": pieces}


def plan_shards(source_uri: str, store: Store, *, n: int, resources: Iterable[str] = DEFAULT_RESOURCES,
                views: Iterable[Any] = (), piece_bytes: int = PIECE_BYTES) -> dict:
    """The shards of an NDJSON extract (see the module docstring). Returns ``{"files": [...], "skipped":
    {name: reason}, "refused": {name: reason}, "shards": [{"index", "segments": [...]}, ...]}``: at most ``n``
    shards, none empty, in processing order. File names, offsets and hashes only: no content."""
    if n < 1:
        raise ValueError("n must be >= 1")
    wanted, _ = wanted_types(resources, views)
    found, skipped, refused = discover_ndjson_files(str(source_uri), store, wanted)
    if not found:
        raise ExtractError(
            f"extract is empty: no NDJSON file for {', '.join(wanted)} in {source_uri} "
            f"(expected e.g. Patient.ndjson or Patient.ndjson.gz; {len(skipped)} other file(s) ignored"
            f"{f', {len(refused)} refused' if refused else ''})")
    files = []
    for name, uri, rtype in found:
        files.append({"name": name, "uri": uri, "rtype": rtype, **_scan_file(store, name, uri, piece_bytes)})
    total = sum(f["size"] for f in files) or 1
    target = total / n
    shards: list[list[dict]] = [[] for _ in range(n)]
    done = 0
    for fi, f in enumerate(files):
        for start, end, first_line in f["pieces"]:
            k = min(n - 1, int((done + (end - start) / 2) / target))
            done += end - start
            segs = shards[k]
            if segs and segs[-1]["file_index"] == fi and segs[-1]["end"] == start:
                segs[-1]["end"] = end
            else:
                segs.append({"file_index": fi, "file": f["name"], "uri": f["uri"], "rtype": f["rtype"],
                             "start": start, "end": end, "first_line": first_line})
    out = [{"index": i, "segments": segs} for i, segs in enumerate(s for s in shards if s)]
    for f in files:
        del f["pieces"]
    return {"source_uri": str(source_uri), "files": files, "skipped": skipped, "refused": refused, "shards": out}


# --------------------------------------------------------------------------------------------------
# One shard
# --------------------------------------------------------------------------------------------------
class _Limited:
    """``n`` bytes of a stream (after skipping ``skip``), read in blocks."""

    def __init__(self, stream: Any, skip: int, n: int):
        if skip:
            seek = getattr(stream, "seek", None)
            seekable = getattr(stream, "seekable", None)
            if seek is not None and (seekable is None or seekable()) and not isinstance(stream, gzip.GzipFile):
                seek(skip)
            else:
                while skip:
                    b = stream.read(min(skip, READ_BLOCK))
                    if not b:
                        break
                    skip -= len(b)
        self.stream, self.left = stream, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        b = self.stream.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(b)
        return b


def _segment_blocks(store: Store, seg: dict, max_line_bytes: int) -> Iterator[list]:
    start, end = seg["start"], seg["end"]
    if is_s3(seg["uri"]) and not seg["file"].endswith(".gz") and end > start:
        from synthfactory.storage import split_s3

        bucket, key = split_s3(seg["uri"])  # a ranged GET: only the segment's bytes
        raw = stream = store._client().get_object(Bucket=bucket, Key=key,
                                                  Range=f"bytes={start}-{end - 1}")["Body"]._raw_stream
        start = 0
    else:
        raw, stream = _open_decompressed(store, seg["uri"], seg["file"])
    chunks = prefetched(_Limited(stream, start, end - seg["start"]))
    try:
        yield from line_blocks(chunks, max_line_bytes)
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise ExtractError(f"extract file {seg['file']} is not valid gzip or is truncated") from None
    finally:
        chunks.close()
        raw.close()


def session_for(out_uri: str, *, keyer: Keyer, store: Store, resources: Iterable[str], views: Iterable[dict],
                validate_sample_rate: float, engine: str, max_line_bytes: int, value_rules: Any,
                batch_rows: int = 50_000, validate_max_per_type: int = 0, native: bool = True) -> IngestSession:
    return IngestSession(out_uri, keyer=keyer, store=store, resources=resources, views=views,
                         validate_sample_rate=validate_sample_rate, batch_rows=batch_rows, engine=engine,
                         max_line_bytes=max_line_bytes, on_dangling="keep", validate_first=ALWAYS_VALIDATE_FIRST,
                         validate_max_per_type=validate_max_per_type, native=native, value_rules=value_rules)


def ingest_shard(shard: dict, out_uri: str, *, keyer: Keyer, store: Store | None = None,
                 resources: Iterable[str] = DEFAULT_RESOURCES, views: Iterable[dict] = (),
                 validate_sample_rate: float = 0.01, validate_max_per_type: int = 0, engine: str = "fast",
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, value_rules: Any = None, batch_rows: int = 50_000,
                 **_ignored: Any) -> dict:
    """Flatten one shard of a plan into ``out_uri`` (see the module docstring). Returns a small summary."""
    t0 = time.perf_counter()
    store = store or Store()
    resources = list(dict.fromkeys(resources))
    views = list(views or ())
    with gc_paused():
        session = session_for(out_uri, keyer=keyer, store=store, resources=resources, views=views,
                              validate_sample_rate=validate_sample_rate, engine=engine,
                              max_line_bytes=max_line_bytes, value_rules=value_rules, batch_rows=batch_rows,
                              validate_max_per_type=validate_max_per_type)
        tables = list(session.writers)
        log_dir = tempfile.mkdtemp(prefix="synthfactory-shard-") if is_s3(out_uri) else None
        log_local = os.path.join(log_dir, DECISIONS_FILE) if log_dir else join(out_uri, DECISIONS_FILE) + ".partial"
        schema = pa.schema([*_DECISION_FIELDS, *((f"n:{t}", pa.int32()) for t in tables)])
        writer = pq.ParquetWriter(log_local, schema, compression="zstd")
        n_lines = 0
        try:
            cols: dict[str, list] = {f.name: [] for f in schema}
            for si, seg in enumerate(shard["segments"]):
                n_lines += _shard_segment(session, si, seg, cols, tables, writer, schema)
            _flush_log(cols, writer, schema)
            writer.close()
            for t in [t for t, v in session.resources_read.items() if not v]:
                del session.resources_read[t]  # a type of another shard is not "empty" (the merge tells)
            report = session.finish(source=shard.get("uri", out_uri), require_patients=False)
        except BaseException:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass
            if os.path.exists(log_local):
                os.unlink(log_local)
            session.abort()
            if log_dir:
                shutil.rmtree(log_dir, ignore_errors=True)
            raise
        _commit(store, log_local, join(out_uri, DECISIONS_FILE))
        if log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)
    return {"index": shard["index"], "uri": out_uri, "lines": n_lines, "identifiers": report["identifiers"],
            "native_lines": sum(report["native_lines"].values()),
            "validated": session.validated, "seconds": round(time.perf_counter() - t0, 3)}


def _flush_log(cols: dict[str, list], writer: pq.ParquetWriter, schema: pa.Schema) -> None:
    if not cols["line"]:
        return
    writer.write_batch(pa.RecordBatch.from_arrays([pa.array(cols[f.name], f.type) for f in schema], schema=schema))
    for v in cols.values():
        v.clear()


def _shard_segment(session: IngestSession, si: int, seg: dict, cols: dict[str, list], tables: list[str],
                   writer: pq.ParquetWriter, schema: pa.Schema) -> int:
    """Every line of one segment: the decisions a line allows alone, in ``cols``; rows into the session's
    writers (provisionally). Mirrors :func:`.fhir_ndjson._ingest_lines` check by check. The plain lines of the
    types the compiled flatten covers go through it one line per call (no duplicate or dangling check there:
    an empty id set and no patient set), the others through the Python loop.

    ``pks`` is recorded for a type with several tables only: with one table, the merge reads the patient key
    of the resource's first row from the shard's part (what ``rows[0][pidx]`` is)."""
    rtype = seg["rtype"]
    fname = seg["file"].rsplit("/", 1)[-1]
    file_salt = zlib.crc32(fname.encode())
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    producers = session.producers[rtype]
    single = producers[0] if len(producers) == 1 else None
    is_patient = rtype == "Patient"
    add_ident = session.identifiers.add
    ids_chunk = session.identifiers.chunk
    threshold = session.threshold
    vcap = session.validate_cap
    validate_first = session.validate_first
    batch_rows = session.batch_rows
    c_seg, c_line, c_rid, c_reason = cols["seg"], cols["line"], cols["rid"], cols["reason"]
    c_mod, c_hsel, c_vdone, c_vres = cols["modext"], cols["hsel"], cols["vdone"], cols["vres"]
    c_fr, c_pks = cols["freason"], cols["pks"]
    counts = {t: cols[f"n:{t}"] for t in tables}
    mine = [t for t in tables if any(p.writer.table == t for p in producers)]
    others = [counts[t] for t in tables if t not in mine]
    st = {"pot": session.candidates[rtype], "hval": session.validated_by_type[rtype], "n": 0, "native": 0}
    native = session.native.get(rtype) if single is not None else None

    def record(lineno: int, rid: str | None, reason: str | None, modext: bool = False, hsel: bool = False,
               vdone: bool = False, vres: str | None = None, freason: str | None = None, pks: list | None = None,
               rows: dict | None = None) -> None:
        c_seg.append(si)
        c_line.append(lineno)
        c_rid.append(rid)
        c_reason.append(reason)
        c_mod.append(modext)
        c_hsel.append(hsel)
        c_vdone.append(vdone)
        c_vres.append(vres)
        c_fr.append(freason)
        c_pks.append(pks if single is None else None)
        for t in mine:
            counts[t].append(rows.get(t, 0) if rows else 0)
        for c in others:
            c.append(0)

    def hashed(lineno: int) -> bool:
        return bool(threshold) and ((lineno * 2654435761 + file_salt) & 0xFFFFFFFF) < threshold

    def python_line(raw: Any, lineno: int) -> None:
        if not raw:
            if raw is _OVERSIZE:
                st["n"] += 1
                record(lineno, None, f"line longer than {session.max_line_bytes} bytes")
            return
        try:
            o = loads(raw)
        except decode_error:
            if not raw.strip():
                return
            o = None
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                try:
                    o = loads(raw[3:])
                except decode_error:
                    o = None
            if o is None:
                st["n"] += 1
                record(lineno, None, "invalid JSON")
                return
        st["n"] += 1
        if type(o) is not dict:
            record(lineno, None, "not a JSON object")
            return
        rt = o.get("resourceType")
        if rt != rtype:
            record(lineno, None, "missing resourceType" if rt is None else "resourceType mismatch")
            return
        rid = o.get("id")
        if type(rid) is not str or not rid:
            record(lineno, None, "missing id")
            return
        add_ident(rid, "id")
        if is_patient or "identifier" in o:
            collect_identifiers(o, is_patient, add_ident)
        if b'"modifierExtension"' in raw and has_modifier_extension(o):
            record(lineno, rid, None, modext=True)
            return
        st["pot"] += 1
        hsel = hashed(lineno)
        vres, vdone = None, False
        # a superset of what the merge may need validated (it validates any other line itself)
        if st["pot"] <= validate_first or (hsel and (vcap is None or st["hval"] < vcap)):
            vres, vdone = validation_failure(rtype, o), True
            session.validated += 1
            if hsel:
                st["hval"] += 1
        try:
            if single is not None:
                out = [(single, single.fn(o, rid))]
            else:
                out = [(p, p.fn(o, rid)) for p in producers]
        except BadResource as bad:
            record(lineno, rid, None, hsel=hsel, vdone=vdone, vres=vres, freason=bad.reason)
            return
        except (AttributeError, TypeError, KeyError, IndexError, ValueError, OverflowError):
            record(lineno, rid, None, hsel=hsel, vdone=vdone, vres=vres, freason="malformed resource structure")
            return
        pks = [rows[0][p.pidx] for p, rows in out if p.pidx is not None and rows]
        rows_by: dict[str, int] = {}
        for p, rows in out:
            rows_by[p.writer.table] = rows_by.get(p.writer.table, 0) + len(rows)
            buf = p.writer.buf
            buf.extend(rows)
            if len(buf) >= batch_rows:
                p.writer.flush()
        record(lineno, rid, None, hsel=hsel, vdone=vdone, vres=vres, pks=pks, rows=rows_by)

    blocks: Iterable = _segment_blocks(session.store, seg, session.max_line_bytes)
    if native is None:
        pairs: Iterable = ((b, None) for b in blocks)
    else:
        pairs = native_flatten.prepared(blocks, session.preparers(rtype), session.prepare_pool)
    table = single.writer.table if single is not None else None
    lineno = seg["first_line"]
    vcap_c = -1 if vcap is None else vcap
    for block, prep in pairs:
        if len(ids_chunk) >= IDENTIFIER_CHUNK_ROWS:
            session.identifiers.maybe_spill()
        if len(c_line) >= _LOG_FLUSH:
            _flush_log(cols, writer, schema)
        pos, nblock = 0, len(block)
        while pos < nblock:
            if prep is None:
                for raw in block[pos:]:
                    lineno += 1
                    python_line(raw, lineno)
                break
            buf = single.writer.buf
            before, ids = len(buf), set()
            # one line per call (the buffer is "full" after the first line with rows), so that each line's
            # id and rows are known; ``ids`` starts empty: no duplicate decided here
            nxt, took, why = native.commit(prep, pos, lineno, buf, ids, None, ids_chunk, st["pot"], st["hval"],
                                           vcap_c, validate_first, threshold, file_salt, before + 1)
            if took:
                rids = [ids.pop()] if took == 1 else [loads(block[pos + k])["id"] for k in range(took)]
                added = len(buf) - before
                for k, rid in enumerate(rids):
                    ln = lineno + k + 1
                    record(ln, rid, None, hsel=hashed(ln), rows={table: added if k == took - 1 else 0})
                st["pot"] += took
                st["n"] += took
                st["native"] += took
            lineno += nxt - pos
            pos = nxt
            if len(buf) >= batch_rows:
                single.writer.flush()
            if why in (1, 3):  # for the Python loop (3: picked for the validation sample, which it does here)
                lineno += 1
                python_line(block[pos], lineno)
                pos += 1
            elif why == 0:
                break
    session.candidates[rtype] = st["pot"]
    session.validated_by_type[rtype] = st["hval"]
    session.resources_read[rtype] += st["n"]
    session.native_lines[rtype] += st["native"]
    return st["n"]


# --------------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------------
def _line_at(store: Store, seg: dict, lineno: int, max_line_bytes: int) -> bytes:
    """The raw line ``lineno`` of a segment (read again, for a validation the shard did not do)."""
    at = seg["first_line"]
    for block in _segment_blocks(store, seg, max_line_bytes):
        for raw in block:
            at += 1
            if at == lineno:
                return raw
    raise ExtractError(f"extract file {seg['file']} changed during the ingest (line {lineno} is gone)")


def merge(plan: dict, shard_results: list[dict], out_uri: str, *, keyer: Keyer, store: Store | None = None,
          resources: Iterable[str] = DEFAULT_RESOURCES, views: Iterable[dict] = (),
          validate_sample_rate: float = 0.01, validate_max_per_type: int = 0, engine: str = "fast",
          max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, on_dangling: str = "quarantine", value_rules: Any = None,
          extra_report: dict | None = None, batch_rows: int = 50_000, **_ignored: Any) -> dict:
    """Merge the shards of ``plan`` (their :func:`ingest_shard` results, any order) into ``out_uri``: the
    outputs and report of a one-process ingest of the same extract (see the module docstring)."""
    t0 = time.perf_counter()
    store = store or Store()
    out_uri = str(out_uri)
    results = sorted(shard_results, key=lambda r: r["index"])
    by_index = {s["index"]: s for s in plan["shards"]}
    if sorted(by_index) != [r["index"] for r in results]:
        raise ExtractError(f"sharded ingest: shards {sorted(by_index)} planned, results for "
                           f"{[r['index'] for r in results]}")
    # a session for the table layout, the counters' keys and the validation rule (never fed, aborted below)
    probe = session_for(join(out_uri, "shards", "_probe"), keyer=keyer, store=store, resources=resources,
                        views=list(views or ()), validate_sample_rate=validate_sample_rate, engine=engine,
                        max_line_bytes=max_line_bytes, value_rules=value_rules,
                        validate_max_per_type=validate_max_per_type)
    try:
        names = list(probe.writers)
        schemas = {t: w.schema for t, w in probe.writers.items()}
        all_resources = list(probe.resources)
        view_names = sorted(probe.views)
        threshold, vcap, validate_first = probe.threshold, probe.validate_cap, probe.validate_first
        has_patient = "Patient" in probe.producers
        # types with one table: the patient key of a resource is its first row's (read from the part)
        one_table = {r: ps[0].writer.table for r, ps in probe.producers.items()
                     if len(ps) == 1 and ps[0].pidx is not None}
    finally:
        probe.abort()
        store.remove_tree(join(out_uri, "shards", "_probe"))
    key = fast_key(keyer)
    s3_out = is_s3(out_uri)
    tmpdir = tempfile.mkdtemp(prefix="synthfactory-merge-") if s3_out else None
    if not s3_out:
        os.makedirs(out_uri, exist_ok=True)

    def local_for(name: str) -> str:
        return os.path.join(tmpdir, name) if tmpdir else join(out_uri, name) + ".partial"

    seen: dict[str, set] = {r: set() for r in all_resources}
    patient_keys: set | None = set() if has_patient else None
    resources_read = dict.fromkeys(all_resources, 0)
    quarantined = dict.fromkeys(all_resources, 0)
    reasons: dict[str, dict[str, int]] = {}
    candidates = dict.fromkeys(all_resources, 0)
    validated_by_type: dict[str, int] = {}
    dangling: dict[str, int] = {}
    per_file: dict[str, list[int]] = {f["name"]: [0, 0] for f in plan["files"]}
    validated = q_records = lazy = 0
    for f in plan["files"]:  # as one process: every type with a file has an entry, validated or not
        validated_by_type.setdefault(f["rtype"], 0)
    keep_dangling = on_dangling == "keep"
    q_local = local_for(QUARANTINE_FILE)
    qfh = open(q_local, "wb")
    writers = {t: pq.ParquetWriter(local_for(f"{t}.parquet"), schemas[t], compression="zstd") for t in names}
    rows_out = dict.fromkeys(names, 0)
    identifiers = _MergedIdentifiers(local_for(IDENTIFIERS_FILE))
    committed = False
    try:
        repeated = _repeated_ids(results, by_index, store)
        pk_array: pa.Array | None = None  # the accepted patients' keys, once every Patient line is decided
        for res in results:
            shard = by_index[res["index"]]
            segs = shard["segments"]
            log_table = store.read_table(join(res["uri"], DECISIONS_FILE))
            accepted = np.zeros(log_table.num_rows, dtype=bool)
            pk1 = _first_row_patient_keys(log_table, res["uri"], sorted(set(one_table.values())), store)

            def decide(i: int, r: dict, seg: dict) -> None:
                """One line, as :func:`.fhir_ndjson._ingest_lines` decides it (``r``: its decision record)."""
                nonlocal validated, lazy, q_records
                rtype, lineno = seg["rtype"], r["line"]
                resources_read[rtype] += 1
                pf = per_file[seg["file"]]
                pf[0] += 1
                reason = r["reason"]
                if reason is None:
                    rid = r["rid"]
                    if rid in seen[rtype]:
                        reason = "duplicate id"
                    elif r["modext"]:
                        reason = "unknown modifierExtension"
                    else:
                        candidates[rtype] += 1
                        vdone = validated_by_type.get(rtype, 0)
                        if candidates[rtype] <= validate_first or (
                                threshold and (vcap is None or vdone < vcap) and r["hsel"]):
                            validated += 1
                            validated_by_type[rtype] = vdone + 1
                            if r["vdone"]:
                                reason = r["vres"]
                            else:  # the shard did not validate this line: read it again
                                lazy += 1
                                raw = _line_at(store, seg, lineno, max_line_bytes)
                                raw = raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
                                reason = validation_failure(rtype, orjson.loads(raw))
                        if reason is None:
                            reason = r["freason"]
                        if reason is None and rtype != "Patient" and patient_keys:
                            for pk in (r["pks"] if r["pks"] is not None else [r["_pk1"]]):
                                if pk is not None and pk not in patient_keys:
                                    dangling[rtype] = dangling.get(rtype, 0) + 1
                                    if not keep_dangling:
                                        reason = "dangling reference to Patient"
                                    break
                        if reason is None:
                            seen[rtype].add(rid)
                            if rtype == "Patient" and patient_keys is not None:
                                patient_keys.add(key("Patient", rid))
                            accepted[i] = True
                            return
                pf[1] += 1
                quarantined[rtype] += 1
                fname = seg["file"].rsplit("/", 1)[-1]
                qfh.write(orjson.dumps({"file": fname, "line": lineno, "resource_type": rtype, "reason": reason}))
                qfh.write(b"\n")
                q_records += 1
                per = reasons.setdefault(rtype, {})
                per[reason] = per.get(reason, 0) + 1

            def one_by_one(a: int, b: int) -> None:
                part = log_table.slice(a, b - a).to_pylist()
                for r, pk in zip(part, pk1.slice(a, b - a).to_pylist()):
                    r["_pk1"] = pk
                for i, r in enumerate(part, start=a):
                    decide(i, r, segs[r["seg"]])

            def _bulk(run: pa.Table, seg: dict, at: int, accepted: np.ndarray) -> bool:
                """A run of simple lines (valid alone, an id no other line has, every patient known): all
                accepted; the validation sample's counters advance as one by one. False (nothing done) when
                a line the shard did not validate is in the sample: the caller decides them one by one."""
                nonlocal validated
                rtype, n = seg["rtype"], run.num_rows
                cand = candidates[rtype] + np.arange(1, n + 1)
                first = cand <= validate_first
                hsel = run.column("hsel").to_numpy(zero_copy_only=False) if threshold else np.zeros(n, bool)
                v0 = validated_by_type.get(rtype, 0)
                if vcap is None:
                    sel = first | hsel
                else:
                    e = first | hsel
                    sel = first | (hsel & (v0 + np.cumsum(e) - e < vcap))
                if (sel & ~run.column("vdone").to_numpy(zero_copy_only=False)).any():
                    return False
                candidates[rtype] += n
                resources_read[rtype] += n
                per_file[seg["file"]][0] += n
                validated += int(sel.sum())
                validated_by_type[rtype] = v0 + int(sel.sum())
                accepted[at:at + n] = True
                return True

            seg_of = log_table.column("seg").to_numpy(zero_copy_only=False)
            bounds = np.flatnonzero(np.diff(seg_of)) + 1
            for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), log_table.num_rows]):
                seg = segs[int(seg_of[a])]
                if seg["rtype"] == "Patient":  # every Patient line before any other type: one by one
                    one_by_one(a, b)
                    continue
                if pk_array is None and patient_keys:
                    pk_array = pa.array(sorted(patient_keys), pa.string())
                simple = _simple(log_table.slice(a, b - a), repeated.get(seg["rtype"]), pk_array,
                                 pk1.slice(a, b - a) if seg["rtype"] in one_table else None)
                cuts = (np.flatnonzero(np.diff(simple)) + 1 + a).tolist()
                for x, y in zip([a, *cuts], [*cuts, b]):  # runs of simple lines in bulk, the others one by one
                    if not (simple[x - a] and _bulk(log_table.slice(x, y - x), seg, x, accepted)):
                        one_by_one(x, y)

            for t in names:
                part = store.read_table(join(res["uri"], f"{t}.parquet"))
                counts = log_table.column(f"n:{t}").to_numpy(zero_copy_only=False) \
                    if f"n:{t}" in log_table.column_names else np.zeros(log_table.num_rows, dtype=np.int32)
                mask = np.repeat(accepted, counts)
                if len(mask) != part.num_rows:
                    raise ExtractError(f"sharded ingest: shard {res['index']} table {t} has {part.num_rows} rows, "
                                       f"its decisions {len(mask)}")
                kept = part.filter(pa.array(mask)) if not mask.all() else part
                if kept.num_rows:
                    writers[t].write_table(kept.cast(schemas[t]), row_group_size=batch_rows)
                rows_out[t] += kept.num_rows
                del part, kept
            log_table = accepted = None  # type: ignore[assignment]
            identifiers.add_table(store.read_table(join(res["uri"], IDENTIFIERS_FILE)))
        qfh.close()
        for w in writers.values():
            w.close()
        q_uri = join(out_uri, QUARANTINE_FILE)
        patient_table = BUILTIN_BY_RESOURCE["Patient"]
        if patient_table in writers and rows_out[patient_table] == 0:
            _commit(store, q_local, q_uri)
            raise ExtractError(
                f"extract is empty: no valid Patient resource in {plan['source_uri']} "
                f"({resources_read.get('Patient', 0)} read, {quarantined.get('Patient', 0)} "
                f"quarantined; see {q_uri})")
        identifiers.close()
        for t in names:
            _commit(store, local_for(f"{t}.parquet"), join(out_uri, f"{t}.parquet"))
        _commit(store, q_local, q_uri)
        _commit(store, identifiers.local_path, join(out_uri, IDENTIFIERS_FILE))
        committed = True
    finally:
        if not qfh.closed:
            qfh.close()
        if not committed:
            for t, w in writers.items():
                try:
                    w.close()
                except Exception:  # noqa: BLE001
                    pass
                _unlink(local_for(f"{t}.parquet"))
            identifiers.abort()
            _unlink(q_local)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)

    files = sorted(per_file)
    outcomes: dict[str, dict] = {name: {"outcome": "read", "resources": per_file[name][0],
                                        "quarantined": per_file[name][1]} for name in files}
    for name, reason in plan["refused"].items():
        outcomes[name] = {"outcome": "refused", "reason": reason}
    for name, reason in plan["skipped"].items():
        outcomes.setdefault(name, {"outcome": "skipped", "reason": reason})
    outcomes = dict(sorted(outcomes.items()))
    refused = sorted(plan["refused"])
    empty = sorted(t for t, v in resources_read.items() if v == 0)
    for t in empty:
        log.warning("ingest: no %s resource in this extract (an empty or missing file)", t)
    sha = {f["name"]: f["sha256"] for f in plan["files"]}
    digest = hashlib.sha256()
    for name in files:
        digest.update(f"{name}\0{sha[name]}\n".encode())
    seconds = time.perf_counter() - t0
    total_read = sum(resources_read.values())
    report = {
        "tables": {t: join(out_uri, f"{t}.parquet") for t in names},
        "rows": rows_out,
        "resources_read": resources_read,
        "quarantined": quarantined,
        "quarantined_total": q_records,
        "quarantine_reasons": reasons,
        "quarantine_uri": join(out_uri, QUARANTINE_FILE),
        "identifiers_uri": join(out_uri, IDENTIFIERS_FILE),
        "identifiers": identifiers.count,
        "extract_sha256": digest.hexdigest(),
        "file_sha256": {n: sha[n] for n in files},
        "files": files,
        "file_outcomes": outcomes,
        "skipped_files": sorted(n for n in plan["skipped"] if n not in refused),
        "refused_files": refused,
        "empty_types": empty,
        "skipped_resources": {},
        "dangling_references": dangling,
        "validated": validated,
        "validated_by_type": dict(sorted(validated_by_type.items())),
        "views": view_names,
        "native_lines": {},
        "seconds": round(seconds, 3),
        "resources_per_second": round(total_read / seconds, 1) if seconds > 0 else 0.0,
        "sharded": {"shards": len(results), "merge_seconds": round(seconds, 3), "revalidated_in_merge": lazy,
                    "native_lines": sum(r.get("native_lines") or 0 for r in results),
                    "shard_seconds": [r.get("seconds") for r in results]},
        **(extra_report or {}),
    }
    store.write_json(join(out_uri, REPORT_FILE), report)
    log.info("sharded ingest merged: %d shards, %d resources read, %d quarantined, %d validated, rows %s",
             len(results), total_read, q_records, validated, rows_out)
    return report


class _MergedIdentifiers(_Identifiers):
    """The shards' identifier tables (each already one row per value, with the first kind its shard saw),
    merged in shard order: one row per value with the kind seen first in the extract, as one process writes.
    Vectorised (Arrow): each table is split into :attr:`PARTS` partitions by its values' last character (a
    value always lands in the same partition), spilled, and each partition deduplicated on its own at
    :meth:`close`, so memory stays bounded by a partition."""

    def add_table(self, table: pa.Table) -> None:
        import pyarrow.compute as pc

        n = table.num_rows
        if not n:
            return
        values = table.column("value").combine_chunks()
        last = pc.utf8_slice_codeunits(values, -1).dictionary_encode()
        where = np.array([hash(c) & (self.PARTS - 1) for c in last.dictionary.to_pylist()], dtype=np.int8)
        part = where[last.indices.to_numpy(zero_copy_only=False)] if len(where) else np.zeros(n, np.int8)
        batch = pa.RecordBatch.from_arrays(
            [values, table.column("kind").combine_chunks().cast(pa.string()),
             pa.array(np.arange(self._seq, self._seq + n, dtype=np.int64))], schema=self._SPILL_SCHEMA)
        self._seq += n
        for p in range(self.PARTS):
            sub = batch.filter(pa.array(part == p))
            if not sub.num_rows:
                continue
            w = self._spills[p]
            if w is None:
                w = self._spills[p] = pq.ParquetWriter(self._spill_path(p), self._SPILL_SCHEMA, compression="zstd")
            w.write_batch(sub)

    def close(self) -> None:
        if not any(self._spills):  # nothing added: an empty file
            pq.ParquetWriter(self.local_path, IDENTIFIERS_SCHEMA, compression="zstd").close()
            return
        super().close()


def _col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _repeated_ids(results: list[dict], by_index: dict, store: Store) -> dict[str, pa.Array]:
    """{type: the ids that more than one line of the type carries, across every shard} (a line with an id no
    other line has is never a duplicate, whatever else happens)."""
    import pyarrow.compute as pc

    by_type: dict[str, list] = {}
    for res in results:
        segs = by_index[res["index"]]["segments"]
        t = store.read_table(join(res["uri"], DECISIONS_FILE), columns=["seg", "rid"])
        seg_of = _col(t, "seg")
        bounds = (np.flatnonzero(np.diff(seg_of)) + 1).tolist()
        for a, b in zip([0, *bounds], [*bounds, t.num_rows]):
            if b > a:
                by_type.setdefault(segs[int(seg_of[a])]["rtype"], []).extend(t.column("rid").slice(a, b - a).chunks)
    out = {}
    for rtype, chunks in by_type.items():
        counts = pc.value_counts(pa.chunked_array(chunks, pa.string()).drop_null())
        out[rtype] = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    return out


def _first_row_patient_keys(log_table: pa.Table, uri: str, tables: list[str], store: Store) -> pa.Array:
    """Per decision record, the patient key of its first row in a one-table type's part (null without rows):
    what one process checks (``rows[0][pidx]``)."""
    n = log_table.num_rows
    where = np.full(n, -1, dtype=np.int64)
    keys, base = [], 0
    for t in tables:
        if f"n:{t}" not in log_table.column_names:
            continue
        counts = _col(log_table, f"n:{t}").astype(np.int64)
        has = counts > 0
        where[has] = (base + np.cumsum(counts) - counts)[has]
        col = store.read_table(join(uri, f"{t}.parquet"), columns=["patient_key"]).column("patient_key")
        keys.extend(col.chunks)
        base += len(col)
    if not keys:
        return pa.nulls(n, pa.string())
    return pa.chunked_array(keys, pa.string()).combine_chunks().take(pa.array(where, mask=where < 0))


def _simple(run: pa.Table, repeated: pa.Array | None, patient_keys: pa.Array | None,
            pk1: pa.Array | None = None) -> np.ndarray:
    """Lines of one segment that are accepted whatever the other lines are: valid on their own (no
    quarantine reason, no modifierExtension, flattened, passed validation if validated), an id no other
    line of the type has, and every patient they reference accepted (``patient_keys``; None: no check)."""
    import pyarrow.compute as pc

    n = run.num_rows
    simple = (run.column("reason").is_null().to_numpy(zero_copy_only=False) & ~_col(run, "modext")
              & run.column("freason").is_null().to_numpy(zero_copy_only=False)
              & run.column("vres").is_null().to_numpy(zero_copy_only=False))
    if repeated is not None and len(repeated):
        simple &= ~pc.is_in(run.column("rid"), value_set=repeated).fill_null(False).to_numpy(zero_copy_only=False)
    if patient_keys is not None and pk1 is not None:  # a one-table type: its first row's patient key
        known = pc.is_in(pk1, value_set=patient_keys).fill_null(False).to_numpy(zero_copy_only=False) \
            | pk1.is_null().to_numpy(zero_copy_only=False)
        simple &= known
    elif patient_keys is not None:
        pks = run.column("pks").combine_chunks()
        flat = pc.list_flatten(pks)
        known = pc.is_in(flat, value_set=patient_keys).fill_null(False).to_numpy(zero_copy_only=False) \
            | flat.is_null().to_numpy(zero_copy_only=False)
        bad = np.zeros(n, dtype=bool)
        bad[pc.list_parent_indices(pks).to_numpy(zero_copy_only=False)[~known]] = True
        simple &= ~bad
    return simple


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
