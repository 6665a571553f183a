"""Relational mode on clinosim cohorts: per-table fidelity next to the real-data reference, fit/sample time and
peak RSS, against SDV HMA and PAR on the same cohort.

Each (cohort, engine) runs in its own subprocess, so its peak RSS (``wait4``) is its own. A run: ingest the
cohort (six tables), split the patients 80/20 (seed), fit on the train patients, sample as many synthetic
patients (or ``--patients``), then

* per table: SDMetrics quality, children-per-patient KS, per-code value KS (synthetic patients as many as
  the real held-out part, scored against the real train tables) beside the same figures of real held-out
  patients vs real train patients (``synthfactory.quality.tables``), and the per-table gate (quality >= 0.95
  of the reference, KS <= reference + 0.05, GX checks passed);
* unseen (code, system, display, unit) units, real free-text values (every ``valueString`` of the extract)
  found in any output table or in the FHIR output, and the FHIR R4B validation of the output.

* event timing and cross-table figures, each beside real held-out vs real train patients: days between a
  patient's consecutive events (KS), age at the first event (KS), rows inside their encounter, condition
  co-occurrence (relative error of the top codes' pairwise rates) and a lab trajectory (``--trajectory``,
  default hba1c 4548-4 in patients with vs without E11*, per 90 days since the first value);
  ``--timing-off`` runs the model without its timing parts (the former one) for the comparison.

Engines: ``cart`` (relational default: CART patient model + CART children drawn given the context),
``gaussian_copula`` (the former default: GaussianCopula patient and children, pooled matching), ``hma`` (SDV
HMASynthesizer, at most 5 tables), ``par`` (CART-free: GaussianCopula root + SDV PAR sequences).

    python bench/relational_bench.py --cohort /work/cohorts/clino_23_1700/fhir_r4 \\
        --cohort /work/cohorts/clino_41_1700/fhir_r4 --engines cart
    python bench/relational_bench.py --cohort /work/cohorts/clino_31_500/fhir_r4 \\
        --engines cart,gaussian_copula,hma,par --tables patient,encounter,condition,observation
Writes bench/results/relational.json and bench/results/relational.md (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESOURCES = ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Procedure")
TABLES = ("patient", "encounter", "condition", "observation", "medication_request", "procedure")
CACHE = Path(tempfile.gettempdir()) / "synthfactory_relational_bench"


def _ingest(cohort: str) -> Path:
    from synthfactory.ingest.fhir_ndjson import ingest_extract
    from synthfactory.keys import Keyer

    dest = CACHE / (Path(cohort).resolve().parent.name or "cohort")
    if not (dest / "patient.parquet").exists():
        ingest_extract(cohort, str(dest), keyer=Keyer(b"bench-salt-0123456789abcdef"), resources=RESOURCES)
    return dest


def _free_text(cohort: str) -> set[str]:
    from relational_cli_check import free_text  # bench/ is the script's folder

    return free_text(Path(cohort))


def _trajectory(text: str | None):
    """``lab:loinc[,loinc]:system:code[,code]:period_days:periods`` -> a quality.tables Trajectory (None: off)."""
    from synthfactory.quality.tables import Trajectory
    from synthfactory.spec import ConditionConcept

    if not text or text == "none":
        return None
    lab, loinc, system, codes, period, periods = text.split(":")
    return Trajectory(lab=lab, loinc=tuple(loinc.split(",")), period_days=int(period), periods=int(periods),
                      condition=ConditionConcept(name="trajectory_condition", codes={system: codes.split(",")}))


def _timing_off(relational) -> None:
    """The model without its timing parts (as before them): no encounter class drawn with the rows, no
    encounters given the record's size, no respacing of encounters, no placement inside encounters."""
    import pandas as pd

    relational.uses_encounter_class = lambda *a, **k: False
    relational.load_context = lambda root, tables: pd.DataFrame({relational.KEY: root[relational.KEY].astype(str)})


