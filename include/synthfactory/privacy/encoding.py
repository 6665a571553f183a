"""The shared encodings of the privacy audit: the float32 feature space its Euclidean distances are
measured in (:func:`encode`, :func:`encode_with_layout`), and the canonical row hashes behind exact
matches and quasi-identifier classes (:func:`row_hashes`).

Feature space (``encode``)
    One float32 space, fitted on the first frame (train) and applied to every frame:

    * numeric columns (ints, floats, nullable ``Int64``/``Float64``): scaled to [0, 1] by train
      min/max and clipped (a constant train column maps to 0). Non-finite values count as missing.
      Missing values become 0 plus a separate 0/1 *missing-indicator* column; the indicator column
      exists when any of the frames has a missing value in that column, so all frames share it.
    * datetime columns (and object columns holding dates): days since 1970-01-01 UTC, then scaled as
      numerics; timedeltas in days likewise.
    * categorical columns (strings, bools, pandas categoricals, anything else): one-hot over the
      categories seen in train (missing is its own category ``<missing>``), at most
      ``max_categories`` most frequent ones. The one-hot value is ``1/sqrt(2)`` so that two different
      categories are at Euclidean distance 1, the same as the widest numeric difference. Categories not
      seen in train (or beyond the cap) encode as all zeros.

Row hashes (``row_hashes``)
    Rows are normalised (numbers as float64 so ``5 == 5.0``, datetimes as UTC nanoseconds, everything
    else as ``str`` with missing as one token, so NaN/None equal each other) and hashed with
    ``pandas.util.hash_pandas_object`` (64-bit).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

MISSING = "<missing>"
ONE_HOT_VALUE = float(1.0 / math.sqrt(2.0))
MAX_CATEGORIES = 512

__all__ = ["Layout", "MAX_CATEGORIES", "MISSING", "ONE_HOT_VALUE", "encode", "encode_with_layout", "row_hashes"]

# ------------------------------------------------------------------------------------------------
# column kinds and normalisation
# ------------------------------------------------------------------------------------------------
def _kind(s: pd.Series) -> str:
    """'numeric', 'datetime', 'timedelta' or 'categorical'."""
    dt = s.dtype
    if pd.api.types.is_bool_dtype(dt) or isinstance(dt, pd.CategoricalDtype):
        return "categorical"
    if pd.api.types.is_datetime64_any_dtype(dt):
        return "datetime"
    if pd.api.types.is_timedelta64_dtype(dt):
        return "timedelta"
    if pd.api.types.is_numeric_dtype(dt) and not pd.api.types.is_complex_dtype(dt):
        return "numeric"
    if dt == object or pd.api.types.is_string_dtype(dt):
        inferred = pd.api.types.infer_dtype(s, skipna=True)
        if inferred in ("datetime", "datetime64", "date"):
            return "datetime"
        if inferred in ("timedelta", "timedelta64"):
            return "timedelta"
        if inferred in ("integer", "floating", "mixed-integer-float", "decimal"):
            return "numeric"
    return "categorical"


def _as_float(s: pd.Series, kind: str) -> np.ndarray:
    """float64 values (NaN for missing / unparseable / non-finite) of a numeric-like column."""
    if kind == "datetime":
        if pd.api.types.is_datetime64_any_dtype(s.dtype):
            ts = s
            if getattr(ts.dt, "tz", None) is not None:
                ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
        else:
            ts = pd.to_datetime(s, errors="coerce", utc=True).dt.tz_localize(None)
        out = ((ts - pd.Timestamp("1970-01-01")) / pd.Timedelta(days=1)).to_numpy(
            dtype="float64", na_value=np.nan
        )
    elif kind == "timedelta":
        out = (pd.to_timedelta(s, errors="coerce") / pd.Timedelta(days=1)).to_numpy(
            dtype="float64", na_value=np.nan
        )
    else:
        if pd.api.types.is_bool_dtype(s.dtype):
            s = s.astype("float64")
        out = pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    out = np.array(out, dtype="float64", copy=True)
    out[~np.isfinite(out)] = np.nan
    return out


def _as_category_strings(s: pd.Series) -> np.ndarray:
    """Object array of normalised category labels: ``str(value)``, missing -> ``MISSING``."""
    values = s.astype(object).to_numpy()
    miss = pd.isna(values)
    out = np.empty(len(values), dtype=object)
    out[miss] = MISSING
    if (~miss).any():
        out[~miss] = [str(v) for v in values[~miss]]
    return out


# ------------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------------
@dataclass
class _Col:
    name: str
    kind: str
    lo: float = 0.0
    span: float = 0.0
    indicator: bool = False
    categories: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        if self.kind == "categorical":
            return len(self.categories)
        return 1 + int(self.indicator)


def _fit(frames: Sequence[pd.DataFrame], columns: Sequence[str], max_categories: int) -> list[_Col]:
    base = frames[0]
    specs: list[_Col] = []
    for c in columns:
        kind = _kind(base[c])
        if kind == "categorical":
            labels = pd.Series(_as_category_strings(base[c]))
            counts = labels.value_counts(sort=False)
            # most frequent first, ties by label so the order is deterministic
            order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            if len(order) > max_categories:
                log.info("column %r: %d categories, one-hot keeps the %d most frequent",
                         c, len(order), max_categories)
            specs.append(_Col(c, kind, categories=[k for k, _ in order[:max_categories]]))
            continue
        vals = _as_float(base[c], kind)
        finite = vals[~np.isnan(vals)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        indicator = any(bool(np.isnan(_as_float(f[c], kind)).any()) for f in frames)
        specs.append(_Col(c, kind, lo=lo, span=hi - lo, indicator=indicator))
    return specs


def _transform(frame: pd.DataFrame, specs: Sequence[_Col]) -> np.ndarray:
    n = len(frame)
    out = np.zeros((n, sum(s.width for s in specs)), dtype=np.float32)
    j = 0
    for spec in specs:
        col = frame[spec.name]
        if spec.kind == "categorical":
            if spec.categories:
                codes = pd.Categorical(_as_category_strings(col), categories=spec.categories).codes
                rows = np.flatnonzero(codes >= 0)
                out[rows, j + codes[rows].astype(np.int64)] = ONE_HOT_VALUE
        else:
            vals = _as_float(col, spec.kind)
            miss = np.isnan(vals)
            if spec.span > 0:
                scaled = np.clip((vals - spec.lo) / spec.span, 0.0, 1.0)
            else:
                scaled = np.zeros(n, dtype=np.float64)
            scaled[miss] = 0.0
            out[:, j] = scaled
            if spec.indicator:
                out[:, j + 1] = miss
        j += spec.width
    return out


def encode(
    frames: list[pd.DataFrame], columns: list[str], *, max_categories: int = MAX_CATEGORIES
) -> list[np.ndarray]:
    """Encode ``frames`` into one shared float32 feature space fitted on ``frames[0]`` (train).

    Returns one C-contiguous ``(len(frame), d)`` float32 array per frame, same ``d`` for all.
    See the module docstring for the encoding rules.
    """
    return encode_with_layout(frames, columns, max_categories=max_categories)[0]


@dataclass
class Layout:
    """Where each column of the ``encode`` space sits: numeric blocks (value [+ indicator]) and one-hot
    blocks of categorical columns. Lets :func:`~.neighbors.nearest_encoded` pack the space for a pruned search."""

    numeric: list[int]                      # column indices of numeric values and indicators
    onehot: list[tuple[int, int]]           # (start, width) of each one-hot block
    width: int


def encode_with_layout(
    frames: list[pd.DataFrame], columns: list[str], *, max_categories: int = MAX_CATEGORIES
) -> tuple[list[np.ndarray], Layout]:
    """:func:`encode`, plus the :class:`Layout` of the space."""
    if not frames:
        return [], Layout([], [], 0)
    columns = list(columns)
    if not columns:
        raise ValueError("encode: no columns to encode")
    for i, f in enumerate(frames):
        missing = [c for c in columns if c not in f.columns]
        if missing:
            raise KeyError(f"encode: frame {i} lacks columns {missing}")
    specs = _fit(frames, columns, max_categories)
    numeric: list[int] = []
    onehot: list[tuple[int, int]] = []
    j = 0
    for spec in specs:
        if spec.kind == "categorical":
            if spec.width:
                onehot.append((j, spec.width))
        else:
            numeric.extend(range(j, j + spec.width))
        j += spec.width
    return [_transform(f, specs) for f in frames], Layout(numeric, onehot, j)


# ------------------------------------------------------------------------------------------------
# row hashes (exact matches, quasi-identifier classes)
# ------------------------------------------------------------------------------------------------
def _datetime_ns(s: pd.Series) -> np.ndarray:
    ts = pd.to_datetime(s, errors="coerce", utc=True).dt.tz_localize(None)
    return ts.to_numpy(dtype="datetime64[ns]").view("i8")  # NaT -> int64 min, equal to itself


def _hashable_pair(real: pd.Series, syn: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Both columns in one canonical representation, so equal values hash equally."""
    kr, ks = _kind(real), _kind(syn)
    if kr == ks == "numeric":
        a, b = _as_float(real, "numeric"), _as_float(syn, "numeric")
        for v in (a, b):
            v[v == 0.0] = 0.0  # -0.0 == 0.0
            v[np.isnan(v)] = np.nan  # one NaN bit pattern
        return a, b
    if kr == ks == "datetime":
        return _datetime_ns(real), _datetime_ns(syn)
    if kr == ks == "timedelta":
        conv = lambda s: pd.to_timedelta(s, errors="coerce").to_numpy(dtype="timedelta64[ns]").view("i8")  # noqa: E731
        return conv(real), conv(syn)
    return _as_category_strings(real), _as_category_strings(syn)


def _row_hashes(cols: dict[str, np.ndarray]) -> np.ndarray:
    return pd.util.hash_pandas_object(pd.DataFrame(cols), index=False).to_numpy()


def row_hashes(base: pd.DataFrame, other: pd.DataFrame, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the rows of ``base`` and ``other`` over ``columns``, both normalised the same way
    (see the module docstring): two rows hash equally when their values are equal."""
    bc: dict[str, np.ndarray] = {}
    oc: dict[str, np.ndarray] = {}
    for i, c in enumerate(columns):
        bc[f"c{i}"], oc[f"c{i}"] = _hashable_pair(base[c], other[c])
    return _row_hashes(bc), _row_hashes(oc)
