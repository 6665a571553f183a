"""FHIR Bundles (transaction, batch, collection, searchset) as an extract: ``*.json``/``*.json.gz`` files,
local or ``s3://``, one Bundle (or one bare resource) each.

Within a Bundle, ``fullUrl`` values (``urn:uuid:...``, ``urn:oid:...`` or absolute URLs) are resolved: every
reference to an entry's ``fullUrl`` is rewritten to ``Type/id`` before flattening, so the keys are exactly
the ones an NDJSON export of the same data gives. An entry without ``resource.id`` (a transaction POST)
takes its id from ``request.url`` (``PUT Patient/123``) or from its ``urn:uuid:`` fullUrl. A reference to a
``urn:uuid:`` that no entry carries is counted as unresolved (keyed by the uuid, as NDJSON would).

Each Bundle file is streamed: the compiled scanner (``_flatc.scan_bundle``) walks the bytes a chunk at a
time, finds each element of ``entry`` and reads its fullUrl, request, resourceType, id and references
without building the entry in Python; the resource's compact bytes, references rewritten, go through the
NDJSON hot loop, so the compiled flatten (:mod:`.native`) takes the plain ones and every check is the NDJSON
path's. Memory holds a chunk and an entry, whatever the Bundle's size. An entry the scanner finds unusual
(escapes in a field it reads, a field of another type, invalid JSON) is parsed with orjson and takes the
Python path; an entry that is not valid JSON is quarantined and the rest of the file still loads. A file
truncated or broken outside its entries is quarantined as a whole (with the number of entries read before
the break). Without the compiled module, and for a file the scanner cannot stream (a bare resource,
``entry`` before ``resourceType``), the file is parsed whole with orjson (up to ``max_bundle_bytes``).

A resource whose references may name a later entry of its file is held until the file ends; a file's
Patients go to the hot loop before its other resources; a resource naming a Patient of a later file is held
back (memory, then a temporary file) until every file has been read, so the dangling-reference check sees
all patients. The validation sample's fixed part: the first 20 of each type in the extract and the first
resource of every file (:func:`ingest_bundles`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import re
import tempfile
import zlib
from typing import Any, Iterable, Iterator

import orjson

from synthfactory.keys import Keyer
from synthfactory.storage import Store

from synthfactory.fhir.normalize import ExtractError, parse_reference
from . import native
from .fhir_ndjson import _HashingReader, _ingest_lines, processing_order
from .session import ALWAYS_VALIDATE_FIRST, DEFAULT_MAX_LINE_BYTES, IngestSession, check_resources, gc_paused, relative_name, scan_source

log = logging.getLogger(__name__)

__all__ = ["ingest_bundles", "resolve_bundle", "iter_bundle_files"]

DEFAULT_MAX_BUNDLE_BYTES = 512 << 20


def _is_bundle_file(name: str) -> bool:
    return name.endswith(".json") or name.endswith(".json.gz")


def iter_bundle_files(source_uri: str, store: Store) -> tuple[list[tuple[str, str]], list[str]]:
    """([(name, uri)], [skipped names]) of Bundle files under a folder or prefix (sorted)."""
    found, skipped, _ = bundle_files(source_uri, store)
    return found, sorted(skipped)


def bundle_files(source_uri: str, store: Store) -> tuple[list[tuple[str, str]], dict[str, str], dict[str, str]]:
    """([(name, uri)], {skipped name: reason}, {refused name: reason}) of Bundle files under a folder or
    prefix (sorted; refused: symlinks that leave the extract, loops, see :func:`.session.scan_local`)."""
    found, skipped = [], {}
    uris, refused = scan_source(source_uri, store)
    for uri in uris:
        name = relative_name(uri, source_uri)
        base = name.rsplit("/", 1)[-1]
        if _is_bundle_file(name) and not base.startswith(("_", ".")):
            found.append((name, uri))
        else:
            skipped[name] = "a hidden or metadata file (_*, .*)" if _is_bundle_file(name) \
                else "not a Bundle file (*.json, *.json.gz)"
    return sorted(found), dict(sorted(skipped.items())), refused


def _walk_refs(node: Any, mapping: dict[str, str], unresolved: list[int]) -> None:
    if isinstance(node, dict):
        ref = node.get("reference")
        if type(ref) is str:
            target = mapping.get(ref)
            if target is not None:
                node["reference"] = target
            elif ref.startswith("urn:uuid:"):
                unresolved[0] += 1
        for v in node.values():
            if isinstance(v, (dict, list)):
                _walk_refs(v, mapping, unresolved)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, (dict, list)):
                _walk_refs(v, mapping, unresolved)



def _entry_identity(entry: dict, res: dict, request: Any, mapping: dict[str, str]) -> tuple[Any, Any, Any]:
    """An entry's ``(resourceType, fullUrl, id)``: a resource without an id takes it from ``request.url``
    (``Type/id``) or its ``urn:uuid:`` / ``urn:oid:`` fullUrl (written into the resource), and ``mapping`` learns
    ``fullUrl -> Type/id`` for the reference rewrite."""
    rtype, full, rid = res.get("resourceType"), entry.get("fullUrl"), res.get("id")
    if not (type(rid) is str and rid):
        url = request.get("url") if isinstance(request, dict) else None
        if type(url) is str and "/" in url and "?" not in url and url.split("/", 1)[0] == rtype:
            rid = url.split("/", 2)[1]
        elif type(full) is str and full.startswith("urn:uuid:"):
            rid = full[9:]
        elif type(full) is str and full.startswith("urn:oid:"):
            rid = full[8:]
        if type(rid) is str and rid:
            res["id"] = rid
    if type(full) is str and full and type(rtype) is str and type(rid) is str and rid:
        mapping[full] = f"{rtype}/{rid}"
    return rtype, full, rid

def resolve_bundle(bundle: Any) -> tuple[list[tuple[int, Any]], dict[str, int]]:
    """Entries of a Bundle as ``(position, resource)`` (position 1-based), references to entries' fullUrls
    rewritten to ``Type/id``, ids filled in from ``request.url``/``urn:uuid`` where missing. A JSON file
    holding one resource (not a Bundle) gives that resource. Returns the entries and counts
    (``deleted``, ``unresolved_references``, ``entries_without_resource``)."""
    stats = {"deleted": 0, "unresolved_references": 0, "entries_without_resource": 0}
    if not isinstance(bundle, dict):
        return [(1, bundle)], stats
    if bundle.get("resourceType") != "Bundle":
        return [(1, bundle)], stats
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        return [(1, None)], stats
    mapping: dict[str, str] = {}
    out: list[tuple[int, Any]] = []
    for pos, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            out.append((pos, None))
            continue
        request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
        if request.get("method") == "DELETE":
            stats["deleted"] += 1
            continue
        res = entry.get("resource")
        if not isinstance(res, dict):
            stats["entries_without_resource"] += 1
            out.append((pos, None))
            continue
        rtype, full, rid = _entry_identity(entry, res, request, mapping)
        out.append((pos, res))
    if mapping:
        unresolved = [0]
        for _, res in out:
            if res is not None:
                _walk_refs(res, mapping, unresolved)
        stats["unresolved_references"] = unresolved[0]
    else:
        unresolved = [0]
        for _, res in out:
            if res is not None:
                _walk_refs(res, {}, unresolved)
        stats["unresolved_references"] = unresolved[0]
    return out, stats


def _read_bundle(store: Store, name: str, uri: str, max_bytes: int) -> tuple[bytes | None, str]:
    """(raw JSON bytes or None, sha256 of the stored bytes). None when over ``max_bytes``."""
    h = hashlib.sha256()
    parts: list[bytes] = []
    size = 0
    too_big = False
    with store.open_read(uri) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            if not too_big:
                parts.append(chunk)
                size += len(chunk)
                if size > max_bytes and not name.endswith(".gz"):
                    too_big, parts = True, []
    if too_big:
        return None, h.hexdigest()
    data = b"".join(parts)
    if name.endswith(".gz"):
        try:
            d = gzip.GzipFile(fileobj=io.BytesIO(data))
            data = d.read(max_bytes + 1)
        except (OSError, EOFError):
            raise ExtractError(f"extract file {name} is not valid gzip or is truncated") from None
        if len(data) > max_bytes:
            return None, h.hexdigest()
    return data, h.hexdigest()


def ingest_bundles(
    source_uri: str,
    out_uri: str,
    *,
    keyer: Keyer,
    store: Store | None = None,
    resources: Iterable[str] = ("Patient", "Encounter", "Condition", "Observation"),
    views: Iterable[dict] = (),
    validate_sample_rate: float = 0.01,
    batch_rows: int = 50_000,
    engine: str = "fast",
    on_dangling: str = "quarantine",
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    extra_report: dict | None = None,
    validate_max_per_type: int = 0,
    value_rules: Any = None,
    validate_first: int = ALWAYS_VALIDATE_FIRST,
    validate_first_per_file: int = 1,
) -> dict:
    """Flatten a folder of Bundle files into the same tables as :func:`.fhir_ndjson.ingest_extract`.

    Each file is streamed (:func:`_ingest_file`): memory holds a chunk and an entry, not the file. Its entries,
    references resolved, become compact JSON lines that go through the NDJSON hot loop
    (:func:`.fhir_ndjson._ingest_lines`: the compiled flatten for the types it covers, the same checks,
    quarantine records carrying the entry position). A resource whose ``subject``/``patient`` names a Patient
    not read yet (in a later file) is held back, spilled to a temporary file, until every file's Patients are
    in, so the dangling-reference check sees them all.

    The validation sample (``validate_sample_rate``, ``validate_max_per_type`` as on NDJSON) always takes,
    within the per-type cap, the first ``validate_first`` (20) resources of each type in the extract (what
    "the first 20 per file" is on NDJSON, whose files hold one type each) and the first
    ``validate_first_per_file`` (1) resources of every file (in the order they are read; a file's resources
    all held back: on replay), so every Bundle file is looked at whatever its size. ``validate_first=0``
    turns both off."""
    with gc_paused():
        store = store or Store()
        source_uri, out_uri = str(source_uri), str(out_uri)
        resources = list(dict.fromkeys(resources))
        views = list(views or ())
        check_resources(resources, views)
        files, skipped, refused = bundle_files(source_uri, store)
        if not files:
            raise ExtractError(f"extract is empty: no Bundle file (*.json, *.json.gz) in {source_uri} "
                               f"({len(skipped)} other file(s) ignored)")
        session = IngestSession(out_uri, keyer=keyer, store=store, resources=resources, views=views,
                                validate_sample_rate=validate_sample_rate, batch_rows=batch_rows, engine=engine,
                                max_line_bytes=DEFAULT_MAX_LINE_BYTES, on_dangling=on_dangling,
                                validate_max_per_type=validate_max_per_type, validate_first=validate_first,
                                value_rules=value_rules)
        totals = {"bundles": 0, "deleted": 0, "unresolved_references": 0, "entries_without_resource": 0}
        for name, reason in refused.items():
            log.warning("ingest: %s refused: %s", name, reason)
            session.skip_file(name, reason, outcome="refused")
        held = _HeldBack()
        held.per_file = min(max(int(validate_first_per_file), 0), max(int(validate_first), 0))
        try:
            for name, uri in files:
                _ingest_file(session, store, name, uri, max_bundle_bytes, totals, held)
            for fname, rtype, positions, lines in held.replay():  # a file all held: its sample here
                must = min(held.unsampled.get(fname, 0), len(lines))
                if must:
                    held.unsampled[fname] -= must
                _ingest_group(session, fname, rtype, positions, lines, must)
        except BaseException:
            session.abort()
            raise
        finally:
            held.close()
        return session.finish(source=source_uri, skipped_files=skipped,
                              extra={"source_kind": "fhir_bundle", "bundle_stats": totals,
                                     "bundle_resources_held_back": held.count, **(extra_report or {})})


_REF_RE = re.compile(rb'"reference":"((?:[^"\\]|\\.)*)"')
_GROUP_LINES = 4096  # lines per block handed to the hot loop (the compiled flatten's unit of work)


def _ingest_group(session: IngestSession, fname: str, rtype: str, positions: list[int], lines: list[bytes],
                  must: int = 0) -> None:
    """One file's resources of one type (JSON lines, their entry positions) through the hot loop.

    The validation sample's fixed part on Bundles: the first ``validate_first`` (20) resources of each type in
    the extract (as on NDJSON, where a file holds one type) and the first ``must`` lines of this block (the
    file's first resources, :func:`ingest_bundles`' ``validate_first_per_file``), within the per-type cap; the
    rate's hashed sample comes on top."""
    first = max(session.validate_first - session.candidates[rtype], must, 0)
    cap = session.validate_cap
    if cap is not None:  # the fixed part stays within the per-type cap
        first = max(min(first, cap - session.validated_by_type[rtype]), 0)
    blocks = [lines[k:k + _GROUP_LINES] for k in range(0, len(lines), _GROUP_LINES)]
    _ingest_lines(session, fname, rtype, blocks, positions=positions, validate_first=first)


