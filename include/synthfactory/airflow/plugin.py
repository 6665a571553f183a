"""AirflowPlugin registration (kept import-light: Airflow imports plugins in every component).

- ``macros``: ``{{ macros.synthfactory.release_uri(...) }}``;
- ``fastapi_apps``: the "Synthetic datasets" app (:mod:`synthfactory.airflow.webapp`), mounted by the API
  server at ``/synthfactory``;
- ``external_views``: its page in the UI's navigation (Browse → Synthetic datasets), shown in an iframe;
- ``operator_extra_links``: the "Data card" link class (:mod:`synthfactory.airflow.links`). The DAG factory
  attaches it to each dataset DAG's gate and release tasks; in Airflow 3 the worker computes the link
  when the task ends and stores it as an XCom, which the UI reads.
"""

from __future__ import annotations

from synthfactory.airflow.compat import AirflowPlugin
from synthfactory.airflow.links import DataCardLink
from synthfactory.airflow.webapp import URL_PREFIX
from synthfactory.airflow.webapp import app as datasets_app
from synthfactory.release.layout import SandboxLayout


def release_uri(bucket: str, prefix: str, dataset: str, version: str) -> str:
    """Jinja macro ``{{ macros.synthfactory.release_uri(...) }}``: where a released version lives."""
    return SandboxLayout.of(prefix, dataset, bucket).version_uri(version)


class SynthFactoryPlugin(AirflowPlugin):
    name = "synthfactory"
    macros = [release_uri]
    fastapi_apps = [{"app": datasets_app, "url_prefix": URL_PREFIX, "name": "Synthetic datasets"}]
    external_views = [{
        "name": "Synthetic datasets",
        "href": f"{URL_PREFIX}/datasets",
        "url_route": "synthetic-datasets",  # rendered inside the UI (iframe) at /plugin/synthetic-datasets
        "destination": "nav",
        "category": "browse",
    }]
    operator_extra_links = [DataCardLink()]
