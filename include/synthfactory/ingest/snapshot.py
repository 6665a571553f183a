"""The current extract of an incremental FHIR Bulk Data source, kept in staging between runs.

An incremental bulk export (``_since`` = the previous run's ``transactionTime``) returns only the resources
created or changed since then, and ``deleted[]`` names the ones removed. Training on that delta alone would
model a handful of recently touched patients, so every run merges the delta into the previous *snapshot*
(one NDJSON file per resource type, in the secure staging area next to the export state) and ingests the
merged snapshot:

* a resource in the delta replaces every earlier version with the same ``resourceType``/``id`` (the newest
  version wins);
* an id that occurs more than once within one export is counted (``duplicate_lines``): identical repeats
  are kept once (``duplicate_identical``); versions that differ cannot be told apart, so every one of them
  is quarantined (``duplicate_conflicting`` ids; the records, file and line, are in the returned
  ``quarantine`` list, which ingest writes to quarantine.ndjson) and an earlier snapshot version is dropped;
* a resource named in ``deleted[]`` is removed (also when the delta carries a version of it: the order of
  the two is unknown, and a deleted record must not be used);
* everything else is carried over unchanged.

A full export (no ``_since``) replaces the snapshot. A line that is not a JSON object with a string
``resourceType`` and ``id`` cannot be matched to an earlier version: it is passed through unchanged, so
ingest quarantines it with its line number and reason as for any extract.

The new snapshot is written under its own folder (``snapshot/<export id>/``) and only then made current
(``snapshot/current.json``); the previous folder is removed after that. A task that fails half-way leaves
the previous snapshot current, and merging the same delta again gives the same result (it is an upsert).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from typing import IO, Iterable, Iterator

import orjson

from synthfactory.storage import Store, is_s3, join

log = logging.getLogger(__name__)

__all__ = ["current_snapshot", "merge_snapshot", "snapshot_root"]

CURRENT = "current.json"


def snapshot_root(state_dir: str) -> str:
    return join(state_dir, "snapshot")


def current_snapshot(store: Store, state_dir: str) -> dict | None:
    """The current snapshot's record (``uri``, ``export_id``, ``transactionTime``, ``counts``), or None."""
    uri = join(snapshot_root(state_dir), CURRENT)
    return store.read_json(uri) if store.exists(uri) else None


def _identity(line: bytes) -> tuple[str, str] | None:
    try:
        o = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(o, dict):
        return None
    t, i = o.get("resourceType"), o.get("id")
    return (t, i) if isinstance(t, str) and isinstance(i, str) and t and i else None


def _lines(store: Store, uri: str) -> Iterator[bytes]:
    import gzip

    fh: IO[bytes] = store.open_read(uri)
    try:
        stream: IO[bytes] = gzip.GzipFile(fileobj=fh) if uri.endswith(".gz") else fh  # type: ignore[assignment]
        for line in stream:
            if line.strip():
                yield line.rstrip(b"\r\n")
    finally:
        fh.close()


