"""The "Data card" button on a run's gate and release tasks.

In Airflow 3 an operator's extra links are computed by the worker when the task finishes and kept as an
XCom (``_link_DataCardLink``); the API server only reads that XCom. So :meth:`DataCardLink.get_link` runs
on the worker, with the live task instance as ``ti_key``: it reads the task's own XCom summary and points
at the plugin app's route for the run's release version,
``<api base_url>/synthfactory/datasets/<dataset>/<version>/datacard``.

The version is the summary's ``version`` (release), the version folder of its ``datacard_uri`` (gate), or
else the run's version computed the same way the tasks compute it (from the run's logical date).
A task that failed, or a refused gate, gets no link.
"""

from __future__ import annotations

from typing import Any

from synthfactory.airflow.compat import BaseOperatorLink, conf
from synthfactory.airflow.webapp import URL_PREFIX
from synthfactory.release.layout import find_version

DAG_PREFIX = "synthfactory_"


def datacard_path(dataset: str, version: str) -> str:
    return f"{URL_PREFIX}/datasets/{dataset}/{version}/datacard"


def _base_url() -> str:
    try:
        base = conf.get("api", "base_url", fallback="") or ""
    except Exception:  # pragma: no cover
        base = ""
    return base.rstrip("/")


def version_from_summary(summary: dict) -> str | None:
    if summary.get("version"):
        return str(summary["version"])
    return find_version(str(summary.get("datacard_uri") or ""))


class DataCardLink(BaseOperatorLink):
    """Link to the run's data card in the "Synthetic datasets" app (registered by the synthfactory plugin)."""

    name = "Data card"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        dag_id = str(getattr(ti_key, "dag_id", ""))
        if not dag_id.startswith(DAG_PREFIX) or not hasattr(ti_key, "xcom_pull"):
            return ""  # server side, without a live task instance: the link comes from XCom instead
        summary = ti_key.xcom_pull(task_ids=ti_key.task_id)
        if not isinstance(summary, dict) or summary.get("approved") is False:
            return ""
        version = version_from_summary(summary)
        if not version:
            from synthfactory.context import version_for

            dag_run = ti_key.get_template_context().get("dag_run")
            version = version_for(getattr(dag_run, "logical_date", None) or getattr(dag_run, "run_after", None))
        return _base_url() + datacard_path(dag_id[len(DAG_PREFIX):], version)
