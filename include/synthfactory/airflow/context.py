"""The library's :class:`~synthfactory.context.RunContext` for the running Airflow task instance.

Every task (the DAG factory's TaskFlow tasks and the operators in :mod:`synthfactory.airflow.operators`)
builds its context here: the spec re-read from its file, the run's Params applied, credentials from
Airflow connections (HMAC salt, release signing key, FHIR server, the PHI-side store). Relative spec paths
follow the one project-root rule of :func:`synthfactory.context.project_root`.
"""

from __future__ import annotations

from typing import Any

from synthfactory.airflow import routing
from synthfactory.airflow.compat import get_current_context
from synthfactory.spec import load_spec

__all__ = ["run_context"]


def run_context(spec_path: str) -> Any:
    """The library's RunContext for the running task instance (spec re-read, params applied)."""
    # the library's context and the hooks load storage (pyarrow): at run time, never while parsing DAGs
    from synthfactory.airflow.hooks import (HmacSaltHook, ReleaseSigningKeyHook, fhir_credentials, phi_store,
                                            sql_reader)
    from synthfactory.context import RunContext, project_root, version_for

    ctx = get_current_context()
    spec = load_spec(spec_path)
    params = ctx["params"]
    dag_run = ctx["dag_run"]
    when = getattr(dag_run, "logical_date", None) or getattr(dag_run, "run_after", None)
    routing.check_runtime_synthesizer(spec, params.get("synthesizer") or None)  # fail fast, in the first task
    salt = HmacSaltHook(spec.source.salt_connection_id).get_salt() if spec.source.salt_connection_id else None
    signing = spec.release.signing_connection_id
    signing_key = ReleaseSigningKeyHook(signing).get_key() if signing else None
    fhir_auth, fhir_base_url = fhir_credentials(spec)  # FHIR server auth (fhir_bulk/fhir_search sources)
    return RunContext(
        fhir_auth=fhir_auth, fhir_base_url=fhir_base_url, sql_reader=sql_reader(spec),
        spec=spec, run_id=ctx["run_id"], version=version_for(when), store=phi_store(spec), salt=salt,
        signing_key=signing_key,
        profile=params.get("profile") or "default", rows=int(params.get("rows") or 0) or None,
        synthesizer=params.get("synthesizer") or None, base_dir=str(project_root(spec_path)),
        epochs=int(params.get("epochs") or 0) or None, force_ingest=bool(params.get("force_ingest")))
