"""Quality gate: GX expectations derived from the real table plus the SDMetrics quality report.

Heavy libraries (great_expectations, sdmetrics) are imported lazily inside the functions.
"""

from synthfactory.quality.expectations import derive_suite, run_suite, to_jsonable
from synthfactory.quality.report import evaluate_quality, infer_sdtypes, sdmetrics_quality

__all__ = [
    "derive_suite",
    "evaluate_quality",
    "infer_sdtypes",
    "run_suite",
    "sdmetrics_quality",
    "to_jsonable",
]
