"""Build one Airflow DAG per dataset spec (TaskFlow API, ``airflow.sdk``).

Each task is a few lines over a :mod:`synthfactory.pipeline` stage, the same functions the CLI runs, on the
run's context from :func:`synthfactory.airflow.context.run_context`.
Tasks pass URIs and small figures through XCom, never data. Heavy libraries (SDV, GX) are imported only
inside task execution, so parsing the DAG folder stays cheap.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from synthfactory.airflow import routing, specs_folder
from synthfactory.airflow.compat import DAG, AirflowFailException, Asset, Param, dag, task
from synthfactory.airflow.context import run_context
from synthfactory.release.layout import SandboxLayout
from synthfactory.spec import SYNTHESIZER_KINDS, DatasetSpec, discover_specs, load_spec

SYNTHESIZERS = list(SYNTHESIZER_KINDS)  # the spec's kinds (incl. dp_mst, dp_aim), so any spec's default is valid


def task_kwargs(spec: DatasetSpec, stage: str) -> dict[str, Any]:
    """Per-stage task arguments: the spec's timeout, and for fit/sample (and privacy when it trains shadow
    models of a neural synthesizer) the queue/pool (GPU routing)."""
    kw: dict[str, Any] = {"execution_timeout": timedelta(minutes=spec.operations.timeout_minutes(stage))}
    if routing.stage_gpu_routed(spec, stage):
        kw.update(routing.training_route(spec).task_kwargs())
    return kw


def _extract_sensor(spec: DatasetSpec) -> Any:
    """A deferrable S3KeySensor waiting for the spec's ``trigger.wait_for_key`` (a new extract landing)."""
    from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor

    tr = spec.trigger
    key = tr.wait_for_key or ""
    return S3KeySensor(
        task_id="wait_for_extract", bucket_key=key, wildcard_match=any(c in key for c in "*?["),
        aws_conn_id=tr.connection_id or spec.source.connection_id or "aws_default", deferrable=True,
        poke_interval=tr.poke_interval_seconds, timeout=tr.wait_timeout * 60,
        execution_timeout=timedelta(minutes=tr.wait_timeout + 5), retries=0,
        doc_md=f"Waits (deferred, on the triggerer) for `{key}` before ingesting.")


def _no_retry_on_user_errors(fn: Callable[..., dict]) -> Callable[..., dict]:
    """A :class:`~synthfactory.errors.UserError` (bad spec or input, a gate or publisher refusal) is
    deterministic: fail the task at once instead of retrying. Anything else is left to Airflow's retries."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> dict:
        from synthfactory.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise AirflowFailException(f"{type(err).__name__}: {err}") from err

    return wrapper


def _synth_description(spec: DatasetSpec) -> str:
    route = routing.training_route(spec)
    where = (f"fit/sample run on queue '{route.queue}' (pool '{route.pool}')" if route.gpu else
             f"fit/sample run on the CPU queue '{route.queue}': choosing ctgan, tvae or copulagan here fails the "
             "run at once (route training to GPU workers with synthesizer.queue in the spec)")
    return f"SDV synthesizer. Neural ones (ctgan, tvae, copulagan) belong on GPU workers; in this DAG {where}."


def _doc(spec: DatasetSpec, spec_path: Path) -> str:
    qt, pt = spec.quality, spec.privacy
    approve = " approve (a human, in Required Actions) →" if spec.release.require_approval else ""
    return f"""### Synthetic dataset `{spec.name}`
{spec.description}

Built from `{spec_path.name}`. Stages: ingest (FHIR R4 NDJSON → Parquet, HMAC keys, quarantine) →
prepare (patient-level table, train/holdout split) → fit (`{spec.synthesizer.kind}`) → sample →
quality (GX suite + SDMetrics) → privacy (exact match, DCR, membership inference, k-anonymity,
anonymeter attacks, leak scan) → gate →{approve} release to
`{SandboxLayout.for_spec(spec).version_uri("<version>")}` on connection `{spec.release.connection_id}`
(atomic: manifest last, then `latest.json`; SSE {spec.release.encryption}; the newest {spec.release.keep_versions} versions kept).

