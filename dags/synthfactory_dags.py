"""One Airflow DAG per dataset spec in include/datasets/*.yaml (or $SYNTHFACTORY_SPECS_DIR).

No logic here: see synthfactory.airflow.dag_factory.
"""

import os
from pathlib import Path

from synthfactory.airflow.dag_factory import build_dags

_SPECS = os.environ.get("SYNTHFACTORY_SPECS_DIR") or Path(__file__).resolve().parent.parent / "include" / "datasets"

globals().update(build_dags(_SPECS))
