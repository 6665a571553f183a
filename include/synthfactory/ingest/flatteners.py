"""The hand-written flatteners of the four built-in tables (the fast path, ``engine="fast"``): a resource
dict to a list of row tuples in the table's schema column order (:mod:`.schemas`).

``patient``, ``encounter``, ``condition`` and ``observation`` give exactly the rows of their built-in
ViewDefinitions (:mod:`.views`; tests/ingest/test_views.py proves it on generated data), faster. The
compiled flatten (:mod:`.native`) reproduces the last three for plain NDJSON lines. A resource they cannot
read raises :class:`~.normalize.BadResource` with a short reason (never a value from the data).
"""

from __future__ import annotations

from typing import Any, Callable

from synthfactory.fhir.normalize import (
    GENDERS,
    SYSTEM_SHORT,
    US_CORE_BIRTHSEX,
    US_CORE_ETHNICITY,
    US_CORE_RACE,
    BadResource,
    checked_str,
    concept,
    contained_key_id,
    datetime_parts,
    fhir_datetime_deferred,
    first_code,
    omb_display,
    parse_fhir_date,
    reference_id,
)
from .schemas import TABLES

__all__ = ["Flattener", "FAST_TABLES", "make_flatteners", "ValueRules", "DEFAULT_VALUE_RANGES", "DEFAULT_VALUE_RANGE",
           "reference_ok"]

#: plausible numeric ranges of an Observation value by its unit (``valueQuantity.unit``, else ``.code``):
#: a value outside is quarantined with the reason (``source.value_ranges`` in the spec adds or replaces).
#: Wide on purpose: they catch corrupt and sentinel values (1.2e29 % HbA1c, 1e300), not unusual patients.
DEFAULT_VALUE_RANGES: dict[str, tuple[float, float]] = {
    "%": (0.0, 100.0), "mg/dL": (0.0, 1e5), "mmol/L": (0.0, 1e4), "umol/L": (0.0, 1e6), "g/dL": (0.0, 100.0),
    "g/L": (0.0, 1000.0), "mg/L": (0.0, 1e5), "ng/mL": (0.0, 1e7), "pg/mL": (0.0, 1e7), "ug/mL": (0.0, 1e6),
    "mmol/mol": (0.0, 1000.0), "mEq/L": (0.0, 1e4), "U/L": (0.0, 1e6), "U/mL": (0.0, 1e6), "m[IU]/L": (0.0, 1e6),
    "[pH]": (0.0, 14.0), "{INR}": (0.0, 100.0), "/uL": (0.0, 1e8), "10*3/uL": (0.0, 1e5), "10*6/uL": (0.0, 100.0),
    "fL": (0.0, 1000.0), "pg": (0.0, 1000.0), "kg": (0.0, 1000.0), "g": (0.0, 1e6), "[lb_av]": (0.0, 2200.0),
    "cm": (0.0, 300.0), "m": (0.0, 3.0), "[in_i]": (0.0, 120.0), "kg/m2": (0.0, 250.0), "mm[Hg]": (0.0, 400.0),
    "/min": (0.0, 400.0), "{beats}/min": (0.0, 400.0), "{breaths}/min": (0.0, 200.0), "Cel": (10.0, 50.0),
    "[degF]": (50.0, 122.0), "L/min": (0.0, 100.0), "mL": (0.0, 1e5), "L": (0.0, 100.0), "s": (0.0, 1e6),
    "mL/min/{1.73_m2}": (0.0, 500.0), "mL/min": (0.0, 1000.0), "{score}": (-1e6, 1e6),
}
#: the range of a value in any other unit, or without one (valueInteger)
DEFAULT_VALUE_RANGE = (-1e12, 1e12)

_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.")
_TYPE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _fhir_id(s: str) -> bool:
    return 0 < len(s) <= 64 and _ID_CHARS.issuperset(s)


