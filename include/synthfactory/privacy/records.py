"""Record-level privacy of relational mode: a patient's whole record is the unit.

Each record (the patient row and all its child rows) becomes one summary vector: sex, birth year, the number of
rows of every child table, whether each of the most frequent condition / medication / procedure codes occurs,
and the median value of each of the most frequent numeric observation codes. On these vectors:

* **exact match**: the share of synthetic records whose vector equals a real train record's;
* **DCR share**: the share of synthetic records closer to a real train record than to a real held-out one
  (train subsampled to the held-out size, so 0.5 is ideal; copies of train records score
  0.5 + 0.5 x held-out/train);

each beside its real-data reference (the same figure for real held-out records in place of synthetic ones,
against a disjoint part of train; ``resplits`` random halvings of train, summarised as mean, sd, ... in
``reference_summary``, their means in ``reference``). The code lists come from the real train tables
(frequent codes only). The partial-knowledge membership-inference attacks on whole records are in
:mod:`.record_mia`; :func:`record_audit` runs both.
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
                   synthetic: Mapping[str, pd.DataFrame], *, top: int = 10, seed: int = 0,
                   resplits: int = 1) -> dict[str, Any]:
    """Record-level exact match and DCR share of the synthetic records, and the same figures of real held-out
    records (against the other half of train, over ``resplits`` random halvings) as their reference."""
    from synthfactory.quality.reference import summarise

    layout = record_layout(train, top=top)
    vt, vh, vs = (record_vectors(x, layout) for x in (train, holdout, synthetic))
    cols = list(vt.columns)
    vt, vh, vs = _scaled([vt[cols], vh.reindex(columns=cols), vs.reindex(columns=cols)])
    rng = np.random.default_rng(seed)
    syn = _figures(vt, vs, vh, rng)
    # reference: train split in two; real records of one half play the synthetic ones against the other half
    half = len(vt) // 2
    runs = []
    for _ in range(max(1, int(resplits))):
        perm = rng.permutation(len(vt))
        runs.append(_figures(vt[perm[:half]], vh, vt[perm[half:]], rng))
    spread = {k: summarise([r[k] for r in runs]) for k in syn}
    ref = {k: v["mean"] for k, v in spread.items()}
    return {"synthetic": syn, "reference": ref, "reference_summary": spread, "resplits": len(runs),
            "features": len(cols), "records": {"train": len(vt),
                                                                                     "holdout": len(vh),
                                                                                     "synthetic": len(vs)}}


def record_audit(train: Mapping[str, pd.DataFrame], holdout: Mapping[str, pd.DataFrame],
                 synthetic: Mapping[str, pd.DataFrame], *, resplits: int = 10, bootstrap: int = 200,
                 known_events: int = 3, jitter_days: int = 7, tau_days: float = 30.0, seed: int = 0) -> dict[str, Any]:
    """Every record-level privacy figure: :func:`record_privacy` (exact match, DCR share) and the
    partial-knowledge membership-inference attacks of :mod:`.record_mia`, each beside its real-data reference."""
    from synthfactory.privacy.record_mia import record_mia

    return {"vectors": record_privacy(train, holdout, synthetic, seed=seed, resplits=resplits),
            "mia": record_mia(train, holdout, synthetic, known_events=known_events, jitter_days=jitter_days,
                              tau_days=tau_days, resplits=resplits, bootstrap=bootstrap, seed=seed)}


def _r4(v: Any) -> Any:
    return None if v is None else round(float(v), 4)


def _small(summary: Mapping[str, Any] | None) -> dict | None:
    return None if not summary else {k: _r4(summary[k]) for k in ("mean", "sd", "p05", "p95") if k in summary}


def summarise_record_audit(audit: Mapping[str, Any]) -> dict[str, Any]:
    """The XCom-sized summary of :func:`record_audit` for the privacy stage summary, the gate and the data card:
    every figure with its interval where it has one and its real-data reference beside it (``<figure>_reference``)."""
    from synthfactory.privacy.mia import FPR_KEYS

    vec, mia = audit.get("vectors") or {}, audit.get("mia") or {}
    vref = vec.get("reference_summary") or {}
    mref = mia.get("reference") or {}
    out: dict[str, Any] = {}
    for k in ("exact_match_rate", "dcr_share"):
        out[k] = _r4((vec.get("synthetic") or {}).get(k))
        out[f"{k}_reference"] = _small(vref.get(k))
    out["synthetic_records"] = (vec.get("records") or {}).get("synthetic")
    out["partial_exact_match_rate"] = _r4(mia.get("partial_exact_match_rate"))
    out["partial_exact_match_targets"] = mia.get("partial_exact_match_targets")
    # fresh real records scaled to the release's size (see privacy.record_mia); unscaled in the report
    out["partial_exact_match_rate_reference"] = _small(mref.get("partial_exact_match_rate_at_release_size")
                                                       or mref.get("partial_exact_match_rate"))
    out["partial_exact_match_rate_nonmembers"] = _r4(mia.get("partial_exact_match_rate_nonmembers"))
    attacks: dict[str, dict] = {}
    for name, res in (mia.get("attacks") or {}).items():
        if res.get("status") != "measured":
            attacks[name] = {"status": res.get("status", "skipped"), "reason": res.get("reason")}
            continue
        a: dict[str, Any] = {"status": "measured"}
        for key in ("auc", *FPR_KEYS):
            a[key] = res.get(key)
            a[f"{key}_ci"] = res.get(f"{key}_ci")
            if key != "auc":
                a[f"{key}_resolved"] = res.get(f"{key}_resolved", True)
            a[f"{key}_reference"] = _small(mref.get(f"{name}_{key}"))
        attacks[name] = a
    out["mia"] = attacks
    out["known_events"] = mia.get("known_events")
    out["date_jitter_days"] = mia.get("jitter_days")
    out["members"], out["nonmembers"] = mia.get("members"), mia.get("nonmembers")
    out["resplits"] = mref.get("resplits")
    return out
