"""The real-data privacy reference: what fresh real rows themselves score on every gated privacy figure.

A synthesizer that generalises produces rows that behave like real patients it never saw. So each privacy
figure of the synthetic table has a reference: the same figure for *fresh real rows*. The real rows (train
and holdout, at most ``max_rows`` of them) are re-split ``resplits`` times into a train part T, a holdout part
H and a fresh part F (H and F of the holdout's share of the rows, T the rest); each time F plays the
synthetic table and is scored against T with H as the holdout, exactly as the synthetic table is scored
against train with the holdout as control (the DCR share size-adjusted for T's and H's sizes):

* ``exact_match_rate``: F rows identical to a T or H row (clinical tables with many discrete columns
  put some real patients on top of each other: no labs, same age, sex and flags);
* ``dcr_share``: the size-adjusted share of F rows closer to T than to H (0.5 in expectation; its
  spread is the sampling noise the gate must tolerate);
* ``dcr_ratio``: median DCR(F -> T) / median DCR(H -> T);
* ``mia_auc``: distance-to-closest-"synthetic"-record AUC of T members vs H non-members, F as the
  synthetic table;
* ``rare_record_mia_auc``: the same AUC restricted to rare records (quasi-identifier combination shared by
  fewer than k real records, see :func:`~.metrics.rare_record_membership`);
* ``mia_tpr_at_fpr_01`` / ``mia_tpr_at_fpr_10``: that distance attack's true-positive rate at 1 % / 10 %
  false-positive rate (:mod:`.mia`);
* ``domias_auc``, ``domias_tpr_at_fpr_01``, ``domias_tpr_at_fpr_10``: the DOMIAS density-ratio attack of
  :mod:`.mia` (F as the synthetic table, H as the reference population, leave-one-out for H's own rows;
  bandwidth: the median distance of H to its nearest T row, the battery's ``nn`` rule).

Each figure is summarised as ``{mean, sd, p05, p50, p95, min, max, n}`` over the re-splits. Re-splitting
all real rows (not only halving the holdout) puts the variation from *which* rows landed in train and
holdout into the spread: halving a fixed holdout measured its internal structure (near-duplicate patients
both held out) and let fresh rows fail in ~5 % of splits at 2.5 sd. The parts are smaller than the real
train / synthetic tables, so the reference spread is, if anything, wider than the synthetic figure's own
sampling noise: a gate at ``mean + z sd`` errs towards accepting fresh real rows.

Cost: one dense float64 distance matrix over at most ``max_rows`` real rows (2,000 x 2,000: 32 MB, a BLAS
product) and, per re-split, minima over sub-blocks: well under a second at any table size.
"""

from __future__ import annotations


import numpy as np

from synthfactory.privacy.stats import RARE_MIN_RECORDS, TIE_TOL, auc_with_ci
from synthfactory.quality.reference import summarise

__all__ = ["pairwise_distances", "privacy_reference"]

#: at most this many holdout rows (and this many train rows, rare ones aside) enter the reference
MAX_ROWS = 2000


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense Euclidean distances ``(len(a), len(b))`` in float64 (centred GEMM; squared distances under
    1e-13, float rounding of identical rows, are set to exactly 0)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mu = b.mean(axis=0) if len(b) else 0.0
    a, b = a - mu, b - mu
    sq = np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2.0 * (a @ b.T)
    sq[sq < 1e-13] = 0.0
    return np.sqrt(sq, out=sq)


def _adjusted_share(d_train: np.ndarray, d_hold: np.ndarray, n_train: int, n_hold: int) -> float:
    """The size-adjusted DCR share of :func:`~.metrics.dcr` (``dcr_share_adjusted``)."""
    p0 = n_train / (n_train + n_hold)
    diff = d_train - d_hold
    ties = np.abs(diff) <= TIE_TOL
    s = (float(((diff < 0) & ~ties).sum()) + p0 * float(ties.sum())) / len(diff)
    num = s * (1.0 - p0)
    den = num + (1.0 - s) * p0
    return float(num / den) if den > 0 else 0.5


def _log_kde_d(dist: np.ndarray, h: float) -> np.ndarray:
    """Row-wise log Gaussian KDE from a distance block (inf = left out), up to the bandwidth's constant."""
    e = dist * dist
    e *= -1.0 / (2.0 * h * h)          # inf (left out) -> -inf
    n = np.isfinite(dist).sum(axis=1).astype(np.float64)
    m = e.max(axis=1)
    m[~np.isfinite(m)] = 0.0
    e -= m[:, None]
    np.exp(e, out=e)
    with np.errstate(divide="ignore"):
        return m + np.log(e.sum(axis=1)) - np.log(np.maximum(n, 1.0))


