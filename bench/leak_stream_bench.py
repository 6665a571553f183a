"""Leak scan of one big released text file: peak RSS and CPU seconds before/after streaming (issue 22 item 1).

Each code tree (``--code NAME=INCLUDE``) runs in its own fresh process: a :class:`LeakMatcher` built from the
patients' ids and family names of ``--patients`` (an NDJSON Patient file), then ``match_file`` of ``--file``
(e.g. a FHIR NDJSON output that references those patients). Peak RSS is the child's whole ``ru_maxrss``
(interpreter and imports included); the matched identifiers and their counts (the hashes are salted per process,
so the sorted counts) must be equal across trees (checked).

    .venv/bin/python bench/leak_stream_bench.py --patients EXTRACT/Patient.ndjson --file EXTRACT/DiagnosticReport.ndjson \\
        --code before=OLD/include --code after=include --out bench/results/leak_stream.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

CHILD = r"""
import hashlib, json, resource, sys, time
import orjson
from synthfactory.privacy.leak import Identifier, LeakMatcher
from synthfactory.storage import Store
ids = []
with open(sys.argv[1], "rb") as fh:
    for line in fh:
        r = orjson.loads(line)
        ids.append(Identifier(r["id"], "id"))
        for n in r.get("name", []):
            if n.get("family"):
                ids.append(Identifier(n["family"], "family"))
m = LeakMatcher.from_identifiers(ids)
t0 = resource.getrusage(resource.RUSAGE_SELF)
found, _ = m.match_file(sys.argv[2], Store())
t1 = resource.getrusage(resource.RUSAGE_SELF)
digest = hashlib.sha256(json.dumps(sorted(found.values())).encode()).hexdigest()  # hashes are salted per process
print(json.dumps({"identifiers": len(ids), "matched": len(found), "occurrences": sum(found.values()),
                  "counts_sha256": digest, "scan_cpu_s": round(t1.ru_utime + t1.ru_stime - t0.ru_utime - t0.ru_stime, 2),
                  "peak_rss_mib": round(t1.ru_maxrss / 1024, 1)}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=Path, required=True)
    ap.add_argument("--file", type=Path, required=True)
    ap.add_argument("--code", action="append", required=True, metavar="NAME=INCLUDE")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for spec in args.code:
        name, include = spec.split("=", 1)
        res = subprocess.run([sys.executable, "-c", CHILD, str(args.patients), str(args.file)], capture_output=True,
                             text=True, env={"PYTHONPATH": str(Path(include).resolve()), "PATH": "/usr/bin:/bin"})
        if res.returncode:
            raise SystemExit(f"{name}: {res.stderr[-2000:]}")
        rows.append({"code": name, "include": include, **json.loads(res.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    same = len({r["counts_sha256"] for r in rows}) == 1
    out = {"bench": "leak_stream", "machine": machine_info(), "file": str(args.file),
           "file_mib": round(args.file.stat().st_size / 2**20, 1), "rows": rows, "counts_equal": same}
    print(f"counts equal across trees: {same}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
