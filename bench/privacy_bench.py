"""Privacy audit: synthfactory's DCRBaselineProtection and anonymeter attacks against the tools themselves.

Anchors, on the same data in the same run:

* **SDMetrics ``DCRBaselineProtection``** (sdmetrics 0.32, ``compute_breakdown``, no subsampling) against
  ``synthfactory.privacy.metrics.dcr_baseline_protection``: the same score formula, distance and random
  baseline, on the exact pruned Gower search instead of SDMetrics' pandas cross join. Both draw the
  random baseline table from the same seeds (``DCRBaselineProtection._seed`` and ``np.random.seed`` on
  SDMetrics' side), so the two scores must agree to float rounding; the row records both and their
  difference. Goal: >= 100x faster at 10k x 10k with |score difference| <= 0.01, and 100k x 100k in
  under 60 s. SDMetrics is not run above ``--sdmetrics-max`` rows (10k by default: it needs hours at
  100k); above that, ours only.
* **anonymeter 1.0.0** (singling out, linkability, inference) against ``synthfactory.privacy.attacks``
  (same published method, native). Cross-checks: the nearest-neighbour distance of every attack target
  must be identical in both implementations (indices may differ only between exactly tied records);
  every singling-out query of ours, rendered as anonymeter's ``DataFrame.query`` string and counted by
  pandas, must give the same match counts as our kernel; and both tools' risks are reported side by
  side (they agree statistically, not digit for digit: anonymeter draws targets and queries from
  unseeded generators). anonymeter's Gower distance turns missing values into NaN distances, so this
  comparison runs on a copy with missing labs filled with the column median. anonymeter is not run
  above ``--anonymeter-max`` rows.
* The whole audit as the pipeline runs it (``privacy_metrics``: exact matches, DCR share and NNDR,
  membership-inference AUC, k-anonymity, anonymeter attacks, DCRBaselineProtection), ours only.

Data: :func:`synthfactory.quality.testdata.cohort_table` (the demo modelling table's 19 columns, 15 %
missing labs), fixed seeds: real train N rows (seed), real holdout N/4 rows (seed+1), synthetic N rows
(seed+2: an independent draw, i.e. an ideal synthesizer).

    .venv/bin/python bench/privacy_bench.py --sizes 2000 10000 100000 --out bench/results/raw/privacy.json
    .venv/bin/python bench/privacy_bench.py --smoke --out /tmp/privacy_smoke.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, resolve_sizes, result, standard_args, timed  # noqa: E402

DEFAULT_SIZES = (2_000, 10_000, 100_000)
SMOKE_SIZES = (200,)
GOAL_SPEEDUP = 100.0
GOAL_SECONDS_100K = 60.0
QIS = ["age", "gender"]
SENSITIVE = ["cond_e11_9", "hba1c"]


def _data(n: int, seed: int) -> tuple[Any, Any, Any]:
    from synthfactory.testing.cohorts import cohort_table

    train = cohort_table(n, seed, key=None)
    holdout = cohort_table(max(n // 4, 50), seed + 1, key=None)
    synthetic = cohort_table(n, seed + 2, key=None)
    return train, holdout, synthetic


def _sdmetrics_dcr(real: Any, synthetic: Any, metadata: dict, seed: int) -> dict:
    import numpy as np
    from sdmetrics.single_table import DCRBaselineProtection

    DCRBaselineProtection._seed = seed
    np.random.seed(seed)  # SDMetrics draws the random table's missing masks from the global state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DCRBaselineProtection.compute_breakdown(real, synthetic, metadata, None)


# -- anonymeter cross-check ------------------------------------------------------------------------
def _filled(df: Any) -> Any:
    out = df.copy()
    for c in out.columns:
        if out[c].dtype.kind == "f":
            out[c] = out[c].fillna(out[c].median())
    return out


def _nn_crosscheck(targets: Any, syn: Any, cols: list[str]) -> dict:
    """Nearest synthetic record of each target: anonymeter's MixedTypeKNeighbors vs our Gower search."""
    import numpy as np
    from anonymeter.neighbors.mixed_types_kneighbors import MixedTypeKNeighbors

    from synthfactory.privacy.gower import column_sdtype as _kind
    from synthfactory.privacy.gower import GowerIndex, encode_gower

    s_anon, (d_anon, i_anon) = timed(lambda: MixedTypeKNeighbors(n_neighbors=1, n_jobs=-1).fit(syn[cols])
                                     .kneighbors(targets[cols], return_distance=True))

    def ours() -> tuple:
        ref, (q,), _ = encode_gower(syn[cols], [targets[cols]], cols, {c: _kind(syn[c]) for c in cols},
                                    numeric_range="union")
        return GowerIndex(ref).search(q)

    s_ours, (d_ours, i_ours) = timed(ours)
    d_anon, i_anon = d_anon[:, 0], i_anon[:, 0]
    same_idx = i_anon == i_ours
    return {"targets": int(len(targets)), "columns": cols,
            "max_abs_distance_diff": float(np.abs(d_anon - d_ours).max()),
            "same_index_share": float(same_idx.mean()),
            "index_differs_only_on_exact_ties": bool(np.allclose(d_anon[~same_idx], d_ours[~same_idx], atol=1e-5)),
            "anonymeter_seconds": round(s_anon, 3), "ours_seconds": round(s_ours, 3)}


