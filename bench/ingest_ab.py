"""A/B of the ingest hot paths between two source trees (e.g. main and a branch), in one run.

    .venv/bin/python bench/ingest_ab.py --a /work/main/include --b include --sizes 100000 --rounds 5

On a shared, loaded machine a single wall-clock figure moves by 2x from run to run, so this runs each tree
``--rounds`` times, interleaved A, B, A, B..., each in its own process, and reports the best (minimum) wall
and CPU seconds of each (the run least disturbed by the other load), for:

* ``ingest`` -- ``ingest_extract`` with the pipeline's defaults on the cached synthetic extract of
  ``bench/ingest_bench.py`` (compiled flatten on);
* ``python flatten`` -- the hand-written Observation flattener alone over the parsed Observation lines
  (no I/O, one thread): the per-resource cost of the Python path's checks.
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
from ingest_bench import extract_for  # noqa: E402

CHILD = r'''
import json, resource, sys, tempfile, time, shutil
import orjson
src, what = sys.argv[1], sys.argv[2]
from synthfactory.keys import Keyer
keyer = Keyer(b"bench-salt-0123456789abcdef")
if what == "ingest":
    from synthfactory.ingest.fhir_ndjson import ingest_extract
    out = tempfile.mkdtemp(prefix="sf-ab-")
    t0, c0 = time.perf_counter(), time.process_time()
    rep = ingest_extract(src, out, keyer=keyer, validate_sample_rate=0.01, validate_max_per_type=1000)
    t1, c1 = time.perf_counter(), time.process_time()
    shutil.rmtree(out, ignore_errors=True)
    n = sum(rep["resources_read"].values())
else:
    from synthfactory.fhir.normalize import fast_key
    from synthfactory.ingest.flatteners import make_flatteners
    objs = [orjson.loads(l) for l in open(src + "/Observation.ndjson", "rb")]
    flat = make_flatteners(fast_key(keyer))["Observation"]
    rows = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for o in objs:
        try:
            rows += len(flat(o, o["id"]))
        except Exception:
            pass
    t1, c1 = time.perf_counter(), time.process_time()
    n = len(objs)
print(json.dumps({"n": n, "wall": t1 - t0, "cpu": c1 - c0}))
'''


def run(tree: str, src: Path, what: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), what], env=env, capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="the include/ folder of tree A (the anchor, e.g. main)")
    ap.add_argument("--b", required=True, help="the include/ folder of tree B")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    results = []
    for size in args.sizes:
        src = extract_for(size, args.seed)
        for what in ("ingest", "python flatten"):
            got: dict[str, list[dict]] = {"A": [], "B": []}
            for _ in range(args.rounds):
                for label, tree in (("A", args.a), ("B", args.b)):
                    got[label].append(run(tree, src, what))
            best = {k: {"wall": min(r["wall"] for r in v), "cpu": min(r["cpu"] for r in v), "n": v[0]["n"]}
                    for k, v in got.items()}
            row = {"size": size, "path": what, "resources": best["A"]["n"],
                   "A_best_wall_s": round(best["A"]["wall"], 3), "B_best_wall_s": round(best["B"]["wall"], 3),
                   "A_best_cpu_s": round(best["A"]["cpu"], 3), "B_best_cpu_s": round(best["B"]["cpu"], 3),
                   "B_over_A_wall": round(best["B"]["wall"] / best["A"]["wall"], 3),
                   "B_over_A_cpu": round(best["B"]["cpu"] / best["A"]["cpu"], 3),
                   "all_wall_A": [round(r["wall"], 2) for r in got["A"]],
                   "all_wall_B": [round(r["wall"], 2) for r in got["B"]]}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, "rounds": args.rounds, "rows": results},
                                             indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
