"""Streaming ingest of a FHIR R4 bulk-export (NDJSON) extract into flat, pseudonymised Parquet tables.

``ingest_extract(source_uri, out_uri, keyer=...)`` reads ``<ResourceType>[.|-|_...].ndjson[.gz]`` files
from a local folder or ``s3://bucket/prefix`` line by line (never a whole file in memory), parses each
line with orjson, flattens it with plain dict access into one or more rows and flushes the rows as
Parquet row groups of ``batch_rows`` rows (explicit Arrow schemas, zstd).

Written under ``out_uri`` (the secure staging area):

* ``patient.parquet``, ``encounter.parquet``, ``condition.parquet``, ``observation.parquet``: the
  flattened tables (schemas in :mod:`synthfactory.ingest.schemas`). Every source id is replaced by a
  salted HMAC key; names, identifiers, addresses and telecoms are never written to them.
* ``quarantine.ndjson``: one record per rejected line (file name, 1-based line number, resource type,
  short reason). Never the raw line nor any value from it.
* ``identifiers.parquet``: the real direct identifiers seen (ids, identifier values, names, address
  lines, telecoms) for the downstream leak scan. It stays in staging.
* ``ingest_report.json``: counts, URIs, timings and the extract's sha256.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from itertools import islice
from datetime import date
from typing import IO, Any, Callable, Iterable

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from synthfactory.keys import KEY_HEX_CHARS, Keyer
from synthfactory.storage import Store, is_s3, iter_lines, join

from .schemas import IDENTIFIERS_SCHEMA, TABLES

log = logging.getLogger(__name__)

__all__ = ["ExtractError", "ingest_extract", "SUPPORTED_RESOURCES"]

SUPPORTED_RESOURCES = tuple(TABLES)
DEFAULT_RESOURCES = ("Patient", "Encounter", "Condition", "Observation")
ALWAYS_VALIDATE_FIRST = 20
IDENTIFIER_CHUNK_ROWS = 100_000
GC_GEN0_THRESHOLD = 50_000

QUARANTINE_FILE = "quarantine.ndjson"
IDENTIFIERS_FILE = "identifiers.parquet"
REPORT_FILE = "ingest_report.json"


class ExtractError(ValueError):
    """The extract is missing, empty or unusable. The message is user-facing and holds no patient data."""


class _Bad(Exception):
    """A resource that must be quarantined; ``reason`` is short and holds no value from the resource."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# Code systems
# --------------------------------------------------------------------------------------------------
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

#: preference rank of a coding's system (lower wins): LOINC > SNOMED CT > ICD-10-CM > RxNorm
_SYSTEM_RANK = {
    LOINC: 0, "urn:oid:2.16.840.1.113883.6.1": 0,
    SNOMED: 1, "urn:oid:2.16.840.1.113883.6.96": 1,
    ICD10CM: 2, "urn:oid:2.16.840.1.113883.6.90": 2,
    RXNORM: 3, "urn:oid:2.16.840.1.113883.6.88": 3,
}
_SYSTEM_SHORT = {
    LOINC: "loinc", "urn:oid:2.16.840.1.113883.6.1": "loinc",
    SNOMED: "snomed", "urn:oid:2.16.840.1.113883.6.96": "snomed",
    ICD10CM: "icd10cm", "urn:oid:2.16.840.1.113883.6.90": "icd10cm",
    RXNORM: "rxnorm", "urn:oid:2.16.840.1.113883.6.88": "rxnorm",
}

US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
US_CORE_BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
_GENDERS = frozenset(("male", "female", "other", "unknown"))


# --------------------------------------------------------------------------------------------------
# Dates (hand-written: one regex per distinct string, results cached)
# --------------------------------------------------------------------------------------------------
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_DAY_US = 86_400_000_000
_DATE_RE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?", re.ASCII)
_DATETIME_RE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})"
    r"(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?",
    re.ASCII,
)
_PRECISION = ("year", "month", "day")
_TS_CACHE: dict[str, int] = {}
_TS_CACHE_MAX = 1 << 18


