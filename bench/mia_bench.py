"""The membership-inference battery (synthfactory.privacy.mia) against the ``domias`` package and anonymeter, on
the same data in one run, plus the cost of the battery at 10,000 rows and which attacks catch an overfitted model.

Parts (each row of the results names its anchor):

1. **Cost** at ``--rows`` (10,000) training rows: GaussianCopula fitted on train, 10,000 synthetic rows; the
   whole battery (distance, DOMIAS, shadow with ``--shadow-models`` GaussianCopula shadow models) timed, wall
   and CPU seconds, on the cores this process may use (run it under ``taskset -c 0,1`` for "2 cores").
2. **DOMIAS vs the ``domias`` package** (van Breugel et al., pip ``domias``, run in its own virtual environment
   ``--domias-python``, never a project requirement): members = ``--domias-members`` train rows, non-members
   as many holdout rows, reference population = the rest of the holdout, synthetic = the GaussianCopula table
   of part 1 (and the overfitted table of part 3), all in our encode space. The package side is its own
   code: ``domias.baselines.baselines`` (LOGAN-D1, MC, GAN-leaks, GAN-leaks-CAL) and its DOMIAS formula with
   ``scipy.stats.gaussian_kde`` (``evaluate_performance`` minus generator training and its LOGAN-0 CTGAN); ours
   is :func:`~synthfactory.privacy.mia.domias_scores` with the ``nn`` and ``scott`` bandwidths.
3. **Overfitted model**: ``--overfit-kind`` (ctgan) trained ``--overfit-epochs`` (300) epochs on
   ``--overfit-rows`` (200) rows; each attack's AUC and TPR at FPR 1 % with intervals, which attacks the gate
   refuses on, and the anonymeter package's risks on the same tables (its three evaluators; singling out,
   linkability and inference on the demo quasi-identifiers) beside our battery. An honest model
   (GaussianCopula, same rows) is the control.

Data: :func:`synthfactory.testing.cohorts.cohort_table` (the demo modelling table's 19 columns), fixed seeds.

    .venv/bin/python bench/mia_bench.py --out bench/results/mia.json        # writes mia.json and mia.md
    .venv/bin/python bench/mia_bench.py --smoke --out /tmp/mia_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "include"))

from common import machine_info, write_json  # noqa: E402

QIS = ["age", "gender"]
SENSITIVE = ["cond_e11_9", "hba1c"]

DOMIAS_SIDE = r'''
import json, sys, warnings
import numpy as np
from scipy import stats
from domias.baselines import baselines
from sklearn.metrics import roc_auc_score
warnings.simplefilter("ignore")
d = np.load(sys.argv[1])
mem, non, ref, syn = d["mem"], d["non"], d["ref"], d["syn"]
X = np.concatenate([mem, non]); Y = np.r_[np.ones(len(mem)), np.zeros(len(non))].astype(bool)
out = {}
for label, cols in (("all columns", slice(None)), ("numeric columns", d["numeric"])):
    try:
        res, _ = baselines(X[:, cols], Y, syn[:, cols], ref[:, cols], ref[:, cols])
        out[f"baselines ({label})"] = {k: v.get("aucroc") for k, v in res.items()}
    except Exception as e:
        out[f"baselines ({label})"] = f"failed: {type(e).__name__}: {e}"[:160]
for label, cols in (("all columns", slice(None)), ("numeric columns", d["numeric"])):
    try:
        g = stats.gaussian_kde(syn[:, cols].T); r = stats.gaussian_kde(ref[:, cols].T)
        p = g(X[:, cols].T) / (r(X[:, cols].T) + 1e-10)
        out[f"domias_kde ({label})"] = float(roc_auc_score(Y, p))
    except Exception as e:
        out[f"domias_kde ({label})"] = f"failed: {type(e).__name__}: {e}"[:160]
import domias
out["version"] = getattr(domias, "__version__", None) or __import__("importlib.metadata").metadata.version("domias")
print(json.dumps(out))
'''


def _data(n_train: int, n_hold: int, seed: int):
    from synthfactory.testing.cohorts import cohort_table

    full = cohort_table(n_train + n_hold, seed=seed, key=None)
    return full.iloc[:n_train].reset_index(drop=True), full.iloc[n_train:].reset_index(drop=True)


def _fit_sample(kind: str, params: dict, train, n: int, seed: int = 0):
    from synthfactory.privacy.mia import spec_fit_sample
    from synthfactory.synthesize import engine

    return spec_fit_sample(kind, params, engine.metadata_dict(train), transforms="ehr")(train, n, seed)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _brief(res: dict) -> dict:
    keys = ("status", "reason", "auc", "auc_ci", "tpr_at_fpr_01", "tpr_at_fpr_01_ci", "tpr_at_fpr_10",
            "tpr_at_fpr_10_ci", "tpr_at_fpr_01_resolved", "tpr_at_fpr_10_resolved", "members", "nonmembers",
            "shadow_validation_auc", "shadow_models")
    return {k: res[k] for k in keys if k in res}


def _gate(battery: dict) -> dict:
    from synthfactory.privacy.mia import FPR_KEYS, FPRS, _maximum, summarise_battery
    from synthfactory.release.gate import mia_checks, mia_rule
    from synthfactory.spec import PrivacyThresholds

    pt = PrivacyThresholds()
    for v in battery["attacks"].values():  # results written before the resolution flags: derive them
        if v.get("status") == "measured":
            for k, f in zip(FPR_KEYS, FPRS):
                v.setdefault(f"{k}_resolved", v["nonmembers"] >= round(1 / f))
    battery = {**battery, "max": _maximum(battery["attacks"])}
    s = summarise_battery(battery)
    failed = [c.name for c in mia_checks({"mia_battery": s}, pt) if not c.passed]
    # which attacks alone would refuse (their lower bound beyond the threshold)
    caught = sorted({a for a, v in battery["attacks"].items() if v.get("status") == "measured" and (
        (v["auc_ci"][0] or 0) > pt.mia.max_auc or (
            v["tpr_at_fpr_01_resolved"] and (v["tpr_at_fpr_01_ci"][0] or 0) > pt.mia.max_tpr_at_fpr_01))})
    return {"refused_checks": failed, "caught_by": caught, "certified": mia_rule(s, pt)["certified"]}


def _domias_side_by_side(python: str, train, holdout, syn, n_members: int, seed: int) -> dict:
    from synthfactory.privacy.encoding import encode_with_layout
    from synthfactory.privacy.mia import _roc, domias_scores, kde_bandwidth

    cols = list(train.columns)
    rng = np.random.default_rng(seed)
    m = min(n_members, len(train), len(holdout) // 2)
    mem_rows = rng.choice(len(train), m, replace=False)
    (x_tr, x_ho, x_syn), layout = encode_with_layout([train, holdout, syn], cols)
    mem, non, ref = x_tr[mem_rows], x_ho[:m], x_ho[m:]
    numeric = np.array([i for i, w in enumerate(range(x_tr.shape[1])) if len(np.unique(x_tr[:, i])) > 10])
    ours: dict[str, Any] = {}
    for rule in ("nn", "scott"):
        h = kde_bandwidth(x_tr, ref, layout, rule)
        t0 = time.perf_counter()
        sm, sn = domias_scores(mem, non, x_syn, ref, nonmember_ref_index=None, h=h)
        ours[f"domias ({rule} bandwidth)"] = {"auc": round(_roc(sm, sn)[0], 4), "seconds": round(time.perf_counter() - t0, 2)}
    package: Any
    if not python or not Path(python).exists():
        package = f"not run: no domias interpreter at {python!r}"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            npz = Path(tmp) / "sets.npz"
            np.savez(npz, mem=mem.astype(np.float64), non=non.astype(np.float64), ref=ref.astype(np.float64),
                     syn=x_syn.astype(np.float64), numeric=numeric)
            script = Path(tmp) / "side.py"
            script.write_text(DOMIAS_SIDE)
            t0 = time.perf_counter()
            proc = subprocess.run([python, str(script), str(npz)], capture_output=True, text=True, timeout=1800)
            secs = round(time.perf_counter() - t0, 2)
            if proc.returncode != 0:
                package = f"failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}"
            else:
                package = {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": secs}
    return {"members": int(m), "nonmembers": int(m), "reference_rows": int(len(ref)), "synthetic_rows": int(len(syn)),
            "dimensions": int(x_tr.shape[1]), "numeric_dimensions": int(len(numeric)), "ours": ours,
            "domias_package": package}


def _anonymeter(train, holdout, syn, n_attacks: int) -> dict:
    """The anonymeter package's evaluators on a copy with missing labs filled (its Gower distance needs it)."""
    from anonymeter.evaluators import InferenceEvaluator, LinkabilityEvaluator, SinglingOutEvaluator

    def filled(df):
        out = df.copy()
        for c in out.columns:
            if out[c].isna().any() and out[c].dtype.kind == "f":
                out[c] = out[c].fillna(train[c].median())
        return out

    tr, ho, sy = filled(train), filled(holdout), filled(syn)
    n = int(min(n_attacks, len(ho), len(tr)))  # anonymeter samples n targets from ori without replacement
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in (
            ("singling_out", lambda: SinglingOutEvaluator(ori=tr[QIS + SENSITIVE], syn=sy[QIS + SENSITIVE],
                                                          control=ho[QIS + SENSITIVE], n_attacks=n,
                                                          max_attempts=20 * n).evaluate("multivariate")),
            ("linkability", lambda: LinkabilityEvaluator(ori=tr, syn=sy, control=ho, n_attacks=n,
                                                         aux_cols=(QIS, SENSITIVE)).evaluate(n_jobs=1)),
            ("inference:hba1c", lambda: InferenceEvaluator(ori=tr, syn=sy, control=ho, aux_cols=QIS + ["bmi"],
                                                           secret="hba1c", regression=True,
                                                           n_attacks=n).evaluate(n_jobs=1))):
            try:
                r = make().risk()
                out[name] = {"risk": round(r.value, 4), "ci": [round(r.ci[0], 4), round(r.ci[1], 4)]}
            except Exception as err:  # noqa: BLE001 - reported
                out[name] = f"failed: {type(err).__name__}: {err}"[:200]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000, help="training rows of the cost part")
    ap.add_argument("--shadow-models", type=int, default=8)
    ap.add_argument("--shadow-targets", type=int, default=50)
    ap.add_argument("--shadow-rows", type=int, default=2000)
    ap.add_argument("--domias-python", default="/work/venv-domias/bin/python")
    ap.add_argument("--domias-members", type=int, default=1000)
    ap.add_argument("--overfit-kind", default="ctgan")
    ap.add_argument("--overfit-epochs", type=int, default=300)
    ap.add_argument("--overfit-rows", type=int, default=200)
    ap.add_argument("--overfit-params", default=None,
                    help='JSON parameters of the overfitted kind (default {"epochs": --overfit-epochs}); e.g. '
                         '\'{"min_leaf": 1, "smooth": false}\' with --overfit-kind cart')
    ap.add_argument("--overfit-shadow-models", type=int, default=0,
                    help="shadow models for the overfitted kind (each is a full fit: costly for neural kinds)")
    ap.add_argument("--anonymeter-attacks", type=int, default=500)
    ap.add_argument("--skip", nargs="*", default=[], choices=["cost", "domias", "overfit"])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "mia.json"))
    ap.add_argument("--rerender", action="store_true",
                    help="re-judge the stored attacks with the current gate and rewrite --out and its .md")
    args = ap.parse_args(argv)
    if args.rerender:
        out = json.loads(Path(args.out).read_text())
        if "cost" in out:
            out["cost"]["gate"] = _gate({"attacks": out["cost"]["attacks"]})
        for case in (out.get("overfit") or {}).get("cases", {}).values():
            case["gate"] = _gate({"attacks": case["attacks"]})
        write_json(args.out, out)
        Path(args.out).with_suffix(".md").write_text(markdown(out))
        return 0
    if args.smoke:
        args.rows, args.shadow_models, args.overfit_epochs, args.domias_members = 1000, 2, 5, 200
        args.anonymeter_attacks = 50
    warnings.simplefilter("ignore")
    from synthfactory.privacy.mia import mia_battery

    out: dict[str, Any] = {"bench": "mia", "machine": machine_info(), "args": vars(args),
                           "load_average_at_start": list(os.getloadavg())}
    train, holdout = _data(args.rows, args.rows // 4, args.seed + 11)
    cols = list(train.columns)
    syn_gc = None
    if "cost" not in args.skip or "domias" not in args.skip:
        t0 = time.perf_counter()
        syn_gc = _fit_sample("gaussian_copula", {}, train, args.rows, args.seed)
        out["gaussian_copula_fit_sample_seconds"] = round(time.perf_counter() - t0, 2)
    if "cost" not in args.skip:
        fs = lambda df, n, s: _fit_sample("gaussian_copula", {}, df, n, s)  # noqa: E731
        c0, t0 = _cpu(), time.perf_counter()
        b = mia_battery(train, holdout, syn_gc, cols, fit_sample=fs, shadow_models=args.shadow_models,
                        shadow_targets=args.shadow_targets, shadow_rows=args.shadow_rows, seed=args.seed)
        out["cost"] = {"rows": args.rows, "holdout_rows": len(holdout), "synthetic_rows": len(syn_gc),
                       "wall_seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(_cpu() - c0, 2),
                       "cores": len(os.sched_getaffinity(0)), "seconds_by_attack": b["seconds"],
                       "attacks": {k: _brief(v) for k, v in b["attacks"].items()}, "gate": _gate(b),
                       "goal": "< 120 s on 2 cores"}
        print("cost", json.dumps(out["cost"]), flush=True)
    if "domias" not in args.skip:
        out["domias_gaussian_copula"] = _domias_side_by_side(args.domias_python, train, holdout, syn_gc,
                                                             args.domias_members, args.seed)
        print("domias", json.dumps(out["domias_gaussian_copula"]), flush=True)
    if "overfit" not in args.skip:
        o_train, o_hold = _data(args.overfit_rows, 4 * args.overfit_rows, args.seed + 41)
        cases: dict[str, Any] = {}
        o_params = json.loads(args.overfit_params) if args.overfit_params else {"epochs": args.overfit_epochs}
        o_label = (f"{args.overfit_kind} {args.overfit_epochs} epochs (overfitted)" if not args.overfit_params
                   else f"{args.overfit_kind} {o_params} (overfitted)")
        for label, kind, params in ((o_label, args.overfit_kind, o_params),
                                    ("gaussian_copula (control)", "gaussian_copula", {})):
            t0 = time.perf_counter()
            syn = _fit_sample(kind, params, o_train, 4 * args.overfit_rows, args.seed)
            fit_s = round(time.perf_counter() - t0, 2)
            n_shadow = args.overfit_shadow_models if kind == args.overfit_kind else args.shadow_models
            fs = (lambda df, n, s, k=kind, p=params: _fit_sample(k, p, df, n, s)) if n_shadow >= 2 else None
            b = mia_battery(o_train, o_hold, syn, cols, fit_sample=fs, shadow_models=max(n_shadow, 2),
                            shadow_targets=min(args.shadow_targets, args.overfit_rows // 4), seed=args.seed)
            cases[label] = {"fit_sample_seconds": fit_s, "attacks": {k: _brief(v) for k, v in b["attacks"].items()},
                            "gate": _gate(b), "anonymeter_package": _anonymeter(o_train, o_hold, syn,
                                                                                args.anonymeter_attacks),
                            "domias_side_by_side": _domias_side_by_side(args.domias_python, o_train, o_hold, syn,
                                                                        args.overfit_rows, args.seed)}
            print("overfit", label, json.dumps(cases[label]), flush=True)
        out["overfit"] = {"train_rows": args.overfit_rows, "holdout_rows": 4 * args.overfit_rows, "cases": cases}
    path = write_json(args.out, out)
    Path(path).with_suffix(".md").write_text(markdown(out))
    print(f"wrote {path}")
    return 0


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "auc" in v:
        return (f"AUC {v['auc']} [{v['auc_ci'][0]}, {v['auc_ci'][1]}]; TPR@1% {v['tpr_at_fpr_01']} "
                f"[{v['tpr_at_fpr_01_ci'][0]}, {v['tpr_at_fpr_01_ci'][1]}]")
    if isinstance(v, dict):
        return f"{v.get('status')}: {v.get('reason')}"
    return str(v)


def markdown(out: dict) -> str:
    lines = ["# Membership-inference battery (bench/mia_bench.py)", "",
             f"Machine: {out['machine'].get('cpu_model', '')}, {out['machine'].get('cpu_cores_usable')} usable cores, {out['machine'].get('date')}; load average at start {[round(x, 1) for x in out['load_average_at_start']]} (a shared machine: CPU seconds are the steadier figure)", ""]
    if "cost" in out:
        c = out["cost"]
        lines += ["## Cost (GaussianCopula)", "", "| rows | cores | wall s | CPU s | goal | by attack (s) |",
                  "|---|---|---|---|---|---|",
                  f"| {c['rows']} | {c['cores']} | {c['wall_seconds']} | {c['cpu_seconds']} | {c['goal']} | "
                  f"{c['seconds_by_attack']} |", "",
                  "| attack | figures |", "|---|---|"]
        lines += [f"| {a} | {_fmt(v)} |" for a, v in c["attacks"].items()]
        lines += ["", f"gate: {c['gate']}", ""]
    for key in ("domias_gaussian_copula",):
        if key in out:
            d = out[key]
            lines += ["## DOMIAS: ours vs the domias package (same members, non-members, reference, synthetic)", "",
                      f"{d['members']} members / {d['nonmembers']} non-members, {d['reference_rows']} reference rows, "
                      f"{d['synthetic_rows']} synthetic rows, {d['dimensions']} dimensions", "",
                      "| implementation | AUC |", "|---|---|"]
            lines += [f"| synthfactory {k} | {v['auc']} |" for k, v in d["ours"].items()]
            pkg = d["domias_package"]
            if isinstance(pkg, dict):
                for k, v in pkg.items():
                    if k in ("version", "seconds"):
                        continue
                    if isinstance(v, dict):
                        lines += [f"| domias {pkg.get('version')} {k}: {b} | {a} |" for b, a in v.items()]
                    else:
                        lines += [f"| domias {pkg.get('version')} {k} | {v} |"]
            else:
                lines += [f"| domias package | {pkg} |"]
            lines += [""]
    if "overfit" in out:
        o = out["overfit"]
        lines += [f"## Overfitted model ({o['train_rows']} train rows, {o['holdout_rows']} holdout rows)", "",
                  "| model | attack | figures |", "|---|---|---|"]
        for label, case in o["cases"].items():
            for a, v in case["attacks"].items():
                lines.append(f"| {label} | {a} | {_fmt(v)} |")
            lines.append(f"| {label} | gate | refused on {case['gate']['refused_checks'] or 'nothing'}; caught by "
                         f"{case['gate']['caught_by'] or 'no attack'} |")
            lines.append(f"| {label} | anonymeter package | {case['anonymeter_package']} |")
            dd = case["domias_side_by_side"]
            lines.append(f"| {label} | DOMIAS ours vs package | ours {dd['ours']}; package {dd['domias_package']} |")
        lines += [""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
