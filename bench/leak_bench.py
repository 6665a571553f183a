"""The gate's leak scan, before and after issue 22 item 2, side by side on one ingest output.

Before (the code up to this change, kept verbatim as ``leak._leak_scan_reference``): the gate loads ingest's
identifier list as Python objects (``load_identifiers``) plus the real HMAC keys, and builds the token-tuple index
once per data-card render (twice per gate task). After: ingest writes a compact index (salted 64-bit hashes,
``identifiers.index.parquet``); the gate builds one :class:`LeakMatcher` from it and the keys and scans both
renders with it. Both scan the same file(s) with the same vocabulary; the results must be equal (checked).

Each path runs in its own fresh process (``--child``) so its peak RSS (``ru_maxrss``) is its own; the time of
writing the index (paid once, at ingest) is reported apart.

    .venv/bin/python bench/leak_bench.py --run-dir bench/.cache/scale/runs/after_n20000 --out bench/results/leak.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402


def _find(run_dir: Path) -> dict[str, str]:
    def one(pattern: str) -> str:
        hits = sorted(run_dir.rglob(pattern))
        if not hits:
            raise SystemExit(f"{run_dir}: no {pattern}")
        return str(hits[0])

    return {"identifiers": one("ingest/identifiers.parquet"), "train": one("model/train.parquet"),
            "holdout": one("model/holdout.parquet"), "card": one("reports/datacard.html")}


def child(which: str, paths: dict[str, str], repeats: int) -> dict:
    import pyarrow.parquet as pq

    from synthfactory.privacy import leak
    from synthfactory.storage import Store
    from synthfactory.synthesize.modelling import KEY

    store = Store()
    train = pq.read_table(paths["train"]).to_pandas()
    keys = [*train[KEY], *pq.read_table(paths["holdout"], columns=[KEY]).column(KEY).to_pylist()]
    vocab = leak.public_vocabulary(train.drop(columns=[KEY]), min_count=5)
    leak.product_words()  # read once per process either way
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    c0 = time.process_time()
    results = []
    if which == "before":
        identifiers = [*leak.load_identifiers(paths["identifiers"], store), *keys]
        for _ in range(repeats):
            results.append(leak._leak_scan_reference([paths["card"]], identifiers, store, vocabulary=vocab))
    else:
        matcher = leak.LeakMatcher.for_ingest(paths["identifiers"], store, extra=keys, vocabulary=vocab)
        for _ in range(repeats):
            results.append(leak.leak_scan([paths["card"]], matcher, store))
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"which": which, "seconds": round(seconds, 3), "cpu_s": round(cpu, 3), "peak_rss_mib": round(peak / 1024, 1),
            "peak_rss_over_inputs_mib": round((peak - base) / 1024, 1), "result": results[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished `synthfactory run` output folder")
    ap.add_argument("--repeats", type=int, default=2, help="scans per task (the gate scans 2 card renders)")
    ap.add_argument("--child", choices=["before", "after"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    paths = _find(args.run_dir)
    if args.child:
        print(json.dumps(child(args.child, paths, args.repeats)))
        return 0
    from synthfactory.privacy.leak import write_identifier_index
    from synthfactory.storage import Store
    import pyarrow.parquet as pq

    t0, c0 = time.perf_counter(), time.process_time()
    write_identifier_index(paths["identifiers"], Store())  # what ingest now does once
    index_s, index_cpu = time.perf_counter() - t0, time.process_time() - c0
    runs = {}
    for which in ("before", "after"):
        out = subprocess.run([sys.executable, __file__, "--run-dir", str(args.run_dir), "--child", which,
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        runs[which] = json.loads(out.stdout.strip().splitlines()[-1])
    same = runs["before"].pop("result") == runs["after"].pop("result")
    result = {"bench": "leak", "machine": machine_info(), "run_dir": str(args.run_dir),
              "identifiers": pq.ParquetFile(paths["identifiers"]).metadata.num_rows, "repeats": args.repeats,
              "index_write_s": round(index_s, 3), "index_write_cpu_s": round(index_cpu, 3), "runs": runs, "same_result": same,
              "speedup": round(runs["before"]["seconds"] / max(runs["after"]["seconds"], 1e-9), 1),
              "speedup_cpu": round(runs["before"]["cpu_s"] / max(runs["after"]["cpu_s"], 1e-9), 1)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