def privacy_reference(
    x_train: np.ndarray,
    x_hold: np.ndarray,
    h_train: np.ndarray,
    h_hold: np.ndarray,
    *,
    rare_train: np.ndarray | None = None,
    rare_hold: np.ndarray | None = None,
    resplits: int = 20,
    seed: int = 0,
    max_rows: int = MAX_ROWS,
    domias: bool = True,
) -> dict:
    """The privacy figures of fresh real rows (see the module docstring) over ``resplits`` random re-splits
    of the real rows. ``x_*``: the ``encode`` space; ``h_*``: row hashes over the audited columns;
    ``rare_*``: boolean masks of the rare records (None: no quasi-identifiers, no rare-record reference)."""
    rng = np.random.default_rng(seed + 104729)
    n_tr, n_ho = len(x_train), len(x_hold)
    n_real = n_tr + n_ho
    if resplits <= 0:
        return {"skipped": "reference_resplits is 0"}
    pool = np.arange(n_real) if n_real <= max_rows else np.sort(rng.choice(n_real, size=max_rows, replace=False))
    n_pool = len(pool)
    n_part = int(min(max(2, round(n_ho * n_pool / n_real)), n_pool // 3))
    if n_part < 2:
        return {"skipped": f"too few real rows ({n_real}) for a reference"}
    x = np.concatenate([x_train, x_hold])[pool]
    h = np.concatenate([h_train, h_hold])[pool]
    rare = None
    if rare_train is not None and rare_hold is not None:
        rare = np.concatenate([np.asarray(rare_train, bool), np.asarray(rare_hold, bool)])[pool]
    d = pairwise_distances(x, x)
    from synthfactory.privacy.mia import _roc

    figures: dict[str, list] = {"exact_match_rate": [], "dcr_share": [], "dcr_ratio": [], "mia_auc": [],
                                "rare_record_mia_auc": [], "mia_tpr_at_fpr_01": [], "mia_tpr_at_fpr_10": [],
                                "domias_auc": [], "domias_tpr_at_fpr_01": [], "domias_tpr_at_fpr_10": []}
    n_t = n_pool - 2 * n_part
    for _ in range(int(resplits)):
        perm = rng.permutation(n_pool)
        f, ho, tr = np.sort(perm[:n_part]), np.sort(perm[n_part:2 * n_part]), np.sort(perm[2 * n_part:])
        # F plays the synthetic table, T the train rows, H the holdout
        figures["exact_match_rate"].append(float(np.mean(np.isin(h[f], h[np.concatenate([tr, ho])]))))
        d_ft = d[np.ix_(f, tr)].min(axis=1)
        d_fh = d[np.ix_(f, ho)]
        figures["dcr_share"].append(_adjusted_share(d_ft, d_fh.min(axis=1), n_t, n_part))
        d_ht = d[np.ix_(ho, tr)].min(axis=1)
        med_h = float(np.median(d_ht))
        figures["dcr_ratio"].append(float(np.median(d_ft)) / med_h if med_h > 0 else None)
        d_mem = d[np.ix_(tr, f)].min(axis=1)  # members: distance to the closest "synthetic" (F) row
        d_non = d_fh.min(axis=0)               # non-members (H) likewise
        figures["mia_auc"].append(auc_with_ci(-d_mem, -d_non)["auc"])
        _, tprs = _roc(-d_mem, -d_non)
        figures["mia_tpr_at_fpr_01"].append(float(tprs[0]))
        figures["mia_tpr_at_fpr_10"].append(float(tprs[1]))
        if domias and n_part >= 10:
            pos = d_ht[d_ht > 0]
            bw = max(float(np.median(d_ht)) if np.median(d_ht) > 0 else (float(np.median(pos)) if pos.size else 0.1),
                     1e-3)
            d_hh = d[np.ix_(ho, ho)].copy()
            np.fill_diagonal(d_hh, np.inf)  # leave-one-out: a holdout row is not its own population
            lm = _log_kde_d(d[np.ix_(tr, f)], bw) - _log_kde_d(d[np.ix_(tr, ho)], bw)
            ln = _log_kde_d(d_fh.T, bw) - _log_kde_d(d_hh, bw)
            auc_d, tprs_d = _roc(np.nan_to_num(lm, posinf=1e6, neginf=-1e6), np.nan_to_num(ln, posinf=1e6,
                                                                                             neginf=-1e6))
            figures["domias_auc"].append(auc_d)
            figures["domias_tpr_at_fpr_01"].append(float(tprs_d[0]))
            figures["domias_tpr_at_fpr_10"].append(float(tprs_d[1]))
        if rare is not None:
            rm, rn = rare[tr], rare[ho]
            if int(rm.sum()) >= RARE_MIN_RECORDS and int(rn.sum()) >= RARE_MIN_RECORDS:
                figures["rare_record_mia_auc"].append(auc_with_ci(-d_mem[rm], -d_non[rn])["auc"])
    out: dict = {name: summarise(vals) for name, vals in figures.items()}
    out.update({"resplits": int(resplits), "pool_rows": int(n_pool), "train_rows": int(n_t),
                "holdout_rows": int(n_part), "fresh_rows": int(n_part),
                "method": "real rows re-split into train, holdout and fresh parts; the fresh part is scored as "
                          "the synthetic table"})
    return out
