"""Flat EHR extracts: CSV or Parquet tables mapped onto the flattened tables by a column mapping.

A mapping (:class:`synthfactory.source_specs.EhrSpec`) names, per target table (``patient``,
``encounter``, ``condition``, ``observation``, ``medication_request``, ``procedure``), the source files and
which source column feeds which target column, with value maps, multi-column lookups (a local lab name to
its LOINC code), constants, wide-to-long ``melt`` (vital-sign columns to observation rows), ``explode``
(``J44|I10`` to one row each) and an ``age`` column turned into a year-precision birth date. The
``clinosim`` preset maps ``clinosim simulate --format csv`` output.

The rules are the FHIR paths' rules: source ids become salted HMAC keys (``Patient/<id>`` etc., so a CSV and
a FHIR export of the same records give the same keys), only mapped columns reach the tables, the columns
named in ``identifiers`` (and every source id) go to ``identifiers.parquet`` for the leak scan, and a row
with an invalid date, number or gender, a missing id, a conflicting duplicate id or a patient that is not in
the extract is quarantined with its file, line and reason. The patient table is filled first.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import logging
import re
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from synthfactory.keys import Keyer
from synthfactory.storage import Store

from synthfactory.fhir.normalize import GENDERS, BadResource, ExtractError, date_precision, local_days, parse_fhir_date, \
    parse_fhir_datetime
from .schemas import TABLES
from .session import IngestSession, gc_paused, list_source, relative_name
from synthfactory.source_specs import EhrSpec, EhrTableMapping
from synthfactory.fhir.views import BUILTIN_VIEWS, compile_view

log = logging.getLogger(__name__)

__all__ = ["ingest_ehr", "CLINOSIM_PRESET", "effective_mapping"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_ORD = date(1970, 1, 1).toordinal()
_SPACE_DT = re.compile(r"^(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}(:\d{2}(\.\d+)?)?)(.*)$")
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}

# clinosim lab names -> LOINC (code, display)
_CLINOSIM_LABS = {
    "HbA1c": ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"),
    "Glucose": ("2345-7", "Glucose [Mass/volume] in Serum or Plasma"),
    "Creatinine": ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma"),
    "eGFR": ("98979-8", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] (CKD-EPI 2021)"),
    "BUN": ("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma"),
    "ALT": ("1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma"),
    "AST": ("1920-8", "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma"),
    "K": ("2823-3", "Potassium [Moles/volume] in Serum or Plasma"),
    "Na": ("2951-2", "Sodium [Moles/volume] in Serum or Plasma"),
    "Cl": ("2075-0", "Chloride [Moles/volume] in Serum or Plasma"),
    "HCO3": ("1963-8", "Bicarbonate [Moles/volume] in Serum or Plasma"),
    "Ca": ("17861-6", "Calcium [Mass/volume] in Serum or Plasma"),
    "TP": ("2885-2", "Protein [Mass/volume] in Serum or Plasma"),
    "Albumin": ("1751-7", "Albumin [Mass/volume] in Serum or Plasma"),
    "Hb": ("718-7", "Hemoglobin [Mass/volume] in Blood"),
    "Hct": ("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count"),
    "WBC": ("6690-2", "Leukocytes [#/volume] in Blood by Automated count"),
    "Plt": ("777-3", "Platelets [#/volume] in Blood by Automated count"),
    "CRP": ("1988-5", "C reactive protein [Mass/volume] in Serum or Plasma"),
    "TSH": ("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma"),
    "LDL": ("13457-7", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation"),
    "HDL": ("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma"),
    "TG": ("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma"),
    "TC": ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma"),
    "BNP": ("30934-4", "Natriuretic peptide B [Mass/volume] in Serum or Plasma"),
    "Troponin_I": ("10839-9", "Troponin I.cardiac [Mass/volume] in Serum or Plasma"),
    "Lactate": ("2524-7", "Lactate [Moles/volume] in Serum or Plasma"),
    "PT_INR": ("6301-6", "INR in Platelet poor plasma by Coagulation assay"),
    "APTT": ("14979-9", "aPTT in Platelet poor plasma by Coagulation assay"),
    "PCT": ("33959-8", "Procalcitonin [Mass/volume] in Serum or Plasma"),
    "pH": ("2744-1", "pH of Arterial blood"),
    "pO2": ("2703-7", "Oxygen [Partial pressure] in Arterial blood"),
    "pCO2": ("2019-8", "Carbon dioxide [Partial pressure] in Arterial blood"),
}

CLINOSIM_PRESET: dict[str, list[dict]] = {
    "patient": [{
        "file": "patients.csv", "id": "patient_id", "age": "age",
        "columns": {"gender": "sex"}, "values": {"gender": {"M": "male", "F": "female", "O": "other", "U": "unknown"}},
        "identifiers": ["family_name", "given_name", "display_name"],
    }],
    "encounter": [{
        "file": "encounters.csv", "id": "encounter_id", "patient": "patient_id",
        "columns": {"status": "status", "class_code": "encounter_type", "type_code": "department_id",
                    "start": "admission_datetime", "end": "discharge_datetime"},
        "values": {"status": {"completed": "finished", "active": "in-progress", "admitted": "in-progress"},
                   "class_code": {"outpatient": "AMB", "inpatient": "IMP", "emergency": "EMER", "ed": "EMER",
                                  "home": "HH", "virtual": "VR"}},
    }],
    "condition": [
        {"file": "diagnoses.csv", "id": "{encounter_id}:{discharge_diagnosis_code}", "patient": "patient_id",
         "encounter": "encounter_id",
         "columns": {"code": "discharge_diagnosis_code", "display": "discharge_diagnosis_name"},
         "constants": {"code_system": "icd10cm", "clinical_status": "active"}},
        {"file": "patients.csv", "id": "{patient_id}:chronic:{value}", "patient": "patient_id",
         "explode": {"column": "chronic_conditions", "sep": "|", "into": "code"},
         "constants": {"code_system": "icd10cm", "clinical_status": "active"}},
    ],
    "observation": [
        {"file": "lab_results.csv", "patient": "patient_id",
         "id": "{patient_id}:{lab_name}:{result_datetime}",
         "columns": {"code": "lab_name", "effective": "result_datetime", "value_num": "value", "unit": "unit"},
         "lookup": {"lab_name": {**{k: {"code": c, "display": d, "code_system": "loinc"}
                                    for k, (c, d) in _CLINOSIM_LABS.items()},
                                 "*": {"code_system": "local"}}},
         "constants": {"category": "laboratory"}},
        {"file": "vital_signs.csv", "patient": "patient_id", "id": "{patient_id}:{timestamp}:{column}",
         "columns": {"effective": "timestamp"},
         "melt": {"systolic_bp": {"code": "8480-6", "display": "Systolic blood pressure", "unit": "mm[Hg]"},
                  "diastolic_bp": {"code": "8462-4", "display": "Diastolic blood pressure", "unit": "mm[Hg]"},
                  "heart_rate": {"code": "8867-4", "display": "Heart rate", "unit": "/min"},
                  "respiratory_rate": {"code": "9279-1", "display": "Respiratory rate", "unit": "/min"},
                  "temperature": {"code": "8310-5", "display": "Body temperature", "unit": "Cel"},
                  "spo2": {"code": "59408-5", "display": "Oxygen saturation by Pulse oximetry", "unit": "%"}},
         "constants": {"code_system": "loinc", "category": "vital-signs"}},
        {"file": "patients.csv", "patient": "patient_id", "id": "{patient_id}:{column}",
         "melt": {"bmi": {"code": "39156-5", "display": "Body mass index (BMI) [Ratio]", "unit": "kg/m2"},
                  "height_cm": {"code": "8302-2", "display": "Body height", "unit": "cm"},
                  "weight_kg": {"code": "29463-7", "display": "Body weight", "unit": "kg"}},
         "constants": {"code_system": "loinc", "category": "vital-signs"}},
    ],
    "medication_request": [{
        "file": "prescriptions.csv", "id": "{prescription_id}:{drug_name}", "patient": "patient_id",
        "columns": {"display": "drug_name", "code": "drug_name"},
        "constants": {"code_system": "local", "status": "active", "intent": "order"},
    }],
    "procedure": [{
        "file": "procedures.csv", "id": "{procedure_id}:{procedure_code}:{start_datetime}", "patient": "patient_id",
        "columns": {"code": "procedure_code", "display": "procedure_name", "performed_start": "start_datetime",
                    "performed_end": "end_datetime"},
        "constants": {"code_system": "http://www.ama-assn.org/go/cpt", "status": "completed"},
    }],
}


def effective_mapping(spec: EhrSpec) -> dict[str, list[EhrTableMapping]]:
    """The preset (if any) with the spec's own tables replacing the preset's entry for the same table."""
    out: dict[str, list[EhrTableMapping]] = {}
    if spec.preset == "clinosim":
        out = {t: [EhrTableMapping.model_validate(m) for m in ms] for t, ms in CLINOSIM_PRESET.items()}
    out.update(spec.tables)
    order = ["patient", "encounter"]
    return {t: out[t] for t in sorted(out, key=lambda t: (order.index(t) if t in order else 2, t))}


# --------------------------------------------------------------------------------------------------
# Value conversion by target Arrow type
# --------------------------------------------------------------------------------------------------
def _blank(v: Any) -> bool:
    return v is None or (type(v) is str and not v.strip())


def _to_str(v: Any) -> str:
    if type(v) is str:
        return v
    if type(v) is float and v.is_integer():
        return str(int(v))
    return str(v)


def _to_ts(v: Any) -> int:
    if isinstance(v, datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=timezone.utc)
        return (v - _EPOCH) // timedelta(microseconds=1)
    if isinstance(v, date):
        return (v.toordinal() - _EPOCH_ORD) * 86_400_000_000
    s = str(v).strip()
    m = _SPACE_DT.match(s)
    if m:
        s = f"{m.group(1)}T{m.group(2)}{':00' if m.group(3) is None else ''}{m.group(5)}"
    if len(s) == 16 and s[10] == "T":  # YYYY-MM-DDThh:mm
        s += ":00"
    return parse_fhir_datetime(s)


def _to_days(v: Any) -> int:
    if isinstance(v, datetime):
        return v.date().toordinal() - _EPOCH_ORD
    if isinstance(v, date):
        return v.toordinal() - _EPOCH_ORD
    s = str(v).strip()
    m = _SPACE_DT.match(s)
    if m:
        s = f"{m.group(1)}T{m.group(2)}{':00' if m.group(3) is None else ''}{m.group(5)}"
    return local_days(s)


def _to_float(v: Any) -> float:
    if type(v) in (int, float) and type(v) is not bool:
        return float(v)
    return float(str(v).strip())


def _to_bool(v: Any) -> bool:
    if type(v) is bool:
        return v
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError("not a boolean")


def _to_int(v: Any) -> int:
    if type(v) is int:
        return v
    f = float(str(v).strip())
    if not f.is_integer():
        raise ValueError("not an integer")
    return int(f)


def _converter(col: str, t: pa.DataType) -> Callable[[Any], Any]:
    if pa.types.is_timestamp(t):
        fn, what = _to_ts, "date"
    elif pa.types.is_date(t):
        fn, what = _to_days, "date"
    elif pa.types.is_floating(t):
        fn, what = _to_float, "value"
    elif pa.types.is_boolean(t):
        fn, what = _to_bool, "value"
    elif pa.types.is_integer(t):
        fn, what = _to_int, "value"
    else:
        fn, what = _to_str, "value"
    reason = f"invalid {what} in {col}"

    def convert(v: Any) -> Any:
        if _blank(v):
            return None
        try:
            return fn(v)
        except (ValueError, TypeError, OverflowError):
            raise BadResource(reason) from None
    return convert


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _iter_csv(store: Store, uri: str, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row dict) of a CSV file (``.gz`` by name), every cell a string ('' -> None); streamed."""
    import gzip

    with store.open_read(uri) as raw:
        binary: Any = gzip.GzipFile(fileobj=raw) if uri.endswith(".gz") else raw
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        header = [h.strip() for h in header]
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            yield reader.line_num, {h: (v if v != "" else None) for h, v in zip(header, row)}