def _patient_id(res: dict, mapping: dict[str, str], file_patients: set) -> str | None:
    """The Patient id a resource's ``subject`` or ``patient`` names (after fullUrl resolution), or None; None
    too for a Patient of this file (read before the file's other resources)."""
    for field_ in ("subject", "patient"):
        ref = res.get(field_)
        if type(ref) is not dict:
            continue
        ref = ref.get("reference")
        if type(ref) is str and ref:
            target = mapping.get(ref)
            if target is not None and target[:8] == "Patient/" and target[8:] in file_patients:
                return None
            t, rid = parse_reference(target or ref)
            if t == "Patient" and rid:
                return None if rid in file_patients else rid
    return None


_REF = b'"reference":"'


def _rewrite(line: bytes, mapping_b: dict[bytes, bytes], mapping: dict[str, str], counts: list[int]) -> bytes:
    """Rewrite the ``"reference":"<fullUrl>"`` values of a compact JSON line to ``Type/id`` (counting the
    ``urn:uuid:`` ones that no entry carries in ``counts[0]``)."""
    parts = line.split(_REF)
    changed = False
    for k in range(1, len(parts)):
        part = parts[k]
        end = part.find(b'"')
        val = part[:end]
        if b"\\" in val:  # an escaped reference: the whole line the careful way
            return _REF_RE.sub(lambda m: _rewrite_match(m, mapping, counts), line)
        target = mapping_b.get(val)
        if target is not None:
            parts[k] = target + part[end:]
            changed = True
        elif val[:9] == b"urn:uuid:":
            counts[0] += 1
    return _REF.join(parts) if changed else line