def one_run(cohort: str, engine: str, tables_wanted: list[str], patients: int | None, seed: int,
            resplits: int, fhir: bool, max_patients: int | None = None, child_min_leaf: int | None = None,
            trajectory: str | None = None, timing_off: bool = False) -> dict:
    import numpy as np
    import pandas as pd

    from synthfactory.quality import tables as qt
    from synthfactory.synthesize import fhir_out, relational

    tr = _trajectory(trajectory)
    if timing_off:
        _timing_off(relational)

    d = _ingest(cohort)
    real = {t: pd.read_parquet(d / f"{t}.parquet") for t in tables_wanted if (d / f"{t}.parquet").exists()}
    keys = real["patient"]["patient_key"].to_numpy()
    rng = np.random.default_rng(seed)
    if max_patients and len(keys) > max_patients:  # a subset of the cohort's patients, whole records
        keys = np.sort(rng.choice(keys, size=max_patients, replace=False))
        real = {n: df[df["patient_key"].isin(set(keys))].reset_index(drop=True) for n, df in real.items()}
    perm = rng.permutation(len(keys))
    n_hold = int(round(0.2 * len(keys)))
    train_keys = set(keys[perm[n_hold:]])
    train = {n: df[df["patient_key"].isin(train_keys)].reset_index(drop=True) for n, df in real.items()}
    kw: dict = {"seed": seed}
    if engine == "cart":
        kw.update(root_kind="cart", child_kind="cart")
        if child_min_leaf:
            kw["child_params"] = {"min_leaf": child_min_leaf}
    elif engine == "gaussian_copula":
        kw.update(root_kind="gaussian_copula", child_kind="gaussian_copula")
    elif engine == "hma":
        kw.update(engine="hma")
    elif engine == "par":
        kw.update(engine="par", par_epochs=16)
    if tr is not None and engine != "hma" and not timing_off:
        kw["flag_concepts"] = [tr.condition]  # as the pipeline does for quality.trajectory
    t0 = time.perf_counter()
    model = relational.fit(train, **kw)
    fit_s = time.perf_counter() - t0
    if timing_off:
        for cl in model.layout.children.values():
            cl.timing = {}
    n = int(patients or len(train_keys))
    t0 = time.perf_counter()
    syn, fixes = relational.sample(model, n, batch_size=2000, seed=seed + 1)
    sample_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = qt.relational_reference(real, holdout_fraction=0.2, resplits=resplits, seed=seed, trajectory=tr)
    fig = qt.synthetic_figures(train, syn, patients=ref["holdout_patients"], repeats=2, seed=seed, trajectory=tr)
    checks = qt.run_table_checks(train, syn)
    gate = qt.gate_tables(fig, ref, checks)
    score_s = time.perf_counter() - t0
    from synthfactory.privacy.records import record_privacy

    hold = {n: df[~df["patient_key"].isin(train_keys)].reset_index(drop=True) for n, df in real.items()}
    rec = record_privacy(train, hold, syn, seed=seed)
    free = _free_text(cohort)
    leaked = 0
    for df in syn.values():
        for c in df.columns:
            if df[c].dtype == object:
                leaked += int(df[c].dropna().astype(str).isin(free).sum())
    label = engine + (f" (child min_leaf {child_min_leaf})" if child_min_leaf and engine == "cart" else "") + \
        (" (timing off)" if timing_off else "")
    out = {"cohort": cohort, "engine": label, "tables": sorted(real), "patients_real": len(keys),
           "patients_train": len(train_keys), "patients_synthetic": n,
           "rows_real": {k: len(v) for k, v in real.items()}, "rows_synthetic": {k: len(v) for k, v in syn.items()},
           "fit_s": round(fit_s, 1), "sample_s": round(sample_s, 1), "score_s": round(score_s, 1),
           "fit_seconds_by_table": model.fit_seconds, "reference": ref, "figures": fig, "checks": checks,
           "gate": gate, "unseen_concepts": relational.unseen_concepts(train, syn),
           "free_text_real_values": len(free), "free_text_leaked": leaked, "record_privacy": rec,
           "fixes": {k: int(v) for k, v in fixes.items() if v},
           "trajectory": None if tr is None else {"lab": tr.lab, "loinc": list(tr.loinc), "codes": tr.condition.codes,
                                                  "period_days": tr.period_days, "periods": tr.periods,
                                                  "stat": tr.stat}}
    if fhir:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            f = fhir_out.write_fhir_ndjson(syn, tmp)
            leaked_fhir = 0
            for rtype, path in f["files"].items():
                with open(path, "rb") as fh:
                    for line in fh:
                        if b"valueString" in line and rtype != "Patient":
                            leaked_fhir += 1
            out["fhir"] = {"resources": f["resources"], "validated_r4b": f["validated_r4b"],
                           "structural_checked": f["structural_checked"], "value_string_resources": leaked_fhir,
                           "seconds": round(time.perf_counter() - t0, 1)}
    return out


