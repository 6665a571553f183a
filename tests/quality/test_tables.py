"""Per-table fidelity and the per-table gate of relational mode (synthfactory.quality.tables): real data passes
its own reference, a table whose rows per patient or codes are broken fails, and the release gate and the
data card carry every table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from synthfactory.quality import tables as qt
from synthfactory.testing.records import relational_tables


@pytest.fixture(scope="module")
def real():
    return relational_tables(120, seed=5, with_medications=True)


@pytest.fixture(scope="module")
def fresh():
    """Other real-like patients of the same generator: what a perfect synthesizer would produce."""
    return relational_tables(120, seed=6, with_medications=True)


@pytest.fixture(scope="module")
def reference(real):
    return qt.relational_reference(real, holdout_fraction=0.25, resplits=2, max_rows=1500, seed=1)


def _gate(real, syn, reference):
    fig = qt.synthetic_figures(real, syn, patients=reference["holdout_patients"], repeats=1, max_rows=1500)
    # 30 held-out patients: the reference is noisy, so the gate allows 2 reference sd (the pipeline: noise_z)
    return qt.gate_tables(fig, reference, qt.run_table_checks(real, syn), noise_z=2.0), fig


def test_reference_has_every_table_and_figure(real, reference):
    assert set(reference["tables"]) == set(real)
    obs = reference["tables"]["observation"]
    assert {"quality", "children_ks", "value_ks_median"} <= set(obs)
    assert 0.5 < obs["quality"]["mean"] <= 1.0 and obs["children_ks"]["mean"] < 0.5
    assert reference["holdout_patients"] == 30


def test_fresh_real_like_patients_pass_every_table(real, fresh, reference):
    gate, fig = _gate(real, fresh, reference)
    assert gate["passed"], {n: [c for c in t["checks"] if not c["passed"]] for n, t in gate["tables"].items()}
    assert set(gate["tables"]) == set(real)


def test_broken_counts_and_foreign_codes_fail_their_table(real, fresh, reference):
    syn = dict(fresh)
    obs = syn["observation"]
    keep = set(syn["patient"]["patient_key"].iloc[:30])  # observations for a quarter of the patients only
    syn["observation"] = obs[obs["patient_key"].isin(keep)].reset_index(drop=True)
    cond = syn["condition"].copy()
    cond.loc[cond.index[:5], "code"] = "NOT-A-REAL-CODE"
    syn["condition"] = cond
    gate, _ = _gate(real, syn, reference)
    assert not gate["passed"]
    failed = {n: {c["figure"] for c in t["checks"] if not c["passed"]} for n, t in gate["tables"].items()}
    assert "children_ks" in failed["observation"]
    assert "checks" in failed["condition"]
    assert not failed["encounter"]


def test_release_gate_and_data_card_carry_every_table(real, fresh, reference):
    from synthfactory.quality.datacard import _TABLES_SECTION, _table_rows
    from synthfactory.release.gate import quality_checks
    from synthfactory.spec import QualityThresholds

    gate, fig = _gate(real, fresh, reference)
    checks = quality_checks({"tables": gate, "quality_score": 0.9, "expectation_success_ratio": 1.0},
                            QualityThresholds())
    names = {c.name for c in checks}
    assert {f"table.{t}.quality" for t in real} <= names
    assert {f"table.{t}.children_ks" for t in real if t != "patient"} <= names
    assert all(c.passed for c in checks if c.name.startswith("table."))
    from jinja2 import Environment

    from synthfactory.quality.datacard import fmt

    rows = _table_rows({"gate": gate, "figures": fig, "reference": reference})
    html = Environment(autoescape=True).from_string(_TABLES_SECTION).render(rows=rows, fmt=fmt)
    for t in real:
        assert f"<h3>{t}</h3>" in html
    assert np.isfinite([c["value"] for r in rows for c in r["checks"] if c["figure"] == "quality"]).all()
    assert isinstance(pd.DataFrame(rows), pd.DataFrame)
