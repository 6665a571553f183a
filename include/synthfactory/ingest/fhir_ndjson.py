"""Streaming ingest of FHIR R4 NDJSON extracts into flat, pseudonymised Parquet tables.

``ingest_extract(source_uri, out_uri, keyer=...)`` finds the ``<ResourceType>[.|-|_...].ndjson[.gz]``
files of a local folder or ``s3://bucket/prefix`` (:func:`discover_ndjson`, Patient first), reads each in
blocks of lines (:func:`line_blocks`, fed by a reader thread that also hashes and inflates: never a whole
file in memory; a line longer than ``max_line_bytes`` is skipped and quarantined without being held),
parses each line with orjson and flattens it into an :class:`~.session.IngestSession`
(:func:`ingest_ndjson`, the hot loop), which checks and writes the rows (the outputs are described in
:mod:`.session`). :mod:`.sources` runs Bulk Data downloads and REST search pages through
:func:`ingest_extract` too.

Flattening: the tables ``patient``, ``encounter``, ``condition`` and ``observation`` are produced by the
hand-written :mod:`.flatteners` (the fast path, ``engine="fast"``); every other table (``medication_request``,
``procedure``, the user's own) by SQL-on-FHIR ViewDefinitions compiled once (:mod:`.views`).
``engine="views"`` runs the four built-in tables through their ViewDefinitions too: the rows are the
same (tests/ingest/test_views.py proves it on generated data), the fast path is quicker. On the fast path
the plain lines of Observation, Encounter and Condition go through the compiled flatten
(:mod:`.native`, C), which writes exactly the hand-written flatteners' rows; every other line takes the
Python loop below (``native=False`` for that loop alone).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import time
import zlib
from typing import IO, Any, Iterable, Iterator

import orjson

from synthfactory.keys import Keyer
from synthfactory.storage import Store

from . import native as native_flatten
from synthfactory.fhir.normalize import BadResource, ExtractError, collect_identifiers, has_modifier_extension
from .session import (
    ALWAYS_VALIDATE_FIRST,
    DEFAULT_MAX_LINE_BYTES,
    DEFAULT_RESOURCES,
    IDENTIFIER_CHUNK_ROWS,
    IngestSession,
    check_resources,
    gc_paused,
    relative_name,
    scan_source,
    validation_failure,
)

log = logging.getLogger(__name__)

__all__ = ["ingest_extract", "ingest_ndjson", "discover_ndjson", "discover_ndjson_files", "line_blocks", "prefetched", "processing_order"]

#: bytes read at a time: a block of lines for the compiled flatten (4 MiB: ~4,500 Observations; 1 MiB blocks cost
#: ~10 % more wall time at 500k resources in per-block hand-offs between the reader, prepare and commit)
READ_BLOCK = 4 << 20


# --------------------------------------------------------------------------------------------------
# Streams: hashed, prefetched, in blocks of lines
# --------------------------------------------------------------------------------------------------
class _HashingReader(io.RawIOBase):
    """Raw stream that feeds every byte read through a hash (the file's sha256, no second pass)."""

    def __init__(self, raw: IO[bytes], hasher: Any):
        self._raw = raw
        self._h = hasher
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes (fewer at the end) straight from the underlying stream: no intermediate buffer."""
        if size is None or size < 0:
            return self.readall()
        read = getattr(self._raw, "read", None)
        if read is None:
            return super().read(size)
        data = read(size)
        if data:
            self._h.update(data)
            self.nbytes += len(data)
        return data or b""

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
        if len(chunk) > max_line_bytes:  # only then can a complete line in it be too long
            for j, ln in enumerate(lines):
                if ln is not None and len(ln) > max_line_bytes:
                    lines[j] = _OVERSIZE
        if len(carry) > max_line_bytes:
            lines.append(_OVERSIZE)
            carry = b""
            skipping = True
        if lines:
            yield lines
    if carry and not skipping:
        yield [carry if len(carry) <= max_line_bytes else _OVERSIZE]


def chunk_blocks(stream: Any, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                 block: int = READ_BLOCK) -> Iterator[Any]:
    """:func:`line_blocks` for the compiled flatten: the same lines, in the same order, but a run of complete
    lines within one chunk comes as a ``memoryview`` of the chunk (the lines separated by newlines, without
    the last one: no copy), which the compiled ``prepare`` splits itself off the GIL. A line that spans
    chunks, a line over ``max_line_bytes`` (a marker) and the file's unterminated last line come as lists,
    like :func:`line_blocks`."""
    if hasattr(stream, "read"):
        read = stream.read
        chunks: Iterator[bytes] = iter(lambda: read(block), b"")
    else:
        chunks = iter(stream)
    carry = b""
    skipping = False
    for chunk in chunks:
        start = 0
        if skipping:
            i = chunk.find(b"\n")
            if i < 0:
                continue
            skipping = False
            start = i + 1
        last = chunk.rfind(b"\n")
        if last < start:  # no newline after start: the chunk continues the carried line
            carry = carry + chunk[start:] if carry else chunk[start:]
            if len(carry) > max_line_bytes:
                yield [_OVERSIZE]
                carry = b""
                skipping = True
            continue
        if carry:  # the line that spans chunks: its own one-line block
            j = chunk.find(b"\n", start)
            line = carry + chunk[start:j]
            carry = b""
            yield [line if len(line) <= max_line_bytes else _OVERSIZE]
            start = j + 1
        if last >= start:
            if last - start > max_line_bytes:  # only then can a complete line in it be too long
                lines = chunk[start:last].split(b"\n")
                if any(len(ln) > max_line_bytes for ln in lines):
                    yield [ln if len(ln) <= max_line_bytes else _OVERSIZE for ln in lines]
                else:
                    yield memoryview(chunk)[start:last]
            else:
                yield memoryview(chunk)[start:last]
        carry = chunk[last + 1:]
        if len(carry) > max_line_bytes:
            yield [_OVERSIZE]
            carry = b""
            skipping = True
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


# --------------------------------------------------------------------------------------------------
# The hot loop: one NDJSON file into a session
# --------------------------------------------------------------------------------------------------
def ingest_ndjson(session: IngestSession, name: str, uri: str, rtype: str) -> None:
    """Flatten one NDJSON file (``.gz`` by name) of resource type ``rtype`` from the session's store
    into the session."""
    fname = name.rsplit("/", 1)[-1]
    hasher = hashlib.sha256()
    reader = _HashingReader(session.store.open_read(uri), hasher)
    tf = time.perf_counter()
    stream: Any = gzip.GzipFile(fileobj=reader) if name.endswith(".gz") else reader
    chunks = prefetched(stream)
    # the compiled flatten splits runs of whole lines itself (off the GIL); the Python loop gets lists of lines
    split = chunk_blocks if session.native.get(rtype) is not None and len(session.producers[rtype]) == 1 \
        else line_blocks
    try:
        n_read, n_bad = _ingest_lines(session, fname, rtype, split(chunks, session.max_line_bytes))
        reader.drain()  # every byte of the file is in the hash, even after a trailing gzip member
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise ExtractError(f"extract file {name} is not valid gzip or is truncated") from None
    finally:
        chunks.close()  # stops and joins the reader thread
        reader.release()
    session.record_file(name, hasher.hexdigest(), resources=n_read, quarantined=n_bad)
    log.info("ingested %s: %d resources, %d quarantined, %.2fs", fname, n_read, n_bad, time.perf_counter() - tf)


def _ingest_lines(session: IngestSession, fname: str, rtype: str, blocks: Iterable[list],
                  positions: list[int] | None = None, validate_first: int | None = None) -> tuple[int, int]:
    """The hot loop: every line of one file, in order. Returns (resources read, quarantined).

    The Bundle reader (:mod:`.bundle`) passes its entries as lines too: ``positions`` (the entry position of
    each line, recorded in the quarantine instead of the line number) and ``validate_first`` (the first N
    resources of this call always validated, counted from this call: the sample's "first N per file")."""
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    quarantine = session.quarantine
    if positions is not None:
        def quarantine(f: str, ln: int, rt: str | None, reason: str, _q=session.quarantine) -> None:  # noqa: F811
            _q(f, positions[ln - 1], rt, reason)
    producers = session.producers[rtype]
    single = producers[0] if len(producers) == 1 else None
    flat = single.fn if single else None
    writer = single.writer if single else None
    buf = writer.buf if writer else None
    pidx = single.pidx if single else None
    batch_rows = session.batch_rows
    seen_ids = session.seen[rtype]
    is_patient = rtype == "Patient"
    pkeys = session.patient_keys if (session.patient_keys and not is_patient) else None
    patient_keys = session.patient_keys
    keep_dangling = session.on_dangling == "keep"
    add_ident = session.identifiers.add
    ids_chunk = session.identifiers.chunk
    threshold = session.threshold
    n_cand0 = session.candidates[rtype] if validate_first is None else 0
    if validate_first is None:
        validate_first = session.validate_first
    vcap = session.validate_cap
    vdone = session.validated_by_type[rtype]
    file_salt = zlib.crc32(fname.encode())
    key = session.key
    n_read = n_bad = 0
    n_cand = n_cand0
    validated = 0
    lineno = 0
    native = session.native.get(rtype) if single is not None else None
    commit = native.commit if native is not None else None
    if native is None:
        pairs: Iterable[tuple[list, Any]] = ((b, None) for b in blocks)
    elif type(blocks) is list and len(blocks) == 1:  # one block (a Bundle's entries): nothing to overlap
        pairs = [(blocks[0], native.prepare(blocks[0]))]
    else:
        pairs = native_flatten.prepared(blocks, session.preparers(rtype), session.prepare_pool)
    n_native = 0
    vpos = -1  # the position in the current block of a sampled line that passed validation (see why == 3)
    for block, prep in pairs:
        if len(ids_chunk) >= IDENTIFIER_CHUNK_ROWS:
            session.identifiers.maybe_spill()
        whole = type(block) is not list  # a run of lines that the compiled prepare split (see chunk_blocks)
        pos, nblock = 0, len(prep) if whole else len(block)
        while pos < nblock:
            if commit is None:
                seg, pos = block, nblock
            else:  # the compiled flatten takes the plain lines; the loop below gets the others, one by one
                args = (prep, pos, lineno, buf, seen_ids, patient_keys if is_patient else pkeys, ids_chunk, n_cand,
                        vdone, -1 if vcap is None else vcap, validate_first, threshold, file_salt, batch_rows)
                nxt, took, why = commit(*args, True) if vpos == pos else commit(*args)
                lineno += nxt - pos
                n_read += took
                n_cand += took
                n_native += took
                if nxt > pos:
                    vpos = -1
                pos = nxt
                if why == 2:  # buffer full
                    writer.flush()
                    buf = writer.buf
                    continue
                if why == 0:
                    break
                if why == 3:
                    # picked for the validation sample, and neither a duplicate id nor a dangling reference:
                    # validated here; when it passes the compiled commit takes it (called again with
                    # validated=True), else it is quarantined as the loop below would
                    raw = prep.line(pos) if whole else block[pos]
                    o = loads(raw)
                    validated += 1
                    vdone += 1
                    reason = validation_failure(rtype, o)
                    if reason is None:
                        vpos = pos
                        continue
                    lineno += 1
                    pos += 1
                    n_read += 1
                    n_cand += 1
                    n_bad += 1
                    add_ident(o["id"], "id")
                    if is_patient or "identifier" in o:
                        collect_identifiers(o, is_patient, add_ident)
                    quarantine(fname, lineno, rtype, reason)
                    continue
                seg, pos = [prep.line(pos)] if whole else block[pos:pos + 1], pos + 1
            for raw in seg:
                lineno += 1
                if not raw:
                    if raw is _OVERSIZE:
                        n_read += 1
                        n_bad += 1
                        quarantine(fname, lineno, rtype, f"line longer than {session.max_line_bytes} bytes")
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
                    reason = validation_failure(rtype, o)
                    if reason is not None:
                        n_bad += 1
                        quarantine(fname, lineno, rtype, reason)
                        continue
                if single is not None:
                    try:
                        rows = flat(o, rid)
                    except BadResource as bad:
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
                            session.dangling[rtype] = session.dangling.get(rtype, 0) + 1
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
                    reason = session.produce(o, rid, rtype, producers, pkeys, keep_dangling)
                    if reason is not None:
                        n_bad += 1
                        quarantine(fname, lineno, rtype, reason)
                        continue
                    seen_ids.add(rid)
    session.candidates[rtype] += n_cand - n_cand0
    session.native_lines[rtype] += n_native
    session.validated += validated
    session.validated_by_type[rtype] = vdone
    session.resources_read[rtype] += n_read
    session.quarantined[rtype] += n_bad
    return n_read, n_bad


# --------------------------------------------------------------------------------------------------
# File discovery
# --------------------------------------------------------------------------------------------------
def _match_type(name: str, resources: Iterable[str]) -> str | None:
    """The type of ``<Type><anything but an ASCII letter>....ndjson[.gz]`` (``Observation.ndjson``,
    ``Observation-2.ndjson.gz``, ``Observation extra space.ndjson``, ``Observation_été.ndjson``; never
    ``ObservationDefinition.ndjson`` for Observation)."""
    if not (name.endswith(".ndjson") or name.endswith(".ndjson.gz")):
        return None
    for rtype in resources:
        if name.startswith(rtype) and len(name) > len(rtype):
            c = name[len(rtype)]
            if not (c.isascii() and c.isalpha()):
                return rtype
    return None


def _skip_reason(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    if "/" in name:
        return "in a sub-folder (an extract is one folder)"
    if not (base.endswith(".ndjson") or base.endswith(".ndjson.gz")):
        return "not an NDJSON file (<Type>*.ndjson[.gz])"
    return "resource type not requested by the spec"


def processing_order(rtype: str) -> int:
    """Patients first (the dangling-reference check needs their keys), then encounters, then the rest."""
    return {"Patient": 0, "Encounter": 1}.get(rtype, 2)


def discover_ndjson(source_uri: str, store: Store, resources: Iterable[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(name, uri, type)] in processing order, [skipped names]) of an NDJSON extract folder."""
    found, skipped, _ = discover_ndjson_files(source_uri, store, resources)
    return found, sorted(skipped)


def discover_ndjson_files(source_uri: str, store: Store, resources: Iterable[str]
                          ) -> tuple[list[tuple[str, str, str]], dict[str, str], dict[str, str]]:
    """([(name, uri, type)] in processing order, {skipped name: reason}, {refused name: reason}) of an NDJSON
    extract folder (refused: symlinks that leave the extract, loops, see :func:`.session.scan_local`)."""
    all_uris, refused = scan_source(source_uri, store)
    by_len = sorted(resources, key=len, reverse=True)  # a type never swallows another that it prefixes
    found: list[tuple[str, str, str]] = []
    skipped: dict[str, str] = {}
    for uri in all_uris:
        name = relative_name(uri, source_uri)
        rtype = None if "/" in name else _match_type(name, by_len)
        if rtype is None:
            skipped[name] = _skip_reason(name)
        else:
            found.append((name, uri, rtype))
    found.sort(key=lambda f: (processing_order(f[2]), f[0]))
    for name, reason in refused.items():
        log.warning("ingest: %s refused: %s", name, reason)
    return found, dict(sorted(skipped.items())), refused


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def wanted_types(resources: Iterable[str], views: Iterable[Any]) -> tuple[list[str], list]:
    """The resource types to read (the requested ones, then the views' own) and the views as a list; an empty
    request or a type no table covers is an :class:`ExtractError`."""
    resources = list(dict.fromkeys(resources))
    if not resources:
        raise ExtractError("unsupported resource type(s): (none requested)")
    views = list(views or ())
    check_resources(resources, views)
    wanted = list(dict.fromkeys([*resources, *(v.get("resource") for v in views if isinstance(v, dict)
                                               and isinstance(v.get("resource"), str))]))
    return wanted, views


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
    value_rules: Any = None,
    pre_quarantine: Iterable[dict] = (),
) -> dict:
    """Flatten a FHIR R4 NDJSON extract into pseudonymised Parquet tables under ``out_uri``.

    Returns (and writes as ``ingest_report.json``) a report of counts, URIs, timings and the extract's
    sha256 (over the sorted file names and each file's sha256). Raises :class:`ExtractError` for a missing
    or empty extract."""
    with gc_paused():
        store = store or Store()
        source_uri, out_uri = str(source_uri), str(out_uri)
        resources = list(dict.fromkeys(resources))
        wanted, views = wanted_types(resources, views)
        found, skipped, refused = discover_ndjson_files(source_uri, store, wanted)
        if not found:
            raise ExtractError(
                f"extract is empty: no NDJSON file for {', '.join(wanted)} in {source_uri} "
                f"(expected e.g. Patient.ndjson or Patient.ndjson.gz; {len(skipped)} other file(s) ignored"
                f"{f', {len(refused)} refused' if refused else ''})")
        session = IngestSession(out_uri, keyer=keyer, store=store, resources=resources, views=views,
                                validate_sample_rate=validate_sample_rate, batch_rows=batch_rows, engine=engine,
                                max_line_bytes=max_line_bytes, on_dangling=on_dangling, validate_first=validate_first,
                                validate_max_per_type=validate_max_per_type, native=native, value_rules=value_rules)
        for name, reason in refused.items():
            session.skip_file(name, reason, outcome="refused")
        for q in pre_quarantine:  # lines a source set aside before this ingest (e.g. a Bulk export's conflicting ids)
            rtype = q.get("resource_type")
            session.quarantine(str(q.get("file")), int(q.get("line") or 0), rtype, str(q.get("reason")))
            if rtype in session.quarantined:
                session.quarantined[rtype] += 1
                session.resources_read[rtype] += 1
        try:
            for name, uri, rtype in found:
                ingest_ndjson(session, name, uri, rtype)
        except BaseException:
            session.abort()
            raise
        return session.finish(source=source_uri, skipped_files=skipped, extra=extra_report)

