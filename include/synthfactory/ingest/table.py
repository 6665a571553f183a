"""``source.kind: table``: one flat clinical table, one row per patient (a trial dataset, a registry, a
warehouse query), synthesized with its own columns.

* :func:`read_table` reads a CSV or Parquet file (local or ``s3://``), or the result of ``source.query``
  through a reader the caller gives (the Airflow task: a ``DbApiHook``) or a SQLAlchemy URL (the CLI).
* :func:`detect_types` gives every column a type (``numeric``, ``integer``, ``ordinal``, ``categorical``,
  ``boolean``, ``date``, ``age``, ``sex``, ``identifier``, ``exclude``); ``source.columns`` overrides it.
* :func:`coerce` makes the table the same whatever the file format: dates as ``datetime64[ns]``, ages top-coded
  at 90 (HIPAA Safe Harbor), every other column as read. Missing values stay missing.
* :func:`ingest_table` writes the typed table (``table.parquet``, the id replaced by the HMAC ``patient_key``),
  the ids and identifier columns' values for the leak scan (``identifiers.parquet``, kind ``table_id``), the rows
  refused (missing or duplicate id: counts and row numbers only) and the column types (``columns.json``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from pathlib import PurePosixPath
from typing import Any, Callable

import numpy as np
import pandas as pd

from synthfactory.errors import ConfigError, InputError

log = logging.getLogger(__name__)

TABLE = "table"
COLUMNS_FILE = "columns.json"
ID_KIND = "table_id"
KEY = "patient_key"  # the modelling table's row key (synthesize.modelling.KEY)
AGE_TOP_CODE = 90
#: types that are modelled as categories (sampled from the real value set, never in between)
CATEGORY_TYPES = ("ordinal", "categorical", "boolean", "sex")
#: types left out of the modelling table (their values are leak-scanned when identifiers)
DROPPED_TYPES = ("identifier", "exclude")
_ID_NAME = re.compile(r"(^|[_.\s])(id|ids|pid|mrn|nhs|ssn|patient_?id|subject_?id|record_?id)$|^id[_.\s]|^unnamed",
                      re.IGNORECASE)
_AGE_NAME = re.compile(r"^(age|age[_.\s]?(years|yrs|at[_.\s]?\w+)?|\w*[_.\s]age)$", re.IGNORECASE)
_SEX_NAME = re.compile(r"^(sex|gender)$", re.IGNORECASE)
_BOOL_WORDS = {"yes", "no", "y", "n", "true", "false", "t", "f"}
_DATE_RE = re.compile(r"^\s*(\d{4}-\d{1,2}-\d{1,2}([ T]\d{1,2}:\d{2}(:\d{2})?)?|\d{1,2}[-/.]\d{1,2}[-/.]\d{4})\s*$")
MAX_ORDINAL_LEVELS = 10
MAX_FRACTIONAL_ORDINAL_LEVELS = 6


class TableError(InputError, ValueError):
    """The table cannot be read or has no usable rows (exit 3)."""


# -- reading ----------------------------------------------------------------------------------------
def file_format(uri: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    name = PurePosixPath(uri.split("?", 1)[0]).name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt")):
        return "csv"
    raise ConfigError(f"source.uri: cannot tell the format of {name!r}; set source.format: csv or parquet")


def is_sql_url(uri: str | None) -> bool:
    return bool(uri) and re.match(r"^[a-z][a-z0-9+.-]*://", str(uri)) is not None and not str(uri).startswith(
        ("s3://", "file://", "sql-connection://"))


def read_table(source: Any, uri: str, store: Any, sql_reader: Callable[[str], pd.DataFrame] | None = None
               ) -> tuple[pd.DataFrame, str]:
    """``(frame, sha256)`` of the table: the file's bytes hashed, or the query result's content."""
    if source.query:
        if sql_reader is None:
            if not is_sql_url(uri):
                raise ConfigError(f"source.query: no SQL connection to run it on (uri {uri.split('://')[0]}://...): "
                                  "in the CLI give a SQLAlchemy URL (--extract postgresql://host/db or "
                                  "sqlite:///file.db); in Airflow, source.sql_connection_id")
            sql_reader = sqlalchemy_reader(uri)
        try:
            df = sql_reader(source.query)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - any driver's error: its type, not the connection string
            raise TableError(f"source.query failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
        digest = hashlib.sha256(b"|".join([",".join(map(str, df.columns)).encode(),
                                           pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes()]))
        return df.reset_index(drop=True), digest.hexdigest()
    if not store.exists(uri):
        raise TableError(f"source.uri: no table file at {uri}")
    data = store.read_bytes(uri)
    fmt = file_format(uri, source.format)
    try:
        if fmt == "parquet":
            df = pd.read_parquet(io.BytesIO(data))
        else:
            sep = source.delimiter or ("\t" if ".tsv" in uri.lower() else ",")
            df = pd.read_csv(io.BytesIO(data), sep=sep, compression="gzip" if uri.endswith(".gz") else None,
                             low_memory=False)
    except Exception as err:  # noqa: BLE001 - pandas/pyarrow parse errors of several types
        raise TableError(f"source.uri: cannot read {PurePosixPath(uri).name} as {fmt}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}") from None
    return df, hashlib.sha256(data).hexdigest()


def sqlalchemy_reader(url: str) -> Callable[[str], pd.DataFrame]:
    """A query runner on a SQLAlchemy URL (the CLI's SQL source)."""
    def read(query: str) -> pd.DataFrame:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        try:
            with engine.connect() as conn:
                return pd.read_sql_query(sqlalchemy.text(query), conn)
        finally:
            engine.dispose()

    return read


# -- column types -----------------------------------------------------------------------------------
def _dates(s: pd.Series) -> pd.Series | None:
    """``s`` parsed as dates when nearly every value looks like one (ISO, or d-m-Y / m/d/Y), else None."""
    values = s.dropna().astype(str)
    if values.empty:
        return None
    sample = values.iloc[: 500]
    if sample.map(lambda v: bool(_DATE_RE.match(v))).mean() < 0.98:
        return None
    return parse_dates(s)


def parse_dates(s: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        out = s.dt.tz_convert(None) if getattr(s.dt, "tz", None) is not None else s
        return out.astype("datetime64[ns]")
    text = s.astype(object).where(s.notna(), None)
    first = next((str(v) for v in text if v is not None), "")
    if re.match(r"^\s*\d{4}-", first):
        out = pd.to_datetime(text, errors="coerce", format="ISO8601")
    else:
        # d-m-Y unless a first field above 12 says m/d/Y is impossible the other way round
        parts = text.dropna().astype(str).str.extract(r"^\s*(\d{1,2})[-/.](\d{1,2})[-/.]")
        month_first = bool((pd.to_numeric(parts[1], errors="coerce") > 12).any())
        out = pd.to_datetime(text, errors="coerce", dayfirst=not month_first)
    return pd.Series(out, index=s.index).astype("datetime64[ns]")


def _is_integer(values: pd.Series) -> bool:
    v = values.astype("float64")
    return bool(np.all(np.isclose(v, np.round(v))))


def detect_type(name: str, s: pd.Series, n_rows: int) -> str:
    """The type of one column from its name and values (see the module docstring)."""
    non_null = s.dropna()
    distinct = int(non_null.nunique())
    if pd.api.types.is_bool_dtype(s.dtype):
        return "boolean"
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return "date"
    if pd.api.types.is_numeric_dtype(s.dtype):
        if non_null.empty:
            return "numeric"
        integer = _is_integer(non_null)
        if _ID_NAME.search(name) and integer and distinct == len(non_null) and distinct >= 0.95 * n_rows:
            return "identifier"
        if _SEX_NAME.match(name) and distinct <= 3:
            return "sex"
        if distinct <= 2 and set(non_null.astype("float64").unique()) <= {0.0, 1.0}:
            return "boolean"
        if _AGE_NAME.match(name):
            return "age"
        if integer and distinct <= MAX_ORDINAL_LEVELS:
            return "ordinal"
        if not integer and distinct <= MAX_FRACTIONAL_ORDINAL_LEVELS:
            return "ordinal"
        return "integer" if integer else "numeric"
    # text
    if non_null.empty:
        return "categorical"
    if _dates(s) is not None:
        return "date"
    lowered = set(non_null.astype(str).str.strip().str.lower().unique())
    if _SEX_NAME.match(name) and distinct <= 3:
        return "sex"
    if distinct <= 2 and lowered <= _BOOL_WORDS:
        return "boolean"
    if (_ID_NAME.search(name) or distinct > 50) and distinct >= 0.9 * len(non_null) and len(non_null) >= 20:
        return "identifier"
    return "categorical"


def detect_types(df: pd.DataFrame, id_column: str | None, overrides: dict[str, str]) -> dict[str, str]:
    """Column -> type: ``overrides`` (``source.columns``) first, the id column an identifier, the rest detected."""
    unknown = sorted(set(overrides) - set(df.columns))
    if unknown:
        raise ConfigError(f"source.columns: {unknown} are not columns of the table; columns: "
                          f"{list(map(str, df.columns))[:40]}")
    out: dict[str, str] = {}
    for col in df.columns:
        name = str(col)
        if name == id_column:
            out[name] = "identifier"
        elif name in overrides:
            out[name] = overrides[name]
        else:
            out[name] = detect_type(name, df[col], len(df))
    return out


def coerce(df: pd.DataFrame, types: dict[str, str]) -> pd.DataFrame:
    """The typed table: dates parsed, ages top-coded, identifier/excluded columns left out."""
    out = {}
    for col, kind in types.items():
        if kind in DROPPED_TYPES:
            continue
        s = df[col]
        if kind == "date":
            s = parse_dates(s)
        elif kind == "age":
            values = pd.to_numeric(s, errors="coerce")
            if (values > AGE_TOP_CODE).any():
                log.info("table: column %s top-coded at %d (HIPAA Safe Harbor)", col, AGE_TOP_CODE)
            s = values.clip(upper=AGE_TOP_CODE).astype(s.dtype if pd.api.types.is_numeric_dtype(s.dtype)
                                                       else "float64")
        elif kind in ("numeric", "integer") and not pd.api.types.is_numeric_dtype(s.dtype):
            s = pd.to_numeric(s, errors="coerce")
        elif s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            s = s.astype(object).where(s.notna(), None)
        out[col] = s
    return pd.DataFrame(out, index=df.index)


# -- ingest ---------------------------------------------------------------------------------------
def ingest_table(source: Any, uri: str, out_uri: str, *, keyer: Any, store: Any,
                 sql_reader: Callable[[str], pd.DataFrame] | None = None) -> dict:
    """Read, type and write the table under ``out_uri`` (see the module docstring); returns the ingest report."""
    import pyarrow as pa

    from synthfactory.storage import join

    df, digest = read_table(source, uri, store, sql_reader)
    df.columns = [str(c) for c in df.columns]
    if len(set(df.columns)) != len(df.columns):
        raise TableError("the table has duplicate column names")
    if KEY in df.columns:
        raise TableError(f"the table has a column named {KEY!r}, the factory's own key: rename it")
    if df.empty:
        raise TableError("the table has no rows")
    id_col = source.id_column
    if id_col and id_col not in df.columns:
        raise ConfigError(f"source.id_column: {id_col!r} is not a column of the table; columns: "
                          f"{list(df.columns)[:40]}")
    types = detect_types(df, id_col, dict(source.columns))
    refused: dict[str, list[int]] = {}
    if id_col:
        ids = df[id_col].map(lambda v: None if pd.isna(v) else (str(int(v)) if isinstance(v, float) and
                                                                float(v).is_integer() else str(v).strip()))
        missing = ids.isna() | (ids == "")
        dup = ids.duplicated(keep=False) & ~missing
        same = df[dup].duplicated(keep="first")  # repeated identical rows: keep the first silently
        drop_same = set(df[dup][same].index)
        conflicting = dup & ~df.index.isin(drop_same) & ids.isin(ids[dup & ~df.index.isin(drop_same)]
                                                                 .loc[lambda x: x.duplicated(keep=False)])
        refused = {"missing id": [int(i) for i in np.flatnonzero(missing)],
                   "duplicate id": [int(i) for i in np.flatnonzero(conflicting)]}
        keep = ~missing & ~conflicting & ~df.index.isin(drop_same)
    else:
        ids = pd.Series([f"row-{i + 1}" for i in range(len(df))], index=df.index)
        keep = pd.Series(True, index=df.index)
    typed = coerce(df, types)[keep.to_numpy()].reset_index(drop=True)
    kept_ids = ids[keep].reset_index(drop=True)
    typed.insert(0, KEY, [keyer.key("Patient", v) for v in kept_ids])
    table_uri = join(out_uri, f"{TABLE}.parquet")
    store.write_df(table_uri, typed)
    values = [*(kept_ids if id_col else []), *(v for v in ids[~keep].dropna() if id_col)]
    for col, kind in types.items():  # other identifier columns: their values are leak-scanned too
        if kind == "identifier" and col != id_col:
            values += [str(v) for v in df[col].dropna().unique()]
    ids_uri = join(out_uri, "identifiers.parquet")
    store.write_table(ids_uri, pa.table({"value": pa.array([str(v) for v in values], pa.string()),
                                         "kind": pa.array([ID_KIND] * len(values), pa.string())}))
    q_uri = join(out_uri, "quarantine.parquet")
    rows = [(reason, r) for reason, rs in refused.items() for r in rs]
    store.write_table(q_uri, pa.table({"reason": pa.array([r for r, _ in rows], pa.string()),
                                       "row": pa.array([n + 1 for _, n in rows], pa.int64())}))
    columns = {"types": types, "id_column": id_col, "dtypes": {c: str(typed[c].dtype) for c in typed.columns
                                                               if c != KEY},
               "dropped": sorted(c for c, k in types.items() if k in DROPPED_TYPES)}
    store.write_json(join(out_uri, COLUMNS_FILE), columns)
    quarantined = sum(len(v) for v in refused.values())
    if quarantined:
        log.warning("table: %d row(s) refused (%s)", quarantined,
                    ", ".join(f"{k}: {len(v)}" for k, v in refused.items() if v))
    log.info("table: %d rows, %d columns typed %s", len(typed), len(types),
             ", ".join(f"{k}={v}" for k, v in sorted(pd.Series(list(types.values())).value_counts().items())))
    report = {"source_kind": "table", "tables": {TABLE: table_uri}, "rows": {TABLE: int(len(typed))},
              "quarantined_total": quarantined, "quarantined": {k: len(v) for k, v in refused.items()},
              "quarantine_uri": q_uri, "identifiers_uri": ids_uri, "extract_sha256": digest,
              "columns_uri": join(out_uri, COLUMNS_FILE), "column_types": types, "dropped": columns["dropped"]}
    store.write_json(join(out_uri, "ingest_report.json"), report)
    return report


def read_types(tables: dict[str, Any], store: Any) -> dict | None:
    """The ``columns.json`` beside an ingested table (None for the other source kinds)."""
    from synthfactory.storage import join

    uri = tables.get(TABLE)
    if not uri:
        return None
    return store.read_json(join(uri.rsplit("/", 1)[0], COLUMNS_FILE))
