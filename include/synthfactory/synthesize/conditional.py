"""Conditional generation: rebalance a column to target proportions, or oversample a rare value by a factor.

Both become one *target distribution* over the values of a categorical/boolean column:

* ``rebalance: {column: gender, proportions: {female: .5, male: .5}}`` — the target is the given
  proportions (normalised; values not named get 0);
* ``oversample: {column: cond_e11_9, value: true, factor: 3}`` — the value's real share ``p`` becomes
  ``min(1, p * factor)``, and the other values share the rest in their real proportions.

Each sampling batch is apportioned to the values (largest remainder, so the totals are exact) and drawn
with SDV's ``sample_from_conditions`` and ``Condition`` objects (GaussianCopula conditions its copula
natively; the GANs fall back to SDV's reject sampling). Models without conditional sampling (the DP ones)
get plain reject sampling here. Rows of a batch are shuffled so values are not sorted.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from synthfactory.errors import ConfigError

log = logging.getLogger(__name__)


class ConditionalError(ConfigError, ValueError):
    """A rebalance/oversample setting does not fit the data (unknown column or value, numeric column)."""


def _match_value(key: Any, values: list[Any], column: str) -> Any:
    for v in values:
        if v == key or str(v).lower() == str(key).lower():
            return v
    raise ConditionalError(f"{column}: value {key!r} does not occur in the training data; known: "
                           f"{sorted(map(str, values))[:20]}")


@dataclass
class TargetDistribution:
    column: str
    mode: str                                   # rebalance | oversample
    target: dict[Any, float]                    # value -> share of synthetic rows
    real: dict[Any, float]                      # value -> share of training rows
    factor: float | None = None
    achieved: dict[Any, int] = field(default_factory=dict)

    def counts(self, n: int) -> dict[Any, int]:
        """Split ``n`` rows over the values by the target shares (largest remainder: sums to exactly n)."""
        values = list(self.target)
        raw = np.array([self.target[v] * n for v in values])
        base = np.floor(raw).astype(int)
        short = n - int(base.sum())
        for i in np.argsort(-(raw - base), kind="stable")[:short]:
            base[i] += 1
        return {v: int(c) for v, c in zip(values, base) if c > 0}

    def record(self, df: pd.DataFrame) -> None:
        """Count the values of a final (written) batch: the achieved proportions of the report."""
        for v, c in df[self.column].value_counts().items():
            self.achieved[v] = self.achieved.get(v, 0) + int(c)

    def report(self) -> dict:
        total = sum(self.achieved.values()) or 1
        return {
            "column": self.column, "mode": self.mode, "factor": self.factor,
            "target": {str(k): round(v, 4) for k, v in self.target.items()},
            "real": {str(k): round(v, 4) for k, v in self.real.items()},
            "achieved": {str(k): round(c / total, 4) for k, c in self.achieved.items()},
            "achieved_rows": {str(k): int(c) for k, c in self.achieved.items()},
        }


def plan_target(train_column: pd.Series, rebalance: dict | None = None,
                oversample: dict | None = None) -> TargetDistribution | None:
    """Build the target distribution from the spec's ``rebalance`` or ``oversample`` block (not both)."""
    if not rebalance and not oversample:
        return None
    if rebalance and oversample:
        raise ConditionalError("synthesizer: set either rebalance or oversample, not both")
    s = train_column
    column = str(s.name)
    if pd.api.types.is_float_dtype(s) or (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
                                          and s.nunique() > 20):
        raise ConditionalError(f"{column}: rebalance/oversample needs a categorical or boolean column")
    real_counts = s.dropna().value_counts()
    if real_counts.empty:
        raise ConditionalError(f"{column}: no values in the training data")
    real = (real_counts / real_counts.sum()).to_dict()
    values = list(real)
    if rebalance:
        props = {_match_value(k, values, column): float(v) for k, v in rebalance["proportions"].items()}
        total = sum(props.values())
        if total <= 0 or any(v < 0 for v in props.values()):
            raise ConditionalError(f"{column}: proportions must be >= 0 and sum to more than 0")
        target = {k: v / total for k, v in props.items() if v > 0}
        return TargetDistribution(column, "rebalance", target, real)
    value = _match_value(oversample["value"], values, column)
    factor = float(oversample["factor"])
    if factor <= 0:
        raise ConditionalError(f"{column}: oversample factor must be > 0")
    share = min(1.0, real[value] * factor)
    rest = 1.0 - real[value]
    target = {value: share}
    for v, p in real.items():
        if v != value and rest > 0:
            target[v] = (1.0 - share) * p / rest
    return TargetDistribution(column, "oversample", {k: v for k, v in target.items() if v > 0}, real, factor)


def _reject_sample(synth: Any, column: str, value: Any, n: int, draw: Any, max_rounds: int = 50) -> pd.DataFrame:
    got: list[pd.DataFrame] = []
    have = 0
    for _ in range(max_rounds):
        batch = draw(synth, max(n * 2, 100))
        keep = batch[batch[column] == value]
        if len(keep):
            got.append(keep)
            have += len(keep)
        if have >= n:
            break
    if have < n:
        raise ConditionalError(f"{column}={value!r}: reject sampling found only {have} of {n} rows in {max_rounds} "
                               "rounds (the model almost never generates this value)")
    return pd.concat(got, ignore_index=True).iloc[:n]


def conditional_sampler(target: TargetDistribution, table: str = "patients", seed: int = 0) -> Any:
    """A ``sampler(synth, n)`` for :func:`synthfactory.synthesize.engine.iter_batches` drawing each batch with
    the target distribution (call ``target.record`` on what is finally written)."""
    from synthfactory.synthesize.engine import sample_plain

    rng = np.random.default_rng(seed)

    def draw_plain(synth: Any, n: int) -> pd.DataFrame:
        return sample_plain(synth, n, table)

    def sampler(synth: Any, n: int) -> pd.DataFrame:
        counts = target.counts(n)
        parts = []
        if hasattr(synth, "sample_from_conditions"):
            from sdv.sampling import Condition

            conditions = [Condition({target.column: v}, num_rows=k) for v, k in counts.items()]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    out = synth.sample_from_conditions(conditions, max_tries_per_batch=200)
                    parts.append(out[table] if isinstance(out, dict) else out)
                except Exception as err:  # noqa: BLE001 - SDV raises ValueError/SamplingError variants
                    log.info("sample_from_conditions failed (%s); reject sampling instead", type(err).__name__)
                    parts = [_reject_sample(synth, target.column, v, k, draw_plain) for v, k in counts.items()]
        else:
            parts = [_reject_sample(synth, target.column, v, k, draw_plain) for v, k in counts.items()]
        df = pd.concat(parts, ignore_index=True)
        return df.iloc[rng.permutation(len(df))].reset_index(drop=True)

    return sampler
