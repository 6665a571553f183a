"""The compiled flatten of plain NDJSON lines (``_flatc``, C), used by the NDJSON hot loop
(:func:`.fhir_ndjson.ingest_ndjson`).

Per block of lines, ``prepare`` (parse, flatten, key: no Python objects, no GIL) runs on the worker threads
of a ``PreparePool`` (the module's own, one per core, each with a flattener of its own), which take the started
blocks oldest first, up to :data:`AHEAD_PER_WORKER` per worker ahead of the commit (:func:`prepared`), and
``commit`` (the checks against the session's state and the side effects, in line order) on the ingest thread,
so the two cores share the work of one process.

It covers Observation, Encounter and Condition (the rows of the hand-written flatteners) and MedicationRequest
and Procedure (the rows of their built-in ViewDefinitions) and Patient (the hand-written flattener's row; its
identifiers, names, address lines and telecoms in ``collect_identifiers``' order, and its key added to the
session's patient keys), and only the lines it can prove plain: strict JSON, the shapes the hand-written flatteners read, canonical dateTimes, ``Type/id``
references, no escapes in a value it keeps. Every other line (invalid, unusual, a duplicate id, one picked
for validation, a dangling reference, a modifierExtension) is handed to the Python loop untouched, so the
rows, quarantine records and report are the Python path's (tests/ingest/test_native.py proves it,
differentially, on generated, real-shaped and mutated lines).

The module is optional: without a C compiler at install time the package has no ``_flatc`` and ingest
runs the Python path. ``SYNTHFACTORY_INGEST_NATIVE=0`` turns it off at run time.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

try:
    from . import _flatc  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the Python path
    _flatc = None

#: resource types the compiled flatten covers (the others always take the Python path)
TYPES = ("Observation", "Encounter", "Condition", "MedicationRequest", "Procedure", "Patient")
_PROBES = (("Patient", "probe-1"), ("Encounter", "e/2"), ("Observation", "x#0"),
           ("Observation", "\u00e9t\u00e9-\u4e2d"), ("Condition", "y" * 200))


def available() -> bool:
    """True when the compiled module is installed and not switched off."""
    return _flatc is not None and os.environ.get("SYNTHFACTORY_INGEST_NATIVE", "1").strip().lower() not in (
        "0", "false", "no", "off")


def release_scratch() -> None:
    """Free the per-block arrays the compiled prepare keeps for its next block (a few MB; called as an
    ingest ends)."""
    if _flatc is not None and hasattr(_flatc, "release_scratch"):
        _flatc.release_scratch()


def id_set() -> Any:
    """An empty set of resource ids: the compiled ``IdSet`` (128-bit hashes, ~24-32 bytes per id against ~120
    for a set of str: 75M ids at 2M patients) where the module is installed, else a ``set``. Both take
    ``add``, ``in`` and ``len`` and tell the same ids apart (the hashes collide with probability ~n^2 / 2^129)."""
    if _flatc is not None and hasattr(_flatc, "IdSet"):  # a module built from an older _flatc.c has none
        return _flatc.IdSet()
    return set()


def first_seen_mask(values: Any) -> Any | None:
    """A numpy bool mask over an Arrow ``string`` array: True at the first string of each value (hashed, equal
    hashes compared byte for byte: exact), computed without the GIL; None where the module is missing, the array
    is of another type (``large_string``...) or holds a null."""
    import numpy as np
    import pyarrow as pa

    if _flatc is None or not hasattr(_flatc, "first_seen") or not pa.types.is_string(values.type) or values.null_count:
        return None
    n = len(values)
    if not n:
        return np.zeros(0, dtype=bool)
    _, offsets, data = values.buffers()
    offsets = offsets.slice(values.offset * 4, (n + 1) * 4)
    return np.frombuffer(_flatc.first_seen(offsets, data if data is not None else b"", n), dtype=bool)


def columns(schema: Any) -> Any | None:
    """A row buffer for a table of ``schema`` that keeps its rows as Arrow buffers (string, float64 and
    timestamp[us], bool and date32 columns), or None when the module is missing or a column has another type. Python rows
    go in with ``append``/``extend`` like into a list; :func:`arrays` turns it into Arrow arrays."""
    import pyarrow as pa

    if _flatc is None:
        return None
    kinds = []
    for f in schema:
        if pa.types.is_string(f.type):
            kinds.append("s")
        elif pa.types.is_float64(f.type):
            kinds.append("d")
        elif pa.types.is_timestamp(f.type) and f.type.unit == "us":
            kinds.append("t")
        elif pa.types.is_boolean(f.type):
            kinds.append("b")
        elif pa.types.is_date32(f.type):
            kinds.append("D")
        else:
            return None
    return _flatc.Columns("".join(kinds))


def arrays(cols: Any, schema: Any) -> list:
    """The Arrow arrays of a :func:`columns` buffer (which is empty afterwards)."""
    import pyarrow as pa

    n = len(cols)
    out = []
    for (nulls, valid, offsets, data), f in zip(cols.take(), schema):
        bufs = [pa.py_buffer(valid) if valid is not None else None]
        if offsets is not None:
            bufs.append(pa.py_buffer(offsets))
        bufs.append(pa.py_buffer(data))
        out.append(pa.Array.from_buffers(f.type, n, bufs, null_count=nulls))
    return out


#: blocks queued for a :func:`prepare_pool`'s workers beyond the one being committed, per worker (2: with one
#: per worker, as with ``Flattener.start``, a core went idle whenever the queued blocks were done before the
#: commit of the one before them)
AHEAD_PER_WORKER = 2


def prepare_pool(flats: list) -> Any | None:
    """A ``PreparePool`` over ``flats`` (one worker thread per flattener, taking the started blocks oldest first;
    the flatteners are the pool's for its life), or None for a module built from an older ``_flatc.c``."""
    if _flatc is None or not hasattr(_flatc, "PreparePool"):
        return None
    return _flatc.PreparePool(flats)


def prepared(blocks: Iterable[list], flats: Any, pool: Any = None) -> Iterator[tuple[list, Any]]:
    """``(block, prepared block)`` for each block, in order, the next blocks' prepares running while the
    caller commits the current one.

    ``flats`` is a :func:`prepare_pool`: up to :data:`AHEAD_PER_WORKER` blocks per worker are queued beyond
    the one being committed. Or a flattener or a list of flatteners of one type. With ``Flattener.start`` (a thread of the
    module's own, which never takes the GIL) block i is prepared by ``flats[i % len(flats)]``, and up to
    ``len(flats)`` blocks are prepared ahead of the one being committed. A module built from an older
    ``_flatc.c`` prepares on ``pool`` (or the pool a callable ``pool`` returns): one helper thread. The
    prepare releases the GIL, but the pool's thread needs it to pick up and hand back each block, so it waits
    for the caller's commit; measured, the two phases then ran almost one after the other."""
    if hasattr(flats, "workers"):  # a PreparePool
        ahead = max(1, AHEAD_PER_WORKER * flats.workers)
        queued: deque[tuple[list, Any]] = deque()
        for block in blocks:
            queued.append((block, flats.start(block)))
            if len(queued) > ahead:
                done = queued.popleft()
                yield done[0], done[1].wait()
        while queued:
            block, prep = queued.popleft()
            yield block, prep.wait()
        return
    flats = list(flats) if isinstance(flats, (list, tuple)) else [flats]
    if not hasattr(flats[0], "start"):
        pool = pool() if callable(pool) else pool  # a factory: the pool is started only where needed
        pending: tuple[list, Any] | None = None
        for block in blocks:
            fut = pool.submit(flats[0].prepare, block)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (block, fut)
        if pending is not None:
            yield pending[0], pending[1].result()
        return
    m = len(flats)
    inflight: deque[tuple[list, Any]] = deque()
    for i, block in enumerate(blocks):
        if len(inflight) < m:
            inflight.append((block, flats[i % m].start(block)))
            continue
        done = inflight.popleft()
        done[1].wait()  # frees its flattener (one prepare at a time each) for block i
        inflight.append((block, flats[i % m].start(block)))
        yield done
    while inflight:
        block, prep = inflight.popleft()
        yield block, prep.wait()


def flattener(rtype: str, keyer: Any, rules: Any = None) -> Any | None:
    """A compiled flattener for ``rtype`` keyed like ``keyer``, or None (type not covered, module not
    available, or a keyer whose keys it cannot reproduce: it is checked against ``keyer.key``).

    ``rules`` (a :class:`.flatteners.ValueRules`, the defaults when None) are the hand-written flatteners':
    a ``valueString`` is dropped (or, with allow-listed codes, handed to the Python loop, which decides),
    and a value outside its unit's range hands the line to the Python loop, which quarantines it."""
    from .flatteners import ValueRules

    if rtype not in TYPES or not available() or not hasattr(keyer, "hmac_pads"):
        return None
    rules = rules or ValueRules()
    ranges = [(u, lo, hi) for u, (lo, hi) in rules.ranges.items() if len(u.encode()) <= 64]
    if len(ranges) != len(rules.ranges) or len(ranges) > 128:
        log.info("compiled flatten disabled for %s: more value ranges than it holds", rtype)
        return None
    ipad, opad = keyer.hmac_pads()
    try:
        flat = _flatc.Flattener(rtype, ipad, opad, strings_fb=bool(rules.text_codes), ranges=ranges,
                                lo=rules.default[0], hi=rules.default[1])
    except TypeError:  # a module built from an older _flatc.c: it would keep valueStrings and any value
        log.warning("compiled flatten disabled: the installed _flatc is older than its source "
                    "(rebuild it: python setup.py build_ext --inplace); ingest runs the Python path")
        return None
    if any(flat.key(t, i) != keyer.key(t, i) for t, i in _PROBES):
        log.warning("compiled flatten disabled: its keys differ from the keyer's")
        return None
    return flat