def _rewrite_match(m: "re.Match[bytes]", mapping: dict[str, str], counts: list[int]) -> bytes:
    text = orjson.loads(b'"' + m.group(1) + b'"')
    target = mapping.get(text)
    if target is not None:
        return b'"reference":' + orjson.dumps(target)
    if text.startswith("urn:uuid:"):
        counts[0] += 1
    return m.group(0)


READ_CHUNK = 1 << 20
_S_ENTRY_FIRST, _ST_BUNDLE, _ST_FALLBACK, _ST_INVALID = 4, 0x100, 1000, 1001


def _scanner() -> Any:
    """The compiled entry scanner (``_flatc.scan_bundle``), or None (no compiled module: files parsed whole)."""
    if not native.available():
        return None
    return getattr(native._flatc, "scan_bundle", None)


def _chunks(store: Store, name: str, uri: str, hasher: Any) -> Iterator[bytes]:
    """The file's bytes (inflated for ``.gz``) in chunks of ``READ_CHUNK``; every stored byte goes through
    ``hasher``."""
    reader = _HashingReader(store.open_read(uri), hasher)
    stream: Any = gzip.GzipFile(fileobj=reader) if name.endswith(".gz") else reader
    try:
        while True:
            chunk = stream.read(READ_CHUNK)
            if not chunk:
                break
            yield chunk
        if stream is not reader:
            reader.drain()  # every byte in the hash, even after a trailing gzip member
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise ExtractError(f"extract file {name} is not valid gzip or is truncated") from None
    finally:
        reader.release()


