"""EHR-aware reversible transforms between the modelling table and any synthesizer.

Clinical tables are not what generic synthesizers assume. A lab is missing for most patients, and *whether*
it was measured carries clinical meaning (HbA1c is measured in diabetics); SDV fills a missing number with
the mean and re-adds gaps at random, so the synthetic lab becomes a spike and "measured" loses its meaning.
Utilisation counts are mostly zero with a long tail; small counts are really categories; ages are
top-coded integers.

:class:`EhrTransformer` is fitted on the real training table and sits between it and the synthesizer, in the
spirit of RDT's HyperTransformer but clinical:

* **sparse numeric column** (a lab): a ``<col>__measured`` flag, and the value itself filled where it was not
  measured by a k-nearest-neighbour hot-deck draw from *observed* values of similar patients (so the model
  sees the observed distribution and its relationships, never a spike). The inverse restores the gap
  wherever the flag is false.
* **small count** (integers >= 0 with few distinct values): a category, so its exact shape (the zeros, the
  few ones and twos) is kept.
* **zero-inflated count** (many zeros, many values): a ``<col>__zero`` flag plus the positive part
  (zeros filled from positive values of similar patients). The inverse gives 0 or a positive integer.
* **integers** stay integers and every numeric column stays within its real range (ages stay top-coded).
* **typed columns** (a flat table's ``types``, :mod:`synthfactory.synthesize.flat`): a numeric column typed
  ordinal, categorical, boolean or sex is a set of *levels* (edema 0, 0.5, 1 is sampled as one of those, never
  0.3); a date is modelled as days since 1970 (with its own "measured" flag where missing) and comes back a date.

The fitted state holds column plans, ranges and category lists only, no rows: it is saved beside the model
and applied to every sampled batch. Column names of the synthetic output equal the input's.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

MEASURED = "__measured"
ZERO = "__zero"


@dataclass
class ColumnPlan:
    name: str
    kind: str                      # "passthrough" | "sparse" | "category" | "zero_inflated" | "numeric" | "levels"
    integer: bool = False
    date: bool = False             # a date column, modelled as days since 1970
    nullable: bool = False         # the real column had missing values
    low: float | None = None
    high: float | None = None
    categories: list[str] = field(default_factory=list)


class EhrTransformer:
    """Fit on the real training table; ``transform`` it for the synthesizer; ``inverse_transform`` every
    sampled batch back to the table's own columns, types and ranges."""

    def __init__(self, *, max_categories: int = 0, zero_share: float = 0.3, min_missing: float = 0.0,
                 neighbours: int = 5, seed: int = 0, types: dict[str, str] | None = None):
        self.types = dict(types or {})
        self.max_categories = int(max_categories)
        self.zero_share = float(zero_share)
        self.min_missing = float(min_missing)
        self.neighbours = int(neighbours)
        self.seed = int(seed)
        self.plans: dict[str, ColumnPlan] = {}
        self.columns: list[str] = []

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, df: pd.DataFrame, exclude: tuple[str, ...] = ()) -> "EhrTransformer":
        self.columns = [c for c in df.columns if c not in exclude]
        df = self._days(df)
        self.plans = {c: self._plan(c, df[c]) for c in self.columns}
        for c in self.columns:
            if self.types.get(c) == "date" or c in self._date_columns:
                self.plans[c].date = True
        kinds = pd.Series([p.kind for p in self.plans.values()]).value_counts().to_dict()
        log.info("EHR-aware transforms: %s", ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
        return self

    _date_columns: frozenset = frozenset()

    def _days(self, df: pd.DataFrame) -> pd.DataFrame:
        """``df`` with its date columns as float days since 1970 (the columns noted in ``_date_columns``)."""
        dates = [c for c in df.columns if pd.api.types.is_datetime64_any_dtype(df[c].dtype)]
        if not dates:
            return df
        self._date_columns = frozenset(self._date_columns | set(dates))
        out = df.copy()
        for c in dates:
            s = df[c].dt.tz_convert(None) if getattr(df[c].dt, "tz", None) is not None else df[c]
            out[c] = (s - pd.Timestamp("1970-01-01")) / pd.Timedelta(days=1)
        return out

    @staticmethod
    def _level(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        f = float(v)
        return str(int(f)) if f.is_integer() else repr(f)

    def _plan(self, name: str, s: pd.Series) -> ColumnPlan:
        if self.types.get(name) in ("ordinal", "categorical", "boolean", "sex") and \
                pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
            observed = pd.to_numeric(s, errors="coerce").dropna()
            levels = sorted(observed.unique())
            return ColumnPlan(name, "levels", integer=_all_integer(observed), nullable=bool(s.isna().any()),
                              categories=[self._level(v) for v in levels])
        if pd.api.types.is_bool_dtype(s.dtype):
            return ColumnPlan(name, "passthrough")
        if not pd.api.types.is_numeric_dtype(s.dtype):
            return ColumnPlan(name, "passthrough")
        values = pd.to_numeric(s, errors="coerce").astype("float64")
        observed = values.dropna()
        if observed.empty:
            return ColumnPlan(name, "passthrough")
        integer = bool(np.all(np.isclose(observed, np.round(observed))))
        missing = float(values.isna().mean())
        plan = ColumnPlan(name, "numeric", integer=integer, nullable=missing > 0,
                          low=float(observed.min()), high=float(observed.max()))
        distinct = observed.nunique()
        if integer and observed.min() >= 0 and distinct <= self.max_categories:
            plan.kind = "category"
            plan.categories = [str(int(v)) for v in sorted(observed.unique())]
        elif missing > self.min_missing:
            plan.kind = "sparse"
        elif integer and observed.min() >= 0 and float((observed == 0).mean()) >= self.zero_share \
                and (observed > 0).sum() >= 2:
            plan.kind = "zero_inflated"
            plan.low = float(observed[observed > 0].min())
        return plan

    # -- forward ---------------------------------------------------------------------------------
    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """The table the synthesizer is fitted on (flags added, gaps and zeros filled by hot-deck)."""
        df = self._days(df)
        out = df.copy()
        complete = self._complete_features(df)
        rng = np.random.default_rng(self.seed)
        for name, plan in self.plans.items():
            if plan.kind == "levels":
                out[name] = df[name].map(self._level).astype(object)
            elif plan.kind == "flag":
                out[name] = np.where(df[name].astype(bool).to_numpy(), "yes", "no").astype(object)
            elif plan.kind == "category":
                out[name] = df[name].map(lambda v: None if pd.isna(v) else str(int(round(float(v))))).astype(object)
            elif plan.kind == "sparse":
                values = pd.to_numeric(df[name], errors="coerce").astype("float64")
                measured = values.notna()
                out[name + MEASURED] = measured.to_numpy()
                out[name] = self._hot_deck(values, ~measured, complete, rng)
            elif plan.kind == "zero_inflated":
                values = pd.to_numeric(df[name], errors="coerce").astype("float64")
                zero = values.fillna(0) == 0
                out[name + ZERO] = zero.to_numpy()
                positive = values.where(~zero)
                out[name] = self._hot_deck(positive, zero, complete, rng)
        return out

    def _complete_features(self, df: pd.DataFrame) -> np.ndarray:
        """Standardised numeric view of the columns without gaps (booleans 0/1, categories one-hot for the
        most frequent levels): the space the hot-deck neighbours are found in."""
        parts = []
        for name in self.columns:
            s = df[name]
            if s.isna().any():
                continue
            if pd.api.types.is_bool_dtype(s.dtype):
                parts.append(s.astype("float64").to_numpy()[:, None])
            elif pd.api.types.is_numeric_dtype(s.dtype):
                v = s.astype("float64").to_numpy()
                sd = v.std()
                parts.append(((v - v.mean()) / sd)[:, None] if sd > 0 else np.zeros((len(v), 1)))
            else:
                top = s.astype(str).value_counts().index[:10]
                parts.append(np.stack([(s.astype(str) == t).to_numpy(dtype="float64") for t in top], axis=1))
        if not parts:
            return np.zeros((len(df), 1))
        return np.concatenate(parts, axis=1)

    def _hot_deck(self, values: pd.Series, fill: pd.Series, features: np.ndarray,
                  rng: np.random.Generator) -> pd.Series:
        """``values`` with the rows in ``fill`` replaced by the value of a random one of the ``neighbours``
        nearest rows that have a value (nearest in ``features``)."""
        out = values.to_numpy(dtype="float64").copy()
        donors = np.flatnonzero(~fill.to_numpy() & ~np.isnan(out))
        targets = np.flatnonzero(fill.to_numpy())
        if targets.size == 0 or donors.size == 0:
            return pd.Series(out, index=values.index)
        k = min(self.neighbours, donors.size)
        if donors.size <= k:
            picks = rng.choice(donors, size=targets.size)
        else:
            from sklearn.neighbors import NearestNeighbors

            nn = NearestNeighbors(n_neighbors=k).fit(features[donors])
            _, idx = nn.kneighbors(features[targets])
            picks = donors[idx[np.arange(targets.size), rng.integers(0, k, size=targets.size)]]
        out[targets] = out[picks]
        return pd.Series(out, index=values.index)

    # -- inverse ---------------------------------------------------------------------------------
    def inverse_transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """A sampled batch back to the real table's columns: gaps where not measured, zeros where zero,
        integers rounded, every value inside the real range."""
        out = df.copy()
        for name, plan in self.plans.items():
            if name not in out.columns:
                continue
            if plan.kind == "levels":
                out[name] = pd.to_numeric(out[name].astype(object), errors="coerce").astype("float64")
                if plan.integer and not out[name].isna().any():
                    out[name] = out[name].astype("int64")
                continue
            if plan.kind == "flag":
                out[name] = out[name].astype(str).eq("yes").to_numpy()
                continue
            if plan.kind == "category":
                vals = pd.to_numeric(out[name], errors="coerce")
                out[name] = vals.astype("float64") if vals.isna().any() else vals.astype("int64")
                continue
            if plan.kind == "passthrough":
                continue
            vals = pd.to_numeric(out[name], errors="coerce").astype("float64")
            if plan.low is not None:
                vals = vals.clip(lower=plan.low, upper=plan.high)
            if plan.integer:
                vals = vals.round()
            if plan.kind == "sparse":
                flag = out.pop(name + MEASURED).astype(bool) if name + MEASURED in out else True
                vals = vals.where(flag)
            elif plan.kind == "zero_inflated":
                zero = out.pop(name + ZERO).astype(bool) if name + ZERO in out else False
                vals = vals.where(~zero, 0.0)
            if plan.date:
                out[name] = (pd.Timestamp("1970-01-01") + pd.to_timedelta(vals.round(), unit="D")).astype(
                    "datetime64[ns]")
            elif plan.integer and not vals.isna().any():
                out[name] = vals.astype("int64")
            else:
                out[name] = vals
        return out[[c for c in df.columns if not c.endswith((MEASURED, ZERO))]]

    def gates(self) -> dict[str, tuple[str, bool]]:
        """{value column: (its flag column, the flag value meaning "no value")} of the split columns: a model that
        draws the flag first can fit the value on the rows that have one (the CART synthesizer's ``gates``)."""
        out: dict[str, tuple[str, bool]] = {}
        for name, plan in self.plans.items():
            if plan.kind == "zero_inflated":
                out[name] = (name + ZERO, True)
            elif plan.kind == "sparse":
                out[name] = (name + MEASURED, False)
        return out

    # -- metadata and state ----------------------------------------------------------------------
    def sdtypes(self, columns: dict[str, dict]) -> dict[str, dict]:
        """SDV column metadata for the transformed table from the real table's (``columns``)."""
        out = dict(columns)
        for name, plan in self.plans.items():
            if plan.kind in ("category", "flag", "levels"):
                out[name] = {"sdtype": "categorical"}
            elif plan.date:
                out[name] = {"sdtype": "numerical"}
            if plan.kind in ("category", "flag", "levels"):
                pass
            elif plan.kind == "sparse":
                out[name + MEASURED] = {"sdtype": "boolean"}
            elif plan.kind == "zero_inflated":
                out[name + ZERO] = {"sdtype": "boolean"}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "columns": self.columns, "plans": [asdict(p) for p in self.plans.values()],
                "settings": {"max_categories": self.max_categories, "zero_share": self.zero_share,
                             "min_missing": self.min_missing, "neighbours": self.neighbours, "seed": self.seed,
                             "types": self.types}}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "EhrTransformer":
        self = cls(**state.get("settings", {}))
        self.columns = list(state["columns"])
        self.plans = {p["name"]: ColumnPlan(**p) for p in state["plans"]}
        return self

    def summary(self) -> dict[str, list[str]]:
        """Columns per transform kind (for the synthesis report and the data card)."""
        out: dict[str, list[str]] = {}
        for name, plan in self.plans.items():
            if plan.kind not in ("passthrough", "numeric"):
                out.setdefault(plan.kind, []).append(name)
        return out


def _all_integer(values: pd.Series) -> bool:
    v = values.astype("float64")
    return bool(np.all(np.isclose(v, np.round(v))))


class ClinicalSynthesizer:
    """A fitted synthesizer of any kind behind the EHR-aware transforms: it was trained on
    ``transformer.transform(train)``, and every sampled batch comes back through ``inverse_transform``.
    It offers what the engine uses of a synthesizer (``sample``, ``sample_from_conditions`` where the inner
    model has it, ``save``, ``members`` for device moves, ``reseed``)."""

    def __init__(self, inner: Any, transformer: EhrTransformer, table: str):
        self.inner = inner
        self.transformer = transformer
        self.table = table

    def members(self) -> list[Any]:
        return [self.inner]

    def _frame(self, part: Any) -> pd.DataFrame:
        if isinstance(part, dict):
            part = part[self.table] if self.table in part else next(iter(part.values()))
        return self.transformer.inverse_transform(part.reset_index(drop=True))

    def sample(self, num_rows: int) -> pd.DataFrame:
        return self._frame(self.inner.sample(num_rows=num_rows))

    def __getattr__(self, name: str) -> Any:
        """Anything else is the inner model's (``fit_info``, ``privacy``, ...); conditional sampling comes back
        through the inverse transform."""
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        if name == "sample_from_conditions" and hasattr(inner, name):
            return lambda conditions, **kw: self._frame(inner.sample_from_conditions(conditions, **kw))
        return getattr(inner, name)

    def save(self, path: str) -> None:
        import cloudpickle

        with open(path, "wb") as fh:
            cloudpickle.dump(self, fh)
