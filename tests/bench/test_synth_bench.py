"""bench/synth_bench.py --smoke runs and writes the bench JSON contract (fit/sample vs SDV directly, CPU s/epoch,
the relational engine with RI and children-per-parent KS). No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_synth_bench_smoke_writes_the_contract(tmp_path):
    out = tmp_path / "synth.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "synth_bench.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["bench"] == "synth" and data["smoke"] is True and data["schema"] == 1
    figures = {r["figure"] for r in data["results"]}
    assert {"fit gaussian_copula", "sample gaussian_copula", "fit ctgan", "sample ctgan", "CPU s/epoch ctgan",
            "relational fit", "relational sample"} <= figures
    for r in data["results"]:
        assert r["ours"] > 0 and r["unit"] == "s" and r["better"] == "lower"
        if r["figure"].startswith(("fit ", "sample ")):
            assert r["anchor_name"] == "SDV direct" and r["anchor"] > 0
    rel = next(r for r in data["results"] if r["figure"] == "relational fit")
    assert rel["referential_integrity"] == 1.0 and rel["constraint_violations"] == 0
    assert "| figure |" in proc.stdout
