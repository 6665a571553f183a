"""Issue 17's done-when, read off finished CLI runs of relational mode (``synthfactory run ... --out DIR``).

For each run: the gate's outcome; per table, quality beside its real-data reference (ratio, done-when >= 0.95) and
children-per-patient KS beside its reference (done-when <= reference + 0.05); unseen (code, system, display, unit)
combinations in the released tables against every real row ingested; real free-text values (every ``valueString``
and ``note.text`` of the extract) found in any released Parquet column or any string of the released FHIR NDJSON;
FHIR references that do not resolve to a released resource; the R4B-validated sample.

    synthfactory run bench/specs/clinosim_relational.yaml --extract COHORT/fhir_r4 --out RUN
    python bench/relational_cli_check.py RUN=COHORT/fhir_r4 [RUN2=COHORT2/fhir_r4 ...] [--md OUT.md] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

TABLES = ("encounter", "condition", "observation", "medication_request", "procedure")
RESOURCES = ("Encounter", "Condition", "Observation", "MedicationRequest", "Procedure")


def free_text(extract: Path) -> set[str]:
    found: set[str] = set()
    for name in RESOURCES:
        path = extract / f"{name}.ndjson"
        if not path.exists():
            continue
        with open(path, "rb") as fh:
            for line in fh:
                if b'"valueString"' in line or b'"note"' in line:
                    r = orjson.loads(line)
                    if isinstance(r.get("valueString"), str):
                        found.add(r["valueString"])
                    for n in r.get("note") or []:
                        if isinstance(n, dict) and isinstance(n.get("text"), str):
                            found.add(n["text"])
    return found


def _strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _references(node: Any):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _references(v)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v)


def fhir_check(fhir: Path, free: set[str]) -> dict[str, Any]:
    ids: set[str] = set()
    refs: list[str] = []
    leaked = 0
    resources = 0
    for path in sorted(fhir.glob("*.ndjson")):
        with open(path, "rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                r = orjson.loads(line)
                resources += 1
                ids.add(f"{r['resourceType']}/{r['id']}")
                refs.extend(_references(r))
                leaked += sum(1 for s in _strings(r) if s in free)
    return {"resources": resources, "references": len(refs), "unresolved": sum(1 for x in refs if x not in ids),
            "free_text_leaked": leaked}


def check_run(run: Path, extract: Path) -> dict[str, Any]:
    from synthfactory.synthesize import relational

    version = sorted(run.glob("release/releases/*/v*"))
    stage = sorted(run.glob("staging/*/runs/*"))[-1]
    decision = json.loads((stage / "gate" / "decision.json").read_text())
    checks = {c["name"]: c for c in decision["checks"]}
    out: dict[str, Any] = {"run": str(run), "extract": str(extract), "approved": decision["approved"],
                           "failed": decision.get("failed"), "tables": {}}
    for t in ("patient", *TABLES):
        q, k = checks.get(f"table.{t}.quality"), checks.get(f"table.{t}.children_ks")
        row: dict[str, Any] = {}
        if q:
            ref = q["reference"]["mean"]
            row.update(quality=round(q["value"], 4), quality_ref=round(ref, 4), quality_ratio=round(q["value"] / ref, 3))
        if k:
            ref = k["reference"]["mean"]
            row.update(children_ks=round(k["value"], 4), children_ks_ref=round(ref, 4),
                       children_ks_ok=bool(k["value"] <= ref + 0.05))
        for extra in ("interval_ks", "first_age_ks"):
            c = checks.get(f"table.{t}.{extra}")
            if c:
                row[extra] = [None if c["value"] is None else round(c["value"], 4), round(c["reference"]["mean"], 4)]
        out["tables"][t] = row
    real = {t: pd.read_parquet(stage / "ingest" / f"{t}.parquet") for t in ("patient", *TABLES)
            if (stage / "ingest" / f"{t}.parquet").exists()}
    data = (version[-1] / "data") if version else stage / "synthetic"
    syn = {t: pd.read_parquet(data / f"{t}.parquet") for t in real if (data / f"{t}.parquet").exists()}
    unseen = relational.unseen_concepts(real, syn)
    out["unseen_concepts"] = sum(v["unseen"] for v in unseen.values())
    out["concept_rows"] = sum(v["rows"] for v in unseen.values())
    free = free_text(extract)
    out["free_text_real_values"] = len(free)
    leaked = 0
    for df in syn.values():
        for c in df.columns:
            if df[c].dtype == object:
                leaked += int(df[c].dropna().astype(str).isin(free).sum())
    out["free_text_leaked_parquet"] = leaked
    fhir = (version[-1] / "fhir") if version else stage / "synthetic" / "fhir"
    out["fhir"] = fhir_check(fhir, free)
    synthesis = json.loads((version[-1] / "reports" / "synthesis.json").read_text()) if version else {}
    out["fhir"]["validated_r4b"] = sum(((synthesis.get("fhir") or {}).get("validated_r4b") or {}).values())
    out["rows_synthetic"] = {t: len(df) for t, df in syn.items()}
    out["rows_real"] = {t: len(df) for t, df in real.items()}
    log = Path(str(run) + ".log")  # `/usr/bin/time -v synthfactory run ... > RUN.log 2>&1`, when kept beside the run
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if "Maximum resident set size" in line:
                out["peak_rss_mb"] = int(int(line.rsplit(":", 1)[1]) / 1000)
            elif "Elapsed (wall clock)" in line:
                out["wall"] = line.rsplit(": ", 1)[1].strip()
    return out


def _failed_names(r: dict) -> list[str]:
    """The failed checks' names, with value and threshold (``gate failed: NAME VALUE > max THR (by ...)``)."""
    out = []
    for text in r.get("failed") or []:
        body = text.split("failed: ", 1)[-1].split(" (by", 1)[0].split(" [rule", 1)[0]
        out.append(body)
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| run: cohort, synthesizer seed (real patients) | gate | peak RSS | quality / reference (patient, encounter, condition, observation, medication, procedure) | "
             "children KS / reference (worst margin) | unseen concepts | real free text in output | FHIR refs unresolved "
             "| R4B validated |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["tables"]
        ratios = ", ".join(f"{t[n]['quality_ratio']:.3f}" for n in ("patient", *TABLES) if "quality_ratio" in t[n])
        ks = [(n, t[n]["children_ks"], t[n]["children_ks_ref"]) for n in TABLES if "children_ks" in t[n]]
        worst = max(ks, key=lambda x: x[1] - x[2])
        rss = f"{r['peak_rss_mb']:,} MB" if r.get("peak_rss_mb") else "n/a"
        lines.append(f"| {Path(r['run']).name} ({r['rows_real'].get('patient', 0):,}) | "
                     f"{'released' if r['approved'] else 'refused: ' + ', '.join(_failed_names(r))} | {rss} | {ratios} | "
                     f"{worst[1]:.3f} / {worst[2]:.3f} ({worst[0]}) | {r['unseen_concepts']} of {r['concept_rows']:,} | "
                     f"{r['free_text_leaked_parquet'] + r['fhir']['free_text_leaked']} (of {r['free_text_real_values']:,} "
                     f"real values) | {r['fhir']['unresolved']} of {r['fhir']['references']:,} | {r['fhir']['validated_r4b']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="RUN_DIR=EXTRACT_DIR")
    p.add_argument("--md")
    p.add_argument("--json")
    a = p.parse_args(argv)
    results = []
    for item in a.runs:
        run, _, extract = item.partition("=")
        results.append(check_run(Path(run), Path(extract)))
    md = markdown(results)
    print(md)
    if a.md:
        Path(a.md).write_text(md)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