def _iter_parquet(store: Store, uri: str) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    src = io.BytesIO(store.read_bytes(uri)) if uri.startswith("s3://") else uri
    pf = pq.ParquetFile(src)
    n = 0
    for batch in pf.iter_batches(batch_size=50_000):
        cols = batch.schema.names
        data = [batch.column(i).to_pylist() for i in range(len(cols))]
        for values in zip(*data):
            n += 1
            yield n, dict(zip(cols, values))


# --------------------------------------------------------------------------------------------------
# Mapping one file
# --------------------------------------------------------------------------------------------------
class _Mapper:
    def __init__(self, table: str, m: EhrTableMapping, schema: pa.Schema, resource: str,
                 key: Callable[[str, str], str], reference_days: int):
        self.table, self.m, self.schema, self.resource, self.key = table, m, schema, resource, key
        self.names = schema.names
        self.index = {n: i for i, n in enumerate(self.names)}
        self.conv = {f.name: _converter(f.name, f.type) for f in schema}
        self.own_key = f"{table}_key" if f"{table}_key" in self.index else None
        bad = [c for c in (*m.columns, *m.constants, *m.values) if c not in self.index]
        for lk in m.lookup.values():
            for targets in lk.values():
                bad += [c for c in targets if c not in self.index]
        for targets in m.melt.values():
            bad += [c for c in targets if c not in self.index]
        if m.melt and m.melt_into not in self.index:
            bad.append(m.melt_into)
        if m.explode and m.explode["into"] not in self.index:
            bad.append(m.explode["into"])
        keys = {c for c in (*m.columns, *m.constants) if c.endswith("_key")}
        if bad or keys:
            raise ExtractError(f"source.ehr.tables.{table} ({m.file}): unknown target column(s) "
                               f"{sorted(set(bad) | keys)}; {table} has {[n for n in self.names if not n.endswith('_key')]}")
        self.reference_days = reference_days
        self.template = m.id if m.id and "{" in m.id else None

    def rows(self, fname: str, row: dict[str, Any]) -> list[tuple[str, tuple]]:
        """[(source id, row tuple)] for one source row (several with melt/explode). Raises BadResource."""
        m = self.m
        base: dict[str, Any] = dict(m.constants)
        for target, col in m.columns.items():
            if col not in row:
                raise BadResource(f"missing column {col}")
            v = row[col]
            vm = m.values.get(target)
            if vm is not None and v is not None:
                v = vm.get(_to_str(v), v)
            base[target] = v
        for col, table in m.lookup.items():
            v = row.get(col)
            hit = table.get(_to_str(v)) if v is not None else None
            if hit is None:
                hit = table.get("*")
            if hit:
                base.update(hit)
        if m.age is not None:
            a = row.get(m.age)
            if not _blank(a):
                try:
                    years = int(float(str(a)))
                except ValueError:
                    raise BadResource(f"invalid value in {m.age}") from None
                ref = date.fromordinal(self.reference_days + _EPOCH_ORD)
                base.setdefault("birth_date", f"{ref.year - years:04d}")
        variants: list[tuple[dict[str, Any], dict[str, str]]] = []
        if m.melt:
            for col, targets in m.melt.items():
                v = row.get(col)
                if _blank(v):
                    continue
                variants.append(({**base, **targets, m.melt_into: v}, {"column": col, "value": _to_str(v)}))
        elif m.explode:
            raw = row.get(m.explode["column"])
            for piece in (str(raw).split(m.explode.get("sep", "|")) if not _blank(raw) else []):
                piece = piece.strip()
                if piece:
                    variants.append(({**base, m.explode["into"]: piece}, {"value": piece}))
        else:
            variants.append((base, {}))
        out = []
        for values, extra in variants:
            sid = self._source_id(fname, row, extra)
            out.append((sid, self._tuple(values, row, sid)))
        return out

    def _source_id(self, fname: str, row: dict[str, Any], extra: dict[str, str]) -> str:
        m = self.m
        if self.template is not None:
            try:
                return self.template.format_map(_Fmt({**{k: _to_str(v) if v is not None else "" for k, v in row.items()},
                                                      **extra}))
            except (KeyError, ValueError, IndexError):
                raise BadResource("id template names a missing column") from None
        if m.id:
            v = row.get(m.id)
            if _blank(v):
                raise BadResource(f"missing id in {m.id}")
            return _to_str(v)
        return f"{fname}#{row.get('__line__')}" + (f"#{extra['column']}" if "column" in extra else "") \
            + (f"#{extra['value']}" if "value" in extra and "column" not in extra else "")

    def _tuple(self, values: dict[str, Any], row: dict[str, Any], sid: str) -> tuple:
        out: list[Any] = [None] * len(self.names)
        conv = self.conv
        idx = self.index
        for target, v in values.items():
            out[idx[target]] = conv[target](v)
        if self.table == "patient":
            g = out[idx["gender"]]
            if g is not None:
                g = g.lower()
                if g not in GENDERS:
                    raise BadResource("invalid value in gender")
                out[idx["gender"]] = g
            bd = values.get("birth_date")
            if bd is not None and out[idx["birth_date_precision"]] is None and type(bd) is str:
                out[idx["birth_date_precision"]] = date_precision(bd.strip()[:10] if len(bd.strip()) > 10 else bd.strip())
            elif bd is not None and out[idx["birth_date_precision"]] is None:
                out[idx["birth_date_precision"]] = "day"
            if out[idx["deceased"]] is None:
                out[idx["deceased"]] = out[idx["deceased_date"]] is not None
        if self.own_key is not None:
            out[idx[self.own_key]] = self.key(self.resource, sid)
        if "patient_key" in idx and self.table != "patient":
            if self.m.patient is not None:
                pv = row.get(self.m.patient)
                out[idx["patient_key"]] = None if _blank(pv) else self.key("Patient", _to_str(pv))
        if "encounter_key" in idx and self.m.encounter is not None:
            ev = row.get(self.m.encounter)
            out[idx["encounter_key"]] = None if _blank(ev) else self.key("Encounter", _to_str(ev))
        return tuple(out)


