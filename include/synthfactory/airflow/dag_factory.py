"""Build one Airflow DAG per dataset spec (TaskFlow API, ``airflow.sdk``).

Each task is a few lines over a :mod:`synthfactory.pipeline` stage, the same functions the CLI runs.
Tasks pass URIs and small figures through XCom, never data. Heavy libraries (SDV, GX) are imported only
inside task execution, so parsing the DAG folder stays cheap.
"""

from __future__ import annotations

import functools
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from airflow.sdk import DAG, Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from synthfactory.spec import DatasetSpec, discover_specs, load_spec

SYNTHESIZERS = ["gaussian_copula", "ctgan", "tvae", "copulagan"]
DEFAULT_SPECS = Path(__file__).resolve().parents[2] / "datasets"  # include/datasets


def _project_root(spec_path: Path) -> str:
    """Relative URIs in a spec resolve against $SYNTHFACTORY_HOME, else the project holding
    include/datasets/<name>.yaml."""
    return os.environ.get("SYNTHFACTORY_HOME") or str(spec_path.resolve().parents[2])


def run_context(spec_path: str) -> Any:
    """The library's RunContext for the running task instance (spec re-read, params applied)."""
    from synthfactory.airflow.hooks import HmacSaltHook, phi_store
    from synthfactory.pipeline import RunContext, version_for

    ctx = get_current_context()
    spec = load_spec(spec_path)
    params = ctx["params"]
    dag_run = ctx["dag_run"]
    when = getattr(dag_run, "logical_date", None) or getattr(dag_run, "run_after", None)
    salt = HmacSaltHook(spec.source.salt_connection_id).get_salt() if spec.source.salt_connection_id else None
    return RunContext(
        spec=spec, run_id=ctx["run_id"], version=version_for(when), store=phi_store(spec), salt=salt,
        profile=params.get("profile") or "default", rows=int(params.get("rows") or 0) or None,
        synthesizer=params.get("synthesizer") or None, base_dir=_project_root(Path(spec_path)))


def _no_retry_on_user_errors(fn: Callable[..., dict]) -> Callable[..., dict]:
    """Bad input and gate refusals are deterministic: fail the task at once instead of retrying."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> dict:
        from synthfactory.ingest.fhir_ndjson import ExtractError
        from synthfactory.release.gate import GateRefused
        from synthfactory.release.publish import PublishRefused
        from synthfactory.spec import SpecError
        from synthfactory.synthesize.modelling import ModellingError

        try:
            return fn(*args, **kwargs)
        except (ExtractError, ModellingError, GateRefused, PublishRefused, SpecError) as err:
            raise AirflowFailException(f"{type(err).__name__}: {err}") from err

    return wrapper


def _doc(spec: DatasetSpec, spec_path: Path) -> str:
    qt, pt = spec.quality, spec.privacy
    return f"""### Synthetic dataset `{spec.name}`
{spec.description}

Built from `{spec_path.name}`. Stages: ingest (FHIR R4 NDJSON → Parquet, HMAC keys, quarantine) →
prepare (patient-level table, train/holdout split) → fit (`{spec.synthesizer.kind}`) → sample →
quality (GX suite + SDMetrics) → privacy (exact match, DCR, leak scan) → gate → release to
`s3://{spec.release.bucket}/{spec.release.prefix}/{spec.name}/<version>/` on connection `{spec.release.connection_id}`.

Default thresholds: quality score ≥ {qt.min_quality_score}, expectations ≥ {qt.min_expectation_success},
exact matches ≤ {pt.max_exact_match_rate}, DCR share ≤ {pt.max_dcr_share}, DCR ratio ≥ {pt.min_dcr_ratio},
leak scan {'on' if pt.leak_scan else 'off'}. Profiles: {', '.join(spec.profile_names)}.
"""


def build_dag(spec_path: str | Path) -> DAG:
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path)
    sp = str(spec_path)
    release_asset = Asset(name=f"synthfactory_{spec.name}",
                          uri=f"s3://{spec.release.bucket}/{spec.release.prefix}/{spec.name}".rstrip("/"))
    params = {
        "rows": Param(spec.synthesizer.rows or 0, type="integer", minimum=0, title="Synthetic rows",
                      description="Rows to sample; 0 = as many as the real training rows."),
        "synthesizer": Param(spec.synthesizer.kind, type="string", enum=SYNTHESIZERS, title="Synthesizer",
                             description="SDV synthesizer. Neural ones (ctgan, tvae, copulagan) belong on GPU workers."),
        "profile": Param("default", type="string", enum=spec.profile_names, title="Threshold profile",
                         description="Which quality/privacy thresholds from the spec the gate applies."),
    }

    @dag(
        dag_id=f"synthfactory_{spec.name}",
        description=spec.description or f"Synthetic dataset {spec.name}",
        schedule=spec.schedule,
        start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        tags=["synthfactory", *spec.tags],
        params=params,
        doc_md=_doc(spec, spec_path),
        default_args={"owner": spec.owner, "retries": 2, "retry_delay": timedelta(seconds=30),
                      "retry_exponential_backoff": True, "execution_timeout": timedelta(hours=2)},
    )
    def factory() -> None:
        from synthfactory import pipeline as p

        @task
        @_no_retry_on_user_errors
        def ingest() -> dict:
            return p.ingest(run_context(sp))

        @task
        @_no_retry_on_user_errors
        def prepare(ingested: dict) -> dict:
            return p.prepare(run_context(sp), ingested)

        @task
        @_no_retry_on_user_errors
        def fit(prepared: dict) -> dict:
            return p.fit(run_context(sp), prepared)

        @task
        @_no_retry_on_user_errors
        def sample(fitted: dict, prepared: dict) -> dict:
            return p.sample(run_context(sp), fitted, prepared)

        @task
        @_no_retry_on_user_errors
        def quality(prepared: dict, sampled: dict) -> dict:
            return p.quality(run_context(sp), prepared, sampled)

        @task
        @_no_retry_on_user_errors
        def privacy(prepared: dict, sampled: dict, ingested: dict, quality_summary: dict) -> dict:
            return p.privacy(run_context(sp), prepared, sampled, ingested, quality_summary)

        @task
        @_no_retry_on_user_errors
        def gate(sampled: dict, quality_summary: dict, privacy_summary: dict) -> dict:
            return p.gate(run_context(sp), sampled, quality_summary, privacy_summary)

        @task(outlets=[release_asset])
        @_no_retry_on_user_errors
        def release(gated: dict, sampled: dict, quality_summary: dict, privacy_summary: dict,
                    ingested: dict) -> dict:
            from synthfactory.airflow.hooks import SandboxWriter

            ctx = run_context(sp)
            writer = SandboxWriter(spec.release.connection_id, spec.release.bucket)
            return p.release(ctx, gated, sampled, quality_summary, privacy_summary, ingested, writer)

        ingested = ingest()
        prepared = prepare(ingested)
        sampled = sample(fit(prepared), prepared)
        q = quality(prepared, sampled)
        pr = privacy(prepared, sampled, ingested, q)
        release(gate(sampled, q, pr), sampled, q, pr, ingested)

    return factory()


def build_dags(folder: str | Path = DEFAULT_SPECS) -> dict[str, DAG]:
    """One DAG per ``*.yaml`` in ``folder``. An invalid spec raises SpecError naming the field, which
    Airflow shows as an import error of the DAG file."""
    dags: dict[str, DAG] = {}
    for path in discover_specs(folder):
        d = build_dag(path)
        dags[d.dag_id] = d
    return dags