def _query_crosscheck(train: Any, holdout: Any, syn: Any, cols: list[str], n: int, seed: int) -> dict:
    """Our singling-out queries, counted by our kernel and by pandas ``DataFrame.query`` (anonymeter's way)."""
    import numpy as np

    from synthfactory.privacy import attacks

    frames = [f[cols].drop_duplicates().reset_index(drop=True) for f in (syn, train, holdout)]
    space = attacks._space(frames, cols)
    rng = np.random.default_rng(seed)
    x_syn = space.mats[0]
    med = np.array([np.nanmedian(x_syn[:, j]) if k in ("numerical", "datetime") else np.nan
                    for j, k in enumerate(space.kinds)])
    queries = np.concatenate([attacks._record_queries(x_syn, space.kinds, med, n, min(3, len(cols)), rng),
                              attacks._random_queries(x_syn, space.kinds, n, min(3, len(cols)), rng)])
    agree = total = 0
    for frame, mat in zip(frames[1:], space.mats[1:]):
        ours = attacks._count(mat, queries, 10**9)
        theirs = np.array([len(frame.query(attacks.render_query(q, space), engine="python")) for q in queries])
        agree += int((ours == theirs).sum())
        total += len(queries)
    return {"queries": int(len(queries)), "frames": 2, "count_agreement": agree / total}


def _anonymeter_package(train: Any, holdout: Any, syn: Any, n_attacks: int, so_attacks: int,
                        so_max_attempts: int) -> dict:
    """The anonymeter package's three evaluators, as its documentation runs them."""
    from anonymeter.evaluators import InferenceEvaluator, LinkabilityEvaluator, SinglingOutEvaluator

    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            so = SinglingOutEvaluator(ori=train[QIS + SENSITIVE], syn=syn[QIS + SENSITIVE],
                                      control=holdout[QIS + SENSITIVE], n_attacks=so_attacks,
                                      max_attempts=so_max_attempts).evaluate("multivariate")
            out["singling_out"] = so.risk()
        except Exception as err:  # anonymeter's size-correction fit fails on small control sets
            out["singling_out"] = f"failed: {type(err).__name__}: {err}"[:200]
        lk = LinkabilityEvaluator(ori=train, syn=syn, control=holdout, n_attacks=n_attacks,
                                  aux_cols=(QIS, SENSITIVE)).evaluate(n_jobs=-1)
        out["linkability"] = lk.risk()
        for secret in SENSITIVE:
            ev = InferenceEvaluator(ori=train, syn=syn, control=holdout, aux_cols=QIS, secret=secret,
                                    regression=secret == "hba1c", n_attacks=n_attacks).evaluate(n_jobs=-1)
            out[f"inference:{secret}"] = ev.risk()
    return {k: v if isinstance(v, str) else {"risk": round(v.value, 4), "ci": [round(v.ci[0], 4), round(v.ci[1], 4)]}
            for k, v in out.items()}


def _ours_anonymeter(train: Any, holdout: Any, syn: Any, n_attacks: int, so_attacks: int, so_max_attempts: int,
                     seed: int) -> dict:
    from synthfactory.privacy.attacks import inference_risk, linkability_risk, singling_out_risk

    res = {"singling_out": singling_out_risk(train, syn, holdout, QIS + SENSITIVE, n_attacks=so_attacks, seed=seed,
                                             max_attempts=so_max_attempts),
           "linkability": linkability_risk(train, syn, holdout, (QIS, SENSITIVE), n_attacks=n_attacks, seed=seed)}
    for secret in SENSITIVE:
        res[f"inference:{secret}"] = inference_risk(train, syn, holdout, QIS, secret, n_attacks=n_attacks, seed=seed)
    return {k: {"risk": round(v["risk"], 4), "ci": [round(v["ci"][0], 4), round(v["ci"][1], 4)],
                "n_attacks": v["n_attacks"]} for k, v in res.items()}


