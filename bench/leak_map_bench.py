"""The privacy stage's leak scan in one process against the mapped scan (plan -> one task per part -> merge), same
run, same files, results compared.

    .venv/bin/python bench/leak_map_bench.py --run-dir RUN --parts 4 --row-groups 8 --out bench/results/leak_map.json
    .venv/bin/python bench/leak_map_bench.py --run-dir RUN --parts 4 --row-groups 8 --replicate 25

``RUN`` is a finished run's staging folder (``<staging>/<dataset>/runs/<run id>``). The files scanned are the
privacy stage's: the synthetic table, the synthesis, quality and privacy reports (copied to a scratch folder; with
``--row-groups k`` the synthetic table is rewritten, same rows and values, in k row groups so that the plan can
cut it into ranges, as a big output would be written). The matcher is built as the pipeline builds it: ingest's
compact identifier index plus the real keys, the real training table's public vocabulary.

Anchor: one process builds the matcher and scans every file (the privacy task today). Mapped: the plan in one
process, each part in a fresh process (as a mapped Airflow task: it builds its own matcher), the merge in one
process; run one after the other, so their CPU seconds add up to the mapped scan's total cost and the largest part
is its critical path with enough workers. Every phase reports wall and CPU seconds (user + system) and peak RSS.
The bench fails when the merged result differs from the one-process result. Wall seconds depend on the machine's
load: the CPU seconds are the comparable figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402


def _paths(run: Path, scratch: Path, row_groups: int, replicate: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for rel in ("synthetic/patients.parquet", "reports/synthesis.json", "reports/quality.json",
                "reports/privacy.json"):
        src = run / rel
        if not src.exists():
            continue
        dst = scratch / rel.replace("/", "_")
        if rel.endswith(".parquet") and (row_groups > 1 or replicate > 1):
            table = pq.read_table(src)
            if replicate > 1:  # a bigger output: the rows k times, each copy with fresh synthetic ids
                table = pa.concat_tables([table] * replicate)
                if "synthetic_id" in table.column_names:
                    ids = pa.array([f"syn-{i:09d}" for i in range(table.num_rows)], pa.string())
                    table = table.set_column(table.schema.get_field_index("synthetic_id"), "synthetic_id", ids)
            pq.write_table(table, dst, row_group_size=-(-table.num_rows // row_groups))
            del table
        else:
            shutil.copy(src, dst)
        files.append(str(dst))
    return {"files": files, "identifiers": str(run / "ingest/identifiers.parquet"),
            "train": str(run / "model/train.parquet"), "holdout": str(run / "model/holdout.parquet")}


def _matcher(paths: dict):
    import pyarrow.parquet as pq

    from synthfactory.privacy.leak import LeakMatcher, public_vocabulary
    from synthfactory.storage import Store
    from synthfactory.synthesize.modelling import KEY

    train = pq.read_table(paths["train"]).to_pandas()
    holdout = pq.read_table(paths["holdout"], columns=[KEY]).column(KEY).to_pylist()
    return LeakMatcher.for_ingest(paths["identifiers"], Store(), extra=[*train[KEY], *holdout],
                                  vocabulary=public_vocabulary(train, min_count=5))


def child(which: str, paths: dict, arg: str) -> dict:
    from synthfactory.privacy import leak
    from synthfactory.storage import Store

    store = Store()
    t0, c0 = time.perf_counter(), time.process_time()
    if which == "prepare":  # in a child: the parent stays small, so no child inherits its pages (ru_maxrss)
        out = _paths(Path(paths["run"]), Path(paths["scratch"]), paths["row_groups"], paths["replicate"])
    elif which == "one":
        out = leak.leak_scan(paths["files"], _matcher(paths), store)
    elif which == "plan":
        out = leak.plan_scan(paths["files"], store, int(arg))
    elif which == "part":
        unit = json.loads(arg)
        out = leak.scan_part(_matcher(paths), unit, store, str(Path(paths["scratch"]) / f"m{unit['index']}.json"))
    else:
        out = leak.merge_scan(paths["files"], json.loads(Path(arg).read_text()), store)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"which": which, "wall_s": round(time.perf_counter() - t0, 3),
            "cpu_s": round(time.process_time() - c0, 3), "peak_rss_mib": round(peak / 1024, 1), "out": out}


def _run(which: str, paths: dict, arg: str = "") -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", which, "--paths", json.dumps(paths), "--arg", arg],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--row-groups", type=int, default=8)
    ap.add_argument("--replicate", type=int, default=1, help="the synthetic table's rows k times (fresh ids)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child")
    ap.add_argument("--paths")
    ap.add_argument("--arg", default="")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.paths), args.arg)))
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="leak_map_bench_"))
    try:
        prep = _run("prepare", {"run": str(args.run_dir), "scratch": str(scratch), "row_groups": args.row_groups,
                                "replicate": args.replicate})
        paths = {**prep["out"], "scratch": str(scratch)}
        one = _run("one", paths)
        plan = _run("plan", paths, str(args.parts))
        parts = [_run("part", paths, json.dumps(u)) for u in plan["out"]]
        (scratch / "parts.json").write_text(json.dumps([p["out"] for p in parts]))
        merge = _run("merge", paths, str(scratch / "parts.json"))
        same = merge["out"] == one["out"]
        phases = [plan, *parts, merge]
        result = {
            "bench": "leak_map", "machine": machine_info(), "run_dir": str(args.run_dir), "parts": args.parts,
            "row_groups": args.row_groups, "replicate": args.replicate, "files": len(paths["files"]), "units": len(plan["out"]),
            "same_result": same, "clean": one["out"]["clean"], "identifiers": one["out"]["identifiers"],
            "one_process": {k: one[k] for k in ("wall_s", "cpu_s", "peak_rss_mib")},
            "mapped": {"plan": {k: plan[k] for k in ("wall_s", "cpu_s", "peak_rss_mib")},
                       "parts": [{"unit": p["out"]["index"], "row_groups": p["out"]["row_groups"],
                                  **{k: p[k] for k in ("wall_s", "cpu_s", "peak_rss_mib")}} for p in parts],
                       "merge": {k: merge[k] for k in ("wall_s", "cpu_s", "peak_rss_mib")},
                       "cpu_s_total": round(sum(p["cpu_s"] for p in phases), 3),
                       "cpu_s_critical_path": round(plan["cpu_s"] + max(p["cpu_s"] for p in parts)
                                                    + merge["cpu_s"], 3),
                       "peak_rss_mib_max": max(p["peak_rss_mib"] for p in phases)},
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
