"""Small statistics the privacy measures share: the membership AUC with its interval, the distance tie
tolerance, and the fewest rare records a rare-record test needs."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RARE_MIN_RECORDS", "TIE_TOL", "auc_with_ci"]

#: absolute tolerance under which two float64 distances count as a tie
TIE_TOL = 1e-7
#: fewer rare members or rare non-members than this: the rare-record test is skipped (nothing to test)
RARE_MIN_RECORDS = 5


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