def _ingest_file(session: IngestSession, store: Store, name: str, uri: str, max_bytes: int, totals: dict,
                 held: "_HeldBack") -> None:
    """One Bundle file, streamed: the compiled scanner finds each entry of the ``entry`` array in the bytes
    read so far (a chunk at a time, so memory holds one chunk and one entry, whatever the file's size) and
    reads its fullUrl, request, resourceType, id, patient reference and reference spans without building it
    in Python; the resource's own bytes, references rewritten, go to the hot loop. An entry it finds unusual is
    parsed with orjson and takes the Python path (the same decisions). Files it cannot stream (a bare resource,
    ``entry`` before ``resourceType``) and every file without the compiled module are parsed whole."""
    scan = _scanner()
    hasher = hashlib.sha256()
    if scan is None:
        raw, sha = _read_bundle(store, name, uri, max_bytes)
        return _ingest_whole(session, name, raw, sha, max_bytes, totals, held)
    fname = name.rsplit("/", 1)[-1]
    chunks = _chunks(store, name, uri, hasher)
    buf = bytearray()
    pos, state, final = 0, 0, False
    f = _StreamedFile(session, name, fname, held)
    too_big = False
    wanted = set(session.producers)  # the other types' resources are counted, never copied
    need = 0  # after a scan that found nothing whole: read until the buffer doubles (a large entry is
    # scanned a few times, not once per chunk)
    try:
        while True:
            chunk = next(chunks, None)
            if chunk is None:
                final = True
            else:
                buf += chunk
                if len(buf) < need and len(buf) - pos <= max_bytes:
                    continue
            before = pos
            pos, state, entries = scan(buf, pos, state, final, wanted)
            if entries:
                f.add(buf, entries)
            if state >= _ST_FALLBACK or final:
                break
            need = 2 * len(buf) if not entries and pos == before else 0
            if f.n_entries or (state & 0xFF) >= _S_ENTRY_FIRST:  # in the entries: the bytes before pos are done
                del buf[:pos]
                pos = 0
            if len(buf) - pos > max_bytes:  # one entry (or member) larger than the limit
                too_big = True
                break
        if state == _ST_FALLBACK and not f.n_entries:  # parse it whole: the rest of the file, within the limit
            for chunk in chunks:
                buf += chunk
                if len(buf) > max_bytes:
                    too_big = True
                    break
            if not too_big:
                for _ in chunks:
                    pass
                data = bytes(buf)
                del buf
                return _ingest_whole(session, name, data, hasher.hexdigest(), max_bytes, totals, held)
        for _ in chunks:  # the rest of the file through the hash
            pass
        del buf
        f.finish()
    finally:
        f.close()
    sha = hasher.hexdigest()
    totals["deleted"] += f.deleted
    totals["entries_without_resource"] += f.without_resource
    totals["unresolved_references"] += f.unresolved[0]
    if too_big or state >= _ST_FALLBACK:  # the whole file, or what follows its last good entry
        reason = "invalid JSON" if not too_big else f"bundle entry larger than {max_bytes} bytes" \
            if f.n_entries or state < _ST_FALLBACK else f"bundle larger than {max_bytes} bytes"
        if f.n_entries:
            reason += f" after entry {f.n_entries} (the entries before it were read)"
        session.record_file(name, sha, resources=f.n_entries or None, outcome="quarantined", reason=reason)
        session.quarantine(fname, 0, "Bundle", reason)
        return
    totals["bundles"] += 1
    if not (state & _ST_BUNDLE):  # an object without resourceType (or an empty one): a bare resource
        session.record_file(name, sha, resources=1)
        session.quarantine(fname, 1, None, "missing resourceType")
        return
    session.record_file(name, sha, resources=f.n_entries)