def parse_fhir_date(value: Any) -> tuple[int, str]:
    """A FHIR ``date`` (YYYY, YYYY-MM, YYYY-MM-DD) -> (days since 1970-01-01 of its first day, precision).

    Raises ValueError when it is not a valid FHIR date."""
    if type(value) is not str:
        raise ValueError("not a string")
    m = _DATE_RE.fullmatch(value)
    if m is None:
        raise ValueError("not a FHIR date")
    y, mo, d = m.groups()
    days = date(int(y), int(mo or 1), int(d or 1)).toordinal() - _EPOCH_ORDINAL
    return days, _PRECISION[(mo is not None) + (d is not None)]


def _parse_datetime_parts(value: Any) -> tuple[int, int]:
    """A FHIR ``dateTime``/``instant`` -> (micros since epoch UTC, local days since epoch of its date)."""
    if type(value) is not str:
        raise ValueError("not a string")
    m = _DATETIME_RE.fullmatch(value)
    if m is None:
        raise ValueError("not a FHIR dateTime")
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    days = date(int(y), int(mo or 1), int(d or 1)).toordinal() - _EPOCH_ORDINAL
    if hh is None:
        return days * _DAY_US, days
    h, mn, s = int(hh), int(mi), int(ss or 0)
    if h > 23 or mn > 59 or s > 60:  # 60: a leap second, rolls into the next minute
        raise ValueError("time out of range")
    secs = days * 86400 + h * 3600 + mn * 60 + s
    if tz and tz != "Z":
        oh, om = int(tz[1:3]), int(tz[4:6])
        if oh > 14 or om > 59:
            raise ValueError("offset out of range")
        off = oh * 3600 + om * 60
        secs -= off if tz[0] == "+" else -off
    us = int((frac + "00000")[:6]) if frac else 0
    return secs * 1_000_000 + us, days


def parse_fhir_datetime(value: Any) -> int:
    """A FHIR ``dateTime``/``instant`` -> microseconds since the epoch, UTC (a partial one at its first
    instant; a time without zone read as UTC). Raises ValueError when it is not valid."""
    v = _TS_CACHE.get(value) if type(value) is str else None
    if v is None:
        v = _parse_datetime_parts(value)[0]
        if len(_TS_CACHE) >= _TS_CACHE_MAX:
            _TS_CACHE.clear()
        _TS_CACHE[value] = v
    return v


def _ts(value: Any, field: str) -> int:
    v = _TS_CACHE.get(value) if type(value) is str else None
    if v is not None:
        return v
    try:
        return parse_fhir_datetime(value)
    except (ValueError, TypeError, OverflowError):
        raise _Bad(f"invalid date in {field}") from None


# --------------------------------------------------------------------------------------------------
# Small accessors
# --------------------------------------------------------------------------------------------------
def _s(value: Any, field: str) -> str | None:
    if value is None or type(value) is str:
        return value
    raise _Bad(f"invalid value in {field}")


def _concept(cc: Any, field: str) -> tuple[str | None, str | None, str | None]:
    """(short system, code, display) of the preferred coding of a CodeableConcept."""
    if not cc:
        return None, None, None
    codings = cc.get("coding")
    best = None
    if codings:
        if len(codings) == 1:
            best = codings[0]
        else:
            rank = 99
            for c in codings:
                r = _SYSTEM_RANK.get(c.get("system"), 99)
                if r < rank:
                    best, rank = c, r
            if best is None:
                best = codings[0]
    if best is None:
        return None, None, _s(cc.get("text"), field)
    system = best.get("system")
    code = best.get("code")
    display = best.get("display") or cc.get("text")
    if (type(code) is not str and code is not None) or (type(display) is not str and display is not None) \
            or (type(system) is not str and system is not None):
        raise _Bad(f"invalid value in {field}")
    return _SYSTEM_SHORT.get(system, system), code, display


