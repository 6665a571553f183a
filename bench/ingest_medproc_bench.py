"""MedicationRequest and Procedure ingest: the compiled flatten against their built-in ViewDefinitions (the
path they took before), on real-shaped lines, in one run.

    .venv/bin/python bench/ingest_medproc_bench.py --n 100000 --repeat 3 --out bench/results/ingest_medproc.json

Input: a clinosim cohort's Patient, MedicationRequest and Procedure NDJSON (``--cohort``, default
/work/cohorts/clino_31_500/fhir_r4), the MedicationRequest and Procedure lines replicated with new ids up to
``--n`` resources of each type (cached under ``bench/.cache/ingest/``). Each engine is ``ingest_extract`` with
the pipeline's defaults (HMAC keys, the R4B validation sample, quarantine, identifiers, sha256) on those three
types, ``native=True`` (the compiled flatten) or ``native=False`` (the views for every line), in its own child
process, round-robin. Reported: wall and CPU seconds (user + system of the child) and resources per CPU-second.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

BENCH_DIR = Path(__file__).resolve().parent
CACHE = BENCH_DIR / ".cache" / "ingest"
TYPES = ("MedicationRequest", "Procedure")


def build(cohort: Path, n: int) -> Path:
    out = CACHE / f"medproc-{cohort.parent.name}-n{n}"
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "Patient.ndjson").write_bytes((cohort / "Patient.ndjson").read_bytes())
    for t in TYPES:
        src = [orjson.loads(x) for x in (cohort / f"{t}.ndjson").read_bytes().splitlines() if x.strip()]
        ids = [o["id"] for o in src]
        with open(out / f"{t}.ndjson", "wb") as fh:
            for i in range(n):
                o = src[i % len(src)]
                o["id"] = f"{ids[i % len(src)]}.{i // len(src)}"  # a valid FHIR id
                fh.write(orjson.dumps(o) + b"\n")
    (out / "done").write_text("ok")
    return out


def child(src: str, native: bool) -> None:
    from synthfactory.ingest.fhir_ndjson import ingest_extract
    from synthfactory.keys import Keyer
    from synthfactory.spec import SourceSpec

    d = SourceSpec.model_fields
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        r = ingest_extract(src, str(Path(work) / "out"), keyer=Keyer(b"bench-salt-0123456789abcdef"),
                           resources=["Patient", *TYPES], native=native,
                           validate_sample_rate=d["validate_sample_rate"].default,
                           validate_max_per_type=d["validate_max_per_type"].default)
        wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mib": ru.ru_maxrss / 1024,
                      "resources": sum(r["resources_read"][t] for t in TYPES),
                      "native_lines": {t: r["native_lines"].get(t, 0) for t in TYPES},
                      "rows": {k: r["rows"][k] for k in ("medication_request", "procedure")}}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohort", default="/work/cohorts/clino_31_500/fhir_r4")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1] == "1")
        return
    src = build(Path(a.cohort), a.n)
    engines = {"compiled flatten": "1", "views (before)": "0"}
    runs: dict[str, list] = {k: [] for k in engines}
    for _ in range(a.repeat):
        for name, flag in engines.items():
            p = subprocess.run([sys.executable, __file__, "--child", str(src), flag], capture_output=True, text=True,
                               check=True)
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
    out = {"n_per_type": a.n, "cohort": a.cohort, "runs": runs}
    for name, rs in runs.items():
        per_cpu = sorted(r["resources"] / r["cpu"] for r in rs)
        walls = ", ".join("%.2f" % r["wall"] for r in rs)
        cpus = ", ".join("%.2f" % r["cpu"] for r in rs)
        print(f"{name:18s} wall {walls} s; CPU {cpus} s; median {per_cpu[len(per_cpu) // 2]:,.0f} resources per "
              f"CPU-second; peak RSS {max(r['rss_mib'] for r in rs):.0f} MiB; native lines {rs[0]['native_lines']}; "
              f"rows {rs[0]['rows']}")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
