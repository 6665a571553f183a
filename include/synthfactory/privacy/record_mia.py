"""Record-level membership inference for relational mode: a patient's whole record is the unit, and the
attacker knows only *part* of it.

The attacker of a target patient knows the patient's sex and birth year and ``known_events`` of their
clinical events: a random subset of their distinct coded concepts (condition, observation, medication,
procedure codes: every child table with a ``code`` and an event-time column), each with one of its dates,
known only approximately (uniform jitter of +- ``jitter_days``, default 7: the week). The date precision
matters: on the clinosim cohorts most events of all patients fall within one year, so codes known to +- 30 days
barely identify anyone (a release of copied train records scores AUC 0.81 there, 0.96 at +- 7 days; see
bench/results/relational_privacy.md). Members are real train patients (the
synthesizer saw their records), non-members real held-out patients. Three figures:

``partial_distance``
    The partial-knowledge distance of the target's known facts to the closest synthetic record, smaller =
    member. Per known event: 0 when the record holds the same code on the same (approximate) day, rising
    to 0.5 at ``tau_days`` (default 30) or more apart, 1 when the record lacks the code; sex mismatch 1, birth-year
    difference / 5 (at most 1); averaged over the known facts. A record sharing all the known events on
    their dates is at distance ~0.

``partial_domias``
    DOMIAS (:mod:`.mia`) on the same distance: the Gaussian kernel density of the synthetic records at the
    target's known facts over that of the reference population (the real held-out records, leave-one-out
    for held-out targets); bandwidth: the median distance of a held-out target to its closest train record
    (the battery's ``nn`` rule). A synthesizer that overfits puts more synthetic mass on its training
    records than the population has there.

``partial_exact_match_rate``
    The share of member targets (with at least one known event) whose known facts, dates to the day, match
    exactly one synthetic record (same sex and birth year, every known code on its exact day): the attacker
    singles the patient out in the release. Reported beside the same share for non-member targets. Its
    reference (fresh real records, smaller than the release) is also given scaled to the release's size
    (``partial_exact_match_rate_at_release_size``: a coincidental unique match is about as likely as the
    release is large), the figure the gate compares with.

Each AUC and TPR at 1 % / 10 % FPR comes with its stratified bootstrap 95 % interval
(:func:`.mia.roc_figures`). The real-data reference runs the same attacks with fresh real records as the
release (as :mod:`.reference` does for the single table): the real records (at most ``max_rows``) are re-split
``resplits`` times into a train part T, a held-out part H and a fresh part F (H and F of the held-out share);
F plays the synthetic records, T the members, H the non-members and the DOMIAS population; each figure is
summarised over the re-splits (:func:`~synthfactory.quality.reference.summarise`).

Nothing about a record leaves this module: results carry counts and figures only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from synthfactory.privacy.mia import FPR_KEYS, _roc, roc_figures
from synthfactory.privacy.reference import _log_kde_d
from synthfactory.quality.reference import summarise

__all__ = ["RECORD_ATTACKS", "Records", "attacker_knowledge", "partial_distances", "record_events",
           "record_mia"]

ROOT = "patient"
KEY = "patient_key"
#: event-time columns, by preference (as synthesize.relational.TIME_PREFERENCE)
TIME_COLUMNS = ("start", "onset", "effective", "authored_on", "performed", "recorded", "issued", "date")
#: the record-level attacks, in report order
RECORD_ATTACKS = ("partial_distance", "partial_domias")
EPOCH = pd.Timestamp("1970-01-01")


@dataclass
class Records:
    """The records of one set of patients: per record its sex and birth year, and its coded events
    (``rec``: the record's row, ``concept``: an integer id of (table, code), ``day``: days since 1970)."""

    keys: np.ndarray
    sex: np.ndarray
    birth_year: np.ndarray
    rec: np.ndarray
    concept: np.ndarray
    day: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, rows: np.ndarray) -> "Records":
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.full(len(self.keys), -1, dtype=np.int64)
        pos[rows] = np.arange(len(rows))
        keep = pos[self.rec] >= 0
        return Records(self.keys[rows], self.sex[rows], self.birth_year[rows], pos[self.rec[keep]],
                       self.concept[keep], self.day[keep])


def _days(s: pd.Series) -> np.ndarray:
    t = pd.to_datetime(s, errors="coerce", utc=True).dt.tz_convert(None)
    return np.floor((t - EPOCH).dt.total_seconds().to_numpy(dtype="float64") / 86400.0)


