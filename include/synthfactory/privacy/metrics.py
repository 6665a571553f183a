"""Privacy metrics for a synthetic table: exact matches, distance to closest record (DCR) and nearest-
neighbour distance ratios, a membership-inference attack (table-wide and on the rare records),
k-anonymity / rare combinations of quasi-identifiers, the same figures for fresh real rows
(:mod:`.reference`), and SDMetrics' DCRBaselineProtection on a fast exact search. :func:`privacy_metrics`
runs the whole audit (with anonymeter's attacks from :mod:`.attacks`).

The real rows were split into ``train`` and ``holdout`` *before* the synthesizer saw ``train``. A
synthesizer that generalises produces rows that are no closer to the rows it was trained on than to
real rows it never saw; one that memorises produces rows that sit on top of training rows.

Distances are Euclidean in the float32 feature space of :func:`~.encoding.encode` (fitted on train),
between exact nearest neighbours (:mod:`.neighbors`); exact matches and quasi-identifier classes
compare the canonical row hashes of :func:`~.encoding.row_hashes`.

The library never imports Airflow.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from synthfactory.privacy.encoding import Layout, encode_with_layout, row_hashes
from synthfactory.privacy.neighbors import nearest_encoded, nearest_neighbors
from synthfactory.privacy.stats import RARE_MIN_RECORDS, TIE_TOL, auc_with_ci

log = logging.getLogger(__name__)

#: used in place of a zero median holdout->train distance in ``dcr_ratio``
RATIO_EPSILON = 1e-8

__all__ = [
    "auc_with_ci",
    "dcr",
    "dcr_baseline_protection",
    "exact_match_rate",
    "membership_inference",
    "privacy_metrics",
    "quasi_identifier_risk",
    "rare_record_membership",
    "rare_records",
    "sdmetrics_random_baseline",
]


# ------------------------------------------------------------------------------------------------
# exact matches
# ------------------------------------------------------------------------------------------------
def exact_match_rate(real: pd.DataFrame, synthetic: pd.DataFrame, columns: list[str]) -> dict:
    """Share of synthetic rows identical on all ``columns`` to at least one real row.

    Rows are normalised (numbers as float64 so ``5 == 5.0``, datetimes as UTC nanoseconds, everything
    else as ``str`` with missing as one token, so NaN/None equal each other) and hashed with
    ``pandas.util.hash_pandas_object`` (64-bit, :func:`~.encoding.row_hashes`); membership is a hash
    lookup, not a pairwise scan.
    """
    columns = list(columns)
    if not columns:
        raise ValueError("exact_match_rate: no columns")
    n_syn = int(len(synthetic))
    if n_syn == 0:
        return {"exact_match_rate": 0.0, "exact_matches": 0, "synthetic_rows": 0}
    if len(real) == 0:
        return {"exact_match_rate": 0.0, "exact_matches": 0, "synthetic_rows": n_syn}
    h_real, h_syn = row_hashes(real, synthetic, columns)
    n = int(np.isin(h_syn, h_real).sum())
    return {"exact_match_rate": float(n / n_syn), "exact_matches": n, "synthetic_rows": n_syn}


# ------------------------------------------------------------------------------------------------
# distance to closest record
# ------------------------------------------------------------------------------------------------
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
    max_query_rows: int | None = None,
) -> dict:
    """Distance to closest record (Euclidean, in the ``encode`` space fitted on train).

    Neighbours are exact either way; ``pruned`` (default) uses :func:`~.neighbors.nearest_encoded` (categorical
    signature groups, see :mod:`.gower`), else the BLAS blocks of :func:`~.neighbors.nearest_neighbors`.

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
    * ``max_query_rows``: on a large cohort, at most this many synthetic rows (and holdout rows, for the
      holdout-to-train figures) are measured, a seeded subsample; each one's nearest is still searched in the
      whole train and holdout, so each distance is exact and only the shares and medians are estimates
      (``query_rows``, ``query_subsampled``; ``dcr_share_se`` / ``dcr_share_adjusted_se``: binomial standard
      errors). The search costs queries x reference rows: all rows at 2M patients would take hours.
    """
    columns = list(columns)
    for name, f in (("train", train), ("holdout", holdout), ("synthetic", synthetic)):
        if len(f) == 0:
            raise ValueError(f"dcr: {name} has no rows")
    (x_train, x_hold, x_syn), layout = encode_with_layout([train, holdout, synthetic], columns)
    return _dcr_encoded(x_train, x_hold, x_syn, seed=seed, chunk=chunk, layout=layout if pruned else None,
                        max_query_rows=max_query_rows)


def _adjusted_se(s: float, p0: float, n: int) -> float:
    """Standard error of the size-adjusted share a = s(1-p0) / (s(1-p0) + (1-s)p0) at a binomial share s of n
    queries (delta method: da/ds = p0(1-p0) / (s(1-p0) + (1-s)p0)^2)."""
    den = s * (1.0 - p0) + (1.0 - s) * p0
    if n <= 0 or den <= 0.0:
        return 0.0
    return float(p0 * (1.0 - p0) / den ** 2 * np.sqrt(s * (1.0 - s) / n))


def _query_subsample(x: np.ndarray, max_rows: int | None, seed: int, stream: int) -> np.ndarray:
    """``x``, or a seeded subsample of ``max_rows`` of its rows (in order) when it has more. Its own random
    stream, so that the figures of a table under the cap are exactly those of the uncapped code."""
    if max_rows is None or len(x) <= max_rows:
        return x
    rng = np.random.default_rng([int(seed), 7919, int(stream)])
    return x[np.sort(rng.choice(len(x), size=int(max_rows), replace=False))]


def _search(query: np.ndarray, reference: np.ndarray, layout: Layout | None, k: int, chunk: int) -> np.ndarray:
    """Distances (n, k) to the k nearest: pruned search when the layout is known, else BLAS blocks."""
    if layout is not None:
        return nearest_encoded(query, reference, layout, k=k)[0]
    return nearest_neighbors(query, reference, k=k, chunk=chunk)[0]


def _dcr_encoded(x_train: np.ndarray, x_hold: np.ndarray, x_syn: np.ndarray, *, seed: int = 0,
                 chunk: int = 1024, layout: Layout | None = None, max_query_rows: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    n_tr, n_ho = len(x_train), len(x_hold)
    n_syn_all = len(x_syn)
    x_syn = _query_subsample(x_syn, max_query_rows, seed, 1)  # the queries; the references stay whole
    x_hold_q = _query_subsample(x_hold, max_query_rows, seed, 2)
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

    nn_hold_train = _search(x_hold_q, x_train, layout, min(2, n_tr), chunk)
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
        "synthetic_rows": int(n_syn_all),
        "query_rows": {"synthetic": int(n_syn), "holdout": int(len(x_hold_q))},
        "query_subsampled": bool(n_syn < n_syn_all or len(x_hold_q) < n_ho),
        "dcr_share_se": float(np.sqrt(share * (1.0 - share) / n_syn)),
        "dcr_share_adjusted_se": float(_adjusted_se(s_full, p0, n_syn)),
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
    Neither share is gated: a share of rows in rare classes cannot tell a copier from fresh patients
    (a copier of train lands in rare *train* classes no more often than the train rows themselves, and
    fresh rows land there by chance). The gated measure of the most exposed records is
    :func:`rare_record_membership`.
    * ``unique_real_matches``: synthetic rows whose combination belongs to exactly one training record.
    """
    qis = list(quasi_identifiers)
    missing = [c for c in qis if any(c not in f.columns for f in (train, holdout, synthetic))]
    if missing:
        raise KeyError(f"quasi_identifier_risk: quasi-identifier(s) {missing} not in every table")
    if not qis:
        raise ValueError("quasi_identifier_risk: no quasi-identifiers")
    h_train, h_syn = row_hashes(train, synthetic, qis)
    _, h_hold = row_hashes(train, holdout, qis)
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
        "unique_real_matches": int((in_train_syn == 1).sum()),
        "synthetic_rows_in_real_combinations": float(np.mean(in_train_syn >= 1)) if len(h_syn) else 0.0,
    }


