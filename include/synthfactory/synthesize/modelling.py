"""Patient-level modelling table: one row per real patient, built from the flattened tables.

Columns: demographics (gender, age top-coded at 90, race, ethnicity, deceased), utilisation
(encounter counts by class, days observed), condition burden and flags for the most prevalent or
spec-named conditions, and key labs aggregated per patient. Direct identifiers never appear; the
row key is the HMAC ``patient_key`` from ingest, which is dropped before training.
"""

from __future__ import annotations

import logging
import re
from datetime import date, datetime, timezone

import numpy as np
import pandas as pd

from synthfactory.spec import FeatureSpec
from synthfactory.errors import InputError

log = logging.getLogger(__name__)

KEY = "patient_key"
AGE_TOP_CODE = 90  # HIPAA Safe Harbor: ages over 89 are aggregated
ENCOUNTER_CLASSES = {"AMB": "n_enc_ambulatory", "IMP": "n_enc_inpatient", "EMER": "n_enc_emergency"}


class ModellingError(InputError, ValueError):
    """The flattened tables cannot produce a usable modelling table (too few patients, no data)."""


def condition_column(code: str) -> str:
    return "cond_" + re.sub(r"[^a-z0-9]+", "_", code.lower()).strip("_")


def _reference_date(spec: FeatureSpec, tables: dict[str, pd.DataFrame]) -> pd.Timestamp:
    if spec.reference_date:
        return pd.Timestamp(spec.reference_date, tz="UTC")
    candidates = []
    for name, col in (("encounter", "start"), ("encounter", "end"), ("observation", "effective"),
                      ("condition", "onset")):
        df = tables.get(name)
        if df is not None and col in df and df[col].notna().any():
            candidates.append(df[col].max())
    if candidates:
        return max(candidates)
    return pd.Timestamp(datetime.now(timezone.utc).date(), tz="UTC")


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
    cond = tables.get("condition")
    flags: list[str] = []
    if cond is not None and not cond.empty:
        cond = cond[cond["code"].notna()]
        per_patient = cond.drop_duplicates([KEY, "code"])
        out["n_conditions"] = out[KEY].map(per_patient.groupby(KEY).size()).fillna(0).astype("int64")
        prevalence = per_patient.groupby("code")[KEY].nunique().sort_values(ascending=False, kind="stable")
        chosen = list(prevalence.index[: spec.top_conditions])
        chosen += [c for c in spec.condition_codes if c not in chosen]
        for code in chosen:
            holders = set(per_patient.loc[per_patient["code"] == code, KEY])
            col = condition_column(code)
            out[col] = out[KEY].isin(holders)
            flags.append(code)
    else:
        out["n_conditions"] = 0

    # -- labs -------------------------------------------------------------------------------------
    obs = tables.get("observation")
    labs_used = []
    if obs is not None and not obs.empty and spec.labs:
        obs = obs[obs["value_num"].notna()]
        for lab in spec.labs:
            sel = obs[obs["code"] == lab.loinc]
            if sel.empty:
                log.warning("lab %s (LOINC %s) has no numeric values in the extract; column left out",
                            lab.name, lab.loinc)
                continue
            if lab.agg == "last":
                sel = sel.sort_values("effective", kind="stable")
                agg = sel.groupby(KEY)["value_num"].last()
            else:
                agg = sel.groupby(KEY)["value_num"].agg(lab.agg)
            out[lab.name] = out[KEY].map(agg).astype("float64")
            labs_used.append(lab.name)

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
        "labs": labs_used,
    }
    return out.reset_index(drop=True), info


def split_train_holdout(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded split of real rows BEFORE training: the holdout is never seen by the synthesizer and
    serves as the control population of the privacy audit and the quality baseline."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(df))
    n_hold = max(1, int(round(len(df) * fraction)))
    hold = df.iloc[np.sort(idx[:n_hold])].reset_index(drop=True)
    train = df.iloc[np.sort(idx[n_hold:])].reset_index(drop=True)
    return train, hold