def reference_ok(ref: str) -> bool:
    """``ref`` follows the FHIR literal-reference grammar: ``Type/id[/_history/vid]`` (id ``[A-Za-z0-9\-\.]{1,64}``),
    an absolute URL ending in one (``http(s)://base/Type/id``), ``urn:uuid:``/``urn:oid:`` or ``#id``."""
    if ref[:1] == "#":
        return _fhir_id(ref[1:])
    if ref.startswith("urn:uuid:"):
        u = ref[9:]
        return 0 < len(u) <= 64 and _ID_CHARS.issuperset(u)
    if ref.startswith("urn:oid:"):
        u = ref[8:]
        return 0 < len(u) <= 64 and all(c.isdigit() or c == "." for c in u)
    i = ref.find("/_history/")
    if i >= 0:
        if not _fhir_id(ref[i + 10:]):
            return False
        ref = ref[:i]
    scheme, sep, rest = ref.partition("://")
    if sep:  # an absolute URL: a scheme, a host, no blanks, and Type/id at its end
        if not scheme.isascii() or not scheme.isalpha() or not rest or any(c.isspace() for c in rest):
            return False
        parts = rest.rsplit("/", 2)
        if len(parts) < 3 or not parts[0]:
            return False
        t, rid = parts[1], parts[2]
    else:
        t, slash, rid = ref.partition("/")
        if not slash:
            return False
    return 0 < len(t) <= 64 and t[0].isupper() and _TYPE_CHARS.issuperset(t) and _fhir_id(rid)


class ValueRules:
    """What an Observation value may put in a table. ``text_codes``: codes (``code.coding.code``) whose
    strings are coded values: an Observation's ``valueString`` (or a ``valueCodeableConcept`` with only a
    ``text``), kept in ``value_code``, and a CodeableConcept's ``text`` standing in for the missing display of
    such a code. Every other ``valueString`` and ``.text`` is free text and never reaches a table (the row keeps
    its code, without the text). ``text_columns``: ``table.column`` names of user ViewDefinitions allowed to
    select free text or direct identifiers (``note``, narrative ``text``, ``valueString``, ``name``...: see
    :func:`synthfactory.fhir.views.free_text_columns`); any other such column refuses the view. ``ranges``: unit ->
    (low, high), over :data:`DEFAULT_VALUE_RANGES`; ``default``: the range of any other unit."""

    __slots__ = ("text_codes", "ranges", "default", "text_columns")

    def __init__(self, text_codes: Any = (), ranges: dict | None = None,
                 default: tuple[float, float] = DEFAULT_VALUE_RANGE, text_columns: Any = ()):
        self.text_codes = frozenset(str(c) for c in text_codes or ())
        self.text_columns = frozenset(str(c) for c in text_columns or ())
        merged = dict(DEFAULT_VALUE_RANGES)
        for unit, (lo, hi) in (ranges or {}).items():
            merged[str(unit)] = (float(lo), float(hi))
        self.ranges = merged
        self.default = (float(default[0]), float(default[1]))

    def out_of_range(self, num: float, unit: Any) -> str | None:
        """The quarantine reason of an implausible value (the unit is named only when it is a configured one)."""
        r = self.ranges.get(unit) if unit is not None else None
        lo, hi = r if r is not None else self.default
        if lo <= num <= hi:
            return None
        return f"value outside the plausible range for unit {unit}" if r is not None \
            else "value outside the plausible range"

#: resource dict, source id -> rows
Flattener = Callable[[dict, str], list]

#: resource type -> the built-in table that has a hand-written flattener
FAST_TABLES = {rtype: name for rtype, (name, _) in TABLES.items()}

_s = checked_str  # the flatteners' short name


def _ts(value: Any, field: str) -> int | str:
    """A validated dateTime for a timestamp column: microseconds, or the canonical string itself (Arrow
    converts those per batch, see :func:`normalize.timestamp_array`)."""
    try:
        return fhir_datetime_deferred(value)
    except (ValueError, TypeError, OverflowError):
        raise BadResource(f"invalid date in {field}") from None