# ------------------------------------------------------------------------------------------------
# the most exposed records: membership inference on rare quasi-identifier combinations
# ------------------------------------------------------------------------------------------------


def rare_records(train: pd.DataFrame, holdout: pd.DataFrame, quasi_identifiers: Sequence[str],
                 k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the rare real records of ``train`` and ``holdout``: their quasi-identifier
    combination is shared by fewer than ``k`` records of train and holdout together (values compared
    exactly, missing a value of its own). The definition is blind to membership, so under no memorisation
    rare train and rare holdout records are exchangeable."""
    h_train, h_hold = row_hashes(train, holdout, list(quasi_identifiers))
    counts = pd.Series(np.concatenate([h_train, h_hold])).value_counts()
    return (pd.Series(h_train).map(counts).to_numpy() < k), (pd.Series(h_hold).map(counts).to_numpy() < k)


def rare_record_membership(
    x_train: np.ndarray,
    x_hold: np.ndarray,
    x_syn: np.ndarray,
    rare_train: np.ndarray,
    rare_hold: np.ndarray,
    *,
    layout: Layout | None = None,
    chunk: int = 1024,
    min_records: int = RARE_MIN_RECORDS,
) -> dict:
    """Targeted membership-inference test on the most exposed records (``rare_record_mia_auc``).

    Targets are the *rare* real records (:func:`rare_records`): a few patients with an unusual
    quasi-identifier combination, the ones a synthetic row can point at. Members are the rare train
    records, non-members the rare holdout records; the attacker guesses "member" when a record's distance
    to its closest synthetic row (encode space, Euclidean) is small. The AUC (ties half) is 0.5 when the
    synthetic rows are no closer to rare training patients than to rare patients the model never saw, and
    near 1 when it reproduces them (a copier, a noisy copier). ``auc_se`` is the Hanley-McNeil standard
    error and ``z = (auc - 0.5) / auc_se`` the one-sided test statistic; the gate refuses only when the AUC
    exceeds its threshold significantly (see :func:`synthfactory.release.gate.privacy_checks`).

    With fewer than ``min_records`` rare members or non-members the test is ``skipped`` (status and reason
    say why): the data have too few rare records to test, and the table-wide attack (:func:`membership_inference`)
    still runs.
    """
    n_m, n_n = int(np.sum(rare_train)), int(np.sum(rare_hold))
    base = {"attack": "distance to closest synthetic record, rare records only", "members": n_m,
            "nonmembers": n_n, "min_records": int(min_records)}
    if n_m < min_records or n_n < min_records:
        return {**base, "status": "skipped", "auc": None, "auc_se": None, "z": None, "p_value": None,
                "reason": f"{n_m} rare train and {n_n} rare holdout records (fewer than {min_records})"}
    d_m = _search(x_train[np.asarray(rare_train, dtype=bool)], x_syn, layout, 1, chunk)[:, 0]
    d_n = _search(x_hold[np.asarray(rare_hold, dtype=bool)], x_syn, layout, 1, chunk)[:, 0]
    res = auc_with_ci(-d_m, -d_n)
    auc, se = res["auc"], res["se"]
    if se and se > 0:
        z = (auc - 0.5) / se
    else:  # every member closer than every non-member (or the reverse): as significant as it gets
        z = math.inf if auc > 0.5 else (-math.inf if auc < 0.5 else 0.0)
    from scipy.stats import norm

    return {**base, "status": "measured", "auc": auc, "auc_se": se, "auc_ci": res["ci"],
            "z": float(z) if math.isfinite(z) else (1e9 if z > 0 else -1e9),
            "p_value": float(norm.sf(z)),
            "member_distance_median": _pct(d_m, 50), "nonmember_distance_median": _pct(d_n, 50),
            "members_at_zero_distance": float(np.mean(d_m == 0.0)),
            "nonmembers_at_zero_distance": float(np.mean(d_n == 0.0))}


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
    max_query_rows: int | None = None,
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
    ``max_query_rows``: at most this many synthetic rows (a seeded subsample, and a random table of as many
    rows) are measured against the whole real table (like SDMetrics' ``num_rows_subsample``, which also
    subsamples the real table); ``query_rows`` says how many.
    """
    from synthfactory.privacy.gower import GowerIndex, encode_gower

    if len(real) == 0 or len(synthetic) == 0:
        raise ValueError("dcr_baseline_protection: empty table")
    n_synthetic = len(synthetic)
    if max_query_rows is not None and n_synthetic > max_query_rows:
        synthetic = synthetic.iloc[_query_subsample(np.arange(n_synthetic), max_query_rows, seed or 0, 3)]
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
        "synthetic_rows": int(n_synthetic),
        "query_rows": int(len(synthetic)),
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
    reference_resplits: int = 20,
    mia_attacks: Sequence[str] = (),
    mia_options: dict | None = None,
    fit_sample: Any = None,
    dcr_max_query_rows: int | None = None,
) -> dict:
    """The privacy audit of a synthetic table, all against the real ``train`` split with the real
    ``holdout`` as control, over the columns common to all three frames minus ``exclude`` (e.g. the
    ``patient_key`` id column), in train's column order:

    * ``exact_match``: synthetic rows identical to a real (train or holdout) row;
    * ``dcr``: distance to closest record (size-adjusted share closer to train than to holdout, median
      ratio) and nearest-neighbour distance ratios (see :func:`dcr`; at most ``dcr_max_query_rows`` rows
      measured, a stated subsample, here and in the SDMetrics baseline);
    * ``mia``: distance-based membership-inference AUC (see :func:`membership_inference`);
    * ``quasi_identifiers``: k-anonymity and rare combinations of ``quasi_identifiers``
      (see :func:`quasi_identifier_risk`; skipped when none are named);
    * ``rare_record_mia``: the membership test on the rare records (quasi-identifier combination of fewer
      than ``k_anonymity`` real records; see :func:`rare_record_membership`; skipped without QIs);
    * ``reference``: the same figures for fresh real rows (holdout halves, ``reference_resplits`` times;
      see :mod:`.reference`), what the gate judges the synthetic figures against (0: not computed);
    * ``anonymeter``: singling-out, linkability and inference risks with confidence intervals
      (see :mod:`.attacks`; skipped when ``anonymeter_attacks`` is 0 or no columns are named);
    * ``sdmetrics_dcr_baseline_protection``: SDMetrics' DCRBaselineProtection score on the fast exact
      search (see :func:`dcr_baseline_protection`), for comparison with SDMetrics-based reports;
    * ``mia_battery``: the membership-inference battery (:func:`~.mia.mia_battery`) with ``mia_attacks``
      (distance, domias, shadow), ``mia_options`` (its keyword arguments: cost knobs, bootstrap) and
      ``fit_sample`` (the spec's synthesizer for the shadow models, :func:`~.mia.spec_fit_sample`);
      skipped when ``mia_attacks`` is empty.

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
    out["dcr"] = _dcr_encoded(x_train, x_hold, x_syn, seed=seed, layout=layout, max_query_rows=dcr_max_query_rows)
    lap("dcr")
    out["mia"] = membership_inference(x_train, x_hold, x_syn, seed=seed, max_targets=mia_max_targets, layout=layout)
    lap("mia")
    qis, sens = list(quasi_identifiers), list(sensitive_attributes)
    rare_tr = rare_ho = None
    if qis:
        out["quasi_identifiers"] = quasi_identifier_risk(train, holdout, synthetic, qis, k=k_anonymity)
        rare_tr, rare_ho = rare_records(train, holdout, qis, k=k_anonymity)
        out["rare_record_mia"] = {"quasi_identifiers": qis, "k": int(k_anonymity), **rare_record_membership(
            x_train, x_hold, x_syn, rare_tr, rare_ho, layout=layout)}
    else:
        out["quasi_identifiers"] = {"skipped": "no quasi_identifiers configured"}
        out["rare_record_mia"] = {"status": "skipped", "reason": "no quasi_identifiers configured"}
    lap("quasi_identifiers")
    if mia_attacks:
        from synthfactory.privacy.mia import mia_battery

        out["mia_battery"] = mia_battery(train, holdout, synthetic, cols, attacks=list(mia_attacks),
                                         fit_sample=fit_sample, encoded=(x_train, x_hold, x_syn, layout),
                                         rare_train=rare_tr, rare_hold=rare_ho, seed=seed, **(mia_options or {}))
    else:
        out["mia_battery"] = {"skipped": "no attacks configured"}
    lap("mia_battery")
    if reference_resplits > 0:
        from synthfactory.privacy.reference import privacy_reference

        h_train, h_hold = row_hashes(train, holdout, cols)
        out["reference"] = privacy_reference(x_train, x_hold, h_train, h_hold,
                                             rare_train=rare_tr, rare_hold=rare_ho,
                                             resplits=reference_resplits, seed=seed,
                                             domias="domias" in mia_attacks)
    else:
        out["reference"] = {"skipped": "reference_resplits is 0"}
    lap("reference")
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
            train[cols], synthetic[cols], _subset_metadata(metadata, cols), seed=seed,
            max_query_rows=dcr_max_query_rows)
        lap("sdmetrics_dcr_baseline_protection")
    out["seconds"] = seconds
    return out


def _subset_metadata(metadata: dict | None, cols: Sequence[str]) -> dict | None:
    if metadata is None:
        return None
    meta = next(iter(metadata["tables"].values())) if "tables" in metadata else metadata
    columns = meta.get("columns", {})
    return {"columns": {c: columns[c] for c in cols if c in columns}}
