"""Privacy metrics for a synthetic table: exact matches and distance to closest record (DCR).

The real rows were split into ``train`` and ``holdout`` *before* the synthesizer saw ``train``. A
synthesizer that generalises produces rows that are no closer to the rows it was trained on than to
real rows it never saw; one that memorises produces rows that sit on top of training rows.

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

Distance
    Euclidean distance in that space. Nearest neighbours are exact: candidate neighbours are searched
    in memory-bounded blocks with a float32 BLAS product (``||b||^2 - 2 a.b`` on data centred on the
    reference mean), and the distance to each chosen neighbour is then recomputed directly in float64,
    so identical rows are at distance exactly 0.

The library never imports Airflow.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

MISSING = "<missing>"
ONE_HOT_VALUE = float(1.0 / math.sqrt(2.0))
MAX_CATEGORIES = 512
#: absolute tolerance under which two float64 distances count as a tie
TIE_TOL = 1e-7
#: used in place of a zero median holdout->train distance in ``dcr_ratio``
RATIO_EPSILON = 1e-8
#: largest distance block (query rows x reference rows) held in memory at once, in float32 elements
_MAX_BLOCK_ELEMENTS = 1 << 24  # 64 MiB

__all__ = [
    "encode",
    "exact_match_rate",
    "dcr",
    "privacy_metrics",
    "nearest_distances",
]


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
    if not frames:
        return []
    columns = list(columns)
    if not columns:
        raise ValueError("encode: no columns to encode")
    for i, f in enumerate(frames):
        missing = [c for c in columns if c not in f.columns]
        if missing:
            raise KeyError(f"encode: frame {i} lacks columns {missing}")
    specs = _fit(frames, columns, max_categories)
    return [_transform(f, specs) for f in frames]


# ------------------------------------------------------------------------------------------------
# exact matches
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


def exact_match_rate(real: pd.DataFrame, synthetic: pd.DataFrame, columns: list[str]) -> dict:
    """Share of synthetic rows identical on all ``columns`` to at least one real row.

    Rows are normalised (numbers as float64 so ``5 == 5.0``, datetimes as UTC nanoseconds, everything
    else as ``str`` with missing as one token, so NaN/None equal each other) and hashed with
    ``pandas.util.hash_pandas_object`` (64-bit); membership is a hash lookup, not a pairwise scan.
    """
    columns = list(columns)
    if not columns:
        raise ValueError("exact_match_rate: no columns")
    n_syn = int(len(synthetic))
    if n_syn == 0:
        return {"exact_match_rate": 0.0, "exact_matches": 0, "synthetic_rows": 0}
    if len(real) == 0:
        return {"exact_match_rate": 0.0, "exact_matches": 0, "synthetic_rows": n_syn}
    rc: dict[str, np.ndarray] = {}
    sc: dict[str, np.ndarray] = {}
    for i, c in enumerate(columns):
        rc[f"c{i}"], sc[f"c{i}"] = _hashable_pair(real[c], synthetic[c])
    hits = np.isin(_row_hashes(sc), _row_hashes(rc))
    n = int(hits.sum())
    return {"exact_match_rate": float(n / n_syn), "exact_matches": n, "synthetic_rows": n_syn}


# ------------------------------------------------------------------------------------------------
# nearest neighbours
# ------------------------------------------------------------------------------------------------
def nearest_distances(
    query: np.ndarray, reference: np.ndarray, *, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean nearest neighbour of every ``query`` row among ``reference`` rows.

    Returns ``(distances float64, indices int64)``. Memory is bounded by the blocks of
    ``chunk x ref_chunk`` float32 distances (at most 64 MiB, whatever the table sizes).
    """
    q = np.ascontiguousarray(query, dtype=np.float32)
    r = np.ascontiguousarray(reference, dtype=np.float32)
    nq, nr = q.shape[0], r.shape[0]
    if nr == 0:
        raise ValueError("nearest_distances: empty reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"dimension mismatch: {q.shape[1]} != {r.shape[1]}")
    if nq == 0:
        return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
    chunk = max(1, int(chunk))
    ref_chunk = max(256, min(nr, _MAX_BLOCK_ELEMENTS // chunk))
    # Centring on the reference mean shrinks the norms and hence the float32 cancellation error.
    # The reference carries ||r||^2 as an extra column and the query a matching column of ones, so
    # one GEMM yields ||r||^2 - 2 q.r (the squared distance minus the per-row constant ||q||^2).
    mu = r.mean(axis=0, dtype=np.float64).astype(np.float32)
    d = r.shape[1]
    ra = np.empty((nr, d + 1), dtype=np.float32)
    np.subtract(r, mu, out=ra[:, :d])
    ra[:, d] = np.einsum("ij,ij->i", ra[:, :d], ra[:, :d])
    best_idx = np.empty(nq, dtype=np.int64)
    buf = np.empty((min(chunk, nq), min(ref_chunk, nr)), dtype=np.float32)
    qa = np.empty((min(chunk, nq), d + 1), dtype=np.float32)
    for qs in range(0, nq, chunk):
        m = min(chunk, nq - qs)
        qm = qa[:m]
        np.subtract(q[qs:qs + m], mu, out=qm[:, :d])
        qm[:, :d] *= np.float32(-2.0)
        qm[:, d] = 1.0
        rows = np.arange(m)
        bv = np.full(m, np.inf, dtype=np.float32)
        bi = np.zeros(m, dtype=np.int64)
        for rs in range(0, nr, ref_chunk):
            rblock = ra[rs:rs + ref_chunk]
            k = rblock.shape[0]
            block = buf[:m, :k] if k == buf.shape[1] else np.empty((m, k), dtype=np.float32)
            np.matmul(qm, rblock.T, out=block)
            j = block.argmin(axis=1)
            v = block[rows, j]
            better = v < bv
            bv[better] = v[better]
            bi[better] = j[better] + rs
        best_idx[qs:qs + m] = bi
    # exact float64 distance to the chosen neighbour (identical rows -> exactly 0)
    dist = np.empty(nq, dtype=np.float64)
    step = max(1, _MAX_BLOCK_ELEMENTS // (8 * max(1, q.shape[1])))
    for s in range(0, nq, step):
        diff = q[s:s + step].astype(np.float64) - r[best_idx[s:s + step]].astype(np.float64)
        dist[s:s + step] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return dist, best_idx


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if x.size else float("nan")


def dcr(
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    synthetic: pd.DataFrame,
    columns: list[str],
    *,
    seed: int = 0,
    chunk: int = 2048,
) -> dict:
    """Distance to closest record (Euclidean, in the ``encode`` space fitted on train).

    * ``dcr_share``: share of synthetic rows strictly closer to ``train_ref`` (a seeded random
      subsample of train with as many rows as holdout) than to holdout, ties counted half. About 0.5
      when the synthesizer generalises; near 1.0 when it memorised train. (If train is smaller than
      holdout, holdout is subsampled to train's size instead.)
    * ``synth_to_train_median`` / ``holdout_to_train_median``: median DCR of synthetic rows and of
      holdout rows to the *full* train; ``dcr_ratio`` = their quotient (far below 1 means copying).
      A zero holdout median is replaced by ``RATIO_EPSILON``, reported in ``dcr_ratio_epsilon``
      (0.0 when no replacement was needed). ``*_p05``: 5th percentiles.
    * ``dcr_share_adjusted``: the same question asked of the *full* train. ``dcr_share`` compares
      against a subsample, so a synthesizer that copies random train rows only copies rows of
      ``train_ref`` with probability ``n_holdout / n_train``: with a 20 % holdout a pure copier scores
      only about ``0.25 + 0.75 / 2 = 0.625``. ``train_closer_share_full`` (share of synthetic rows
      closer to full train than to holdout, ties weighted ``p0``) is compared with its expectation
      under no memorisation, ``train_closer_expected_full = p0 = n_train / (n_train + n_holdout)``,
      and mapped by odds to a 0.5-ideal, 1.0-memorised scale. It needs no extra neighbour search.
    """
    columns = list(columns)
    for name, f in (("train", train), ("holdout", holdout), ("synthetic", synthetic)):
        if len(f) == 0:
            raise ValueError(f"dcr: {name} has no rows")
    x_train, x_hold, x_syn = encode([train, holdout, synthetic], columns)
    rng = np.random.default_rng(seed)
    n_tr, n_ho = len(x_train), len(x_hold)
    if n_tr >= n_ho:
        train_ref = x_train[np.sort(rng.choice(n_tr, size=n_ho, replace=False))]
        hold_ref = x_hold
    else:
        train_ref = x_train
        hold_ref = x_hold[np.sort(rng.choice(n_ho, size=n_tr, replace=False))]

    d_ref, _ = nearest_distances(x_syn, train_ref, chunk=chunk)
    d_hold, _ = nearest_distances(x_syn, hold_ref, chunk=chunk)
    diff = d_ref - d_hold
    ties = np.abs(diff) <= TIE_TOL
    closer = (diff < 0) & ~ties
    n_syn = len(x_syn)
    share = (float(closer.sum()) + 0.5 * float(ties.sum())) / n_syn

    d_syn_train, _ = nearest_distances(x_syn, x_train, chunk=chunk)
    d_hold_train, _ = nearest_distances(x_hold, x_train, chunk=chunk)

    # Size-adjusted share over the full train: with train and holdout drawn from one population, the
    # nearest of the union is in train with probability p0 = n_tr / (n_tr + n_ho); the share s is
    # mapped by its odds relative to p0 so that s == p0 -> 0.5 and s == 1 -> 1 (ties weigh p0).
    d_syn_hold_full = d_hold if hold_ref is x_hold else nearest_distances(x_syn, x_hold, chunk=chunk)[0]
    p0 = n_tr / (n_tr + n_ho)
    diff_f = d_syn_train - d_syn_hold_full
    ties_f = np.abs(diff_f) <= TIE_TOL
    s_full = (float(((diff_f < 0) & ~ties_f).sum()) + p0 * float(ties_f.sum())) / n_syn
    num = s_full * (1.0 - p0)
    share_adj = num / (num + (1.0 - s_full) * p0)
    s_med = float(np.median(d_syn_train))
    h_med = float(np.median(d_hold_train))
    eps = 0.0
    denom = h_med
    if h_med <= 0.0:
        eps = RATIO_EPSILON
        denom = eps
        log.warning("dcr: median holdout->train distance is 0; dcr_ratio uses epsilon %g", eps)
    return {
        "distance": "euclidean",
        "dimensions": int(x_train.shape[1]),
        "dcr_share": float(share),
        "dcr_share_ties": float(ties.sum() / n_syn),
        "dcr_share_adjusted": float(share_adj),
        "train_closer_share_full": float(s_full),
        "train_closer_expected_full": float(p0),
        "synth_to_train_ref_median": float(np.median(d_ref)),
        "synth_to_holdout_median": float(np.median(d_hold)),
        "synth_to_train_median": s_med,
        "holdout_to_train_median": h_med,
        "dcr_ratio": float(s_med / denom),
        "dcr_ratio_epsilon": float(eps),
        "synth_to_train_p05": _pct(d_syn_train, 5),
        "holdout_to_train_p05": _pct(d_hold_train, 5),
        "train_rows": int(n_tr),
        "holdout_rows": int(n_ho),
        "reference_rows": int(len(train_ref)),
        "synthetic_rows": int(n_syn),
        "seed": int(seed),
    }


# ------------------------------------------------------------------------------------------------
# all together
# ------------------------------------------------------------------------------------------------
def _common_columns(frames: Sequence[pd.DataFrame], exclude: Iterable[str]) -> list[str]:
    ex = set(exclude)
    others = [set(f.columns) for f in frames[1:]]
    return [c for c in frames[0].columns if c not in ex and all(c in o for o in others)]


def privacy_metrics(
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    synthetic: pd.DataFrame,
    *,
    exclude: Iterable[str] = (),
    seed: int = 0,
) -> dict:
    """Exact-match rate (against train + holdout) and DCR over the columns common to all three
    frames, minus ``exclude`` (e.g. the ``patient_key`` id column), in train's column order."""
    cols = _common_columns([train, holdout, synthetic], exclude)
    if not cols:
        raise ValueError("privacy_metrics: no common columns left after exclude")
    real = pd.concat([train[cols], holdout[cols]], ignore_index=True)
    return {
        "exact_match": exact_match_rate(real, synthetic, cols),
        "dcr": dcr(train, holdout, synthetic, cols, seed=seed),
        "columns": cols,
    }