def make_flatteners(key: Callable[[str, str], str], rules: ValueRules | None = None) -> dict[str, Flattener]:
    """resource type -> flattener, keying ids with ``key`` (a :func:`~.normalize.fast_key`). Each set
    caches the keys of the references it has seen: one set per ingest session. ``rules``: which
    Observation values are kept (:class:`ValueRules`; the defaults when None)."""
    pcache: dict[str, str] = {}
    ecache: dict[str, str] = {}
    rules = rules or ValueRules()
    text_codes = rules.text_codes
    ranges = rules.ranges
    rlo, rhi = rules.default

    def ref_key(ref_obj: Any, rtype: str, cache: dict[str, str], o: dict) -> str | None:
        if not ref_obj:
            return None
        ref = ref_obj.get("reference")
        k = cache.get(ref)
        if k is None:
            if ref is None:
                return None
            if type(ref) is not str:
                raise BadResource("invalid reference")
            if not reference_ok(ref):
                raise BadResource(f"malformed reference to {rtype}")
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
            raise BadResource("invalid value in gender")
        bd = o.get("birthDate")
        birth = prec = None
        if bd is not None:
            try:
                birth, prec = parse_fhir_date(bd)
            except (ValueError, TypeError, OverflowError):
                raise BadResource("invalid date in birthDate") from None
        deceased = False
        deceased_date = None
        v = o.get("deceasedBoolean")
        if v is not None:
            if type(v) is not bool:
                raise BadResource("invalid value in deceasedBoolean")
            deceased = v
        v = o.get("deceasedDateTime")
        if v is not None:
            try:
                deceased_date = datetime_parts(v)[1]
            except (ValueError, TypeError, OverflowError):
                raise BadResource("invalid date in deceasedDateTime") from None
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
        marital = first_code(o.get("maritalStatus"), "maritalStatus")  # its text is free text: never kept
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
            if type_display is None:  # type[0].text is free text: only for an allow-listed code
                text = _s(t0.get("text"), "type")
                if text is not None and type_code in text_codes:
                    type_display = text
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
        system, code, display = concept(o.get("code"), "code", text_codes)
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
                raise BadResource("invalid value in valueQuantity")
            unit = q.get("unit") or q.get("code")
            if unit is not None and type(unit) is not str:
                raise BadResource("invalid value in valueQuantity")
            r = ranges.get(unit) if unit is not None else None
            lo, hi = r if r is not None else (rlo, rhi)
            if not lo <= num <= hi:
                raise BadResource(rules.out_of_range(num, unit) or "value outside the plausible range")
            return num, unit, None
        v = x.get("valueCodeableConcept")
        if v is not None:
            code = first_code(v, "valueCodeableConcept", bool(text_codes) and _coded(x.get("code")))
            return None if code is None else (None, None, code)
        v = x.get("valueString")
        if v is not None:  # free text: never in a table, unless its code is allow-listed as coded values
            v = _s(v, "valueString")
            if text_codes and _coded(x.get("code")):
                return None, None, v
            return None
        v = x.get("valueBoolean")
        if v is not None:
            if type(v) is not bool:
                raise BadResource("invalid value in valueBoolean")
            return None, None, "true" if v else "false"
        v = x.get("valueInteger")
        if v is not None:
            if type(v) is not int:
                raise BadResource("invalid value in valueInteger")
            if not rlo <= v <= rhi:
                raise BadResource("value outside the plausible range")
            return float(v), None, None
        return None

    def _coded(cc: Any) -> bool:
        """Whether a CodeableConcept has a coding whose code is allow-listed in ``text_codes``."""
        if type(cc) is not dict:
            return False
        for c in cc.get("coding") or ():
            if type(c) is dict and c.get("code") in text_codes:
                return True
        return False

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
                display = best.get("display")
                if type(code) is str and type(display) is str and display and type(system) is str:
                    return short.get(system, system), code, display
        return concept(cc, field, text_codes)

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
                raise BadResource("invalid value in category")
            if not codings:  # category[0].text is free text: never in a table
                category = None
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
                raise BadResource("invalid value in valueQuantity")
            num = qv if type(qv) is float else float(qv)
            r = ranges.get(unit) if unit is not None else None
            lo, hi = r if r is not None else (rlo, rhi)
            if not lo <= num <= hi:
                raise BadResource(rules.out_of_range(num, unit) or "value outside the plausible range")
            own = (num, unit, None)
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

