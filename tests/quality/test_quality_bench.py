"""bench/quality_bench.py --smoke runs and writes the bench JSON contract (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quality_bench_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "bench" / "quality_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "quality.json"
    assert bench.main(["--smoke", "--sizes", "600", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["bench"] == "quality" and data["smoke"] is True and data["params"]["sizes"] == [600]
    figures = {r["figure"] for r in data["results"]}
    assert figures == {"quality stage wall time", "quality stage CPU time"}
    for row in data["results"]:
        assert row["size"] == 600 and row["unit"] == "s" and row["better"] == "lower"
        assert row["anchor_name"] == "SDMetrics QualityReport" and row["ours"] > 0 and row["anchor"] > 0
        assert row["ratio"] is not None and "meets_goal" in row
    (detail,) = data["params"]["details"]
    assert detail["stage_quality_score"] == detail["sdmetrics_quality_score"]  # same data, same report
    assert set(detail["relationships"]) == {"hba1c_by_diabetes", "hypertension_by_age_band", "egfr_by_sex"}
    assert "| quality stage wall time | 600 rows |" in capsys.readouterr().out