class _Fmt(dict):
    def __missing__(self, key: str) -> str:
        raise KeyError(key)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def ingest_ehr(
    source_uri: str,
    out_uri: str,
    *,
    mapping: EhrSpec | dict,
    keyer: Keyer,
    store: Store | None = None,
    file_format: str = "csv",
    batch_rows: int = 50_000,
    on_dangling: str = "quarantine",
    extra_report: dict | None = None,
) -> dict:
    """Map a folder of CSV (``file_format='csv'``) or Parquet files onto the flattened tables."""
    if file_format not in ("csv", "parquet"):
        raise ValueError("file_format must be 'csv' or 'parquet'")
    spec = mapping if isinstance(mapping, EhrSpec) else EhrSpec.model_validate(mapping)
    tables = effective_mapping(spec)
    store = store or Store()
    source_uri, out_uri = str(source_uri), str(out_uri)
    if spec.reference_date:
        try:
            ref_days = parse_fhir_date(spec.reference_date[:10])[0]
        except ValueError:
            raise ExtractError(f"source.ehr.reference_date: {spec.reference_date!r} is not a date") from None
    else:
        ref_days = date.today().toordinal() - _EPOCH_ORD
    with gc_paused():
        uris = list_source(source_uri, store)
        names = {relative_name(u, source_uri): u for u in uris}
        resources = [BUILTIN_VIEWS[t]["resource"] for t in tables]
        if "Patient" not in resources:
            resources.insert(0, "Patient")
        session = IngestSession(out_uri, keyer=keyer, store=store, resources=resources,
                                validate_sample_rate=0.0, batch_rows=batch_rows, on_dangling=on_dangling,
                                native=False)  # mapped rows, not NDJSON lines: plain row buffers
        used: set[str] = set()
        stats = {"rows_in": 0, "duplicate_rows": 0}
        try:
            for table, maps in tables.items():
                rtype = BUILTIN_VIEWS[table]["resource"]
                schema = TABLES[rtype][1] if rtype in TABLES else compile_view(BUILTIN_VIEWS[table]).schema
                writer = session.writers[table]
                for m in maps:
                    mapper = _Mapper(table, m, schema, rtype, session.key, ref_days)
                    matched = sorted(n for n in names if fnmatch.fnmatch(n, m.file)
                                     and n.endswith(".parquet" if file_format == "parquet" else (".csv", ".csv.gz", ".tsv")))
                    if not matched and table == "patient":
                        raise ExtractError(f"extract is empty: no file matches {m.file!r} for the patient table in "
                                           f"{source_uri}")
                    for name in matched:
                        used.add(name)
                        _map_file(session, store, name, names[name], file_format, spec.delimiter, mapper, rtype,
                                  writer, stats)
        except BaseException:
            session.abort()
            raise
        for name in sorted(used):
            if name not in session.file_sha256:
                session.record_file(name, _sha256(store, names[name]))
        return session.finish(source=source_uri, skipped_files=[n for n in names if n not in used],
                              extra={"source_kind": f"ehr_{file_format}", "ehr_stats": stats,
                                     **(extra_report or {})})


