"""Anonymeter's three privacy attacks, implemented natively (same published method, fast).

Anonymeter (Giomi et al., "A Unified Framework for Quantifying Privacy Risk in Synthetic Data",
PoPETs 2023; the tool endorsed by France's CNIL) measures the three re-identification risks of the
Article 29 Working Party opinion 05/2014: singling out, linkability and inference. Each attack is run
against the *training* records (main) and against the *control* records (the holdout, never seen by
the synthesizer); a random-guess baseline checks that the attack is meaningful. The risk is the
attacker's excess success on training records, normalised by the room left above the control rate::

    risk = (main_rate - control_rate) / (1 - control_rate)

with rates and errors from the Wilson score interval and the error propagated to the risk
(anonymeter ``stats.confidence``; :func:`evaluation_results` reproduces it to the last digit). The
interval's half-width shrinks as ``1/sqrt(n_attacks)``: at a few hundred attacks it is ~0.1-0.3, so
certifying "risk < 0.10" takes thousands of attacks, which is why this module exists. anonymeter's
own implementation scans every synthetic row per attack in Python/numba and evaluates singling-out
queries with ``DataFrame.query``; here the nearest-neighbour attacks use the exact pruned Gower search
of :mod:`.gower` and singling-out predicates are evaluated by a parallel numba kernel that stops
counting at 2 (a query singles out when exactly one row matches).

Differences from anonymeter 1.0.0, all deliberate and documented in the result:

* everything is seeded (anonymeter draws from unseeded global generators);
* missing values: anonymeter's Gower distance makes a pair with one missing number ``NaN`` and two
  missing values ``1``; here one missing value counts ``1`` and two count ``0`` (as SDMetrics);
* nearest-neighbour ties are broken at random, independently for every attack (anonymeter: whatever
  its sort returns, the same row for every target with the same auxiliary values, so on coarse
  columns such as age and sex the attacks come in large identical clusters and its interval, which
  assumes independent attacks, is far too narrow); for linkability each half draws its own, so tied
  halves do not "link" by construction;
* inference on a numeric secret: a guess is right when ``|guess - secret| <= 0.05 |guess|``
  (anonymeter divides by the signed guess, which accepts every guess below zero);
* singling out with a control set of another size: anonymeter rescales the control count with a
  fitted model, which degenerates when the control set has fewer than 1,000 rows (every fit point has
  the same size); here the larger of training / control set is subsampled to the size of the smaller
  (averaged over ``size_repeats`` draws), so both are attacked at the same population size;
* the number of attacks is what could actually be run: linkability and inference attack distinct
  records, so they are capped by the control size; singling out by the number of distinct singling-out
  queries the synthetic data yields (query generation stops at ``max_attempts`` or when three batches
  in a row bring no new query). That ``n`` is what the interval is computed with.

No query, target or guess is ever returned or logged: a query that singles out a training record
describes a real patient. Results carry counts, rates and intervals only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from synthfactory.privacy.gower import GowerIndex, column_sdtype, encode_gower

log = logging.getLogger(__name__)

__all__ = [
    "anonymeter_risks",
    "evaluation_results",
    "inference_risk",
    "linkability_risk",
    "singling_out_risk",
    "success_rate",
]

OPS = ("isna", "notna", "==", "!=", ">=", "<=", ">", "<")
_OP = {name: i for i, name in enumerate(OPS)}


# ------------------------------------------------------------------------------------------------
# statistics (anonymeter.stats.confidence)
# ------------------------------------------------------------------------------------------------
def _probit(confidence_level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 * (1.0 + confidence_level)))


def success_rate(n_total: float, n_success: float, confidence_level: float = 0.95) -> tuple[float, float]:
    """Wilson score estimate of a success rate: ``(rate, error)`` (anonymeter's ``success_rate``)."""
    if not 0 <= confidence_level <= 1:
        raise ValueError("confidence_level must be between 0 and 1")
    z = _probit(confidence_level)
    z2 = z * z
    var = n_success * (n_total - n_success) / n_total
    denom = n_total + z2
    return (n_success + 0.5 * z2) / denom, (z / denom) * math.sqrt(max(var, 0.0) + 0.25 * z2)


def evaluation_results(n_attacks: float, n_success: float, n_baseline: float, n_control: float,
                       confidence_level: float = 0.95) -> dict:
    """Anonymeter's ``EvaluationResults(...).risk()`` and the rates behind it."""
    attack = success_rate(n_attacks, n_success, confidence_level)
    baseline = success_rate(n_attacks, n_baseline, confidence_level)
    control = success_rate(n_attacks, n_control, confidence_level)
    residual = (attack[0] - control[0]) / (1.0 - control[0])
    d_attack = 1.0 / abs(1.0 - control[0])
    d_control = (attack[0] - 1.0) / (1.0 - control[0]) ** 2
    error = math.sqrt((attack[1] * d_attack) ** 2 + (control[1] * d_control) ** 2)
    clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
    return {
        "risk": clip(residual),
        "ci": [clip(residual - error), clip(residual + error)],
        "residual": residual,
        "error": error,
        "attack_rate": list(attack),
        "control_rate": list(control),
        "baseline_rate": list(baseline),
        # the attack must beat random guessing for the figure to mean anything (anonymeter warns)
        "attack_beats_baseline": bool(attack[0] > baseline[0]),
        "confidence_level": confidence_level,
    }


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _sample(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    if n >= len(frame):
        return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)
    return frame.iloc[rng.choice(len(frame), size=n, replace=False)].reset_index(drop=True)


def _nearest_random_ties(queries: pd.DataFrame, candidates: pd.DataFrame, columns: Sequence[str],
                         rng: np.random.Generator) -> np.ndarray:
    """Index (into ``candidates``) of each query's nearest candidate, anonymeter's distance (numbers
    scaled by their range over both frames). Ties are broken at random *independently for each query*:
    with coarse auxiliary columns (age, sex) hundreds of targets share their nearest distance with the
    same synthetic rows, and a tie-break shared by all of them (anonymeter's sort) would make all their
    guesses one draw, so the attacks would not be independent and the Wilson interval far too narrow."""
    sdtypes = {c: column_sdtype(candidates[c]) for c in columns}
    ref, (q,), _ = encode_gower(candidates[list(columns)], [queries[list(columns)]], list(columns), sdtypes,
                                numeric_range="union")
    _, idx = GowerIndex(ref).search(q, tie_seed=int(rng.integers(0, 2**62)))
    return idx


def _risk_record(n: int, n_success: float, n_baseline: float, n_control: float, confidence: float,
                 **extra: Any) -> dict:
    if n <= 0:
        return {"risk": None, "ci": [None, None], "n_attacks": 0, "n_success": 0, "n_control": 0,
                "n_baseline": 0, "note": "no attack could be run", **extra}
    res = evaluation_results(n, n_success, n_baseline, n_control, confidence)
    return {**res, "n_attacks": int(n), "n_success": float(n_success), "n_control": float(n_control),
            "n_baseline": float(n_baseline), **extra}


# ------------------------------------------------------------------------------------------------
# linkability
# ------------------------------------------------------------------------------------------------
def linkability_risk(
    ori: pd.DataFrame,
    syn: pd.DataFrame,
    control: pd.DataFrame,
    aux_cols: tuple[Sequence[str], Sequence[str]],
    *,
    n_attacks: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """The attacker holds two datasets about the same people, one with columns ``aux_cols[0]`` and one
    with ``aux_cols[1]`` (e.g. demographics and lab results) and links them through the synthetic
    data: a target's two halves are linked when both have the same nearest synthetic record
    (anonymeter ``LinkabilityEvaluator``, ``n_neighbors=1``)."""
    a, b = list(aux_cols[0]), list(aux_cols[1])
    if not a or not b:
        raise ValueError("linkability_risk: both halves of aux_cols need columns")
    rng = np.random.default_rng(seed)
    n = int(min(n_attacks, len(ori), len(control)))
    n_syn = len(syn)

    def attack(targets: pd.DataFrame) -> int:
        ia = _nearest_random_ties(targets, syn, a, rng)
        ib = _nearest_random_ties(targets, syn, b, rng)
        return int(np.sum(ia == ib))

    n_success = attack(_sample(ori, n, rng)) if n else 0
    n_control = attack(_sample(control, n, rng)) if n else 0
    n_baseline = int(np.sum(rng.integers(0, n_syn, n) == rng.integers(0, n_syn, n))) if n else 0
    return _risk_record(n, n_success, n_baseline, n_control, confidence, aux_cols=[a, b],
                        n_requested=int(n_attacks))


# ------------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------------
def _inference_hits(guesses: np.ndarray, secrets: np.ndarray, regression: bool, tolerance: float = 0.05
                    ) -> np.ndarray:
    g_na, s_na = pd.isna(guesses), pd.isna(secrets)
    if regression:
        g = pd.to_numeric(pd.Series(guesses), errors="coerce").to_numpy(dtype=float)
        s = pd.to_numeric(pd.Series(secrets), errors="coerce").to_numpy(dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            match = np.abs(g - s) / (np.abs(g) + 1e-12) <= tolerance
    else:
        match = np.asarray(guesses == secrets, dtype=bool) & ~g_na & ~s_na
    return match | (g_na & s_na)


def inference_risk(
    ori: pd.DataFrame,
    syn: pd.DataFrame,
    control: pd.DataFrame,
    aux_cols: Sequence[str],
    secret: str,
    *,
    n_attacks: int = 2000,
    regression: bool | None = None,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """The attacker knows a target's ``aux_cols`` and guesses ``secret`` as the value of the nearest
    synthetic record (anonymeter ``InferenceEvaluator``). Numeric secrets (not booleans) count as
    guessed within 5 %, others when equal."""
    aux = [c for c in aux_cols if c != secret]
    if not aux:
        raise ValueError(f"inference_risk: no auxiliary columns to infer {secret!r} from")
    if regression is None:
        regression = column_sdtype(ori[secret]) == "numerical"
    rng = np.random.default_rng(seed)
    n = int(min(n_attacks, len(ori), len(control)))
    syn_secret = syn[secret].to_numpy()

    def attack(targets: pd.DataFrame) -> int:
        idx = _nearest_random_ties(targets, syn, aux, rng)
        return int(_inference_hits(syn_secret[idx], targets[secret].to_numpy(), regression).sum())

    n_success = attack(_sample(ori, n, rng)) if n else 0
    n_control = attack(_sample(control, n, rng)) if n else 0
    if n:
        targets = _sample(ori, n, rng)
        guesses = syn_secret[rng.choice(len(syn), size=n, replace=n > len(syn))]
        n_baseline = int(_inference_hits(guesses, targets[secret].to_numpy(), regression).sum())
    else:
        n_baseline = 0
    return _risk_record(n, n_success, n_baseline, n_control, confidence, secret=secret, aux_cols=aux,
                        regression=bool(regression), n_requested=int(n_attacks))


# ------------------------------------------------------------------------------------------------
# singling out
# ------------------------------------------------------------------------------------------------
@dataclass
class _Space:
    """Frames as float64 matrices (NaN = missing) over shared category codes."""

    columns: list[str]
    kinds: list[str]
    categories: list[list[Any] | None]
    mats: list[np.ndarray]


def _space(frames: Sequence[pd.DataFrame], columns: Sequence[str]) -> _Space:
    columns = list(columns)
    kinds = [column_sdtype(frames[0][c]) for c in columns]
    cats: list[list[Any] | None] = []
    mats = [np.empty((len(f), len(columns)), dtype=np.float64) for f in frames]
    for j, (c, kind) in enumerate(zip(columns, kinds)):
        if kind in ("numerical", "boolean"):
            for f, m in zip(frames, mats):
                s = f[c]
                m[:, j] = pd.to_numeric(s.astype("float64") if kind == "boolean" else s,
                                        errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
            cats.append(None)
        elif kind == "datetime":
            for f, m in zip(frames, mats):
                ts = pd.to_datetime(f[c], errors="coerce")
                v = ts.to_numpy(dtype="datetime64[ns]").view("i8").astype(np.float64)
                v[ts.isna().to_numpy()] = np.nan
                m[:, j] = v
            cats.append(None)
        else:
            joined = pd.concat([f[c] for f in frames], ignore_index=True).astype(object)
            joined = joined.where(joined.notna(), None)
            codes, uniques = pd.factorize(joined, use_na_sentinel=True)
            codes = codes.astype(np.float64)
            codes[codes < 0] = np.nan
            for m, part in zip(mats, np.split(codes, np.cumsum([len(f) for f in frames])[:-1])):
                m[:, j] = part
            cats.append(list(uniques))
    return _Space(columns, kinds, cats, [np.ascontiguousarray(m) for m in mats])


def _count(x: np.ndarray, queries: np.ndarray, limit: int) -> np.ndarray:
    from synthfactory.privacy import kernels

    if len(queries) == 0:
        return np.zeros(0, dtype=np.int64)
    qcol = np.ascontiguousarray(queries[:, :, 0].astype(np.int64))
    qop = np.ascontiguousarray(queries[:, :, 1].astype(np.int64))
    qval = np.ascontiguousarray(queries[:, :, 2])
    return kernels.count_matches(x, qcol, qop, qval, limit)


def _record_queries(x: np.ndarray, kinds: list[str], medians: np.ndarray, n: int, n_cols: int,
                    rng: np.random.Generator) -> np.ndarray:
    """``n`` candidate queries, each from a random synthetic record on ``n_cols`` random columns
    (anonymeter ``_query_from_record`` with medians): missing -> isna; boolean/categorical -> ==;
    numeric -> >= value above the median, else <= value. Shape (n, n_cols, 3): column, op, value."""
    d = x.shape[1]
    rows = rng.integers(0, x.shape[0], n)
    cols = np.argsort(rng.random((n, d)), axis=1)[:, :n_cols]
    vals = x[rows[:, None], cols]
    numeric = np.array([k in ("numerical", "datetime") for k in kinds])[cols]
    ops = np.full(cols.shape, _OP["=="], dtype=np.float64)
    above = vals > medians[cols]
    ops[numeric & above] = _OP[">="]
    ops[numeric & ~above] = _OP["<="]
    ops[np.isnan(vals)] = _OP["isna"]
    return np.stack([cols.astype(np.float64), ops, vals], axis=2)


def _random_queries(x: np.ndarray, kinds: list[str], n: int, n_cols: int, rng: np.random.Generator
                    ) -> np.ndarray:
    """anonymeter's baseline: random columns, random values of the synthetic data, random operators
    (numeric: any comparison; categorical: == or !=; boolean: true/false; missing: isna/notna)."""
    d = x.shape[1]
    cols = np.argsort(rng.random((n, d)), axis=1)[:, :n_cols]
    uniques = [np.unique(x[:, j][~np.isnan(x[:, j])]) for j in range(d)]
    has_na = [bool(np.isnan(x[:, j]).any()) for j in range(d)]
    out = np.empty((n, n_cols, 3), dtype=np.float64)
    for i in range(n):
        for t in range(n_cols):
            j = cols[i, t]
            pool = len(uniques[j]) + int(has_na[j])
            pick = rng.integers(pool) if pool else 0
            if pick >= len(uniques[j]):
                op, v = (_OP["isna"] if rng.random() < 0.5 else _OP["notna"]), np.nan
            else:
                v = float(uniques[j][pick])
                if kinds[j] == "boolean":
                    op, v = _OP["=="], float(rng.random() < 0.5)
                elif kinds[j] in ("numerical", "datetime"):
                    op = _OP[("==", "!=", ">", "<", ">=", "<=")[rng.integers(6)]]
                else:
                    op = _OP["==" if rng.random() < 0.5 else "!="]
            out[i, t] = (j, op, v)
    return out


def _unique_queries(queries: np.ndarray) -> np.ndarray:
    """Distinct queries (terms in any order are the same query), first occurrence kept, in order."""
    if len(queries) == 0:
        return queries
    # canonical form: terms sorted by column (a query never uses a column twice); NaN values -> a marker
    order = np.argsort(queries[:, :, 0], axis=1, kind="stable")
    canon = np.take_along_axis(queries, order[:, :, None], axis=1)
    canon = np.where(np.isnan(canon), -np.inf, canon)
    flat = np.ascontiguousarray(canon.reshape(len(queries), -1))
    _, first = np.unique(flat.view(np.dtype((np.void, flat.dtype.itemsize * flat.shape[1]))).ravel(),
                         return_index=True)
    return queries[np.sort(first)]


def render_query(q: np.ndarray, space: _Space) -> str:
    """A query as a ``DataFrame.query`` string, anonymeter's syntax (for reports and cross-checks)."""
    terms = []
    for c, o, v in q:
        col = space.columns[int(c)]
        op = OPS[int(o)]
        if op in ("isna", "notna"):
            terms.append(f"{col}.{op}()")
            continue
        kind = space.kinds[int(c)]
        if kind == "categorical":
            val = space.categories[int(c)][int(v)]
            lit = repr(val) if isinstance(val, str) else str(val)
        elif kind == "boolean":
            lit = str(bool(v))
        elif kind == "datetime":
            lit = f"'{pd.Timestamp(int(v))}'"
        else:
            lit = repr(float(v)) if not float(v).is_integer() else str(int(v))
        terms.append(f"{col} {op} {lit}")
    return " & ".join(terms)


def singling_out_risk(
    ori: pd.DataFrame,
    syn: pd.DataFrame,
    control: pd.DataFrame,
    columns: Sequence[str],
    *,
    n_attacks: int = 2000,
    n_cols: int = 3,
    seed: int = 0,
    max_attempts: int | None = None,
    size_repeats: int = 5,
    confidence: float = 0.95,
) -> dict:
    """Multivariate singling out (anonymeter ``SinglingOutEvaluator``, Cohen & Nissim 2020): the
    attacker writes predicates on ``n_cols`` columns that match exactly one synthetic record
    ("age >= 87 & gender == 'female' & cond_n18_32 == True") and bets each singles out one real
    person. Success = the query matches exactly one training record (main) or one control record."""
    columns = list(columns)
    n_cols = int(min(n_cols, len(columns)))
    if n_cols < 1:
        raise ValueError("singling_out_risk: no columns")
    rng = np.random.default_rng(seed)
    frames = [f[columns].drop_duplicates().reset_index(drop=True) for f in (syn, ori, control)]
    space = _space(frames, columns)
    x_syn, x_ori, x_ctl = space.mats
    numeric_cols = [j for j, k in enumerate(space.kinds) if k in ("numerical", "datetime")]
    medians = np.full(len(columns), np.nan)
    for j in numeric_cols:
        col = x_syn[:, j][~np.isnan(x_syn[:, j])]
        medians[j] = float(np.median(col)) if col.size else np.nan
    max_attempts = int(max_attempts if max_attempts is not None else max(50_000, 100 * n_attacks))

    found = np.zeros((0, n_cols, 3))
    attempts = 0
    stalled = 0
    batch = max(256, 4 * n_attacks)
    while len(found) < n_attacks and attempts < max_attempts and stalled < 3:
        cand = _record_queries(x_syn, space.kinds, medians, min(batch, max_attempts - attempts), n_cols, rng)
        attempts += len(cand)
        hits = cand[_count(x_syn, cand, 2) == 1]
        before = len(found)
        found = _unique_queries(np.concatenate([found, hits]))
        stalled = stalled + 1 if len(found) == before else 0
    queries = list(found[:n_attacks])
    qarr = np.stack(queries) if queries else np.zeros((0, n_cols, 3))
    n = len(qarr)
    base = _random_queries(x_syn, space.kinds, n, n_cols, rng) if n else np.zeros((0, n_cols, 3))

    # attack training and control records at the same population size
    n_small = min(len(x_ori), len(x_ctl))
    repeats = 1 if len(x_ori) == len(x_ctl) else max(1, int(size_repeats))
    succ = base_succ = ctl = 0.0
    for _ in range(repeats):
        xo = x_ori if len(x_ori) == n_small else x_ori[rng.choice(len(x_ori), n_small, replace=False)]
        xc = x_ctl if len(x_ctl) == n_small else x_ctl[rng.choice(len(x_ctl), n_small, replace=False)]
        succ += float((_count(np.ascontiguousarray(xo), qarr, 2) == 1).sum())
        base_succ += float((_count(np.ascontiguousarray(xo), base, 2) == 1).sum())
        ctl += float((_count(np.ascontiguousarray(xc), qarr, 2) == 1).sum())
    if n < n_attacks:
        log.info("singling out: %d of %d requested queries single out a synthetic record (%d attempts%s)",
                 n, n_attacks, attempts, ", no new query in the last 3 batches" if stalled >= 3 else "")
    if n == 0 and attempts > 0:
        # Searched, and no predicate singles out one synthetic record (a large table on coarse columns: at 1.6M
        # rows on age, gender and two more, none in 60,000 tries): the attacker has nothing to bet with. Zero
        # successes in zero attacks is no evidence of risk and no proof of safety: the interval is [0, 1] (so a
        # gate that needs certification still refuses; one that refuses on evidence of risk does not).
        return {"risk": 0.0, "ci": [0.0, 1.0], "error": 0.5, "n_attacks": 0, "n_success": 0, "n_control": 0,
                "n_baseline": 0, "no_query": True,
                "note": f"no predicate on {n_cols} columns singles out one synthetic record in {attempts} "
                        "attempts: the attack has nothing to try (no evidence of risk; not certified)",
                "confidence_level": confidence, "columns": columns, "n_cols": n_cols,
                "n_requested": int(n_attacks), "attempts": int(attempts), "population_rows": int(n_small),
                "size_repeats": int(repeats)}
    return _risk_record(n, succ / repeats, base_succ / repeats, ctl / repeats, confidence,
                        columns=columns, n_cols=n_cols, n_requested=int(n_attacks), attempts=int(attempts),
                        population_rows=int(n_small), size_repeats=int(repeats))


# ------------------------------------------------------------------------------------------------
# all three
# ------------------------------------------------------------------------------------------------
def anonymeter_risks(
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    synthetic: pd.DataFrame,
    *,
    quasi_identifiers: Sequence[str],
    sensitive_attributes: Sequence[str],
    n_attacks: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Singling out (on quasi-identifiers and sensitive attributes), linkability (quasi-identifiers
    vs sensitive attributes) and inference (each sensitive attribute from the quasi-identifiers), the
    holdout as control. An attack whose columns are not configured is skipped (and says so)."""
    qis, sens = list(quasi_identifiers), list(sensitive_attributes)
    cols = list(dict.fromkeys([*qis, *sens]))
    out: dict[str, Any] = {
        "method": "anonymeter 1.0.0 method, native implementation (synthfactory.privacy.attacks)",
        "n_attacks_requested": int(n_attacks),
        "confidence_level": confidence,
        "train_rows": int(len(train)),
        "control_rows": int(len(holdout)),
        "synthetic_rows": int(len(synthetic)),
        "quasi_identifiers": qis,
        "sensitive_attributes": sens,
        "risks": {},
    }
    risks: dict[str, dict] = out["risks"]
    if cols:
        risks["singling_out"] = singling_out_risk(train, synthetic, holdout, cols, n_attacks=n_attacks,
                                                  seed=seed, confidence=confidence)
    if qis and sens:
        risks["linkability"] = linkability_risk(train, synthetic, holdout, (qis, sens), n_attacks=n_attacks,
                                                seed=seed + 1, confidence=confidence)
    if qis:
        for i, secret in enumerate(sens):
            aux = [c for c in qis if c != secret]
            if aux:
                risks[f"inference:{secret}"] = inference_risk(train, synthetic, holdout, aux, secret,
                                                              n_attacks=n_attacks, seed=seed + 2 + i,
                                                              confidence=confidence)
    return out
