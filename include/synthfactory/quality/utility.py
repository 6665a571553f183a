"""Machine-learning utility: do models trained on the synthetic data work on real patients?

Train-synthetic-test-real (TSTR) against train-real-test-real (TRTR): the same scikit-learn
``HistGradientBoosting`` model, fitted once on the synthetic table and once on the real train split,
both scored on the real holdout that neither the synthesizer nor the models saw. The figure the gate
reads is ``ratio = TSTR / TRTR`` (1.0 = the synthetic data is as useful as the real data).

* binary target (bool, or two values): ROC AUC of the positive class (``True``, else the later of
  the two sorted values);
* numeric target: R²;
* other categorical targets: balanced accuracy.

A feature that alone predicts a binary target on the real train split with a ROC AUC of at least ``leak_auc``
(0.98; the better of the two directions, missing values as a level of their own) says the outcome, rather
than predicting it (a follow-up field filled only for the dead, a date of death): it inflates both scores and
hides what the synthetic data lose. Such features are flagged (``leaking_features``) and, with
``keep_leaking_features=False`` (the quality stage's default for a flat table), left out of both models; the
note says which.

scikit-learn is imported lazily. Only scores and counts are returned and logged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ml_utility"]

log = logging.getLogger(__name__)

MAX_CATEGORIES = 250  # HistGradientBoosting's categorical support is limited to max_bins (255) categories


def _threads() -> int:
    """OpenMP threads for the two model fits ($SYNTHFACTORY_UTILITY_THREADS, default 1). On a busy worker, where
    other tasks hold the cores, OpenMP's barriers make HistGradientBoosting many times slower with 2+ threads
    (measured: 1,500 rows, 2 cores under load, 27 s with 2 threads vs 0.7 s with one)."""
    try:
        return max(1, int(os.environ.get("SYNTHFACTORY_UTILITY_THREADS", "1")))
    except ValueError:
        return 1


def _task(target: pd.Series) -> str:
    values = target.dropna()
    if pd.api.types.is_bool_dtype(target.dtype) or values.nunique() == 2:
        return "binary"
    if pd.api.types.is_numeric_dtype(target.dtype) and not pd.api.types.is_bool_dtype(target.dtype):
        return "regression"
    return "multiclass"


def _positive(values: pd.Series) -> Any:
    uniq = sorted(values.dropna().unique().tolist(), key=lambda v: (type(v).__name__, str(v)))
    if True in uniq:
        return True
    return uniq[-1]


def _encoder(reference: pd.DataFrame, features: Sequence[str]) -> tuple[list[str], dict[str, list]]:
    """Usable features and, for categorical ones, their category list (from the real train split)."""
    kept: list[str] = []
    categories: dict[str, list] = {}
    for col in features:
        s = reference[col]
        if pd.api.types.is_bool_dtype(s.dtype) or pd.api.types.is_numeric_dtype(s.dtype) or \
                pd.api.types.is_datetime64_any_dtype(s.dtype):
            kept.append(col)
            continue
        cats = sorted({str(v) for v in s.dropna().unique()})
        if 0 < len(cats) <= MAX_CATEGORIES:
            kept.append(col)
            categories[col] = cats
    return kept, categories


def _matrix(df: pd.DataFrame, features: Sequence[str], categories: dict[str, list]) -> pd.DataFrame:
    out = {}
    for col in features:
        s = df[col]
        if col in categories:
            out[col] = pd.Categorical(s.map(lambda v: None if pd.isna(v) else str(v)), categories=categories[col])
        elif pd.api.types.is_datetime64_any_dtype(s.dtype):
            ts = s.dt.tz_convert(None) if getattr(s.dt, "tz", None) is not None else s
            out[col] = (ts - pd.Timestamp("1970-01-01")).dt.days.astype("float64")
        else:
            out[col] = pd.to_numeric(s.astype("float64") if pd.api.types.is_bool_dtype(s.dtype) else s,
                                     errors="coerce").astype("float64")
    return pd.DataFrame(out, index=df.index)


def _fit_score(task: str, x_train: pd.DataFrame, y_train: np.ndarray, x_test: pd.DataFrame, y_test: np.ndarray,
               seed: int) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import balanced_accuracy_score, r2_score, roc_auc_score

    # early stopping on a seeded 10 % validation split from 1,000 rows up (scikit-learn's "auto" waits for 10,000)
    stop = len(x_train) >= 1000
    if task == "regression":
        model = HistGradientBoostingRegressor(random_state=seed, categorical_features="from_dtype",
                                              early_stopping=stop)
        model.fit(x_train, y_train)
        return float(r2_score(y_test, model.predict(x_test)))
    if len(np.unique(y_train)) < 2:
        # a training table with a single class can only give a constant prediction
        return 0.5 if task == "binary" else float(balanced_accuracy_score(y_test, np.full(len(y_test), y_train[0])))
    model = HistGradientBoostingClassifier(random_state=seed, categorical_features="from_dtype", early_stopping=stop)
    model.fit(x_train, y_train)
    if task == "binary":
        return float(roc_auc_score(y_test, model.predict_proba(x_test)[:, list(model.classes_).index(1)]))
    return float(balanced_accuracy_score(y_test, model.predict(x_test)))


def single_feature_auc(x: pd.Series, y: np.ndarray) -> float | None:
    """ROC AUC of one feature alone for a 0/1 label (the better direction; a category scores by its rate of
    positives, a missing value is a level of its own); None when the label has one class."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return None
    if pd.api.types.is_numeric_dtype(x.dtype) or pd.api.types.is_bool_dtype(x.dtype) or \
            pd.api.types.is_datetime64_any_dtype(x.dtype):
        v = pd.to_numeric(x.astype("int64") if pd.api.types.is_datetime64_any_dtype(x.dtype) else x,
                          errors="coerce").astype("float64")
        if v.isna().any():  # missing as its own level: below and above every value, the better of the two
            lo, hi = v.min() - 1, v.max() + 1
            scores = [v.fillna(lo).to_numpy(), v.fillna(hi).to_numpy()]
        else:
            scores = [v.to_numpy()]
    else:
        levels = x.astype(object).map(lambda t: "\0missing" if pd.isna(t) else str(t))
        rate = pd.Series(y, index=x.index).groupby(levels).mean()
        scores = [levels.map(rate).to_numpy(dtype="float64")]
    best = 0.5
    for s in scores:
        if np.nanstd(s) == 0:
            continue
        auc = float(roc_auc_score(y, s))
        best = max(best, auc, 1.0 - auc)
    return best


