"""Differentially private synthesis with smartnoise-synth (MST or AIM) behind the engine's interface.

MST and AIM learn noisy low-order marginals of *discrete* data, so every numeric column is cut into bins, and
how it is cut decides most of the fidelity on clinical tables (smartnoise's own equal-width bins over wide
bounds put a whole count column in one bin: a worst column of 0). Everything here that looks at the real rows is
either inside the DP accounting or declared public:

* **Bounds.** Public where we know them (``synthesizer.dp.bounds`` in the spec; ``age`` is top-coded at 90).
  Otherwise they are estimated with DP, spending ``preprocessor_epsilon`` (default 25 % of ε, split evenly over
  the columns that need it): a Laplace-noised histogram over a data-independent grid of power-of-two ranges
  (± 2^k, after Desfontaines' approximate bounds, as smartnoise does), keeping the outermost cells whose
  noisy count clears a threshold. When no cell does (too few rows for that ε), the fit refuses naming the
  columns (:class:`DPBoundsError`): give public bounds or more ε. With ``dp.estimate_bounds: false``,
  ``validate`` refuses a spec whose numeric features lack public bounds, naming them.
* **Bins: data-independent edges** within the bounds, the DP-safe counterparts of the EHR-aware transforms
  (:mod:`synthfactory.synthesize.transforms`, whose quantile bins come from the real values and so stay off
  here): an integer column of at most ``2 × bins`` values gets one bin per value; a count (``n_*``, integer,
  lower bound ≥ 0) gets geometric edges 0, 1, 2, 3, 4, 6, 8, 12, ... (zero-inflated, long-tailed utilisation counts); a
  measurement gets ``bins`` equal-width bins. A lab's "measured" flag is the column's null cell (categorical,
  measured like any marginal). Categories and booleans are label-encoded (their category sets are taken as
  public, as smartnoise does).
* **Sampling back** is post-processing: a value drawn uniformly within its bin (rounded for integer columns),
  not the bin's midpoint, so a column's shape is a histogram of the bins, not a comb.

The accounting (total ε, ε spent on bounds, ε left for the marginals, δ) is recorded in :attr:`privacy` and lands
in the fit summary and ``reports/synthesis.json``; the dataset's privacy budget across runs is
:mod:`synthfactory.synthesize.budget`. δ defaults to ``1 / (n · sqrt(n))`` (smartnoise's guidance for n rows).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Any

import numpy as np
import pandas as pd

from synthfactory import kinds
from synthfactory.spec import SpecError

log = logging.getLogger(__name__)

PUBLIC_BOUNDS = {"age": (0.0, 90.0)}  # top-coded at 90 by the modelling table (HIPAA Safe Harbor)
GRID_STEPS = 1                         # bounds grid: one cell per power of two
GRID_POWERS = (-8, 40)
PRE_SHARE = 0.25                       # default share of ε for the bounds of columns without public bounds                 # |x| from 2^-8 to 2^40, plus a cell for 0


class DPBoundsError(SpecError):
    """A numeric column without public bounds whose DP bounds could not be estimated within the budget."""


def _grid_edges() -> np.ndarray:
    lo, hi = GRID_POWERS
    pos = 2.0 ** (np.arange(lo * GRID_STEPS, hi * GRID_STEPS + 1) / GRID_STEPS)
    return np.concatenate([-pos[::-1], [0.0], pos])


def dp_bounds(values: np.ndarray, epsilon: float, *, failure: float = 0.01) -> tuple[float, float] | None:
    """(lower, upper) of ``values`` (NaN ignored) by an ε-DP noisy histogram over a data-independent grid; None
    when no cell's noisy count clears the threshold. One row changes one cell by one: L1 sensitivity 1."""
    import opendp.prelude as dp

    dp.enable_features("floating-point", "contrib")
    edges = _grid_edges()
    v = values[~np.isnan(values)]
    v = np.clip(v, edges[0], edges[-1])
    counts = np.histogram(v, bins=edges)[0].astype(float)
    meas = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l1_distance(T=float),
                             1.0 / epsilon)
    noisy = np.asarray(meas(counts.tolist()))
    # an empty cell clears the threshold with probability <= failure / cells (Laplace tail); the bounds are the run
    # of cells around the noisy mode that clear it (one-cell gaps bridged) plus one cell each side, and zero when its
    # cell clears it, so a stray noisy cell far out (2^40) cannot stretch them; values beyond fall in the edge bins
    threshold = math.log(len(counts) / (2 * failure)) / epsilon
    top = int(np.argmax(noisy))
    if noisy[top] <= threshold:
        return None
    lo = hi = top
    while lo > 0 and (noisy[lo - 1] > threshold or (lo > 1 and noisy[lo - 2] > threshold)):
        lo -= 1 if noisy[lo - 1] > threshold else 2
    while hi < len(noisy) - 1 and (noisy[hi + 1] > threshold or (hi < len(noisy) - 2 and noisy[hi + 2] > threshold)):
        hi += 1 if noisy[hi + 1] > threshold else 2
    lo, hi = max(lo - 1, 0), min(hi + 1, len(noisy) - 1)  # one cell of margin: the tails of the bulk
    lower, upper = float(edges[lo]), float(edges[hi + 1])
    zero = int(np.searchsorted(edges, 0.0, side="right")) - 1  # the cell [0, 2^-8): zeros of a count or a flag
    if noisy[zero] > threshold:
        lower, upper = min(lower, 0.0), max(upper, float(edges[zero + 1]))
    return lower, upper