def _first_code(cc: Any, field: str) -> str | None:
    """Code of the first coding of a CodeableConcept, else its text."""
    if not cc:
        return None
    codings = cc.get("coding")
    if codings:
        return _s(codings[0].get("code"), field)
    return _s(cc.get("text"), field)


def _ref_id(ref_obj: Any, rtype: str) -> str | None:
    """The id that a Reference points at when it targets ``rtype`` (relative, absolute URL, /_history/n,
    urn:uuid:), else None."""
    if not ref_obj:
        return None
    ref = ref_obj.get("reference")
    if not ref:
        return None
    if type(ref) is not str:
        raise _Bad("invalid reference")
    i = ref.find("/_history/")
    if i >= 0:
        ref = ref[:i]
    if ref.startswith("urn:uuid:"):
        return ref[9:] or None
    if ref[0] == "#":  # contained resource: no pseudonymous key for it
        return None
    parts = ref.rsplit("/", 2)
    if len(parts) == 1:
        return ref
    if parts[-2] != rtype:
        return None
    return parts[-1] or None


def _has_modifier_extension(node: Any) -> bool:
    if isinstance(node, dict):
        if node.get("modifierExtension"):
            return True
        return any(_has_modifier_extension(v) for v in node.values() if isinstance(v, (dict, list)))
    if isinstance(node, list):
        return any(_has_modifier_extension(v) for v in node if isinstance(v, (dict, list)))
    return False


def _omb_display(ext: dict) -> str | None:
    """Display (or code) of the first ombCategory of a US Core race/ethnicity extension."""
    for sub in ext.get("extension") or ():
        if sub.get("url") == "ombCategory":
            c = sub.get("valueCoding") or {}
            v = c.get("display") or c.get("code")
            return v if type(v) is str else None
    return None


# --------------------------------------------------------------------------------------------------
# Flatteners: resource dict -> list of row tuples in schema column order
# --------------------------------------------------------------------------------------------------
Flattener = Callable[[dict, str], list]


def _fast_key(keyer: Keyer) -> Callable[[str, str], str]:
    """``keyer.key`` without the pure-Python ``hmac.HMAC.copy`` wrapper (about 2.5x faster per key).

    Uses the OpenSSL HMAC object inside the Keyer when there is one, and checks that it gives exactly
    the same keys; otherwise (another Python or Keyer implementation) falls back to ``keyer.key``."""
    inner = getattr(getattr(keyer, "_mac", None), "_hmac", None)
    if inner is None or not hasattr(inner, "copy"):
        return keyer.key
    n = KEY_HEX_CHARS

    def key(resource_type: str, source_id: str) -> str:
        m = inner.copy()
        m.update(f"{resource_type}/{source_id}".encode())
        return m.hexdigest()[:n]

    try:
        probes = (("Patient", "probe-1"), ("Observation", "x#0"), ("Encounter", "\u00e9t\u00e9"))
        if all(key(t, i) == keyer.key(t, i) for t, i in probes):
            return key
    except Exception:  # noqa: BLE001 - any surprise: use the public API
        pass
    return keyer.key


