"""Great Expectations (GX 1.x) checks derived from the real modelling table.

``derive_suite`` profiles a real table into a plain, JSON-able GX ``ExpectationSuite`` dict
(the caller stores it in staging); ``run_suite`` validates any DataFrame against such a dict
in a throw-away ephemeral GX context and returns a small JSON-able summary.

GX is imported lazily inside the functions (it is heavy); this module never imports Airflow.
Only counts and scores are logged, never table values.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "add_expectations",
    "date_order_expectation",
    "derive_suite",
    "key_expectations",
    "referential_integrity_expectation",
    "run_suite",
    "to_jsonable",
]

log = logging.getLogger(__name__)

#: Non-numeric columns with at most this many distinct real values get a value-set check.
DEFAULT_MAX_CATEGORIES = 50
#: How many unexpected values a failure summary keeps.
PARTIAL_UNEXPECTED = 5
#: Quantiles a derived suite checks on numeric columns (GX pandas computes them with "nearest").
DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)

# Type names that GX 1.24's pandas type check resolves (np.dtype(name), pandas extension dtype
# classes such as ``Int64Dtype``, or native python names such as ``str``).  See
# great_expectations/expectations/core/expect_column_values_to_be_in_type_list.py.
_INT_TYPES = [
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8",
    "Int64Dtype", "Int32Dtype", "Int16Dtype", "Int8Dtype",
    "UInt64Dtype", "UInt32Dtype", "UInt16Dtype", "UInt8Dtype",
]  # fmt: skip
_FLOAT_TYPES = ["float64", "float32", "float16", "Float64Dtype", "Float32Dtype"]
_BOOL_TYPES = ["bool", "BooleanDtype"]
_DATETIME_TYPES = ["datetime64[ns]", "datetime64[us]", "datetime64[ms]", "datetime64[s]"]
_TIMEDELTA_TYPES = ["timedelta64[ns]", "timedelta64[us]", "timedelta64[ms]", "timedelta64[s]"]
# python value types GX can check inside object columns (native_type_type_map)
_NATIVE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", bytes: "bytes",
                 list: "list", dict: "dict"}  # fmt: skip


# --------------------------------------------------------------------------- helpers


def to_jsonable(value: Any) -> Any:
    """Recursively convert numpy / pandas / datetime values into plain JSON-able python."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset, np.ndarray, pd.Index, pd.Series)):
        return [to_jsonable(v) for v in list(value)]
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, (pd.Timestamp, _dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (pd.Timedelta, _dt.timedelta, np.timedelta64)):
        return str(pd.Timedelta(value))
    if isinstance(value, np.datetime64):
        return pd.Timestamp(value).isoformat()
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def _normalise_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Make string storage uniform: pandas ``string``/``str`` and ``category`` columns become
    ``object`` columns (GX cannot name those extension dtypes in a type list; the values are
    then checked one by one as python ``str``).  Returns ``df`` itself when nothing changes."""
    to_convert = [
        c for c in df.columns
        if isinstance(df[c].dtype, (pd.StringDtype, pd.CategoricalDtype))
    ]  # fmt: skip
    if not to_convert:
        return df
    out = df.copy()
    for c in to_convert:
        out[c] = out[c].astype(object).where(out[c].notna(), None)
    return out


def _is_bool(s: pd.Series) -> bool:
    return pd.api.types.is_bool_dtype(s.dtype)


def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s.dtype) and not _is_bool(s)


def _is_datetime(s: pd.Series) -> bool:
    return pd.api.types.is_datetime64_any_dtype(s.dtype)


def _object_type_list(values: pd.Series) -> list[str] | None:
    """Type list for an object column from the python types of its non-null values, or None
    when some value type cannot be named in a GX type list (then no type check is made)."""
    names: set[str] = set()
    for t in {type(v) for v in values}:
        name = next((n for base, n in _NATIVE_NAMES.items() if issubclass(t, base)), None)
        if name is None:
            return None
        names.add(name)
    if "str" in names:
        names.add("string")  # readable alias; harmless for GX
    return ["object", *sorted(names)]


def _type_list(s: pd.Series, non_null: pd.Series) -> list[str] | None:
    dtype = s.dtype
    if _is_bool(s):
        return list(_BOOL_TYPES)
    if pd.api.types.is_integer_dtype(dtype):
        return list(_INT_TYPES)
    if pd.api.types.is_float_dtype(dtype):
        return list(_FLOAT_TYPES)
    if isinstance(dtype, pd.DatetimeTZDtype):
        return None  # GX 1.24 cannot express tz-aware dtypes in a type list
    if _is_datetime(s):
        return list(_DATETIME_TYPES)
    if pd.api.types.is_timedelta64_dtype(dtype):
        return list(_TIMEDELTA_TYPES)
    if dtype == object:
        return _object_type_list(non_null)
    return None


def _bounds(non_null: pd.Series, tolerance: float) -> tuple[Any, Any] | None:
    lo, hi = non_null.min(), non_null.max()
    if _is_datetime(non_null):
        lo, hi = pd.Timestamp(lo), pd.Timestamp(hi)
        pad = (hi - lo) * float(tolerance)
        return (lo - pad).to_pydatetime(), (hi + pad).to_pydatetime()
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    pad = (hi - lo) * float(tolerance)
    lo, hi = lo - pad, hi + pad
    if pd.api.types.is_integer_dtype(non_null.dtype):
        return int(math.floor(lo)), int(math.ceil(hi))
    return lo, hi


def _quantile_ranges(non_null: pd.Series, quantiles: Sequence[float], tolerance: float) -> dict | None:
    """Real quantiles (interpolation "nearest", as GX computes them on pandas) each widened by
    ``tolerance`` x the real 10-90 % spread (the full range when that is 0); integer columns move by at
    least 1, since their quantiles step by whole units."""
    values = non_null.astype("float64")
    if not len(values) or not np.isfinite(values).all():
        return None
    qs = [float(q) for q in quantiles]
    real_q = values.quantile(qs, interpolation="nearest").to_numpy()
    spread = float(values.quantile(0.9) - values.quantile(0.1)) or float(values.max() - values.min())
    pad = float(tolerance) * spread
    if pd.api.types.is_integer_dtype(non_null.dtype):
        pad = max(pad, 1.0)
    ranges = [[float(q - pad), float(q + pad)] for q in real_q]
    return {"quantiles": qs, "value_ranges": ranges}


def _value_set(non_null: pd.Series) -> list[Any]:
    values = [to_jsonable(v) for v in pd.unique(non_null)]
    return sorted(values, key=lambda v: (type(v).__name__, str(v)))


# --------------------------------------------------------------------------- derive


def derive_suite(
    real: pd.DataFrame,
    *,
    name: str,
    exclude: Sequence[str] = (),
    range_tolerance: float = 0.0,
    null_tolerance: float = 0.05,
    max_categories: int = DEFAULT_MAX_CATEGORIES,
    quantile_tolerance: float | None = 0.1,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    key_columns: Sequence[str] = (),
) -> dict:
    """Profile ``real`` into a GX 1.x ExpectationSuite and return ``suite.to_json_dict()``.

    Expectations: the exact column set; per column a dtype check, a min/max range (numeric and
    datetime, widened by ``range_tolerance`` x range), quantiles of numeric columns (each within
    ``quantile_tolerance`` x the real 10-90 % spread, integer columns at least +-1; ``None`` = no
    quantile checks), a value set (bool columns and non-numeric columns with at most
    ``max_categories`` distinct values) and a not-null check with
    ``mostly = max(0, 1 - real_null_rate - null_tolerance)`` (skipped for all-null columns).

    ``key_columns`` are keys the validated (synthetic) table carries but the real one does not
    (e.g. ``synthetic_id``): they join the column set and must be unique and never null.
    """
    _quiet_gx_env()
    import great_expectations as gx
    from great_expectations.core import ExpectationSuite

    if not name:
        raise ValueError("derive_suite needs a non-empty suite name")
    if range_tolerance < 0 or null_tolerance < 0 or (quantile_tolerance or 0) < 0:
        raise ValueError("range_tolerance, quantile_tolerance and null_tolerance must be >= 0")
    excluded = set(exclude)
    keys = [str(k) for k in key_columns]
    df = _normalise_frame(real[[c for c in real.columns if c not in excluded and c not in keys]])
    columns = [str(c) for c in df.columns]
    if len(set(columns)) != len(columns):
        raise ValueError("derive_suite needs unique column names")

    E = gx.expectations
    exps: list[Any] = [E.ExpectTableColumnsToMatchSet(column_set=[*keys, *columns], exact_match=True)]
    for key in keys:
        exps += [E.ExpectColumnValuesToBeUnique(column=key), E.ExpectColumnValuesToNotBeNull(column=key)]
    skipped_types = 0
    for col in columns:
        s = df[col]
        non_null = s.dropna()
        type_list = _type_list(s, non_null)
        if type_list is not None:
            exps.append(E.ExpectColumnValuesToBeInTypeList(column=col, type_list=type_list))
        else:
            skipped_types += 1
        if non_null.empty:
            continue  # all null: nothing to learn about range, set or null rate
        if _is_numeric(s) or _is_datetime(s):
            bounds = _bounds(non_null, range_tolerance)
            if bounds is not None:
                exps.append(
                    E.ExpectColumnValuesToBeBetween(
                        column=col, min_value=bounds[0], max_value=bounds[1]
                    )
                )
            if quantile_tolerance is not None and _is_numeric(s):
                qr = _quantile_ranges(non_null, quantiles, quantile_tolerance)
                if qr is not None:
                    exps.append(E.ExpectColumnQuantileValuesToBeBetween(column=col, quantile_ranges=qr))
        elif _is_bool(s) or non_null.nunique() <= max_categories:
            exps.append(E.ExpectColumnValuesToBeInSet(column=col, value_set=_value_set(non_null)))
        null_rate = 1.0 - len(non_null) / len(s)
        mostly = max(0.0, 1.0 - null_rate - float(null_tolerance))
        mostly = math.floor(mostly * 1e6) / 1e6  # avoid float noise just above the real rate
        exps.append(E.ExpectColumnValuesToNotBeNull(column=col, mostly=mostly))

    suite = ExpectationSuite(
        name=name,
        expectations=exps,
        meta={
            "synthfactory": {
                "n_rows": int(len(df)),
                "excluded": sorted(str(c) for c in excluded),
                "range_tolerance": float(range_tolerance),
                "null_tolerance": float(null_tolerance),
                "quantile_tolerance": None if quantile_tolerance is None else float(quantile_tolerance),
                "key_columns": keys,
            }
        },
    )
    log.info(
        "derived suite %r: %d expectations over %d columns (%d without a type check)",
        name, len(exps), len(columns), skipped_types,
    )  # fmt: skip
    return suite.to_json_dict()


# --------------------------------------------------------------------------- builders
#
# Generic expectations for keys and for multi-table outputs (child rows must point at parent rows;
# dates must be ordered). Each returns a plain JSON expectation config that ``add_expectations``
# appends to a suite dict; ``run_suite`` then validates the table that carries the columns.


def _config(expectation: Any) -> dict:
    cfg = expectation.configuration.to_json_dict()
    cfg.pop("id", None)
    return to_jsonable(cfg)


def key_expectations(column: str) -> list[dict]:
    """A primary key: every value present and unique."""
    _quiet_gx_env()
    import great_expectations as gx

    E = gx.expectations
    return [_config(E.ExpectColumnValuesToBeUnique(column=column)),
            _config(E.ExpectColumnValuesToNotBeNull(column=column))]  # fmt: skip


def referential_integrity_expectation(
    column: str, parent_keys: Iterable[Any], *, mostly: float = 1.0
) -> dict:
    """Foreign key ``column`` of a child table takes only values of the parent's key (nulls are
    ignored, as GX does for value sets; add a not-null check for a mandatory reference).  The parent
    keys are embedded in the suite, so build it per run from the synthetic parent table."""
    _quiet_gx_env()
    import great_expectations as gx

    keys = sorted({to_jsonable(k) for k in parent_keys if not _is_missing(k)}, key=lambda v: (type(v).__name__, str(v)))
    return _config(gx.expectations.ExpectColumnValuesToBeInSet(column=column, value_set=keys, mostly=mostly))


def date_order_expectation(
    earlier: str, later: str, *, or_equal: bool = True, mostly: float = 1.0
) -> dict:
    """Within a row, ``later`` is not before ``earlier`` (e.g. encounter end >= start, death >=
    birth); rows where either date is missing are ignored."""
    _quiet_gx_env()
    import great_expectations as gx

    return _config(gx.expectations.ExpectColumnPairValuesAToBeGreaterThanB(
        column_A=later, column_B=earlier, or_equal=or_equal, ignore_row_if="either_value_is_missing",
        mostly=mostly))  # fmt: skip


def add_expectations(suite: Mapping[str, Any], expectations: Iterable[Mapping[str, Any]]) -> dict:
    """A copy of ``suite`` with ``expectations`` appended (one with the same type and kwargs as an
    existing one is not added twice)."""
    out = deepcopy(dict(suite))
    exps = list(out.get("expectations") or [])
    seen = {(e.get("type"), repr(sorted((e.get("kwargs") or {}).items()))) for e in exps}
    for e in expectations:
        key = (e.get("type"), repr(sorted((e.get("kwargs") or {}).items())))
        if key not in seen:
            exps.append(deepcopy(dict(e)))
            seen.add(key)
    out["expectations"] = exps
    return out


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- run


def _quiet_gx_env() -> None:
    """No analytics, and no INFO chatter from GX internals (docs-decorator registration,
    ephemeral context set-up) unless the host application configured the GX logger itself."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)