def _child(args: argparse.Namespace, cohort: str, engine: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = fh.name
    cmd = [sys.executable, __file__, "--one", cohort, engine, "--json", path, "--seed", str(args.seed),
           "--tables", args.tables, "--resplits", str(args.resplits)]
    if args.patients:
        cmd += ["--patients", str(args.patients)]
    if args.max_patients:
        cmd += ["--max-patients", str(args.max_patients)]
    if args.child_min_leaf:
        cmd += ["--child-min-leaf", str(args.child_min_leaf)]
    if args.fhir:
        cmd.append("--fhir")
    cmd += ["--trajectory", args.trajectory]
    if args.timing_off:
        cmd.append("--timing-off")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        return {"cohort": cohort, "engine": engine, "error": f"exit status {status >> 8}", "wall_s": round(wall, 1)}
    with open(path) as fh:
        res = json.load(fh)
    os.unlink(path)
    res["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    res["wall_s"] = round(wall, 1)
    return res


def _f(v, nd: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(results: list[dict]) -> str:
    lines = ["# Relational mode: per-table fidelity beside the real-data reference", "",
             "Each figure: synthetic (patients as many as the real held-out part, scored against the real train "
             "patients) / real reference (real held-out vs real train patients, mean over re-splits). Gate: quality "
             ">= 0.95 x reference, children-per-patient KS <= reference + 0.05, GX checks passed.", ""]
    lines += ["| cohort | engine | patients (real/synthetic) | fit s | sample s | peak RSS MB | unseen concepts | "
              "free text leaked | FHIR R4B validated | record gate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {Path(r['cohort']).parent.name} | {r['engine']} | {r['error']} | | | | | | | |")
            continue
        unseen = sum(v["unseen"] for v in r["unseen_concepts"].values())
        fhir = r.get("fhir") or {}
        lines.append(f"| {Path(r['cohort']).parent.name} | {r['engine']} | {r['patients_real']}/"
                     f"{r['patients_synthetic']} | {r['fit_s']} | {r['sample_s']} | {r.get('peak_rss_mb')} | "
                     f"{unseen} | {r['free_text_leaked']} | {sum((fhir.get('validated_r4b') or {}).values()) or 'n/a'}"
                     f" | {'pass' if r['gate']['passed'] else 'FAIL'} |")
    lines += ["", "Record-level privacy (a patient's whole record as one summary vector): exact-match rate and DCR "
              "share (0.5 ideal), synthetic (real reference).", "",
              "| cohort | engine | exact match | DCR share |", "|---|---|---|---|"]
    for r in results:
        rp = r.get("record_privacy")
        if rp:
            lines.append(f"| {Path(r['cohort']).parent.name} | {r['engine']} | "
                         f"{_f(rp['synthetic']['exact_match_rate'])} ({_f(rp['reference']['exact_match_rate'])}) | "
                         f"{_f(rp['synthetic']['dcr_share'])} ({_f(rp['reference']['dcr_share'])}) |")
    lines += ["", "## Per table", "",
              "| cohort | engine | table | quality (ref) | ratio | children KS (ref) | value KS median / worst "
              "(ref) | GX | gate |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            continue
        for name, fig in r["figures"]["tables"].items():
            ref = r["reference"]["tables"].get(name, {})

            def m(d, k):
                return (d.get(k) or {}).get("mean")
            q, rq = m(fig, "quality"), m(ref, "quality")
            ratio = q / rq if q is not None and rq else None
            g = r["gate"]["tables"].get(name, {})
            chk = r["checks"].get(name, {})
            lines.append(
                f"| {Path(r['cohort']).parent.name} | {r['engine']} | {name} | {_f(q)} ({_f(rq)}) | {_f(ratio)} | "
                f"{_f(m(fig, 'children_ks'))} ({_f(m(ref, 'children_ks'))}) | {_f(m(fig, 'value_ks_median'))} / "
                f"{_f(m(fig, 'value_ks_worst'))} ({_f(m(ref, 'value_ks_median'))} / {_f(m(ref, 'value_ks_worst'))}) | "
                f"{'pass' if chk.get('success') else 'FAIL'} | {'pass' if g.get('passed') else 'FAIL'} |")
    return "\n".join(lines) + "\n"


TIME_FIGURES = (("interval_ks", "interval KS"), ("first_age_ks", "first-event age KS"),
                ("in_encounter", "in encounter"), ("per_encounter_ks", "rows per encounter KS"),
                ("cooccurrence_error", "co-occurrence error"),
                ("cooccurrence_mad", "co-occurrence MAD"), ("trajectory", "trajectory"))


def _mean_sd(d: dict | None, k: str) -> tuple[float | None, float | None]:
    v = (d or {}).get(k) or {}
    return v.get("mean"), v.get("sd")


def timing_lines(r: dict) -> str:
    """The timing and cross-table figures of one run, each beside its reference (stdout)."""
    if "error" in r:
        return ""
    out = []
    for name, fig in r["figures"]["tables"].items():
        ref = r["reference"]["tables"].get(name, {})
        parts = []
        for k, label in TIME_FIGURES:
            v, _ = _mean_sd(fig, k)
            rm, rs = _mean_sd(ref, k)
            if v is not None or rm is not None:
                parts.append(f"{label} {_f(v)} (ref {_f(rm)} ± {_f(rs)})")
        if parts:
            out.append(f"  {name}: " + "; ".join(parts))
    return "\n".join(out)


def timing_markdown(results: list[dict]) -> str:
    """The timing, co-occurrence and trajectory figures per table beside the reference, and the gate rows."""
    lines = ["# Relational mode: event timing and cross-table fidelity beside the real-data reference", "",
             "Each figure: synthetic (patients as many as the real held-out part, scored against the real train "
             "patients) / real reference mean ± sd (real held-out vs real train patients over re-splits). Gate "
             "(`quality.tables.gate_tables`, noise_z 0 here as in the bench's other tables): interval and "
             "first-event-age KS <= reference + 0.05; in-encounter share >= reference - 0.02; co-occurrence "
             "error <= reference + 0.1; trajectory <= reference + 0.25 (real sd); the pipeline adds 2 reference sd "
             "(`quality.reference.noise_z`). `timing off`: the same model without its timing parts and without "
             "the trajectory condition as a patient flag (the former model), in the same run.", "",
             "| cohort | engine | table | quality (ref) | interval KS (ref) | first-event age KS (ref) | in encounter "
             "(ref) | rows per encounter KS (ref, not gated) | co-occurrence error (ref) | co-occurrence MAD (ref, "
             "not gated) | trajectory (ref) | timing gate rows |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            continue
        for name, fig in r["figures"]["tables"].items():
            if name == "patient":
                continue
            ref = r["reference"]["tables"].get(name, {})
            q, rq = _mean_sd(fig, "quality")[0], _mean_sd(ref, "quality")[0]
            cells = [f"{_f(q)} ({_f(rq)})"]
            for k, _ in TIME_FIGURES:
                v, _s = _mean_sd(fig, k)
                rm, rs = _mean_sd(ref, k)
                cells.append("n/a" if v is None and rm is None else f"{_f(v)} ({_f(rm)} ± {_f(rs)})")
            rows = [c for c in (r["gate"]["tables"].get(name) or {}).get("checks", [])
                    if c["figure"] in {k for k, _ in TIME_FIGURES}]
            gate = ", ".join(f"{c['figure']} {'pass' if c['passed'] else 'FAIL'}" for c in rows) or "n/a"
            lines.append(f"| {Path(r['cohort']).parent.name} | {r['engine']} | {name} | " + " | ".join(cells)
                         + f" | {gate} |")
    traj = [r for r in results if "error" not in r and r.get("trajectory")]
    if traj:
        t = traj[0]["trajectory"]
        lines += ["", f"## Trajectory: {t['lab']} (LOINC {', '.join(t['loinc'])}), {t['stat']} per "
                      f"{t['period_days']} days since the patient's first value, patients with vs without "
                      f"{t['codes']}", "",
                  "Cells with at least 20 real (train) values. synthetic / real train / real held-out (reference).",
                  "", "| cohort | engine | group/period | synthetic | real train | real held-out |",
                  "|---|---|---|---|---|---|"]
        for r in traj:
            f = r["figures"]["tables"].get("observation", {})
            ref = r["reference"]["tables"].get("observation", {})
            for cell, v in (f.get("trajectory_real") or {}).items():
                lines.append(f"| {Path(r['cohort']).parent.name} | {r['engine']} | {cell} | "
                             f"{_f(((f.get('trajectory_other') or {}).get(cell) or {}).get('mean'), 2)} | "
                             f"{_f((v or {}).get('mean'), 2)} | "
                             f"{_f(((ref.get('trajectory_other') or {}).get(cell) or {}).get('mean'), 2)} |")
    lines += ["", "## Commands", "",
              "On the shared 2-core machine (load 6-8 from other jobs; seed 3, 80 % of the patients to train, 3 "
              "re-splits of the reference):", "", "```",
              "python bench/relational_bench.py --cohort /work/cohorts/clino_41_1700/fhir_r4 --cohort "
              "/work/cohorts/clino_23_1700/fhir_r4 --engines cart --resplits 3 --out bench/results/relational_time "
              "--timing-md",
              "python bench/relational_bench.py --cohort /work/cohorts/clino_41_1700/fhir_r4 --cohort "
              "/work/cohorts/clino_23_1700/fhir_r4 --engines cart --resplits 3 --timing-off --append --out "
              "bench/results/relational_time --timing-md",
              "python bench/relational_bench.py --cohort /work/cohorts/clino_41_1700/fhir_r4 --cohort "
              "/work/cohorts/clino_23_1700/fhir_r4 --engines cart --resplits 3 --child-min-leaf 40 --append --out "
              "bench/results/relational_time --timing-md", "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cohort", action="append", default=[], help="a clinosim fhir_r4 folder (repeatable)")
    p.add_argument("--engines", default="cart", help="comma list of cart, gaussian_copula, hma, par")
    p.add_argument("--tables", default=",".join(TABLES))
    p.add_argument("--patients", type=int, default=None, help="synthetic patients (default: the train patients)")
    p.add_argument("--max-patients", type=int, default=None, help="use a random subset of the real patients")
    p.add_argument("--child-min-leaf", type=int, default=None, help="cart: real rows per leaf of the child models "
                                                                   "(default: auto, 2 sqrt(rows))")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--resplits", type=int, default=2)
    p.add_argument("--fhir", action="store_true", help="also write and validate the FHIR output")
    p.add_argument("--trajectory", default="hba1c:4548-4:icd10cm:E11*:90:4",
                   help="lab:loinc:system:codes:period_days:periods of the trajectory check, or none")
    p.add_argument("--timing-off", action="store_true", help="the model without its timing parts (comparison)")
    p.add_argument("--timing-md", action="store_true", help="write the timing/cross-table report as the .md")
    p.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json, run nothing")
    p.add_argument("--out", default=str(BENCH / "results" / "relational"))
    p.add_argument("--append", action="store_true", help="add to the existing results instead of replacing them")
    p.add_argument("--one", nargs=2, metavar=("COHORT", "ENGINE"), help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        res = one_run(args.one[0], args.one[1], args.tables.split(","), args.patients, args.seed, args.resplits,
                      args.fhir, args.max_patients, args.child_min_leaf, args.trajectory, args.timing_off)
        with open(args.json, "w") as fh:
            json.dump(res, fh, default=str)
        return 0
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text())["results"] if (args.append or args.markdown_only) \
        and out.with_suffix(".json").exists() else []
    if args.markdown_only:
        out.with_suffix(".md").write_text(markdown(results) if not args.timing_md else timing_markdown(results))
        return 0
    for cohort in args.cohort:
        for engine in args.engines.split(","):
            res = _child(args, cohort, engine)
            results.append(res)
            print(json.dumps({k: res.get(k) for k in ("cohort", "engine", "fit_s", "sample_s", "peak_rss_mb",
                                                       "error")}), flush=True)
            print(timing_lines(res), flush=True)
            out.with_suffix(".json").write_text(json.dumps({"results": results}, indent=1, default=str))
            out.with_suffix(".md").write_text(markdown(results) if not args.timing_md else timing_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
