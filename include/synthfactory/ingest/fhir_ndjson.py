"""Streaming ingest of FHIR R4 resources into flat, pseudonymised Parquet tables.

``ingest_extract(source_uri, out_uri, keyer=...)`` reads ``<ResourceType>[.|-|_...].ndjson[.gz]`` files
from a local folder or ``s3://bucket/prefix`` in blocks (never a whole file in memory; a line longer than
``max_line_bytes`` is skipped and quarantined without being held), parses each line with orjson,
flattens it into one or more rows and flushes the rows as Parquet row groups of ``batch_rows`` rows
(explicit Arrow schemas, zstd). :class:`IngestSession` is the same machinery for other sources (Bundles,
REST search pages, Bulk Data downloads): they feed it lines or parsed resources.

Flattening: the tables ``patient``, ``encounter``, ``condition`` and ``observation`` are produced by
hand-written flatteners (the fast path, ``engine="fast"``); every other table (``medication_request``,
``procedure``, the user's own) by SQL-on-FHIR ViewDefinitions compiled once (:mod:`.views`).
``engine="views"`` runs the four built-in tables through their ViewDefinitions too: the rows are the
same (tests/ingest/test_views.py proves it on generated data), the fast path is quicker. On the fast path
the plain lines of Observation, Encounter and Condition go through the compiled flatten
(:mod:`.native`, C), which writes exactly the hand-written flatteners' rows; every other line takes the
Python loop below (``native=False`` for that loop alone).

Written under ``out_uri`` (the secure staging area):

* ``<table>.parquet``: the flattened tables. Every source id is replaced by a salted HMAC key; names,
  identifiers, addresses and telecoms are never written to them.
* ``quarantine.ndjson``: one record per rejected line or resource (file name, 1-based line number or entry
  position, resource type, short reason). Never the raw line nor any value from it.
* ``identifiers.parquet``: the real direct identifiers seen (ids, identifier values, names, address
  lines, telecoms) for the downstream leak scan. It stays in staging.
* ``ingest_report.json``: counts (per type and reason), URIs, timings and the extract's sha256.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
import zlib
from typing import IO, Any, Callable, Iterable, Iterator

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synthfactory.keys import Keyer
from synthfactory.storage import Store, is_s3, join

from . import native as _native
from .fhirpath import Env
from .normalize import (
    GENDERS,
    SYSTEM_SHORT,
    US_CORE_BIRTHSEX,
    US_CORE_ETHNICITY,
    US_CORE_RACE,
    BadResource,
    ExtractError,
    collect_identifiers,
    concept,
    contained_key_id,
    datetime_parts,
    fast_key,
    fhir_datetime_deferred,
    timestamp_array,
    first_code,
    has_modifier_extension,
    omb_display,
    parse_fhir_date,
    parse_fhir_datetime,
    reference_id,
)
from .schemas import IDENTIFIERS_SCHEMA, TABLES
from .views import BUILTIN_BY_RESOURCE, BUILTIN_VIEWS, CompiledView, ViewError, compile_view

log = logging.getLogger(__name__)

__all__ = ["ExtractError", "ingest_extract", "IngestSession", "SUPPORTED_RESOURCES", "parse_fhir_date",
           "parse_fhir_datetime", "discover_ndjson"]

SUPPORTED_RESOURCES = tuple(BUILTIN_BY_RESOURCE)
DEFAULT_RESOURCES = ("Patient", "Encounter", "Condition", "Observation")
FAST_TABLES = {rtype: name for rtype, (name, _) in TABLES.items()}  # the hand-written four
ALWAYS_VALIDATE_FIRST = 20
IDENTIFIER_CHUNK_ROWS = 200_000
DEFAULT_MAX_LINE_BYTES = 16 << 20
READ_BLOCK = 1 << 20

QUARANTINE_FILE = "quarantine.ndjson"
IDENTIFIERS_FILE = "identifiers.parquet"
REPORT_FILE = "ingest_report.json"

_Bad = BadResource  # the flatteners' short name


# --------------------------------------------------------------------------------------------------
# Hand-written flatteners (the fast path): resource dict -> list of row tuples in schema column order
# --------------------------------------------------------------------------------------------------
Flattener = Callable[[dict, str], list]


def _s(value: Any, field: str) -> str | None:
    if value is None or type(value) is str:
        return value
    raise _Bad(f"invalid value in {field}")


def _ts(value: Any, field: str) -> int | str:
    """A validated dateTime for a timestamp column: microseconds, or the canonical string itself (Arrow
    converts those per batch, see :func:`normalize.timestamp_array`)."""
    try:
        return fhir_datetime_deferred(value)
    except (ValueError, TypeError, OverflowError):
        raise _Bad(f"invalid date in {field}") from None


def _make_flatteners(key: Callable[[str, str], str]) -> dict[str, Flattener]:
    pcache: dict[str, str] = {}
    ecache: dict[str, str] = {}

    def ref_key(ref_obj: Any, rtype: str, cache: dict[str, str], o: dict) -> str | None:
        if not ref_obj:
            return None
        ref = ref_obj.get("reference")
        k = cache.get(ref)
        if k is None:
            if ref is None:
                return None
            if type(ref) is not str:
                raise _Bad("invalid reference")
            if ref[:1] == "#":  # contained: keyed within its parent, never cached
                hit = contained_key_id(o, ref, rtype)
                return key(hit[0], hit[1]) if hit else None
            rid = reference_id(ref, rtype)
            if rid is None:
                return None
            k = key(rtype, rid)
            if len(cache) >= 1 << 18:
                cache.clear()
            cache[ref] = k
        return k

    def patient(o: dict, rid: str) -> list:
        gender = _s(o.get("gender"), "gender")
        if gender is not None and gender not in GENDERS:
            raise _Bad("invalid value in gender")
        bd = o.get("birthDate")
        birth = prec = None
        if bd is not None:
            try:
                birth, prec = parse_fhir_date(bd)
            except (ValueError, TypeError, OverflowError):
                raise _Bad("invalid date in birthDate") from None
        deceased = False
        deceased_date = None
        v = o.get("deceasedBoolean")
        if v is not None:
            if type(v) is not bool:
                raise _Bad("invalid value in deceasedBoolean")
            deceased = v
        v = o.get("deceasedDateTime")
        if v is not None:
            try:
                deceased_date = datetime_parts(v)[1]
            except (ValueError, TypeError, OverflowError):
                raise _Bad("invalid date in deceasedDateTime") from None
            deceased = True
        race = ethnicity = birth_sex = None
        for ext in o.get("extension") or ():
            url = ext.get("url")
            if url == US_CORE_RACE:
                if race is None:
                    race = omb_display(ext)
            elif url == US_CORE_ETHNICITY:
                if ethnicity is None:
                    ethnicity = omb_display(ext)
            elif url == US_CORE_BIRTHSEX:
                birth_sex = _s(ext.get("valueCode"), "birthsex")
        marital = first_code(o.get("maritalStatus"), "maritalStatus")
        addr = o.get("address")
        state = _s(addr[0].get("state"), "address.state") if addr else None
        return [(key("Patient", rid), gender, birth, prec, deceased, deceased_date, race, ethnicity,
                 birth_sex, marital, state)]

    def encounter(o: dict, rid: str) -> list:
        cls = o.get("class")
        if isinstance(cls, list):  # R5 shape: list of CodeableConcept
            class_code = first_code(cls[0], "class") if cls else None
        else:
            class_code = _s(cls.get("code"), "class") if cls else None
        types = o.get("type")
        type_code = type_display = None
        if types:  # first coding of type[0]; display falls back to type[0].text
            t0 = types[0]
            codings = t0.get("coding")
            if codings:
                type_code = _s(codings[0].get("code"), "type")
                type_display = _s(codings[0].get("display"), "type")
            if type_display is None:
                type_display = _s(t0.get("text"), "type")
        period = o.get("period") or o.get("actualPeriod")
        start = end = None
        if period:
            v = period.get("start")
            if v is not None:
                start = _ts(v, "period.start")
            v = period.get("end")
            if v is not None:
                end = _ts(v, "period.end")
        return [(key("Encounter", rid), ref_key(o.get("subject"), "Patient", pcache, o),
                 _s(o.get("status"), "status"), class_code, type_code, type_display, start, end)]

    def condition(o: dict, rid: str) -> list:
        system, code, display = concept(o.get("code"), "code")
        onset = None
        v = o.get("onsetDateTime")
        if v is not None:
            onset = _ts(v, "onsetDateTime")
        else:
            p = o.get("onsetPeriod")
            if p and p.get("start") is not None:
                onset = _ts(p["start"], "onsetPeriod.start")
        enc = o.get("encounter") or o.get("context")
        return [(key("Condition", rid), ref_key(o.get("subject"), "Patient", pcache, o),
                 ref_key(enc, "Encounter", ecache, o), system, code, display,
                 first_code(o.get("clinicalStatus"), "clinicalStatus"), onset)]

    def obs_value(x: dict) -> tuple | None:
        q = x.get("valueQuantity")
        if q is not None:
            v = q.get("value")
            t = type(v)
            if t is float:
                num = v
            elif t is int:
                num = float(v)
            elif v is None:
                return None
            else:
                raise _Bad("invalid value in valueQuantity")
            unit = q.get("unit") or q.get("code")
            if unit is not None and type(unit) is not str:
                raise _Bad("invalid value in valueQuantity")
            return num, unit, None
        v = x.get("valueCodeableConcept")
        if v is not None:
            code = first_code(v, "valueCodeableConcept")
            return None if code is None else (None, None, code)
        v = x.get("valueString")
        if v is not None:
            return None, None, _s(v, "valueString")
        v = x.get("valueBoolean")
        if v is not None:
            if type(v) is not bool:
                raise _Bad("invalid value in valueBoolean")
            return None, None, "true" if v else "false"
        v = x.get("valueInteger")
        if v is not None:
            if type(v) is not int:
                raise _Bad("invalid value in valueInteger")
            return float(v), None, None
        return None

    _no_value = (None, None, None)
    short = SYSTEM_SHORT

    def code_of(cc: Any, field: str) -> tuple:
        """concept() with the single-coding case inlined (most codes have one coding)."""
        if cc:
            codings = cc.get("coding")
            if codings and len(codings) == 1:
                best = codings[0]
                system = best.get("system")
                code = best.get("code")
                display = best.get("display") or cc.get("text")
                if type(code) is str and type(display) is str and type(system) is str:
                    return short.get(system, system), code, display
        return concept(cc, field)

    def observation(o: dict, rid: str) -> list:
        # hot path: the reference string is usually already in the cache
        r = o.get("subject")
        pk = pcache.get(r.get("reference")) if type(r) is dict else None
        if pk is None:
            pk = ref_key(r, "Patient", pcache, o)
        r = o.get("encounter") or o.get("context")
        ek = ecache.get(r.get("reference")) if type(r) is dict else None
        if ek is None:
            ek = ref_key(r, "Encounter", ecache, o)
        category = None
        cats = o.get("category")
        if cats:
            c0 = cats[0]
            codings = c0.get("coding")
            category = codings[0].get("code") if codings else c0.get("text")
            if category is not None and type(category) is not str:
                raise _Bad("invalid value in category")
        v = o.get("effectiveDateTime")
        if v is not None:
            effective = _ts(v, "effectiveDateTime")
        else:
            effective = None
            p = o.get("effectivePeriod")
            if p and p.get("start") is not None:
                effective = _ts(p["start"], "effectivePeriod.start")
            else:
                v = o.get("effectiveInstant")
                if v is not None:
                    effective = _ts(v, "effectiveInstant")
        q = o.get("valueQuantity")
        if type(q) is dict and type(q.get("value")) in (float, int):
            qv = q["value"]
            unit = q.get("unit") or q.get("code")
            if unit is not None and type(unit) is not str:
                raise _Bad("invalid value in valueQuantity")
            own = (qv if type(qv) is float else float(qv), unit, None)
        else:
            own = obs_value(o)
        comps = o.get("component")
        if comps:
            rows = []
            for i, comp in enumerate(comps):
                cv = obs_value(comp)
                if cv is None:
                    continue
                system, code, display = code_of(comp.get("code"), "component.code")
                rows.append((key("Observation", f"{rid}#{i}"), pk, ek, category, system, code, display,
                             effective, cv[0], cv[1], cv[2]))
            if own is None:
                return rows
        else:
            rows = None
        system, code, display = code_of(o.get("code"), "code")
        if own is None:
            own = _no_value
        row = (key("Observation", rid), pk, ek, category, system, code, display, effective, own[0], own[1], own[2])
        if rows is None:
            return [row]
        rows.append(row)
        return rows

    return {"Patient": patient, "Encounter": encounter, "Condition": condition, "Observation": observation}


# --------------------------------------------------------------------------------------------------
# Streams and writers
# --------------------------------------------------------------------------------------------------
class _HashingReader(io.RawIOBase):
    """Raw stream that feeds every byte read through a hash (the file's sha256, no second pass)."""

    def __init__(self, raw: IO[bytes], hasher: Any):
        self._raw = raw
        self._h = hasher
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        readinto = getattr(self._raw, "readinto", None)
        if readinto is not None:
            n = readinto(b)
        else:
            data = self._raw.read(len(b))
            n = len(data)
            b[:n] = data
        if n:
            self._h.update(memoryview(b)[:n])
            self.nbytes += n
        return n or 0

    def drain(self) -> None:
        buf = bytearray(1 << 20)
        while self.readinto(buf):
            pass

    def release(self) -> None:
        """Close the underlying stream (``close`` leaves it open so that ``drain`` still works after a
        wrapping buffered reader has closed this one)."""
        try:
            self._raw.close()
        finally:
            self.close()


_OVERSIZE = None  # marker in a block: a line longer than the limit (its bytes were never kept)


def line_blocks(stream: Any, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                block: int = READ_BLOCK) -> Iterator[list]:
    """Yield lists of raw lines (bytes, newline removed; ``None`` for a line over ``max_line_bytes``,
    whose bytes are skipped, not held). Every line is counted: the caller numbers them 1, 2, ...

    ``stream`` is a binary stream, or an iterator of byte chunks (e.g. from :func:`prefetched`)."""
    if hasattr(stream, "read"):
        read = stream.read
        chunks: Iterator[bytes] = iter(lambda: read(block), b"")
    else:
        chunks = iter(stream)
    carry = b""
    skipping = False
    for chunk in chunks:
        if skipping:
            i = chunk.find(b"\n")
            if i < 0:
                continue
            skipping = False
            chunk = chunk[i + 1:]
            if not chunk:
                continue
        if carry:
            chunk = carry + chunk
            carry = b""
        lines = chunk.split(b"\n")
        carry = lines.pop()
        if len(carry) > max_line_bytes:
            lines.append(_OVERSIZE)
            carry = b""
            skipping = True
        elif len(chunk) > max_line_bytes:  # only then can a complete line in it be too long
            for j, ln in enumerate(lines):
                if ln is not None and len(ln) > max_line_bytes:
                    lines[j] = _OVERSIZE
        if lines:
            yield lines
    if carry and not skipping:
        yield [carry if len(carry) <= max_line_bytes else _OVERSIZE]


class _Done:
    pass


def prefetched(stream: Any, block: int = READ_BLOCK, depth: int = 4) -> Iterator[bytes]:
    """Read ``stream`` in ``block``-sized chunks on a helper thread, ``depth`` chunks ahead: reading,
    hashing and gzip inflation release the GIL, so they overlap with parsing on the caller's thread.
    An exception in the reader is re-raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            read = stream.read
            while True:
                chunk = read(block)
                if not chunk:
                    break
                if not put(chunk):
                    return
            put(_Done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    t = threading.Thread(target=reader, name="synthfactory-ingest-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _Done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=10)


class _BackgroundWriter:
    """One helper thread that encodes and compresses Parquet row groups (pyarrow releases the GIL there)
    while the caller's thread keeps parsing. FIFO; at most ``depth`` batches in flight."""

    def __init__(self, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthfactory-ingest-writer")
        self._pending: list = []
        self.depth = depth

    def submit(self, fn: Callable, *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self.depth:
            self._pending.pop(0).result()

    def wait(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def shutdown(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


class _TableWriter:
    """Buffers row tuples and flushes them as Parquet row groups; committed atomically at the end."""

    def __init__(self, table: str, uri: str, schema: pa.Schema, local_path: str, batch_rows: int,
                 background: _BackgroundWriter | None = None):
        self.table = table
        self.uri = uri
        self.schema = schema
        self.local_path = local_path
        self.batch_rows = batch_rows
        self.buf: Any = []  # row tuples; or a native.columns buffer, which takes them too
        self.rows = 0
        self.background = background
        self._writer = pq.ParquetWriter(local_path, schema, compression="zstd")

    def flush(self) -> None:
        n = len(self.buf)
        if not n:
            return
        if type(self.buf) is list:
            cols = list(zip(*self.buf))
            arrays = [timestamp_array(c, f.type) if pa.types.is_timestamp(f.type) else pa.array(c, type=f.type)
                      for c, f in zip(cols, self.schema)]
            self.buf = []
        else:  # a native.columns buffer: already Arrow buffers (and empty after this)
            arrays = _native.arrays(self.buf, self.schema)
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        if self.background is not None:
            self.background.submit(self._writer.write_batch, batch, n)
        else:
            self._writer.write_batch(batch, row_group_size=n)
        self.rows += n

    def close(self) -> None:
        self.flush()
        if self.background is not None:
            self.background.wait()
        self._writer.close()

    def abort(self) -> None:
        try:
            if self.background is not None:
                self.background.wait()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
        _unlink(self.local_path)


class _Identifiers:
    """The direct identifiers seen, deduplicated per chunk in memory, spilled to ``PARTS`` files by a hash of
    the value, and deduplicated across chunks one partition at a time at the end (first kind wins), so
    memory stays bounded on large extracts (a value always lands in the same partition)."""

    PARTS = 8  # a power of 2
    _SPILL_SCHEMA = pa.schema([pa.field("value", pa.string()), pa.field("kind", pa.string()),
                               pa.field("_i", pa.int64())])

    def __init__(self, local_path: str):
        self.local_path = local_path
        self.chunk: dict[str, str] = {}
        self.add = self.chunk.setdefault
        self._spills: list[pq.ParquetWriter | None] = [None] * self.PARTS
        self._seq = 0
        self.count = 0

    def _spill_path(self, part: int) -> str:
        return f"{self.local_path}.spill{part}"

    def maybe_spill(self) -> None:
        if len(self.chunk) >= IDENTIFIER_CHUNK_ROWS:
            self._write_chunk()

    def _write_chunk(self) -> None:
        if not self.chunk:
            return
        n = len(self.chunk)
        parts = pa.array([hash(v) & (self.PARTS - 1) for v in self.chunk], pa.int8())  # PARTS is a power of 2
        batch = pa.RecordBatch.from_arrays(
            [pa.array(list(self.chunk), pa.string()), pa.array(list(self.chunk.values()), pa.string()),
             pa.array(range(self._seq, self._seq + n), pa.int64())], schema=self._SPILL_SCHEMA)
        self._seq += n
        for p in range(self.PARTS):
            sub = batch.filter(pc.equal(parts, p))
            if not sub.num_rows:
                continue
            w = self._spills[p]
            if w is None:
                w = self._spills[p] = pq.ParquetWriter(self._spill_path(p), self._SPILL_SCHEMA, compression="zstd")
            w.write_batch(sub)
        self.chunk.clear()

    def close(self) -> None:
        writer = pq.ParquetWriter(self.local_path, IDENTIFIERS_SCHEMA, compression="zstd")
        try:
            if not any(self._spills):  # everything fitted in one chunk: already unique, in first-seen order
                if self.chunk:
                    writer.write_table(pa.table([pa.array(list(self.chunk), pa.string()),
                                                 pa.array(list(self.chunk.values()), pa.string())],
                                                schema=IDENTIFIERS_SCHEMA))
                self.count = len(self.chunk)
            else:
                self._write_chunk()
                for p, w in enumerate(self._spills):
                    if w is None:
                        continue
                    w.close()
                    part = pq.read_table(self._spill_path(p))  # in first-seen (_i) order
                    # one row per value, in first-seen order, with the kind it was first seen as
                    first = part.group_by("value", use_threads=False).aggregate([("kind", "first")])
                    part = first.rename_columns(["value", "kind"]).cast(IDENTIFIERS_SCHEMA)
                    writer.write_table(part)
                    self.count += part.num_rows
                    del part, first
                    _unlink(self._spill_path(p))
        finally:
            writer.close()
            self.chunk.clear()

    def abort(self) -> None:
        for p, w in enumerate(self._spills):
            if w is not None:
                try:
                    w.close()
                except Exception:  # noqa: BLE001
                    pass
            _unlink(self._spill_path(p))
        _unlink(self.local_path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _commit(store: Store, local_path: str, uri: str) -> None:
    if is_s3(uri):
        with open(local_path, "rb") as fh:
            store.write_bytes(uri, fh.read())
        _unlink(local_path)
    else:
        os.replace(local_path, uri)


def _validator(rtype: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class  # slow import: only when validating

    return get_fhir_model_class(rtype)


def _validation_reason(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors(include_url=False, include_input=False, include_context=False)[0]
            loc = ".".join(str(p) for p in first.get("loc", ())) or "<resource>"
            return f"validation failed at {loc} ({first.get('type', 'error')})"
        except Exception:  # noqa: BLE001
            pass
    return f"validation failed ({type(exc).__name__})"


# --------------------------------------------------------------------------------------------------
# The session: tables, quarantine, identifiers, counters
# --------------------------------------------------------------------------------------------------
class _Producer:
    """One table fed by one resource type: ``fn(resource, rid) -> rows``; ``pidx`` is the index of the
    table's patient_key column (None for the patient table itself or a table without one)."""

    __slots__ = ("writer", "fn", "pidx")

    def __init__(self, writer: _TableWriter, fn: Flattener, pidx: int | None):
        self.writer = writer
        self.fn = fn
        self.pidx = pidx


class IngestSession:
    """Flatten resources from any source into the tables of ``out_uri``. Feed it with
    :meth:`ingest_ndjson` (raw NDJSON, the fast path) or :meth:`ingest_resources` (parsed resources of
    mixed types, e.g. Bundle entries), then :meth:`finish` (commit, report) or :meth:`abort`.

    ``views``: extra ViewDefinitions (dicts), one table each; a view named like a built-in table replaces
    it. ``engine``: ``fast`` (hand-written flatteners for the four built-in tables) or ``views`` (every
    table through its ViewDefinition). ``on_dangling``: what to do with a resource whose patient reference
    names no Patient of this extract (checked when Patient is ingested): ``quarantine`` or ``keep``
    (counted in the report either way). Patient resources must be fed before the others for that check."""

    def __init__(self, out_uri: str, *, keyer: Keyer, store: Store | None = None,
                 resources: Iterable[str] = DEFAULT_RESOURCES, views: Iterable[dict] = (),
                 validate_sample_rate: float = 0.01, batch_rows: int = 50_000, engine: str = "fast",
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, on_dangling: str = "quarantine",
                 validate_first: int = ALWAYS_VALIDATE_FIRST, validate_max_per_type: int = 0,
                 native: bool = True):
        self.t0 = time.perf_counter()
        self.validate_first = max(int(validate_first), 0)
        # the sampled validation stops at this many validated resources of a type (0: no cap), so its cost is
        # bounded on large extracts (an R4B validation costs 0.3-0.6 ms, the flatten of a resource ~20 us)
        self.validate_cap = int(validate_max_per_type) if validate_max_per_type and validate_max_per_type > 0 else None
        self.validated_by_type: Counter = Counter()
        self.store = store or Store()
        self.out_uri = str(out_uri)
        if batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        if engine not in ("fast", "views"):
            raise ValueError("engine must be 'fast' or 'views'")
        if on_dangling not in ("quarantine", "keep"):
            raise ValueError("on_dangling must be 'quarantine' or 'keep'")
        self.batch_rows = batch_rows
        self.max_line_bytes = int(max_line_bytes)
        self.on_dangling = on_dangling
        rate = min(max(float(validate_sample_rate), 0.0), 1.0)
        self.threshold = int(rate * 0x100000000)
        self.key = fast_key(keyer)
        self.env = Env(self.key)

        # -- tables: built-in views of the requested types, then the user's views ---------------------
        resources = list(dict.fromkeys(resources))
        definitions: dict[str, dict] = {}
        for r in resources:
            name = BUILTIN_BY_RESOURCE.get(r)
            if name is not None:
                definitions[name] = BUILTIN_VIEWS[name]
        user_views = list(views or ())
        for i, v in enumerate(user_views):
            if not isinstance(v, dict) or not isinstance(v.get("name"), str):
                raise ExtractError(f"views[{i}]: a ViewDefinition needs a name")
            definitions[v["name"]] = v
        compiled: dict[str, CompiledView] = {}
        for name, d in definitions.items():
            builtin = d is BUILTIN_VIEWS.get(name)
            schema = TABLES[d["resource"]][1] if builtin and d["resource"] in TABLES else None
            try:
                compiled[name] = compile_view(d, schema=schema, where=f"views[{name}]" if not builtin else "")
            except ViewError as exc:
                raise ExtractError(f"invalid view: {exc}") from None
        covered = {v.resource for v in compiled.values()}
        unknown = [r for r in resources if r not in covered]
        if unknown or not compiled:
            raise ExtractError(
                f"unsupported resource type(s): {', '.join(map(str, unknown)) or '(none requested)'}; "
                f"supported: {', '.join(SUPPORTED_RESOURCES)} (others need a view in source.views)")
        self.resources = list(dict.fromkeys([*resources, *(v.resource for v in compiled.values())]))
        self.views = compiled

        # -- outputs ---------------------------------------------------------------------------------
        self.s3_out = is_s3(self.out_uri)
        self.tmpdir = tempfile.mkdtemp(prefix="synthfactory-ingest-") if self.s3_out else None
        if not self.s3_out:
            os.makedirs(self.out_uri, exist_ok=True)
        self.writers: dict[str, _TableWriter] = {}
        self.background = _BackgroundWriter()
        self.q_uri = join(self.out_uri, QUARANTINE_FILE)
        self.q_local = self._local_for(self.q_uri, QUARANTINE_FILE)
        self.ids_uri = join(self.out_uri, IDENTIFIERS_FILE)
        self.identifiers = _Identifiers(self._local_for(self.ids_uri, IDENTIFIERS_FILE))
        self.qfh = open(self.q_local, "wb")
        self._closed = False
        flatteners = _make_flatteners(self.key) if engine == "fast" else {}
        self.producers: dict[str, list[_Producer]] = {r: [] for r in self.resources}
        try:
            for name, view in compiled.items():
                uri = join(self.out_uri, f"{name}.parquet")
                w = _TableWriter(name, uri, view.schema, self._local_for(uri, f"{name}.parquet"), batch_rows,
                                 self.background)
                self.writers[name] = w
                fast = flatteners.get(view.resource) if FAST_TABLES.get(view.resource) == name \
                    and view.definition is BUILTIN_VIEWS.get(name) else None
                fn = fast or self._view_fn(view)
                pidx = view.schema.get_field_index("patient_key") if view.resource != "Patient" else -1
                self.producers[view.resource].append(_Producer(w, fn, pidx if pidx >= 0 else None))
        except BaseException:
            self.abort()
            raise

        # -- the compiled flatten (ingest.native) for the plain lines of the types it covers: only where the
        # type's single table is the hand-written one, whose rows it reproduces
        self.native: dict[str, Any] = {}
        self.native_lines: Counter = Counter()
        self._pool: Any = None
        try:
            for rtype, prods in self.producers.items() if native and engine == "fast" else ():
                if len(prods) == 1 and prods[0].fn is flatteners.get(rtype):
                    nf = _native.flattener(rtype, keyer)
                    cols = _native.columns(prods[0].writer.schema) if nf is not None else None
                    if cols is not None:  # its rows go straight into Arrow buffers
                        self.native[rtype] = nf
                        prods[0].writer.buf = cols
        except BaseException:
            self.abort()
            raise

        # -- counters --------------------------------------------------------------------------------
        self.seen: dict[str, set[str]] = {r: set() for r in self.resources}
        self.patient_keys: set[str] | None = set() if "Patient" in self.producers else None
        self.resources_read = dict.fromkeys(self.resources, 0)
        self.quarantined = dict.fromkeys(self.resources, 0)
        self.reasons: dict[str, dict[str, int]] = {}
        self.candidates = dict.fromkeys(self.resources, 0)
        self.skipped_resources: dict[str, int] = {}
        self.dangling: dict[str, int] = {}
        self.validated = 0
        self.files: list[str] = []
        self.file_sha256: dict[str, str] = {}

    def _local_for(self, uri: str, name: str) -> str:
        return os.path.join(self.tmpdir, name) if self.tmpdir else uri + ".partial"

    def _prepare_pool(self) -> Any:
        """The helper thread of the compiled flatten's prepare phase (started on first use)."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthfactory-ingest-flatten")
        return self._pool

    def _stop_pool(self) -> None:
        pool = getattr(self, "_pool", None)  # abort() may run before __init__ set it
        if pool is not None:
            self._pool = None
            pool.shutdown(wait=True, cancel_futures=True)

    def _view_fn(self, view: CompiledView) -> Flattener:
        rows = view.rows
        env = self.env
        return lambda o, rid: rows(o, env)

    # -- quarantine --------------------------------------------------------------------------------
    def quarantine(self, fname: str, lineno: int, rtype: str | None, reason: str) -> None:
        self.qfh.write(orjson.dumps({"file": fname, "line": lineno, "resource_type": rtype, "reason": reason}))
        self.qfh.write(b"\n")
        per = self.reasons.setdefault(rtype or "(unknown)", {})
        per[reason] = per.get(reason, 0) + 1

    # -- NDJSON: the hot loop ------------------------------------------------------------------------
    def ingest_ndjson(self, name: str, uri: str, rtype: str) -> None:
        """Flatten one NDJSON file (``.gz`` by name) of resource type ``rtype`` from the session's store."""
        fname = name.rsplit("/", 1)[-1]
        hasher = hashlib.sha256()
        reader = _HashingReader(self.store.open_read(uri), hasher)
        tf = time.perf_counter()
        stream: Any = gzip.GzipFile(fileobj=reader) if name.endswith(".gz") else reader
        chunks = prefetched(stream)
        try:
            n_read, n_bad = self._ingest_lines(fname, rtype, line_blocks(chunks, self.max_line_bytes))
            reader.drain()  # every byte of the file is in the hash, even after a trailing gzip member
        except (gzip.BadGzipFile, EOFError, zlib.error):
            raise ExtractError(f"extract file {name} is not valid gzip or is truncated") from None
        finally:
            chunks.close()  # stops and joins the reader thread
            reader.release()
        self.files.append(name)
        self.file_sha256[name] = hasher.hexdigest()
        log.info("ingested %s: %d resources, %d quarantined, %.2fs", fname, n_read, n_bad, time.perf_counter() - tf)

    def _ingest_lines(self, fname: str, rtype: str, blocks: Iterable[list]) -> tuple[int, int]:
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        quarantine = self.quarantine
        producers = self.producers[rtype]
        single = producers[0] if len(producers) == 1 else None
        flat = single.fn if single else None
        writer = single.writer if single else None
        buf = writer.buf if writer else None
        pidx = single.pidx if single else None
        batch_rows = self.batch_rows
        seen_ids = self.seen[rtype]
        is_patient = rtype == "Patient"
        pkeys = self.patient_keys if (self.patient_keys and not is_patient) else None
        patient_keys = self.patient_keys
        keep_dangling = self.on_dangling == "keep"
        add_ident = self.identifiers.add
        ids_chunk = self.identifiers.chunk
        threshold = self.threshold
        validate_first = self.validate_first
        vcap = self.validate_cap
        vdone = self.validated_by_type[rtype]
        file_salt = zlib.crc32(fname.encode())
        key = self.key
        n_read = n_bad = 0
        n_cand = self.candidates[rtype]
        validated = 0
        lineno = 0
        native = self.native.get(rtype) if single is not None else None
        commit = native.commit if native is not None else None
        pairs: Iterable[tuple[list, Any]] = _native.prepared(blocks, native, self._prepare_pool()) \
            if native is not None else ((b, None) for b in blocks)
        n_native = 0
        for block, prep in pairs:
            if len(ids_chunk) >= IDENTIFIER_CHUNK_ROWS:
                self.identifiers.maybe_spill()
            pos, nblock = 0, len(block)
            while pos < nblock:
                if commit is None:
                    seg, pos = block, nblock
                else:  # the compiled flatten takes the plain lines; the loop below gets the others, one by one
                    nxt, took, why = commit(prep, pos, lineno, buf, seen_ids, pkeys, ids_chunk, n_cand, vdone,
                                            -1 if vcap is None else vcap, validate_first, threshold, file_salt,
                                            batch_rows)
                    lineno += nxt - pos
                    n_read += took
                    n_cand += took
                    n_native += took
                    pos = nxt
                    if why == 2:  # buffer full
                        writer.flush()
                        buf = writer.buf
                        continue
                    if why == 0:
                        break
                    seg, pos = block[pos:pos + 1], pos + 1
                for raw in seg:
                    lineno += 1
                    if not raw:
                        if raw is _OVERSIZE:
                            n_read += 1
                            n_bad += 1
                            quarantine(fname, lineno, rtype, f"line longer than {self.max_line_bytes} bytes")
                        continue
                    try:
                        o = loads(raw)
                    except decode_error:
                        if not raw.strip():
                            continue
                        o = None
                        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                            try:
                                o = loads(raw[3:])
                            except decode_error:
                                o = None
                        if o is None:
                            n_read += 1
                            n_bad += 1
                            quarantine(fname, lineno, rtype, "invalid JSON")
                            continue
                    n_read += 1
                    if type(o) is not dict:
                        n_bad += 1
                        quarantine(fname, lineno, rtype, "not a JSON object")
                        continue
                    rt = o.get("resourceType")
                    if rt != rtype:
                        n_bad += 1
                        quarantine(fname, lineno, rtype, "missing resourceType" if rt is None else "resourceType mismatch")
                        continue
                    rid = o.get("id")
                    if type(rid) is not str or not rid:
                        n_bad += 1
                        quarantine(fname, lineno, rtype, "missing id")
                        continue
                    add_ident(rid, "id")
                    if is_patient or "identifier" in o:
                        collect_identifiers(o, is_patient, add_ident)
                    if rid in seen_ids:
                        n_bad += 1
                        quarantine(fname, lineno, rtype, "duplicate id")
                        continue
                    if b'"modifierExtension"' in raw and has_modifier_extension(o):
                        n_bad += 1
                        quarantine(fname, lineno, rtype, "unknown modifierExtension")
                        continue
                    n_cand += 1
                    if n_cand <= validate_first or (
                            threshold and (vcap is None or vdone < vcap)
                            and ((lineno * 2654435761 + file_salt) & 0xFFFFFFFF) < threshold):
                        validated += 1
                        vdone += 1
                        try:
                            _validator(rtype).model_validate(o)
                        except Exception as exc:  # noqa: BLE001 - any model failure quarantines
                            n_bad += 1
                            quarantine(fname, lineno, rtype, _validation_reason(exc))
                            continue
                    if single is not None:
                        try:
                            rows = flat(o, rid)
                        except _Bad as bad:
                            n_bad += 1
                            quarantine(fname, lineno, rtype, bad.reason)
                            continue
                        except (AttributeError, TypeError, KeyError, IndexError, ValueError, OverflowError):
                            n_bad += 1
                            quarantine(fname, lineno, rtype, "malformed resource structure")
                            continue
                        if pkeys is not None and rows:
                            pk = rows[0][pidx]
                            if pk is not None and pk not in pkeys:
                                self.dangling[rtype] = self.dangling.get(rtype, 0) + 1
                                if not keep_dangling:
                                    n_bad += 1
                                    quarantine(fname, lineno, rtype, "dangling reference to Patient")
                                    continue
                        seen_ids.add(rid)
                        if is_patient and patient_keys is not None:
                            patient_keys.add(key("Patient", rid))
                        buf.extend(rows)
                        if len(buf) >= batch_rows:
                            writer.flush()
                            buf = writer.buf
                    else:
                        reason = self._produce(o, rid, rtype, producers, pkeys, keep_dangling)
                        if reason is not None:
                            n_bad += 1
                            quarantine(fname, lineno, rtype, reason)
                            continue
                        seen_ids.add(rid)
        self.candidates[rtype] = n_cand
        self.native_lines[rtype] += n_native
        self.validated += validated
        self.validated_by_type[rtype] = vdone
        self.resources_read[rtype] += n_read
        self.quarantined[rtype] += n_bad
        return n_read, n_bad

    def _produce(self, o: dict, rid: str, rtype: str, producers: list[_Producer], pkeys: set[str] | None,
                 keep_dangling: bool) -> str | None:
        """All tables of a resource type (the general path): rows are added only when every table took the
        resource. Returns a quarantine reason, or None."""
        out = []
        try:
            for p in producers:
                out.append((p, p.fn(o, rid)))
        except _Bad as bad:
            return bad.reason
        except (AttributeError, TypeError, KeyError, IndexError, ValueError, OverflowError):
            return "malformed resource structure"
        if pkeys is not None:
            for p, rows in out:
                if p.pidx is not None and rows:
                    pk = rows[0][p.pidx]
                    if pk is not None and pk not in pkeys:
                        self.dangling[rtype] = self.dangling.get(rtype, 0) + 1
                        if not keep_dangling:
                            return "dangling reference to Patient"
                        break
        if rtype == "Patient" and self.patient_keys is not None:
            self.patient_keys.add(self.key("Patient", rid))
        for p, rows in out:
            buf = p.writer.buf
            buf.extend(rows)
            if len(buf) >= self.batch_rows:
                p.writer.flush()
        return None

    # -- parsed resources of mixed types (Bundles, search pages) ----------------------------------------
    def ingest_resources(self, fname: str, items: Iterable[tuple[int, Any]]) -> None:
        """Flatten parsed resources ``(position, resource)`` of any type; types not requested are counted
        in ``skipped_resources``. Positions are what the quarantine records as ``line``."""
        for pos, o in items:
            if type(o) is not dict:
                self.quarantine(fname, pos, None, "not a JSON object")
                continue
            rtype = o.get("resourceType")
            if type(rtype) is not str:
                self.quarantine(fname, pos, None, "missing resourceType")
                continue
            producers = self.producers.get(rtype)
            if producers is None:
                self.skipped_resources[rtype] = self.skipped_resources.get(rtype, 0) + 1
                continue
            self.resources_read[rtype] += 1
            reason = self._check(o, rtype, fname, pos)
            if reason is None:
                rid = o["id"]
                is_patient = rtype == "Patient"
                pkeys = self.patient_keys if (self.patient_keys and not is_patient) else None
                reason = self._produce(o, rid, rtype, producers, pkeys, self.on_dangling == "keep")
                if reason is None:
                    self.seen[rtype].add(rid)
                    continue
            self.quarantined[rtype] += 1
            self.quarantine(fname, pos, rtype, reason)

    def _check(self, o: dict, rtype: str, fname: str, pos: int) -> str | None:
        rid = o.get("id")
        if type(rid) is not str or not rid:
            return "missing id"
        add = self.identifiers.add
        add(rid, "id")
        is_patient = rtype == "Patient"
        if is_patient or "identifier" in o:
            collect_identifiers(o, is_patient, add)
        self.identifiers.maybe_spill()
        if rid in self.seen[rtype]:
            return "duplicate id"
        if has_modifier_extension(o):
            return "unknown modifierExtension"
        self.candidates[rtype] += 1
        if self.candidates[rtype] <= self.validate_first or (
                self.threshold
                and (self.validate_cap is None or self.validated_by_type[rtype] < self.validate_cap)
                and ((pos * 2654435761 + zlib.crc32(fname.encode())) & 0xFFFFFFFF) < self.threshold):
            self.validated += 1
            self.validated_by_type[rtype] += 1
            try:
                _validator(rtype).model_validate(o)
            except Exception as exc:  # noqa: BLE001
                return _validation_reason(exc)
        return None

    def record_file(self, name: str, sha256: str) -> None:
        """Note a source file that was read outside :meth:`ingest_ndjson` (e.g. a Bundle)."""
        self.files.append(name)
        self.file_sha256[name] = sha256

    # -- end ---------------------------------------------------------------------------------------
    def finish(self, *, source: str, skipped_files: Iterable[str] = (), extra: dict | None = None,
               require_patients: bool = True) -> dict:
        """Commit every output and write the report. Raises ExtractError when no valid Patient was found
        (the quarantine file is kept to explain why)."""
        committed = False
        try:
            self._stop_pool()
            self.qfh.close()
            for w in self.writers.values():
                w.close()
            self.background.shutdown()
            patient_table = BUILTIN_BY_RESOURCE["Patient"]
            if require_patients and patient_table in self.writers and self.writers[patient_table].rows == 0:
                _commit(self.store, self.q_local, self.q_uri)
                raise ExtractError(
                    f"extract is empty: no valid Patient resource in {source} "
                    f"({self.resources_read.get('Patient', 0)} read, {self.quarantined.get('Patient', 0)} "
                    f"quarantined; see {self.q_uri})")
            self.identifiers.close()
            for w in self.writers.values():
                _commit(self.store, w.local_path, w.uri)
            _commit(self.store, self.q_local, self.q_uri)
            _commit(self.store, self.identifiers.local_path, self.ids_uri)
            committed = True
        finally:
            if not committed:
                self.abort()
            elif self.tmpdir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
        seconds = time.perf_counter() - self.t0
        total_read = sum(self.resources_read.values())
        total_q = sum(self.quarantined.values())
        files = sorted(self.files)
        digest = hashlib.sha256()
        for name in files:
            digest.update(f"{name}\0{self.file_sha256[name]}\n".encode())
        report = {
            "tables": {n: w.uri for n, w in self.writers.items()},
            "rows": {n: w.rows for n, w in self.writers.items()},
            "resources_read": self.resources_read,
            "quarantined": self.quarantined,
            "quarantined_total": total_q,
            "quarantine_reasons": self.reasons,
            "quarantine_uri": self.q_uri,
            "identifiers_uri": self.ids_uri,
            "identifiers": self.identifiers.count,
            "extract_sha256": digest.hexdigest(),
            "file_sha256": {n: self.file_sha256[n] for n in files},
            "files": files,
            "skipped_files": sorted(skipped_files),
            "skipped_resources": dict(sorted(self.skipped_resources.items())),
            "dangling_references": self.dangling,
            "validated": self.validated,
            "validated_by_type": dict(sorted(self.validated_by_type.items())),
            "views": sorted(self.views),
            "native_lines": dict(sorted(self.native_lines.items())),
            "seconds": round(seconds, 3),
            "resources_per_second": round(total_read / seconds, 1) if seconds > 0 else 0.0,
            **(extra or {}),
        }
        self.store.write_json(join(self.out_uri, REPORT_FILE), report)
        log.info("ingest done: %d resources read, %d quarantined, %d validated, rows %s, %.2fs (%.0f resources/s)",
                 total_read, total_q, self.validated, report["rows"], seconds, report["resources_per_second"])
        return report

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_pool()
        try:
            self.qfh.close()
        except Exception:  # noqa: BLE001
            pass
        for w in self.writers.values():
            w.abort()
        try:
            self.background.shutdown()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
        self.identifiers.abort()
        _unlink(self.q_local)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# File discovery
# --------------------------------------------------------------------------------------------------
def _match_type(name: str, resources: Iterable[str]) -> str | None:
    if not (name.endswith(".ndjson") or name.endswith(".ndjson.gz")):
        return None
    for rtype in resources:
        if name.startswith(rtype) and len(name) > len(rtype) and name[len(rtype)] in ".-_":
            return rtype
    return None


def _relative(uri: str, source_uri: str) -> str:
    if is_s3(source_uri):
        base = source_uri.rstrip("/") + "/"
        return uri[len(base):] if uri.startswith(base) else uri.rsplit("/", 1)[-1]
    return os.path.relpath(uri, source_uri)


def list_source(source_uri: str, store: Store) -> list[str]:
    """The files under a local folder or s3:// prefix; ExtractError when it does not exist."""
    if not is_s3(source_uri) and not os.path.isdir(source_uri):
        raise ExtractError(f"extract not found: {source_uri}")
    try:
        all_uris = store.listdir(source_uri)
    except Exception as exc:  # noqa: BLE001 - only a missing bucket is turned into a user-facing error
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") == "NoSuchBucket":
            raise ExtractError(f"extract not found: {source_uri}") from None
        raise
    if is_s3(source_uri) and not all_uris:
        raise ExtractError(f"extract not found: {source_uri}")
    return all_uris


def processing_order(rtype: str) -> int:
    """Patients first (the dangling-reference check needs their keys), then encounters, then the rest."""
    return {"Patient": 0, "Encounter": 1}.get(rtype, 2)


def discover_ndjson(source_uri: str, store: Store, resources: Iterable[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(name, uri, type)] in processing order, [skipped names]) of an NDJSON extract folder."""
    all_uris = list_source(source_uri, store)
    by_len = sorted(resources, key=len, reverse=True)  # a type never swallows another that it prefixes
    found: list[tuple[str, str, str]] = []
    skipped: list[str] = []
    for uri in all_uris:
        name = _relative(uri, source_uri)
        rtype = None if "/" in name else _match_type(name, by_len)
        if rtype is None:
            skipped.append(name)
        else:
            found.append((name, uri, rtype))
    found.sort(key=lambda f: (processing_order(f[2]), f[0]))
    skipped.sort()
    return found, skipped


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def ingest_extract(
    source_uri: str,
    out_uri: str,
    *,
    keyer: Keyer,
    store: Store | None = None,
    resources: Iterable[str] = DEFAULT_RESOURCES,
    validate_sample_rate: float = 0.01,
    batch_rows: int = 50_000,
    views: Iterable[dict] = (),
    engine: str = "fast",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    on_dangling: str = "quarantine",
    extra_report: dict | None = None,
    validate_first: int = ALWAYS_VALIDATE_FIRST,
    validate_max_per_type: int = 0,
    native: bool = True,
) -> dict:
    """Flatten a FHIR R4 NDJSON extract into pseudonymised Parquet tables under ``out_uri``.

    Returns (and writes as ``ingest_report.json``) a report of counts, URIs, timings and the extract's
    sha256 (over the sorted file names and each file's sha256). Raises :class:`ExtractError` for a missing
    or empty extract."""
    with gc_paused():
        store = store or Store()
        source_uri, out_uri = str(source_uri), str(out_uri)
        resources = list(dict.fromkeys(resources))
        if not resources:
            raise ExtractError("unsupported resource type(s): (none requested)")
        views = list(views or ())
        check_resources(resources, views)
        wanted = list(dict.fromkeys([*resources, *(v.get("resource") for v in views if isinstance(v, dict)
                                                   and isinstance(v.get("resource"), str))]))
        found, skipped = discover_ndjson(source_uri, store, wanted)
        if not found:
            raise ExtractError(
                f"extract is empty: no NDJSON file for {', '.join(wanted)} in {source_uri} "
                f"(expected e.g. Patient.ndjson or Patient.ndjson.gz; {len(skipped)} other file(s) ignored)")
        session = IngestSession(out_uri, keyer=keyer, store=store, resources=resources, views=views,
                                validate_sample_rate=validate_sample_rate, batch_rows=batch_rows, engine=engine,
                                max_line_bytes=max_line_bytes, on_dangling=on_dangling, validate_first=validate_first,
                                validate_max_per_type=validate_max_per_type, native=native)
        try:
            for name, uri, rtype in found:
                session.ingest_ndjson(name, uri, rtype)
        except BaseException:
            session.abort()
            raise
        return session.finish(source=source_uri, skipped_files=skipped, extra=extra_report)


def check_resources(resources: Iterable[str], views: Iterable[Any] = ()) -> None:
    """ExtractError when a requested type has neither a built-in view nor a user view."""
    covered = set(BUILTIN_BY_RESOURCE) | {v.get("resource") for v in views if isinstance(v, dict)}
    unknown = [r for r in resources if r not in covered]
    if unknown:
        raise ExtractError(
            f"unsupported resource type(s): {', '.join(map(str, unknown))}; "
            f"supported: {', '.join(SUPPORTED_RESOURCES)} (others need a view in source.views)")


class gc_paused:
    """Parsing allocates millions of short-lived, acyclic dicts: the cyclic GC would walk them every few
    hundred lines. Pause it for the call (reference counting still frees everything) and restore it."""

    def __enter__(self) -> "gc_paused":
        self.was = gc.isenabled()
        gc.disable()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.was:
            gc.enable()