def _ephemeral_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # The legacy Validator used by GX 1.x ValidationDefinition.run decides whether tqdm runs
    # from context.progress_bars (validator.Validator._determine_progress_bars).
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    try:
        context.enable_analytics(False)
    except Exception:  # pragma: no cover - older/newer GX without the switch
        pass
    _plain_bool_results(context.validation_results_store)
    return context


def _plain_bool_results(store: Any) -> None:
    """GX 1.24's ExpectColumnQuantileValuesToBeBetween reports ``success`` as ``numpy.bool_``, which
    the validation-results store cannot JSON-serialise; make every ``success`` a plain bool before
    this (private, ephemeral) context's store writes a result."""
    original = store.serialize

    def serialize(value: Any) -> Any:
        for r in getattr(value, "results", None) or []:
            if isinstance(getattr(r, "success", None), np.bool_):
                r.success = bool(r.success)
        if isinstance(getattr(value, "success", None), np.bool_):
            value.success = bool(value.success)
        return original(value)

    store.serialize = serialize


def _strip_ids(suite: Mapping[str, Any]) -> dict:
    out = deepcopy(dict(suite))
    out.pop("id", None)
    exps = []
    for exp in out.get("expectations") or []:
        exp = dict(exp)
        exp.pop("id", None)
        exp.pop("rendered_content", None)
        exps.append(exp)
    out["expectations"] = exps
    out["name"] = out.get("name") or "synthfactory_suite"
    return out


