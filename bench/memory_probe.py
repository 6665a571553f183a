"""Peak RSS and CPU seconds of the parts of prepare, privacy and gate that issue 22 found holding whole tables or the
identifier list, before and after, each in its own fresh process, on one ingest output (the ``ingest/`` folder of a
run: its Parquet tables and identifiers.parquet).

* ``prepare_before``: every ingested table read whole into pandas, then the modelling table (the code before);
* ``prepare_after``: the same tables without other tables' row keys (``pipeline.modelling_frame``), same table;
* ``prepare_stream``: the tables streamed in Parquet batches with only the columns and observation rows the
  features read (``modelling.read_modelling_tables``, what prepare does now), same table;
* ``prepare_stage``: the whole prepare stage (``pipeline.prepare``: tables, modelling table, split, metadata, the
  real-data reference) into a temporary staging folder; with ``PYTHONPATH`` at another tree's ``include``, that
  tree's stage (the before/after of the stage);
* ``index_write``: ingest's one-off compact identifier index (``identifiers.index.parquet``);
* ``leak_before``: the identifier list and the real keys as Python objects, the token-tuple index built per scan,
  ``--scans`` scans of ``--file`` (the gate scans its data card twice; privacy builds once more);
* ``leak_after``: one :class:`LeakMatcher` from the compact index and the keys, ``--scans`` scans.

Each child reports ``ru_maxrss`` (its whole peak, interpreter and imports included: ~250-300 MiB) and CPU seconds
(user + system: robust when other jobs share the cores). The modelling tables must be equal and the leak results
equal (checked).

    .venv/bin/python bench/memory_probe.py --ingest-dir RUN/ingest --file RUN/reports/datacard.html \\
        --out bench/results/memory_probe_20k.json

``--replicate N`` probes the leak parts on the ingest's identifier list and patient keys replicated N times with
fresh values (ids and MRNs XOR-ed per replica, as ``bench/scale_bench.py`` replicates extracts; names kept): a
200k-patient identifier list from a 20k run without building and ingesting the 200k extract. Built once into
``--replicate-dir`` (default ``bench/.cache/memory_probe/<N>x``), with its compact index.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_info  # noqa: E402

PARTS = ("prepare_before", "prepare_after", "prepare_stream", "prepare_stage", "index_write", "leak_before", "leak_after")


def _spec_features():
    import yaml

    from synthfactory.spec import parse_spec

    data = yaml.safe_load((ROOT / "include/datasets/cohort_demo.yaml").read_text())
    data["features"]["min_patients"] = 2
    return parse_spec(data).features


def child(part: str, ingest: Path, file: str, scans: int) -> dict:
    import pyarrow.parquet as pq

    from synthfactory.storage import Store

    store = Store()
    tables = {p.stem: str(p) for p in ingest.glob("*.parquet") if p.stem not in ("identifiers",)
              and not p.name.endswith(".index.parquet")}
    ids = str(ingest / "identifiers.parquet")
    out: dict = {}
    if part.startswith("prepare"):
        from synthfactory.pipeline import modelling_frame
        from synthfactory.synthesize.modelling import build_modelling_table

        features = _spec_features()
    if part.startswith("leak"):
        from synthfactory.privacy import leak

        keys = pq.read_table(tables["patient"], columns=["patient_key"]).column("patient_key").to_pylist()
        leak.product_words()
    t0, c0 = time.perf_counter(), time.process_time()
    if part == "prepare_before":
        frames = {n: pq.read_table(u).to_pandas() for n, u in tables.items()}
        table, _ = build_modelling_table(frames, features)
        out["table_sha256"] = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()
    elif part == "prepare_after":
        frames = {n: modelling_frame(pq.read_table(u)) for n, u in tables.items()}
        table, _ = build_modelling_table(frames, features)
        out["table_sha256"] = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()
    elif part == "prepare_stream":
        from synthfactory.synthesize.modelling import read_modelling_tables

        frames = read_modelling_tables(tables, store, features)
        table, _ = build_modelling_table(frames, features)
        out["table_sha256"] = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()
    elif part == "prepare_stage":
        import tempfile

        import yaml

        from synthfactory.context import RunContext
        from synthfactory.pipeline import prepare
        from synthfactory.spec import parse_spec
        from synthfactory.synthesize.modelling import KEY

        data = yaml.safe_load((ROOT / "include/datasets/cohort_demo.yaml").read_text())
        data["features"]["min_patients"] = 2
        with tempfile.TemporaryDirectory(prefix="memory-probe-") as tmp:
            ctx = RunContext(spec=parse_spec(data), run_id="probe", version="probe", staging_root=tmp)
            m = prepare(ctx, {"tables": tables})
            train = store.read_df(m["train_uri"]).sort_values(KEY, kind="stable").reset_index(drop=True)
            out["table_sha256"] = hashlib.sha256(train.to_csv(index=False).encode()).hexdigest()
            out["module"] = sys.modules["synthfactory.pipeline"].__file__
    elif part == "index_write":
        from synthfactory.privacy.leak import write_identifier_index

        write_identifier_index(ids, store)
    elif part == "leak_before":
        identifiers = [*leak.load_identifiers(ids, store), *keys]
        for _ in range(scans):
            res = leak._leak_scan_reference([file], identifiers, store)
        out["result"] = res
    elif part == "leak_after":
        matcher = leak.LeakMatcher.for_ingest(ids, store, extra=keys)
        for _ in range(scans):
            res = leak.leak_scan([file], matcher, store)
        out["result"] = res
    return {"part": part, "seconds": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **out}


def replicate(ingest: Path, n: int, dest: Path) -> Path:
    """``ingest``'s identifiers.parquet and patient keys, ``n`` times with fresh ids, MRNs and keys (see --replicate)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthfactory.privacy.leak import write_identifier_index
    from synthfactory.storage import Store

    marker = dest / ".complete"
    if marker.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    src = pq.read_table(ingest / "identifiers.parquet", columns=["value", "kind"])
    values, kinds = src.column("value").to_pylist(), src.column("kind").to_pylist()
    pkeys = pq.read_table(ingest / "patient.parquet", columns=["patient_key"]).column("patient_key").to_pylist()
    out_v, out_k, out_p = [], [], []
    for r in range(n):
        x = (r * 0x9E3779B1) & 0xFFFFFFFF
        for v, k in zip(values, kinds):
            if k == "id" and len(v) == 36 and v[8] == "-":
                v = "%08x" % (int(v[:8], 16) ^ x) + v[8:]
            elif k == "identifier" and len(v) == 8:
                try:
                    v = "%08X" % (int(v, 16) ^ x)
                except ValueError:
                    pass
            out_v.append(v)
            out_k.append(k)
        out_p += [f"{p}-{r:04d}" for p in pkeys]
    pq.write_table(pa.table({"value": pa.array(out_v, pa.string()), "kind": pa.array(out_k, pa.string())}),
                   dest / "identifiers.parquet", row_group_size=1_000_000)
    pq.write_table(pa.table({"patient_key": pa.array(out_p, pa.string())}), dest / "patient.parquet")
    write_identifier_index(str(dest / "identifiers.parquet"), Store())
    marker.write_text(str(n))
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ingest-dir", type=Path, required=True)
    ap.add_argument("--file", required=True, help="a file to leak-scan (e.g. a data card)")
    ap.add_argument("--scans", type=int, default=3, help="scans per process (privacy 1 + gate 2 before)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS))
    ap.add_argument("--code", action="append", default=[], metavar="NAME=INCLUDE",
                    help="also run --code-parts with another tree's include/ first on PYTHONPATH (e.g. "
                         "before=/path/to/main/include): the stage before/after in one invocation")
    ap.add_argument("--code-parts", nargs="+", default=["prepare_stage", "leak_after"])
    ap.add_argument("--md", type=Path, help="also write a markdown table")
    ap.add_argument("--replicate", type=int, default=0, metavar="N",
                    help="probe the ingest's identifiers and patient keys replicated N times (leak parts only)")
    ap.add_argument("--replicate-dir", type=Path)
    ap.add_argument("--child")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rdir = args.replicate_dir or ROOT / "bench" / ".cache" / "memory_probe" / f"{args.replicate}x"
    if args.child == "replicate":
        replicate(args.ingest_dir, args.replicate, rdir)
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.ingest_dir, args.file, args.scans)))
        return 0
    if args.replicate > 1:
        # built in its own process: a child's ru_maxrss starts from its parent's high-water mark (fork), so the
        # parent must never hold the replicated list
        subprocess.run([sys.executable, __file__, "--ingest-dir", str(args.ingest_dir), "--file", args.file,
                        "--replicate", str(args.replicate), "--replicate-dir", str(rdir), "--child", "replicate"],
                       check=True)
        args.ingest_dir = rdir
    import pyarrow.parquet as pq

    import os

    res = {}
    runs = [(None, part, None) for part in args.parts]
    for spec in args.code:
        name, _, include = spec.partition("=")
        runs += [(name, part, str(Path(include).resolve())) for part in args.code_parts]
    for name, part, include in runs:
        env = dict(os.environ)
        if include:
            env["PYTHONPATH"] = include + os.pathsep + env.get("PYTHONPATH", "")
        p = subprocess.run([sys.executable, __file__, "--ingest-dir", str(args.ingest_dir), "--file", args.file,
                            "--scans", str(args.scans), "--child", part], capture_output=True, text=True, env=env)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        key = f"{name}:{part}" if name else part
        res[key] = json.loads(p.stdout.strip().splitlines()[-1])
        res[key]["code"] = include or "this tree"
        print(json.dumps({"key": key, **{k: v for k, v in res[key].items() if k != "result"}}), flush=True)
    checks = {}
    for part in ("prepare_stage", "leak_after"):  # the same figures from every code tree
        got = [r.get("table_sha256", json.dumps(r.get("result"), sort_keys=True, default=str))
               for k, r in res.items() if k.split(":")[-1] == part]
        if len(got) > 1:
            checks[f"{part}_equal_across_code"] = len(set(got)) == 1
    if "prepare_before" in res and "prepare_after" in res:
        checks["modelling_table_equal"] = res["prepare_before"]["table_sha256"] == res["prepare_after"]["table_sha256"]
    if "prepare_stream" in res:
        anchor = res.get("prepare_before", res.get("prepare_after"))
        if anchor:
            checks["modelling_table_equal_stream"] = anchor["table_sha256"] == res["prepare_stream"]["table_sha256"]
    if "leak_before" in res and "leak_after" in res:
        checks["leak_result_equal"] = res["leak_before"]["result"] == res["leak_after"]["result"]
    for r in res.values():
        r.pop("result", None)
    result = {"bench": "memory_probe", "machine": machine_info(), "ingest_dir": str(args.ingest_dir),
              "patients": pq.ParquetFile(args.ingest_dir / "patient.parquet").metadata.num_rows,
              "identifiers": pq.ParquetFile(args.ingest_dir / "identifiers.parquet").metadata.num_rows,
              "scans": args.scans, "parts": res, "checks": checks}
    print(json.dumps(checks))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    if args.md:
        lines = [f"# memory_probe: {result['patients']:,} patients, {result['identifiers']:,} identifiers", "",
                 "Each part in its own fresh process; peak RSS is the process's whole ru_maxrss (interpreter and "
                 "imports included, ~250-300 MiB); CPU = user + system seconds (robust under load).", "",
                 "| part | code | peak RSS (MiB) | CPU s | wall s |", "|---|---|---|---|---|"]
        for key, r in res.items():
            lines.append(f"| {key} | {r['code']} | {r['peak_rss_mib']:g} | {r['cpu_s']:g} | {r['seconds']:g} |")
        lines += ["", "Checks: " + ", ".join(f"{k} = {v}" for k, v in checks.items()), "",
                  f"Machine: {json.dumps(result['machine'])}", ""]
        args.md.write_text("\n".join(lines))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
