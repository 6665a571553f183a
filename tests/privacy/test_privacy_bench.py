"""bench/privacy_bench.py --smoke runs and writes the bench JSON contract (no timing assertions: speed
figures live in bench/results)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_privacy_bench_smoke(tmp_path):
    out = tmp_path / "privacy.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/privacy_bench.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("| figure | size | ours | anchor |")
    data = json.loads(out.read_text())
    assert data["bench"] == "privacy" and data["smoke"] is True and data["schema"] == 1
    rows = {r["figure"].split(" (")[0]: r for r in data["results"]}
    dcr = rows["DCRBaselineProtection"]
    assert dcr["anchor_name"] == "SDMetrics DCRBaselineProtection" and dcr["ours"] > 0 and dcr["anchor"] > 0
    assert dcr["same_score"] is True and dcr["score_abs_diff"] <= 1e-6  # the same score as SDMetrics
    assert rows["privacy audit"]["ours"] > 0 and rows["anonymeter 3 attacks"]["ours"] > 0
    detail = data["params"]["details"][0]
    assert detail["anonymeter"]["singling_out_query_crosscheck"]["count_agreement"] == 1.0
    assert set(detail["audit"]["anonymeter"]) == {"singling_out", "linkability", "inference:cond_e11_9",
                                                  "inference:hba1c"}
