"""Quality gate: GX expectations (derived from the real table, or a frozen suite), SDMetrics fidelity, the
spec's clinical relationships, train-synthetic-test-real utility, and the data card.

Heavy libraries (great_expectations, sdmetrics, scikit-learn, matplotlib) are imported lazily inside the
functions.
"""

from synthfactory.quality.datacard import render_datacard
from synthfactory.quality.expectations import (
    add_expectations,
    date_order_expectation,
    derive_suite,
    key_expectations,
    referential_integrity_expectation,
    run_suite,
    to_jsonable,
)
from synthfactory.quality.fidelity import compare_relationships, correlation_matrices
from synthfactory.quality.report import evaluate_quality, infer_sdtypes, sdmetrics_quality
from synthfactory.quality.utility import ml_utility

__all__ = [
    "add_expectations",
    "compare_relationships",
    "correlation_matrices",
    "date_order_expectation",
    "derive_suite",
    "evaluate_quality",
    "infer_sdtypes",
    "key_expectations",
    "ml_utility",
    "referential_integrity_expectation",
    "render_datacard",
    "run_suite",
    "sdmetrics_quality",
    "to_jsonable",
]