def _make_flatteners(keyer: Keyer) -> dict[str, Flattener]:
    key = _fast_key(keyer)
    pcache: dict[str, str] = {}
    ecache: dict[str, str] = {}

    def ref_key(ref_obj: Any, rtype: str, cache: dict[str, str]) -> str | None:
        if not ref_obj:
            return None
        ref = ref_obj.get("reference")
        k = cache.get(ref)
        if k is None:
            if ref is None:
                return None
            if type(ref) is not str:
                raise _Bad("invalid reference")
            rid = _ref_id(ref_obj, rtype)
            if rid is None:
                return None
            k = key(rtype, rid)
            if len(cache) >= 1 << 18:
                cache.clear()
            cache[ref] = k
        return k

    def patient(o: dict, rid: str) -> list:
        gender = _s(o.get("gender"), "gender")
        if gender is not None and gender not in _GENDERS:
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
                deceased_date = _parse_datetime_parts(v)[1]
            except (ValueError, TypeError, OverflowError):
                raise _Bad("invalid date in deceasedDateTime") from None
            deceased = True
        race = ethnicity = birth_sex = None
        for ext in o.get("extension") or ():
            url = ext.get("url")
            if url == US_CORE_RACE:
                if race is None:
                    race = _omb_display(ext)
            elif url == US_CORE_ETHNICITY:
                if ethnicity is None:
                    ethnicity = _omb_display(ext)
            elif url == US_CORE_BIRTHSEX:
                birth_sex = _s(ext.get("valueCode"), "birthsex")
        marital = _first_code(o.get("maritalStatus"), "maritalStatus")
        addr = o.get("address")
        state = _s(addr[0].get("state"), "address.state") if addr else None
        return [(key("Patient", rid), gender, birth, prec, deceased, deceased_date, race, ethnicity,
                 birth_sex, marital, state)]

    def encounter(o: dict, rid: str) -> list:
        cls = o.get("class")
        if isinstance(cls, list):  # R5 shape: list of CodeableConcept
            class_code = _first_code(cls[0], "class") if cls else None
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
        return [(key("Encounter", rid), ref_key(o.get("subject"), "Patient", pcache), _s(o.get("status"), "status"),
                 class_code, type_code, type_display, start, end)]

    def condition(o: dict, rid: str) -> list:
        system, code, display = _concept(o.get("code"), "code")
        onset = None
        v = o.get("onsetDateTime")
        if v is not None:
            onset = _ts(v, "onsetDateTime")
        else:
            p = o.get("onsetPeriod")
            if p and p.get("start") is not None:
                onset = _ts(p["start"], "onsetPeriod.start")
        enc = o.get("encounter") or o.get("context")
        return [(key("Condition", rid), ref_key(o.get("subject"), "Patient", pcache),
                 ref_key(enc, "Encounter", ecache), system, code, display,
                 _first_code(o.get("clinicalStatus"), "clinicalStatus"), onset)]

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
            code = _first_code(v, "valueCodeableConcept")
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

    def observation(o: dict, rid: str) -> list:
        # hot path: the reference string is usually already in the cache
        r = o.get("subject")
        pk = pcache.get(r.get("reference")) if type(r) is dict else None
        if pk is None:
            pk = ref_key(r, "Patient", pcache)
        r = o.get("encounter") or o.get("context")
        ek = ecache.get(r.get("reference")) if type(r) is dict else None
        if ek is None:
            ek = ref_key(r, "Encounter", ecache)
        category = None
        cats = o.get("category")
        if cats:
            category = _first_code(cats[0], "category")
        effective = None
        v = o.get("effectiveDateTime")
        if v is not None:
            effective = _ts(v, "effectiveDateTime")
        else:
            p = o.get("effectivePeriod")
            if p and p.get("start") is not None:
                effective = _ts(p["start"], "effectivePeriod.start")
            else:
                v = o.get("effectiveInstant")
                if v is not None:
                    effective = _ts(v, "effectiveInstant")
        own = obs_value(o)
        comps = o.get("component")
        rows = []
        if comps:
            for i, comp in enumerate(comps):
                cv = obs_value(comp)
                if cv is None:
                    continue
                system, code, display = _concept(comp.get("code"), "component.code")
                rows.append((key("Observation", f"{rid}#{i}"), pk, ek, category, system, code, display,
                             effective, cv[0], cv[1], cv[2]))
            if own is None:
                return rows
        system, code, display = _concept(o.get("code"), "code")
        if own is None:
            own = (None, None, None)
        rows.append((key("Observation", rid), pk, ek, category, system, code, display, effective,
                     own[0], own[1], own[2]))
        return rows

    return {"Patient": patient, "Encounter": encounter, "Condition": condition, "Observation": observation}


