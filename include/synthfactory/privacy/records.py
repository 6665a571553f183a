"""Record-level privacy of relational mode: a patient's whole record is the unit.

Each record (the patient row and all its child rows) becomes one summary vector: sex, birth year, the number of
rows of every child table, whether each of the most frequent condition / medication / procedure codes occurs,
and the median value of each of the most frequent numeric observation codes. On these vectors:

* **exact match**: the share of synthetic records whose vector equals a real train record's;
* **DCR share**: the share of synthetic records closer to a real train record than to a real held-out one
  (train subsampled to the held-out size, so 0.5 is ideal; copies of train records score
  0.5 + 0.5 x held-out/train);

each beside its real-data reference (the same figure for real held-out records in place of synthetic ones,
against a disjoint part of train). The code lists come from the real train tables (frequent codes only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

ROOT = "patient"
KEY = "patient_key"


def record_layout(train: Mapping[str, pd.DataFrame], top: int = 10, min_patients: int = 10) -> dict[str, list]:
    """The codes each vector carries: per child table with a ``code``, its ``top`` codes held by at least
    ``min_patients`` train patients (small cells never define a column)."""
    out: dict[str, list] = {}
    for name, df in train.items():
        if name == ROOT or "code" not in df.columns or KEY not in df.columns:
            continue
        held = df.dropna(subset=["code"]).groupby("code")[KEY].nunique()
        codes = [str(c) for c in held[held >= min_patients].sort_values(ascending=False).index[:top]]
        out[name] = codes
    return out


def record_vectors(tables: Mapping[str, pd.DataFrame], layout: Mapping[str, list]) -> pd.DataFrame:
    """One numeric row per patient (index: ``patient_key``)."""
    p = tables[ROOT]
    keys = p[KEY].astype(str)
    out = pd.DataFrame(index=keys.values)
    if "gender" in p:
        out["male"] = (p["gender"].astype(str) == "male").astype(float).values
    if "birth_date" in p:
        out["birth_year"] = pd.to_datetime(p["birth_date"], errors="coerce").dt.year.astype(float).values
    for name, df in tables.items():
        if name == ROOT or KEY not in df.columns:
            continue
        out[f"n_{name}"] = df.groupby(KEY).size().reindex(out.index, fill_value=0).astype(float).values
        codes = layout.get(name) or []
        if not codes:
            continue
        sub = df[df["code"].astype(str).isin(codes)]
        if name == "observation" and "value_num" in df:
            med = sub.dropna(subset=["value_num"]).groupby([KEY, "code"])["value_num"].median().unstack()
            for c in codes:
                col = med[c] if c in med else pd.Series(dtype=float)
                out[f"{name}:{c}"] = col.reindex(out.index).astype(float).values
        else:
            has = sub.groupby([KEY, "code"]).size().unstack()
            for c in codes:
                col = has[c] if c in has else pd.Series(dtype=float)
                out[f"{name}:{c}"] = col.reindex(out.index).notna().astype(float).values
    return out


def _scaled(frames: list[pd.DataFrame]) -> list[np.ndarray]:
    allv = pd.concat(frames)
    lo, sd = allv.median(), allv.std().replace(0, 1.0).fillna(1.0)
    # a missing lab is its own position (far from any measured value), not the mean
    return [((f - lo) / sd).fillna(-10.0).to_numpy(dtype="float64") for f in frames]


def _figures(train: np.ndarray, other: np.ndarray, holdout: np.ndarray, rng: np.random.Generator) -> dict:
    from sklearn.neighbors import NearestNeighbors

    n = min(len(train), len(holdout))
    t = train[rng.choice(len(train), size=n, replace=False)]
    h = holdout[rng.choice(len(holdout), size=n, replace=False)]
    dt = NearestNeighbors(n_neighbors=1).fit(t).kneighbors(other)[0][:, 0]
    dh = NearestNeighbors(n_neighbors=1).fit(h).kneighbors(other)[0][:, 0]
    ties = np.isclose(dt, dh)
    share = float(((dt < dh) & ~ties).mean() + 0.5 * ties.mean())
    seen = {tuple(r) for r in np.round(train, 6)}
    exact = float(np.mean([tuple(r) in seen for r in np.round(other, 6)])) if len(other) else 0.0
    return {"exact_match_rate": exact, "dcr_share": share}


def record_privacy(train: Mapping[str, pd.DataFrame], holdout: Mapping[str, pd.DataFrame],
                   synthetic: Mapping[str, pd.DataFrame], *, top: int = 10, seed: int = 0) -> dict[str, Any]:
    """Record-level exact match and DCR share of the synthetic records, and the same figures of real held-out
    records (against the other half of train) as their reference."""
    layout = record_layout(train, top=top)
    vt, vh, vs = (record_vectors(x, layout) for x in (train, holdout, synthetic))
    cols = list(vt.columns)
    vt, vh, vs = _scaled([vt[cols], vh.reindex(columns=cols), vs.reindex(columns=cols)])
    rng = np.random.default_rng(seed)
    syn = _figures(vt, vs, vh, rng)
    # reference: train split in two; real records of one half play the synthetic ones against the other half
    perm = rng.permutation(len(vt))
    half = len(vt) // 2
    ref = _figures(vt[perm[:half]], vh, vt[perm[half:]], rng)
    return {"synthetic": syn, "reference": ref, "features": len(cols), "records": {"train": len(vt),
                                                                                     "holdout": len(vh),
                                                                                     "synthetic": len(vs)}}
