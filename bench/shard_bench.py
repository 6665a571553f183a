"""Sharded ingest (plan -> shards in parallel processes -> merge) against the one-process ingest, same run.

    .venv/bin/python bench/shard_bench.py --extract /work/cohorts/clino_11_1700/fhir_r4 --shards 4 --workers 2
    .venv/bin/python bench/shard_bench.py --extract DIR --out bench/results/ingest_sharded.json

The anchor is :func:`synthfactory.ingest.fhir_ndjson.ingest_extract` with the pipeline's defaults (compiled
flatten, 1 % validation sample capped at 1,000 per type) in one process. The sharded ingest runs the plan in
one process, the shards in a pool of ``--workers`` processes (each shard a fresh process, as a mapped Airflow
task would be) and the merge in one process. Every phase reports wall seconds, CPU seconds (user + system of
its process) and peak RSS (``ru_maxrss``). The outputs are compared (row counts, quarantine, identifiers, the
report's counts) and the bench fails when they differ. Wall seconds depend on the machine's load: the CPU
seconds are the comparable figures on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESOURCES = ["Patient", "Encounter", "Condition", "Observation"]
SALT = b"bench-salt-0123456789abcdef"
OPTS = dict(resources=RESOURCES, validate_sample_rate=0.01, validate_max_per_type=1000)


def _measure(fn, *args):
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    out = fn(*args)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": round(time.perf_counter() - t0, 3),
            "cpu_s": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 3),
            "peak_rss_mib": round(r1.ru_maxrss / 1024, 1), "out": out}


def _one(src: str, out: str) -> dict:
    from synthfactory.ingest.fhir_ndjson import ingest_extract
    from synthfactory.keys import Keyer

    return _measure(lambda: ingest_extract(src, out, keyer=Keyer(SALT), **OPTS))


def _plan(src: str, n: int) -> dict:
    from synthfactory.ingest.sharded import plan_shards
    from synthfactory.storage import Store

    return _measure(lambda: plan_shards(src, Store(), n=n, resources=RESOURCES))


def _shard(shard: dict, out: str) -> dict:
    from synthfactory.ingest.sharded import ingest_shard
    from synthfactory.keys import Keyer

    return _measure(lambda: ingest_shard(shard, out, keyer=Keyer(SALT), **OPTS))


def _merge(plan: dict, results: list, out: str) -> dict:
    from synthfactory.ingest.sharded import merge
    from synthfactory.keys import Keyer

    return _measure(lambda: merge(plan, results, out, keyer=Keyer(SALT), **OPTS))


def _in_child(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extract", required=True)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.ingest.test_sharded import _same

    tmp = Path(tempfile.mkdtemp(prefix="sf-shard-bench-"))
    try:
        one = _in_child(_one, a.extract, str(tmp / "one"))
        plan = _in_child(_plan, a.extract, a.shards)
        shards = plan["out"]["shards"]
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(a.workers, maxtasksperchild=1) as pool:
            done = pool.starmap(_shard, [(s, str(tmp / "shards" / str(s["index"]))) for s in shards])
        shards_wall = time.perf_counter() - t0
        merged = _in_child(_merge, plan["out"], [d["out"] for d in done], str(tmp / "sharded"))
        _same(one["out"], merged["out"])  # raises when the outputs differ
        phases = {"one process": {k: v for k, v in one.items() if k != "out"},
                  "plan": {k: v for k, v in plan.items() if k != "out"},
                  **{f"shard {d['out']['index']}": {k: v for k, v in d.items() if k != "out"} for d in done},
                  "merge": {k: v for k, v in merged.items() if k != "out"}}
        sharded_cpu = sum(p["cpu_s"] for n, p in phases.items() if n != "one process")
        summary = {
            "extract": a.extract, "resources_read": sum(one["out"]["resources_read"].values()),
            "rows": one["out"]["rows"], "shards": len(shards), "workers": a.workers, "equal_outputs": True,
            "one_process_wall_s": one["wall_s"], "one_process_cpu_s": one["cpu_s"],
            "sharded_wall_s": round(plan["wall_s"] + shards_wall + merged["wall_s"], 3),
            "sharded_cpu_s": round(sharded_cpu, 3),
            "sharded_peak_rss_mib": max(p["peak_rss_mib"] for n, p in phases.items() if n != "one process"),
            "revalidated_in_merge": merged["out"]["sharded"]["revalidated_in_merge"], "phases": phases,
        }
        print(json.dumps(summary, indent=2))
        if a.out:
            Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
