"""Differentially private synthesis with smartnoise-synth (MST or AIM) behind the engine's interface.

MST and AIM learn noisy low-order marginals of *discrete* data, so numeric columns are binned. Bin
bounds are themselves information about the real data: they come from public knowledge where we have
it (``bounds`` in the spec; ``age`` is top-coded at 90, flags are booleans) and otherwise are estimated
by smartnoise's DP bounds estimator, which spends ``preprocessor_epsilon`` out of the total ε. The
accounting (total ε, ε spent on bounds, ε left for the marginals, δ) is recorded in :attr:`privacy` and
lands in the fit summary and ``reports/synthesis.json``.

δ defaults to ``1 / (n · sqrt(n))`` (smartnoise's guidance for n training rows).
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


class DPSynthesizer:
    """``fit({table: df})`` / ``sample(num_rows)`` / ``save(path)`` like an SDV single-table synthesizer."""

    def __init__(self, kind: str = "dp_mst", epsilon: float = 3.0, delta: float | None = None,
                 preprocessor_epsilon: float | None = None, bins: int = 10,
                 bounds: dict[str, tuple[float, float]] | None = None, table: str = "patients", **extra: Any):
        if kind not in kinds.DP:
            raise SpecError(f"synthesizer.kind: unknown DP synthesizer {kind!r}; choose one of {sorted(kinds.DP)}")
        if epsilon <= 0:
            raise SpecError("synthesizer.dp.epsilon: must be > 0")
        self.kind = kind
        self.epsilon = float(epsilon)
        self.delta = delta
        self.preprocessor_epsilon = preprocessor_epsilon
        self.bins = int(bins)
        self.bounds = {**PUBLIC_BOUNDS, **{k: tuple(v) for k, v in (bounds or {}).items()}}
        self.table = table
        self.extra = extra  # passed to the smartnoise constructor (e.g. AIM's max_model_size)
        self._model: Any = None
        self._columns: list[str] = []
        self._dtypes: dict[str, str] = {}
        self.privacy: dict[str, Any] = {}
        self._fitted = False

    @property
    def mechanism(self) -> str:
        """smartnoise-synth's synthesizer for this kind (its registry entry's ``dp_mechanism``)."""
        return kinds.get(self.kind).dp_mechanism

    # -- fit --------------------------------------------------------------------------------------
    def _transformer(self, df: pd.DataFrame) -> tuple[Any, list[str]]:
        from snsynth.transform import BinTransformer, LabelTransformer, TableTransformer

        constraints: dict[str, Any] = {}
        inferred: list[str] = []
        for c in df.columns:
            s = df[c]
            nullable = bool(s.isna().any())
            if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
                constraints[c] = LabelTransformer(nullable=nullable)
            elif c in self.bounds:
                lo, hi = self.bounds[c]
                constraints[c] = BinTransformer(bins=self.bins, lower=lo, upper=hi, nullable=nullable)
            else:
                inferred.append(c)
        if not inferred:
            return TableTransformer([constraints[c] for c in df.columns]), inferred
        tt = TableTransformer.create(df, style="cube", nullable=bool(df[inferred].isna().any().any()),
                                     continuous_columns=inferred, constraints=constraints)
        for c, t in zip(df.columns, tt.transformers):  # same bin count for the inferred ones
            if c in inferred and hasattr(t, "bins"):
                t.bins = self.bins
        return tt, inferred

    def fit(self, data: dict[str, pd.DataFrame] | pd.DataFrame) -> None:
        from snsynth import Synthesizer

        df = data[self.table] if isinstance(data, dict) else data
        df = df.copy()
        for c in df.columns:  # smartnoise wants plain object categories
            if isinstance(df[c].dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(df[c]):
                df[c] = df[c].astype(object).where(df[c].notna(), None)
        n = len(df)
        delta = self.delta if self.delta is not None else 1.0 / (n * math.sqrt(n))
        tt, inferred = self._transformer(df)
        pre_eps = 0.0
        if inferred:
            pre_eps = self.preprocessor_epsilon if self.preprocessor_epsilon is not None else 0.1 * self.epsilon
            if not 0 < pre_eps < self.epsilon:
                raise SpecError("synthesizer.dp.preprocessor_epsilon: must be > 0 and < epsilon when a numeric "
                                 f"column has no public bounds ({', '.join(inferred)}); or give dp.bounds")
        self._model = Synthesizer.create(self.mechanism, epsilon=self.epsilon, delta=delta, **self.extra)
        with contextlib.redirect_stdout(io.StringIO()):  # smartnoise prints its budget split
            self._model.fit(df, transformer=tt, preprocessor_eps=pre_eps)
        spent = float(tt.odometer.spent[0]) if inferred else 0.0
        self._columns = list(df.columns)
        self._dtypes = {c: str(df[c].dtype) for c in df.columns}
        self.privacy = {
            "mechanism": self.mechanism, "epsilon": self.epsilon, "delta": delta,
            "epsilon_bounds": round(spent, 6), "epsilon_marginals": round(self.epsilon - spent, 6),
            "bins": self.bins, "public_bounds": sorted(c for c in df.columns if c in self.bounds),
            "dp_bounds": inferred, "rows": n,
        }
        self._fitted = True
        log.info("fitted %s with epsilon=%.3g delta=%.3g (bounds %.3g, marginals %.3g)", self.kind, self.epsilon,
                 delta, spent, self.epsilon - spent)

    # -- sample -----------------------------------------------------------------------------------
    def sample(self, num_rows: int) -> pd.DataFrame:
        out = self._model.sample(int(num_rows))
        if not isinstance(out, pd.DataFrame):
            out = pd.DataFrame(out, columns=self._columns)
        out = out[self._columns].sample(frac=1.0, random_state=np.random.randint(0, 2**31 - 1))
        out = out.reset_index(drop=True)
        for c, dt in self._dtypes.items():  # bin midpoints back to the real column's type
            if dt.startswith("int") and out[c].notna().all():
                out[c] = np.floor(out[c].astype(float)).astype(dt)
            elif dt == "bool":
                out[c] = out[c].astype(bool)
            elif dt.startswith("float"):
                out[c] = out[c].astype(float)
        return out

    def save(self, path: str) -> None:
        import cloudpickle

        with open(path, "wb") as fh:
            cloudpickle.dump(self, fh)
