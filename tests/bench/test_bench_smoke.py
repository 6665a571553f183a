"""The benchmark harness runs, tolerates missing/failing benches and writes its JSON, table and plot.

No timing assertions here: speed figures live in bench/results, never in tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run as harness  # noqa: E402


def test_result_ratio_and_advantage():
    fast = common.result("ingest throughput", 1000, 200.0, "fhiry", 50.0, "resources/s")
    assert fast["better"] == "higher" and fast["ratio"] == 4.0 and fast["advantage"] == 4.0
    slow = common.result("fit time", 1000, 3.0, "SDV", 2.0, "s")
    assert slow["better"] == "lower" and slow["ratio"] == 1.5 and slow["advantage"] == pytest.approx(0.6667)
    assert common.result("x", 1, 1.0, "a", 0.0, "s")["ratio"] is None
    assert common.result("x", 1, None, "a", 2.0, "s")["ratio"] is None


def test_normalize_accepts_variations():
    data = {"name": "ingest", "figures": [
        {"metric": "parse", "n": 100, "value": 10.0, "baseline": 5.0, "baseline_name": "orjson", "unit": "s"},
        {"figure": "rss", "rows": 100, "ours": {"value": 300}, "anchors": [{"name": "duckdb", "value": 150},
                                                                           {"name": "fhiry", "value": 600}],
         "unit": "MiB", "better": "lower"},
        {"figure": "tput", "size": 100, "ours": 50, "anchor": {"fhiry": 25}, "unit": "resources/s"},
        {"oops": True},
    ]}
    norm = common.normalize(data)
    rows = norm["results"]
    assert norm["bench"] == "ingest" and len(rows) == 4 and norm["unreadable"] == [{"oops": True}]
    assert rows[0] | {} == rows[0] and rows[0]["figure"] == "parse" and rows[0]["size"] == 100
    assert rows[0]["anchor_name"] == "orjson" and rows[0]["ratio"] == 2.0 and rows[0]["better"] == "lower"
    assert {r["anchor_name"] for r in rows[1:3]} == {"duckdb", "fhiry"} and rows[1]["ours"] == 300
    assert rows[1]["size_unit"] == "rows"
    assert rows[3]["better"] == "higher" and rows[3]["advantage"] == 2.0
    assert common.normalize([{"figure": "a", "ours": 1, "anchor": 2}], "synth")["bench"] == "synth"


def test_sizes_parse_spaces_commas_and_suffixes():
    assert common.parse_sizes(["1000", "5k,2m"]) == [1000, 5000, 2_000_000]
    assert common.parse_sizes("10,20") == [10, 20]


def test_markdown_and_machine():
    rows = [common.result("wall", 100, 3.0, "lib", 2.0, "s", size_unit="patients")]
    table = common.markdown_table(rows)
    assert "| wall | 100 patients | 3.00 | lib: 2.00 | 1.50× (ours behind) | s | lower |" in table
    m = common.machine_info()
    assert m["cpu_cores_logical"] and m["python"] and "sdv" in m["packages"]


def test_rss_sampler_sees_a_child():
    with common.RssSampler(pid=None, interval=0.05) as rss:
        subprocess.run([sys.executable, "-c", "import time; b = bytearray(60 << 20); time.sleep(0.6)"], check=True)
    assert rss.samples > 3 and rss.peak_mib > 40
    r = common.run_sampled([sys.executable, "-c", "b = bytearray(30 << 20); import time; time.sleep(0.5)"],
                           interval=0.05)
    assert r["returncode"] == 0 and r["peak_rss_mib"] > 20 and r["seconds"] > 0.4


FAKE_GOOD = """
import argparse, json
ap = argparse.ArgumentParser()
ap.add_argument("--sizes"); ap.add_argument("--out"); ap.add_argument("--smoke", action="store_true")
a = ap.parse_args()
sizes = [int(s) for s in (a.sizes or "10,20,40").split(",")]
rows = [{"name": "fit", "n": n, "value": n / 10, "baseline": n / 5, "baseline_name": "SDV", "unit": "s"}
        for n in sizes]
