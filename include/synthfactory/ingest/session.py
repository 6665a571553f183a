"""The ingest session: what every source (NDJSON, Bundles, REST search pages, Bulk Data downloads, EHR
tables) writes through, so that every source ends in the same outputs.

:class:`IngestSession` turns resources into rows (the hand-written :mod:`.flatteners` for the four built-in
tables on ``engine="fast"``, compiled SQL-on-FHIR ViewDefinitions (:mod:`.views`) for every other table),
checks them (ids, duplicates, modifierExtensions, a sampled R4B validation, dangling patient references),
and writes, under ``out_uri`` (the secure staging area):

* ``<table>.parquet``: the flattened tables, as zstd row groups of ``batch_rows`` rows with explicit Arrow
  schemas, encoded on a helper thread. Every source id is replaced by a salted HMAC key; names,
  identifiers, addresses and telecoms are never written to them.
* ``quarantine.ndjson``: one record per rejected line or resource (file name, 1-based line number or entry
  position, resource type, short reason). Never the raw line nor any value from it.
* ``identifiers.parquet``: the real direct identifiers seen (ids, identifier values, names, address
  lines, telecoms) for the downstream leak scan. It stays in staging.
* ``ingest_report.json``: counts (per type and reason), URIs, timings and the extract's sha256.

Every output is written to a local partial file and committed (renamed, or uploaded to s3://) at
:meth:`IngestSession.finish`; :meth:`IngestSession.abort` removes them.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synthfactory.keys import Keyer
from synthfactory.storage import Store, is_s3, join

from . import native as native_flatten
from synthfactory.fhir.fhirpath import Env
from .flatteners import FAST_TABLES, Flattener, ValueRules, make_flatteners, reference_ok
from synthfactory.fhir.normalize import BadResource, ExtractError, collect_identifiers, fast_key, has_modifier_extension, timestamp_array
from .schemas import IDENTIFIERS_SCHEMA, TABLES
from synthfactory.fhir.views import (BUILTIN_BY_RESOURCE, BUILTIN_VIEWS, CompiledView, ViewError, check_free_text,
                                     compile_view)

log = logging.getLogger(__name__)

__all__ = ["IngestSession", "TableWriter", "Producer", "SUPPORTED_RESOURCES", "DEFAULT_RESOURCES",
           "DEFAULT_MAX_LINE_BYTES", "check_resources", "list_source", "scan_source", "relative_name", "gc_paused",
           "validation_failure"]

SUPPORTED_RESOURCES = tuple(BUILTIN_BY_RESOURCE)
DEFAULT_RESOURCES = ("Patient", "Encounter", "Condition", "Observation")
ALWAYS_VALIDATE_FIRST = 20
IDENTIFIER_CHUNK_ROWS = 200_000
DEFAULT_MAX_LINE_BYTES = 16 << 20

QUARANTINE_FILE = "quarantine.ndjson"
IDENTIFIERS_FILE = "identifiers.parquet"
REPORT_FILE = "ingest_report.json"


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------
class _BackgroundWriter:
    """One helper thread that encodes and compresses Parquet row groups (pyarrow releases the GIL there)
    while the caller's thread keeps parsing. FIFO; at most ``depth`` batches in flight (4: with 2 the ingest
    thread waited ~0.3 s on it at 2M resources; 4 took 3 % off the wall time there, for ~30 MiB more peak)."""

    def __init__(self, depth: int = 4):
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


class TableWriter:
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
        # the pseudonymous keys are unique HMACs: a dictionary would only be built to be dropped, and their
        # min/max statistics prune nothing (a key range says nothing about which keys a row group holds).
        # Times and numbers are mostly distinct too: dictionaries for the coded (string) columns only
        coded = [f.name for f in schema if not f.name.endswith("_key")]
        self._writer = pq.ParquetWriter(local_path, schema, compression="zstd", write_statistics=coded,
                                        use_dictionary=[f.name for f in schema if f.name in coded
                                                        and pa.types.is_string(f.type)])

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
            arrays = native_flatten.arrays(self.buf, self.schema)
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


def _first_seen(values: Any, kinds: Any) -> tuple[pa.Array, pa.Array]:
    """(unique values in first-seen order, the kind each was first seen with) of string arrays or chunked
    arrays: the compiled one-pass mask of each value's first string (:func:`.native.first_seen_mask`); without
    it, Arrow's hash memo gives the first-seen order and numpy the first position of each value."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(kinds, pa.ChunkedArray):
        kinds = kinds.combine_chunks()
    if not len(values):
        return values, kinds
    first = native_flatten.first_seen_mask(values)  # one hash pass; Arrow's hash memo took ~4x as long
    if first is not None:
        keep = pa.array(first)
        return values.filter(keep), kinds.filter(keep)
    enc = pc.dictionary_encode(values)
    _, first = np.unique(enc.indices.to_numpy(zero_copy_only=False), return_index=True)
    return enc.dictionary, kinds.take(pa.array(first))


