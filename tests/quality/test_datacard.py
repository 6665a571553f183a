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
             "observed": {"observed_value": {"quantiles": [0.25, 0.5], "values": [99.0, 131.0]}},
             "expected": {"quantile_ranges": {"quantiles": [0.25, 0.5], "value_ranges": [[90, 110], [112, 128]]}}},
            {"expectation": "expect_column_values_to_be_in_set", "column": "gender",
             "observed": {"partial_unexpected_list": ["<b>unknown</b>"], "unexpected_percent": 1.25,
                          "unexpected_count": 10},
             "expected": {"value_set": ["female", "male"], "mostly": 0.99}}]},
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
        {"gate": "privacy", "name": "mia_auc", "value": 0.5071, "op": "<=", "threshold": 0.6, "passed": True},
        {"gate": "privacy", "name": "anonymeter.singling_out.ci_low", "value": 0.0, "op": "<=", "threshold": 0.1,
         "passed": True, "certified": False, "result": "not certified"},
        {"gate": "privacy", "name": "rare_record_mia_auc.lower_bound", "value": 0.48, "op": "<=", "threshold": 0.55,
         "passed": True},
    ],
    "not_certified": ["anonymeter.singling_out.ci_low"],
    "audited_files": {"data/patients.parquet": "a" * 64, "reports/quality.json": "b" * 64},
}


PRIVACY = {"exact_match_rate": 0.0, "dcr_share": 0.5123, "dcr_ratio": 1.042, "leak_clean": True,
           "report_uri": "/staging/x/privacy.json", "seconds": 1.2, "mia_auc": 0.5071, "mia_auc_ci": [0.4712, 0.5433],
           "k_anonymity": 3, "rare_record_mia_auc": 0.51, "rare_record_mia_se": 0.012,
           "anonymeter_risks": {"singling_out": {"risk": 0.02, "ci_low": 0.0, "ci_high": 0.257, "error": 0.129,
                                                 "n": 120}},
           "reference": {"mia_auc": {"mean": 0.503, "sd": 0.011}},
           # a figure family another stage may add: rendered generically, its meaning from a pattern
           "mia_attacks": {"domias": {"auc": 0.55, "auc_ci": [0.52, 0.58], "tpr_at_fpr_0p01": 0.021,
                                      "tpr_at_fpr_0p01_ci": [0.01, 0.04]}}}

DICTIONARY = {"reference_date": "2025-06-30",
              "conditions": {"cond_e11_9": {"code": "E11.9", "system": "icd10cm",
                                            "display": "Type 2 diabetes mellitus without complications"},
                             "cond_i10": {"concept": "i10", "description": "Essential hypertension",
                                          "codes": {"icd10cm": ["I10*"], "snomed": ["59621000"]}}},
              "labs": {"hba1c": {"loinc": ["4548-4"], "agg": "last", "units": ["%"],
                                 "display": "Hemoglobin A1c/Hemoglobin.total in Blood"},
                       "glucose": {"loinc": ["2345-7"], "agg": "last", "units": ["mg/dL"], "display": None}}}