def _exception_messages(exception_info: Any) -> list[str]:
    """GX puts either one {'raised_exception', 'exception_message'} dict or a dict of them keyed
    by metric id into ``exception_info``."""
    if not isinstance(exception_info, Mapping):
        return []
    if "raised_exception" in exception_info:
        infos: Iterable[Any] = [exception_info]
    else:
        infos = exception_info.values()
    msgs = []
    for info in infos:
        if isinstance(info, Mapping) and info.get("raised_exception"):
            msg = str(info.get("exception_message") or "error")
            if msg not in msgs:
                msgs.append(msg[:300])
    return msgs


def _observed(result: Mapping[str, Any], exception_info: Any) -> dict:
    obs: dict[str, Any] = {}
    for key in ("observed_value", "element_count", "unexpected_count", "unexpected_percent",
                "missing_count", "missing_percent"):  # fmt: skip
        if key in result and result[key] is not None:
            obs[key] = result[key]
    if "observed_value" in obs and isinstance(obs["observed_value"], (list, tuple)):
        obs["observed_value"] = list(obs["observed_value"])[:50]
    partial = result.get("partial_unexpected_list")
    if partial:
        obs["partial_unexpected_list"] = list(partial)[:PARTIAL_UNEXPECTED]
    mismatched = (result.get("details") or {}).get("mismatched")
    if mismatched:
        obs["mismatched"] = mismatched
    errors = _exception_messages(exception_info)
    if errors:
        obs["errors"] = errors
    return to_jsonable(obs)