def main(argv: list[str] | None = None) -> int:
    ap = standard_args(argparse.ArgumentParser(description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter),
                       DEFAULT_SIZES, SMOKE_SIZES)
    ap.add_argument("--sdmetrics-max", type=int, default=10_000,
                    help="largest size SDMetrics DCRBaselineProtection is run at (it is quadratic, in pandas)")
    ap.add_argument("--anonymeter-max", type=int, default=10_000, help="largest size the anonymeter package runs at")
    ap.add_argument("--anonymeter-package", action=argparse.BooleanOptionalAction, default=None,
                    help="run the anonymeter package as the anchor (default: yes, except with --smoke: its numba "
                         "kernels compile for ~15 s on every start)")
    ap.add_argument("--attacks", type=int, default=5000, help="anonymeter attacks per evaluator (ours, full audit)")
    args = ap.parse_args(argv)
    sizes = resolve_sizes(args)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("SYNTHFACTORY_PROGRESS_SECONDS", "0")

    from synthfactory.privacy import attacks, metrics
    from synthfactory.synthesize.engine import metadata_dict

    # warm-up outside the timings: imports, numba kernels (compiled once, cached on disk), SDMetrics
    w_train, w_hold, w_syn = _data(200, args.seed)
    metrics.dcr_baseline_protection(w_train, w_syn, seed=args.seed)
    attacks.anonymeter_risks(w_train, w_hold, w_syn, quasi_identifiers=QIS, sensitive_attributes=SENSITIVE,
                             n_attacks=20, seed=args.seed)
    import sdmetrics.single_table  # noqa: F401

    rows: list[dict] = []
    details: list[dict] = []
    run_package = (not args.smoke) if args.anonymeter_package is None else args.anonymeter_package
    so_attacks = 20 if args.smoke else 500
    so_max_attempts = 10 * so_attacks  # anonymeter's default (10 million) takes hours on small tables
    for n in sizes:
        train, holdout, syn = _data(n, args.seed)
        meta = metadata_dict(train)
        detail: dict[str, Any] = {"rows": n, "holdout_rows": len(holdout)}

        # 1. DCRBaselineProtection: ours vs SDMetrics
        ours_s, ours = timed(lambda: metrics.dcr_baseline_protection(train, syn, meta, seed=args.seed))
        anchor_s = anchor = None
        if n <= args.sdmetrics_max:
            anchor_s, anchor = timed(lambda: _sdmetrics_dcr(train, syn, meta, args.seed))
        diff = None if anchor is None else abs(ours["score"] - anchor["score"])
        rows.append(result("DCRBaselineProtection", n, ours_s, "SDMetrics DCRBaselineProtection", anchor_s, "s",
                           "lower", size_unit="rows x rows", ours_score=round(ours["score"], 6),
                           anchor_score=None if anchor is None else round(anchor["score"], 6),
                           score_abs_diff=None if diff is None else float(f"{diff:.3g}"),
                           same_score=None if diff is None else bool(diff <= 0.01),
                           speedup=None if anchor_s is None else round(anchor_s / ours_s, 1),
                           meets_goal=_goal(n, ours_s, anchor_s)))
        detail["dcr_baseline_protection"] = {
            "ours": ours, "ours_seconds": round(ours_s, 3),
            "sdmetrics": anchor, "sdmetrics_seconds": None if anchor_s is None else round(anchor_s, 3),
            "speedup": None if anchor_s is None else round(anchor_s / ours_s, 1)}
        print(f"rows={n}: DCRBaselineProtection ours {ours_s:.2f}s score {ours['score']:.6f}"
              + ("" if anchor is None else f"; SDMetrics {anchor_s:.2f}s score {anchor['score']:.6f} "
                                           f"(x{anchor_s / ours_s:.0f}, |diff| {diff:.2g})"), file=sys.stderr)

        # 2. the whole audit, as the pipeline runs it
        audit_s, audit = timed(lambda: metrics.privacy_metrics(
            train, holdout, syn, seed=args.seed, quasi_identifiers=QIS, sensitive_attributes=SENSITIVE,
            anonymeter_attacks=args.attacks, metadata=meta))
        rows.append(result(f"privacy audit (all metrics, {args.attacks} anonymeter attacks)", n, audit_s, None, None,
                           "s", "lower", size_unit="rows x rows", part_seconds=audit["seconds"]))
        detail["audit"] = {"seconds": round(audit_s, 3), "parts": audit["seconds"],
                           "dcr_share_adjusted": round(audit["dcr"]["dcr_share_adjusted"], 4),
                           "mia_auc": round(audit["mia"]["auc"], 4),
                           "anonymeter": {k: {"risk": round(v["risk"], 4), "ci": [round(c, 4) for c in v["ci"]],
                                              "n_attacks": v["n_attacks"]}
                                          for k, v in audit["anonymeter"]["risks"].items()}}
        print(f"rows={n}: full audit {audit_s:.2f}s {audit['seconds']}", file=sys.stderr)

        # 3. anonymeter: the package vs ours, on a copy without missing values (see the module docstring)
        if n <= args.anonymeter_max:
            ftrain, fhold, fsyn = _filled(train), _filled(holdout), _filled(syn)
            n_att = len(fhold)
            ours_a_s, ours_a = timed(lambda: _ours_anonymeter(ftrain, fhold, fsyn, n_att, so_attacks,
                                                              so_max_attempts, args.seed))
            anon_s = anon = None
            if run_package:
                anon_s, anon = timed(lambda: _anonymeter_package(ftrain, fhold, fsyn, n_att, so_attacks,
                                                                 so_max_attempts))
            rows.append(result(f"anonymeter 3 attacks ({n_att} attacks, singling out {so_attacks})", n, ours_a_s,
                               "anonymeter 1.0.0" if run_package else None, anon_s, "s", "lower",
                               size_unit="rows x rows"))
            detail["anonymeter"] = {
                "ours": ours_a, "ours_seconds": round(ours_a_s, 3),
                "package": anon, "package_seconds": None if anon_s is None else round(anon_s, 3),
                "singling_out_query_crosscheck": _query_crosscheck(ftrain, fhold, fsyn, QIS + SENSITIVE,
                                                                   25 if args.smoke else 100, args.seed),
            }
            if run_package:
                targets = fhold.sample(min(len(fhold), 1000), random_state=args.seed)
                detail["anonymeter"]["nn_crosscheck_qis"] = _nn_crosscheck(targets, fsyn, QIS)
                detail["anonymeter"]["nn_crosscheck_all_columns"] = _nn_crosscheck(targets, fsyn, list(ftrain.columns))
            print(f"rows={n}: anonymeter ours {ours_a_s:.2f}s"
                  + ("" if anon_s is None else f" vs package {anon_s:.2f}s; NN cross-check "
                                               f"{detail['anonymeter']['nn_crosscheck_all_columns']}"), file=sys.stderr)
        details.append(detail)

    notes = [
        f"goal: DCRBaselineProtection >= {GOAL_SPEEDUP:.0f}x faster than SDMetrics at 10k x 10k with |score diff| "
        f"<= 0.01; 100k x 100k in < {GOAL_SECONDS_100K:.0f} s",
        f"SDMetrics is run up to {args.sdmetrics_max} rows and anonymeter up to {args.anonymeter_max} rows; "
        "larger sizes report ours only (SDMetrics would need hours)",
        "data: synthfactory.quality.testdata.cohort_table, 19 columns; train N (seed), holdout N/4 (seed+1), "
        f"synthetic N (seed+2); seed {args.seed}; timings are single runs after a warm-up (numba kernels cached)",
        "anonymeter comparison on a copy with missing labs filled by the median (anonymeter's distance is NaN "
        "for a missing value); risks agree statistically, not digit for digit (anonymeter is unseeded); "
        f"linkability / inference attack every holdout record; singling out {so_attacks} queries, at most "
        f"{so_max_attempts} attempts in both tools",
        f"machine: {os.cpu_count()} logical cores; numba threads {_numba_threads()}",
    ]
    emit("privacy", rows, args.out, params={"sizes": sizes, "seed": args.seed, "attacks": args.attacks,
                                             "sdmetrics_max": args.sdmetrics_max,
                                             "anonymeter_max": args.anonymeter_max, "details": details},
         notes=notes, smoke=args.smoke)
    return 0


def _goal(n: int, ours_s: float, anchor_s: float | None) -> bool | None:
    if anchor_s is not None:
        return bool(anchor_s / ours_s >= GOAL_SPEEDUP)
    if n >= 100_000:
        return bool(ours_s < GOAL_SECONDS_100K)
    return None


def _numba_threads() -> int | None:
    try:
        import numba

        return int(numba.get_num_threads())
    except Exception:  # pragma: no cover
        return None


if __name__ == "__main__":
    sys.exit(main())