@pytest.fixture(scope="module")
def card() -> str:
    real = cohort_table(800, seed=31, key=None)
    real.loc[:2, "gender"] = "rare-category"  # 3 real patients: a small cell that must not be drawn
    synthetic = shuffle_column(cohort_table(800, seed=32, key=None), "hba1c", seed=1)
    return render_datacard(
        dataset="cohort_x", version="v20260101T000000Z", run_id="run_1", decision=DECISION,
        quality_report=quality_report(real, synthetic),
        privacy_summary=PRIVACY,
        privacy_thresholds={"min_k_anonymity": 5, "quasi_identifiers": ["age", "gender"]},
        privacy_notes={"singling_out": {"note": "120 attacks, 95 % CI [0.000, 0.257] (half-width 0.129 > 0.050)"}},
        about={"intended_use": "Method development and teaching; not for clinical decisions.", "owner": "data-platform",
               "contact": "synthetic-data@example.org", "licence": "CC-BY-4.0"},
        dictionary=DICTIONARY,
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


def _section(card: str, name: str) -> str:
    start = card.index(f'<section id="{name}">')
    return card[start:card.index("</section>", start)]


def test_every_privacy_figure_has_a_meaning_and_its_interval(card):
    from synthfactory.quality.cardtext import NO_MEANING, privacy_rows

    privacy = _section(card, "privacy")
    assert NO_MEANING not in privacy
    rows = {r["name"]: r for r in privacy_rows(PRIVACY, DECISION["checks"])}
    assert rows["mia_auc"]["interval"] == (0.4712, 0.5433)
    assert "[0.4712, 0.5433]" in privacy and "0.503 ± 0.011" in privacy  # MIA AUC with interval and reference
    assert rows["rare_record_mia_auc"]["interval"][0] == pytest.approx(0.51 - 1.96 * 0.012)
    assert "rare_record_mia_se" not in rows  # folded into the AUC's interval
    assert rows["mia_attacks.domias.auc"]["interval"] == (0.52, 0.58)
    assert "1 %" in rows["mia_attacks.domias.tpr_at_fpr_0p01"]["meaning"]
    for name in ("exact_match_rate", "dcr_share", "dcr_ratio", "leak_clean", "k_anonymity",
                 "anonymeter.singling_out"):
        assert rows[name]["meaning"] != NO_MEANING, name
    assert "/staging/x/privacy.json" not in privacy


def test_an_uncertified_risk_never_shows_pass(card):
    from synthfactory.quality.cardtext import privacy_rows

    (row,) = [r for r in privacy_rows(PRIVACY, DECISION["checks"]) if r["name"] == "anonymeter.singling_out"]
    assert row["status"] == "not certified" and row["interval"] == (0.0, 0.257)
    gate = _section(card, "gate")
    i = gate.index("anonymeter.singling_out.ci_low")
    row = gate[i:gate.index("</tr>", i)]
    assert ">not certified<" in row and ">pass<" not in row
    assert re.search(r"<code>anonymeter.singling_out</code>.*?\[0, 0.257\].*?not certified", _section(card, "privacy"),
                     re.S)


def test_k_anonymity_below_the_spec_is_explained(card):
    note = re.search(r'<p id="k-anonymity-note"[^>]*>(.*?)</p>', card, re.S).group(1)
    assert "k-anonymity is 3, below min_k_anonymity 5" in note and "age, gender" in note
    assert "rare-record membership test passed" in note and "refused" in note  # this decision refused the run


def test_data_dictionary_and_about(card):
    d = _section(card, "dictionary")
    assert "ICD-10-CM E11.9: Type 2 diabetes mellitus without complications" in d
    assert "Essential hypertension" in d and "ICD-10-CM I10*; SNOMED CT 59621000" in d
    assert "LOINC 4548-4" in d and "<td>%</td>" in d and "mg/dL" in d
    assert "2025-06-30" in d and "<td>yes/no</td>" in d and "<td>integer</td>" in d
    real_cols = cohort_table(20, seed=1, key=None).columns
    assert all(f"<code>{c}</code>" in d for c in real_cols)
    for text in ("Method development and teaching", "synthetic-data@example.org", "CC-BY-4.0"):
        assert text in card


def test_failed_expectations_read_as_text(card):
    q = _section(card, "quality")
    assert "median = 131" in q and "median in [112, 128]" in q
    assert "25th percentile" not in q  # within its range: not listed as a failure
    assert "1.25 % of rows unexpected (10 rows)" in q and "one of female, male" in q
    assert "{&#34;" not in q and '{"' not in q  # no raw JSON


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
    # what a reader sees: the figures explained, the MIA interval, "not certified", the dictionary, the terms
    for text in ("Membership inference: how well an attacker", "[0.4712, 0.5433]", "not certified",
                 "k-anonymity is 3, below min_k_anonymity 5", "Type 2 diabetes mellitus without complications",
                 "LOINC 4548-4", "CC-BY-4.0", "median = 131"):
        assert text in dom, text
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


def test_k_anonymity_note_when_the_rare_record_test_could_not_run():
    from synthfactory.quality.cardtext import k_anonymity_note

    pt = {"min_k_anonymity": 5, "quasi_identifiers": ["age", "gender"]}
    note = k_anonymity_note({"k_anonymity": 3, "rare_record_mia_status": "skipped"}, pt, [], approved=True)
    assert "test was skipped" in note and "approved on the other privacy checks" in note
    assert "that test and every other" not in note
    assert k_anonymity_note({"k_anonymity": 5}, pt, [], approved=True) is None  # at the spec's k: no note