def _splice(line: bytes, spans: list[int] | tuple, mapping_b: dict[bytes, bytes], counts: list[int] | None) -> bytes:
    """``line`` with the reference values at ``spans`` (start, end pairs, relative to the line) that name an
    entry's fullUrl replaced by its ``Type/id``; ``counts[0]`` counts the ``urn:uuid:`` ones left."""
    out: list[bytes] = []
    last = 0
    for k in range(0, len(spans), 2):
        a, b = spans[k], spans[k + 1]
        v = line[a:b]
        t = mapping_b.get(v)
        if t is not None:
            out.append(line[last:a])
            out.append(t)
            last = b
        elif counts is not None and v[:9] == b"urn:uuid:":
            counts[0] += 1
    if not out:
        return line
    out.append(line[last:])
    return b"".join(out)


def _with_id(line: bytes, rid: str) -> bytes:
    """A resource object's bytes with ``"id"`` as its first member (a transaction entry without one). ``rid``
    comes from a JSON string the scanner read without escapes: it needs none."""
    return b'{"id":"' + rid.encode() + b'",' + line[1:]


def _ref_of(res: dict, field_: str) -> str | None:
    ref = res.get(field_)
    if type(ref) is not dict:
        return None
    ref = ref.get("reference")
    return ref if type(ref) is str else None


def _patient_of(subj: str | None, pat: str | None, mapping: dict[str, str], file_patients: set) -> str | None:
    """:func:`_patient_id` from the ``subject``/``patient`` reference strings."""
    for ref in (subj, pat):
        if ref:
            target = mapping.get(ref)
            if target is not None and target[:8] == "Patient/" and target[8:] in file_patients:
                return None
            t, rid = parse_reference(target or ref)
            if t == "Patient" and rid:
                return None if rid in file_patients else rid
    return None


