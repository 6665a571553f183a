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
    result["columns"] = rows
    result["pairs"] = _pair_rows(report.get_details("Column Pair Trends"))
    log.info(
        "sdmetrics quality: score=%s shapes=%s pairs=%s over %d columns (%d missing, %d errors)",
        result["score"], result["properties"]["Column Shapes"],
        result["properties"]["Column Pair Trends"], n_scored, len(missing),
        len(result["column_errors"]),
    )  # fmt: skip
    return to_jsonable(result)


def _pair_rows(details: pd.DataFrame) -> list[dict]:
    """Column Pair Trends details as plain rows: per pair the metric (CorrelationSimilarity for two
    continuous columns, ContingencySimilarity otherwise), its score and, for correlations, the real
    and synthetic coefficients."""
    out = []
    for rec in details.to_dict("records"):
        meets = rec.get("Meets Threshold?")
        out.append({
            "column_1": str(rec.get("Column 1")),
            "column_2": str(rec.get("Column 2")),
            "metric": str(rec.get("Metric")),
            "score": _float_or_none(rec.get("Score")),
            "real_correlation": _float_or_none(rec.get("Real Correlation")),
            "synthetic_correlation": _float_or_none(rec.get("Synthetic Correlation")),
            "real_association": _float_or_none(rec.get("Real Association")),
            "meets_threshold": None if meets is None or meets is pd.NA else bool(meets),
        })  # fmt: skip
    return out


# --------------------------------------------------------------------------- combined


def evaluate_quality(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    *,
    suite: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    exclude: Sequence[str] = (),
    keys: Sequence[str] = (),
    holdout: pd.DataFrame | None = None,
    relationships: Sequence[Any] = (),
    utility: Any = None,
    seed: int = 0,
    data_docs_dir: str | None = None,
) -> dict:
    """Run the GX suite on ``synthetic`` and compare ``synthetic`` with ``real`` (``exclude`` columns
    dropped from both first; ``keys`` columns of the synthetic table are validated by the suite, e.g.
    key uniqueness, but take no part in the comparisons).

    Returns ``{"expectations": run_suite(...), "sdmetrics": sdmetrics_quality(...),
    "quality_score": float, "expectation_success_ratio": float, "fidelity": {...},
    "relationships": [...], "utility": {...} | None}``.  ``quality_score`` is the SDMetrics overall
    score (0.0 when it could not be computed); ``fidelity`` holds the Column Shapes / Column Pair
    Trends property scores, the worst column and the correlation matrices; ``relationships`` the spec's
    clinical relationships (:func:`synthfactory.quality.fidelity.compare_relationships`); ``utility``
    TSTR vs TRTR on the real ``holdout`` (:func:`synthfactory.quality.utility.ml_utility`), when
    ``utility`` (a spec ``UtilitySpec`` or a dict with ``target``) and ``holdout`` are given.
    """
    from synthfactory.quality.fidelity import compare_relationships, correlation_matrices

    excluded = set(exclude)
    key_cols = [k for k in keys if k in synthetic.columns]
    real_x = real[[c for c in real.columns if c not in excluded and c not in key_cols]]
    synth_suite = synthetic[[c for c in synthetic.columns if c not in excluded]]
    synth_x = synth_suite[[c for c in synth_suite.columns if c not in key_cols]]

    # The utility models (scikit-learn, GIL released in its loops) train in a worker thread while GX and
    # SDMetrics (mostly Python) run here: the two overlap on a multi-core worker.
    util_future = None
    pool = None
    if utility is not None and holdout is not None:
        from concurrent.futures import ThreadPoolExecutor

        from synthfactory.quality.utility import ml_utility

        get = (lambda k, d=None: utility.get(k, d)) if isinstance(utility, Mapping) else \
            (lambda k, d=None: getattr(utility, k, d))
        hold_x = holdout[[c for c in holdout.columns if c in real_x.columns]]
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthfactory-utility")
        util_future = pool.submit(ml_utility, real_x, hold_x, synth_x, target=get("target"),
                                  features=list(get("features") or ()),
                                  max_train_rows=int(get("max_train_rows", 25_000)),
                                  min_class_rows=int(get("min_class_rows", 10)), seed=seed,
                                  leak_auc=get("leak_auc", 0.98),
                                  keep_leaking_features=get("keep_leaking_features") is not False)
    try:
        expectations = run_suite(suite, synth_suite, data_docs_dir=data_docs_dir)
        md = metadata if metadata is not None else infer_sdtypes(real_x)
        sdm = sdmetrics_quality(real_x, synth_x, md)
        scored = [c for c in sdm.get("columns", []) if c.get("score") is not None]
        worst = min(scored, key=lambda c: c["score"]) if scored else None
        fidelity = {
            "column_shapes": sdm["properties"].get("Column Shapes"),
            "column_pair_trends": sdm["properties"].get("Column Pair Trends"),
            "min_column_score": worst["score"] if worst else None,
            "worst_column": worst["column"] if worst else None,
            "correlation": correlation_matrices(real_x, synth_x),
        }
        rels = compare_relationships(real_x, synth_x, relationships) if relationships else []
        util = util_future.result() if util_future is not None else None
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    score = sdm.get("score")
    out = {
        "expectations": expectations,
        "sdmetrics": sdm,
        "quality_score": float(score) if score is not None else 0.0,
        "expectation_success_ratio": float(expectations["success_ratio"]),
        "fidelity": fidelity,
        "relationships": rels,
        "utility": util,
    }
    log.info(
        "quality: score=%.4f expectations %d/%d passed, worst column %s, relationships %d/%d passed",
        out["quality_score"], expectations["successful"], expectations["evaluated"],
        fidelity["min_column_score"], sum(1 for r in rels if r["passed"]), len(rels),
    )  # fmt: skip
    return to_jsonable(out)
