"""The real-data reference: gate figures are judged against what real held-out rows score against real train
rows, so fresh real rows pass, a broken distribution or a lost clinical effect fails, and the worst-column
check ignores columns with too few real values."""

from __future__ import annotations

import numpy as np
import pandas as pd

from synthfactory.quality.fidelity import compare_relationships
from synthfactory.quality.reference import eligible_columns, matched_figures, real_reference, relative_threshold
from synthfactory.release.gate import quality_checks
from synthfactory.spec import QualityThresholds
from synthfactory.synthesize.engine import metadata_dict
from synthfactory.testing.cohorts import RELATIONSHIPS, cohort_table, shift_column, shuffle_column

QT = QualityThresholds(relationships=RELATIONSHIPS, reference={"resplits": 6, "matched_repeats": 3})


def _split(df: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    idx = np.random.default_rng(seed).permutation(len(df))
    n = int(len(df) * 0.8)
    return df.iloc[np.sort(idx[:n])].reset_index(drop=True), df.iloc[np.sort(idx[n:])].reset_index(drop=True)


def summary(train: pd.DataFrame, holdout: pd.DataFrame, synthetic: pd.DataFrame, seed: int = 0) -> dict:
    """The quality stage's gate figures, as pipeline.quality computes them."""
    md = metadata_dict(train)
    ref = real_reference(train, holdout, metadata=md, relationships=QT.relationships,
                         resplits=QT.reference.resplits, min_values=QT.reference.min_values, seed=seed)
    matched = matched_figures(train, synthetic, metadata=md, rows=len(holdout), eligible=ref["eligible_columns"],
                              repeats=QT.reference.matched_repeats, seed=seed)
    rels = {r["name"]: r for r in compare_relationships(train, synthetic, QT.relationships)}
    return {"expectation_success_ratio": 1.0, "reference": ref,
            "matched": {k: (matched[k] or {}).get("mean") for k in ("quality_score", "column_pair_trends",
                                                                    "min_column_score")},
            "relationships": rels}


def failed(s: dict) -> list[str]:
    return [c.name for c in quality_checks(s, QT) if not c.passed]


def test_reference_has_mean_and_spread_and_eligible_columns():
    df = cohort_table(600, seed=1, key=None)
    df["rare_lab"] = np.where(np.arange(600) % 40 == 0, 3.0, np.nan)   # 15 values: never the worst column
    train, holdout = _split(df, 0)
    ref = real_reference(train, holdout, metadata=metadata_dict(train), resplits=4, min_values=50)
    assert 0.5 < ref["quality_score"]["mean"] < 1.0 and ref["quality_score"]["sd"] > 0
    assert ref["resplits"] == 4 and ref["rows_holdout"] == len(holdout)
    assert "rare_lab" not in ref["eligible_columns"] and "hba1c" in ref["eligible_columns"]
    assert eligible_columns(train, 50) == ref["eligible_columns"] or set(eligible_columns(train, 50)) == set(
        ref["eligible_columns"])
    assert relative_threshold(ref["quality_score"], 0.95, 2.0) < ref["quality_score"]["mean"]
    assert relative_threshold(None, 0.95, 2.0) is None


def test_fresh_real_rows_pass_in_nearly_every_split():
    """An independent draw of the same population is what a perfect generator gives: it must pass."""
    passed = 0
    for seed in range(6):
        train, holdout = _split(cohort_table(700, seed=100 + seed, key=None), seed)
        fresh = cohort_table(len(train), seed=500 + seed, key=None)
        passed += not failed(summary(train, holdout, fresh, seed))
    assert passed >= 5


def test_a_broken_distribution_and_a_lost_effect_fail():
    train, holdout = _split(cohort_table(800, seed=3, key=None), 1)
    fresh = cohort_table(len(train), seed=9, key=None)
    assert not failed(summary(train, holdout, fresh))
    shifted = failed(summary(train, holdout, shift_column(fresh, "egfr", 25.0)))
    assert "min_column_score" in shifted
    lost = summary(train, holdout, shuffle_column(fresh, "hba1c", seed=2))
    rel = lost["relationships"]["hba1c_by_diabetes"]
    assert rel["effect"]["significant"] and rel["effect"]["ci_high"] < 0.8
    assert "relationship.hba1c_by_diabetes.effect_kept.ci_high" in failed(lost)


def test_checks_carry_the_reference_beside_the_figure():
    train, holdout = _split(cohort_table(500, seed=4, key=None), 2)
    checks = {c.name: c for c in quality_checks(summary(train, holdout, cohort_table(400, seed=8, key=None)), QT)}
    q = checks["quality_score"]
    assert q.reference["mean"] > 0 and q.threshold < q.reference["mean"]
    assert "real data itself" in q.describe() or q.passed


def test_matched_expectations_score_subsets_of_the_held_out_size():
    """A range expectation fails more often on more rows: subsets of the held-out size pass it more often than
    the whole table (the share the gate compares with real held-out rows)."""
    import numpy as np
    import pandas as pd

    from synthfactory.quality.expectations import run_suite
    from synthfactory.quality.reference import matched_expectations

    rng = np.random.default_rng(0)
    suite = {"name": "s", "expectations": [
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": f"x{i}", "min_value": -2.5, "max_value": 2.5}}
        for i in range(20)]}
    df = pd.DataFrame({f"x{i}": rng.normal(size=800) for i in range(20)})
    whole = run_suite(suite, df)["success_ratio"]
    m = matched_expectations(suite, df, rows=100, repeats=4, seed=1)
    assert m["rows"] == 100 and m["repeats"] == 4 and m["mean"] > whole + 0.2
    assert matched_expectations(suite, df, rows=800, repeats=4, seed=1) is None