class _StreamedFile:
    """The entries of one Bundle file as the scanner finds them: identities and the fullUrl mapping, resources
    per type in blocks for the hot loop (this file's Patients always flushed first), entries whose references
    may name a later entry (an absolute reference not resolved yet) held until the file ends."""

    def __init__(self, session: IngestSession, name: str, fname: str, held: "_HeldBack"):
        self.session = session
        self.name = name
        self.fname = fname
        self.held = held
        self.mapping: dict[str, str] = {}
        self.mapping_b: dict[bytes, bytes] = {}
        self.file_patients: set = set()
        self.groups: dict[str, tuple[list[int], list[bytes]]] = {}
        self.pending = _Spool()
        self.sample_left = held.per_file  # the file's first resources still to mark for validation
        self.must: dict[str, int] = {}  # per type: the first lines of its next block that the sample takes
        self.n_entries = 0
        self.deleted = 0
        self.without_resource = 0
        self.unresolved = [0]
        self.producers = session.producers
        self.seen_patients = session.seen.get("Patient")

    def add(self, buf: bytearray, entries: list) -> None:
        producers = self.producers
        mapping, mapping_b = self.mapping, self.mapping_b
        get = mapping_b.get
        skipped = self.session.skipped_resources
        for e in entries:
            self.n_entries += 1
            pos = self.n_entries
            if e[0]:
                self._python_entry(pos, bytes(buf[e[1]:e[2]]))
                continue
            _, start, end, line, full, method, url, rtype, rid, id_kind, subj, pat, refs = e
            if method == "DELETE":
                self.deleted += 1
                continue
            if line is None:
                self.without_resource += 1
                self.session.quarantine(self.fname, pos, "Bundle", "entry without a resource")
                continue
            inject = None
            if id_kind == 0:  # as _entry_identity: from request.url, else the urn:uuid/urn:oid fullUrl
                if url is not None and "/" in url and "?" not in url and url.split("/", 1)[0] == rtype:
                    rid = url.split("/", 2)[1]
                elif full is not None and full.startswith("urn:uuid:"):
                    rid = full[9:]
                elif full is not None and full.startswith("urn:oid:"):
                    rid = full[8:]
                if rid:
                    inject = rid
                else:
                    rid = None
            elif not rid:  # an empty id: the Python path
                self._python_entry(pos, bytes(buf[start:end]))
                continue
            if full and rtype is not None and rid:
                target = f"{rtype}/{rid}"
                mapping[full] = target
                mapping_b[full.encode()] = target.encode()
            if rtype == "Patient":
                self.file_patients.add(rid)
            if rtype not in producers:
                if rtype is None:
                    self.session.quarantine(self.fname, pos, None, "missing resourceType")
                else:
                    skipped[rtype] = skipped.get(rtype, 0) + 1
                continue
            if refs:  # rewrite the references that name an entry; one that may name a later entry: held
                out: list[bytes] | None = None
                last = 0
                for k in range(0, len(refs), 2):
                    a, b = refs[k], refs[k + 1]
                    v = line[a:b]
                    t = get(v)
                    if t is None:
                        if v[:4] == b"urn:" or b"://" in v:  # absolute: it could be a later entry's fullUrl
                            break
                        continue
                    if out is None:
                        out = [line[:a], t]
                    else:
                        out.append(line[last:a])
                        out.append(t)
                    last = b
                else:
                    if out is not None:
                        out.append(line[last:])
                        line = b"".join(out)
                    refs = None
                if refs is not None:  # rewritten when the file ends, with its whole mapping
                    self.pending.add([pos, rtype, list(refs), subj, pat, inject], line)
                    continue
            if inject is not None:
                line = _with_id(line, inject)
            self._route(pos, rtype, line, subj, pat)

    def _python_entry(self, pos: int, raw: bytes) -> None:
        """An entry the scanner left to orjson: the whole-file reader's decisions, its line held to the end."""
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.session.quarantine(self.fname, pos, "Bundle", "invalid JSON")
            return
        if not isinstance(entry, dict):
            self.session.quarantine(self.fname, pos, "Bundle", "entry without a resource")
            return
        request = entry.get("request")
        if isinstance(request, dict) and request.get("method") == "DELETE":
            self.deleted += 1
            return
        res = entry.get("resource")
        if not isinstance(res, dict):
            self.without_resource += 1
            self.session.quarantine(self.fname, pos, "Bundle", "entry without a resource")
            return
        before = dict(self.mapping)
        rtype, full, rid = _entry_identity(entry, res, request, self.mapping)
        for k, v in self.mapping.items():
            if before.get(k) != v:
                self.mapping_b[k.encode()] = v.encode()
        if rtype == "Patient":
            self.file_patients.add(rid)
        if rtype not in self.producers:
            if type(rtype) is not str:
                self.session.quarantine(self.fname, pos, None, "missing resourceType")
            else:
                skipped = self.session.skipped_resources
                skipped[rtype] = skipped.get(rtype, 0) + 1
            return
        self.pending.add([pos, rtype, None, _ref_of(res, "subject"), _ref_of(res, "patient"), None],
                         orjson.dumps(res))

    def _route(self, pos: int, rtype: str, line: bytes, subj: str | None, pat: str | None) -> None:
        seen = self.seen_patients
        if seen is not None and rtype != "Patient":
            pid = _patient_of(subj, pat, self.mapping, self.file_patients)
            if pid is not None and pid not in seen:
                self.held.add(self.fname, rtype, pos, line)
                return
        g = self.groups.get(rtype)
        if g is None:
            g = self.groups[rtype] = ([], [])
        if self.sample_left and len(g[1]) == self.must.get(rtype, 0):  # the file's first resources: the sample
            self.sample_left -= 1
            self.must[rtype] = self.must.get(rtype, 0) + 1
        g[0].append(pos)
        g[1].append(line)
        if len(g[1]) >= _GROUP_LINES:
            self._flush("Patient")
            self._flush(rtype)

    def _flush(self, rtype: str) -> None:
        g = self.groups.pop(rtype, None)
        if g is None:
            return
        _ingest_group(self.session, self.fname, rtype, g[0], g[1], self.must.pop(rtype, 0))

    def finish(self) -> None:
        """The held entries with the file's whole mapping, then every block (Patients first)."""
        mapping, mapping_b, counts = self.mapping, self.mapping_b, self.unresolved
        for (pos, rtype, spans, subj, pat, inject), line in self.pending.drain():
            if spans is None:
                if _REF in line:
                    line = _rewrite(line, mapping_b, mapping, counts)
            else:
                line = _splice(line, spans, mapping_b, counts)
            if inject is not None:
                line = _with_id(line, inject)
            self._route(pos, rtype, line, subj, pat)
        for rtype in sorted(self.groups, key=processing_order):
            self._flush(rtype)
        if self.sample_left:  # resources held for a later file's Patients: the sample takes them on replay
            self.held.unsampled[self.fname] = self.sample_left

    def close(self) -> None:
        self.pending.close()


