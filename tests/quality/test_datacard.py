"""The data card: a pure renderer (self-contained HTML, small cells suppressed), and what headless Chromium shows."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from synthfactory.quality.datacard import plot_columns, render_datacard
from synthfactory.quality.fidelity import compare_relationships, correlation_matrices
from synthfactory.testing.cohorts import RELATIONSHIPS, cohort_table, shuffle_column

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def quality_report(real: pd.DataFrame, synthetic: pd.DataFrame) -> dict:
    """A quality report of the shape reports/quality.json has, built without GX or SDMetrics."""
    rels = compare_relationships(real, synthetic, RELATIONSHIPS)
    return {
        "quality_score": 0.8123, "expectation_success_ratio": 0.9565, "suite_source": "derived",
        "expectations": {"evaluated": 46, "successful": 44, "failed": [
            {"expectation": "expect_column_quantile_values_to_be_between", "column": "glucose",
             "observed": {"observed_value": {"quantiles": [0.5], "values": [131.0]}}},
            {"expectation": "expect_column_values_to_be_in_set", "column": "gender",
             "observed": {"partial_unexpected_list": ["<b>unknown</b>"]}}]},
        "sdmetrics": {"columns": [{"column": "glucose", "metric": "KSComplement", "score": 0.6021},
                                  {"column": "age", "metric": "KSComplement", "score": 0.9377}]},
        "fidelity": {"column_shapes": 0.9012, "column_pair_trends": 0.7234, "min_column_score": 0.6021,
                     "worst_column": "glucose", "correlation": correlation_matrices(real, synthetic)},
        "relationships": rels,
        "utility": {"target": "cond_e11_9", "task": "binary", "metric": "roc_auc", "trtr": 0.9412, "tstr": 0.8317,
                    "ratio": 0.8836, "status": "measured", "note": "", "features": ["age", "hba1c"]},
    }


DECISION = {
    "approved": False, "profile": "default",
    "message": "quality gate failed: relationship.hba1c_by_diabetes 1.734 > max 0.4 (by 1.334)",
    "failed": ["quality gate failed: relationship.hba1c_by_diabetes 1.734 > max 0.4 (by 1.334)"],
    "checks": [
        {"gate": "quality", "name": "quality_score", "value": 0.8123, "op": ">=", "threshold": 0.75, "passed": True},
        {"gate": "quality", "name": "relationship.hba1c_by_diabetes", "value": 1.734, "op": "<=", "threshold": 0.4,
         "passed": False},
        {"gate": "privacy", "name": "dcr_share", "value": 0.5123, "op": "<=", "threshold": 0.6, "passed": True},
    ],
    "audited_files": {"data/patients.parquet": "a" * 64, "reports/quality.json": "b" * 64},
}


@pytest.fixture(scope="module")
def card() -> str:
    real = cohort_table(800, seed=31, key=None)
    real.loc[:2, "gender"] = "rare-category"  # 3 real patients: a small cell that must not be drawn
    synthetic = shuffle_column(cohort_table(800, seed=32, key=None), "hba1c", seed=1)
    return render_datacard(
        dataset="cohort_x", version="v20260101T000000Z", run_id="run_1", decision=DECISION,
        quality_report=quality_report(real, synthetic),
        privacy_summary={"exact_match_rate": 0.0, "dcr_share": 0.5123, "dcr_ratio": 1.042, "leak_clean": True,
                         "report_uri": "/staging/x/privacy.json", "seconds": 1.2},
        real=real, synthetic=synthetic,
        synthesizer={"kind": "gaussian_copula", "params": {"default_distribution": "truncnorm"}, "seed": 42},
        lineage={"extract_sha256": "e" * 64, "spec_sha256": "5" * 64,
                 "code_versions": {"synthfactory": "0.1.0", "sdv": "2.0.0"}},
        rows={"synthetic": 800, "real": 800, "holdout": 200}, generated_at="2026-01-01T00:00:00+00:00")


def test_card_has_every_section_and_figure(card):
    for text in ("Data card: cohort_x", "REFUSED", "relationship.hba1c_by_diabetes", "1.734", "0.8123", "0.9565",
                 "0.7234", "0.6021", "glucose", "0.8836", "0.9412", "0.8317", "0.5123", "gaussian_copula",
                 "truncnorm", "e" * 64, "5" * 64, "a" * 64, "hypertension_by_age_band", "egfr_by_sex",
                 "Gate decision", "Lineage", "Privacy", "Clinical relationships", "ML utility"):
        assert text in card, text
    n_svg = card.count("<svg")
    assert n_svg >= 12 + 3 + 1 + 1  # distributions, relationships, utility, correlation heatmap


def test_card_is_self_contained_and_escaped(card):
    assert "<script" not in card.lower()
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', card)
    assert "url(http" not in card and "@import" not in card
    assert "<b>unknown</b>" not in card and "&lt;b&gt;unknown&lt;/b&gt;" in card
    ids = re.findall(r'\bid="([^"]+)"', card)
    assert len(ids) == len(set(ids))  # several inline SVGs, no clashing ids
    assert "/staging/x/privacy.json" not in card  # URIs of the PHI side stay out


def test_small_real_cells_are_suppressed(card):
    assert "rare-category" not in card
    assert re.search(r"\((\d+) suppressed\)", card)


def test_render_is_deterministic():
    real = cohort_table(300, seed=1, key=None)
    syn = cohort_table(300, seed=2, key=None)
    kw = dict(dataset="d", version="v", run_id="r", decision=DECISION, quality_report=quality_report(real, syn),
              real=real, synthetic=syn, generated_at="2026-01-01T00:00:00+00:00", max_plot_columns=3)
    assert render_datacard(**kw) == render_datacard(**kw)
    assert plot_columns(kw["quality_report"], real, syn)[:4] == ["hba1c", "cond_e11_9", "cond_i10", "age"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_headless_chromium_shows_the_figures(card, tmp_path):
    page = tmp_path / "datacard.html"
    page.write_text(card, encoding="utf-8")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert "REFUSED" in dom and "relationship.hba1c_by_diabetes" in dom and "0.8836" in dom
    assert dom.count("<svg") >= 17 and "Clinical relationships" in dom

    shot = tmp_path / "card.png"
    subprocess.run([*flags, "--window-size=1200,2600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2600)
    colours = img.getcolors(maxcolors=1 << 20) or []

    def near(rgb: tuple[int, int, int], target: tuple[int, int, int]) -> bool:
        return sum(abs(a - b) for a, b in zip(rgb, target)) < 40

    red_badge = sum(n for n, c in colours if near(c, (0xC5, 0x30, 0x30)))
    synthetic_bars = sum(n for n, c in colours if near(c, (0xDD, 0x84, 0x52)))
    assert red_badge > 200  # the REFUSED badge was painted
    assert synthetic_bars > 500  # plots were painted (the synthetic series' colour)
