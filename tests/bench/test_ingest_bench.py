"""bench/ingest_bench.py --smoke runs (< 30 s) and writes the bench JSON contract. No timing assertions:
speed figures live in bench/results, never in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def test_ingest_bench_smoke_writes_the_contract(tmp_path):
    out = tmp_path / "ingest.json"
    proc = subprocess.run([sys.executable, str(BENCH / "ingest_bench.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["bench"] == "ingest" and data["smoke"] is True and data["schema"] == 1
    anchors = {r["anchor_name"] for r in data["results"] if r["figure"] == "NDJSON → Parquet throughput"}
    assert {"bare orjson parse", "DuckDB read_ndjson", "fhiry", "synthfactory (views engine)"} <= anchors
    for r in data["results"]:
        assert r["ours"] > 0 and r["unit"] in ("resources/s", "resources/CPU-s", "MiB")
        assert r["better"] in ("higher", "lower")
    assert "| figure |" in proc.stdout  # the Markdown table


def test_synthetic_extract_is_deterministic(tmp_path):
    sys.path.insert(0, str(BENCH))
    import ingest_bench

    a = ingest_bench.generate(tmp_path / "a", 500, seed=3)
    b = ingest_bench.generate(tmp_path / "b", 500, seed=3)
    assert a == b and sum(a.values()) >= 500
    for name in ("Patient.ndjson", "Observation.ndjson"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    ingest_bench.generate(tmp_path / "c", 500, seed=4)
    assert (tmp_path / "a" / "Patient.ndjson").read_bytes() != (tmp_path / "c" / "Patient.ndjson").read_bytes()