class _Spool:
    """(meta, bytes) items kept in order: in memory up to ``HELD_BACK_MEMORY`` bytes, then in a temporary file."""

    def __init__(self) -> None:
        self.items: list[tuple[list, bytes]] = []
        self.size = 0
        self.spill: Any = None

    def add(self, meta: list, line: bytes) -> None:
        self.items.append((meta, line))
        self.size += len(line)
        if self.size > HELD_BACK_MEMORY:
            if self.spill is None:
                self.spill = tempfile.TemporaryFile(prefix="synthfactory-bundle-pending-")
            w = self.spill.write
            for m, x in self.items:
                w(orjson.dumps([m, len(x)]) + b"\n" + x)
            self.items, self.size = [], 0

    def drain(self) -> Iterator[tuple[list, bytes]]:
        if self.spill is not None:
            self.spill.seek(0)
            for head in iter(self.spill.readline, b""):
                m, n = orjson.loads(head)
                yield m, self.spill.read(n)
        items, self.items = self.items, []
        yield from items

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None

def _ingest_whole(session: IngestSession, name: str, raw: bytes | None, sha: str, max_bytes: int, totals: dict,
                  held: "_HeldBack") -> None:
    """One Bundle file parsed whole (orjson): without the compiled module, or a file the streaming reader leaves
    to it (a bare resource, ``entry`` before ``resourceType``...). ``raw`` None: larger than ``max_bytes``."""
    fname = name.rsplit("/", 1)[-1]
    reason = None
    if raw is None:
        reason = f"bundle larger than {max_bytes} bytes"
    else:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            reason = "invalid JSON"
    if reason is not None:  # the whole file: one quarantine record, its outcome in the report
        session.record_file(name, sha, outcome="quarantined", reason=reason)
        session.quarantine(fname, 0, "Bundle", reason)
        return
    del raw
    totals["bundles"] += 1
    if not isinstance(doc, dict):
        session.record_file(name, sha, resources=1)
        session.quarantine(fname, 1, None, "not a JSON object")
        return
    if doc.get("resourceType") != "Bundle":
        entries: list = [{"resource": doc}]
    else:
        entries = doc.get("entry") or []
        if not isinstance(entries, list):
            entries = [None]
    del doc
    session.record_file(name, sha, resources=len(entries))

    # fullUrl -> Type/id, ids filled in (as resolve_bundle does)
    mapping: dict[str, str] = {}
    file_patients: set = set()  # this file's Patients are read before its other resources
    kept: list[tuple[int, dict]] = []
    for pos, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            session.quarantine(fname, pos, "Bundle", "entry without a resource")
            continue
        request = entry.get("request")
        if isinstance(request, dict) and request.get("method") == "DELETE":
            totals["deleted"] += 1
            continue
        res = entry.get("resource")
        if not isinstance(res, dict):
            totals["entries_without_resource"] += 1
            session.quarantine(fname, pos, "Bundle", "entry without a resource")
            continue
        rtype, full, rid = _entry_identity(entry, res, request, mapping)
        if rtype == "Patient":
            file_patients.add(rid)
        kept.append((pos, res))
    del entries

    # compact lines per type, references rewritten in the bytes; the parsed entries are freed as we go
    mapping_b = {k.encode(): v.encode() for k, v in mapping.items()}
    counts = [0]  # unresolved urn:uuid references
    producers = session.producers
    seen_patients = session.seen.get("Patient")
    check_patients = seen_patients is not None
    groups: dict[str, tuple[list[int], list[bytes]]] = {}
    dumps = orjson.dumps
    skipped = session.skipped_resources
    sample_left, must = held.per_file, {}
    kept.reverse()
    while kept:
        pos, res = kept.pop()
        rtype = res.get("resourceType")
        if rtype not in producers:
            if type(rtype) is not str:
                session.quarantine(fname, pos, None, "missing resourceType")
            else:
                skipped[rtype] = skipped.get(rtype, 0) + 1
            continue
        line = dumps(res)
        if _REF in line and (mapping_b or b"urn:uuid:" in line):
            line = _rewrite(line, mapping_b, mapping, counts)
        if check_patients and rtype != "Patient":
            pid = _patient_id(res, mapping, file_patients)
            if pid is not None and pid not in seen_patients:
                held.add(fname, rtype, pos, line)
                continue
        g = groups.get(rtype)
        if g is None:
            g = groups[rtype] = ([], [])
        if sample_left and len(g[1]) == must.get(rtype, 0):  # the file's first resources
            sample_left -= 1
            must[rtype] = must.get(rtype, 0) + 1
        g[0].append(pos)
        g[1].append(line)
    unresolved = counts[0]
    totals["unresolved_references"] += unresolved
    for rtype in sorted(groups, key=processing_order):  # this file's Patients first
        positions, lines = groups[rtype]
        _ingest_group(session, fname, rtype, positions, lines, must.get(rtype, 0))
    if sample_left:
        held.unsampled[fname] = sample_left