def _expected(kwargs: Mapping[str, Any]) -> dict:
    """What an expectation asked for (its kwargs without the column and GX's options), JSON-able and short."""
    skip = {"column", "column_A", "column_B", "result_format", "catch_exceptions", "meta", "batch_id"}
    out = {}
    for k, v in kwargs.items():
        if k in skip or v is None:
            continue
        if isinstance(v, (list, tuple, set)):
            v = list(v)[:50]
        out[k] = v
    return to_jsonable(out)


def _build_data_docs(context: Any, folder: str) -> str | None:
    """Render GX Data Docs (index, suite and validation pages) for this context into ``folder``;
    returns the index.html path, or None when GX could not build them (logged, never fatal)."""
    from pathlib import Path

    site = "synthfactory_docs"
    try:
        context.add_data_docs_site(site, {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })  # fmt: skip
        context.build_data_docs(site_names=[site])
    except Exception as err:  # Data Docs are a report; their failure must not fail the validation
        log.warning("GX Data Docs could not be built: %s", str(err)[:300])
        return None
    index = Path(folder) / "index.html"
    return str(index) if index.is_file() else None


def run_suite(suite: Mapping[str, Any], df: pd.DataFrame, *, data_docs_dir: str | None = None) -> dict:
    """Validate ``df`` against a suite dict (from :func:`derive_suite`) with GX 1.x.

    Returns ``{"success", "evaluated", "successful", "success_ratio", "failed": [...]}``
    where each failure is ``{"expectation", "column", "observed"}``; all plain JSON values.
    Expectations that raise (e.g. a missing column) count as failed with ``observed.errors``.
    With ``data_docs_dir`` (a local folder), GX Data Docs HTML of this validation is written there
    and ``data_docs_index`` gives its index.html (None when GX could not render them).
    """
    _quiet_gx_env()
    import great_expectations as gx
    from great_expectations.core import ExpectationSuite

    suite_dict = _strip_ids(suite)
    data = _normalise_frame(df)
    context = _ephemeral_context()
    datasource = context.data_sources.add_pandas(name="synthfactory_pandas")
    asset = datasource.add_dataframe_asset(name="table")
    batch_definition = asset.add_batch_definition_whole_dataframe("whole_table")
    gx_suite = context.suites.add(ExpectationSuite(**suite_dict))
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="synthfactory_validation", data=batch_definition, suite=gx_suite)
    )
    result = validation.run(
        batch_parameters={"dataframe": data},
        result_format={
            "result_format": "SUMMARY",
            "partial_unexpected_count": PARTIAL_UNEXPECTED,
            "include_unexpected_rows": False,
        },
    )

    failed = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        kwargs = dict(cfg.kwargs or {})
        column = kwargs.get("column")
        if column is None and "column_A" in kwargs:
            column = f"{kwargs['column_A']},{kwargs.get('column_B')}"
        failed.append(
            {
                "expectation": str(cfg.type),
                "column": column,
                "observed": _observed(dict(r.result or {}), r.exception_info),
                "expected": _expected(kwargs),
            }
        )
    failed.sort(key=lambda f: (f["column"] is not None, str(f["column"]), f["expectation"]))
    evaluated = len(result.results)
    successful = sum(1 for r in result.results if r.success)
    out = {
        "success": bool(result.success),
        "evaluated": int(evaluated),
        "successful": int(successful),
        "success_ratio": float(successful / evaluated) if evaluated else 1.0,
        "failed": failed,
    }
    if data_docs_dir:
        out["data_docs_index"] = _build_data_docs(context, data_docs_dir)
    log.info(
        "suite %r on %d rows x %d columns: %d/%d expectations passed",
        suite_dict["name"], len(df), df.shape[1], successful, evaluated,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- flat tables
def _q(col: str) -> str:
    return "`" + str(col).replace("`", "") + "`"


def _lit(values: Iterable[Any]) -> str:
    return "[" + ", ".join(repr(to_jsonable(v)) for v in values) + "]"


def table_rule_expectations(plan: Mapping[str, Any]) -> list[dict]:
    """One GX expectation per logic rule of a flat table's plan (:mod:`synthfactory.synthesize.flat`): the rows
    where the rule's condition holds (a pandas ``row_condition``) must have the column unset (null, or the
    other value of a boolean) or set. Each carries ``meta.synthfactory_rule`` with the rule in words."""
    _quiet_gx_env()
    import great_expectations as gx

    E = gx.expectations
    types, truth = plan.get("types", {}), plan.get("truth", {})
    values_of = plan.get("values", {})

    def is_set(col: str) -> str:
        return f"({_q(col)} == {truth[col]!r})" if types.get(col) == "boolean" else f"{_q(col)}.notna()"

    def cond(col: str, values: Any) -> str:
        return f"{_q(col)}.notna()" if values is None else f"{_q(col)}.isin({_lit(values)})"

    def must_be_unset(col: str, row_condition: str) -> Any:
        if types.get(col) == "boolean":
            others = [v for v in values_of.get(col, []) if v != truth[col]]
            return E.ExpectColumnValuesToBeInSet(column=col, value_set=others, row_condition=row_condition,
                                                 condition_parser="pandas")
        return E.ExpectColumnValuesToBeNull(column=col, row_condition=row_condition, condition_parser="pandas")

    def must_be_set(col: str, row_condition: str) -> Any:
        if types.get(col) == "boolean":
            return E.ExpectColumnValuesToBeInSet(column=col, value_set=[truth[col]], row_condition=row_condition,
                                                 condition_parser="pandas")
        return E.ExpectColumnValuesToNotBeNull(column=col, row_condition=row_condition, condition_parser="pandas")

    out = []
    for r in plan.get("rules", []):
        if r["type"] == "only_when":
            exp = must_be_unset(r["column"], f"~({cond(r['other'], r['values'])})")
        elif r["type"] == "required_when":
            exp = must_be_set(r["column"], cond(r["other"], r["values"]))
        else:
            exp = must_be_unset(r["other"], is_set(r["column"]))
        cfg = _config(exp)
        cfg["meta"] = {"synthfactory_rule": {k: to_jsonable(r[k]) for k in ("type", "column", "other", "values")}}
        out.append(cfg)
    return out


def table_value_set_expectations(plan: Mapping[str, Any]) -> list[dict]:
    """The value set of every category-typed column of a flat table (ordinal, categorical, boolean, sex),
    numbers included: synthetic values come from the real set, never in between."""
    _quiet_gx_env()
    import great_expectations as gx

    return [_config(gx.expectations.ExpectColumnValuesToBeInSet(column=c, value_set=list(v)))
            for c, v in (plan.get("values") or {}).items() if v]
