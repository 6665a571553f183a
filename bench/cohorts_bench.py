"""Synthesis candidates on realistic cohorts, every figure beside what real data itself achieves.

For each cohort (carebundle, and clinosim US Core cohorts at seeds other than 7 and at two sizes), the
extract is ingested and prepared once with the shipped demo spec (`include/datasets/cohort_demo.yaml`, only
the extract changed): the real-data reference (real held-out rows vs real train rows over re-splits) comes
from prepare. Then each candidate engine is fitted on the same train split at several seeds, samples as many
rows, and the quality and privacy stages measure it exactly as a DAG run would. Reported per cohort and
candidate (mean over seeds):

* quality score, column pair trends and worst eligible column as **fractions of the ceiling** (synthetic
  figure at the reference's row count / reference mean);
* TSTR/TRTR utility ratio on the real holdout;
* **effect kept** per relationship (synthetic / real effect; only where the real effect is significant);
* DCR share (0.5 ideal), membership-inference AUC (0.5 ideal), and the gate's verdict;
* fit CPU seconds.

    .venv/bin/python bench/cohorts_bench.py                       # the four cohorts, every candidate, 2 seeds
    .venv/bin/python bench/cohorts_bench.py --cohorts carebundle:300:5 --candidates cart --seeds 1

Clinosim cohorts take a few minutes each to generate once (cached in bench/.cache). Goals (issue #16):
quality >= 0.97 of the ceiling, pair trends >= 0.95, effect kept in 0.8-1.25, TSTR >= 0.95 of TRTR.
"""

from __future__ import annotations

import argparse
import logging
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_json  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
SPEC = ROOT / "include" / "datasets" / "cohort_demo.yaml"

#: candidate -> synthesizer spec overrides
CANDIDATES: dict[str, dict[str, Any]] = {
    "gaussian_copula (SDV defaults, no transforms)": {"kind": "gaussian_copula", "params": {}, "transforms": "none"},
    "gaussian_copula + EHR transforms + KDE": {"kind": "gaussian_copula", "transforms": "ehr",
                                               "params": {"default_distribution": "gaussian_kde"}},
    "cart (min_leaf auto) + EHR transforms": {"kind": "cart", "params": {}, "transforms": "ehr"},
    "cart (min_leaf 20) + EHR transforms": {"kind": "cart", "params": {"min_leaf": 20}, "transforms": "ehr"},
    "cart (min_leaf 40) + EHR transforms": {"kind": "cart", "params": {"min_leaf": 40}, "transforms": "ehr"},
    "tabular_argn + EHR transforms": {"kind": "tabular_argn", "params": {}, "transforms": "ehr"},
}
SHORT = {"gaussian_copula (SDV defaults, no transforms)": "gc", "gaussian_copula + EHR transforms + KDE": "gc_kde",
         "cart (min_leaf auto) + EHR transforms": "cart",
         "cart (min_leaf 20) + EHR transforms": "cart20", "cart (min_leaf 40) + EHR transforms": "cart40",
         "tabular_argn + EHR transforms": "argn"}
DEFAULT_COHORTS = ("carebundle:1000:5", "clinosim:500:31", "clinosim:1700:11", "clinosim:1700:23")


def cohort_extract(label: str) -> Path:
    """``carebundle:<patients>:<seed>`` or ``clinosim:<catchment>:<seed>``, generated once into the cache."""
    source, size, seed = label.split(":")
    if source == "carebundle":
        from synthfactory.testing.dev import generate_sample_extract

        return generate_sample_extract(CACHE / f"carebundle_p{size}_s{seed}", patients=int(size), seed=int(seed))
    dest = CACHE / f"clinosim_p{size}_s{seed}"
    out = dest / "fhir_r4"
    if not (out / "Patient.ndjson").exists():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(Path(sys.executable).parent / "clinosim"), "simulate", "--country", "US",
                        "--population", size, "--seed", seed, "--end", "2025-12-31", "--format", "fhir-r4",
                        "--output", str(dest)], check=True, stdout=subprocess.DEVNULL)
    return out


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _spec_for(base: Any, overrides: dict, seed: int) -> Any:
    from synthfactory.spec import DatasetSpec

    data = base.model_dump(mode="json")
    data["synthesizer"] = {**data["synthesizer"], **overrides, "seed": seed}
    return DatasetSpec.model_validate(data)


