"""FHIR Bundles (transaction, batch, collection, searchset) as an extract: ``*.json``/``*.json.gz`` files,
local or ``s3://``, one Bundle (or one bare resource) each.

Within a Bundle, ``fullUrl`` values (``urn:uuid:...``, ``urn:oid:...`` or absolute URLs) are resolved: every
reference to an entry's ``fullUrl`` is rewritten to ``Type/id`` before flattening, so the keys are exactly
the ones an NDJSON export of the same data gives. An entry without ``resource.id`` (a transaction POST)
takes its id from ``request.url`` (``PUT Patient/123``) or from its ``urn:uuid:`` fullUrl. A reference to a
``urn:uuid:`` that no entry carries is counted as unresolved (keyed by the uuid, as NDJSON would).

Bundles are read whole (they are single JSON documents): a file larger than ``max_bundle_bytes``, one that
is not valid JSON, and an entry without a resource are quarantined; the rest of the extract still loads.
Patients of every file are flattened first (pass 1), the other resources after (pass 2), so the
dangling-reference check sees all patients.
"""

from __future__ import annotations

import gzip
import io
import hashlib
import logging
from typing import Any, Iterable, Iterator

import orjson

from synthfactory.keys import Keyer
from synthfactory.storage import Store

from synthfactory.fhir.normalize import ExtractError
from .session import DEFAULT_MAX_LINE_BYTES, IngestSession, check_resources, gc_paused, relative_name, scan_source

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
        rtype = res.get("resourceType")
        full = entry.get("fullUrl")
        rid = res.get("id")
        if not (type(rid) is str and rid):
            url = request.get("url")
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
) -> dict:
    """Flatten a folder of Bundle files into the same tables as :func:`.fhir_ndjson.ingest_extract`."""
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
                                validate_max_per_type=validate_max_per_type, value_rules=value_rules)
        totals = {"bundles": 0, "deleted": 0, "unresolved_references": 0, "entries_without_resource": 0}
        for name, reason in refused.items():
            log.warning("ingest: %s refused: %s", name, reason)
            session.skip_file(name, reason, outcome="refused")
        try:
            for pass_no in (1, 2):
                for name, uri in files:
                    entries = _load(session, store, name, uri, max_bundle_bytes, totals, first=pass_no == 1)
                    if entries is None:
                        continue
                    fname = name.rsplit("/", 1)[-1]
                    if pass_no == 1:
                        session.ingest_resources(fname, _only(entries, patients=True))
                    else:
                        session.ingest_resources(fname, _only(entries, patients=False))
        except BaseException:
            session.abort()
            raise
        return session.finish(source=source_uri, skipped_files=skipped,
                              extra={"source_kind": "fhir_bundle", "bundle_stats": totals, **(extra_report or {})})


def _only(entries: list[tuple[int, Any]], *, patients: bool) -> Iterator[tuple[int, Any]]:
    for pos, res in entries:
        is_patient = isinstance(res, dict) and res.get("resourceType") == "Patient"
        if is_patient == patients:
            yield pos, res


def _load(session: IngestSession, store: Store, name: str, uri: str, max_bytes: int, totals: dict,
          first: bool) -> list[tuple[int, Any]] | None:
    fname = name.rsplit("/", 1)[-1]
    if not first and session.file_outcomes.get(name, {}).get("outcome") == "quarantined":
        return None  # quarantined whole in pass 1 (one record, not two)
    raw, sha = _read_bundle(store, name, uri, max_bytes)
    reason = None
    doc: Any = None
    if raw is None:
        reason = f"bundle larger than {max_bytes} bytes"
    else:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            reason = "invalid JSON"
    if reason is not None:
        if first:
            session.record_file(name, sha, outcome="quarantined", reason=reason)
            session.quarantine(fname, 0, "Bundle", reason)
        return None
    entries, stats = resolve_bundle(doc)
    if first:
        session.record_file(name, sha, resources=len(entries))
        totals["bundles"] += 1
        for k, v in stats.items():
            totals[k] += v
        for pos, res in entries:
            if res is None:
                session.quarantine(fname, pos, "Bundle", "entry without a resource")
    return [(p, r) for p, r in entries if r is not None]