Default thresholds: quality score ≥ {qt.min_quality_score}, expectations ≥ {qt.min_expectation_success},
exact matches, DCR share (both ways) and membership-inference AUC within what fresh real rows score
(± {pt.noise_z} sd over {pt.reference_resplits} re-splits; caps: DCR share ≤ {pt.max_dcr_share}, membership-inference
AUC ≤ {pt.max_mia_auc}), DCR ratio ≥ {pt.min_dcr_ratio}, anonymeter risks ≤ {pt.max_anonymeter_risk} (quasi-identifiers:
{', '.join(pt.quasi_identifiers) or 'none'}; sensitive: {', '.join(pt.sensitive_attributes) or 'none'}),
leak scan {'on' if pt.leak_scan else 'off'}. Profiles: {', '.join(spec.profile_names)}.

{_ops_doc(spec)}
"""


def _ops_doc(spec: DatasetSpec) -> str:
    route, ops, tr = routing.training_route(spec), spec.operations, spec.trigger
    start = (f"when asset `{tr.asset}` is updated" if tr.asset else f"on `{spec.schedule}`" if spec.schedule
             else "manually")
    if tr.wait_for_key:
        start += f", after `{tr.wait_for_key}` exists (deferrable sensor, up to {tr.wait_timeout:g} min)"
    timeouts = ", ".join(f"{s} {ops.timeout_minutes(s):g}" for s in ("ingest", "fit", "sample", "quality", "privacy"))
    notify = (f"failures notify via {ops.notify.kind} connection `{ops.notify.connection_id}`" if ops.notify
              else "no failure notifications")
    return (f"Operations: runs {start}. fit/sample run on queue `{route.queue}`, pool `{route.pool}`; other stages "
            f"on the default queue. Retries {ops.retries} (exponential backoff); timeouts (min): {timeouts}; "
            f"{notify}. Ingest reuse {'on' if ops.reuse_ingest else 'off'} (Param `force_ingest`)."
            + (f" Ingest in up to {ops.ingest_shards} shards: `ingest_plan` → `ingest_shard` mapped over the shards "
               "(any worker) → `ingest` merges them into a one-process ingest's outputs." if ops.ingest_shards > 1
               else "")
            + (f" Leak scan in about {ops.leak_scan_shards} parts: `privacy_metrics` → `leak_scan_plan` → "
               "`leak_scan_part` mapped over the release's files (big Parquet files by row-group ranges) → `privacy` "
               "merges them into the one-process scan's result, which the gate reads." if ops.leak_scan_shards > 1
               else ""))


def build_dag(spec_path: str | Path) -> DAG:
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path)
    sp = str(spec_path)
    release_asset = Asset(name=f"synthfactory_{spec.name}", uri=SandboxLayout.for_spec(spec).asset_uri)
    params = {
        "rows": Param(spec.synthesizer.rows or 0, type="integer", minimum=0, title="Synthetic rows",
                      description="Rows to sample; 0 = as many as the real training rows."),
        "synthesizer": Param(spec.synthesizer.kind, type="string", enum=SYNTHESIZERS, title="Synthesizer",
                             description=_synth_description(spec)),
        "epochs": Param(0, type="integer", minimum=0, maximum=100_000, title="Training epochs",
                        description="Neural synthesizers only (ctgan, tvae, copulagan): training epochs; "
                                    "0 = the spec's (synthesizer.epochs, else params.epochs), else SDV's default."),
        "force_ingest": Param(False, type="boolean", title="Force re-ingest",
                              description="Ingest the extract again even when a previous run already ingested "
                                          "the same extract (same sha256, spec, salt and code version)."),
        "profile": Param("default", type="string", enum=spec.profile_names, title="Threshold profile",
                         description="Which quality/privacy thresholds from the spec the gate applies."),
    }

    ops = spec.operations
    default_args: dict[str, Any] = {
        "owner": spec.owner, "retries": ops.retries, "retry_delay": timedelta(seconds=ops.retry_delay_seconds),
        "retry_exponential_backoff": 2.0,  # a multiplier in Airflow 3 (True would mean 1.0: no backoff)
        "max_retry_delay": timedelta(minutes=ops.max_retry_delay_minutes),
        "execution_timeout": timedelta(hours=2)}
    if ops.notify is not None:
        from synthfactory.airflow.notify import build_notifier

        default_args["on_failure_callback"] = [build_notifier(ops.notify)]

    @dag(
        dag_id=f"synthfactory_{spec.name}",
        description=spec.description or f"Synthetic dataset {spec.name}",
        schedule=[Asset(spec.trigger.asset)] if spec.trigger.asset else spec.schedule,
        start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        tags=["synthfactory", *spec.tags],
        params=params,
        doc_md=_doc(spec, spec_path),
        default_args=default_args,
    )
    def factory() -> None:
        from synthfactory import pipeline as p
        from synthfactory.airflow.links import DataCardLink

        @task(**task_kwargs(spec, "ingest"))
        @_no_retry_on_user_errors
        def ingest() -> dict:
            return p.ingest(run_context(sp))

        @task(**task_kwargs(spec, "prepare"))
        @_no_retry_on_user_errors
        def prepare(ingested: dict) -> dict:
            return p.prepare(run_context(sp), ingested)

        @task(**task_kwargs(spec, "fit"))
        @_no_retry_on_user_errors
        def fit(prepared: dict) -> dict:
            return p.fit(run_context(sp), prepared)

        @task(**task_kwargs(spec, "sample"))
        @_no_retry_on_user_errors
        def sample(fitted: dict, prepared: dict) -> dict:
            return p.sample(run_context(sp), fitted, prepared)

        @task(**task_kwargs(spec, "quality"))
        @_no_retry_on_user_errors
        def quality(prepared: dict, sampled: dict) -> dict:
            return p.quality(run_context(sp), prepared, sampled)

        @task(**task_kwargs(spec, "privacy"))
        @_no_retry_on_user_errors
        def privacy(prepared: dict, sampled: dict, ingested: dict, quality_summary: dict) -> dict:
            return p.privacy(run_context(sp), prepared, sampled, ingested, quality_summary)

        @task(**task_kwargs(spec, "gate"))
        @_no_retry_on_user_errors
        def gate(sampled: dict, quality_summary: dict, privacy_summary: dict, ingested: dict) -> dict:
            return p.gate(run_context(sp), sampled, quality_summary, privacy_summary, ingested)

        @task(outlets=[release_asset], **task_kwargs(spec, "release"))
        @_no_retry_on_user_errors
        def release(gated: dict, sampled: dict, quality_summary: dict, privacy_summary: dict,
                    ingested: dict) -> dict:
            from synthfactory.airflow.hooks import SandboxWriter
            from synthfactory.airflow.release import announce_release

            ctx = run_context(sp)
            writer = SandboxWriter.for_spec(spec)
            out = p.release(ctx, gated, sampled, quality_summary, privacy_summary, ingested, writer)
            announce_release(spec, ctx, writer, out, release_asset)
            return out

        if spec.operations.ingest_shards > 1:  # plan -> one mapped task per shard -> merge (task "ingest")
            @task(**task_kwargs(spec, "ingest"))
            @_no_retry_on_user_errors
            def ingest_plan() -> list:
                return p.plan_ingest_shards(run_context(sp))

            @task(**task_kwargs(spec, "ingest"))
            @_no_retry_on_user_errors
            def ingest_shard(shard: dict) -> dict:
                return p.ingest_shard(run_context(sp), shard)

            @task(task_id="ingest", **task_kwargs(spec, "ingest"))
            @_no_retry_on_user_errors
            def ingest_merge(shards: list) -> dict:
                return p.merge_ingest(run_context(sp), list(shards))

            first = ingest_plan()
            ingested = ingest_merge(ingest_shard.expand(shard=first))
        else:
            ingested = first = ingest()
        prepared = prepare(ingested)
        sampled = sample(fit(prepared), prepared)
        q = quality(prepared, sampled)
        if spec.operations.leak_scan_shards > 1:  # metrics -> plan -> one mapped scan per part -> merge ("privacy")
            # the scan tasks: the privacy stage's timeout, on the default queue (no GPU routing: they train nothing)
            leak_kw = {"execution_timeout": timedelta(minutes=spec.operations.timeout_minutes("privacy"))}

            @task(task_id="privacy_metrics", **task_kwargs(spec, "privacy"))
            @_no_retry_on_user_errors
            def privacy_metrics(prepared: dict, sampled: dict, ingested: dict, quality_summary: dict) -> dict:
                return p.privacy(run_context(sp), prepared, sampled, ingested, quality_summary, scan_leaks=False)

            @task(**leak_kw)
            @_no_retry_on_user_errors
            def leak_scan_plan(prepared: dict, sampled: dict, ingested: dict, quality_summary: dict,
                               metrics: dict) -> list:
                return p.plan_leak_scan(run_context(sp), prepared, sampled, ingested, quality_summary, metrics)

            @task(**leak_kw)
            @_no_retry_on_user_errors
            def leak_scan_part(unit: dict) -> dict:
                return p.leak_scan_part(run_context(sp), unit)

            @task(task_id="privacy", **leak_kw)
            @_no_retry_on_user_errors
            def leak_scan_merge(metrics: dict, parts: list) -> dict:
                ctx = run_context(sp)
                return p.with_leak_scan(ctx, metrics, p.merge_leak_scan(ctx, list(parts)))

            metrics = privacy_metrics(prepared, sampled, ingested, q)
            units = leak_scan_plan(prepared, sampled, ingested, q, metrics)
            pr = leak_scan_merge(metrics, leak_scan_part.expand(unit=units))
        else:
            pr = privacy(prepared, sampled, ingested, q)
        gated = gate(sampled, q, pr, ingested)
        released = release(gated, sampled, q, pr, ingested)
        if spec.release.require_approval:  # human-in-the-loop between the gate and the release
            from synthfactory.airflow.operators import approval_task

            gated >> approval_task(spec, sp) >> released
        for arg in (gated, released):
            arg.operator.operator_extra_links = [DataCardLink()]
        if spec.trigger.wait_for_key:
            _extract_sensor(spec) >> first
        if spec.source.kind == "fhir_bulk" and spec.source.bulk.deferrable:  # export waits on the triggerer
            from synthfactory.airflow.operators import FhirBulkExportOperator

            FhirBulkExportOperator(task_id="bulk_export", spec_path=sp, **task_kwargs(spec, "ingest")) >> ingested

    return factory()


def build_dags(folder: str | Path | None = None, *, dags_folder: str | Path | None = None) -> dict[str, DAG]:
    """One DAG per ``*.yaml`` in ``folder`` (default: :func:`synthfactory.airflow.specs_folder.find`, from
    ``$SYNTHFACTORY_SPECS_DIR`` or ``<dags_folder>/../include/datasets``). An invalid spec raises SpecError
    naming the field, and a folder without specs :class:`~synthfactory.airflow.specs_folder.NoSpecsFound`
    naming the folders searched: Airflow shows either as an import error of the DAG file."""
    if folder is None:
        folder = specs_folder.find(dags_folder)
    paths = discover_specs(folder)
    if not paths:
        raise specs_folder.NoSpecsFound([Path(folder)])
    dags: dict[str, DAG] = {}
    for path in paths:
        d = build_dag(path)
        dags[d.dag_id] = d
    return dags
