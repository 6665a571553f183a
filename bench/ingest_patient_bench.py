"""Patient ingest: the compiled flatten against the hand-written Python flattener (the path it took before), on
real-shaped lines, in one run.

    .venv/bin/python bench/ingest_patient_bench.py --n 100000 --repeat 3 --out bench/results/ingest_patient.json

Input: the Patient NDJSON of clinosim cohorts (``--cohorts``, default the five under /work/cohorts), replicated
with new ids up to ``--n`` Patients (cached under ``bench/.cache/ingest/``). Each engine is ``ingest_extract`` with
the pipeline's defaults (HMAC keys, the R4B validation sample, quarantine, identifiers with names, address lines
and telecoms, sha256) on Patient, ``native=True`` (the compiled flatten) or ``native=False`` (the Python
flattener for every line), in its own child process, round-robin. Reported: wall and CPU seconds (user + system
of the child) and resources per CPU-second; the patient table and identifiers.parquet of the last two runs are
compared (equal, or the bench fails).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import orjson

BENCH_DIR = Path(__file__).resolve().parent
CACHE = BENCH_DIR / ".cache" / "ingest"
COHORTS = ",".join(f"/work/cohorts/clino_{c}/fhir_r4" for c in ("11_1700", "23_1700", "41_1700", "59_1700", "31_500"))


def build(cohorts: list[Path], n: int) -> Path:
    out = CACHE / f"patient-{len(cohorts)}cohorts-n{n}"
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    src = [orjson.loads(x) for c in cohorts for x in (c / "Patient.ndjson").read_bytes().splitlines() if x.strip()]
    ids = [o["id"] for o in src]
    with open(out / "Patient.ndjson", "wb") as fh:
        for i in range(n):
            o = src[i % len(src)]
            o["id"] = f"{ids[i % len(src)][:50]}.{i}"  # a valid FHIR id, unique (the cohorts share some ids)
            fh.write(orjson.dumps(o) + b"\n")
    (out / "done").write_text("ok")
    return out


def child(src: str, native: bool, out: str) -> None:
    from synthfactory.ingest.fhir_ndjson import ingest_extract
    from synthfactory.keys import Keyer
    from synthfactory.spec import SourceSpec

    d = SourceSpec.model_fields
    t0 = time.perf_counter()
    r = ingest_extract(src, out, keyer=Keyer(b"bench-salt-0123456789abcdef"), resources=["Patient"], native=native,
                       validate_sample_rate=d["validate_sample_rate"].default,
                       validate_max_per_type=d["validate_max_per_type"].default)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mib": ru.ru_maxrss / 1024,
                      "resources": r["resources_read"]["Patient"], "native_lines": r["native_lines"].get("Patient", 0),
                      "rows": r["rows"]["patient"], "quarantined": r["quarantined_total"]}))


def main() -> None:
    import shutil
    import tempfile

    import pyarrow.parquet as pq

    ap = argparse.ArgumentParser()
    ap.add_argument("--cohorts", default=COHORTS, help="comma-separated clinosim fhir_r4 folders")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1] == "1", a.child[2])
        return
    src = build([Path(c) for c in a.cohorts.split(",")], a.n)
    engines = {"compiled flatten": "1", "Python flattener (before)": "0"}
    runs: dict[str, list] = {k: [] for k in engines}
    work = Path(tempfile.mkdtemp())
    try:
        for _ in range(a.repeat):
            for name, flag in engines.items():
                out = work / f"out-{flag}"
                shutil.rmtree(out, ignore_errors=True)
                p = subprocess.run([sys.executable, __file__, "--child", str(src), flag, str(out)],
                                   capture_output=True, text=True, check=True)
                runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
        for f in ("patient.parquet", "identifiers.parquet"):
            if not pq.read_table(work / "out-1" / f).equals(pq.read_table(work / "out-0" / f)):
                raise SystemExit(f"{f} differs between the engines")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"n": a.n, "cohorts": a.cohorts, "runs": runs, "outputs_equal": True}
    for name, rs in runs.items():
        per_cpu = sorted(r["resources"] / r["cpu"] for r in rs)
        walls = ", ".join("%.2f" % r["wall"] for r in rs)
        cpus = ", ".join("%.2f" % r["cpu"] for r in rs)
        print(f"{name:26s} wall {walls} s; CPU {cpus} s; median {per_cpu[len(per_cpu) // 2]:,.0f} Patients per "
              f"CPU-second; peak RSS {max(r['rss_mib'] for r in rs):.0f} MiB; native lines {rs[0]['native_lines']}; "
              f"rows {rs[0]['rows']}")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
