"""Fixed-seed patient-level modelling tables with known clinical relationships, for quality tests and the
quality benchmark. Nothing here is derived from real data.

:func:`cohort_table` has the columns of the demo modelling table (demographics, utilisation, condition
flags, labs) and relationships a good synthesizer must keep: diabetes raises HbA1c and glucose,
hypertension rises with age and raises systolic BP, obesity raises BMI, CKD lowers eGFR, eGFR falls with
age and is a little lower in men. An independent draw (another seed) is an ideal synthesizer;
:func:`shuffle_column` and :func:`shift_column` make synthesizers that break a relationship or a
distribution.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["cohort_table", "shift_column", "shuffle_column", "RELATIONSHIPS", "UTILITY"]

#: Relationships of :func:`cohort_table`, in the spec's ``quality.relationships`` form.
RELATIONSHIPS = [
    {"name": "hba1c_by_diabetes", "measure": "hba1c", "by": "cond_e11_9", "stat": "mean", "tolerance": 0.4},
    {"name": "hypertension_by_age_band", "measure": "cond_i10", "by": "age", "bins": [0, 45, 65, 200],
     "stat": "rate", "tolerance": 0.08},
    {"name": "egfr_by_sex", "measure": "egfr", "by": "gender", "stat": "mean", "tolerance": 4.0},
]
#: The ML-utility target of :func:`cohort_table`, in the spec's ``quality.utility`` form.
UTILITY = {"target": "cond_e11_9"}


def cohort_table(n: int, seed: int = 0, key: str | None = "patient_key") -> pd.DataFrame:
    """``n`` patients; ``key`` names a unique string key column first (None: no key column)."""
    rng = np.random.default_rng(seed)
    age = np.clip(rng.normal(52, 17, n), 18, 90).round().astype("int64")
    male = rng.random(n) < 0.48
    gender = np.where(male, "male", "female").astype(object)
    decade = (age - 40) / 10
    p_diab = np.clip(0.04 + 0.03 * decade, 0.02, 0.35)
    diabetes = rng.random(n) < p_diab
    obese = rng.random(n) < np.clip(0.30 + 0.25 * diabetes, 0, 1)
    p_htn = np.clip(0.10 + 0.09 * decade + 0.10 * obese, 0.03, 0.85)
    hypertension = rng.random(n) < p_htn
    ckd = rng.random(n) < np.clip(0.01 + 0.02 * decade + 0.05 * diabetes, 0.005, 0.4)
    hyperlip = rng.random(n) < np.clip(0.12 + 0.05 * decade, 0.02, 0.6)
    hypothyroid = rng.random(n) < 0.05 + 0.04 * (~male)
    ihd = rng.random(n) < np.clip(0.01 + 0.02 * decade + 0.02 * male, 0.002, 0.3)
    mixed_lip = rng.random(n) < 0.06
    deceased = rng.random(n) < np.clip(0.005 + 0.01 * np.maximum(decade, 0) ** 1.5, 0, 0.5)

    hba1c = rng.normal(5.5, 0.35, n) + diabetes * rng.normal(1.9, 0.8, n)
    glucose = rng.normal(94, 10, n) + diabetes * rng.normal(55, 25, n)
    bmi = rng.normal(25.5, 3.0, n) + obese * rng.normal(9.0, 3.0, n)
    sbp = rng.normal(121, 11, n) + hypertension * rng.normal(15, 8, n) + 0.15 * (age - 50)
    ldl = rng.normal(112, 30, n) + hyperlip * 30 - 10 * ihd
    egfr = np.clip(rng.normal(108 - 0.7 * age - 4 * male, 10, n) - ckd * rng.normal(40, 8, n), 8, 140)
    labs = {"hba1c": np.clip(hba1c, 4.2, 14.0).round(1), "bmi": np.clip(bmi, 15, 60).round(1),
            "systolic_bp": np.clip(sbp, 85, 210).round(0), "ldl": np.clip(ldl, 30, 260).round(0),
            "egfr": egfr.round(0), "glucose": np.clip(glucose, 60, 400).round(0)}
    for name, values in labs.items():  # labs are not measured for everyone
        values[rng.random(n) < 0.15] = np.nan

    flags = {"cond_e66_9": obese, "cond_i10": hypertension, "cond_e78_5": hyperlip, "cond_e11_9": diabetes,
             "cond_e78_00": mixed_lip, "cond_e03_9": hypothyroid, "cond_n18_32": ckd, "cond_i25_10": ihd}
    n_conditions = sum(f.astype("int64") for f in flags.values()) + rng.poisson(0.3, n)
    n_encounters = 1 + rng.poisson(0.8 + 0.6 * n_conditions, n)
    df = pd.DataFrame({"gender": gender, "age": age, "deceased": deceased,
                       "n_encounters": n_encounters.astype("int64"), "n_conditions": n_conditions.astype("int64"),
                       **flags, **labs})
    if key:
        df.insert(0, key, [f"{seed:x}-{i:08x}" for i in range(n)])
    return df


def shuffle_column(df: pd.DataFrame, column: str, seed: int = 0) -> pd.DataFrame:
    """A copy with ``column`` permuted across rows: its distribution is kept, every relationship is lost."""
    out = df.copy()
    out[column] = df[column].sample(frac=1.0, random_state=seed).to_numpy()
    return out


def shift_column(df: pd.DataFrame, column: str, by: float) -> pd.DataFrame:
    """A copy with ``column`` shifted by ``by``: a broken distribution."""
    out = df.copy()
    out[column] = df[column] + by
    return out