json.dump({"figures": rows}, open(a.out, "w"))
"""
FAKE_BAD = "import sys; print('boom: no data here', file=sys.stderr); sys.exit(3)\n"


def test_harness_tolerates_missing_and_failing_benches(tmp_path):
    benches = tmp_path / "benches"
    benches.mkdir()
    (benches / "synth_bench.py").write_text(textwrap.dedent(FAKE_GOOD))   # comma-only --sizes: a variation
    (benches / "quality_bench.py").write_text(FAKE_BAD)
    out = tmp_path / "out"
    rc = harness.main(["--bench-dir", str(benches), "--out-dir", str(out), "--only", "ingest,synth,quality",
                       "--sizes", "synth=10,20,40", "--timeout", "120"])
    assert rc == 0
    doc = json.loads((out / "latest.json").read_text())
    status = {b: r["status"] for b, r in doc["benches"].items()}
    assert status == {"ingest": "missing", "synth": "ok", "quality": "error"}
    assert doc["benches"]["synth"]["sizes_form"] == "--sizes a,b,c"
    assert "boom" in doc["benches"]["quality"]["error"]
    assert [r["size"] for r in doc["results"]] == [10, 20, 40] and all(r["ratio"] == 0.5 for r in doc["results"])
    md = (out / "latest.md").read_text()
    assert "| synth | fit | 10 |" in md and "missing" in md and "Machine:" in md
    assert (out / "scaling.png").stat().st_size > 1000 and (out / "raw" / "synth.json").exists()
    # re-render without running anything
    assert harness.main(["--bench-dir", str(benches), "--out-dir", str(out), "--only", "synth",
                         "--report-only"]) == 0
    assert json.loads((out / "latest.json").read_text())["benches"]["synth"]["status"] == "reused"


def test_harness_smoke_runs_the_stage_benches(tmp_path):
    """`bench/run.py --smoke` over whichever per-stage benches exist (e2e runs Airflow: see the e2e test)."""
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", "--skip", "e2e", "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    doc = json.loads((out / "latest.json").read_text())
    assert (out / "latest.md").exists()
    for name, rec in doc["benches"].items():
        assert rec["status"] in ("ok", "missing"), f"{name}: {rec.get('error')}\n{proc.stderr[-3000:]}"
    present = [n for n, r in doc["benches"].items() if r["status"] == "ok"]
    if present:
        assert proc.returncode == 0 and doc["results"]
        assert {r["bench"] for r in doc["results"]} == set(present)


@pytest.mark.e2e
def test_e2e_bench_smoke(tmp_path):
    """The end-to-end bench on a tiny carebundle extract: Airflow and library runs both release."""
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(BENCH / "e2e_bench.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    figures = {r["figure"]: r for r in data["results"]}
    wall = figures["end-to-end wall time, Airflow DAG"]
    assert wall["ours"] > 0 and wall["anchor"] > 0 and wall["ratio"] > 0
    assert figures["end-to-end peak RSS (process tree), Airflow DAG"]["ours"] > 0
    run = data["runs"][0]
    assert run["airflow"]["ok"] and run["library"]["ok"]
    # released, or refused by the gate on both sides alike (the timing compares the same stages either way)
    assert run["airflow"]["outcome"] == run["library"]["outcome"] == wall["outcome"]
    assert set(run["library"]["stage_seconds"]) >= {"ingest", "prepare", "fit", "sample", "quality", "privacy", "gate"}


def test_scale_bench_combine_joins_invocations_and_refuses_other_bases(tmp_path):
    import scale_bench

    def run(code, n, wall, rss):
        return {"code": code, "patients": n, "outcome": "released", "rc": 0, "wall_s": wall,
                "stage_s": {"gate": wall / 10}, "stage_cpu_s": {"gate": wall / 20}, "peak_rss_gib": rss,
                "stage_peak_rss_gib": {"gate": rss}, "log": "", "tail": ""}

    base = {"bench": "scale", "machine": {}, "base_extract": "/x", "base_patients": 10, "anchor": {}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({**base, "runs": [run("after", 10, 10.0, 1.0)]}))
    b.write_text(json.dumps({**base, "runs": [run("after", 100, 100.0, 2.0)]}))
    out = tmp_path / "c.json"
    assert scale_bench.main(["--combine", str(b), str(a), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [r["patients"] for r in got["runs"]] == [10, 100]
    (e,) = got["exponents"]
    assert e["wall"] == 1.0 and e["peak_rss"] == 0.3 and e["gate"] == 1.0
    b.write_text(json.dumps({**base, "base_extract": "/y", "runs": []}))
    with pytest.raises(SystemExit, match="different base extracts"):
        scale_bench.main(["--combine", str(a), str(b)])