def _event_frames(tables: Mapping[str, pd.DataFrame]) -> list[pd.DataFrame]:
    out = []
    for name, df in tables.items():
        if name == ROOT or KEY not in df.columns or "code" not in df.columns:
            continue
        time = next((c for c in TIME_COLUMNS if c in df.columns), None)
        if time is None:
            continue
        ev = pd.DataFrame({KEY: df[KEY].astype(str).values,
                           "concept": (name + "\x1f" + df["code"].astype(str)).values,
                           "day": _days(df[time])})
        ev = ev[df["code"].notna().values & np.isfinite(ev["day"].to_numpy())]
        out.append(ev)
    return out


def record_events(*sets: Mapping[str, pd.DataFrame]) -> list[Records]:
    """The :class:`Records` of each set of relational tables, their concepts numbered alike."""
    frames = [_event_frames(t) for t in sets]
    allc = pd.concat([f["concept"] for fs in frames for f in fs] or [pd.Series([], dtype=object)])
    codes = {c: i for i, c in enumerate(pd.unique(allc))}
    out = []
    for tables, fs in zip(sets, frames):
        p = tables[ROOT]
        keys = p[KEY].astype(str).to_numpy()
        sex = p["gender"].astype(str).fillna("unknown").to_numpy() if "gender" in p else \
            np.full(len(p), "unknown", dtype=object)
        by = pd.to_datetime(p["birth_date"], errors="coerce").dt.year.to_numpy(dtype="float64") \
            if "birth_date" in p else np.full(len(p), np.nan)
        ev = pd.concat(fs, ignore_index=True) if fs else pd.DataFrame({KEY: [], "concept": [], "day": []})
        pos = pd.Series(np.arange(len(keys)), index=keys)
        ev = ev[ev[KEY].isin(pos.index)].drop_duplicates([KEY, "concept", "day"])
        rec = pos.reindex(ev[KEY].to_numpy()).to_numpy(dtype=np.int64)
        out.append(Records(keys, sex, by, rec, ev["concept"].map(codes).to_numpy(dtype=np.int64),
                           ev["day"].to_numpy(dtype="float64")))
    return out


@dataclass
class Knowledge:
    """What the attacker knows of each target: sex, birth year and up to ``k`` events (``target``: the
    target's row, ``day``: the exact day, ``approx``: the jittered day the attacker has)."""

    sex: np.ndarray
    birth_year: np.ndarray
    target: np.ndarray
    concept: np.ndarray
    day: np.ndarray
    approx: np.ndarray

    @property
    def n_known(self) -> np.ndarray:
        return np.bincount(self.target, minlength=len(self.sex))


def attacker_knowledge(records: Records, k: int, jitter_days: int, rng: np.random.Generator) -> Knowledge:
    """Per record: ``k`` of its distinct concepts at random (all of them when fewer), each with one of its
    days at random, that day known to +- ``jitter_days``."""
    order = rng.permutation(len(records.rec))
    ev = pd.DataFrame({"t": records.rec[order], "c": records.concept[order], "d": records.day[order]})
    ev = ev.drop_duplicates(["t", "c"])  # one random occurrence per concept
    ev = ev.iloc[rng.permutation(len(ev))].groupby("t", sort=False).head(int(k))
    ev = ev.sort_values(["t", "c"], kind="stable")
    day = ev["d"].to_numpy(dtype="float64")
    jitter = rng.integers(-int(jitter_days), int(jitter_days) + 1, size=len(day)) if jitter_days > 0 else 0
    return Knowledge(records.sex, records.birth_year, ev["t"].to_numpy(dtype=np.int64),
                     ev["c"].to_numpy(dtype=np.int64), day, day + jitter)


