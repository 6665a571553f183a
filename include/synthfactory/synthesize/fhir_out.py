"""Synthetic relational tables back to FHIR R4 NDJSON (Patient, Encounter, Condition, Observation,
MedicationRequest, Procedure), one ``<Type>.ndjson`` per resource type with consistent references.

Every resource is tagged synthetic (``meta.tag`` HTEST, "test health data") and is checked structurally as it is
written (resourceType, id, required elements, date formats, every ``subject``/``encounter`` reference
resolving to a resource of this output). A sample of each type (the first 20 plus a seeded random sample)
is also validated with ``fhir.resources.R4B``. Tables are read row group by row group, so memory does not
grow with the number of rows.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from datetime import date, datetime
from typing import Any, Callable, Iterable, Iterator

import orjson
import pandas as pd

from synthfactory.storage import Store, is_s3, join, split_s3
from synthfactory.errors import InputError

log = logging.getLogger(__name__)

SYNTHETIC_TAG = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST",
                 "display": "test health data"}
SYSTEMS = {"loinc": "http://loinc.org", "snomed": "http://snomed.info/sct",
           "icd10cm": "http://hl7.org/fhir/sid/icd-10-cm", "rxnorm": "http://www.nlm.nih.gov/research/umls/rxnorm"}
OMB = {"race": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
       "ethnicity": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"}
#: flattened table -> FHIR resource type (the order references need: Patient and Encounter first)
RESOURCE_TYPES = {"patient": "Patient", "encounter": "Encounter", "condition": "Condition",
                  "observation": "Observation", "medication_request": "MedicationRequest", "procedure": "Procedure"}
GENDERS = {"male", "female", "other", "unknown"}
VALIDATE_FIRST = 20


class FhirOutputError(InputError, ValueError):
    """A generated resource failed the structural or R4B check (message names the type, id and problem)."""


def _val(row: dict, col: str) -> Any:
    v = row.get(col)
    if v is None:
        return None
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return v


def _dt(v: Any) -> str | None:
    if v is None:
        return None
    ts = pd.Timestamp(v)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return ts.tz_convert("UTC").isoformat().replace("+00:00", "Z") if (ts.hour or ts.minute or ts.second) \
        else ts.tz_convert("UTC").strftime("%Y-%m-%dT00:00:00Z")


def _d(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, (date, datetime)):
        return v.strftime("%Y-%m-%d")
    return pd.Timestamp(v).strftime("%Y-%m-%d")


def _concept(row: dict, code_col: str = "code", system_col: str = "code_system", display_col: str = "display",
             text: str | None = None) -> dict | None:
    code = _val(row, code_col)
    if code is None and text is None:
        return None
    out: dict[str, Any] = {}
    if code is not None:
        coding: dict[str, Any] = {"code": str(code)}
        system = _val(row, system_col)
        if system:
            coding["system"] = SYSTEMS.get(str(system), str(system))
        disp = _val(row, display_col)
        if disp:
            coding["display"] = str(disp)
        out["coding"] = [coding]
    if text:
        out["text"] = text
    return out


def _base(rtype: str, rid: str) -> dict:
    return {"resourceType": rtype, "id": rid, "meta": {"tag": [SYNTHETIC_TAG]}}


def _ref(rtype: str, key: Any) -> dict | None:
    return {"reference": f"{rtype}/{key}"} if key is not None else None


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None and v != [] and v != {}}


def _subject_and_encounter(r: dict, row: dict) -> None:
    """The patient (``subject``) and encounter references of a clinical resource, in that key order."""
    r["subject"] = _ref("Patient", fhir_id(row["patient_key"]))
    ek = _val(row, "encounter_key")
    r["encounter"] = _ref("Encounter", fhir_id(ek)) if ek else None


def fhir_id(key: str) -> str:
    """FHIR ids allow [A-Za-z0-9-.]{1,64}: synthetic keys already fit; anything else is mapped."""
    out = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in str(key))
    return out[:64]


# -- converters: one flattened row -> one resource ------------------------------------------------------
def patient(row: dict) -> dict:
    r = _base("Patient", fhir_id(row["patient_key"]))
    g = _val(row, "gender")
    r["gender"] = g if g in GENDERS else ("unknown" if g else None)
    r["birthDate"] = _d(_val(row, "birth_date"))
    dd = _val(row, "deceased_date")
    if dd is not None:
        r["deceasedDateTime"] = _d(dd)
    elif _val(row, "deceased") is not None:
        r["deceasedBoolean"] = bool(row["deceased"])
    ext = []
    for col, url in OMB.items():
        v = _val(row, col)
        if v:
            ext.append({"url": url, "extension": [{"url": "text", "valueString": str(v)}]})
    r["extension"] = ext
    return _clean(r)


def encounter(row: dict) -> dict:
    r = _base("Encounter", fhir_id(row["encounter_key"]))
    r["status"] = _val(row, "status") or "finished"
    r["class"] = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                  "code": str(_val(row, "class_code") or "AMB")}
    t = _concept(row, "type_code", "type_system", "type_display", text=_val(row, "type_display"))
    r["type"] = [t] if t else None
    r["subject"] = _ref("Patient", fhir_id(row["patient_key"]))
    r["period"] = _clean({"start": _dt(_val(row, "start")), "end": _dt(_val(row, "end"))})
    return _clean(r)


def condition(row: dict) -> dict:
    r = _base("Condition", fhir_id(row["condition_key"]))
    cs = _val(row, "clinical_status")
    if cs:
        r["clinicalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": str(cs)}]}
    r["code"] = _concept(row)
    _subject_and_encounter(r, row)
    r["onsetDateTime"] = _dt(_val(row, "onset"))
    return _clean(r)


def observation(row: dict) -> dict:
    r = _base("Observation", fhir_id(row["observation_key"]))
    r["status"] = "final"
    cat = _val(row, "category")
    if cat:
        r["category"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": str(cat)}]}]
    r["code"] = _concept(row) or {"text": "unknown"}
    _subject_and_encounter(r, row)
    r["effectiveDateTime"] = _dt(_val(row, "effective"))
    v = _val(row, "value_num")
    if v is not None:
        unit = _val(row, "unit")
        r["valueQuantity"] = _clean({"value": float(v), "unit": unit, "system": "http://unitsofmeasure.org"
                                     if unit else None, "code": unit})
    elif _val(row, "value_code") is not None:
        r["valueCodeableConcept"] = {"coding": [{"code": str(row["value_code"])}]}
    return _clean(r)


def medication_request(row: dict) -> dict:
    r = _base("MedicationRequest", fhir_id(row["medication_request_key"]))
    r["status"] = _val(row, "status") or "active"
    r["intent"] = _val(row, "intent") or "order"
    r["medicationCodeableConcept"] = _concept(row) or {"text": "unknown"}
    _subject_and_encounter(r, row)
    r["authoredOn"] = _dt(_val(row, "authored_on"))
    return _clean(r)


def procedure(row: dict) -> dict:
    r = _base("Procedure", fhir_id(row["procedure_key"]))
    r["status"] = _val(row, "status") or "completed"
    r["code"] = _concept(row)
    _subject_and_encounter(r, row)
    r["performedDateTime"] = _dt(_val(row, "performed"))
    return _clean(r)


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "patient": patient, "encounter": encounter, "condition": condition, "observation": observation,
    "medication_request": medication_request, "procedure": procedure,
}
REQUIRED = {"Patient": (), "Encounter": ("status", "class", "subject"), "Condition": ("subject",),
            "Observation": ("status", "code", "subject"), "MedicationRequest": ("status", "intent", "subject",
                                                                                 "medicationCodeableConcept"),
            "Procedure": ("status", "subject")}


# -- checks ---------------------------------------------------------------------------------------
def structural_problems(res: dict, known: dict[str, set[str]]) -> list[str]:
    """Structural check of one resource: type, id, required elements, dates, references that resolve."""
    problems = []
    rtype = res.get("resourceType")
    if rtype not in REQUIRED:
        return [f"unknown resourceType {rtype!r}"]
    rid = res.get("id")
    if not rid or not isinstance(rid, str) or len(rid) > 64:
        problems.append("missing or invalid id")
    for el in REQUIRED[rtype]:
        if el not in res:
            problems.append(f"missing {el}")
    for el in ("subject", "encounter"):
        ref = res.get(el)
        if ref is None:
            continue
        target, _, tid = str(ref.get("reference", "")).partition("/")
        if target not in ("Patient", "Encounter") or tid not in known.get(target, set()):
            problems.append(f"{el} reference {ref.get('reference')!r} does not resolve")
    for el in ("birthDate", "onsetDateTime", "effectiveDateTime", "authoredOn", "performedDateTime"):
        v = res.get(el)
        if v is not None and not (isinstance(v, str) and len(v) >= 10 and v[4] == "-" and v[7] == "-"):
            problems.append(f"{el} is not a FHIR date")
    period = res.get("period") or {}
    if period.get("start") and period.get("end") and period["end"] < period["start"]:
        problems.append("period.end before period.start")
    return problems


def r4b_validate(res: dict) -> None:
    import importlib

    mod = importlib.import_module(f"fhir.resources.R4B.{res['resourceType'].lower()}")
    getattr(mod, res["resourceType"]).model_validate(res)


# -- writer ---------------------------------------------------------------------------------------
def _iter_rows(source: Any, store: Store | None, batch_rows: int = 50_000) -> Iterator[dict]:
    """Rows of a DataFrame, or of a Parquet file (URI) read batch by batch."""
    if isinstance(source, pd.DataFrame):
        yield from source.to_dict("records")
        return
    import pyarrow.parquet as pq

    local = source
    tmp = None
    if is_s3(source):
        fd, tmp = tempfile.mkstemp(suffix=".parquet")
        os.close(fd)
        store.local_copy(source, tmp)
        local = tmp
    try:
        pf = pq.ParquetFile(local)
        for batch in pf.iter_batches(batch_size=batch_rows):
            yield from batch.to_pandas().to_dict("records")
    finally:
        if tmp:
            os.unlink(tmp)


def write_fhir_ndjson(tables: dict[str, Any], out_uri: str, store: Store | None = None, *, sample_validate: int = 100,
                      seed: int = 0) -> dict:
    """Write ``tables`` (name -> DataFrame or Parquet URI of a flattened synthetic table) as
    ``<out_uri>/<Type>.ndjson``. Returns ``{"files": {Type: uri}, "resources": {Type: n},
    "validated_r4b": {Type: n}, "structural_checked": n}``; raises :class:`FhirOutputError` on the first bad
    resource."""
    store = store or Store()
    rng = random.Random(seed)
    known: dict[str, set[str]] = {"Patient": set(), "Encounter": set()}
    files, counts, validated = {}, {}, {}
    checked = 0
    names = [n for n in RESOURCE_TYPES if n in tables]
    unknown = sorted(set(tables) - set(RESOURCE_TYPES))
    if unknown:
        log.info("fhir_ndjson: no FHIR mapping for table(s) %s; left out", unknown)
    for name in names:
        rtype = RESOURCE_TYPES[name]
        convert = CONVERTERS[name]
        uri = join(out_uri, f"{rtype}.ndjson")
        fd, local = tempfile.mkstemp(suffix=".ndjson")
        os.close(fd)
        n = 0
        reservoir: list[dict] = []
        try:
            with open(local, "wb") as fh:
                for row in _iter_rows(tables[name], store):
                    res = convert(row)
                    problems = structural_problems(res, known)
                    if problems:
                        raise FhirOutputError(f"{rtype}/{res.get('id')}: {'; '.join(problems)}")
                    if rtype in known:
                        known[rtype].add(res["id"])
                    if n < VALIDATE_FIRST:
                        _r4b(res)
                    elif len(reservoir) < sample_validate:
                        reservoir.append(res)
                    else:
                        j = rng.randrange(n)
                        if j < sample_validate:
                            reservoir[j] = res
                    fh.write(orjson.dumps(res) + b"\n")
                    n += 1
            for res in reservoir:
                _r4b(res)
            _commit(store, local, uri)
        finally:
            if os.path.exists(local):
                os.unlink(local)
        files[rtype] = uri
        counts[rtype] = n
        validated[rtype] = min(n, VALIDATE_FIRST) + len(reservoir)
        checked += n
        log.info("fhir_ndjson %s resources=%d r4b_validated=%d", rtype, n, validated[rtype])
    return {"files": files, "resources": counts, "validated_r4b": validated, "structural_checked": checked}


def _r4b(res: dict) -> None:
    try:
        r4b_validate(res)
    except Exception as err:  # pydantic ValidationError: the message names the element, never patient data
        raise FhirOutputError(f"{res['resourceType']}/{res['id']}: fails R4B validation: "
                              f"{str(err).splitlines()[0]}") from err


def _commit(store: Store, local: str, uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        store._client().upload_file(local, bucket, key)
    else:
        os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
        os.replace(local, uri)


def read_ndjson(path: str) -> Iterable[dict]:
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                yield orjson.loads(line)
