"""Exact nearest neighbours under a Gower-style (capped L1, mixed-type) distance.

This is the distance of SDMetrics' DCR metrics and of anonymeter's attacks: the mean (or sum) over
columns of a per-column distance in [0, 1]:

* numeric / datetime columns: ``min(|a - b| / range, 1)`` with ``range`` taken from the reference
  frame (SDMetrics) or from the union of both frames (anonymeter); a constant reference column gives
  ``0`` for equal values and ``1`` otherwise; one value missing gives ``1``; both missing give ``0``;
* categorical / boolean columns: ``0`` when equal (two missing values are equal), else ``1``.

Search
    Brute force is ``O(n_query x n_reference x columns)``; this module does the same exact search but
    skips most of the work. Categorical columns are packed into two 64-bit words per row: two-valued
    columns as one bit (weight 1), columns with up to a few dozen values as one-hot bits (weight 1/2,
    since two different categories differ in two bits); anything wider stays a float code column
    (``min(|code_a - code_b|, 1)`` is exactly the mismatch indicator). Reference rows are sorted by
    their packed signature, so each group of rows shares its whole categorical distance, which is a
    popcount. For a query, groups are visited in increasing order of that distance, a *lower bound* of
    the full distance of every row in the group, and the search stops as soon as the bound reaches the
    best distance found: the result is exact. Numeric columns of the visited groups are scanned with a
    vectorised loop (numba, parallel over query chunks). Ties go to the lowest reference index, like
    ``numpy.argmin`` over the full distance matrix, or (``tie_seed``) to a pseudo-random tied row drawn
    independently for each query, as the attacks in :mod:`.attacks` need.

The same index answers squared-Euclidean queries in synthfactory's ``encode`` space
(:meth:`GowerIndex.search_squared`, used by :func:`synthfactory.privacy.neighbors.nearest_encoded`): there a
mismatched two-valued column costs exactly 1 and a one-hot bit 1/2, so the same lower bound applies.

Memory is ``O((n_query + n_reference) x columns)``; no distance matrix is ever materialised.
The kernels are compiled with numba on first use (cached on disk).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["Encoded", "GowerIndex", "Packing", "column_sdtype", "column_sdtypes", "encode_gower", "gower_nearest"]

#: a missing numeric value: farther than 1 from any real (clipped) value, 0 from another missing one
_NAN_SENTINEL = np.float32(1e30)
#: scaled numeric values are clipped to +-this (reference values lie in [0, 1]; the cap makes the rest exact)
_CLIP = 1e6
#: one-hot bits per categorical column at most (wider columns become float code columns)
_MAX_ONEHOT = 24
#: most distinct packed signatures in the reference (each query visits every signature once)
_MAX_GROUPS = 4096

Sdtype = Literal["numerical", "datetime", "categorical", "boolean"]


def column_sdtypes(frame: pd.DataFrame, columns: Sequence[str]) -> dict[str, str]:
    """SDV-style sdtypes from dtypes (as synthfactory's metadata does): bool -> boolean, datetime ->
    datetime, numbers -> numerical, anything else -> categorical."""
    return {c: column_sdtype(frame[c]) for c in columns}


def column_sdtype(s: pd.Series) -> str:
    """The sdtype of one column (see :func:`column_sdtypes`)."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return "boolean"
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return "datetime"
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_complex_dtype(s.dtype):
        return "numerical"
    return "categorical"


def _numeric_values(s: pd.Series, sdtype: str) -> np.ndarray:
    """float64 values (NaN = missing); datetimes as seconds since the epoch."""
    if sdtype == "datetime":
        ts = pd.to_datetime(s, errors="coerce")
        if getattr(ts.dt, "tz", None) is not None:
            ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
        ns = ts.to_numpy(dtype="datetime64[ns]").view("i8").astype(np.float64)
        ns[ts.isna().to_numpy()] = np.nan
        return ns / 1e9
    if pd.api.types.is_bool_dtype(s.dtype):
        s = s.astype("float64")
    out = pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    out = np.array(out, dtype=np.float64, copy=True)
    out[~np.isfinite(out)] = np.nan
    return out


@dataclass
class Encoded:
    """One frame in the packed Gower space."""

    floats: np.ndarray  # (n, d_float) float32: scaled numerics and wide-categorical codes
    bits: np.ndarray    # (n,) uint64: two-valued categorical columns (weight 1 per differing bit)
    onehot: np.ndarray  # (n,) uint64: one-hot categorical columns (weight 1/2 per differing bit)

    def __len__(self) -> int:
        return int(self.floats.shape[0])


def encode_gower(
    reference: pd.DataFrame,
    others: Sequence[pd.DataFrame],
    columns: Sequence[str],
    sdtypes: dict[str, str] | None = None,
    *,
    numeric_range: Literal["reference", "union"] = "reference",
) -> tuple[Encoded, list[Encoded], int]:
    """Encode ``reference`` and ``others`` into the packed space. Returns ``(ref, others, n_columns)``
    where ``n_columns`` is the number of columns the distance averages over (``columns``, constant ones
    included). ``numeric_range='reference'`` scales by the reference's range (SDMetrics);
    ``'union'`` by the range over all frames (anonymeter)."""
    columns = list(columns)
    if not columns:
        raise ValueError("encode_gower: no columns")
    sdtypes = sdtypes or column_sdtypes(reference, columns)
    frames = [reference, *others]
    sizes = [len(f) for f in frames]
    floats: list[list[np.ndarray]] = [[] for _ in frames]
    bits = [np.zeros(n, dtype=np.uint64) for n in sizes]
    onehot = [np.zeros(n, dtype=np.uint64) for n in sizes]
    cats: list[tuple[int, list[np.ndarray]]] = []
    for c in columns:
        kind = sdtypes.get(c, "categorical")
        if kind in ("numerical", "datetime"):
            vals = [_numeric_values(f[c], kind) for f in frames]
            base = vals[0] if numeric_range == "reference" else np.concatenate(vals)
            finite = base[~np.isnan(base)]
            lo = float(finite.min()) if finite.size else 0.0
            span = float(finite.max()) - lo if finite.size else 0.0
            for i, v in enumerate(vals):
                if span > 0:
                    x = np.clip((v - lo) / span, -_CLIP, _CLIP)
                else:  # constant reference column: 0 if equal, else "far" (distance capped at 1)
                    x = np.where(v == lo, 0.0, 4.0)
                x = x.astype(np.float32)
                x[np.isnan(v)] = _NAN_SENTINEL
                floats[i].append(x)
            continue
        # categorical / boolean: codes over all frames; missing is one more value (equal to itself)
        joined = pd.concat([f[c] for f in frames], ignore_index=True).astype(object)
        joined = joined.where(joined.notna(), None)
        codes, uniques = pd.factorize(joined, use_na_sentinel=False)
        if len(uniques) > 1:  # a column constant everywhere contributes 0 to every distance
            cats.append((len(uniques), np.split(codes.astype(np.int64), np.cumsum(sizes)[:-1])))
    # Pack the narrowest categorical columns first, while the reference keeps few enough distinct
    # signatures for the group pruning to pay; the rest are float code columns (same distance).
    packing = Packing(bits, onehot)
    for k, parts in sorted(cats, key=lambda kp: kp[0]):
        if not packing.add(k, parts, max_onehot=_MAX_ONEHOT):
            for i, p in enumerate(parts):
                floats[i].append(p.astype(np.float32))
    bits, onehot = packing.bits, packing.onehot
    out = []
    for i, n in enumerate(sizes):
        f = np.ascontiguousarray(np.stack(floats[i], axis=1)) if floats[i] else np.zeros((n, 0), np.float32)
        out.append(Encoded(f, bits[i], onehot[i]))
    return out[0], out[1:], len(columns)


def _signatures(bits: np.ndarray, onehot: np.ndarray) -> int:
    if bits.size == 0:
        return 0
    with np.errstate(over="ignore"):
        key = bits ^ (onehot * np.uint64(0x9E3779B97F4A7C15))  # a heuristic count: collisions don't matter
    return int(len(np.unique(key)))


class Packing:
    """The categorical words of several frames (the reference first) being packed, one column at a time.

    :meth:`add` packs a column of ``width`` categories given as codes per frame (``-1`` = none of
    them, which costs 1/2 against any category): a two-valued column without ``-1`` codes as one bit
    of ``bits`` (a mismatch costs 1), else as one-hot bits of ``onehot`` (1/2 per differing bit), as
    long as the words have room and the reference keeps at most ``_MAX_GROUPS`` distinct signatures.
    """

    def __init__(self, bits: list[np.ndarray], onehot: list[np.ndarray]):
        self.bits = bits
        self.onehot = onehot
        self.nbit = 0
        self.nhot = 0

    def add(self, width: int, codes: Sequence[np.ndarray], *, max_onehot: int = 64) -> bool:
        """Pack one column if it fits (True), else leave the words as they are (False)."""
        if width == 2 and self.nbit < 64 and all((c >= 0).all() for c in codes):
            trial = [b | ((c == 1).astype(np.uint64) << np.uint64(self.nbit)) for b, c in zip(self.bits, codes)]
            if _signatures(trial[0], self.onehot[0]) <= _MAX_GROUPS:
                self.bits, self.nbit = trial, self.nbit + 1
                return True
        elif width <= max_onehot and self.nhot + width <= 64:
            trial = [h | np.where(c >= 0, np.left_shift(np.uint64(1), (np.maximum(c, 0) + self.nhot).astype(np.uint64)),
                                  np.uint64(0)) for h, c in zip(self.onehot, codes)]
            if _signatures(self.bits[0], trial[0]) <= _MAX_GROUPS:
                self.onehot, self.nhot = trial, self.nhot + width
                return True
        return False


class GowerIndex:
    """Reference rows grouped by their packed categorical signature, ready for :meth:`search`."""

    def __init__(self, ref: Encoded):
        n = len(ref)
        if n == 0:
            raise ValueError("GowerIndex: empty reference")
        # group by (bits, onehot); a stable sort keeps reference order inside each group
        order = np.lexsort((ref.onehot, ref.bits)).astype(np.int64)
        b, h = ref.bits[order], ref.onehot[order]
        new = np.ones(n, dtype=bool)
        new[1:] = (b[1:] != b[:-1]) | (h[1:] != h[:-1])
        starts = np.flatnonzero(new)
        self.order = order
        self.sig_bits = np.ascontiguousarray(b[starts])
        self.sig_onehot = np.ascontiguousarray(h[starts])
        self.starts = np.append(starts, n).astype(np.int64)
        self.floats_t = np.ascontiguousarray(ref.floats[order].T)  # (d, n): columns contiguous
        self.max_group = int(np.diff(self.starts).max())
        self.size = n

    @property
    def groups(self) -> int:
        return int(self.sig_bits.shape[0])

    def search(self, query: Encoded, *, tie_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact nearest reference row of every query row: ``(sum_distance float64, index int64)``
        (the distance is the *sum* over columns; divide by the column count for the mean).

        Among tied rows the lowest index wins, or with ``tie_seed`` a pseudo-random one drawn
        independently for each query (deterministic for a seed)."""
        nq = len(query)
        if nq == 0:
            return np.zeros(0, np.float64), np.zeros(0, np.int64)
        best, idx = kernels().nearest(*self._kernel_args(query, "search"),
                                      -1 if tie_seed is None else int(tie_seed) & (2**62 - 1))
        return best.astype(np.float64), idx

    def search_squared(self, query: Encoded, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact ``k`` (1 or 2) nearest reference rows by squared Euclidean distance, for a packing of
        synthfactory's ``encode`` space (see :func:`synthfactory.privacy.neighbors.nearest_encoded`):
        ``(squared distances float32 (nq, k), indices (nq, k))``, the nearest at the lowest index
        among ties."""
        if k not in (1, 2):
            raise ValueError("search_squared: k must be 1 or 2")
        nq = len(query)
        if nq == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        best, idx = kernels().nearest_sq(*self._kernel_args(query, "search_squared"), k)
        return best[:, :k], idx[:, :k]

    def _kernel_args(self, query: Encoded, method: str) -> tuple:
        """The arguments the search kernels share, for a non-empty ``query`` (compiles them on first use)."""
        if query.floats.shape[1] != self.floats_t.shape[0]:
            raise ValueError(f"GowerIndex.{method}: query encoded in another space")
        kernels()
        import numba

        chunks = max(1, min(len(query), 16 * numba.get_num_threads()))
        return (np.ascontiguousarray(query.floats, dtype=np.float32), query.bits, query.onehot, self.floats_t,
                self.sig_bits, self.sig_onehot, self.starts, self.order, self.max_group, chunks)


def gower_nearest(
    query: pd.DataFrame,
    reference: pd.DataFrame,
    columns: Sequence[str],
    sdtypes: dict[str, str] | None = None,
    *,
    numeric_range: Literal["reference", "union"] = "reference",
) -> tuple[np.ndarray, np.ndarray]:
    """Mean Gower distance from each ``query`` row to its nearest ``reference`` row, and its index."""
    ref, (q,), n_cols = encode_gower(reference, [query], columns, sdtypes, numeric_range=numeric_range)
    d, i = GowerIndex(ref).search(q)
    return d / n_cols, i


# ------------------------------------------------------------------------------------------------
# numba kernels (in their own module, compiled on first use and cached on disk)
# ------------------------------------------------------------------------------------------------
def kernels():
    """The numba kernels module (:mod:`.kernels`): importing it loads numba and compiles on first use."""
    from synthfactory.privacy import kernels as module

    return module
