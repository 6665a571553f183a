"""Bundles against NDJSON of the same resources, for two source trees (e.g. main and a branch), in one run.

    PYTHONPATH=include .venv/bin/python bench/ingest_bundles_ab.py --a /work/main/include --b include \\
        --patients 600 --seed 11 --rounds 3 --out bench/results/ingest_bundles_ab.json

Input: ``bench/ingest_bench.py``'s cached carebundle pair (``--profile mixed``, one pretty-printed transaction
Bundle per patient with ``urn:uuid:`` references, the same resources as NDJSON, and one Bundle holding every
patient). Each run is its own process (imports and the R4B validator models loaded before the clock starts);
the runs are interleaved, tree A then tree B, ``--rounds`` times, and each figure is the best (least disturbed)
of its runs: wall and CPU seconds (``time.process_time``: every thread of the process) and peak RSS. Modes:

* ``bundles`` / ``ndjson``: the pipeline's defaults (the dataset spec's ``validate_sample_rate`` and
  ``validate_max_per_type``, the always-validated first resources), Bundle folder / NDJSON folder;
* ``bundles0`` / ``ndjson0``: no validation sample at all (rate 0, ``validate_first=0``);
* ``one``: the single Bundle of every patient, pipeline defaults (its peak RSS against ``ndjson``'s).

Ratios are in input bytes per second: every Bundle file's bytes against the four NDJSON files ingest reads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import _bytes, carebundle_pair  # noqa: E402

CHILD = r'''
import json, resource, shutil, sys, tempfile, time
src, mode = sys.argv[1], sys.argv[2]
import pandas, pyarrow.parquet  # noqa: F401 - imports before the clock
from fhir.resources.R4B import get_fhir_model_class
for t in ("Patient", "Encounter", "Condition", "Observation"):
    get_fhir_model_class(t)
from synthfactory.keys import Keyer
from synthfactory.spec import SourceSpec
from synthfactory.ingest.bundle import ingest_bundles
from synthfactory.ingest.fhir_ndjson import ingest_extract
d = SourceSpec.model_fields
keyer = Keyer(b"bench-salt-0123456789abcdef")
kw = dict(validate_sample_rate=d["validate_sample_rate"].default,
          validate_max_per_type=d["validate_max_per_type"].default)
if mode.endswith("0"):
    kw = dict(validate_sample_rate=0.0, validate_first=0)
fn = ingest_extract if mode.startswith("ndjson") else ingest_bundles
out = tempfile.mkdtemp(prefix="sf-bundle-ab-")
t0, c0 = time.perf_counter(), time.process_time()
rep = fn(src, out, keyer=keyer, **kw)
t1, c1 = time.perf_counter(), time.process_time()
shutil.rmtree(out, ignore_errors=True)
print(json.dumps({"wall": t1 - t0, "cpu": c1 - c0, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "resources": sum(rep["resources_read"].values()), "validated": rep["validated"],
                  "rows": rep["rows"]}))
'''

MODES = ("bundles", "ndjson", "bundles0", "ndjson0", "one")


def run(tree: str, src: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), mode], env=env, capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="the include/ folder of tree A (the anchor, e.g. main)")
    ap.add_argument("--b", required=True, help="the include/ folder of tree B")
    ap.add_argument("--patients", type=int, default=600)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    bundles, ndjson, one = carebundle_pair(args.patients, args.seed)
    src = {"bundles": bundles, "bundles0": bundles, "ndjson": ndjson, "ndjson0": ndjson, "one": one}
    nbytes = {"bundles": _bytes(bundles, "*.json"), "one": _bytes(one, "*.json"),
              "ndjson": _bytes(ndjson, "*.ndjson", ("Patient", "Encounter", "Condition", "Observation"))}
    nbytes.update(bundles0=nbytes["bundles"], ndjson0=nbytes["ndjson"])
    got: dict[str, dict[str, list[dict]]] = {t: {m: [] for m in MODES} for t in ("A", "B")}
    for r in range(args.rounds):
        for label, tree in (("A", args.a), ("B", args.b)):
            for mode in MODES:
                x = run(tree, src[mode], mode)
                got[label][mode].append(x)
                print(f"round {r + 1} {label} {mode}: {x['wall']:.2f}s wall, {x['cpu']:.2f} CPU-s, "
                      f"{x['rss_mib']:.0f} MiB, {x['validated']} validated", file=sys.stderr, flush=True)
    best = {t: {m: {"wall": min(x["wall"] for x in v), "cpu": min(x["cpu"] for x in v),
                    "rss_mib": min(x["rss_mib"] for x in v), "validated": v[0]["validated"],
                    "resources": v[0]["resources"], "rows": v[0]["rows"]} for m, v in ms.items()}
            for t, ms in got.items()}
    rows = []
    for t in ("A", "B"):
        b = best[t]
        for mode, anchor, what in (("bundles", "ndjson", "pipeline defaults, one Bundle per patient"),
                                   ("bundles0", "ndjson0", "no validation sample either side"),
                                   ("one", "ndjson", "pipeline defaults, one Bundle of every patient")):
            x, y = b[mode], b[anchor]
            rows.append({
                "tree": t, "figure": what, "bundle_mb": round(nbytes[mode] / 1e6, 1),
                "ndjson_mb": round(nbytes[anchor] / 1e6, 1),
                "bundle_mb_per_cpu_s": round(nbytes[mode] / x["cpu"] / 1e6, 1),
                "ndjson_mb_per_cpu_s": round(nbytes[anchor] / y["cpu"] / 1e6, 1),
                "ratio_per_cpu_s": round((nbytes[mode] / x["cpu"]) / (nbytes[anchor] / y["cpu"]), 2),
                "bundle_mb_per_s": round(nbytes[mode] / x["wall"] / 1e6, 1),
                "ndjson_mb_per_s": round(nbytes[anchor] / y["wall"] / 1e6, 1),
                "ratio_wall": round((nbytes[mode] / x["wall"]) / (nbytes[anchor] / y["wall"]), 2),
                "bundle_cpu_s": round(x["cpu"], 2), "ndjson_cpu_s": round(y["cpu"], 2),
                "bundle_peak_rss_mib": round(x["rss_mib"]), "ndjson_peak_rss_mib": round(y["rss_mib"]),
                "validated": [x["validated"], y["validated"]], "same_rows": x["rows"] == y["rows"]})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, "rounds": args.rounds,
                                              "patients": args.patients, "seed": args.seed, "rows": rows,
                                              "runs": got}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
