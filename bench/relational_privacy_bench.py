"""Record-level privacy of relational mode on clinosim cohorts: a patient's whole record is the unit.

Per cohort: ingest (six tables, as bench/relational_bench.py), split the patients 80/20 (seed), fit relational
mode (``cart``: CART patient model + CART children) on the train patients, sample as many synthetic patients, then
:func:`synthfactory.privacy.records.record_audit` on three releases in one run:

* ``cart``: the synthetic records;
* ``copier``: the real train records themselves under new keys (what a memorising release scores: the anchor
  that shows each attack can see a copy);
* ``real holdout-as-release`` is the reference column of each figure (fresh real records as the release, over
  re-splits of the real patients: mean +- sd).

Figures: the partial-knowledge attacks (the attacker knows the target's sex, birth year and 3 of their coded
events with dates +- 30 days): AUC with its 95 % bootstrap interval and TPR at 1 % FPR, for the closest-record
distance and the DOMIAS density variant; the partial-knowledge exact-match rate (members singled out by their
known events, exact dates); the record vectors' exact match and DCR share; and the record.* gate checks
(release/gate.py, default thresholds).

    python bench/relational_privacy_bench.py --cohort /work/cohorts/clino_41_1700/fhir_r4 \\
        --cohort /work/cohorts/clino_23_1700/fhir_r4
Writes bench/results/relational_privacy.json and .md (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
TABLES = ("patient", "encounter", "condition", "observation", "medication_request", "procedure")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one_cohort(cohort: str, seed: int, resplits: int, bootstrap: int, known_events: int, jitter_days: int,
               tau_days: float) -> dict:
    import numpy as np
    import pandas as pd

    from relational_bench import _ingest
    from synthfactory.privacy.records import record_audit, summarise_record_audit
    from synthfactory.release.gate import record_checks
    from synthfactory.spec import PrivacyThresholds
    from synthfactory.synthesize import relational

    d = _ingest(cohort)
    real = {t: pd.read_parquet(d / f"{t}.parquet") for t in TABLES if (d / f"{t}.parquet").exists()}
    keys = real["patient"]["patient_key"].to_numpy()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(keys))
    n_hold = int(round(0.2 * len(keys)))
    train_keys = set(keys[perm[n_hold:]])
    train = {n: df[df["patient_key"].isin(train_keys)].reset_index(drop=True) for n, df in real.items()}
    hold = {n: df[~df["patient_key"].isin(train_keys)].reset_index(drop=True) for n, df in real.items()}
    c0, t0 = _cpu(), time.perf_counter()
    model = relational.fit(train, seed=seed, root_kind="cart", child_kind="cart")
    syn, _ = relational.sample(model, len(train_keys), batch_size=2000, seed=seed + 1)
    synth_cpu, synth_wall = _cpu() - c0, time.perf_counter() - t0
    new = {k: f"copy-{i}" for i, k in enumerate(train["patient"]["patient_key"])}
    copier = {n: df.assign(patient_key=df["patient_key"].map(new)) for n, df in train.items()}
    pt = PrivacyThresholds()
    releases = {}
    for name, release in (("cart", syn), ("copier", copier)):
        c0, t0 = _cpu(), time.perf_counter()
        audit = record_audit(train, hold, release, resplits=resplits, bootstrap=bootstrap,
                             known_events=known_events, jitter_days=jitter_days, tau_days=tau_days, seed=seed)
        summary = summarise_record_audit(audit)
        checks = record_checks({"record": summary}, pt)
        releases[name] = {"summary": summary, "audit_cpu_s": round(_cpu() - c0, 1),
                          "audit_wall_s": round(time.perf_counter() - t0, 1),
                          "checks": [{"name": c.name, "value": c.value, "threshold": c.threshold,
                                      "passed": c.passed} for c in checks],
                          "gate": "pass" if all(c.passed for c in checks) else "FAIL"}
    return {"cohort": cohort, "seed": seed, "known_events": known_events, "jitter_days": jitter_days,
            "tau_days": tau_days, "patients": len(keys), "train": len(train_keys), "holdout": n_hold,
            "synthetic": int(len(syn["patient"])), "synth_cpu_s": round(synth_cpu, 1),
            "synth_wall_s": round(synth_wall, 1), "releases": releases,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "load_average_1min": round(os.getloadavg()[0], 1)}


def _f(v, nd: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _ref(r: dict | None) -> str:
    return "n/a" if not r or r.get("mean") is None else f"{r['mean']:.3f} ± {r.get('sd') or 0:.3f}"


def markdown(results: list[dict], commands: list[str]) -> str:
    lines = ["# Relational mode: record-level privacy (a patient's whole record is the unit)", "",
             "The attacker knows a target patient's sex, birth year and k of their coded events (condition, "
             "observation, medication, procedure codes) with dates ± j days (k, j per row); members = real train patients, "
             "non-members = real held-out patients (80/20 split). Each figure: the release, then the real-data "
             "reference (the same attack with fresh real records as the release, mean ± sd over re-splits). "
             "`copier` = the real train records as the release (the anchor a memorising synthesizer would hit), in "
             "the same run. Gate: record.* checks of release/gate.py at default thresholds.", "",
             "Commands:", "", *[f"    {c}" for c in commands], "",
             "| cohort | release | k / ± days | partial-distance AUC [95 % CI] | reference | TPR@1 % FPR [CI] | reference | "
             "DOMIAS AUC [CI] | reference | partial exact match | reference | record exact match (ref) | "
             "record DCR share (ref) | record gate | audit CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, rel in r["releases"].items():
            s = rel["summary"]
            a = s["mia"].get("partial_distance") or {}
            b = s["mia"].get("partial_domias") or {}
            ci = lambda x, k: f"{_f(x.get(k))} [{_f((x.get(k + '_ci') or [None, None])[0])}, " \
                              f"{_f((x.get(k + '_ci') or [None, None])[1])}]"  # noqa: E731
            lines.append(
                f"| {Path(r['cohort']).parent.name} | {name} | {r['known_events']} / {r['jitter_days']} | "
                f"{ci(a, 'auc')} | {_ref(a.get('auc_reference'))} | "
                f"{ci(a, 'tpr_at_fpr_01')} | {_ref(a.get('tpr_at_fpr_01_reference'))} | {ci(b, 'auc')} | "
                f"{_ref(b.get('auc_reference'))} | {_f(s['partial_exact_match_rate'])} | "
                f"{_ref(s.get('partial_exact_match_rate_reference'))} | {_f(s['exact_match_rate'])} "
                f"({_ref(s.get('exact_match_rate_reference'))}) | {_f(s['dcr_share'])} "
                f"({_ref(s.get('dcr_share_reference'))}) | {rel['gate']} | {rel['audit_cpu_s']} |")
    lines += ["", "CPU seconds of this process (2 shared cores; the machine's 1-minute load average per row below).", "",
              "| cohort | patients (train/holdout/synthetic) | fit+sample CPU s | peak RSS MB | load | failed checks |",
              "|---|---|---|---|---|---|"]
    for r in results:
        failed = "; ".join(f"{n}: " + ", ".join(c["name"] for c in rel["checks"] if not c["passed"])
                           for n, rel in r["releases"].items() if rel["gate"] != "pass") or "none"
        lines.append(f"| {Path(r['cohort']).parent.name} | {r['train']}/{r['holdout']}/{r['synthetic']} | "
                     f"{r['synth_cpu_s']} | {r['peak_rss_mb']} | {r.get('load_average_1min', 'n/a')} | {failed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cohort", action="append", default=[], help="a clinosim fhir_r4 folder (repeatable)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--resplits", type=int, default=10)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--known-events", type=int, default=3)
    p.add_argument("--jitter-days", type=int, default=7, help="the attacker knows each event's date to +- this")
    p.add_argument("--tau-days", type=float, default=30.0, help="date gap at which a known event stops matching")
    p.add_argument("--out", default=str(BENCH / "results" / "relational_privacy"))
    p.add_argument("--append", action="store_true", help="add to the existing results instead of replacing them")
    args = p.parse_args(argv)
    command = "python bench/relational_privacy_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if args.append and out.with_suffix(".json").exists() \
        else {"commands": [], "results": []}
    commands = [*previous.get("commands", []), command]
    results = previous["results"]
    for cohort in args.cohort:
        res = one_cohort(cohort, args.seed, args.resplits, args.bootstrap, args.known_events, args.jitter_days,
                         args.tau_days)
        results.append(res)
        print(json.dumps({"cohort": cohort, **{n: r["gate"] for n, r in res["releases"].items()}}), flush=True)
        out.with_suffix(".json").write_text(json.dumps({"commands": commands, "results": results}, indent=1,
                                                       default=str))
        out.with_suffix(".md").write_text(markdown(results, commands))
    return 0


if __name__ == "__main__":
    sys.exit(main())