def _sha256(store: Store, uri: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with store.open_read(uri) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _map_file(session: IngestSession, store: Store, name: str, uri: str, file_format: str, delimiter: str,
              mapper: _Mapper, rtype: str, writer: Any, stats: dict) -> None:
    fname = name.rsplit("/", 1)[-1]
    add_ident = session.identifiers.add
    seen: dict[str, int] = {}
    pkeys = session.patient_keys if (session.patient_keys and rtype != "Patient") else None
    keep_dangling = session.on_dangling == "keep"
    m = mapper.m
    rows_iter: Iterable[tuple[int, dict]] = (_iter_csv(store, uri, "\t" if name.endswith(".tsv") else delimiter)
                                             if file_format == "csv" else _iter_parquet(store, uri))
    n_read = n_bad = 0
    for line, row in rows_iter:
        stats["rows_in"] += 1
        row["__line__"] = line
        for col in m.identifiers:
            v = row.get(col)
            if not _blank(v):
                add_ident(_to_str(v), "identifier")
        for col in (m.id if m.id and "{" not in m.id else None, m.patient, m.encounter):
            if col:
                v = row.get(col)
                if not _blank(v):
                    add_ident(_to_str(v), "id")
        session.identifiers.maybe_spill()
        try:
            produced = mapper.rows(fname, row)
        except BadResource as bad:
            n_read += 1
            n_bad += 1
            session.quarantine(fname, line, rtype, bad.reason)
            continue
        for sid, tup in produced:
            n_read += 1
            h = hash(tup)
            prev = seen.get(sid)
            if prev is not None:
                if prev == h and m.dedupe:
                    stats["duplicate_rows"] += 1
                    n_read -= 1
                    continue
                n_bad += 1
                session.quarantine(fname, line, rtype, "duplicate id")
                continue
            if pkeys is not None:
                pk = tup[mapper.index["patient_key"]] if "patient_key" in mapper.index else None
                if pk is not None and pk not in pkeys:
                    session.dangling[rtype] = session.dangling.get(rtype, 0) + 1
                    if not keep_dangling:
                        n_bad += 1
                        session.quarantine(fname, line, rtype, "dangling reference to Patient")
                        continue
            seen[sid] = h
            if rtype == "Patient" and session.patient_keys is not None and tup[0] is not None:
                session.patient_keys.add(tup[0])  # an IdSet holds str keys only (a None key is never looked up)
            writer.buf.append(tup)
            if len(writer.buf) >= writer.batch_rows:
                writer.flush()
    session.resources_read[rtype] = session.resources_read.get(rtype, 0) + n_read
    session.quarantined[rtype] = session.quarantined.get(rtype, 0) + n_bad
    log.info("mapped %s -> %s: %d rows, %d quarantined", fname, mapper.table, n_read, n_bad)