HELD_BACK_MEMORY = 32 << 20  # bytes of held-back lines kept in memory; more go to a temporary file


class _HeldBack:
    """Resources held back until every file's Patients are read: in memory up to ``limit`` bytes, then in a
    temporary file (bounded memory whatever the order of the files)."""

    def __init__(self, limit: int | None = None):
        self.limit = HELD_BACK_MEMORY if limit is None else limit
        self.count = 0
        self.size = 0
        self.per_file = 0  # the validation sample's first resources of each file (see ingest_bundles)
        self.unsampled: dict[str, int] = {}  # file -> its first resources still to validate when replayed
        self.items: list[tuple[str, str, int, bytes]] = []
        self.spill: Any = None

    def add(self, fname: str, rtype: str, pos: int, line: bytes) -> None:
        self.count += 1
        self.items.append((fname, rtype, pos, line))
        self.size += len(line)
        if self.size > self.limit:
            self._flush()

    def _flush(self) -> None:
        if self.spill is None:
            self.spill = tempfile.TemporaryFile(prefix="synthfactory-bundle-held-")
        w = self.spill.write
        for fname, rtype, pos, line in self.items:
            w(orjson.dumps([fname, rtype, pos, len(line)]) + b"\n" + line)  # a line may hold newlines
        self.items, self.size = [], 0

    def _all(self) -> Iterator[tuple[str, str, int, bytes]]:
        if self.spill is not None:
            self.spill.seek(0)
            for head in iter(self.spill.readline, b""):
                fname, rtype, pos, n = orjson.loads(head)
                yield fname, rtype, pos, self.spill.read(n)
        yield from self.items

    def replay(self) -> Iterator[tuple[str, str, list[int], list[bytes]]]:
        """(file, type, positions, lines) runs, in the order they were held."""
        key: tuple[str, str] | None = None
        positions: list[int] = []
        lines: list[bytes] = []
        for fname, rtype, pos, line in self._all():
            if key != (fname, rtype) or len(lines) >= _GROUP_LINES:
                if lines:
                    yield key[0], key[1], positions, lines  # type: ignore[index]
                key, positions, lines = (fname, rtype), [], []
            positions.append(pos)
            lines.append(line)
        if lines:
            yield key[0], key[1], positions, lines  # type: ignore[index]

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None
