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

__all__ = ["Flattener", "FAST_TABLES", "make_flatteners"]

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


def make_flatteners(key: Callable[[str, str], str]) -> dict[str, Flattener]:
    """resource type -> flattener, keying ids with ``key`` (a :func:`~.normalize.fast_key`). Each set
    caches the keys of the references it has seen: one set per ingest session."""
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
                raise BadResource("invalid reference")
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
                raise BadResource("invalid value in valueQuantity")
            unit = q.get("unit") or q.get("code")
            if unit is not None and type(unit) is not str:
                raise BadResource("invalid value in valueQuantity")
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
                raise BadResource("invalid value in valueBoolean")
            return None, None, "true" if v else "false"
        v = x.get("valueInteger")
        if v is not None:
            if type(v) is not int:
                raise BadResource("invalid value in valueInteger")
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
                raise BadResource("invalid value in category")
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