def run_cohort(label: str, candidates: list[str], seeds: list[int]) -> dict:
    from synthfactory import pipeline as p
    from synthfactory.release.gate import decide
    from synthfactory.spec import load_spec

    extract = cohort_extract(label)
    base = load_spec(SPEC)
    out: dict[str, Any] = {"cohort": label, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="cohorts-bench-") as tmp:
        ctx0 = p.RunContext(spec=base, run_id="prep", version="v0", source_uri=str(extract), staging_root=tmp)
        ingested = p.ingest(ctx0)
        prepared = p.prepare(ctx0, ingested)
        reference = ctx0.store.read_json(prepared["reference_uri"])
        out.update(rows_train=prepared["rows_train"], rows_holdout=prepared["rows_holdout"],
                   reference={k: reference.get(k) for k in ("quality_score", "column_pair_trends",
                                                            "min_column_score")},
                   reference_relationships=reference.get("relationships"))
        for name in candidates:
            for seed in seeds:
                spec = _spec_for(base, CANDIDATES[name], seed)
                ctx = p.RunContext(spec=spec, run_id=f"{SHORT[name]}_{seed}", version="v0",
                                   source_uri=str(extract), staging_root=tmp)
                c0, t0 = _cpu(), time.perf_counter()
                try:
                    fitted = p.fit(ctx, prepared)
                except Exception as err:  # noqa: BLE001 - a candidate that cannot run here is reported, not fatal
                    out["runs"].setdefault(name, []).append({"seed": seed, "error": f"{type(err).__name__}: {err}"})
                    continue
                fit_cpu, fit_wall = _cpu() - c0, time.perf_counter() - t0
                sampled = p.sample(ctx, fitted, prepared)
                q = p.quality(ctx, prepared, sampled)
                pr = p.privacy(ctx, prepared, sampled, ingested, q)
                qt, pt = spec.thresholds("default")
                verdict = decide(q, pr, qt, pt, {})
                out["runs"].setdefault(name, []).append({
                    "seed": seed, "fit_cpu_s": round(fit_cpu, 2), "fit_wall_s": round(fit_wall, 2),
                    "quality": {k: q.get(k) for k in ("quality_score", "column_pair_trends", "min_column_score",
                                                      "worst_column", "utility_ratio", "utility_tstr",
                                                      "utility_trtr", "matched", "relationships")},
                    "privacy": {k: pr.get(k) for k in ("dcr_share", "dcr_ratio", "exact_match_rate", "mia_auc",
                                                       "rare_record_mia_auc", "leak_clean", "reference")},
                    "approved": verdict["approved"],
                    "failed": [c["name"] for c in verdict["checks"] if not c["passed"]]})
    return out


def _mean(xs: list) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(cohort: dict) -> list[dict]:
    """One row per candidate: figures as fractions of the ceiling, averaged over seeds."""
    rows = []
    ref = cohort["reference"]
    for name, runs in cohort["runs"].items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append({"cohort": cohort["cohort"], "candidate": name, "error": runs[0]["error"]})
            continue

        def frac(key: str) -> float | None:
            vals = [(r["quality"]["matched"] or {}).get(key) for r in ok]
            m, refm = _mean(vals), (ref.get(key) or {}).get("mean")
            return None if m is None or not refm else m / refm

        effects: dict[str, list] = {}
        for r in ok:
            for rel, got in (r["quality"]["relationships"] or {}).items():
                eff = got.get("effect") or {}
                if eff.get("significant"):
                    effects.setdefault(rel, []).append(eff.get("ratio"))
        rows.append({
            "cohort": cohort["cohort"], "patients": cohort["rows_train"] + cohort["rows_holdout"], "candidate": name,
            "seeds": len(ok), "quality_frac": frac("quality_score"), "pair_trends_frac": frac("column_pair_trends"),
            "worst_column_frac": frac("min_column_score"),
            "tstr_trtr": _mean([r["quality"]["utility_ratio"] for r in ok]),
            "effect_kept": {k: _mean(v) for k, v in effects.items()},
            "dcr_share": _mean([r["privacy"]["dcr_share"] for r in ok]),
            "mia_auc": _mean([r["privacy"]["mia_auc"] for r in ok]),
            "approved": f"{sum(r['approved'] for r in ok)}/{len(ok)}",
            "fit_cpu_s": _mean([r["fit_cpu_s"] for r in ok]),
            "failed": sorted({name for r in ok for name in r["failed"]}),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    def f(v: Any, nd: int = 3) -> str:
        return "–" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)

    head = ("| cohort | patients | candidate | quality / ceiling | pair trends / ceiling | worst column / ceiling "
            "| TSTR/TRTR | effect kept | DCR share | MIA AUC | approved | fit CPU s |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['cohort']} | | {r['candidate']} | error: {r['error'][:80]} |" + " |" * 8)
            continue
        eff = ", ".join(f"{k} {f(v, 2)}" for k, v in r["effect_kept"].items()) or "–"
        lines.append(f"| {r['cohort']} | {r['patients']} | {r['candidate']} | {f(r['quality_frac'])} | "
                     f"{f(r['pair_trends_frac'])} | {f(r['worst_column_frac'])} | {f(r['tstr_trtr'])} | {eff} | "
                     f"{f(r['dcr_share'])} | {f(r['mia_auc'])} | {r['approved']} | {f(r['fit_cpu_s'], 1)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohorts", nargs="+", default=list(DEFAULT_COHORTS))
    ap.add_argument("--candidates", default=",".join(SHORT.values()),
                    help=f"comma-separated short names: {', '.join(SHORT.values())}")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per candidate (1, 2, ...)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "raw" / "cohorts.json"))
    ap.add_argument("--markdown", default=str(ROOT / "bench" / "results" / "cohorts.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    wanted = {s.strip() for s in args.candidates.split(",") if s.strip()}
    candidates = [n for n, s in SHORT.items() if s in wanted]
    seeds = list(range(1, args.seeds + 1))
    cohorts, rows = [], []
    for label in args.cohorts:
        c = run_cohort(label, candidates, seeds)
        cohorts.append(c)
        rows += summarise(c)
        print(markdown(summarise(c)), flush=True)
    write_json(args.out, {"bench": "cohorts", "params": {"cohorts": args.cohorts, "candidates": candidates,
                                                         "seeds": seeds}, "cohorts": cohorts, "summary": rows})
    table = markdown(rows)
    Path(args.markdown).write_text("# Synthesis candidates on realistic cohorts\n\n" + table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
