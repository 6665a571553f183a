"""Two versions of the ingest on the same extract, interleaved: which one is faster on this machine now.

    git worktree add --detach /tmp/before <commit>      # and build its _flatc: python setup.py build_ext --inplace
    .venv/bin/python bench/ingest_versions.py --before /tmp/before --sizes 500000 2000000 --rounds 4

Each run is a fresh ``bench/ingest_bench.py --child synthfactory`` of *this* tree's bench (so both versions are
timed the same way) with ``PYTHONPATH`` set to the version's ``include/``; the rounds alternate the versions,
so a change in the machine's load hits both. Prints min and median wall and CPU seconds per version and size
and writes them as JSON (``--out``). The extracts are ingest_bench's cached ones (``bench/.cache/ingest``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import extract_for  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_once(tree: Path, src: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sf-ingest-versions-"))
    try:
        out = work / "result.json"
        env = {**os.environ, "PYTHONPATH": str(tree / "include"), "TQDM_DISABLE": "1"}
        subprocess.run([sys.executable, str(HERE / "ingest_bench.py"), "--child", "synthfactory", "--input", str(src),
                        "--work", str(work), "--result", str(out)], cwd=tree, env=env, check=True,
                       capture_output=True)
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path, help="a checkout of the earlier version (its _flatc built)")
    ap.add_argument("--after", type=Path, default=ROOT, help="the later version (default: this checkout)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[500000])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict[str, dict[int, list[dict]]] = {k: {} for k in trees}
    for size in args.sizes:
        src = extract_for(size, args.seed)
        for _ in range(args.rounds):
            for name, tree in trees.items():
                runs[name].setdefault(size, []).append(run_once(tree, src))
    summary = []
    for size in args.sizes:
        for name, tree in trees.items():
            rs = runs[name][size]
            walls, cpus = [r["seconds"] for r in rs], [r["cpu_seconds"] for r in rs]
            row = {"version": name, "tree": str(tree), "size": size, "wall_min": round(min(walls), 3),
                   "wall_median": round(statistics.median(walls), 3), "cpu_min": round(min(cpus), 3),
                   "cpu_median": round(statistics.median(cpus), 3),
                   "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rs), 1),
                   "wall_runs": [round(w, 3) for w in walls], "cpu_runs": [round(c, 3) for c in cpus]}
            summary.append(row)
            print(f"{name:6s} {size:>9,}: wall min {row['wall_min']:.2f} median {row['wall_median']:.2f} s | "
                  f"CPU min {row['cpu_min']:.2f} median {row['cpu_median']:.2f} s | peak RSS {row['peak_rss_mib']:.0f} MiB")
    if args.out:
        args.out.write_text(json.dumps({"bench": "ingest_versions", "rounds": args.rounds, "results": summary},
                                       indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
