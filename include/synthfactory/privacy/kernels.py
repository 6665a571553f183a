"""numba kernels of the privacy audit (imported lazily: importing this module loads numba).

``nearest``: exact nearest neighbour under the packed Gower distance (see :mod:`.gower`).
``count_matches``: how many rows satisfy each conjunctive predicate query, stopping at ``limit``
(see :mod:`.attacks`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic


@intrinsic
def _popcnt(typingctx, x):  # pragma: no cover - compiled
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


#: "no neighbour yet": a finite stand-in for infinity (the kernels are compiled with fastmath, which
#: assumes no infinities or NaNs; every distance they see is finite)
BIG = np.float32(3.0e38)


@njit(fastmath=True, inline="always", cache=True)
def _scan_group(acc, ft, g0, g1, q, lb):  # pragma: no cover - compiled
    k = g1 - g0
    one = np.float32(1.0)
    for j in range(k):
        acc[j] = lb
    for c in range(ft.shape[0]):
        qc = q[c]
        row = ft[c, g0:g1]
        for j in range(k):
            acc[j] += min(abs(row[j] - qc), one)
    m = acc[0]
    for j in range(1, k):
        m = min(m, acc[j])
    return m


@njit(inline="always", cache=True)
def _group_bounds(lb2, sb, sh, pb, ph):  # pragma: no cover - compiled
    """Twice the categorical distance of query words ``pb``/``ph`` to every group signature, into ``lb2``
    (an integer lower bound of the group's distances); returns the largest."""
    top = 0
    for g in range(sb.shape[0]):
        v = 2 * _popcnt(sb[g] ^ pb) + _popcnt(sh[g] ^ ph)
        lb2[g] = v
        if v > top:
            top = v
    return top


@njit(inline="always", cache=True)
def _mix(x):  # pragma: no cover - compiled
    """splitmix64 finaliser: a well-mixed 64-bit hash of ``x``."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(parallel=True, fastmath=True, cache=True)
def nearest(qf, qb, qh, ft, sb, sh, starts, order, max_group, chunks, tie_seed):  # pragma: no cover - compiled
    """For each query row: the smallest Gower sum-distance to a reference row and that row's index.
    Reference rows are grouped by categorical signature (``sb``/``sh``, group ``g`` = sorted rows
    ``starts[g]:starts[g+1]``, original indices ``order``); groups are visited by increasing categorical
    distance, a lower bound, until it exceeds the best distance found.

    Ties: ``tie_seed < 0`` picks the lowest reference index (like ``numpy.argmin``); otherwise each
    query picks among its tied rows by a hash of (seed, query, row): pseudo-random, deterministic, and
    independent from one query to the next."""
    nq = qf.shape[0]
    n_groups = sb.shape[0]
    best = np.full(nq, BIG, dtype=np.float32)
    besti = np.full(nq, -1, dtype=np.int64)
    per = (nq + chunks - 1) // chunks
    hashed = tie_seed >= 0
    seed = np.uint64(tie_seed if hashed else 0)
    golden = np.uint64(0x9E3779B97F4A7C15)
    for t in prange(chunks):
        acc = np.empty(max_group, dtype=np.float32)
        lb2 = np.empty(n_groups, dtype=np.int64)  # twice the categorical distance (an integer)
        for qi in range(t * per, min((t + 1) * per, nq)):
            top = _group_bounds(lb2, sb, sh, qb[qi], qh[qi])
            qkey = _mix(seed * golden + np.uint64(qi))
            bv = BIG
            bi = -1
            bkey = np.uint64(0)
            q = qf[qi]
            level = 0
            while level <= top and np.float32(0.5 * level) <= bv:
                lb = np.float32(0.5 * level)
                for g in range(n_groups):
                    if lb2[g] != level:
                        continue
                    g0 = starts[g]
                    g1 = starts[g + 1]
                    m = _scan_group(acc, ft, g0, g1, q, lb)
                    if m > bv:
                        continue
                    for j in range(g1 - g0):
                        if acc[j] != m:
                            continue
                        o = order[g0 + j]
                        if m < bv:
                            bv = m
                            bi = o
                            bkey = _mix(qkey ^ np.uint64(o)) if hashed else np.uint64(0)
                        elif hashed:
                            key = _mix(qkey ^ np.uint64(o))
                            if key < bkey:
                                bi = o
                                bkey = key
                        elif o < bi:
                            bi = o
                        if not hashed:
                            break  # rows of a group are in reference order: the first tie is the lowest
                level += 1
            best[qi] = bv
            besti[qi] = bi
    return best, besti


@njit(fastmath=True, inline="always", cache=True)
def _scan_group_sq(acc, ft, g0, g1, q, lb):  # pragma: no cover - compiled
    k = g1 - g0
    for j in range(k):
        acc[j] = lb
    for c in range(ft.shape[0]):
        qc = q[c]
        row = ft[c, g0:g1]
        for j in range(k):
            d = row[j] - qc
            acc[j] += d * d
    m = acc[0]
    for j in range(1, k):
        m = min(m, acc[j])
    return m


@njit(parallel=True, fastmath=True, cache=True)
def nearest_sq(qf, qb, qh, ft, sb, sh, starts, order, max_group, chunks, k):  # pragma: no cover - compiled
    """The ``k`` (1 or 2) nearest reference rows by *squared Euclidean* distance in synthfactory's
    encoded space: numeric columns in ``ft``, two-valued one-hot pairs as bits (a mismatch adds 1),
    wider one-hot blocks as one-hot bits (1/2 per differing bit). Same grouping and pruning as
    :func:`nearest`; returns ``(squared distances (nq, 2), indices (nq, 2))`` (column 1 unused when
    ``k == 1``), the nearest with the lowest index among ties."""
    nq = qf.shape[0]
    n_groups = sb.shape[0]
    best = np.full((nq, 2), BIG, dtype=np.float32)
    besti = np.full((nq, 2), -1, dtype=np.int64)
    per = (nq + chunks - 1) // chunks
    for t in prange(chunks):
        acc = np.empty(max_group, dtype=np.float32)
        lb2 = np.empty(n_groups, dtype=np.int64)
        for qi in range(t * per, min((t + 1) * per, nq)):
            top = _group_bounds(lb2, sb, sh, qb[qi], qh[qi])
            b1 = BIG
            b2 = BIG
            i1 = -1
            i2 = -1
            q = qf[qi]
            bound = BIG
            level = 0
            while level <= top and np.float32(0.5 * level) <= bound:
                lb = np.float32(0.5 * level)
                for g in range(n_groups):
                    if lb2[g] != level:
                        continue
                    g0 = starts[g]
                    g1 = starts[g + 1]
                    m = _scan_group_sq(acc, ft, g0, g1, q, lb)
                    if m > bound:
                        continue
                    for j in range(g1 - g0):
                        v = acc[j]
                        if v > bound:
                            continue
                        o = order[g0 + j]
                        if v < b1 or (v == b1 and o < i1):
                            b2 = b1
                            i2 = i1
                            b1 = v
                            i1 = o
                        elif k == 2 and (v < b2 or (v == b2 and o < i2)):
                            b2 = v
                            i2 = o
                        bound = b2 if k == 2 else b1
                level += 1
            best[qi, 0] = b1
            best[qi, 1] = b2
            besti[qi, 0] = i1
            besti[qi, 1] = i2
    return best, besti


@njit(parallel=True, cache=True)
def count_matches(x, qcol, qop, qval, limit):  # pragma: no cover - compiled
    """Rows of ``x`` (n, d) float64, NaN = missing, that satisfy every term of each query (row ``b`` of
    ``qcol``/``qop``/``qval``; a column of -1 ends the terms; an operator is its index in
    :data:`.attacks.OPS`), counting up to ``limit``. Comparisons
    follow pandas: a missing value fails ==, <, >, <=, >= and satisfies !=."""
    n = x.shape[0]
    n_queries, width = qcol.shape
    out = np.zeros(n_queries, dtype=np.int64)
    for b in prange(n_queries):
        cnt = 0
        for i in range(n):
            ok = True
            for t in range(width):
                c = qcol[b, t]
                if c < 0:
                    break
                v = x[i, c]
                w = qval[b, t]
                op = qop[b, t]
                if op == 0:
                    ok = np.isnan(v)
                elif op == 1:
                    ok = not np.isnan(v)
                elif op == 2:
                    ok = v == w
                elif op == 3:
                    ok = not (v == w)
                elif op == 4:
                    ok = v >= w
                elif op == 5:
                    ok = v <= w
                elif op == 6:
                    ok = v > w
                else:
                    ok = v < w
                if not ok:
                    break
            if ok:
                cnt += 1
                if cnt >= limit:
                    break
        out[b] = cnt
    return out