def _partitions(values: pa.Array, parts: int) -> pa.Array:
    """A partition in [0, parts) of each string, a function of its bytes alone (the same value always lands in
    the same partition), vectorised over the Arrow buffers: a mix of the length and of a few bytes (the last
    four, the first, the middle one), gathered without converting the whole data buffer."""
    n = len(values)
    if not n:
        return pa.array([], pa.int8())
    bufs = values.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=values.offset * 4).astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(1, np.uint8)
    start, end = offs[:-1], offs[1:]
    lens = end - start
    top = len(data) - 1
    h = lens.astype(np.uint64) * np.uint64(0x9E3779B1)
    for k, pos in enumerate((end - 1, end - 2, end - 3, end - 4, start, start + lens // 2)):
        byte = data[np.clip(pos, 0, top)].astype(np.uint64)
        byte[(pos < start) | (pos >= end)] = 0  # shorter than the position: no byte there
        h = ((h ^ byte) * np.uint64(0x100000001B3 + 2 * k)) & np.uint64(0xFFFFFFFFFFFF)
    return pa.array(((h >> np.uint64(20)) & np.uint64(parts - 1)).astype(np.int8))


class _Identifiers:
    """The direct identifiers seen, spilled in chunks to ``PARTS`` files by a hash of the value and
    deduplicated one partition at a time at the end (first kind wins), so memory stays bounded on large
    extracts (a value always lands in the same partition).

    With the compiled module the chunk is a ``Columns("ss")`` buffer of (value, kind) as Arrow buffers (the
    compiled commit appends ids and identifier values to it without a Python object each; ``add`` appends
    too) and it is deduplicated with Arrow when it spills; without it, a dict (deduplicated as it fills)."""

    PARTS = 16  # a power of 2
    _SPILL_SCHEMA = pa.schema([pa.field("value", pa.string()), pa.field("kind", pa.string()),
                               pa.field("_i", pa.int64())])

    def __init__(self, local_path: str, background: _BackgroundWriter | None = None):
        self.local_path = local_path
        self._background = background  # spills are partitioned and written there, off the ingest thread
        self.chunk: Any = native_flatten.columns(IDENTIFIERS_SCHEMA)
        # a value in Arrow buffers costs ~35 bytes, in the dict ~150: the same memory holds 4x more rows
        self.chunk_rows = IDENTIFIER_CHUNK_ROWS * 4
        if self.chunk is None:
            self.chunk_rows = IDENTIFIER_CHUNK_ROWS
            self.chunk = {}
            self.add = self.chunk.setdefault
        else:
            append = self.chunk.append

            def add(value: str, kind: str) -> None:
                append((value, kind))

            self.add = add
        self._spills: list[pq.ParquetWriter | None] = [None] * self.PARTS
        self._seq = 0
        self.count = 0

    def _spill_path(self, part: int) -> str:
        return f"{self.local_path}.spill{part}"

    def maybe_spill(self) -> None:
        if len(self.chunk) >= self.chunk_rows:
            self._write_chunk()

    def _take(self, unique: bool = True) -> tuple[pa.Array, pa.Array]:
        """The chunk's (values, kinds), in first-seen order, unique if ``unique`` (a spill leaves that to
        :meth:`close`); the chunk is empty afterwards."""
        if type(self.chunk) is dict:
            values = pa.array(list(self.chunk), pa.string())
            kinds = pa.array(list(self.chunk.values()), pa.string())
            self.chunk.clear()
            return values, kinds
        values, kinds = native_flatten.arrays(self.chunk, IDENTIFIERS_SCHEMA)
        return _first_seen(values, kinds) if unique else (values, kinds)

    def _write_chunk(self) -> None:
        if not len(self.chunk):
            return
        values, kinds = self._take(unique=False)
        n = len(values)
        seq = pa.array(np.arange(self._seq, self._seq + n, dtype=np.int64))
        self._seq += n
        if self._background is not None:
            self._background.submit(self._spill, values, kinds, seq)
        else:
            self._spill(values, kinds, seq)

    def _rest_by_partition(self) -> dict[int, tuple[pa.Array, pa.Array]]:
        """The chunk's (values, kinds) by partition, each in the chunk's order (the chunk is empty afterwards): at
        the end the last chunk joins its partitions' spills in memory instead of going through the spill files."""
        if not len(self.chunk):
            return {}
        values, kinds = self._take(unique=False)
        parts = _partitions(values, self.PARTS).to_numpy()
        order = np.argsort(parts, kind="stable")
        values, kinds = values.take(pa.array(order)), kinds.take(pa.array(order))
        counts = np.bincount(parts, minlength=self.PARTS)
        out, at = {}, 0
        for p in range(self.PARTS):
            if counts[p]:
                out[p] = (values.slice(at, counts[p]), kinds.slice(at, counts[p]))
                at += int(counts[p])
        return out

    def _spill(self, values: pa.Array, kinds: pa.Array, seq: pa.Array) -> None:
        """Write one chunk to the partition files (FIFO on the background writer: the files keep seq order)."""
        parts = _partitions(values, self.PARTS)
        batch = pa.RecordBatch.from_arrays([values, kinds, seq], schema=self._SPILL_SCHEMA)
        for p in range(self.PARTS):
            sub = batch.filter(pc.equal(parts, p))
            if not sub.num_rows:
                continue
            w = self._spills[p]
            if w is None:
                # a spill file lives until close: written plain (no compression, no dictionary), it costs little
                w = self._spills[p] = pq.ParquetWriter(self._spill_path(p), self._SPILL_SCHEMA, compression="none",
                                                       use_dictionary=False, write_statistics=False)
            w.write_batch(sub)

    def close(self) -> None:
        writer = pq.ParquetWriter(self.local_path, IDENTIFIERS_SCHEMA, compression="zstd", use_dictionary=["kind"])
        try:
            if not any(self._spills):  # everything fitted in one chunk: unique, in first-seen order
                if len(self.chunk):
                    values, kinds = self._take()
                    writer.write_table(pa.table([values, kinds], schema=IDENTIFIERS_SCHEMA))
                    self.count = len(values)
            else:
                if self._background is not None:
                    self._background.wait()  # the spills in flight
                rest = self._rest_by_partition()  # the last chunk stays in memory: it comes after every spill
                spilled = [p for p, w in enumerate(self._spills) if w is not None]
                for p in spilled:
                    self._spills[p].close()
                parts = sorted(set(spilled) | set(rest))

                def load(p: int) -> tuple[pa.Array, pa.Array]:
                    # in first-seen order: the rows were written in _i order, which only orders the writes
                    values, kinds = [], []
                    if self._spills[p] is not None:
                        part = pq.read_table(self._spill_path(p), columns=["value", "kind"])
                        _unlink(self._spill_path(p))
                        values += part.column("value").chunks
                        kinds += part.column("kind").chunks
                    if p in rest:
                        values.append(rest[p][0])
                        kinds.append(rest[p][1])
                    # one row per value, in first-seen order, with the kind it was first seen as
                    return _first_seen(pa.chunked_array(values, pa.string()), pa.chunked_array(kinds, pa.string()))

                # the next partition is read and deduplicated (Arrow and the compiled pass release the GIL) while
                # this one is compressed and written: two partitions in memory at a time, as many as one was
                # when there were half as many partitions (two loaders ahead were no faster on 2 cores)
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthfactory-identifiers") as pool:
                    nxt = pool.submit(load, parts[0]) if parts else None
                    for k in range(len(parts)):
                        values, kinds = nxt.result()
                        nxt = pool.submit(load, parts[k + 1]) if k + 1 < len(parts) else None
                        writer.write_table(pa.table([values, kinds], schema=IDENTIFIERS_SCHEMA))
                        self.count += len(values)
                        del values, kinds
        finally:
            writer.close()
            if type(self.chunk) is dict:
                self.chunk.clear()
            else:
                self.chunk.take()

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


def validation_failure(rtype: str, resource: dict) -> str | None:
    """The quarantine reason when the R4B model of ``rtype`` rejects ``resource``; None when it accepts it."""
    try:
        _validator(rtype).model_validate(resource)
    except Exception as exc:  # noqa: BLE001 - any model failure quarantines
        return _validation_reason(exc)
    return None


#: the references the hand-written flatteners key, per type: ((field, fallback field), target type)
#: built-in views whose rows the compiled flatten (:mod:`.native`) reproduces for plain lines
_NATIVE_VIEWS = ("medication_request", "procedure")

_REF_FIELDS = {"Encounter": ((("subject",), "Patient"),),
               "Condition": ((("subject",), "Patient"), (("encounter", "context"), "Encounter")),
               "Observation": ((("subject",), "Patient"), (("encounter", "context"), "Encounter"))}


# --------------------------------------------------------------------------------------------------
# The session: tables, quarantine, identifiers, counters
# --------------------------------------------------------------------------------------------------
class Producer:
    """One table fed by one resource type: ``fn(resource, rid) -> rows``; ``pidx`` is the index of the
    table's patient_key column (None for the patient table itself or a table without one)."""

    __slots__ = ("writer", "fn", "pidx")

    def __init__(self, writer: TableWriter, fn: Flattener, pidx: int | None):
        self.writer = writer
        self.fn = fn
        self.pidx = pidx


class IngestSession:
    """Flatten resources from any source into the tables of ``out_uri``. Feed it with
    :func:`.fhir_ndjson.ingest_ndjson` (raw NDJSON lines, the fast path), :meth:`ingest_resources` (parsed
    resources of mixed types, e.g. Bundle entries) or rows of its :attr:`writers` (:mod:`.ehr`), then
    :meth:`finish` (commit, report) or :meth:`abort`.

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
                 native: bool = True, value_rules: ValueRules | None = None):
        self.t0 = time.perf_counter()
        self.value_rules = value_rules or ValueRules()
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
            # free text and direct identifiers never reach a table: a user view selecting them is refused
            check_free_text(v, self.value_rules.text_columns, where=f"views[{v['name']}]")
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
        self.writers: dict[str, TableWriter] = {}
        self.background = _BackgroundWriter()
        self.q_uri = join(self.out_uri, QUARANTINE_FILE)
        self.q_local = self._local_for(self.q_uri, QUARANTINE_FILE)
        self.ids_uri = join(self.out_uri, IDENTIFIERS_FILE)
        self.identifiers = _Identifiers(self._local_for(self.ids_uri, IDENTIFIERS_FILE), self.background)
        self.qfh = open(self.q_local, "wb")
        self._closed = False
        flatteners = make_flatteners(self.key, self.value_rules) if engine == "fast" else {}
        self.producers: dict[str, list[Producer]] = {r: [] for r in self.resources}
        native_views: dict[str, Any] = {}  # resource type -> the flattener of its built-in view, when compiled too
        try:
            for name, view in compiled.items():
                uri = join(self.out_uri, f"{name}.parquet")
                w = TableWriter(name, uri, view.schema, self._local_for(uri, f"{name}.parquet"), batch_rows,
                                self.background)
                self.writers[name] = w
                fast = flatteners.get(view.resource) if FAST_TABLES.get(view.resource) == name \
                    and view.definition is BUILTIN_VIEWS.get(name) else None
                fn = fast or self._view_fn(view)
                if fast is None and view.definition is BUILTIN_VIEWS.get(name) and name in _NATIVE_VIEWS:
                    native_views[view.resource] = fn
                pidx = view.schema.get_field_index("patient_key") if view.resource != "Patient" else -1
                self.producers[view.resource].append(Producer(w, fn, pidx if pidx >= 0 else None))
        except BaseException:
            self.abort()
            raise

        # -- the compiled flatten (ingest.native) for the plain lines of the types it covers: only where the
        # type's single table is the hand-written one, whose rows it reproduces
        self.native: dict[str, Any] = {}
        self.native_lines: Counter = Counter()
        self._pool: Any = None
        self._preparers: dict[str, Any] = {}
        self._keyer = keyer
        try:
            for rtype, prods in self.producers.items() if native and engine == "fast" else ():
                if len(prods) == 1 and (prods[0].fn is flatteners.get(rtype) or prods[0].fn is native_views.get(rtype)):
                    nf = native_flatten.flattener(rtype, keyer, self.value_rules)
                    cols = native_flatten.columns(prods[0].writer.schema) if nf is not None else None
                    if cols is not None:  # its rows go straight into Arrow buffers
                        self.native[rtype] = nf
                        prods[0].writer.buf = cols
        except BaseException:
            self.abort()
            raise

        # -- counters --------------------------------------------------------------------------------
        self.seen: dict[str, Any] = {r: native_flatten.id_set() for r in self.resources}  # add / in / len
        # the accepted Patients' keys (add / in / len), an IdSet where the module is installed: the compiled commit
        # then probes it without the GIL
        self.patient_keys: Any = native_flatten.id_set() if "Patient" in self.producers else None
        self.resources_read = dict.fromkeys(self.resources, 0)
        self.quarantined = dict.fromkeys(self.resources, 0)
        self.reasons: dict[str, dict[str, int]] = {}
        self.candidates = dict.fromkeys(self.resources, 0)
        self.skipped_resources: dict[str, int] = {}
        self.dangling: dict[str, int] = {}
        self.validated = 0
        self.files: list[str] = []
        self.file_sha256: dict[str, str] = {}
        self.file_outcomes: dict[str, dict] = {}  # name -> {"outcome": read|skipped|refused|quarantined, ...}
        self.q_records = 0  # records written to quarantine.ndjson (the report's quarantined_total)

    def _local_for(self, uri: str, name: str) -> str:
        return os.path.join(self.tmpdir, name) if self.tmpdir else uri + ".partial"

    def preparers(self, rtype: str) -> Any:
        """What prepares ``rtype``'s blocks side by side (for :func:`.native.prepared`), made on first use: a
        pool of one worker per core, at most :data:`PREPARE_THREADS`, each with a flattener of its own (the
        commit is ``native[rtype]``'s: a prepared block holds its own rows, so any flattener of the type may
        prepare it for another's commit). For a module built from an older ``_flatc.c``: a list of flatteners,
        the commit's first."""
        flats = self._preparers.get(rtype)
        if flats is None:
            # files are read one at a time, a type's files one after the other: the pools of the types read
            # before end here, with their flatteners' reference caches (~10-30 MB each at 2M resources)
            for other in [t for t in self._preparers if t != rtype]:
                done = self._preparers.pop(other)
                if hasattr(done, "close"):
                    done.close()
            flats = [self.native[rtype]]
            if hasattr(flats[0], "start"):
                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
                workers = [native_flatten.flattener(rtype, self._keyer, self.value_rules)
                           for _ in range(min(PREPARE_THREADS, cores))]
                workers = [w for w in workers if w is not None]
                pool = native_flatten.prepare_pool(workers) if workers else None
                if pool is not None:
                    flats = pool
                else:
                    flats += workers[1:]
            self._preparers[rtype] = flats
        return flats

    def prepare_pool(self) -> Any:
        """The helper thread of the compiled flatten's prepare phase for a module built from an older
        ``_flatc.c`` (without ``Flattener.start``; started on first use)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthfactory-ingest-flatten")
        return self._pool

    def _stop_pool(self) -> None:
        pool = getattr(self, "_pool", None)  # abort() may run before __init__ set it
        if pool is not None:
            self._pool = None
            pool.shutdown(wait=True, cancel_futures=True)
        for flats in getattr(self, "_preparers", {}).values():
            if hasattr(flats, "close"):  # a PreparePool: its workers end
                flats.close()
        native_flatten.release_scratch()

    def _view_fn(self, view: CompiledView) -> Flattener:
        rows = view.rows
        env = self.env
        if view.definition is BUILTIN_VIEWS.get(view.name) and view.resource in _REF_FIELDS:
            # the built-in views check references like the fast path: one outside the FHIR grammar is quarantined
            inner = self._checked_values(view, rows) if view.resource == "Observation" else \
                (lambda o, rid: rows(o, env))
            fields = _REF_FIELDS[view.resource]

            def refs_checked(o: dict, rid: str) -> list:
                for names, target in fields:
                    r = o.get(names[0])
                    if not r and len(names) > 1:
                        r = o.get(names[1])
                    ref = r.get("reference") if type(r) is dict else None
                    if type(ref) is str and not reference_ok(ref):
                        raise BadResource(f"malformed reference to {target}")
                return inner(o, rid)
            return refs_checked
        return lambda o, rid: rows(o, env)

    def _checked_values(self, view: CompiledView, rows: Callable) -> Flattener:
        """The built-in observation view's rows, checked like the fast path: implausible values quarantined."""
        env = self.env
        rules = self.value_rules
        names = view.schema.names
        inum, iunit = names.index("value_num"), names.index("unit")

        def checked(o: dict, rid: str) -> list:
            out = rows(o, env)
            for r in out:
                num = r[inum]
                if num is not None:
                    reason = rules.out_of_range(float(num), r[iunit])
                    if reason is not None:
                        raise BadResource(reason)
            return out
        return checked

    # -- quarantine --------------------------------------------------------------------------------
    def quarantine(self, fname: str, lineno: int, rtype: str | None, reason: str) -> None:
        self.qfh.write(orjson.dumps({"file": fname, "line": lineno, "resource_type": rtype, "reason": reason}))
        self.qfh.write(b"\n")
        self.q_records += 1
        per = self.reasons.setdefault(rtype or "(unknown)", {})
        per[reason] = per.get(reason, 0) + 1

    # -- one resource into every table of its type ---------------------------------------------------
    def produce(self, o: dict, rid: str, rtype: str, producers: list[Producer], pkeys: set[str] | None,
                keep_dangling: bool) -> str | None:
        """All tables of a resource type (the general path): rows are added only when every table took the
        resource. Returns a quarantine reason, or None."""
        out = []
        try:
            for p in producers:
                out.append((p, p.fn(o, rid)))
        except BadResource as bad:
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
                reason = self.produce(o, rid, rtype, producers, pkeys, self.on_dangling == "keep")
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
            return validation_failure(rtype, o)
        return None

    def record_file(self, name: str, sha256: str, *, resources: int | None = None, quarantined: int | None = None,
                    outcome: str = "read", reason: str | None = None) -> None:
        """Note a source file and its sha256 for the report (the extract's sha256 covers every file), with its
        outcome: ``read`` (``resources`` read, ``quarantined`` of them) or ``quarantined`` (the whole file,
        with the ``reason``)."""
        self.files.append(name)
        self.file_sha256[name] = sha256
        out: dict[str, Any] = {"outcome": outcome}
        if reason is not None:
            out["reason"] = reason
        if resources is not None:
            out["resources"] = resources
        if quarantined is not None:
            out["quarantined"] = quarantined
        self.file_outcomes[name] = out

    def skip_file(self, name: str, reason: str, outcome: str = "skipped") -> None:
        """Note a file that was not read (``skipped``) or that was refused (``refused``: e.g. a symlink that
        leaves the extract, a symlink loop), with the reason, for the report."""
        self.file_outcomes[name] = {"outcome": outcome, "reason": reason}

    # -- end ---------------------------------------------------------------------------------------
    def finish(self, *, source: str, skipped_files: Iterable[str] | dict[str, str] = (), extra: dict | None = None,
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
        total_q = self.q_records
        files = sorted(self.files)
        if isinstance(skipped_files, dict):
            for name, reason in skipped_files.items():
                self.file_outcomes.setdefault(name, {"outcome": "skipped", "reason": reason})
            skipped_files = list(skipped_files)
        else:
            skipped_files = list(skipped_files)
            for name in skipped_files:
                self.file_outcomes.setdefault(name, {"outcome": "skipped", "reason": "not an input of this source"})
        outcomes = dict(sorted(self.file_outcomes.items()))
        refused = sorted(n for n, o in outcomes.items() if o["outcome"] == "refused")
        empty = sorted(t for t, n in self.resources_read.items() if n == 0)
        for t in empty:
            log.warning("ingest: no %s resource in this extract (an empty or missing file)", t)
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
            "file_outcomes": outcomes,
            "skipped_files": sorted(n for n in skipped_files if n not in refused),
            "refused_files": refused,
            "empty_types": empty,
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
# What every source needs around a session: its files, the requested types, the GC
# --------------------------------------------------------------------------------------------------
def relative_name(uri: str, source_uri: str) -> str:
    """A file's name relative to the extract's folder or s3:// prefix (what reports and quarantine show)."""
    if is_s3(source_uri):
        base = source_uri.rstrip("/") + "/"
        return uri[len(base):] if uri.startswith(base) else uri.rsplit("/", 1)[-1]
    return os.path.relpath(uri, source_uri)


def scan_local(source_uri: str) -> tuple[list[str], dict[str, str]]:
    """(paths of the files under a local folder, {name: reason} of the entries refused). A symlink is followed
    only to a file inside the extract; one that leaves it, a loop, a dangling one or one to a folder is refused
    with the reason (never silently dropped). Sub-folders are walked (their files are listed)."""
    root = os.path.realpath(source_uri)
    files: list[str] = []
    refused: dict[str, str] = {}

    def walk(folder: str) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            refused[relative_name(folder, source_uri) + "/"] = f"folder not readable ({type(exc).__name__})"
            return
        for e in entries:
            name = relative_name(e.path, source_uri)
            if e.is_symlink():
                try:
                    target = os.path.realpath(e.path, strict=True)
                except RuntimeError:
                    refused[name] = "symlink loop"
                    continue
                except OSError as exc:
                    import errno

                    refused[name] = "symlink loop" if exc.errno == errno.ELOOP else "dangling symlink"
                    continue
                if os.path.commonpath([root, target]) != root:
                    refused[name] = "symlink leaves the extract"
                elif os.path.isdir(target):
                    refused[name] = "symlink to a folder (not followed)"
                elif os.path.isfile(target):
                    files.append(e.path)
                else:
                    refused[name] = "symlink to something that is not a file"
            elif e.is_dir(follow_symlinks=False):
                walk(e.path)
            elif e.is_file(follow_symlinks=False):
                files.append(e.path)
            else:
                refused[name] = "not a regular file"

    walk(source_uri)
    return sorted(files), refused


def scan_source(source_uri: str, store: Store) -> tuple[list[str], dict[str, str]]:
    """:func:`list_source` with the refused entries of a local folder ({name: reason}, see :func:`scan_local`)."""
    if is_s3(source_uri):
        return list_source(source_uri, store), {}
    if not os.path.isdir(source_uri):
        raise ExtractError(f"extract not found: {source_uri}")
    return scan_local(source_uri)


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


def check_resources(resources: Iterable[str], views: Iterable[Any] = ()) -> None:
    """ExtractError when a requested type has neither a built-in view nor a user view."""
    covered = set(BUILTIN_BY_RESOURCE) | {v.get("resource") for v in views if isinstance(v, dict)}
    unknown = [r for r in resources if r not in covered]
    if unknown:
        raise ExtractError(
            f"unsupported resource type(s): {', '.join(map(str, unknown))}; "
            f"supported: {', '.join(SUPPORTED_RESOURCES)} (others need a view in source.views)")


#: the compiled flatten's prepare threads per file (each needs a core: the ingest thread commits beside them)
PREPARE_THREADS = 2


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
