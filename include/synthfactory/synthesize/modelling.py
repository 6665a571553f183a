"""Patient-level modelling table: one row per real patient, built from the flattened tables.

Columns: demographics (gender, age top-coded at 90, race, ethnicity, deceased), utilisation
(encounter counts by class, days observed), condition burden, condition flags (``cond_<name>`` of the
spec's condition concepts, whatever code system the extract uses, and ``cond_<code>`` of the most
prevalent or spec-named codes), and labs by concept (any of their LOINC synonyms) aggregated per
patient; ``features.auto`` discovers more (:mod:`synthfactory.features`). Direct identifiers never
appear; the row key is the HMAC ``patient_key`` from ingest, which is dropped before training.
:func:`check_features` refuses, before fit, what a spec asks for that the extract cannot produce.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from synthfactory import features
from synthfactory.errors import InputError
from synthfactory.spec import FeatureSpec, condition_column

if TYPE_CHECKING:
    from synthfactory.spec import DatasetSpec
    from synthfactory.storage import Store

log = logging.getLogger(__name__)

KEY = "patient_key"
AGE_TOP_CODE = 90  # HIPAA Safe Harbor: ages over 89 are aggregated
ENCOUNTER_CLASSES = {"AMB": "n_enc_ambulatory", "IMP": "n_enc_inpatient", "EMER": "n_enc_emergency"}


class ModellingError(InputError, ValueError):
    """The flattened tables cannot produce a usable modelling table (too few patients, no data)."""


class FeatureError(ModellingError):
    """The extract cannot produce a feature the spec asks for, or a column the spec names elsewhere (a
    quasi-identifier, sensitive attribute, relationship or utility column). Raised before fit."""


#: the columns whose latest date is the reference date (when the spec gives none)
REFERENCE_COLUMNS = (("encounter", "start"), ("encounter", "end"), ("observation", "effective"),
                     ("condition", "onset"))


def _reference_date(spec: FeatureSpec, tables: dict[str, pd.DataFrame]) -> pd.Timestamp:
    if spec.reference_date:
        return pd.Timestamp(spec.reference_date, tz="UTC")
    if getattr(tables, "reference_candidates", None) is not None:  # ModellingTables: taken over whole columns
        candidates = tables.reference_candidates
        return max(candidates) if candidates else pd.Timestamp(datetime.now(timezone.utc).date(), tz="UTC")
    candidates = []
    for name, col in REFERENCE_COLUMNS:
        df = tables.get(name)
        if df is not None and col in df and df[col].notna().any():
            candidates.append(df[col].max())
    if candidates:
        return max(candidates)
    return pd.Timestamp(datetime.now(timezone.utc).date(), tz="UTC")


# -- reading the ingested tables in bounded memory ------------------------------------------------------------
#: the columns of each ingested table that the modelling table (and check_features' hints) read
MODELLING_COLUMNS: dict[str, tuple[str, ...] | None] = {
    "patient": None,  # one row per patient: every column
    "encounter": (KEY, "class_code", "start", "end"),
    "condition": (KEY, "code_system", "code", "display", "onset"),
    "observation": (KEY, "code_system", "code", "display", "effective", "value_num", "unit"),
}
BATCH_ROWS = 262_144


class ModellingTables(dict):
    """The ingested tables as the modelling table reads them (:func:`read_modelling_tables`): only its tables
    and columns, observations only with a numeric value (and, unless ``features.auto`` discovers labs, only of
    the codes the spec's labs and their synonyms name), the reference date's candidates taken over the whole
    columns. :meth:`full` reads the whole tables again (the refusal message's extract summary only)."""

    def __init__(self, frames: dict[str, pd.DataFrame], reference_candidates: list[pd.Timestamp],
                 reader: Callable[[], dict[str, pd.DataFrame]]) -> None:
        super().__init__(frames)
        self.reference_candidates = reference_candidates
        self._reader = reader

    def full(self) -> dict[str, pd.DataFrame]:
        return self._reader()


def observation_codes(spec: FeatureSpec) -> set[str] | None:
    """The observation codes the modelling table can read for ``spec``: its labs' LOINC codes and their
    concepts' synonyms (check_features' hint); None (every code) when ``auto`` discovers labs."""
    if spec.auto:
        return None
    codes = {code for lab in spec.labs for code in lab.loinc}
    concepts = {features._LOINC_TO_CONCEPT[c] for c in codes if c in features._LOINC_TO_CONCEPT}
    return codes | {code for c in concepts for code in features.LAB_CONCEPTS[c]}


def read_modelling_tables(uris: dict[str, str], store: "Store", spec: FeatureSpec) -> ModellingTables:
    """Read the ingested tables for :func:`build_modelling_table` in memory that grows with the patients and the
    rows the features use, not with the extract's events: Parquet batches streamed with only the columns read,
    observations filtered per batch (numeric values; the spec's lab codes), the latest dates of the reference
    columns taken per batch. The modelling table is identical to building it from the whole tables."""
    import io

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from synthfactory.storage import is_s3

    codes = observation_codes(spec)
    frames: dict[str, pd.DataFrame] = {}
    latest: list[pd.Timestamp] = []
    ref_cols: dict[str, list[str]] = {}
    for name, col in REFERENCE_COLUMNS:
        ref_cols.setdefault(name, []).append(col)
    for name, uri in uris.items():
        if name not in MODELLING_COLUMNS:
            continue
        src = pq.ParquetFile(io.BytesIO(store.read_bytes(uri)) if is_s3(uri) else uri)
        names = src.schema_arrow.names
        wanted = MODELLING_COLUMNS[name]
        columns = names if wanted is None else [c for c in names if c in wanted]
        dates = [c for c in ref_cols.get(name, []) if c in names]
        maxima: dict[str, list] = {c: [] for c in dates}
        schema = pa.schema([src.schema_arrow.field(c) for c in columns])
        # a batch converts to the same pandas dtypes as the whole column where nulls cannot change the dtype
        # (strings, timestamps, floats; not ints or bools): such tables are converted batch by batch, so only
        # the kept rows are ever held, as pandas (not also as Arrow)
        per_batch = all(pa.types.is_string(f.type) or pa.types.is_timestamp(f.type) or pa.types.is_floating(f.type)
                        for f in schema)
        parts: list = []  # pandas frames of the kept rows (per_batch), else Arrow batches
        for batch in src.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            for c in dates:  # the latest date over the whole column, before any row is left out
                m = pc.max(batch.column(c))
                if m.is_valid:
                    maxima[c].append(m)
            if name == "observation":
                keep = pc.is_valid(batch.column("value_num")) if "value_num" in columns else None
                if codes is not None and "code" in columns:
                    inc = pc.is_in(batch.column("code"), value_set=pa.array(sorted(codes), pa.string()))
                    keep = inc if keep is None else pc.and_(keep, inc)
                if keep is not None:
                    batch = batch.filter(pc.fill_null(keep, False))
            if not per_batch:
                parts.append(batch)
            elif batch.num_rows:
                parts.append(batch.to_pandas())
        if per_batch and parts:
            frames[name] = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
        else:
            frames[name] = pa.Table.from_batches([] if per_batch else parts, schema=schema).to_pandas()
        del parts
        pa.default_memory_pool().release_unused()  # the pool's freed batches back to the system
        for c, ms in maxima.items():
            if ms:  # the column's max as pandas gives it (Timestamp with its time zone)
                latest.append(pa.array([max(m.value for m in ms)], type=ms[0].type).to_pandas().max())

    def reader() -> dict[str, pd.DataFrame]:
        return {name: store.read_table(uri).to_pandas() for name, uri in uris.items()}

    return ModellingTables(frames, latest, reader)


def resolve_features(tables: dict[str, pd.DataFrame], spec: FeatureSpec) -> FeatureSpec:
    """The features with everything the extract decides made explicit: the top_conditions most prevalent codes
    (codes no concept covers) as ``condition_codes``, or with ``auto`` as readable single-code concepts, and
    ``auto``'s discovered labs. The result has ``auto: false`` and ``top_conditions: 0``: building it on
    other tables (e.g. synthetic ones) gives the same columns."""
    cond = tables.get("condition")
    extra_concepts: list = []
    codes = list(spec.condition_codes)
    if cond is not None and not cond.empty and spec.top_conditions:
        cond = cond[cond["code"].notna()]
        if spec.conditions:
            systems = features._systems(cond)
            covered = pd.Series(False, index=cond.index)
            for concept in spec.conditions:
                covered |= features.concept_mask(cond, concept, systems)
            cond = cond[~covered]
        taken = set(spec.columns())
        if spec.auto:
            prev = features.condition_prevalence(cond)
            prev = prev[~prev["code"].isin(spec.condition_codes)]
            extra_concepts = features.discover_conditions(prev, spec.top_conditions, taken)
        else:
            per_patient = cond.drop_duplicates([KEY, "code"])
            prevalence = per_patient.groupby("code")[KEY].nunique().sort_values(ascending=False, kind="stable")
            top = list(prevalence.index[: spec.top_conditions])
            codes = top + [c for c in spec.condition_codes if c not in top]
    labs = list(spec.labs)
    if spec.auto:
        patients = tables.get("patient")
        n = int(patients[KEY].nunique()) if patients is not None and not patients.empty else 0
        taken = set(spec.columns()) | {c.column for c in extra_concepts} | set(features.BASE_FEATURE_COLUMNS)
        labs += features.discover_labs(tables.get("observation"), n, spec.auto_min_share, spec.auto_max_labs,
                                       spec.labs, taken)
    return spec.model_copy(update={"top_conditions": 0, "condition_codes": codes, "auto": False,
                                   "conditions": [*spec.conditions, *extra_concepts], "labs": labs})


def build_modelling_table(tables: dict[str, pd.DataFrame], spec: FeatureSpec) -> tuple[pd.DataFrame, dict]:
    """Return (table, info). ``tables`` holds the flattened patient/encounter/condition/observation frames."""
    patients = tables["patient"]
    if patients.empty:
        raise ModellingError("no patients in the flattened extract")
    ref = _reference_date(spec, tables)
    out = pd.DataFrame({KEY: patients[KEY].astype(str)})
    out["gender"] = patients["gender"].astype(object).where(patients["gender"].notna(), None)

    birth = pd.to_datetime(patients["birth_date"], errors="coerce")
    ref_naive = ref.tz_convert(None) if ref.tzinfo else ref
    age = ((ref_naive - birth).dt.days / 365.25).astype(float)
    age = np.floor(age.clip(lower=0, upper=AGE_TOP_CODE))
    out["age"] = age
    for col in ("race", "ethnicity"):
        if col in patients and patients[col].notna().any():
            out[col] = patients[col].astype(object).where(patients[col].notna(), None)
    out["deceased"] = patients["deceased"].fillna(False).astype(bool)

    # -- encounters -------------------------------------------------------------------------------
    enc = tables.get("encounter")
    if enc is not None and not enc.empty:
        g = enc.groupby(KEY)
        out["n_encounters"] = out[KEY].map(g.size()).fillna(0).astype("int64")
        for cls, name in ENCOUNTER_CLASSES.items():
            counts = enc[enc["class_code"] == cls].groupby(KEY).size()
            if counts.sum() > 0 and counts.sum() < len(enc):  # only informative when classes vary
                out[name] = out[KEY].map(counts).fillna(0).astype("int64")
        span = (g["start"].max() - g["start"].min()).dt.days
        if span.fillna(0).max() > 0:
            out["days_observed"] = out[KEY].map(span).fillna(0).astype("int64")
    else:
        out["n_encounters"] = 0

    # -- conditions -------------------------------------------------------------------------------
    resolved = resolve_features(tables, spec)
    cond = tables.get("condition")
    flags: list[str] = []
    missing_conditions: list[str] = []
    if cond is not None and not cond.empty:
        cond = cond[cond["code"].notna()]
        per_patient = cond.drop_duplicates([KEY, "code"])
        out["n_conditions"] = out[KEY].map(per_patient.groupby(KEY).size()).fillna(0).astype("int64")
    else:
        cond, per_patient = None, None
        out["n_conditions"] = 0
    dictionary: dict[str, dict] = {"conditions": {}, "labs": {}}
    for concept in resolved.conditions:
        dictionary["conditions"][concept.column] = {"concept": concept.name, "description": concept.description,
                                                    "codes": concept.codes}
    if resolved.conditions:
        systems = features._systems(cond) if cond is not None else None
        for concept in resolved.conditions:
            holders = set(cond.loc[features.concept_mask(cond, concept, systems), KEY]) if cond is not None else set()
            out[concept.column] = out[KEY].isin(holders)
            if not holders:
                missing_conditions.append(concept.name)
    for code in resolved.condition_codes:
        col = condition_column(code)
        if col in out.columns:
            log.info("condition code %s: column %s is already a concept flag; not flagged again", code, col)
            continue
        holders = set(per_patient.loc[per_patient["code"] == code, KEY]) if per_patient is not None else set()
        out[col] = out[KEY].isin(holders)
        flags.append(code)
        rows = per_patient[per_patient["code"] == code] if per_patient is not None else None
        dictionary["conditions"][col] = {"code": code, "system": _most_common(rows, "code_system"),
                                         "display": _most_common(rows, "display")}

    # -- labs -------------------------------------------------------------------------------------
    obs = tables.get("observation")
    labs_used: list[str] = []
    missing_labs: list[str] = []
    lab_units: dict[str, dict[str, int]] = {}
    if resolved.labs:
        if obs is not None and not obs.empty:
            obs = obs[obs["value_num"].notna()]
        systems = features._systems(obs) if obs is not None and not obs.empty else None
        for lab in resolved.labs:
            sel = features.lab_rows(obs, lab, systems) if systems is not None else None
            if sel is None or sel.empty:
                log.warning("lab %s (LOINC %s) has no numeric values in the extract; column left out",
                            lab.name, ", ".join(lab.loinc))
                missing_labs.append(lab.name)
                continue
            if lab.agg == "last":
                sel = sel.sort_values("effective", kind="stable")
                agg = sel.groupby(KEY)["value_num"].last()
            else:
                agg = sel.groupby(KEY)["value_num"].agg(lab.agg)
            out[lab.name] = out[KEY].map(agg).astype("float64")
            labs_used.append(lab.name)
            dictionary["labs"][lab.name] = {"loinc": list(lab.loinc), "agg": lab.agg,
                                            "display": _most_common(sel, "display"), "units": []}
            if "unit" in sel:
                units = sel["unit"].fillna("").astype(str).value_counts()
                lab_units[lab.name] = {str(k): int(v) for k, v in units.items()}
                dictionary["labs"][lab.name]["units"] = [str(k) for k in units.index if str(k)]
                if len(units) > 1:
                    log.warning("lab %s pools values in %d units %s without conversion; list only LOINC codes "
                                "reported in the same unit", lab.name, len(units), sorted(units.index))

    out["age"] = out["age"].astype("float64")
    if out["age"].notna().all():
        out["age"] = out["age"].astype("int64")

    if len(out) < spec.min_patients:
        raise ModellingError(
            f"only {len(out)} patients in the extract; features.min_patients is {spec.min_patients}"
        )
    info = {
        "patients": int(len(out)),
        "columns": [c for c in out.columns if c != KEY],
        "reference_date": ref.date().isoformat() if isinstance(ref.date(), date) else str(ref),
        "condition_flags": flags,
        "concepts": [c.name for c in resolved.conditions],
        "labs": labs_used,
        "lab_units": lab_units,
        "dictionary": dictionary,
        "conditions_missing": missing_conditions,
        "labs_missing": missing_labs,
        "features": resolved.model_dump(mode="json"),
    }
    return out.reset_index(drop=True), info


def table_info(table: pd.DataFrame, spec: "DatasetSpec") -> dict:
    """The modelling-table info of a flat table (``source.kind: table``): its own columns, no labs or flags;
    refused (:class:`ModellingError`) below ``features.min_patients`` rows."""
    if len(table) < spec.features.min_patients:
        raise ModellingError(f"only {len(table)} rows in the table; features.min_patients is "
                             f"{spec.features.min_patients}")
    return {"patients": int(len(table)), "columns": [c for c in table.columns if c != KEY], "reference_date": None,
            "condition_flags": [], "concepts": [], "labs": [], "lab_units": {}, "conditions_missing": [],
            "labs_missing": [], "features": spec.features.model_dump(mode="json"),
            "dictionary": {"conditions": {}, "labs": {}}}


def _most_common(rows: pd.DataFrame | None, column: str) -> str | None:
    """The most frequent non-empty value of ``column`` (a code's display, system), or None."""
    if rows is None or column not in rows or rows.empty:
        return None
    values = rows[column].dropna().astype(str)
    values = values[values.str.strip() != ""]
    return None if values.empty else str(values.value_counts().index[0])


def split_train_holdout(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded split of real rows BEFORE training: the holdout is never seen by the synthesizer and
    serves as the control population of the privacy audit and the quality baseline."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(df))
    n_hold = max(1, int(round(len(df) * fraction)))
    hold = df.iloc[np.sort(idx[:n_hold])].reset_index(drop=True)
    train = df.iloc[np.sort(idx[n_hold:])].reset_index(drop=True)
    return train, hold


def check_features(spec: "DatasetSpec", table: pd.DataFrame, info: dict, tables: dict[str, pd.DataFrame]) -> None:
    """Refuse (:class:`FeatureError`), before fit, a spec whose labs or condition concepts the extract does not
    have, or that names a column (quasi-identifier, sensitive attribute, relationship measure/by, utility
    target/features, rebalance/oversample/constraint column) the modelling table lacks. The message lists
    what the extract does have: its most prevalent condition codes and most measured labs, with patients."""
    problems: list[str] = []
    by_name = {lab.name: lab for lab in spec.features.labs}
    for name in info.get("labs_missing", []):
        lab = by_name.get(name)
        hint = features.lab_synonyms_present(tables.get("observation"), lab) if lab else []
        problems.append(f"features.labs.{name}: no numeric values for LOINC {', '.join(lab.loinc) if lab else '?'}"
                        + (f"; the extract has this lab as {', '.join(hint)}: add the code(s) to loinc" if hint
                           else ""))
    concepts = {c.name: c for c in spec.features.conditions}
    for name in info.get("conditions_missing", []):
        if name in concepts:
            problems.append(f"features.conditions.{name}: no patient has a condition coded "
                            f"{features.describe_codes(concepts[name])}")
    cols = set(table.columns) - {KEY}
    missing_cols: dict[str, list[str]] = {}
    for where, col in features.referenced_columns(spec):
        if col not in cols:
            missing_cols.setdefault(col, []).append(where)
    for col, wheres in missing_cols.items():
        problems.append(f"{', '.join(wheres)}: {col!r} is not a column of the modelling table")
    if problems:
        # the summary lists every code of the extract: the whole tables (read again only here, on refusal)
        summary = features.extract_summary(tables.full() if isinstance(tables, ModellingTables) else tables)
        raise FeatureError(
            f"the extract cannot produce what the spec asks for ({len(problems)} problem(s)):\n  - "
            + "\n  - ".join(problems) + "\n" + features.format_summary(summary, table.columns))