# --------------------------------------------------------------------------------------------------
# Identifier collection (for the leak scan; kept in staging)
# --------------------------------------------------------------------------------------------------
def _collect_identifiers(o: dict, is_patient: bool, add: Callable[[str, str], Any]) -> None:
    try:
        for ident in o.get("identifier") or ():
            v = ident.get("value")
            if type(v) is str and v:
                add(v, "identifier")
        if not is_patient:
            return
        for name in o.get("name") or ():
            given = [g for g in (name.get("given") or ()) if type(g) is str and g]
            family = name.get("family")
            family = family if type(family) is str and family else None
            full = " ".join(given + ([family] if family else []))
            if full and (given or len(full) >= 4):
                add(full, "name")
            if family and len(family) >= 4:
                add(family, "family")
            text = name.get("text")
            if type(text) is str and text:
                add(text, "name")
        for addr in o.get("address") or ():
            for line in addr.get("line") or ():
                if type(line) is str and line:
                    add(line, "address")
        for tel in o.get("telecom") or ():
            v = tel.get("value")
            if type(v) is str and v:
                add(v, "telecom")
    except (AttributeError, TypeError):
        pass  # a malformed shape: whatever was collected so far stays


# --------------------------------------------------------------------------------------------------
# Streams and writers
# --------------------------------------------------------------------------------------------------
class _HashingReader(io.RawIOBase):
    """Raw stream that feeds every byte read through a hash (the extract's sha256, no second pass)."""

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


class _TableWriter:
    """Buffers row tuples and flushes them as Parquet row groups; committed atomically at the end."""

    def __init__(self, uri: str, schema: pa.Schema, local_path: str, batch_rows: int):
        self.uri = uri
        self.schema = schema
        self.local_path = local_path
        self.batch_rows = batch_rows
        self.buf: list[tuple] = []
        self.rows = 0
        self._writer = pq.ParquetWriter(local_path, schema, compression="zstd")

    def flush(self) -> None:
        if not self.buf:
            return
        cols = list(zip(*self.buf))
        arrays = [pa.array(c, type=f.type) for c, f in zip(cols, self.schema)]
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema),
                                 row_group_size=len(self.buf))
        self.rows += len(self.buf)
        self.buf = []

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
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
# Entry point
# --------------------------------------------------------------------------------------------------
def ingest_extract(
    source_uri: str,
    out_uri: str,
    *,
    keyer: Keyer,
    store: Store | None = None,
    resources: Iterable[str] = DEFAULT_RESOURCES,
    validate_sample_rate: float = 0.02,
    batch_rows: int = 50_000,
) -> dict:
    """Flatten a FHIR R4 NDJSON extract into pseudonymised Parquet tables under ``out_uri``.

    Returns (and writes as ``ingest_report.json``) a report of counts, URIs, timings and the extract's
    sha256. Raises :class:`ExtractError` for a missing or empty extract."""
    # Parsing allocates millions of short-lived acyclic dicts; the default generation-0 threshold (700)
    # makes the cyclic GC run every few lines. Raise it for the duration of the call (~10% faster).
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], GC_GEN0_THRESHOLD), *threshold[1:])
    try:
        return _ingest_extract(source_uri, out_uri, keyer=keyer, store=store, resources=resources,
                               validate_sample_rate=validate_sample_rate, batch_rows=batch_rows)
    finally:
        gc.set_threshold(*threshold)