def _numbered_lines(store: Store, uri: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of the non-blank lines of a file (numbers count the blank ones too)."""
    import gzip

    fh: IO[bytes] = store.open_read(uri)
    try:
        stream: IO[bytes] = gzip.GzipFile(fileobj=fh) if uri.endswith(".gz") else fh  # type: ignore[assignment]
        for n, line in enumerate(stream, 1):
            if line.strip():
                yield n, line.rstrip(b"\r\n")
    finally:
        fh.close()


def _same(a: bytes, b: bytes) -> bool:
    if a == b:
        return True
    try:
        return orjson.loads(a) == orjson.loads(b)
    except orjson.JSONDecodeError:
        return False


def _type_of(name: str) -> str:
    base = os.path.basename(name)
    for sep in (".", "-", "_"):
        base = base.split(sep, 1)[0]
    return base


def merge_snapshot(
    store: Store,
    state_dir: str,
    delta_uris: Iterable[str],
    deletions: Iterable[tuple[str, str]],
    *,
    export_id: str,
    transaction_time: str | None,
    incremental: bool,
) -> dict:
    """Merge the export files ``delta_uris`` (NDJSON, plain or .gz) and ``deletions`` ((type, id) pairs)
    into the current snapshot (``incremental``) or start a new one from them (a full export). Returns the
    new snapshot's record; its ``uri`` is the folder to ingest. Counts only, never ids, are logged."""
    root = snapshot_root(state_dir)
    previous = current_snapshot(store, state_dir) if incremental else None
    if incremental and previous is None:
        log.warning("incremental bulk export without a snapshot to merge into: the run sees only the delta")
    dest = join(root, export_id)
    if previous and previous.get("uri") == dest:
        log.info("snapshot %s is already current (a retried task): nothing to merge", export_id)
        return previous
    local = tempfile.mkdtemp(prefix="synthfactory-snapshot-") if is_s3(dest) else dest + ".partial"
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local)
    deleted: dict[str, set[str]] = {}
    for t, i in deletions:
        deleted.setdefault(t, set()).add(i)
    stats = {"changed": 0, "unmatched_lines": 0, "deleted_applied": 0, "carried_over": 0, "replaced": 0,
             "duplicate_lines": 0, "duplicate_identical": 0, "duplicate_conflicting": 0}
    quarantine: list[dict] = []
    try:
        # 1. the delta, per type; an id twice in the export: identical repeats once, differing versions quarantined
        delta: dict[str, dict[str, bytes]] = {}
        first: dict[str, dict[str, int]] = {}  # where each id was first seen: file index << 32 | line
        conflicts: dict[str, dict[str, list[int]]] = {}
        unmatched: dict[str, list[bytes]] = {}
        names: list[str] = []
        for fi, uri in enumerate(delta_uris):
            names.append(uri.rstrip("/").rsplit("/", 1)[-1])
            for lineno, line in _numbered_lines(store, uri):
                ident = _identity(line)
                if ident is None:
                    unmatched.setdefault(_type_of(uri), []).append(line)
                    stats["unmatched_lines"] += 1
                    continue
                t, i = ident
                d = delta.setdefault(t, {})
                prev = d.get(i)
                c = conflicts.get(t)
                if prev is None and (c is None or i not in c):
                    d[i] = line
                    first.setdefault(t, {})[i] = fi << 32 | lineno
                    continue
                stats["duplicate_lines"] += 1
                if c is not None and i in c:
                    c[i].append(fi << 32 | lineno)
                elif _same(prev, line):  # type: ignore[arg-type]
                    stats["duplicate_identical"] += 1
                else:
                    conflicts.setdefault(t, {})[i] = [first[t][i], fi << 32 | lineno]
                    del d[i]
        for t, ids in sorted(conflicts.items()):
            stats["duplicate_conflicting"] += len(ids)
            for where in ids.values():
                for w in where:
                    quarantine.append({"file": names[w >> 32], "line": w & 0xFFFFFFFF, "resource_type": t,
                                       "reason": "duplicate id with different content in one export"})
        if stats["duplicate_lines"]:
            log.warning("bulk export %s: %d line(s) repeat an id of the same export (%d identical, kept once; "
                        "%d id(s) with differing versions, quarantined)", export_id, stats["duplicate_lines"],
                        stats["duplicate_identical"], stats["duplicate_conflicting"])
        del first
        stats["changed"] = sum(len(v) for v in delta.values())
        # 2. the previous snapshot, minus replaced and deleted resources, then the delta
        counts: dict[str, int] = {}
        types = set(delta) | set(unmatched) | set((previous or {}).get("counts") or {})
        for t in sorted(types):
            path = os.path.join(local, f"{t}.ndjson")
            n = 0
            changed = delta.get(t, {})
            gone = deleted.get(t, set())
            ambiguous = conflicts.get(t, {})
            with open(path, "wb") as out:
                if previous:
                    prev_uri = join(previous["uri"], f"{t}.ndjson")
                    if store.exists(prev_uri):
                        for line in _lines(store, prev_uri):
                            ident = _identity(line)
                            if ident is not None and (ident[1] in changed or ident[1] in ambiguous):
                                stats["replaced"] += 1
                                continue
                            if ident is not None and ident[1] in gone:
                                stats["deleted_applied"] += 1
                                continue
                            out.write(line + b"\n")
                            n += 1
                            stats["carried_over"] += 1
                for rid, line in changed.items():
                    if rid in gone:  # both changed and deleted since _since: the deletion wins
                        stats["deleted_applied"] += 1
                        continue
                    out.write(line + b"\n")
                    n += 1
                for line in unmatched.get(t, []):
                    out.write(line + b"\n")
                    n += 1
            if n == 0:
                os.unlink(path)
            else:
                counts[t] = n
        # 3. publish the folder, then make it current, then drop the previous one
        if is_s3(dest):
            store.remove_tree(dest)
            for name in sorted(os.listdir(local)):
                with open(os.path.join(local, name), "rb") as fh:
                    store.write_bytes(join(dest, name), fh.read())
        else:
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(local, dest)
    finally:
        if os.path.isdir(local):
            shutil.rmtree(local, ignore_errors=True)
    record = {"uri": dest, "export_id": export_id, "transactionTime": transaction_time, "incremental": incremental,
              "base": (previous or {}).get("export_id"), "counts": counts, "resources": sum(counts.values()),
              **stats, "merged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "quarantine": quarantine}  # file, line, type, reason: for the ingest of this export (a retry too)
    store.write_json(join(root, CURRENT), record)
    if previous and previous.get("uri") and previous["uri"] != dest:
        store.remove_tree(previous["uri"])
    log.info("snapshot %s: %d resources (%d changed, %d replaced, %d deleted, %d carried over, base %s)",
             export_id, record["resources"], stats["changed"], stats["replaced"], stats["deleted_applied"],
             stats["carried_over"], record["base"])
    return record