def is_count(column: str) -> bool:
    """The modelling table's utilisation counts (``n_encounters``, ``n_conditions``): zero-inflated, long-tailed."""
    return column.startswith("n_")


def bin_edges(lower: float, upper: float, *, integer: bool, bins: int, count: bool = False) -> np.ndarray:
    """Data-independent bin edges over [lower, upper] (see the module docstring)."""
    if integer:
        lo, hi = math.floor(lower), math.ceil(upper)
        if hi - lo + 1 <= 2 * bins:  # one bin per integer value
            return np.arange(lo, hi + 2, dtype=float) - 0.5
        if count and lo >= 0:  # counts: 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ... up to the upper bound
            edges = [0.0, 1.0, 2.0, 3.0, 4.0]
            while edges[-1] <= hi:
                edges.append(edges[-1] * 1.5 if len(edges) % 2 else edges[-2] * 2)
            return np.array([lo - 0.5] + [e - 0.5 for e in edges[1:] if lo < e - 0.5 < hi + 0.5] + [hi + 0.5])
    return np.linspace(lower, upper, bins + 1)


class DPSynthesizer:
    """``fit({table: df})`` / ``sample(num_rows)`` / ``save(path)`` like an SDV single-table synthesizer."""

    def __init__(self, kind: str = "dp_mst", epsilon: float = 3.0, delta: float | None = None,
                 preprocessor_epsilon: float | None = None, bins: int = 20,
                 bounds: dict[str, tuple[float, float]] | None = None, table: str = "patients",
                 estimate_bounds: bool = True, **extra: Any):
        if kind not in kinds.DP:
            raise SpecError(f"synthesizer.kind: unknown DP synthesizer {kind!r}; choose one of {sorted(kinds.DP)}")
        if epsilon <= 0:
            raise SpecError("synthesizer.dp.epsilon: must be > 0")
        foreign = kinds.foreign_params(kind, extra)
        if foreign:
            raise SpecError(f"synthesizer.params: {kind} does not take {', '.join(foreign)}")
        self.kind = kind
        self.epsilon = float(epsilon)
        self.delta = delta
        self.preprocessor_epsilon = preprocessor_epsilon
        self.bins = int(bins)
        self.bounds = {**PUBLIC_BOUNDS, **{k: tuple(v) for k, v in (bounds or {}).items()}}
        self.estimate_bounds = estimate_bounds
        self.table = table
        self.extra = extra  # passed to the smartnoise constructor (e.g. AIM's max_model_size)
        self._model: Any = None
        self._columns: list[str] = []
        self._dtypes: dict[str, str] = {}
        self._edges: dict[str, np.ndarray] = {}
        self._rng = np.random.default_rng()
        self.privacy: dict[str, Any] = {}
        self._fitted = False

    @property
    def mechanism(self) -> str:
        """smartnoise-synth's synthesizer for this kind (its registry entry's ``dp_mechanism``)."""
        return kinds.get(self.kind).dp_mechanism

    # -- fit --------------------------------------------------------------------------------------
    def _numeric(self, df: pd.DataFrame) -> list[str]:
        return [c for c in df.columns
                if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]

    def _bounds(self, df: pd.DataFrame, numeric: list[str]) -> tuple[dict[str, tuple[float, float]], float]:
        """Public bounds, else DP-estimated ones (spending the preprocessor share evenly). Returns (bounds, ε)."""
        bounds = {c: self.bounds[c] for c in numeric if c in self.bounds}
        inferred = [c for c in numeric if c not in bounds]
        if not inferred:
            return bounds, 0.0
        if not self.estimate_bounds:
            raise DPBoundsError(f"synthesizer.dp.bounds: no public bounds for {', '.join(inferred)} and "
                                "dp.estimate_bounds is false")
        pre = self.preprocessor_epsilon if self.preprocessor_epsilon is not None else PRE_SHARE * self.epsilon
        if not 0 < pre < self.epsilon:
            raise SpecError("synthesizer.dp.preprocessor_epsilon: must be > 0 and < epsilon when a numeric "
                            f"column has no public bounds ({', '.join(inferred)}); or give dp.bounds")
        failed = []
        for c in inferred:
            found = dp_bounds(df[c].to_numpy(dtype=float), pre / len(inferred))
            if found is None:
                failed.append(c)
            else:
                bounds[c] = found
        if failed:
            raise DPBoundsError(
                f"synthesizer.dp: could not estimate bounds of {', '.join(failed)} with ε {pre / len(inferred):.3g} "
                f"each ({len(df)} rows: too few for that share of ε); give public bounds in synthesizer.dp.bounds "
                f"(e.g. {failed[0]}: [low, high]) or a larger synthesizer.dp.preprocessor_epsilon")
        return bounds, pre

    def fit(self, data: dict[str, pd.DataFrame] | pd.DataFrame) -> None:
        from snsynth import Synthesizer
        from snsynth.transform import BinTransformer, LabelTransformer, TableTransformer

        df = data[self.table] if isinstance(data, dict) else data
        df = df.copy()
        for c in df.columns:  # smartnoise wants plain object categories
            if isinstance(df[c].dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(df[c]):
                df[c] = df[c].astype(object).where(df[c].notna(), None)
        n = len(df)
        delta = self.delta if self.delta is not None else 1.0 / (n * math.sqrt(n))
        numeric = self._numeric(df)
        bounds, pre_eps = self._bounds(df, numeric)
        transformers = []
        coded = pd.DataFrame(index=df.index)
        for c in df.columns:
            nullable = bool(df[c].isna().any())
            if c in numeric:
                lo, hi = bounds[c]
                edges = bin_edges(lo, hi, integer=pd.api.types.is_integer_dtype(df[c]), bins=self.bins,
                                  count=is_count(c))
                self._edges[c] = edges
                k = len(edges) - 1
                vals = df[c].to_numpy(dtype=float)
                code = np.clip(np.searchsorted(edges, vals, side="right") - 1, 0, k - 1).astype(float) + 0.5
                coded[c] = np.where(np.isnan(vals), np.nan, code)
                # public domain 0..k-1 (every bin exists whether or not a real row falls in it)
                transformers.append(BinTransformer(bins=k, lower=0.0, upper=float(k), nullable=nullable))
            else:
                coded[c] = df[c]
                transformers.append(LabelTransformer(nullable=nullable))
        tt = TableTransformer(transformers)
        self._model = Synthesizer.create(self.mechanism, epsilon=self.epsilon - pre_eps, delta=delta, **self.extra)
        with contextlib.redirect_stdout(io.StringIO()):  # smartnoise prints its budget split
            self._model.fit(coded, transformer=tt, preprocessor_eps=0.0)
        self._columns = list(df.columns)
        self._dtypes = {c: str(df[c].dtype) for c in df.columns}
        self.privacy = {
            "mechanism": self.mechanism, "epsilon": self.epsilon, "delta": delta,
            "epsilon_bounds": round(pre_eps, 6), "epsilon_marginals": round(self.epsilon - pre_eps, 6),
            "bins": {c: len(e) - 1 for c, e in self._edges.items()},
            "public_bounds": sorted(c for c in numeric if c in self.bounds),
            "dp_bounds": [c for c in numeric if c not in self.bounds], "rows": n,
            "neighbouring": "add/remove one patient row",
        }
        self._fitted = True
        log.info("fitted %s with epsilon=%.3g delta=%.3g (bounds %.3g, marginals %.3g)", self.kind, self.epsilon,
                 delta, pre_eps, self.epsilon - pre_eps)

    # -- sample -----------------------------------------------------------------------------------
    def _decode(self, c: str, codes: pd.Series) -> np.ndarray:
        """Bin codes back to values: uniform within the bin (post-processing of the DP output)."""
        edges = self._edges[c]
        raw = codes.to_numpy(dtype=float)
        out = np.full(len(raw), np.nan)
        ok = ~np.isnan(raw)
        idx = np.clip(np.floor(raw[ok]).astype(int), 0, len(edges) - 2)
        out[ok] = self._rng.uniform(edges[idx], edges[idx + 1])
        if self._dtypes[c].startswith("int"):
            out[ok] = np.clip(np.rint(out[ok]), math.ceil(edges[0]), math.floor(edges[-1]))
        return out

    def sample(self, num_rows: int) -> pd.DataFrame:
        out = self._model.sample(int(num_rows))
        if not isinstance(out, pd.DataFrame):
            out = pd.DataFrame(out, columns=self._columns)
        out = out[self._columns].sample(frac=1.0, random_state=int(self._rng.integers(0, 2**31 - 1)))
        out = out.reset_index(drop=True)
        for c, dt in self._dtypes.items():
            if c in self._edges:
                vals = self._decode(c, out[c])
                if dt.startswith("int") and not np.isnan(vals).any():
                    out[c] = vals.astype(dt)
                else:
                    out[c] = vals.astype(float)
            elif dt == "bool":
                out[c] = out[c].astype(bool)
        return out

    def reseed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        np.random.seed(seed % (2**32))

    def save(self, path: str) -> None:
        import cloudpickle

        with open(path, "wb") as fh:
            cloudpickle.dump(self, fh)
