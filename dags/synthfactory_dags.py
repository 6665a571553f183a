"""One Airflow DAG per dataset spec (*.yaml) in $SYNTHFACTORY_SPECS_DIR, else in the first of
<this dags folder>/../include/datasets, $SYNTHFACTORY_HOME/include/datasets that holds one.

No spec found is an import error of this file naming the folders searched (never a quiet 0 DAGs).
No logic here: see synthfactory.airflow.dag_factory and synthfactory.airflow.specs_folder.
"""

from pathlib import Path

from synthfactory.airflow.dag_factory import build_dags

globals().update(build_dags(dags_folder=Path(__file__).resolve().parent))
