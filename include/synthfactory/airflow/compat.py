"""The one place that knows where Airflow keeps what synthfactory uses.

Airflow moves public names between releases (core ``airflow.*`` → the Task SDK ``airflow.sdk.*``). Every
other module of :mod:`synthfactory.airflow` imports these names from here. The location pairs are those of
Airflow's own ``airflow.providers.common.compat.sdk`` import map: the Task SDK location is tried first, then
the older core one; ``conf`` and ``AirflowPlugin`` keep core first because the components that read them
(scheduler, DAG processor, API server) run core. Requires Airflow 3 (the approval step, 3.1+). Only cheap
modules are imported (no provider that loads boto3, nothing from the data stack): the plugin and the DAG
file load this module.
"""

from __future__ import annotations

# -- authoring: DAGs, tasks, hooks, operators, links (airflow.sdk since Airflow 3.0) ------------------------
from airflow.sdk import DAG, Asset, BaseHook, BaseOperator, BaseOperatorLink, Param, dag, get_current_context, task

# -- exceptions and hook-level lineage (moved to the Task SDK after 3.0) ------------------------------------
try:
    from airflow.sdk.exceptions import AirflowFailException, DownstreamTasksSkipped
except ImportError:  # pragma: no cover - Airflow 3.0
    from airflow.exceptions import AirflowFailException, DownstreamTasksSkipped  # type: ignore[no-redef]

try:
    from airflow.sdk.lineage import get_hook_lineage_collector
except ImportError:  # pragma: no cover - Airflow 3.0
    from airflow.lineage.hook import get_hook_lineage_collector  # type: ignore[no-redef]

# -- configuration and plugins (core first: see the module docstring) ---------------------------------------
try:
    from airflow.configuration import conf
except ImportError:  # pragma: no cover - a Task SDK-only worker
    from airflow.sdk.configuration import conf  # type: ignore[no-redef]

try:
    from airflow.plugins_manager import AirflowPlugin
except ImportError:  # pragma: no cover - a Task SDK-only worker
    from airflow.sdk.plugins_manager import AirflowPlugin  # type: ignore[no-redef]

# -- one location in every Airflow 3 release -----------------------------------------------------------------
from airflow.providers.standard.operators.hitl import ApprovalOperator  # noqa: E402 - human-in-the-loop, 3.1+
from airflow.triggers.base import BaseTrigger, TriggerEvent  # noqa: E402

__all__ = [
    "DAG", "AirflowFailException", "AirflowPlugin", "ApprovalOperator", "Asset", "BaseHook", "BaseOperator",
    "BaseOperatorLink", "BaseTrigger", "DownstreamTasksSkipped", "Param", "TriggerEvent", "conf", "dag",
    "get_current_context", "get_hook_lineage_collector", "task",
]


def metadata_db() -> tuple:
    """``(DagModel, TaskInstance, create_session)`` from Airflow's metadata-database models, imported on first
    use (the API server's pending-card route reads the run's approval request with them)."""
    from airflow.models.dag import DagModel
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    return DagModel, TaskInstance, create_session
