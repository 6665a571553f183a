"""Scaling: `synthfactory run` on the demo spec at 1k -> 20k -> 200k patients (2M once, where a machine allows),
per-stage seconds and peak RSS, growth exponents, a plot, beside the issue-22 "before" figures.

Input (the issue's method): one carebundle extract (default 20,000 patients, seed 42, built once with
``carebundle generate`` and cached under bench/.cache/), cut to the first N patients when N is smaller, and
*replicated with fresh ids* when N is larger: replica r rewrites every resource id, every reference and every
patient MRN (the first 8 hex digits of the patient id, upper-cased) by XOR-ing the first 8 hex digits with a
per-replica constant, so replicas are distinct patients with the same clinical content. Replicas are written by
worker processes (``--jobs``), plain NDJSON or gzip (``--gzip``: about 8x less disk; the 2M extract is ~110 GB
plain, ~14 GB gzipped). Built extracts are cached per size and reused.

Per size and per code tree (``--code`` NAME=INCLUDE_DIR, repeatable; default: this tree), one cold
``synthfactory run SPEC --extract DIR --out DIR`` in its own process and staging folder:

* wall time of the subprocess; the stages' own seconds (the ``stage=... done ... seconds=`` log lines);
* peak RSS of its process tree sampled with psutil every 0.2 s, overall and per stage (each sample is charged
  to the stage whose ``start`` line came last).

The result JSON holds every run; the markdown table puts the issue's before figures (1k / 20k / 200k, 2 cores)
first as the anchor, then each code tree's rows measured in this one invocation, then the growth exponents
(log-log slope of seconds and peak RSS against patients between consecutive sizes). ``--plot`` draws stage
seconds and peak RSS against patients (log-log).

    .venv/bin/python bench/scale_bench.py --sizes 1000 20000 --code before=/path/to/old/include \\
        --code after=include --out bench/results/scale.json --plot bench/results/scale.png
    .venv/bin/python bench/scale_bench.py --sizes 2000000 --gzip --jobs 8      # needs ~14 GB disk, hours
    .venv/bin/python bench/scale_bench.py --smoke                             # 60 -> 120 patients, checks it runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RssSampler, ROOT, machine_info  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "scale"
STAGES = ("ingest", "prepare", "fit", "sample", "quality", "privacy", "gate", "release")
STAGE_START = re.compile(r"stage=(\w+) dataset=\S+ run=\S+ start")
STAGE_DONE = re.compile(r"stage=(\w+) dataset=\S+ run=\S+ (?:done|failed) .*?\bseconds=([0-9.]+)")
EXIT_GATE = 4
#: the issue's "before" figures (synthfactory run, demo spec, carebundle replicated, 2 cores): the anchor
ISSUE_BEFORE = {
    1000: {"ingest": 0.4, "prepare": 0.1, "fit": 2.5, "quality": 3.4, "privacy": 0.9, "gate": 1.7, "wall": 11,
           "peak_rss_gib": 0.8},
    20000: {"ingest": 3.7, "prepare": 0.7, "fit": 2.7, "quality": 3.5, "privacy": 9.5, "gate": 16.0, "wall": 39,
            "peak_rss_gib": 2.2},
    200000: {"ingest": 38.9, "prepare": 18.3, "fit": 13.2, "quality": 9.1, "privacy": 131.6, "gate": 170.0,
             "wall": 387, "peak_rss_gib": 14.3},
}
_UUID = re.compile(rb'(?<!urn:uuid:)\b([0-9a-f]{8})(-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b')
_MRN = re.compile(rb'("value":")([0-9A-F]{8})(")')
_REF = re.compile(rb'"reference"\s*:\s*"(?:[^"]*/)?(?:urn:uuid:)?([^"/]+)"')


# --------------------------------------------------------------------------------------------------
# Extracts
# --------------------------------------------------------------------------------------------------
def base_extract(patients: int, seed: int) -> Path:
    from synthfactory.testing.dev import generate_sample_extract

    return generate_sample_extract(CACHE / f"carebundle_p{patients}_s{seed}", patients=patients, seed=seed)


def _xor(r: int) -> int:
    return (r * 0x9E3779B1) & 0xFFFFFFFF


def _rewrite_file(src: str, dest: str, r: int, keep: frozenset[bytes] | None, every: frozenset[bytes] | None,
                  gz: bool) -> int:
    """Copy one NDJSON file as replica ``r`` (r = 0: unchanged ids), keeping only resources of ``keep`` patients
    (and resources that reference no patient) when ``keep`` is given."""
    import gzip

    x = _xor(r)
    sub_uuid = (lambda m: b"%08x" % (int(m.group(1), 16) ^ x) + m.group(2))
    sub_mrn = (lambda m: m.group(1) + b"%08X" % (int(m.group(2), 16) ^ x) + m.group(3))
    opener = gzip.open if src.endswith(".gz") else open
    n = 0
    out = gzip.open(dest, "wb", compresslevel=1) if gz else open(dest, "wb")
    with opener(src, "rb") as fh, out:
        for line in fh:
            if not line.strip():
                continue
            if keep is not None:
                if b'"resourceType":"Patient"' in line:
                    m = re.search(rb'"id":"([^"]+)"', line)
                    if not m or m.group(1) not in keep:
                        continue
                else:
                    refs = set(_REF.findall(line)) & every
                    if refs and not refs & keep:
                        continue
            if r:
                line = _MRN.sub(sub_mrn, _UUID.sub(sub_uuid, line))
            out.write(line.rstrip(b"\n") + b"\n")
            n += 1
    return n


def _patient_ids(folder: Path) -> list[bytes]:
    import gzip

    ids = []
    for p in sorted(folder.glob("Patient*.ndjson*")):
        with (gzip.open if p.name.endswith(".gz") else open)(p, "rb") as fh:
            for line in fh:
                m = re.search(rb'"id":"([^"]+)"', line)
                if m:
                    ids.append(m.group(1))
    return ids


def build_extract(base: Path, n: int, *, gz: bool = False, jobs: int = 2) -> Path:
    """``n`` patients from ``base``: its first n when smaller, else whole replicas with fresh ids plus the first
    patients of one more replica. Cached (a ``.complete`` marker holds the patient count)."""
    dest = CACHE / f"{base.name}_n{n}{'_gz' if gz else ''}"
    marker = dest.with_name(dest.name + ".complete")
    if marker.exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    ids = _patient_ids(base)
    every = frozenset(ids)
    full, rest = divmod(n, len(ids))
    files = sorted(p for p in base.iterdir() if p.is_file() and ".ndjson" in p.name)
    ext = ".ndjson.gz" if gz else ".ndjson"
    tasks = []
    for r in range(full + (1 if rest else 0)):
        keep = frozenset(ids[:rest]) if r == full else None
        for f in files:
            rtype = re.split(r"[.\-_]", f.name, maxsplit=1)[0]
            tasks.append((str(f), str(dest / f"{rtype}-r{r:04d}{ext}"), r, keep, every if keep else None, gz))
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(_rewrite_file, *zip(*tasks)))
    marker.write_text(str(n))
    return dest


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------
def write_spec(folder: Path, name: str, extract: Path, staging: Path, include: Path | None = None) -> Path:
    """The demo spec of the code tree being measured (an older tree refuses a newer spec's fields)."""
    import yaml

    template = include / "datasets" / "cohort_demo.yaml" if include is not None else None
    if template is None or not template.is_file():
        template = ROOT / "include/datasets/cohort_demo.yaml"
    data = yaml.safe_load(template.read_text())
    data.update(name=name, schedule=None)
    data["source"]["uri"] = str(extract)
    data["staging"]["uri"] = str(staging)
    data.setdefault("operations", {})["retries"] = 0
    data["operations"]["reuse_ingest"] = False
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_once(code: str, include: Path, extract: Path, n: int, work: Path, timeout: float) -> dict[str, Any]:
    """One cold ``synthfactory run`` with ``include`` first on PYTHONPATH; per-stage seconds and peak RSS."""
    from synthfactory.testing.dev import venv_bin

    run_dir = work / f"{code}_n{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = write_spec(run_dir, "scale_bench", extract, run_dir / "staging", include)
    env = {**os.environ, "PYTHONPATH": str(include)}
    cmd = [venv_bin("synthfactory"), "run", str(spec), "--extract", str(extract), "--out", str(run_dir / "out"),
           "--run-id", f"scale_{code}_{n}"]
    log_path = run_dir / "run.log"
    stage = {"name": "startup"}
    per_stage: dict[str, int] = {}
    cpu_stage: dict[str, float] = {}
    t0 = time.perf_counter()
    with open(log_path, "w") as log_fh:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = RssSampler(pid=proc.pid, interval=0.2)

        def tree_cpu() -> float:
            total = 0.0
            for p in sampler._tree():
                try:
                    t = p.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
                except Exception:  # noqa: BLE001 - a child that just ended
                    pass
            return total

        def sample_loop() -> None:  # CPU seconds per stage: robust where other jobs share the cores
            last_cpu, last_name = 0.0, stage["name"]
            while proc.poll() is None:
                rss = sampler.sample()
                name = stage["name"]
                per_stage[name] = max(per_stage.get(name, 0), rss)
                cpu = tree_cpu()
                if cpu:
                    cpu_stage[last_name] = cpu_stage.get(last_name, 0.0) + max(0.0, cpu - last_cpu)
                    last_cpu, last_name = cpu, name
                time.sleep(0.2)

        th = threading.Thread(target=sample_loop, daemon=True)
        th.start()
        deadline = t0 + timeout
        for line in proc.stdout:  # type: ignore[union-attr]
            log_fh.write(line)
            m = STAGE_START.search(line)
            if m:
                stage["name"] = m.group(1)
            if time.perf_counter() > deadline:
                proc.kill()
                break
        rc = proc.wait()
        th.join(timeout=2)
    wall = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    seconds: dict[str, float] = {}
    for name, secs in STAGE_DONE.findall(text):
        seconds[name] = seconds.get(name, 0.0) + float(secs)
    outcome = "released" if rc == 0 else ("gate refused" if rc == EXIT_GATE else f"failed rc={rc}")
    gib = 1024 ** 3
    return {"code": code, "patients": n, "outcome": outcome, "rc": rc, "wall_s": round(wall, 1),
            "stage_s": {k: round(v, 2) for k, v in seconds.items()},
            "stage_cpu_s": {k: round(v, 1) for k, v in cpu_stage.items()},
            "peak_rss_gib": round(sampler.peak_bytes / gib, 2),
            "stage_peak_rss_gib": {k: round(v / gib, 2) for k, v in per_stage.items()},
            "log": str(log_path), "tail": text.splitlines()[-5:] if rc not in (0, EXIT_GATE) else []}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def exponents(rows: list[dict]) -> list[dict]:
    """log-log slopes between consecutive sizes of one code tree (1 = linear)."""
    out = []
    rows = sorted(rows, key=lambda r: r["patients"])
    for a, b in zip(rows, rows[1:]):
        k = math.log(b["patients"] / a["patients"])

        def slope(x: float | None, y: float | None) -> float | None:
            return round(math.log(y / x) / k, 2) if x and y and x > 0 and y > 0 else None

        e = {"code": a["code"], "from": a["patients"], "to": b["patients"], "wall": slope(a["wall_s"], b["wall_s"]),
             "peak_rss": slope(a["peak_rss_gib"], b["peak_rss_gib"])}
        for s in ("ingest", "prepare", "fit", "quality", "privacy", "gate"):
            e[s] = slope(a["stage_s"].get(s), b["stage_s"].get(s))
        out.append(e)
    return out


def markdown(result: dict) -> str:
    cols = ("ingest", "prepare", "fit", "quality", "privacy", "gate")
    lines = ["| code | patients | " + " | ".join(cols) + " | wall | peak RSS | peak RSS by stage (GiB) | outcome |",
             "|---" * (len(cols) + 6) + "|"]
    for n, f in sorted(ISSUE_BEFORE.items()):
        lines.append(f"| issue 22 before (anchor) | {n:,} | " + " | ".join(f"{f[c]:g}" for c in cols)
                     + f" | {f['wall']:g} | {f['peak_rss_gib']:g} GB | | |")
    for r in result["runs"]:
        st = r["stage_s"]
        by = ", ".join(f"{k} {v:g}" for k, v in r["stage_peak_rss_gib"].items() if k in STAGES)
        lines.append(f"| {r['code']} | {r['patients']:,} | " + " | ".join(
            f"{st[c]:g}" if c in st else "–" for c in cols)
            + f" | {r['wall_s']:g} | {r['peak_rss_gib']:g} GiB | {by} | {r['outcome']} |")
    if any(r.get("stage_cpu_s") for r in result["runs"]):
        lines += ["", "CPU seconds of the process tree by stage (robust where other jobs share the cores):", "",
                  "| code | patients | " + " | ".join(cols) + " | total |", "|---" * (len(cols) + 3) + "|"]
        for r in result["runs"]:
            c = r.get("stage_cpu_s") or {}
            lines.append(f"| {r['code']} | {r['patients']:,} | " + " | ".join(
                f"{c[k]:g}" if k in c else "–" for k in cols) + f" | {sum(c.values()):.1f} |")
    lines += ["", "Growth exponents (log-log slope between consecutive sizes; 1 = linear):", "",
              "| code | sizes | " + " | ".join(cols) + " | wall | peak RSS |", "|---" * (len(cols) + 4) + "|"]
    for e in result["exponents"]:
        lines.append(f"| {e['code']} | {e['from']:,} → {e['to']:,} | "
                     + " | ".join("–" if e[c] is None else f"{e[c]:g}" for c in cols)
                     + f" | {e['wall']} | {e['peak_rss']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    anchor = sorted(ISSUE_BEFORE.items())
    # CPU seconds where recorded: comparable with the anchor (measured idle) even on a shared machine
    key = "stage_cpu_s" if all(r.get("stage_cpu_s") for r in result["runs"]) else "stage_s"
    for s, c in zip(("privacy", "gate", "ingest", "prepare"), ("C0", "C1", "C2", "C3")):
        ax1.plot([n for n, _ in anchor], [f[s] for _, f in anchor], ls=":", marker="x", color=c,
                 label=f"{s} (issue before)")
        for code, ls in zip(sorted({r["code"] for r in result["runs"]}), ("-", "--", "-.")):
            rows = sorted((r for r in result["runs"] if r["code"] == code and s in r[key]),
                          key=lambda r: r["patients"])
            if rows:
                ax1.plot([r["patients"] for r in rows], [r[key][s] for r in rows], ls=ls, marker="o",
                         color=c, label=f"{s} ({code})")
    ax1.set(xscale="log", yscale="log", xlabel="patients",
            ylabel="stage seconds (anchor: wall; runs: " + ("CPU)" if key == "stage_cpu_s" else "wall)"),
            title="Stage time")
    ax1.legend(fontsize=7)
    ax2.plot([n for n, _ in anchor], [f["peak_rss_gib"] for _, f in anchor], ls=":", marker="x", color="k",
             label="issue before")
    for code, c in zip(sorted({r["code"] for r in result["runs"]}), ("C4", "C5", "C6")):
        rows = sorted((r for r in result["runs"] if r["code"] == code), key=lambda r: r["patients"])
        ax2.plot([r["patients"] for r in rows], [r["peak_rss_gib"] for r in rows], marker="o", color=c, label=code)
    ax2.axhline(4, color="grey", lw=0.8, ls="--")
    ax2.set(xscale="log", yscale="log", xlabel="patients", ylabel="peak RSS (GiB)", title="Peak RSS (process tree)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def combine(paths: list[Path], args: argparse.Namespace) -> int:
    """One result from several invocations (e.g. a size that needs the machine to itself run apart): runs
    ordered by size, exponents per code tree over all of them."""
    parts = [json.loads(p.read_text()) for p in paths]
    bases = {p["base_extract"] for p in parts}
    if len(bases) != 1:
        raise SystemExit(f"--combine: the results start from different base extracts: {sorted(bases)}")
    result = {**parts[0], "combined_from": [str(p) for p in paths],
              "runs": sorted((r for p in parts for r in p["runs"]), key=lambda r: (r["patients"], r["code"]))}
    codes = list(dict.fromkeys(r["code"] for r in result["runs"]))
    result["exponents"] = [e for code in codes
                           for e in exponents([r for r in result["runs"] if r["code"] == code])]
    md = markdown(result)
    print(md)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(md)
    if args.plot:
        plot(result, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=lambda s: int(float(s)), default=[1000, 20000])
    ap.add_argument("--base-patients", type=int, default=20000)
    ap.add_argument("--base-extract", type=Path, help="a carebundle NDJSON folder to start from (else generated)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--code", action="append", default=[], metavar="NAME=INCLUDE",
                    help="a code tree to run (its include/ folder); repeatable; default: this tree")
    ap.add_argument("--gzip", action="store_true", help="write replicated extracts gzip-compressed")
    ap.add_argument("--jobs", type=int, default=2, help="processes writing replicas")
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument("--keep-extracts", action="store_true", help="keep built extracts larger than the base")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--smoke", action="store_true", help="a 60-patient base, 60 and 120 patients")
    ap.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                    help="no runs: the runs of earlier result files (same base extract) in one table and plot")
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args.combine, args)
    if args.smoke:
        args.base_patients, args.sizes = 60, [60, 120]
    codes = [c.split("=", 1) for c in args.code] or [["after", str(ROOT / "include")]]
    base = args.base_extract or base_extract(args.base_patients, args.seed)
    work = CACHE / "runs"
    result: dict[str, Any] = {"bench": "scale", "machine": machine_info(), "base_extract": str(base),
                              "base_patients": len(_patient_ids(base)), "anchor": ISSUE_BEFORE, "runs": []}
    for n in args.sizes:
        t = time.perf_counter()
        extract = base if n == result["base_patients"] else build_extract(base, n, gz=args.gzip, jobs=args.jobs)
        print(f"[scale] {n:,} patients: extract {extract} ({time.perf_counter() - t:.0f} s)", flush=True)
        for code, include in codes:
            r = run_once(code, Path(include).resolve(), extract, n, work, args.timeout)
            result["runs"].append(r)
            print(f"[scale] {code} {n:,}: {r['outcome']} wall {r['wall_s']} s, peak {r['peak_rss_gib']} GiB, "
                  f"stages {r['stage_s']}, stage peaks {r['stage_peak_rss_gib']}", flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
        if extract != base and n > result["base_patients"] and not args.keep_extracts:
            shutil.rmtree(extract, ignore_errors=True)
            extract.with_name(extract.name + ".complete").unlink(missing_ok=True)
    result["exponents"] = [e for code, _ in codes
                           for e in exponents([r for r in result["runs"] if r["code"] == code])]
    md = markdown(result)
    print(md)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(md)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
