"""bench/cohorts_bench.py runs on a small cohort and reports every figure as a fraction of the real-data
ceiling, beside the gate's verdict. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cohorts_bench_reports_fractions_of_the_ceiling(tmp_path):
    out, md = tmp_path / "cohorts.json", tmp_path / "cohorts.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cohorts_bench.py"), "--cohorts", "carebundle:300:3",
                           "--candidates", "cart", "--seeds", "1", "--out", str(out), "--markdown", str(md)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (row,) = data["summary"]
    assert row["candidate"].startswith("cart") and row["seeds"] == 1
    assert 0.5 < row["quality_frac"] < 1.5 and 0.5 < row["pair_trends_frac"] < 1.5
    assert 0.3 < row["dcr_share"] < 0.8 and row["approved"] in ("0/1", "1/1")
    ref = data["cohorts"][0]["reference"]["quality_score"]
    assert ref["mean"] > 0 and ref["sd"] >= 0
    assert "| cohort | patients | candidate | quality / ceiling" in md.read_text()