def _concept_index(records: Records) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """concept -> (records holding it, the start of each record's run in ``days``, ``days``) sorted by record."""
    order = np.lexsort((records.day, records.rec, records.concept))
    c, r, d = records.concept[order], records.rec[order], records.day[order]
    out = {}
    bounds = np.r_[0, np.nonzero(np.diff(c))[0] + 1, len(c)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        rr = r[a:b]
        starts = np.r_[0, np.nonzero(np.diff(rr))[0] + 1]
        out[int(c[a])] = (rr[starts], starts, d[a:b])
    return out


def _min_gaps(know: Knowledge, records: Records, exact: bool, block: int = 256):
    """Yield ``(targets, gaps)`` per known concept: ``gaps[i, j]`` the smallest |day difference| between the
    target's known day and record ``j``'s events of that concept (inf: the record lacks it)."""
    index = _concept_index(records)
    days = know.day if exact else know.approx
    order = np.argsort(know.concept, kind="stable")
    c = know.concept[order]
    bounds = np.r_[0, np.nonzero(np.diff(c))[0] + 1, len(c)] if len(c) else np.array([0])
    m = len(records)
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        got = index.get(int(c[a]))
        if got is not None:  # at most ~8e6 day differences (64 MB) at a time
            block = max(1, min(block, int(8e6 // max(len(got[2]), 1))))
        for s in range(0, len(rows), block):
            part = rows[s:s + block]
            gaps = np.full((len(part), m), np.inf)
            if got is not None:
                recs, starts, d = got
                diff = np.abs(days[part][:, None] - d[None, :])
                gaps[:, recs] = np.minimum.reduceat(diff, starts, axis=1)
            yield know.target[part], gaps


def _demographic_cost(know: Knowledge, records: Records) -> np.ndarray:
    sex = (know.sex[:, None] != records.sex[None, :]).astype("float64")
    dy = np.abs(know.birth_year[:, None] - records.birth_year[None, :]) / 5.0
    return sex + np.nan_to_num(np.minimum(dy, 1.0), nan=1.0)


def partial_distances(know: Knowledge, records: Records, tau_days: float = 30.0) -> np.ndarray:
    """``(targets, records)`` partial-knowledge distances (see the module docstring), in [0, 1]."""
    total = _demographic_cost(know, records)
    for t, gaps in _min_gaps(know, records, exact=False):
        total[t] += np.where(np.isfinite(gaps), 0.5 * np.minimum(gaps / float(tau_days), 1.0), 1.0)
    return total / (2.0 + know.n_known)[:, None]


def exact_matches(know: Knowledge, records: Records) -> np.ndarray:
    """``(targets, records)`` booleans: the record holds every known fact exactly (sex, birth year, every
    known concept on its exact day). Targets with no known event match nothing."""
    hits = np.zeros((len(know.sex), len(records)), dtype=np.int32)
    for t, gaps in _min_gaps(know, records, exact=True):
        hits[t] += (gaps == 0)
    n = know.n_known
    demo = (know.sex[:, None] == records.sex[None, :]) & (know.birth_year[:, None] == records.birth_year[None, :])
    return demo & (hits == n[:, None]) & (n[:, None] > 0)


def _unique_share(match: np.ndarray, targets: np.ndarray) -> float | None:
    """Share of ``targets`` (with at least one known event) matching exactly one record."""
    if not len(targets):
        return None
    return float(np.mean(match[targets].sum(axis=1) == 1))


def _bandwidth(d: np.ndarray) -> float:
    """The battery's ``nn`` rule on a distance block (rows: held-out targets, columns: train records)."""
    near = d.min(axis=1) if d.size else np.array([0.1])
    pos = near[near > 0]
    h = float(np.median(near)) if float(np.median(near)) > 0 else (float(np.median(pos)) if pos.size else 0.1)
    return max(h, 1e-3)


def _domias(d_mem_syn, d_non_syn, d_mem_ref, d_non_ref_loo, h) -> tuple[np.ndarray, np.ndarray]:
    sm = _log_kde_d(d_mem_syn, h) - _log_kde_d(d_mem_ref, h)
    sn = _log_kde_d(d_non_syn, h) - _log_kde_d(d_non_ref_loo, h)
    return (np.nan_to_num(sm, nan=0.0, posinf=1e6, neginf=-1e6),
            np.nan_to_num(sn, nan=0.0, posinf=1e6, neginf=-1e6))


def record_mia(train: Mapping[str, pd.DataFrame], holdout: Mapping[str, pd.DataFrame],
               synthetic: Mapping[str, pd.DataFrame], *, known_events: int = 3, jitter_days: int = 7,
               tau_days: float = 30.0, resplits: int = 10, bootstrap: int = 200, max_rows: int = 2000,
               seed: int = 0) -> dict[str, Any]:
    """The record-level attacks (see the module docstring) on ``synthetic``, beside their real-data
    reference. ``train`` / ``holdout`` / ``synthetic``: relational tables (``patient`` and its children)."""
    rng = np.random.default_rng(seed + 7919)
    r_tr, r_ho, r_syn = record_events(train, holdout, synthetic)
    n_tr, n_ho = len(r_tr), len(r_ho)
    real = Records(np.r_[r_tr.keys, r_ho.keys], np.r_[r_tr.sex, r_ho.sex], np.r_[r_tr.birth_year, r_ho.birth_year],
                   np.r_[r_tr.rec, r_ho.rec + n_tr], np.r_[r_tr.concept, r_ho.concept], np.r_[r_tr.day, r_ho.day])
    is_member = np.r_[np.ones(n_tr, bool), np.zeros(n_ho, bool)]
    # the pool of real records: every one, or max_rows of them (members and non-members in their shares)
    n_real = n_tr + n_ho
    pool = np.arange(n_real) if n_real <= max_rows else np.sort(rng.choice(n_real, size=max_rows, replace=False))
    real = real.subset(pool)
    is_member = is_member[pool]
    know = attacker_knowledge(real, known_events, jitter_days, rng)
    d_rs = partial_distances(know, r_syn, tau_days)
    d_rr = partial_distances(know, real, tau_days)
    e_rs = exact_matches(know, r_syn)
    e_rr = exact_matches(know, real)
    has_events = know.n_known > 0
    mem, non = np.nonzero(is_member)[0], np.nonzero(~is_member)[0]
    out: dict[str, Any] = {"known_events": int(known_events), "jitter_days": int(jitter_days),
                           "tau_days": float(tau_days), "members": int(len(mem)), "nonmembers": int(len(non)),
                           "synthetic_records": int(len(r_syn)),
                           "median_known_events": float(np.median(know.n_known)) if len(know.sex) else 0.0}
    attacks: dict[str, dict] = {}
    if len(mem) and len(non) and len(r_syn):
        s_m, s_n = -d_rs[mem].min(axis=1), -d_rs[non].min(axis=1)
        attacks["partial_distance"] = {"status": "measured",
                                       **roc_figures(s_m, s_n, bootstrap=bootstrap, seed=seed)}
        if len(non) >= 10:
            h = _bandwidth(d_rr[np.ix_(non, mem)])
            loo = d_rr[np.ix_(non, non)].copy()
            np.fill_diagonal(loo, np.inf)  # a held-out record is not its own population
            sm, sn = _domias(d_rs[mem], d_rs[non], d_rr[np.ix_(mem, non)], loo, h)
            attacks["partial_domias"] = {"status": "measured", "bandwidth": round(h, 5),
                                         **roc_figures(sm, sn, bootstrap=bootstrap, seed=seed)}
        else:
            attacks["partial_domias"] = {"status": "skipped", "reason": f"{len(non)} held-out records: no "
                                                                        f"reference density"}
    else:
        for a in RECORD_ATTACKS:
            attacks[a] = {"status": "skipped", "reason": "no members, non-members or synthetic records"}
    out["attacks"] = attacks
    out["partial_exact_match_rate"] = _unique_share(e_rs, mem[has_events[mem]])
    out["partial_exact_match_rate_nonmembers"] = _unique_share(e_rs, non[has_events[non]])
    out["partial_exact_match_targets"] = int(has_events[mem].sum())
    out["reference"] = _reference(d_rr, e_rr, has_events, n_ho_share=n_ho / max(n_real, 1), resplits=resplits,
                                  n_release=len(r_syn),
                                  rng=rng)
    return out


def _reference(d: np.ndarray, e: np.ndarray, has_events: np.ndarray, *, n_ho_share: float, resplits: int,
               n_release: int,
               rng: np.random.Generator) -> dict:
    """The same figures with fresh real records as the release, over ``resplits`` re-splits of the pool."""
    n = len(d)
    n_part = int(min(max(2, round(n_ho_share * n)), n // 3))
    if resplits <= 0 or n_part < 2:
        return {"skipped": f"{resplits} re-splits of {n} real records"}
    figs: dict[str, list] = {f"{a}_{k}": [] for a in RECORD_ATTACKS for k in ("auc", *FPR_KEYS)}
    figs["partial_exact_match_rate"] = []
    figs["partial_exact_match_rate_at_release_size"] = []
    for _ in range(int(resplits)):
        perm = rng.permutation(n)
        f, ho, tr = np.sort(perm[:n_part]), np.sort(perm[n_part:2 * n_part]), np.sort(perm[2 * n_part:])
        d_tf, d_hf = d[np.ix_(tr, f)], d[np.ix_(ho, f)]
        auc, tprs = _roc(-d_tf.min(axis=1), -d_hf.min(axis=1))
        figs["partial_distance_auc"].append(auc)
        for key, v in zip(FPR_KEYS, tprs):
            figs[f"partial_distance_{key}"].append(float(v))
        if n_part >= 10:
            h = _bandwidth(d[np.ix_(ho, tr)])
            loo = d[np.ix_(ho, ho)].copy()
            np.fill_diagonal(loo, np.inf)
            sm, sn = _domias(d_tf, d_hf, d[np.ix_(tr, ho)], loo, h)
            auc, tprs = _roc(sm, sn)
            figs["partial_domias_auc"].append(auc)
            for key, v in zip(FPR_KEYS, tprs):
                figs[f"partial_domias_{key}"].append(float(v))
        targets = tr[has_events[tr]]
        if len(targets):
            rate = float(np.mean(e[np.ix_(targets, f)].sum(axis=1) == 1))
            figs["partial_exact_match_rate"].append(rate)
            # a coincidental match grows with the release: scaled to the synthetic records' count (rare events)
            figs["partial_exact_match_rate_at_release_size"].append(min(1.0, rate * max(n_release, n_part) / n_part))
    out: dict[str, Any] = {k: summarise(v) for k, v in figs.items()}
    out.update({"resplits": int(resplits), "fresh_records": n_part, "holdout_records": n_part,
                "train_records": n - 2 * n_part})
    return out
