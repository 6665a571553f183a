"""The real-data reference ("ceiling"): what real data itself scores on every quality figure.

A perfect generator produces rows that look like fresh real rows. So each quality figure of the synthetic
table (synthetic vs real train) has a reference: the same figure for real rows the generator never saw
(a re-split holdout of the same size) vs real train rows. The prepare stage computes it over ``resplits``
random re-splits of the real table, so every figure comes with its mean and its spread (sampling noise).

The gate then judges a synthetic figure relative to that reference (:func:`relative_threshold`): it fails
only when the figure is below ``fraction`` of the reference mean by more than ``noise_z`` standard deviations
of the reference, so a threshold can never sit on real data's own noise floor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from synthfactory.quality.expectations import to_jsonable
from synthfactory.quality.fidelity import compare_relationships
from synthfactory.quality.report import sdmetrics_quality

__all__ = ["eligible_columns", "matched_figures", "real_reference", "relative_threshold", "summarise",
           "worst_column"]

log = logging.getLogger(__name__)


def summarise(values: Sequence[float | None]) -> dict | None:
    """``{mean, sd, p05, p50, p95, min, max, n}`` of the finite values (None when there are none): how a
    real-data reference figure is reported, for quality and privacy alike."""
    xs = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype="float64")
    if xs.size == 0:
        return None
    return {"mean": float(xs.mean()), "sd": float(xs.std(ddof=1)) if xs.size > 1 else 0.0,
            "p05": float(np.quantile(xs, 0.05)), "p50": float(np.median(xs)), "p95": float(np.quantile(xs, 0.95)),
            "min": float(xs.min()), "max": float(xs.max()), "n": int(xs.size)}


def relative_threshold(reference: Mapping[str, Any] | None, fraction: float, noise_z: float) -> float | None:
    """``fraction x mean - noise_z x sd`` of a reference summary (None without a reference)."""
    if not reference or reference.get("mean") is None:
        return None
    return float(fraction) * float(reference["mean"]) - float(noise_z) * float(reference.get("sd") or 0.0)


def eligible_columns(real: pd.DataFrame, min_values: int) -> list[str]:
    """Columns with at least ``min_values`` non-missing real values: the only ones the worst-column check
    covers (a column with a handful of values scores at random, for real data too)."""
    counts = real.notna().sum()
    return [str(c) for c, n in counts.items() if int(n) >= int(min_values)]


def worst_column(columns: Sequence[Mapping[str, Any]],
                 eligible: set[str] | Sequence[str]) -> tuple[float | None, str | None]:
    """The lowest Column Shapes score among the ``eligible`` columns, and its column (None, None: none)."""
    eligible = set(eligible)
    scored = [c for c in columns if c.get("score") is not None and c.get("column") in eligible]
    if not scored:
        return None, None
    worst = min(scored, key=lambda c: c["score"])
    return float(worst["score"]), str(worst["column"])


def _scores(real: pd.DataFrame, other: pd.DataFrame, metadata: Mapping[str, Any], eligible: set[str],
            figures: dict[str, list], per_column: dict[str, list]) -> None:
    """Score ``other`` against ``real`` and append every figure to ``figures``/``per_column``."""
    sdm = sdmetrics_quality(real, other, metadata)
    figures["quality_score"].append(sdm.get("score"))
    figures["column_shapes"].append(sdm["properties"].get("Column Shapes"))
    figures["column_pair_trends"].append(sdm["properties"].get("Column Pair Trends"))
    for col in sdm.get("columns", []):
        per_column.setdefault(col["column"], []).append(col.get("score"))
    worst, _ = worst_column(sdm.get("columns", []), eligible)
    figures["min_column_score"].append(worst)


def _new_figures() -> dict[str, list]:
    return {"quality_score": [], "column_shapes": [], "column_pair_trends": [], "min_column_score": []}


def real_reference(
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    *,
    metadata: Mapping[str, Any],
    relationships: Sequence[Any] = (),
    resplits: int = 10,
    min_values: int = 50,
    seed: int = 0,
) -> dict:
    """Quality figures of real held-out rows vs real train rows over ``resplits`` re-splits.

    The real rows (``train`` + ``holdout``, key columns already dropped) are shuffled ``resplits`` times
    into a train part of ``len(train)`` rows and a holdout part of ``len(holdout)`` rows; each time the
    holdout part is scored against the train part exactly as the synthetic table will be (SDMetrics
    quality, Column Shapes and Column Pair Trends, every column's shape score, the worst eligible column,
    each relationship's effect kept). Returns per figure ``{mean, sd, p05, p50, min, n}`` plus ``columns``
    (per-column reference), ``eligible_columns`` (``min_values`` real values or more) and
    ``relationships`` (per relationship: the effect kept by real held-out rows).
    """
    real = pd.concat([train, holdout], ignore_index=True)
    n_train, n_hold = len(train), len(holdout)
    eligible = set(eligible_columns(train, min_values))
    rng = np.random.default_rng(seed)
    figures, per_column = _new_figures(), {}
    effects: dict[str, list] = {}
    rounds = max(1, int(resplits))
    for _ in range(rounds):
        idx = rng.permutation(len(real))
        a = real.iloc[np.sort(idx[:n_train])].reset_index(drop=True)
        b = real.iloc[np.sort(idx[n_train:n_train + n_hold])].reset_index(drop=True)
        _scores(a, b, metadata, eligible, figures, per_column)
        for rel in compare_relationships(a, b, relationships) if relationships else []:
            effects.setdefault(rel["name"], []).append(rel.get("effect_kept"))
    out: dict[str, Any] = {name: summarise(vals) for name, vals in figures.items()}
    out.update({
        "resplits": rounds, "rows_train": n_train, "rows_holdout": n_hold,
        "min_values": int(min_values), "eligible_columns": sorted(eligible),
        "columns": {c: summarise(v) for c, v in per_column.items()},
        "relationships": {name: {"effect_kept": summarise(v)} for name, v in effects.items()},
    })
    log.info("real-data reference over %d re-splits: quality %s, pair trends %s, worst eligible column %s",
             out["resplits"], _fmt(out["quality_score"]), _fmt(out["column_pair_trends"]),
             _fmt(out["min_column_score"]))
    return to_jsonable(out)


def matched_figures(
    train: pd.DataFrame,
    synthetic: pd.DataFrame,
    *,
    metadata: Mapping[str, Any],
    rows: int,
    eligible: Sequence[str],
    repeats: int = 4,
    seed: int = 0,
) -> dict:
    """The synthetic table's figures at the reference's row count: ``repeats`` seeded subsamples of
    ``rows`` synthetic rows, each scored against the real train rows as the reference's held-out parts
    were. SDMetrics scores grow with the row count (less sampling noise), so only figures at equal row
    counts compare with the reference. Returns per figure ``{mean, sd, ...}`` and ``columns``."""
    rng = np.random.default_rng(seed + 7919)
    figures, per_column = _new_figures(), {}
    n = min(int(rows), len(synthetic))
    for _ in range(max(1, int(repeats))):
        idx = np.sort(rng.choice(len(synthetic), size=n, replace=False))
        _scores(train, synthetic.iloc[idx].reset_index(drop=True), metadata, set(eligible), figures, per_column)
    out: dict[str, Any] = {name: summarise(vals) for name, vals in figures.items()}
    out.update({"rows": n, "repeats": max(1, int(repeats)),
                "columns": {c: summarise(v) for c, v in per_column.items()}})
    return to_jsonable(out)


def matched_expectations(suite: Mapping[str, Any], synthetic: pd.DataFrame, *, rows: int, repeats: int,
                         seed: int) -> dict | None:
    """The suite's success share on ``repeats`` seeded subsets of ``rows`` synthetic rows (summarised), as
    :func:`matched_figures` does for the SDMetrics figures: a range or quantile expectation fails more often on
    more rows. None when the synthetic table is not larger than ``rows`` (its whole share is the matched one)."""
    from synthfactory.quality.expectations import run_suite

    if rows < 1 or len(synthetic) <= rows:
        return None
    rng = np.random.default_rng(seed + 104729)
    shares = []
    for _ in range(max(1, int(repeats))):
        idx = np.sort(rng.choice(len(synthetic), size=rows, replace=False))
        shares.append(float(run_suite(suite, synthetic.iloc[idx].reset_index(drop=True))["success_ratio"]))
    out = summarise(shares)
    return {**out, "rows": int(rows), "repeats": len(shares)} if out else None


def _fmt(summary: Mapping[str, Any] | None) -> str:
    if not summary:
        return "n/a"
    return f"{summary['mean']:.3f} ± {summary['sd']:.3f}"
