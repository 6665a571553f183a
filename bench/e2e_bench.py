"""End to end: the whole DAG under Airflow (`airflow dags test`, SQLite, S3 emulator) against the same
library functions without Airflow (`synthfactory run SPEC --extract DIR --out DIR`) -> orchestration overhead.

Input: a clinosim FHIR R4 cohort (US, population 1700, seed 7, snapshot 2025-12-31; about 4 minutes to
generate, so it is cached under bench/.cache/ and reused), cut to the first N patients (in Patient.ndjson
order) with every resource that references them, for each size N. ``--smoke`` uses a tiny carebundle
extract instead (no clinosim run).

Per size, both runs start cold in their own process and their own staging folder (no ingest reuse):

* wall time of the subprocess (``airflow dags test ...`` / ``synthfactory run ...``);
* peak RSS of its process tree, sampled with psutil every 0.2 s;
* the sum of the stages' own ``seconds`` (parsed from the ``stage=... done ... seconds=`` log lines):
  wall minus that sum is the time spent outside the stages (interpreter start, imports, DAG parsing,
  task scheduling, XCom, logging).

Airflow's metadata DB migration is a one-off setup step and is timed separately, never inside the run.

    .venv/bin/python bench/e2e_bench.py --sizes 250 500 1000 --out bench/results/e2e.json
    .venv/bin/python bench/e2e_bench.py --smoke --out /tmp/e2e_smoke.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RssSampler, ROOT, emit, resolve_sizes, standard_args  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
CLINOSIM_ARGS = ["--country", "US", "--population", "1700", "--seed", "7", "--end", "2025-12-31",
                 "--format", "fhir-r4"]
CLINOSIM_DIR = CACHE / "clinosim_us_p1700_s7"
SMOKE_PATIENTS = 60
STAGES = ("ingest", "prepare", "fit", "sample", "quality", "privacy", "gate", "release")
STAGE_DONE = re.compile(r"stage=(\w+) dataset=\S+ run=\S+ (?:done|failed) .*?\bseconds=([0-9.]+)")
EXIT_GATE = 4  # synthfactory run: a gate refused (every stage up to the gate ran)
BUCKET = "synthetic-sandbox"
RESOURCES = ("Patient", "Encounter", "Condition", "Observation")


# --------------------------------------------------------------------------------------------------
# Input cohorts
# --------------------------------------------------------------------------------------------------
def find_ndjson_folder(root: Path) -> Path | None:
    """The folder under ``root`` that holds ``Patient*.ndjson[.gz]`` (clinosim nests its FHIR output)."""
    hits = sorted(p.parent for p in root.rglob("Patient*.ndjson*"))
    return hits[0] if hits else None


def clinosim_cohort(log=print) -> Path:  # noqa: ANN001
    """The cached clinosim cohort's NDJSON folder; generated once (about 4 minutes) when missing."""
    done = CLINOSIM_DIR / ".complete"
    if not done.exists():
        partial = CLINOSIM_DIR.with_name(CLINOSIM_DIR.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        from synthfactory.testing.dev import venv_bin

        cmd = [venv_bin("clinosim"), "simulate", *CLINOSIM_ARGS, "--output", str(partial)]
        log(f"generating the clinosim cohort (once, ~4 min): {' '.join(cmd)}")
        with open(CACHE / "clinosim_gen.log", "w") as fh:
            subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
        shutil.rmtree(CLINOSIM_DIR, ignore_errors=True)
        partial.rename(CLINOSIM_DIR)
        done.write_text(" ".join(CLINOSIM_ARGS) + "\n")
    folder = find_ndjson_folder(CLINOSIM_DIR)
    if folder is None:
        raise SystemExit(f"no Patient*.ndjson under {CLINOSIM_DIR}: clinosim wrote another layout")
    return folder


_REF = re.compile(rb'"reference"\s*:\s*"(?:[^"]*/)?(?:urn:uuid:)?([^"/]+)"')


def _patient_refs(line: bytes) -> set[bytes]:
    """Every referenced id in a resource line (a superset of its patient references: cheap and sufficient,
    since the caller intersects it with the patient ids)."""
    return set(_REF.findall(line))


def subset_extract(src: Path, n: int, dest: Path) -> tuple[Path, int]:
    """The first ``n`` patients of ``src``, every resource that references one of them and every resource
    that references no patient, as ``<Type>.ndjson`` files in ``dest`` (built once per size, then reused)."""
    import orjson

    marker = dest.with_name(dest.name + ".complete")
    if marker.exists():
        return dest, int(marker.read_text())
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    files = sorted(p for p in src.iterdir() if p.is_file() and ".ndjson" in p.name)
    pfiles = [p for p in files if p.name.startswith("Patient")]
    keep: set[bytes] = set()
    every: set[bytes] = set()
    with open(dest / "Patient.ndjson", "wb") as out:
        for pf in pfiles:
            for line in _lines(pf):
                pid = orjson.loads(line)["id"].encode()
                every.add(pid)
                if len(keep) < n:
                    keep.add(pid)
                    out.write(line.rstrip(b"\n") + b"\n")
    for f in files:
        if f in pfiles:
            continue
        rtype = re.split(r"[.\-_]", f.name, maxsplit=1)[0]
        with open(dest / f"{rtype}.ndjson", "ab") as out:
            for line in _lines(f):
                refs = _patient_refs(line) & every
                if not refs or refs & keep:  # shared resources (Practitioner, Location, ...) stay
                    out.write(line.rstrip(b"\n") + b"\n")
    marker.write_text(str(len(keep)))
    return dest, len(keep)


def _lines(path: Path):  # noqa: ANN202
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        for line in fh:
            if line.strip():
                yield line


def count_patients(folder: Path) -> int:
    return sum(1 for p in folder.glob("Patient*.ndjson*") for _ in _lines(p))


def smoke_extract() -> Path:
    from synthfactory.testing.dev import generate_sample_extract

    return generate_sample_extract(CACHE / f"carebundle_p{SMOKE_PATIENTS}_s7", patients=SMOKE_PATIENTS, seed=7)


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------
def write_spec(folder: Path, name: str, extract: Path, staging: Path, min_patients: int) -> Path:
    import yaml

    data = yaml.safe_load((ROOT / "include/datasets/cohort_demo.yaml").read_text())
    data.update(name=name, schedule=None)
    data["source"]["uri"] = str(extract)
    data["staging"]["uri"] = str(staging)
    data["features"]["min_patients"] = min_patients
    data.setdefault("operations", {})["retries"] = 0  # a failure is a bench failure, never a silent retry
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def stage_seconds(log_text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for stage, secs in STAGE_DONE.findall(log_text):
        out[stage] = out.get(stage, 0.0) + float(secs)
    return out


def sampled(fn) -> dict[str, Any]:  # noqa: ANN001
    """Run ``fn`` (which starts one subprocess and waits) in a thread; sample this process's children."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised below
            box["error"] = err

    t0 = time.perf_counter()
    with RssSampler(pid=None, interval=0.2) as rss:
        th = threading.Thread(target=target, daemon=True)
        th.start()
        th.join()
    wall = time.perf_counter() - t0
    if "error" in box:
        raise box["error"]
    return {"value": box.get("value"), "seconds": wall, "peak_rss_mib": rss.peak_mib, "samples": rss.samples}


def run_airflow(spec_dir: Path, dag_id: str, env: dict[str, str], log_path: Path, client: Any,
                dataset: str) -> dict[str, Any]:
    from synthfactory.testing import dev

    m = sampled(lambda: dev.dags_test(dag_id, env, log_path=log_path))
    text = log_path.read_text(errors="replace")
    versions = dev.list_versions(client, BUCKET, f"releases/{dataset}")
    rc = m["value"].returncode
    if rc == 0 and versions:
        outcome = "released"
    elif "GateRefused" in text and not versions:
        outcome = "gate refused"
    else:
        outcome = "failed"
    return _run_record(outcome, rc, m, text, log_path, gate_message=_gate_message(text),
                       released_versions=len(versions))


def run_library(spec: Path, extract: Path, out: Path, env: dict[str, str], log_path: Path) -> dict[str, Any]:
    from synthfactory.testing.dev import venv_bin

    cmd = [venv_bin("synthfactory"), "run", str(spec), "--extract", str(extract), "--out", str(out),
           "--run-id", "bench_library"]

    def go() -> subprocess.CompletedProcess:
        with open(log_path, "w") as fh:
            return subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)

    m = sampled(go)
    text = log_path.read_text(errors="replace")
    rc = m["value"].returncode
    if rc == 0 and any((out / "release").rglob("manifest.json")):
        outcome = "released"
    elif rc == EXIT_GATE:
        outcome = "gate refused"
    else:
        outcome = "failed"
    return _run_record(outcome, rc, m, text, log_path, gate_message=_gate_message(text))


def _run_record(outcome: str, rc: int, m: dict, text: str, log_path: Path, **extra: Any) -> dict[str, Any]:
    """A run counts when it released, or when a gate refused: then every stage but the release ran."""
    ok = outcome != "failed"
    return {"ok": ok, "outcome": outcome, "returncode": rc, "seconds": m["seconds"], "peak_rss_mib": m["peak_rss_mib"],
            "samples": m["samples"], "stage_seconds": stage_seconds(text), "log": str(log_path),
            "error": None if ok else _tail(text), **extra}


_GATE_MSG = re.compile(r"GateRefused: \S+: (.*)$|gate refused: \S+: (.*)$", re.M)


def _gate_message(text: str) -> str | None:
    """The gate's own refusal message (gate names, figures and thresholds only: no patient values)."""
    hit = _GATE_MSG.search(text)
    return (hit.group(1) or hit.group(2)).strip() if hit else None


def _tail(text: str, n: int = 15) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _stop_children() -> None:
    """Terminate what this bench started and is still running (after an interrupt or a harness timeout)."""
    import psutil

    kids = psutil.Process().children(recursive=True)
    for k in kids:
        try:
            k.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(kids, timeout=10)
    for k in alive:
        try:
            k.kill()
        except psutil.Error:
            pass


def main() -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in main()'s finally
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, default_sizes=[250, 500, 1000], smoke_sizes=[SMOKE_PATIENTS])
    ap.add_argument("--cohort", help="a FHIR NDJSON folder to cut the sizes from (default: the cached clinosim "
                                     "cohort, generated when missing)")
    ap.add_argument("--skip-airflow", action="store_true", help="only the library run (debugging)")
    ap.add_argument("--keep", help="keep the runs' staging, logs and Airflow home in this folder")
    args = ap.parse_args()
    sizes = resolve_sizes(args)
    repeat = max(1, args.repeat or 1)

    import logging

    from synthfactory.testing import dev

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server: no line per request
    notes: list[str] = []
    if args.cohort:
        source = Path(args.cohort).resolve()
        source = find_ndjson_folder(source) or source
        source_desc = f"FHIR NDJSON folder {source}"
    elif args.smoke and not args.sizes:
        source = smoke_extract()
        source_desc = f"carebundle sample extract, {SMOKE_PATIENTS} patients, seed 7 (smoke)"
    else:
        source = clinosim_cohort(log=lambda s: print(s, file=sys.stderr))
        source_desc = f"clinosim simulate {' '.join(CLINOSIM_ARGS)} ({count_patients(source)} patients)"
    available = count_patients(source)
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="sf-bench-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    runs: list[dict] = []
    setup: dict[str, float] = {}
    errors: list[str] = []
    try:
        with dev.S3Emulator() as s3:
            client = s3.client()
            client.create_bucket(Bucket=BUCKET)
            af_home = work / "airflow"
            env = dev.airflow_env(ROOT, af_home, s3.endpoint)
            env["SYNTHFACTORY_PROGRESS_SECONDS"] = "0"
            if not args.skip_airflow:
                t0 = time.perf_counter()
                dev.ensure_airflow_db(env)
                setup["airflow_db_migrate_seconds"] = round(time.perf_counter() - t0, 2)
            for size in sizes:
                n = min(size, available)
                if n < size:
                    notes.append(f"size {size} capped at the {available} patients of the input")
                if n == available:
                    extract = source
                else:
                    extract, n = subset_extract(source, n, CACHE / "subsets" / f"{_slug(source)}_n{n}")
                for rep in range(repeat):
                    name = f"bench_e2e_n{n}_r{rep}"
                    specs = work / f"specs_{name}"
                    spec = write_spec(specs, name, extract, work / f"staging_airflow_{name}",
                                      min_patients=min(50, max(10, n // 4)))
                    run_env = {**env, "SYNTHFACTORY_SPECS_DIR": str(specs)}
                    lib = run_library(spec, extract, work / f"library_{name}", run_env, work / f"{name}.library.log")
                    af = None
                    if not args.skip_airflow:
                        af = run_airflow(specs, f"synthfactory_{name}", run_env, work / f"{name}.airflow.log",
                                         client, name)
                    runs.append({"size": n, "repeat": rep, "library": lib, "airflow": af})
                    for label, r in (("library", lib), ("airflow", af)):
                        if r and not r["ok"]:
                            errors.append(f"{label} run at {n} patients failed (exit {r['returncode']}):\n"
                                          f"{r['error']}")
                            print(errors[-1], file=sys.stderr)
                        elif r and r["outcome"] == "gate refused":
                            print(f"{label} run at {n} patients: the gate refused: {r['gate_message']}",
                                  file=sys.stderr)
            for n in sorted({r["size"] for r in runs}):
                results.extend(_figures([r for r in runs if r["size"] == n], n))
            notes.extend(_gate_notes(runs))
    finally:
        _stop_children()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    emit("e2e", results, args.out, smoke=args.smoke,
         params={"sizes": sizes, "repeat": repeat, "input": source_desc, "available_patients": available,
                 "synthesizer": "gaussian_copula (spec default)", "rows": "as many as real train rows",
                 **setup},
         notes=[*notes, *errors,
                "ours = the DAG under Airflow (`airflow dags test`, SQLite metadata DB, LocalExecutor settings, "
                "release to moto's S3 server over loopback HTTP); anchor = `synthfactory run` (the same library "
                "functions in one process, release to a local folder). Each number is the best of the repeats."],
         machine=None)
    # keep the per-run details next to the figures
    if args.out:
        data = json.loads(Path(args.out).read_text())
        data["runs"] = runs
        from common import write_json

        write_json(args.out, data)
    return 1 if errors and not results else 0


def _gate_notes(runs: list[dict]) -> list[str]:
    """One line per size and gate message (the runs of a size normally agree)."""
    seen: dict[tuple[int, str], list[str]] = {}
    for r in runs:
        for label in ("library", "airflow"):
            x = r.get(label)
            if x and x.get("outcome") == "gate refused":
                who = seen.setdefault((r["size"], x.get("gate_message") or "?"), [])
                if label not in who:
                    who.append(label)
    return [f"at {n} patients the gate refused ({' and '.join(who)} run{'s' if len(who) > 1 else ''}; every stage "
            f"up to the gate ran, the release did not, on both sides alike): {msg}"
            for (n, msg), who in seen.items()]


def _slug(p: Path) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name).strip("_")


def _figures(runs: list[dict], n: int) -> list[dict]:
    from common import result

    # Compare like with like: both sides released, or the gate refused on both (then neither ran the release).
    ok = [r for r in runs if r["library"]["ok"] and r["airflow"] and r["airflow"]["ok"]
          and r["library"]["outcome"] == r["airflow"]["outcome"]]
    lib_ok = [r for r in runs if r["library"]["ok"]]
    out = []
    outcome = ok[0]["library"]["outcome"] if ok else None
    unit_size = {"size_unit": "patients", "ours_name": "Airflow DAG (airflow dags test)", "outcome": outcome}
    lib = "synthfactory run (no Airflow)"
    if ok:
        best_af = min(ok, key=lambda r: r["airflow"]["seconds"])["airflow"]
        best_lib = min(ok, key=lambda r: r["library"]["seconds"])["library"]
        af_stage = sum(best_af["stage_seconds"].values())
        lib_stage = sum(best_lib["stage_seconds"].values())
        out.append(result("end-to-end wall time, Airflow DAG", n, best_af["seconds"], lib,
                          best_lib["seconds"], "s", "lower", stage_seconds_ours=best_af["stage_seconds"],
                          stage_seconds_anchor=best_lib["stage_seconds"], **unit_size))
        out.append(result("end-to-end peak RSS (process tree), Airflow DAG", n,
                          max(r["airflow"]["peak_rss_mib"] for r in ok), lib,
                          max(r["library"]["peak_rss_mib"] for r in ok), "MiB", "lower", **unit_size))
        out.append(result("time outside the stages (wall − Σ stage s), Airflow DAG", n,
                          best_af["seconds"] - af_stage, lib, best_lib["seconds"] - lib_stage, "s", "lower",
                          **unit_size))
        out.append(result("Σ stage seconds, Airflow DAG", n, af_stage, lib, lib_stage, "s", "lower", **unit_size))
    elif lib_ok:
        best_lib = min(lib_ok, key=lambda r: r["library"]["seconds"])["library"]
        out.append(result("end-to-end wall time, Airflow DAG", n, None, lib, best_lib["seconds"],
                          "s", "lower", error="the Airflow run failed, was skipped or ended differently",
                          **unit_size))
    return out


if __name__ == "__main__":
    sys.exit(main())
