"""Privacy metrics for a synthetic table: exact matches, distance to closest record (DCR) and nearest-
neighbour distance ratios, a membership-inference attack, k-anonymity / rare combinations of
quasi-identifiers, and SDMetrics' DCRBaselineProtection on a fast exact search. :func:`privacy_metrics`
runs the whole audit (with anonymeter's attacks from :mod:`.attacks`).

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
    Euclidean distance in that space. Nearest neighbours are exact. :func:`nearest_neighbors` searches
    candidate neighbours in memory-bounded blocks with a float32 BLAS product (``||b||^2 - 2 a.b`` on
    data centred on the reference mean); :func:`nearest_encoded` (used by the audit) packs the one-hot
    blocks into bit signatures and skips every group of reference rows whose categorical distance alone
    already exceeds the current neighbours (see :mod:`.gower`), several times faster on patient tables
    where most columns are flags. Either way the distance to each chosen neighbour is then recomputed
    directly in float64, so identical rows are at distance exactly 0.

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
#: fewer categorical signature groups than this: the pruned search falls back to BLAS blocks
_MIN_GROUPS = 4
#: largest distance block (query rows x reference rows) held in memory at once, in float32 elements
_MAX_BLOCK_ELEMENTS = 1 << 24  # 64 MiB

__all__ = [
    "Layout",
    "auc_with_ci",
    "dcr_baseline_protection",
    "encode_with_layout",
    "membership_inference",
    "nearest_encoded",
    "nearest_neighbors",
    "quasi_identifier_risk",
    "sdmetrics_random_baseline",
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
    return encode_with_layout(frames, columns, max_categories=max_categories)[0]


@dataclass
class Layout:
    """Where each column of the ``encode`` space sits: numeric blocks (value [+ indicator]) and one-hot
    blocks of categorical columns. Lets :func:`nearest_encoded` pack the space for a pruned search."""

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


def _pack(arrays: Sequence[np.ndarray], layout: Layout):
    """The encoded frames as :class:`~.gower.Encoded` for :meth:`~.gower.GowerIndex.search_squared`:
    numeric columns stay floats; a one-hot block becomes one bit when every row of every frame has one
    of its two categories (a mismatch costs 1), else one-hot bits (1/2 per differing bit: two different
    categories cost 1, a category against none 1/2), while the reference keeps few enough distinct
    signatures (see :mod:`.gower`); other blocks stay floats. Squared distances are unchanged."""
    from synthfactory.privacy.gower import _MAX_GROUPS, Encoded, _signatures

    sizes = [len(a) for a in arrays]
    floats = [[a[:, layout.numeric]] if layout.numeric else [] for a in arrays]
    bits = [np.zeros(n, dtype=np.uint64) for n in sizes]
    hot = [np.zeros(n, dtype=np.uint64) for n in sizes]
    nbit = nhot = 0
    for start, width in sorted(layout.onehot, key=lambda sw: sw[1]):
        blocks = [a[:, start:start + width] for a in arrays]
        codes = [np.where(b.any(axis=1), b.argmax(axis=1), -1) for b in blocks]
        packed = False
        if width == 2 and nbit < 64 and all((c >= 0).all() for c in codes):
            trial = [bits[i] | ((c == 1).astype(np.uint64) << np.uint64(nbit)) for i, c in enumerate(codes)]
            if _signatures(trial[0], hot[0]) <= _MAX_GROUPS:
                bits, nbit, packed = trial, nbit + 1, True
        elif nhot + width <= 64:
            trial = [hot[i] | np.where(c >= 0, np.left_shift(np.uint64(1), (np.maximum(c, 0) + nhot).astype(np.uint64)),
                                       np.uint64(0)) for i, c in enumerate(codes)]
            if _signatures(bits[0], trial[0]) <= _MAX_GROUPS:
                hot, nhot, packed = trial, nhot + width, True
        if not packed:
            for f, b in zip(floats, blocks):
                f.append(b)
    out = []
    for i, n in enumerate(sizes):
        f = np.ascontiguousarray(np.concatenate(floats[i], axis=1), dtype=np.float32) if floats[i] \
            else np.zeros((n, 0), np.float32)
        out.append(Encoded(f, bits[i], hot[i]))
    return out


def nearest_encoded(
    query: np.ndarray, reference: np.ndarray, layout: Layout, *, k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean ``k`` (1 or 2) nearest neighbours in the ``encode`` space, like
    :func:`nearest_neighbors`, but pruned: reference rows are grouped by their categorical signature
    and a query only scans the groups whose categorical distance (a lower bound) can still beat its
    current neighbours (see :mod:`.gower`). Returns ``(distances (nq, k) float64, indices (nq, k))``;
    distances are recomputed in float64 from the dense arrays (identical rows -> exactly 0)."""
    from synthfactory.privacy.gower import GowerIndex

    k = min(k, len(reference))
    q = np.ascontiguousarray(query, dtype=np.float32)
    r = np.ascontiguousarray(reference, dtype=np.float32)
    if len(r) == 0:
        raise ValueError("nearest_encoded: empty reference")
    if len(q) == 0:
        return np.zeros((0, k)), np.zeros((0, k), dtype=np.int64)
    pr, pq = _pack([r, q], layout)
    index = GowerIndex(pr)
    if index.groups < _MIN_GROUPS:  # (almost) no categorical columns: nothing to prune, BLAS is faster
        dist, idx, _ = nearest_neighbors(q, r, k=k)
        return dist, idx
    _, idx = index.search_squared(pq, k=k)
    dist = np.empty(idx.shape, dtype=np.float64)
    for col in range(k):
        dist[:, col] = _exact_distances(q, r, idx[:, col])
    if k == 2:
        swap = dist[:, 1] < dist[:, 0]
        dist[swap] = dist[swap][:, ::-1]
        idx[swap] = idx[swap][:, ::-1]
    return dist, idx


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
def nearest_neighbors(
    query: np.ndarray,
    reference: np.ndarray,
    *,
    k: int = 1,
    chunk: int = 1024,
    ref_chunk: int = 2048,
    prefix: int | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Exact Euclidean ``k`` nearest neighbours (``k`` = 1 or 2) of every ``query`` row among
    ``reference`` rows.

    Returns ``(distances (nq, k) float64, indices (nq, k) int64, prefix_best)``. With ``prefix=p``,
    ``prefix_best`` is the ``(distance, index)`` of the nearest neighbour among the first ``p``
    reference rows only, found in the same pass (else ``None``). Candidates come from a float32 BLAS
    product over ``chunk x ref_chunk`` blocks (8 MiB at the defaults, whatever the table sizes); the
    distance to each chosen neighbour is then recomputed in float64 (identical rows -> exactly 0).
    """
    if k not in (1, 2):
        raise ValueError("nearest_neighbors: k must be 1 or 2")
    q = np.ascontiguousarray(query, dtype=np.float32)
    r = np.ascontiguousarray(reference, dtype=np.float32)
    nq, nr = q.shape[0], r.shape[0]
    if nr == 0:
        raise ValueError("nearest_distances: empty reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"dimension mismatch: {q.shape[1]} != {r.shape[1]}")
    if k > nr:
        raise ValueError(f"nearest_neighbors: k={k} > {nr} reference rows")
    if prefix is not None and not 0 < prefix <= nr:
        raise ValueError(f"nearest_neighbors: prefix {prefix} outside 1..{nr}")
    if nq == 0:
        empty = (np.zeros((0, k)), np.zeros((0, k), dtype=np.int64))
        return (*empty, (empty[0][:, 0], empty[1][:, 0]) if prefix else None)
    chunk = max(1, int(chunk))
    ref_chunk = max(1, int(ref_chunk))
    # Centring on the reference mean shrinks the norms and hence the float32 cancellation error.
    # The reference carries ||r||^2 as an extra column and the query a matching column of ones, so
    # one GEMM yields ||r||^2 - 2 q.r (the squared distance minus the per-row constant ||q||^2).
    mu = r.mean(axis=0, dtype=np.float64).astype(np.float32)
    d = r.shape[1]
    ra = np.empty((nr, d + 1), dtype=np.float32)
    np.subtract(r, mu, out=ra[:, :d])
    ra[:, d] = np.einsum("ij,ij->i", ra[:, :d], ra[:, :d])
    segments = [(0, prefix), (prefix, nr)] if prefix else [(0, nr)]
    best_idx = np.empty((nq, k), dtype=np.int64)
    pre_idx = np.empty(nq, dtype=np.int64) if prefix else None
    qa = np.empty((min(chunk, nq), d + 1), dtype=np.float32)
    buf = np.empty((min(chunk, nq), min(ref_chunk, nr)), dtype=np.float32)
    for qs in range(0, nq, chunk):
        m = min(chunk, nq - qs)
        qm = qa[:m]
        np.subtract(q[qs:qs + m], mu, out=qm[:, :d])
        qm[:, :d] *= np.float32(-2.0)
        qm[:, d] = 1.0
        rows = np.arange(m)
        bv = np.full((m, k), np.inf, dtype=np.float32)
        bi = np.zeros((m, k), dtype=np.int64)
        for seg_start, seg_end in segments:
            for rs in range(seg_start, seg_end, ref_chunk):
                re_ = min(rs + ref_chunk, seg_end)
                block = buf[:m, :re_ - rs]
                np.matmul(qm, ra[rs:re_].T, out=block)
                j = block.argmin(axis=1)
                v = block[rows, j]
                if k == 1:
                    better = v < bv[:, 0]
                    bv[better, 0] = v[better]
                    bi[better, 0] = j[better] + rs
                    continue
                if re_ - rs > 1:
                    block[rows, j] = np.inf
                    j2 = block.argmin(axis=1)
                    v2 = block[rows, j2]
                else:
                    j2 = j
                    v2 = np.full(m, np.inf, dtype=np.float32)
                cand_v = np.concatenate([bv, v[:, None], v2[:, None]], axis=1)
                cand_i = np.concatenate([bi, (j + rs)[:, None], (j2 + rs)[:, None]], axis=1)
                top = np.argsort(cand_v, axis=1, kind="stable")[:, :2]
                bv = np.take_along_axis(cand_v, top, axis=1)
                bi = np.take_along_axis(cand_i, top, axis=1)
            if pre_idx is not None and seg_end == prefix:
                pre_idx[qs:qs + m] = bi[:, 0]
        best_idx[qs:qs + m] = bi
    dist = np.empty((nq, k), dtype=np.float64)
    for col in range(k):
        dist[:, col] = _exact_distances(q, r, best_idx[:, col])
    if k == 2:  # float32 ranking of near-ties may disagree with the float64 distances
        swap = dist[:, 1] < dist[:, 0]
        dist[swap] = dist[swap][:, ::-1]
        best_idx[swap] = best_idx[swap][:, ::-1]
    pre = None
    if pre_idx is not None:
        pre = (_exact_distances(q, r, pre_idx), pre_idx)
    return dist, best_idx, pre


def _exact_distances(q: np.ndarray, r: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """float64 Euclidean distance from each ``q`` row to ``r[idx]`` (identical rows -> exactly 0)."""
    out = np.empty(q.shape[0], dtype=np.float64)
    step = max(1, _MAX_BLOCK_ELEMENTS // (8 * max(1, q.shape[1])))
    for s in range(0, q.shape[0], step):
        diff = q[s:s + step].astype(np.float64) - r[idx[s:s + step]].astype(np.float64)
        out[s:s + step] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def nearest_distances(
    query: np.ndarray, reference: np.ndarray, *, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean nearest neighbour of every ``query`` row among ``reference`` rows.

    Returns ``(distances float64, indices int64)``; see :func:`nearest_neighbors`.
    """
    dist, idx, _ = nearest_neighbors(query, reference, k=1, chunk=chunk)
    return dist[:, 0], idx[:, 0]


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if x.size else float("nan")


def dcr(
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    synthetic: pd.DataFrame,
    columns: list[str],
    *,
    seed: int = 0,
    chunk: int = 1024,
    pruned: bool = True,
) -> dict:
    """Distance to closest record (Euclidean, in the ``encode`` space fitted on train).

    Neighbours are exact either way; ``pruned`` (default) uses :func:`nearest_encoded` (categorical
    signature groups, see :mod:`.gower`), else the BLAS blocks of :func:`nearest_neighbors`.

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
    (x_train, x_hold, x_syn), layout = encode_with_layout([train, holdout, synthetic], columns)
    return _dcr_encoded(x_train, x_hold, x_syn, seed=seed, chunk=chunk, layout=layout if pruned else None)


def _search(query: np.ndarray, reference: np.ndarray, layout: Layout | None, k: int, chunk: int) -> np.ndarray:
    """Distances (n, k) to the k nearest: pruned search when the layout is known, else BLAS blocks."""
    if layout is not None:
        return nearest_encoded(query, reference, layout, k=k)[0]
    return nearest_neighbors(query, reference, k=k, chunk=chunk)[0]


def _dcr_encoded(x_train: np.ndarray, x_hold: np.ndarray, x_syn: np.ndarray, *, seed: int = 0,
                 chunk: int = 1024, layout: Layout | None = None) -> dict:
    rng = np.random.default_rng(seed)
    n_tr, n_ho = len(x_train), len(x_hold)
    n_syn = len(x_syn)
    if n_tr >= n_ho:
        ref_rows = np.sort(rng.choice(n_tr, size=n_ho, replace=False))
        if layout is not None:
            nn_train = _search(x_syn, x_train, layout, min(2, n_tr), chunk)
            d_ref = _search(x_syn, x_train[ref_rows], layout, 1, chunk)[:, 0]
        else:
            # train_ref first: one pass over train yields the nearest in train_ref and in all of train
            rest = np.ones(n_tr, dtype=bool)
            rest[ref_rows] = False
            x_train_perm = np.concatenate([x_train[ref_rows], x_train[rest]])
            nn_train, _, pre = nearest_neighbors(x_syn, x_train_perm, k=min(2, n_tr), chunk=chunk, prefix=n_ho)
            d_ref = pre[0]
        hold_ref = x_hold
    else:
        hold_ref = x_hold[np.sort(rng.choice(n_ho, size=n_tr, replace=False))]
        nn_train = _search(x_syn, x_train, layout, min(2, n_tr), chunk)
        d_ref = nn_train[:, 0]
    d_syn_train = nn_train[:, 0]
    d_hold = _search(x_syn, hold_ref, layout, 1, chunk)[:, 0]
    diff = d_ref - d_hold
    ties = np.abs(diff) <= TIE_TOL
    closer = (diff < 0) & ~ties
    share = (float(closer.sum()) + 0.5 * float(ties.sum())) / n_syn

    nn_hold_train = _search(x_hold, x_train, layout, min(2, n_tr), chunk)
    d_hold_train = nn_hold_train[:, 0]

    # Size-adjusted share over the full train: with train and holdout drawn from one population, the
    # nearest of the union is in train with probability p0 = n_tr / (n_tr + n_ho); the share s is
    # mapped by its odds relative to p0 so that s == p0 -> 0.5 and s == 1 -> 1 (ties weigh p0).
    d_syn_hold_full = d_hold if hold_ref is x_hold else _search(x_syn, x_hold, layout, 1, chunk)[:, 0]
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
    nndr_syn = _nndr(nn_train)
    nndr_hold = _nndr(nn_hold_train)
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
        "reference_rows": int(min(n_tr, n_ho)),
        "synthetic_rows": int(n_syn),
        "seed": int(seed),
        # nearest-neighbour distance ratio d1/d2 to train (0 = sits on one real record; 1 = as close to
        # its second-nearest as to its nearest; also 1 where d2 == 0, a match shared by duplicates)
        "nndr_synth_median": _pct(nndr_syn, 50),
        "nndr_holdout_median": _pct(nndr_hold, 50),
        "nndr_synth_p05": _pct(nndr_syn, 5),
        "nndr_holdout_p05": _pct(nndr_hold, 5),
    }


def _nndr(nn: np.ndarray) -> np.ndarray:
    """Nearest-neighbour distance ratio d1 / d2 per row of a ``(n, 2)`` distance array."""
    if nn.shape[1] < 2:
        return np.ones(nn.shape[0])
    d1, d2 = nn[:, 0], nn[:, 1]
    out = np.ones(nn.shape[0])
    pos = d2 > 0
    out[pos] = d1[pos] / d2[pos]
    return out


# ------------------------------------------------------------------------------------------------
# membership inference
# ------------------------------------------------------------------------------------------------
def auc_with_ci(member_scores: np.ndarray, nonmember_scores: np.ndarray, z: float = 1.959964) -> dict:
    """ROC AUC of ``score`` separating members (higher = member) from non-members, ties counted half
    (Mann-Whitney U), with the Hanley & McNeil (1982) standard error and a normal 95 % interval."""
    from scipy.stats import rankdata

    n1, n0 = len(member_scores), len(nonmember_scores)
    if n1 == 0 or n0 == 0:
        return {"auc": None, "ci": [None, None], "se": None}
    ranks = rankdata(np.concatenate([member_scores, nonmember_scores]))
    auc = float((ranks[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (n1 * n0)
    se = float(math.sqrt(max(var, 0.0)))
    return {"auc": auc, "ci": [max(0.0, auc - z * se), min(1.0, auc + z * se)], "se": se}


def membership_inference(
    x_train: np.ndarray,
    x_hold: np.ndarray,
    x_syn: np.ndarray,
    *,
    seed: int = 0,
    max_targets: int = 10_000,
    chunk: int = 1024,
    layout: Layout | None = None,
) -> dict:
    """Distance-based membership-inference attack (encoded space, Euclidean).

    The attacker holds the synthetic table and a real record, and guesses "was in the training data"
    when the record's distance to its closest synthetic row is small. Members are train rows,
    non-members holdout rows (at most ``max_targets`` of each, seeded subsample); the attack's ROC AUC
    is 0.5 when synthetic rows are no closer to training records than to unseen ones, and near 1.0
    for a synthesizer that copies or perturbs its training rows.
    """
    rng = np.random.default_rng(seed + 7919)

    def pick(x: np.ndarray) -> np.ndarray:
        if len(x) <= max_targets:
            return x
        return x[np.sort(rng.choice(len(x), size=max_targets, replace=False))]

    members, nonmembers = pick(x_train), pick(x_hold)
    d_m = _search(members, x_syn, layout, 1, chunk)[:, 0]
    d_n = _search(nonmembers, x_syn, layout, 1, chunk)[:, 0]
    res = auc_with_ci(-d_m, -d_n)
    return {
        "attack": "distance to closest synthetic record",
        "auc": res["auc"],
        "auc_ci": res["ci"],
        "auc_se": res["se"],
        "members": int(len(members)),
        "nonmembers": int(len(nonmembers)),
        "member_distance_median": _pct(d_m, 50),
        "nonmember_distance_median": _pct(d_n, 50),
        "members_at_zero_distance": float(np.mean(d_m == 0.0)) if len(d_m) else 0.0,
        "nonmembers_at_zero_distance": float(np.mean(d_n == 0.0)) if len(d_n) else 0.0,
    }


# ------------------------------------------------------------------------------------------------
# quasi-identifiers: k-anonymity and rare combinations
# ------------------------------------------------------------------------------------------------
def _qi_keys(base: pd.DataFrame, other: pd.DataFrame, qis: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    rc: dict[str, np.ndarray] = {}
    oc: dict[str, np.ndarray] = {}
    for i, c in enumerate(qis):
        rc[f"c{i}"], oc[f"c{i}"] = _hashable_pair(base[c], other[c])
    return _row_hashes(rc), _row_hashes(oc)


def quasi_identifier_risk(
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    synthetic: pd.DataFrame,
    quasi_identifiers: Sequence[str],
    *,
    k: int = 5,
) -> dict:
    """k-anonymity and rare combinations of the quasi-identifiers (QIs) in the synthetic output.

    Values are compared exactly (normalised as for exact matches); missing is a value of its own.

    * ``synthetic_k_anonymity``: the smallest number of synthetic rows sharing one QI combination;
      ``synthetic_rare_share``: share of synthetic rows in combinations seen fewer than ``k`` times.
      A synthetic row is nobody, so neither figure is a risk on its own (continuous QIs make every row
      unique); they are reported.
    * ``rare_combination_share``: share of synthetic rows whose QI combination is *rare in the real
      training data* (present, but fewer than ``k`` real records): such a row points at a handful of
      real people. ``holdout_rare_combination_share`` is the same share for the real holdout rows: the
      level a fresh sample of patients reaches by chance, which depends only on how fine the QIs are
      (coarse QIs such as age and sex put a few percent of any sample into rare real classes).
    * ``rare_combination_excess`` = synthetic share - holdout share, the gated figure. About 0 for a
      synthesizer that generalises, whatever the QIs; large when it reproduces the rare combinations of
      its training records (with fine QIs a copier lands in rare training classes almost always, a
      fresh sample almost never). A copier on coarse QIs is not caught here (there is no rare
      combination to reproduce) but by the exact-match, DCR and membership-inference checks.
    * ``unique_real_matches``: synthetic rows whose combination belongs to exactly one training record.
    """
    qis = list(quasi_identifiers)
    missing = [c for c in qis if any(c not in f.columns for f in (train, holdout, synthetic))]
    if missing:
        raise KeyError(f"quasi_identifier_risk: quasi-identifier(s) {missing} not in every table")
    if not qis:
        raise ValueError("quasi_identifier_risk: no quasi-identifiers")
    h_train, h_syn = _qi_keys(train, synthetic, qis)
    _, h_hold = _qi_keys(train, holdout, qis)
    train_counts = pd.Series(h_train).value_counts()
    syn_counts = pd.Series(h_syn).value_counts()
    syn_class = pd.Series(h_syn).map(syn_counts).to_numpy()
    in_train_syn = pd.Series(h_syn).map(train_counts).fillna(0).to_numpy()
    in_train_hold = pd.Series(h_hold).map(train_counts).fillna(0).to_numpy()
    rare_syn = (in_train_syn >= 1) & (in_train_syn < k)
    rare_hold = (in_train_hold >= 1) & (in_train_hold < k)
    n_syn = max(1, len(h_syn))
    return {
        "quasi_identifiers": qis,
        "k": int(k),
        "synthetic_k_anonymity": int(syn_counts.min()) if len(syn_counts) else 0,
        "synthetic_classes": int(len(syn_counts)),
        "synthetic_rare_share": float(np.mean(syn_class < k)) if len(syn_class) else 0.0,
        "train_k_anonymity": int(train_counts.min()) if len(train_counts) else 0,
        "train_classes": int(len(train_counts)),
        "train_rare_share": float(np.mean(pd.Series(h_train).map(train_counts).to_numpy() < k))
        if len(h_train) else 0.0,
        "rare_combination_rows": int(rare_syn.sum()),
        "rare_combination_share": float(rare_syn.sum() / n_syn),
        "holdout_rare_combination_share": float(rare_hold.mean()) if len(rare_hold) else 0.0,
        "rare_combination_excess": float(rare_syn.sum() / n_syn - (rare_hold.mean() if len(rare_hold) else 0.0)),
        "unique_real_matches": int((in_train_syn == 1).sum()),
        "synthetic_rows_in_real_combinations": float(np.mean(in_train_syn >= 1)) if len(h_syn) else 0.0,
    }


# ------------------------------------------------------------------------------------------------
# SDMetrics DCRBaselineProtection, on the fast exact Gower search
# ------------------------------------------------------------------------------------------------
def sdmetrics_random_baseline(real: pd.DataFrame, n: int, seed: int | None = None) -> pd.DataFrame:
    """The random baseline table of SDMetrics' ``DCRBaselineProtection._generate_random_data``, same
    algorithm and the same random streams: values from ``numpy.random.default_rng(seed)`` (SDMetrics:
    the class attribute ``_seed``), missing masks from ``numpy.random.RandomState(seed)`` (SDMetrics:
    the global ``numpy.random`` state; so ``np.random.seed(seed)`` there reproduces this table)."""
    from sdmetrics.utils import is_datetime

    randomizer = np.random.default_rng(seed)
    masks = np.random.RandomState(seed)
    out = {}
    for col in real.columns:
        s = real[col]
        nan_ratio = s.isna().mean()
        if pd.api.types.is_integer_dtype(s):
            values = randomizer.integers(low=s.min(), high=s.max() + 1, size=n)
        elif pd.api.types.is_float_dtype(s):
            values = randomizer.uniform(low=s.min(), high=s.max(), size=n)
        elif is_datetime(s):
            lo, hi = s.min(), s.max()
            values = lo + pd.to_timedelta(randomizer.uniform(low=0, high=(hi - lo).total_seconds(), size=n),
                                          unit="s")
        else:
            values = randomizer.choice(s.dropna().unique(), size=n)
        nan_mask = masks.rand(n) < nan_ratio
        values = pd.Series(values)
        values[nan_mask] = pd.NaT if is_datetime(s) else np.nan
        out[col] = values
    return pd.DataFrame(out)


_SDM_SDTYPES = ("numerical", "categorical", "boolean", "datetime")


def _sdm_columns(real: pd.DataFrame, synthetic: pd.DataFrame, metadata: dict | None) -> dict[str, str]:
    """The columns SDMetrics' ``calculate_dcr`` compares, with their sdtypes, in metadata order."""
    from synthfactory.privacy.gower import column_sdtypes

    if metadata is None:
        cols = column_sdtypes(real, [c for c in real.columns if c in synthetic.columns])
        return {c: t for c, t in cols.items() if t in _SDM_SDTYPES}
    meta = metadata
    if "tables" in meta:
        tables = meta["tables"]
        if len(tables) != 1:
            raise ValueError("dcr_baseline_protection: metadata must describe one table")
        meta = next(iter(tables.values()))
    return {c: m["sdtype"] for c, m in meta.get("columns", {}).items()
            if m.get("sdtype") in _SDM_SDTYPES and c in real.columns and c in synthetic.columns}


def _sdm_datetimes(frame: pd.DataFrame, metadata: dict | None, cols: dict[str, str]) -> pd.DataFrame:
    """SDMetrics parses datetime columns held as strings with the metadata's ``datetime_format``."""
    conv = {}
    meta_cols = {}
    if metadata is not None:
        meta = next(iter(metadata["tables"].values())) if "tables" in metadata else metadata
        meta_cols = meta.get("columns", {})
    for c, t in cols.items():
        if t == "datetime" and not pd.api.types.is_datetime64_any_dtype(frame[c]):
            conv[c] = pd.to_datetime(frame[c], format=meta_cols.get(c, {}).get("datetime_format"))
    return frame.assign(**conv) if conv else frame


def dcr_baseline_protection(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    metadata: dict | None = None,
    *,
    seed: int | None = 0,
    random_data: pd.DataFrame | None = None,
) -> dict:
    """SDMetrics' ``DCRBaselineProtection`` (sdmetrics 0.32), same score, on an exact fast search.

    Score formula (``compute_breakdown`` with no subsampling): ``min(median DCR(synthetic -> real) /
    median DCR(random -> real), 1)``, NaN when the random median is 0. DCR is SDMetrics'
    ``calculate_dcr`` distance: the mean over the compared columns (numerical, datetime, categorical,
    boolean, per metadata) of ``min(|a - b| / range_real, 1)`` for numbers and dates (constant real
    column: 0 if equal else 1; one side missing: 1; both missing: 0) and of the mismatch indicator
    for categories (missing equals missing). The random table is :func:`sdmetrics_random_baseline`
    (``random_data`` overrides it). The nearest neighbours come from :class:`~.gower.GowerIndex`
    (exact, see :mod:`.gower`) instead of SDMetrics' pandas cross join, so the score is the same
    (float32 rounding aside: |difference| < 1e-6) in a small fraction of the time.

    Returns SDMetrics' breakdown (``score``, ``median_DCR_to_real_data``) plus sizes and search stats.
    """
    from synthfactory.privacy.gower import GowerIndex, encode_gower

    if len(real) == 0 or len(synthetic) == 0:
        raise ValueError("dcr_baseline_protection: empty table")
    if random_data is None:
        random_data = sdmetrics_random_baseline(real, len(synthetic), seed)
    cols = _sdm_columns(real, synthetic, metadata)
    if not cols:
        raise ValueError("There are no overlapping statistical columns to measure.")
    frames = [_sdm_datetimes(f, metadata, cols) for f in (real, synthetic, random_data)]
    ref, (x_syn, x_rand), n_cols = encode_gower(frames[0], frames[1:], list(cols), cols)
    index = GowerIndex(ref)
    d_syn = index.search(x_syn)[0] / n_cols
    d_rand = index.search(x_rand)[0] / n_cols
    syn_median = float(np.median(d_syn))
    rand_median = float(np.median(d_rand))
    score = float("nan") if rand_median == 0.0 else min(syn_median / rand_median, 1.0)
    return {
        "score": score,
        "median_DCR_to_real_data": {"synthetic_data": syn_median, "random_data_baseline": rand_median},
        "real_rows": int(len(real)),
        "synthetic_rows": int(len(synthetic)),
        "columns": int(n_cols),
        "distance": "gower (sdmetrics calculate_dcr)",
        "signature_groups": index.groups,
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
    quasi_identifiers: Sequence[str] = (),
    sensitive_attributes: Sequence[str] = (),
    k_anonymity: int = 5,
    anonymeter_attacks: int = 0,
    mia_max_targets: int = 10_000,
    sdmetrics_baseline: bool = True,
    metadata: dict | None = None,
) -> dict:
    """The privacy audit of a synthetic table, all against the real ``train`` split with the real
    ``holdout`` as control, over the columns common to all three frames minus ``exclude`` (e.g. the
    ``patient_key`` id column), in train's column order:

    * ``exact_match``: synthetic rows identical to a real (train or holdout) row;
    * ``dcr``: distance to closest record (size-adjusted share closer to train than to holdout, median
      ratio) and nearest-neighbour distance ratios (see :func:`dcr`);
    * ``mia``: distance-based membership-inference AUC (see :func:`membership_inference`);
    * ``quasi_identifiers``: k-anonymity and rare combinations of ``quasi_identifiers``
      (see :func:`quasi_identifier_risk`; skipped when none are named);
    * ``anonymeter``: singling-out, linkability and inference risks with confidence intervals
      (see :mod:`.attacks`; skipped when ``anonymeter_attacks`` is 0 or no columns are named);
    * ``sdmetrics_dcr_baseline_protection``: SDMetrics' DCRBaselineProtection score on the fast exact
      search (see :func:`dcr_baseline_protection`), for comparison with SDMetrics-based reports.

    ``seconds`` records the time each part took.
    """
    import time

    cols = _common_columns([train, holdout, synthetic], exclude)
    if not cols:
        raise ValueError("privacy_metrics: no common columns left after exclude")
    for label, names in (("quasi_identifiers", quasi_identifiers), ("sensitive_attributes", sensitive_attributes)):
        unknown = [c for c in names if c not in cols]
        if unknown:
            raise ValueError(f"privacy_metrics: {label} {unknown} are not audited columns of all three tables "
                             f"(columns: {cols})")
    for name, f in (("train", train), ("holdout", holdout), ("synthetic", synthetic)):
        if len(f) == 0:
            raise ValueError(f"privacy_metrics: {name} has no rows")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        seconds[name] = round(now - t0, 3)
        t0 = now

    real = pd.concat([train[cols], holdout[cols]], ignore_index=True)
    out: dict = {"columns": cols, "exact_match": exact_match_rate(real, synthetic, cols)}
    lap("exact_match")
    (x_train, x_hold, x_syn), layout = encode_with_layout([train, holdout, synthetic], cols)
    lap("encode")
    out["dcr"] = _dcr_encoded(x_train, x_hold, x_syn, seed=seed, layout=layout)
    lap("dcr")
    out["mia"] = membership_inference(x_train, x_hold, x_syn, seed=seed, max_targets=mia_max_targets, layout=layout)
    lap("mia")
    qis, sens = list(quasi_identifiers), list(sensitive_attributes)
    if qis:
        out["quasi_identifiers"] = quasi_identifier_risk(train, holdout, synthetic, qis, k=k_anonymity)
    else:
        out["quasi_identifiers"] = {"skipped": "no quasi_identifiers configured"}
    lap("quasi_identifiers")
    if anonymeter_attacks > 0 and (qis or sens):
        from synthfactory.privacy.attacks import anonymeter_risks

        out["anonymeter"] = anonymeter_risks(train[cols], holdout[cols], synthetic[cols], quasi_identifiers=qis,
                                             sensitive_attributes=sens, n_attacks=anonymeter_attacks, seed=seed)
    else:
        out["anonymeter"] = {"skipped": "anonymeter_attacks is 0" if anonymeter_attacks <= 0
                             else "no quasi_identifiers / sensitive_attributes configured"}
    lap("anonymeter")
    if sdmetrics_baseline:
        out["sdmetrics_dcr_baseline_protection"] = dcr_baseline_protection(
            train[cols], synthetic[cols], _subset_metadata(metadata, cols), seed=seed)
        lap("sdmetrics_dcr_baseline_protection")
    out["seconds"] = seconds
    return out


def _subset_metadata(metadata: dict | None, cols: Sequence[str]) -> dict | None:
    if metadata is None:
        return None
    meta = next(iter(metadata["tables"].values())) if "tables" in metadata else metadata
    columns = meta.get("columns", {})
    return {"columns": {c: columns[c] for c in cols if c in columns}}
