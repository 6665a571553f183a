"""Spec constraints -> SDV 2.0 constraint objects, and the batch-level ``bounds`` fix.

``inequality``/``range``/``fixed_combinations`` become :mod:`sdv.cag` ``Inequality``/``Range``/
``FixedCombinations`` added to the synthesizer before fitting (SDV transforms the data so that every sampled
row satisfies them). A constraint the real training data itself breaks is refused with a message naming it
(SDV would otherwise fail deep inside ``fit``). ``bounds`` has no SDV class for constant limits, so it runs on
every sampled batch: ``reject`` redraws the offending rows, ``clip`` moves them to the bound; the counts go
into the synthesis report.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import pandas as pd
from synthfactory.errors import ConfigError

log = logging.getLogger(__name__)


class ConstraintError(ConfigError, ValueError):
    """A spec constraint names an unknown column or is broken by the real data."""


def _check_columns(spec: Any, df: pd.DataFrame, cols: list[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ConstraintError(f"synthesizer.constraints ({spec.type} on {spec.table}): unknown column(s) {missing}; "
                              f"columns: {sorted(df.columns)[:40]}")


def sdv_constraints(specs: list[Any], df: pd.DataFrame, table: str) -> list:
    """SDV constraint objects for the specs that apply to ``table`` (bounds excluded)."""
    from sdv.cag import FixedCombinations, Inequality, Range

    out = []
    for c in specs:
        if c.table != table or c.type == "bounds":
            continue
        if c.type == "inequality":
            _check_columns(c, df, [c.low, c.high])
            pair = df[[c.low, c.high]].dropna()
            bad = (pair[c.high] <= pair[c.low]) if c.strict else (pair[c.high] < pair[c.low])
            if bad.any():
                raise ConstraintError(f"synthesizer.constraints: inequality {c.low} <= {c.high} on {table} is broken "
                                      f"by {int(bad.sum())} real row(s)")
            out.append(Inequality(c.low, c.high, strict_boundaries=c.strict))
        elif c.type == "range":
            _check_columns(c, df, [c.low, c.middle, c.high])
            t = df[[c.low, c.middle, c.high]].dropna()
            bad = ~((t[c.low] <= t[c.middle]) & (t[c.middle] <= t[c.high]))
            if bad.any():
                raise ConstraintError(f"synthesizer.constraints: range {c.low} <= {c.middle} <= {c.high} on {table} "
                                      f"is broken by {int(bad.sum())} real row(s)")
            out.append(Range(c.low, c.middle, c.high, strict_boundaries=c.strict))
        elif c.type == "fixed_combinations":
            _check_columns(c, df, list(c.columns))
            out.append(FixedCombinations(list(c.columns)))
    return out


def bounds_for(specs: list[Any], table: str) -> list[Any]:
    return [c for c in specs if c.type == "bounds" and c.table == table]


def apply_bounds(df: pd.DataFrame, bounds: list[Any], counts: dict[str, int]) -> tuple[pd.DataFrame, pd.Series]:
    """Clip (counted) and return ``(df, rejected_mask)`` for the reject-type bounds."""
    rejected = pd.Series(False, index=df.index)
    for b in bounds:
        if b.column not in df:
            raise ConstraintError(f"synthesizer.constraints: bounds on unknown column {b.column!r}")
        s = pd.to_numeric(df[b.column], errors="coerce")
        low = s < b.min if b.min is not None else pd.Series(False, index=df.index)
        high = s > b.max if b.max is not None else pd.Series(False, index=df.index)
        out = (low | high).fillna(False)
        key = f"bounds_{b.column}_{b.action}"
        counts[key] = counts.get(key, 0) + int(out.sum())
        if b.action == "clip":
            df[b.column] = s.clip(lower=b.min, upper=b.max).astype(df[b.column].dtype, errors="ignore")
        else:
            rejected |= out
    return df, rejected


def bounded_sampler(base: Callable[[Any, int], pd.DataFrame], bounds: list[Any], counts: dict[str, int],
                    max_rounds: int = 20) -> Callable[[Any, int], pd.DataFrame]:
    """Wrap a ``sampler(synth, n)`` so every returned row satisfies ``bounds`` (reject: redraw, clip: clip)."""
    if not bounds:
        return base

    def sampler(synth: Any, n: int) -> pd.DataFrame:
        kept: list[pd.DataFrame] = []
        have = 0
        for _ in range(max_rounds):
            df, rejected = apply_bounds(base(synth, n - have).reset_index(drop=True), bounds, counts)
            df = df[~rejected]
            kept.append(df)
            have += len(df)
            if have >= n:
                break
        if have < n:
            raise ConstraintError(f"synthesizer.constraints: bounds reject almost every sampled row ({have} of {n} "
                                  f"kept after {max_rounds} rounds); widen them or use action: clip")
        return pd.concat(kept, ignore_index=True).iloc[:n]

    return sampler
