"""Fidelity beyond SDMetrics' averages: pairwise correlation matrices and the clinical relationships
named in the spec.

* :func:`correlation_matrices` - Pearson correlations of the numeric and boolean columns of the real and
  the synthetic table (the data card's correlation-difference heatmap; the gate uses SDMetrics'
  Column Pair Trends for the pairwise score).
* :func:`compare_relationships` - per spec relationship (e.g. mean HbA1c by diabetes status), the
  statistic in each group of the real train table vs the synthetic table, the largest absolute
  difference and whether it is within the relationship's tolerance.

Only aggregates leave this module, and only of groups with at least ``min_group_rows`` real rows
(small cells are neither compared nor reported). Pure pandas/numpy; never imports Airflow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from synthfactory.quality.expectations import to_jsonable

__all__ = ["compare_relationships", "correlation_matrices", "relationship_groups"]

log = logging.getLogger(__name__)

#: The card's heatmap stays readable up to this many columns (the most variable are kept).
MAX_HEATMAP_COLUMNS = 30
#: Default sampling-noise allowance of a relationship: this many standard errors of the group difference.
NOISE_Z = 2.0


def _numeric_view(df: pd.DataFrame) -> pd.DataFrame:
    """Numbers, booleans (0/1) and datetimes (days) as float64 columns; other columns dropped."""
    out = {}
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_bool_dtype(s.dtype):
            out[col] = s.astype("float64")
        elif pd.api.types.is_numeric_dtype(s.dtype):
            out[col] = pd.to_numeric(s, errors="coerce").astype("float64")
        elif pd.api.types.is_datetime64_any_dtype(s.dtype):
            ts = s.dt.tz_convert(None) if getattr(s.dt, "tz", None) is not None else s
            out[col] = (ts - pd.Timestamp("1970-01-01")).dt.days.astype("float64")
        elif s.dtype == object and len(s.dropna()) and pd.api.types.infer_dtype(s.dropna()) == "boolean":
            out[col] = s.map({True: 1.0, False: 0.0}).astype("float64")
    return pd.DataFrame(out, index=df.index)


def correlation_matrices(real: pd.DataFrame, synthetic: pd.DataFrame,
                         max_columns: int = MAX_HEATMAP_COLUMNS) -> dict:
    """Pearson correlation matrices of the shared numeric/boolean/datetime columns.

    Columns constant in the real table are left out (no correlation defined), and at most the first
    ``max_columns`` (table order) are kept. Returns ``{"columns", "real", "synthetic", "max_abs_diff",
    "mean_abs_diff"}`` (matrices as nested lists, ``None`` where undefined, e.g. a column constant in
    the synthetic table).
    """
    r = _numeric_view(real)
    s = _numeric_view(synthetic)
    cols = [c for c in r.columns if c in s.columns and r[c].nunique(dropna=True) > 1]
    cols = cols[:max_columns]
    if len(cols) < 2:
        return {"columns": cols, "real": [], "synthetic": [], "max_abs_diff": None, "mean_abs_diff": None}
    cr = r[cols].corr().to_numpy()
    cs = s[cols].corr().to_numpy()
    diff = np.abs(cr - cs)
    iu = np.triu_indices(len(cols), k=1)
    d = diff[iu]
    d = d[np.isfinite(d)]
    return to_jsonable({
        "columns": [str(c) for c in cols],
        "real": np.round(cr, 4),
        "synthetic": np.round(cs, 4),
        "max_abs_diff": float(d.max()) if d.size else None,
        "mean_abs_diff": float(d.mean()) if d.size else None,
    })


# --------------------------------------------------------------------------- relationships


def _get(rel: Any, key: str, default: Any = None) -> Any:
    if isinstance(rel, Mapping):
        return rel.get(key, default)
    return getattr(rel, key, default)


def _fmt_edge(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _band_labels(bins: Sequence[float]) -> list[str]:
    return [f"[{_fmt_edge(a)}, {_fmt_edge(b)})" for a, b in zip(bins[:-1], bins[1:])]


def relationship_groups(df: pd.DataFrame, by: str, bins: Sequence[float] | None) -> pd.Series:
    """The group label of each row (strings; NaN where ``by`` is missing or outside the bins)."""
    key = df[by]
    if bins:
        values = pd.to_numeric(key, errors="coerce")
        return pd.cut(values, bins=list(bins), right=False, labels=_band_labels(bins)).astype(object)
    return key.map(lambda v: None if _missing(v) else str(v))


def _missing(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _measure_values(df: pd.DataFrame, measure: str, stat: str) -> pd.Series:
    s = df[measure]
    if stat == "measured":  # 1 where the measure has a value, 0 where it is missing
        return s.map(lambda x: 0.0 if _missing(x) else 1.0).astype("float64")
    if stat == "rate":
        if pd.api.types.is_bool_dtype(s.dtype):
            return s.astype("float64")
        if pd.api.types.is_numeric_dtype(s.dtype):
            v = pd.to_numeric(s, errors="coerce")
            return (v != 0).astype("float64").where(v.notna())
        falsy = {"false", "0", "no", ""}
        return s.map(lambda x: None if _missing(x) else float(str(x).strip().lower() not in falsy))
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("float64")
    return pd.to_numeric(s, errors="coerce").astype("float64")


def _group_stats(df: pd.DataFrame, rel: Any) -> pd.DataFrame:
    stat = _get(rel, "stat", "mean")
    values = _measure_values(df, _get(rel, "measure"), stat)
    groups = relationship_groups(df, _get(rel, "by"), _get(rel, "bins"))
    frame = pd.DataFrame({"g": groups, "v": values}).dropna()
    agg = "median" if stat == "median" else "mean"
    out = frame.groupby("g", sort=True)["v"].agg([agg, "count", "var"]).rename(columns={agg: "stat"})
    if stat in ("rate", "measured"):
        out["var"] = out["stat"] * (1.0 - out["stat"])
    # standard error of the group statistic (median: asymptotic 1.2533 x that of the mean)
    out["se"] = np.sqrt(out["var"].fillna(0.0) / out["count"].clip(lower=1)) * (1.2533 if stat == "median" else 1.0)
    return out


def _effect(real: pd.DataFrame, synthetic: pd.DataFrame, z: float) -> dict:
    """The clinical effect: the real difference between the real table's highest and lowest group, the
    synthetic difference between the same two groups, and their ratio (effect kept) with a ``z`` interval
    (delta method: var(s/r) ~ (var_s + ratio^2 var_r) / r^2). ``significant``: the real difference exceeds
    ``z`` of its standard errors (otherwise there is no effect to keep, only a shape to check)."""
    hi, lo = real["stat"].idxmax(), real["stat"].idxmin()
    r_eff = float(real.loc[hi, "stat"] - real.loc[lo, "stat"])
    r_se = math.sqrt(float(real.loc[hi, "se"]) ** 2 + float(real.loc[lo, "se"]) ** 2)
    out: dict[str, Any] = {"high_group": str(hi), "low_group": str(lo), "real": r_eff, "real_se": r_se,
                           "significant": bool(r_eff > z * r_se), "synthetic": None, "synthetic_se": None,
                           "ratio": None, "ci_low": None, "ci_high": None}
    if hi in synthetic.index and lo in synthetic.index and synthetic.loc[[hi, lo], "count"].min() > 0:
        s_eff = float(synthetic.loc[hi, "stat"] - synthetic.loc[lo, "stat"])
        s_se = math.sqrt(float(synthetic.loc[hi, "se"]) ** 2 + float(synthetic.loc[lo, "se"]) ** 2)
        out.update(synthetic=s_eff, synthetic_se=s_se)
        if r_eff > 0:
            ratio = s_eff / r_eff
            se = math.sqrt(s_se ** 2 + ratio ** 2 * r_se ** 2) / r_eff
            out.update(ratio=ratio, ci_low=ratio - z * se, ci_high=ratio + z * se)
    return out


def _compare_one(real: pd.DataFrame, synthetic: pd.DataFrame, rel: Any) -> dict:
    name, measure, by = _get(rel, "name"), _get(rel, "measure"), _get(rel, "by")
    stat, tolerance = _get(rel, "stat", "mean"), float(_get(rel, "tolerance"))
    min_rows = int(_get(rel, "min_group_rows", 20) or 1)
    z = float(_get(rel, "noise_z", NOISE_Z))
    out: dict[str, Any] = {"name": name, "measure": measure, "by": by, "stat": stat,
                           "bins": _get(rel, "bins"), "tolerance": tolerance, "noise_z": z, "min_group_rows": min_rows,
                           "groups": [], "suppressed_groups": 0, "max_error": None, "max_excess": None,
                           "worst_group": None, "status": "failed", "passed": False, "note": ""}
    missing = [c for c in (measure, by) if c not in real.columns or c not in synthetic.columns]
    if missing:
        out["note"] = f"column(s) {missing} missing from the real or the synthetic table"
        return out
    r = _group_stats(real, rel)
    s = _group_stats(synthetic, rel)
    keep = r[r["count"] >= min_rows]
    out["suppressed_groups"] = int(len(r) - len(keep))
    if keep.empty:
        out.update(status="skipped", passed=True,
                   note=f"no group has {min_rows}+ real rows with a {measure} value; not compared")
        return out
    errors: list[float] = []
    excess: list[float] = []
    absent: list[str] = []
    for g, row in keep.iterrows():
        srow = s.loc[g] if g in s.index else None
        syn = float(srow["stat"]) if srow is not None and srow["count"] > 0 else None
        diff = None if syn is None else syn - float(row["stat"])
        allowance = None
        if diff is None:
            absent.append(str(g))
        else:
            allowance = z * math.sqrt(float(row["se"]) ** 2 + float(srow["se"]) ** 2)
            errors.append(abs(diff))
            excess.append(max(0.0, abs(diff) - allowance))
        out["groups"].append({"group": str(g), "real": float(row["stat"]), "synthetic": syn, "diff": diff,
                              "noise_allowance": allowance, "real_rows": int(row["count"]),
                              "synthetic_rows": int(srow["count"]) if srow is not None else 0})
    reals = [g["real"] for g in out["groups"]]
    syns = [g["synthetic"] for g in out["groups"] if g["synthetic"] is not None]
    if len(reals) >= 2:
        out["real_spread"] = max(reals) - min(reals)
        if len(syns) == len(reals):
            out["synthetic_spread"] = max(syns) - min(syns)
        out["effect"] = _effect(keep, s, z)
        out["effect_kept"] = out["effect"]["ratio"]
    if absent:
        out["note"] = f"group(s) {absent} absent from the synthetic table"
        return out
    worst = int(np.argmax(excess)) if max(excess) > 0 else int(np.argmax(errors))
    out["max_error"] = float(max(errors))
    out["max_excess"] = float(excess[worst])
    out["worst_group"] = out["groups"][worst]["group"]
    out["passed"] = bool(out["max_excess"] <= tolerance + 1e-12)
    effect = out.get("effect")
    if effect and effect["significant"]:  # a real effect to keep: its ratio's interval must reach the band
        lo, hi = float(_get(rel, "min_effect_kept", 0.8)), float(_get(rel, "max_effect_kept", 1.25))
        kept = effect["ratio"] is not None and effect["ci_high"] >= lo and effect["ci_low"] <= hi
        out["effect_band"] = [lo, hi]
        out["effect_kept_passed"] = bool(kept)
        out["passed"] = bool(out["passed"] and kept)
        if not kept:
            out["note"] = (f"effect kept {effect['ratio']:.2f} [{effect['ci_low']:.2f}, {effect['ci_high']:.2f}] "
                           f"outside [{lo:g}, {hi:g}]" if effect["ratio"] is not None else "no synthetic effect")
    out["status"] = "passed" if out["passed"] else "failed"
    return out


def compare_relationships(real: pd.DataFrame, synthetic: pd.DataFrame, relationships: Sequence[Any]) -> list[dict]:
    """Compare each relationship (a spec ``Relationship`` or a dict with the same keys) real vs synthetic.

    Per group, ``diff`` = synthetic - real statistic and ``noise_allowance`` = ``noise_z`` standard errors of
    that difference (sampling noise of both group statistics: SD/sqrt(n) for a mean, sqrt(p(1-p)/n) for a
    rate, 1.2533 x the mean's for a median). The figure the gate compares with ``tolerance`` is
    ``max_excess`` = the largest ``|diff| - noise_allowance`` (0 when every difference is within noise), so
    small groups are not refused for noise and large ones are held to the tolerance itself.

    Each result: ``name, measure, by, stat, tolerance, noise_z, groups: [{group, real, synthetic, diff,
    noise_allowance, real_rows, synthetic_rows}], max_error (largest |diff|), max_excess, worst_group,
    status ("passed" | "failed" | "skipped"), passed, note`` plus, with two or more groups, ``real_spread`` /
    ``synthetic_spread`` and ``effect``: the real effect (difference between the real highest and lowest
    group), the synthetic difference between the same groups, ``ratio`` (= ``effect_kept``) with its
    ``noise_z`` interval ``ci_low``/``ci_high``, and ``significant`` (the real effect exceeds its noise). ``max_error``/``max_excess`` are ``None`` when a column or a group is missing from the
    synthetic table (the relationship then fails) or when no group has enough real rows (``skipped``: too
    small to compare, and not reported)."""
    results = []
    for rel in relationships:
        res = _compare_one(real, synthetic, rel)
        log.info("relationship %s: status=%s max_error=%s max_excess=%s tolerance=%s groups=%d suppressed=%d",
                 res["name"], res["status"], None if res["max_error"] is None else round(res["max_error"], 4),
                 None if res["max_excess"] is None else round(res["max_excess"], 4), res["tolerance"],
                 len(res["groups"]), res["suppressed_groups"])
        results.append(to_jsonable(res))
    return results

