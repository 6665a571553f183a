"""SDMetrics quality report and the combined quality evaluation.

``sdmetrics_quality`` runs SDMetrics' single-table ``QualityReport`` (Column Shapes and Column
Pair Trends); ``evaluate_quality`` combines it with the GX suite run from
:mod:`synthfactory.quality.expectations`.  SDMetrics is imported lazily; never imports Airflow.
Only counts and scores are logged, never table values.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from synthfactory.quality.expectations import run_suite, to_jsonable

__all__ = ["evaluate_quality", "infer_sdtypes", "sdmetrics_quality"]

log = logging.getLogger(__name__)

#: SDMetrics sdtypes that the Column Shapes / Column Pair Trends properties score.
SCORED_SDTYPES = frozenset({"numerical", "datetime", "categorical", "ordinal", "boolean"})
PROPERTIES = ("Column Shapes", "Column Pair Trends")
N_WORST = 5


def _float_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# --------------------------------------------------------------------------- metadata


def infer_sdtypes(df: pd.DataFrame, exclude: Sequence[str] = ()) -> dict:
    """Single-table SDV/SDMetrics metadata ``{"columns": {col: {"sdtype": ...}}}`` from dtypes.

    bool -> boolean; other numbers -> numerical; datetimes -> datetime; object/string/category
    columns -> boolean when every value is a bool, ``id`` when every non-null value is distinct
    (free text / identifiers are not scored), otherwise categorical.  ``exclude`` is dropped.
    """
    excluded = set(exclude)
    columns: dict[str, dict[str, str]] = {}
    for col in df.columns:
        if col in excluded:
            continue
        s = df[col]
        if pd.api.types.is_bool_dtype(s.dtype):
            sdtype = "boolean"
        elif pd.api.types.is_numeric_dtype(s.dtype):
            sdtype = "numerical"
        elif pd.api.types.is_datetime64_any_dtype(s.dtype):
            sdtype = "datetime"
        else:
            non_null = s.dropna()
            if len(non_null) and pd.api.types.infer_dtype(non_null, skipna=True) == "boolean":
                sdtype = "boolean"
            elif len(non_null) > 20 and non_null.nunique() == len(non_null):
                sdtype = "id"
            else:
                sdtype = "categorical"
        columns[str(col)] = {"sdtype": sdtype}
    return {"columns": columns}


def _single_table_metadata(metadata: Mapping[str, Any], columns: Sequence[str]) -> dict:
    """Accept single-table metadata or an SDV multi-table dict ``{"tables": {...}}`` (the table
    sharing most columns with the data is taken)."""
    if not isinstance(metadata, Mapping):
        raise TypeError("metadata must be a dict (use SDV Metadata.to_dict())")
    if "tables" in metadata:
        tables = metadata["tables"] or {}
        if not tables:
            raise ValueError("metadata contains no tables")
        wanted = set(columns)
        _, table = max(
            tables.items(), key=lambda kv: len(wanted & set((kv[1] or {}).get("columns", {})))
        )
        metadata = table
    if "columns" not in metadata:
        raise ValueError("single-table metadata needs a 'columns' mapping")
    return dict(metadata)


def _align(real: pd.DataFrame, synthetic: pd.DataFrame, metadata: Mapping[str, Any]):
    """Restrict data and metadata to the columns both tables share.  Columns missing from the
    metadata get an inferred sdtype.  Returns (real, synthetic, metadata, missing, extra)."""
    md = _single_table_metadata(metadata, list(real.columns))
    md_cols = dict(md.get("columns") or {})
    common = [c for c in real.columns if c in synthetic.columns]
    missing = [str(c) for c in real.columns if c not in synthetic.columns]
    extra = [str(c) for c in synthetic.columns if c not in real.columns]
    inferred = infer_sdtypes(real[[c for c in common if c not in md_cols]])["columns"]
    columns = {str(c): dict(md_cols.get(c) or inferred[str(c)]) for c in common}
    out = {"columns": columns}
    pk = md.get("primary_key")
    if isinstance(pk, str) and pk in columns:
        out["primary_key"] = pk
    if md.get("METADATA_SPEC_VERSION"):
        out["METADATA_SPEC_VERSION"] = md["METADATA_SPEC_VERSION"]
    return real[common].copy(), synthetic[common].copy(), out, missing, extra


# --------------------------------------------------------------------------- sdmetrics


def _quality_report_class():
    # sdmetrics 0.32 marks the single-table report deprecated (FutureWarning on import) in
    # favour of sdmetrics.reports.QualityReport; it is still the documented single-table API.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from sdmetrics.reports.single_table import QualityReport
    return QualityReport


def sdmetrics_quality(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    metadata: Mapping,
    *,
    real_correlation_threshold: float | None = None,
    real_association_threshold: float | None = None,
) -> dict:
    """SDMetrics single-table QualityReport of ``synthetic`` against ``real``.

    ``metadata`` is single-table SDV metadata (``{"columns": {...}}``) or an SDV multi-table
    dict (``{"tables": {...}}``, the matching table is used).  The two thresholds override
    SDMetrics' defaults (0.5 / 0.3): only column pairs whose real correlation / association
    reaches them count towards Column Pair Trends, which is ``None`` when no pair does.

    Returns ``{"score", "properties": {"Column Shapes", "Column Pair Trends"},
    "worst_columns": [{"column", "metric", "score"}] (5 lowest Column Shapes scores),
    "missing_columns", "extra_columns", "column_errors"}``.  Only columns present in both tables
    are scored (missing/extra ones are listed).  A score that cannot be computed is ``None``.
    """
    real_c, synth_c, md, missing, extra = _align(real, synthetic, metadata)
    n_scored = sum(1 for m in md["columns"].values() if m.get("sdtype") in SCORED_SDTYPES)
    result: dict[str, Any] = {
        "score": None,
        "properties": {p: None for p in PROPERTIES},
        "worst_columns": [],
        "missing_columns": missing,
        "extra_columns": extra,
        "column_errors": [],
        "n_columns_scored": int(n_scored),
    }
    if n_scored == 0 or real_c.empty or synth_c.empty:
        log.warning("sdmetrics: nothing to score (%d scorable columns)", n_scored)
        return result

    report = _quality_report_class()()
    if real_correlation_threshold is not None:
        report.real_correlation_threshold = float(real_correlation_threshold)
    if real_association_threshold is not None:
        report.real_association_threshold = float(real_association_threshold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        report.generate(real_c, synth_c, md, verbose=False)

    result["score"] = _float_or_none(report.get_score())
    props = report.get_properties()
    for name, score in zip(props["Property"], props["Score"]):
        result["properties"][str(name)] = _float_or_none(score)

    shapes = report.get_details("Column Shapes")
    rows = []
    for rec in shapes.to_dict("records"):
        score = _float_or_none(rec.get("Score"))
        rows.append({"column": str(rec.get("Column")), "metric": str(rec.get("Metric")),
                     "score": score})  # fmt: skip
        err = rec.get("Error")
        if isinstance(err, str) and err:
            result["column_errors"].append(
                {"column": str(rec.get("Column")), "property": "Column Shapes", "error": err[:300]}
            )
    # unscorable (None) first: they are the most suspicious
    rows.sort(key=lambda r: (r["score"] is not None, r["score"] if r["score"] is not None else 0.0))
    result["worst_columns"] = rows[:N_WORST]
    log.info(
        "sdmetrics quality: score=%s shapes=%s pairs=%s over %d columns (%d missing, %d errors)",
        result["score"], result["properties"]["Column Shapes"],
        result["properties"]["Column Pair Trends"], n_scored, len(missing),
        len(result["column_errors"]),
    )  # fmt: skip
    return to_jsonable(result)


# --------------------------------------------------------------------------- combined


def evaluate_quality(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    *,
    suite: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    exclude: Sequence[str] = (),
) -> dict:
    """Run the GX suite on ``synthetic`` and the SDMetrics report of ``synthetic`` vs ``real``
    (``exclude`` columns dropped from both first).

    Returns ``{"expectations": run_suite(...), "sdmetrics": sdmetrics_quality(...),
    "quality_score": float, "expectation_success_ratio": float}``; ``quality_score`` is the
    SDMetrics overall score (0.0 when it could not be computed).
    """
    excluded = set(exclude)
    real_x = real[[c for c in real.columns if c not in excluded]]
    synth_x = synthetic[[c for c in synthetic.columns if c not in excluded]]

    expectations = run_suite(suite, synth_x)
    md = metadata if metadata is not None else infer_sdtypes(real_x)
    sdm = sdmetrics_quality(real_x, synth_x, md)
    score = sdm.get("score")
    out = {
        "expectations": expectations,
        "sdmetrics": sdm,
        "quality_score": float(score) if score is not None else 0.0,
        "expectation_success_ratio": float(expectations["success_ratio"]),
    }
    log.info(
        "quality: score=%.4f expectations %d/%d passed",
        out["quality_score"], expectations["successful"], expectations["evaluated"],
    )  # fmt: skip
    return out