def leaking_features(train: pd.DataFrame, target: str, features: Sequence[str], positive: Any,
                     threshold: float) -> list[dict]:
    """Features whose AUC alone on the real train split is at least ``threshold``, best first."""
    y = (train[target] == positive).to_numpy().astype(int)
    out = []
    for col in features:
        auc = single_feature_auc(train[col], y)
        if auc is not None and auc >= threshold:
            out.append({"feature": col, "auc": round(auc, 4)})
    return sorted(out, key=lambda d: -d["auc"])


def ml_utility(
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    synthetic: pd.DataFrame,
    *,
    target: str,
    features: Sequence[str] = (),
    max_train_rows: int = 25_000,
    min_class_rows: int = 10,
    seed: int = 0,
    leak_auc: float | None = 0.98,
    keep_leaking_features: bool = True,
) -> dict:
    """TSTR vs TRTR for ``target`` (see the module docstring).

    ``features`` empty = every column the three tables share except the target. Both training tables
    are subsampled (seeded) to ``max_train_rows``. Returns ``{"target", "task", "metric", "trtr", "tstr",
    "ratio", "status", "note", "features", "rows", "seconds"}``; ``status`` is ``"measured"``, ``"skipped"``
    (the holdout is too small to score: fewer than ``min_class_rows`` rows of a class, or fewer than
    3 x that many rows for a numeric target; or the real model has no skill, R² <= 0) or ``"failed"``
    (the target or a named feature is missing from the synthetic table).
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {"target": target, "task": None, "metric": None, "trtr": None, "tstr": None,
                           "ratio": None, "status": "failed", "note": "", "features": [], "rows": {}}
    for name, df in (("real train", train), ("real holdout", holdout), ("synthetic", synthetic)):
        if target not in df.columns:
            out["note"] = f"target {target!r} missing from the {name} table"
            return out
    wanted = list(features) or [c for c in train.columns if c != target]
    absent = [c for c in wanted if c not in synthetic.columns or c not in holdout.columns or c not in train.columns]
    if absent and features:
        out["note"] = f"feature(s) {absent} missing from a table"
        return out
    wanted = [c for c in wanted if c not in absent and c != target]
    train = train[train[target].notna()]
    holdout = holdout[holdout[target].notna()]
    synthetic = synthetic[synthetic[target].notna()]
    task = _task(train[target])
    metric = {"binary": "roc_auc", "regression": "r2", "multiclass": "balanced_accuracy"}[task]
    kept, categories = _encoder(train, wanted)
    out.update(task=task, metric=metric, features=kept)

    if task == "binary":
        pos = _positive(train[target])
        if leak_auc is not None:
            leaks = leaking_features(train, target, kept, pos, float(leak_auc))
            out["leaking_features"] = leaks
            out["leaking_features_dropped"] = bool(leaks) and not keep_leaking_features
            if leaks:
                names = ", ".join(f"{d['feature']} (AUC {d['auc']:.3f})" for d in leaks)
                if keep_leaking_features:
                    out["note"] = f"kept features that alone predict {target} (outcome leaks): {names}"
                else:
                    dropped = {d["feature"] for d in leaks}
                    kept = [c for c in kept if c not in dropped]
                    out["features"] = kept
                    out["note"] = (f"left out features that alone predict {target} with AUC >= {leak_auc} (they "
                                   f"say the outcome; keep_leaking_features keeps them): {names}")
                log.warning("utility %s: %s", target, out["note"])

        def labels(df: pd.DataFrame) -> np.ndarray:
            return (df[target] == pos).to_numpy().astype(int)
    elif task == "regression":
        def labels(df: pd.DataFrame) -> np.ndarray:
            return pd.to_numeric(df[target], errors="coerce").to_numpy(dtype="float64")
    else:
        def labels(df: pd.DataFrame) -> np.ndarray:
            return df[target].astype(str).to_numpy()

    y_test = labels(holdout)
    if task == "regression":
        enough = len(y_test) >= 3 * min_class_rows
        why = f"the real holdout has {len(y_test)} rows with a target (needs {3 * min_class_rows})"
    else:
        counts = pd.Series(y_test).value_counts()
        enough = len(counts) >= 2 and int(counts.min()) >= min_class_rows
        why = (f"the real holdout has too few rows of a class (smallest: {int(counts.min()) if len(counts) else 0},"
               f" classes: {len(counts)}; needs {min_class_rows} of each of 2+)")
    if not enough or not kept:
        out.update(status="skipped", note=why if not enough else "no usable feature")
        return out

    def cap(df: pd.DataFrame) -> pd.DataFrame:
        return df.sample(n=max_train_rows, random_state=seed) if len(df) > max_train_rows else df

    from threadpoolctl import threadpool_limits

    train_c, synth_c = cap(train), cap(synthetic)
    x_test = _matrix(holdout, kept, categories)
    out["rows"] = {"train_real": int(len(train_c)), "train_synthetic": int(len(synth_c)), "holdout": int(len(holdout))}
    with threadpool_limits(limits=_threads(), user_api="openmp"):
        trtr = _fit_score(task, _matrix(train_c, kept, categories), labels(train_c), x_test, y_test, seed)
        tstr = _fit_score(task, _matrix(synth_c, kept, categories), labels(synth_c), x_test, y_test, seed)
    out.update(trtr=trtr, tstr=tstr)
    baseline = 0.0 if task == "regression" else None
    if baseline is not None and trtr <= baseline:
        out.update(status="skipped", note=f"the model trained on real data has no skill (R² {trtr:.3f})")
    else:
        out.update(status="measured", ratio=float(tstr / trtr) if trtr else None)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("utility %s (%s): TRTR=%.4f TSTR=%.4f ratio=%s status=%s", target, metric, trtr, tstr,
             None if out["ratio"] is None else round(out["ratio"], 4), out["status"])
    return out