def _ingest_extract(
    source_uri: str,
    out_uri: str,
    *,
    keyer: Keyer,
    store: Store | None,
    resources: Iterable[str],
    validate_sample_rate: float,
    batch_rows: int,
) -> dict:
    t0 = time.perf_counter()
    store = store or Store()
    source_uri, out_uri = str(source_uri), str(out_uri)
    resources = list(dict.fromkeys(resources))
    unknown = [r for r in resources if r not in TABLES]
    if unknown or not resources:
        raise ExtractError(
            f"unsupported resource type(s): {', '.join(map(str, unknown)) or '(none requested)'}; "
            f"supported: {', '.join(SUPPORTED_RESOURCES)}"
        )
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    rate = min(max(float(validate_sample_rate), 0.0), 1.0)
    threshold = int(rate * 0x100000000)

    # -- discover files ---------------------------------------------------------------------------
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
    # longest type first so that a type never swallows another that it prefixes
    by_len = sorted(resources, key=len, reverse=True)
    ingest: list[tuple[str, str, str]] = []  # (name, uri, type)
    skipped: list[str] = []
    for uri in all_uris:
        name = _relative(uri, source_uri)
        rtype = None if "/" in name else _match_type(name, by_len)
        if rtype is None:
            skipped.append(name)
        else:
            ingest.append((name, uri, rtype))
    ingest.sort()
    skipped.sort()
    if not ingest:
        raise ExtractError(
            f"extract is empty: no NDJSON file for {', '.join(resources)} in {source_uri} "
            f"(expected e.g. Patient.ndjson or Patient.ndjson.gz; {len(skipped)} other file(s) ignored)"
        )

    # -- outputs ----------------------------------------------------------------------------------
    s3_out = is_s3(out_uri)
    tmpdir = tempfile.mkdtemp(prefix="synthfactory-ingest-") if s3_out else None
    if not s3_out:
        os.makedirs(out_uri, exist_ok=True)

    def local_for(uri: str, name: str) -> str:
        return os.path.join(tmpdir, name) if tmpdir else uri + ".partial"

    writers: dict[str, _TableWriter] = {}
    q_uri = join(out_uri, QUARANTINE_FILE)
    q_local = local_for(q_uri, QUARANTINE_FILE)
    ids_uri = join(out_uri, IDENTIFIERS_FILE)
    ids_local = local_for(ids_uri, IDENTIFIERS_FILE)
    committed = False
    try:
        for rtype in resources:
            table, schema = TABLES[rtype]
            uri = join(out_uri, f"{table}.parquet")
            writers[rtype] = _TableWriter(uri, schema, local_for(uri, f"{table}.parquet"), batch_rows)
        flatteners = _make_flatteners(keyer)
        hasher = hashlib.sha256()
        identifiers: dict[str, str] = {}
        add_ident = identifiers.setdefault
        seen: dict[str, set[str]] = {r: set() for r in resources}
        resources_read = dict.fromkeys(resources, 0)
        quarantined = dict.fromkeys(resources, 0)
        candidates = dict.fromkeys(resources, 0)
        validated = 0
        loads = orjson.loads
        dumps = orjson.dumps
        decode_error = orjson.JSONDecodeError

        with open(q_local, "wb") as qfh:
            for name, uri, rtype in ingest:
                tf = time.perf_counter()
                fname = name.rsplit("/", 1)[-1]
                file_salt = zlib.crc32(fname.encode())
                flat = flatteners[rtype]
                writer = writers[rtype]
                seen_ids = seen[rtype]
                is_patient = rtype == "Patient"
                n_read = n_bad = 0
                n_cand = candidates[rtype]

                def quarantine(lineno: int, reason: str) -> None:
                    qfh.write(dumps({"file": fname, "line": lineno, "resource_type": rtype, "reason": reason}))
                    qfh.write(b"\n")

                reader = _HashingReader(store.open_read(uri), hasher)
                try:
                    for lineno, raw in enumerate(iter_lines(reader, gz=name.endswith(".gz")), 1):
                        if not raw:
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
                                quarantine(lineno, "invalid JSON")
                                continue
                        n_read += 1
                        if type(o) is not dict:
                            n_bad += 1
                            quarantine(lineno, "not a JSON object")
                            continue
                        rt = o.get("resourceType")
                        if rt != rtype:
                            n_bad += 1
                            quarantine(lineno, "missing resourceType" if rt is None else "resourceType mismatch")
                            continue
                        rid = o.get("id")
                        if type(rid) is not str or not rid:
                            n_bad += 1
                            quarantine(lineno, "missing id")
                            continue
                        add_ident(rid, "id")
                        if is_patient or "identifier" in o:
                            _collect_identifiers(o, is_patient, add_ident)
                        if rid in seen_ids:
                            n_bad += 1
                            quarantine(lineno, "duplicate id")
                            continue
                        if b'"modifierExtension"' in raw and _has_modifier_extension(o):
                            n_bad += 1
                            quarantine(lineno, "unknown modifierExtension")
                            continue
                        n_cand += 1
                        if n_cand <= ALWAYS_VALIDATE_FIRST or (
                                threshold and ((lineno * 2654435761 + file_salt) & 0xFFFFFFFF) < threshold):
                            validated += 1
                            try:
                                _validator(rtype).model_validate(o)
                            except Exception as exc:  # noqa: BLE001 - any model failure quarantines
                                n_bad += 1
                                quarantine(lineno, _validation_reason(exc))
                                continue
                        try:
                            rows = flat(o, rid)
                        except _Bad as bad:
                            n_bad += 1
                            quarantine(lineno, bad.reason)
                            continue
                        except (AttributeError, TypeError, KeyError, IndexError, ValueError, OverflowError):
                            n_bad += 1
                            quarantine(lineno, "malformed resource structure")
                            continue
                        seen_ids.add(rid)
                        buf = writer.buf
                        buf.extend(rows)
                        if len(buf) >= batch_rows:
                            writer.flush()
                    reader.drain()  # every byte of the file is in the hash, even after a trailing gzip member
                except (gzip.BadGzipFile, EOFError, zlib.error):
                    raise ExtractError(f"extract file {name} is not valid gzip or is truncated") from None
                finally:
                    reader.release()
                candidates[rtype] = n_cand
                resources_read[rtype] += n_read
                quarantined[rtype] += n_bad
                log.info("ingested %s: %d resources, %d quarantined, %.2fs", fname, n_read, n_bad,
                         time.perf_counter() - tf)

        for w in writers.values():
            w.close()
        total_q = sum(quarantined.values())
        if "Patient" in writers and writers["Patient"].rows == 0:
            _commit(store, q_local, q_uri)
            raise ExtractError(
                f"extract is empty: no valid Patient resource in {source_uri} "
                f"({resources_read['Patient']} read, {quarantined['Patient']} quarantined; see {q_uri})"
            )

        # identifiers, deduplicated (first kind wins)
        id_writer = pq.ParquetWriter(ids_local, IDENTIFIERS_SCHEMA, compression="zstd")
        try:
            it = iter(identifiers.items())
            while True:
                chunk = list(islice(it, IDENTIFIER_CHUNK_ROWS))
                if not chunk:
                    break
                values, kinds = zip(*chunk)
                id_writer.write_batch(pa.RecordBatch.from_arrays(
                    [pa.array(values, pa.string()), pa.array(kinds, pa.string())], schema=IDENTIFIERS_SCHEMA))
        finally:
            id_writer.close()
        n_identifiers = len(identifiers)
        identifiers.clear()

        for w in writers.values():
            _commit(store, w.local_path, w.uri)
        _commit(store, q_local, q_uri)
        _commit(store, ids_local, ids_uri)
        committed = True
    finally:
        if not committed:
            for w in writers.values():
                w.abort()
            for p in (ids_local, q_local):
                _unlink(p)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)

    seconds = time.perf_counter() - t0
    total_read = sum(resources_read.values())
    report = {
        "tables": {TABLES[r][0]: writers[r].uri for r in resources},
        "rows": {TABLES[r][0]: writers[r].rows for r in resources},
        "resources_read": resources_read,
        "quarantined": quarantined,
        "quarantined_total": total_q,
        "quarantine_uri": q_uri,
        "identifiers_uri": ids_uri,
        "identifiers": n_identifiers,
        "extract_sha256": hasher.hexdigest(),
        "files": [n for n, _, _ in ingest],
        "skipped_files": skipped,
        "validated": validated,
        "seconds": round(seconds, 3),
        "resources_per_second": round(total_read / seconds, 1) if seconds > 0 else 0.0,
    }
    store.write_json(join(out_uri, REPORT_FILE), report)
    log.info("ingest done: %d resources read, %d quarantined, %d validated, rows %s, %.2fs (%.0f resources/s)",
             total_read, total_q, validated, report["rows"], seconds, report["resources_per_second"])
    return report
