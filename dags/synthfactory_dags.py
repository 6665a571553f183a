"""One Airflow DAG per dataset spec in include/datasets/*.yaml. No logic here: see synthfactory.airflow."""

from pathlib import Path

from synthfactory.airflow.dag_factory import build_dags

globals().update(build_dags(Path(__file__).resolve().parent.parent / "include" / "datasets"))
