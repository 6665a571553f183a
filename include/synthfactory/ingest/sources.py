"""The ingest stage's sources: one :class:`Source` class per ``source.kind``, registered in :data:`SOURCES`;
every source ends in the same flattened tables (an :class:`~.session.IngestSession`).

=============  ===================================================================================
kind           what is read
=============  ===================================================================================
fhir_ndjson    ``<Type>*.ndjson[.gz]`` files in a folder or s3:// prefix (the default)
fhir_bundle    Bundle JSON files (transaction/batch/collection/searchset), ``urn:uuid:`` resolved
fhir_bulk      a FHIR Bulk Data ``$export`` (kick-off, polling, resumable downloads into staging)
fhir_search    FHIR REST search per type, following ``next`` links
ehr_csv        CSV tables with a column mapping (``source.ehr``; preset ``clinosim``)
ehr_parquet    Parquet tables with a column mapping
table          one flat clinical table (CSV/Parquet file or SQL query), one row per patient (:mod:`.table`)
=============  ===================================================================================

A new kind is one :class:`Source` subclass (its ``kind`` and :meth:`Source.run`) and one entry in
:data:`SOURCES`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from synthfactory.context import RunContext, project_root
from synthfactory.fhir.normalize import ExtractError
from synthfactory.keys import Keyer
from synthfactory.storage import join

log = logging.getLogger(__name__)

__all__ = ["Source", "SOURCES", "FILE_KINDS", "HTTP_KINDS", "ingest_for_run", "load_views", "auth_from_env",
           "bulk_export_for", "bulk_state_dir", "fhir_client_for", "ingest_options", "plan_for_run", "shard_for_run",
           "merge_for_run"]

AUTH_ENV = "SYNTHFACTORY_FHIR_AUTH"


def load_views(views: list, base_dir: str | None = None) -> list[dict]:
    """The spec's ``source.views``: inline ViewDefinitions, or .json/.yaml files (relative to ``base_dir``, else
    to the project root, :func:`synthfactory.context.project_root`)."""
    from synthfactory.fhir.views import load_view_file

    out = []
    for v in views or []:
        if isinstance(v, dict):
            out.append(v)
            continue
        path = Path(v)
        if not path.is_absolute():
            path = (Path(base_dir) if base_dir else project_root()) / path
        if not path.is_file():
            raise ExtractError(f"source.views: view file not found: {path}")
        out.append(load_view_file(str(path)))
    return out


def auth_from_env() -> Any:
    """AuthConfig from ``$SYNTHFACTORY_FHIR_AUTH`` (JSON, for the CLI), else no auth."""
    from .smart import AuthConfig

    raw = os.environ.get(AUTH_ENV)
    if not raw:
        return AuthConfig()
    try:
        return AuthConfig.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise ExtractError(f"${AUTH_ENV} is not a valid auth config ({type(exc).__name__})") from None


def fhir_client_for(source: Any, auth: Any, base_url: str | None = None) -> Any:
    from .fhirclient import FhirClient, RetryPolicy

    url = base_url or source.base_url
    if not url:
        raise ExtractError("source.base_url: the FHIR server's base URL is needed (or a fhir connection's host)")
    bulk = source.bulk
    return FhirClient(url, auth, retry=RetryPolicy(attempts=bulk.download_retries + 1,
                                                   max_wait=bulk.max_retry_after_seconds))


def bulk_export_for(ctx: RunContext, client: Any, *, since: str | None = None) -> Any:
    """The :class:`~.bulk.BulkExport` of a run. The request -- ``_type`` =
    the spec's resources plus its views' resources, ``_since`` = the spec's, or the previous run's
    transactionTime when ``bulk.incremental`` -- is computed the same way by the deferrable export task and
    the ingest task, so the ingest task resumes the export the first one started."""
    from .bulk import BulkExport, ExportRequest, PollPolicy

    source = ctx.spec.source
    b = source.bulk
    state_dir = bulk_state_dir(ctx)
    probe = BulkExport(client=client, store=ctx.store, state_dir=state_dir, request=ExportRequest())
    if since is None:
        since = b.since
        if since is None and b.incremental:
            from .snapshot import current_snapshot

            # _since only when there is a snapshot to merge the delta into; else a full export
            since = probe.previous_since() if current_snapshot(ctx.store, state_dir) is not None else None
    views = load_views(list(source.views), ctx.base_dir)
    types = tuple(dict.fromkeys([*source.resources, *(v["resource"] for v in views if isinstance(v.get("resource"), str))]))
    request = ExportRequest(level=b.level, group_id=b.group_id, types=types, since=since,
                            type_filter=tuple(b.type_filter), elements=tuple(b.elements))
    policy = PollPolicy(min_wait=b.min_poll_seconds, max_retry_after=b.max_retry_after_seconds,
                        max_total=b.max_wait_minutes * 60)
    return BulkExport(client=client, store=ctx.store, state_dir=state_dir, request=request, policy=policy,
                      download_retries=b.download_retries)


def bulk_state_dir(ctx: RunContext) -> str:
    return join(ctx.staging_root, ctx.spec.name, "bulk")


def ingest_options(ctx: RunContext, keyer: Keyer) -> dict:
    """The spec's keyword arguments of an ingest function (see :meth:`Source.run`)."""
    from .flatteners import ValueRules

    source = ctx.spec.source
    rules = ValueRules(source.text_codes, dict(source.value_ranges), tuple(source.value_range_default),
                       text_columns=source.text_columns)
    return dict(keyer=keyer, store=ctx.store, resources=list(source.resources), value_rules=rules,
                views=load_views(list(source.views), ctx.base_dir),
                validate_sample_rate=source.validate_sample_rate,
                validate_max_per_type=source.validate_max_per_type, engine=source.engine,
                on_dangling=source.on_dangling)


# --------------------------------------------------------------------------------------------------
# Sharded ingest of an NDJSON extract (:mod:`.sharded`): plan, one task per shard, merge
# --------------------------------------------------------------------------------------------------
def shards_uri(ctx: RunContext) -> str:
    return ctx.uri("ingest", "shards")


def plan_for_run(ctx: RunContext, n: int) -> dict:
    """The run's shard plan (:func:`.sharded.plan_shards`), also written to ``ingest/shards/plan.json``."""
    from .sharded import plan_shards

    source = ctx.spec.source
    if source.kind != "fhir_ndjson":
        raise ExtractError(f"sharded ingest reads fhir_ndjson extracts, not {source.kind!r}")
    plan = plan_shards(ctx.source_uri, ctx.store, n=n, resources=list(source.resources),
                       views=load_views(list(source.views), ctx.base_dir))
    for shard in plan["shards"]:
        shard["uri"] = join(shards_uri(ctx), f"{shard['index']:04d}")
    ctx.store.write_json(join(shards_uri(ctx), "plan.json"), plan)
    return plan


def shard_for_run(ctx: RunContext, keyer: Keyer, shard: dict) -> dict:
    from .sharded import ingest_shard

    return ingest_shard(shard, shard["uri"], max_line_bytes=ctx.spec.source.max_line_bytes,
                        **ingest_options(ctx, keyer))


def merge_for_run(ctx: RunContext, keyer: Keyer, results: list[dict]) -> dict:
    """Merge the shards into ``ctx.uri("ingest")`` (the one-process outputs and report). The caller removes
    the shards (:func:`shards_uri`) once everything after the merge is done too (a retried merge needs them)."""
    from .sharded import merge

    plan = ctx.store.read_json(join(shards_uri(ctx), "plan.json"))
    return merge(plan, results, ctx.uri("ingest"), max_line_bytes=ctx.spec.source.max_line_bytes,
                 extra_report={"source_kind": "fhir_ndjson"}, **ingest_options(ctx, keyer))


# --------------------------------------------------------------------------------------------------
# Sources: one class per kind
# --------------------------------------------------------------------------------------------------
class Source:
    """One ``source.kind``. :meth:`ingest` flattens a run's source into ``ctx.uri("ingest")`` and returns the
    ingest report; a subclass names its ``kind`` and implements :meth:`run`."""

    kind: ClassVar[str]

    def ingest(self, ctx: RunContext, keyer: Keyer) -> dict:
        return self.run(ctx, ctx.uri("ingest"), ingest_options(ctx, keyer))

    def run(self, ctx: RunContext, out_uri: str, options: dict) -> dict:
        """Ingest into ``out_uri``. ``options``: the spec's keyword arguments of an ingest function
        (``keyer``, ``store``, ``resources``, ``views`` (loaded), ``validate_sample_rate``,
        ``validate_max_per_type``, ``engine``, ``on_dangling``)."""
        raise NotImplementedError


class NdjsonSource(Source):
    """``<Type>*.ndjson[.gz]`` files (:mod:`.fhir_ndjson`)."""

    kind = "fhir_ndjson"

    def run(self, ctx: RunContext, out_uri: str, options: dict) -> dict:
        from .fhir_ndjson import ingest_extract

        return ingest_extract(ctx.source_uri, out_uri, max_line_bytes=ctx.spec.source.max_line_bytes,
                              extra_report={"source_kind": self.kind}, **options)


class BundleSource(Source):
    """Bundle JSON files (:mod:`.bundle`)."""

    kind = "fhir_bundle"

    def run(self, ctx: RunContext, out_uri: str, options: dict) -> dict:
        from .bundle import ingest_bundles

        return ingest_bundles(ctx.source_uri, out_uri, **options)


class EhrSource(Source):
    """Flat EHR tables mapped onto the flattened tables by ``source.ehr`` (:mod:`.ehr`)."""

    file_format: ClassVar[str]

    def run(self, ctx: RunContext, out_uri: str, options: dict) -> dict:
        from .ehr import ingest_ehr

        return ingest_ehr(ctx.source_uri, out_uri, mapping=ctx.spec.source.ehr, keyer=options["keyer"],
                          store=ctx.store, file_format=self.file_format, on_dangling=options["on_dangling"])


class EhrCsvSource(EhrSource):
    kind = "ehr_csv"
    file_format = "csv"


class EhrParquetSource(EhrSource):
    kind = "ehr_parquet"
    file_format = "parquet"


class TableSource(Source):
    """One flat table, one row per patient (:mod:`.table`): a file, or ``source.query`` on the run's SQL reader
    (``ctx.sql_reader``: the Airflow task's DbApiHook) or on the SQLAlchemy URL in ``source.uri``."""

    kind = "table"

    def ingest(self, ctx: RunContext, keyer: Keyer) -> dict:
        from .table import ingest_table

        return ingest_table(ctx.spec.source, ctx.source_uri, ctx.uri("ingest"), keyer=keyer, store=ctx.store,
                            sql_reader=getattr(ctx, "sql_reader", None))


class FhirServerSource(Source):
    """A FHIR server (``source.base_url``, or the connection's): a client for :meth:`fetch`, closed after."""

    def run(self, ctx: RunContext, out_uri: str, options: dict) -> dict:
        source = ctx.spec.source
        client = fhir_client_for(source, ctx.fhir_auth or auth_from_env(), ctx.fhir_base_url or source.base_url)
        try:
            return self.fetch(ctx, client, out_uri, options)
        finally:
            client.close()

    def fetch(self, ctx: RunContext, client: Any, out_uri: str, options: dict) -> dict:
        raise NotImplementedError


class BulkSource(FhirServerSource):
    """A Bulk Data ``$export``, resumed where the deferrable export task left it, merged into the snapshot
    of earlier exports (``bulk.incremental``); the whole current snapshot is ingested."""

    kind = "fhir_bulk"

    def fetch(self, ctx: RunContext, client: Any, out_uri: str, options: dict) -> dict:
        import pyarrow as pa

        from synthfactory.fhir.normalize import fast_key

        from .bulk import BulkExportError
        from .fhir_ndjson import ingest_extract

        export = bulk_export_for(ctx, client)
        state = export.start()
        state = export.wait(state)          # returns at once when the deferrable task already has the manifest
        if state.get("phase") == "downloading":
            state = export.download(state, on_count_mismatch=ctx.spec.source.bulk.on_count_mismatch)
        outcomes = export.outcomes(state)
        sev = outcomes["by_severity"]
        fatal = sev.get("fatal", 0) + sev.get("error", 0)
        if fatal:
            raise BulkExportError(
                f"bulk export finished with {fatal} error-severity OperationOutcome issue(s) "
                f"(by code: {outcomes['by_code']}); the files are in {export.files_uri(state)}")
        if sev.get("warning"):
            log.warning("bulk export reported %d warning(s): %s", sev["warning"], outcomes["by_code"])
        deletions = export.deletions(state)
        manifest = state.get("manifest") or {}
        extra = {"source_kind": self.kind,
                 "export": {"status_url_host": client.base_url.split("/")[2] if "://" in client.base_url else "",
                            "transactionTime": manifest.get("transactionTime"),
                            "since": export.request.since, "files": len(state["files"]),
                            "outputs": sum(1 for f in state["files"].values() if f["kind"] == "output"),
                            "outcomes": outcomes, "deleted": len(deletions),
                            "deleted_repeats": export.deletion_repeats,
                            "count_mismatches": state.get("count_mismatches") or [],
                            "restarted_from": state.get("restarted_from"),
                            "resumed_downloads": sum(f.get("resumed", 0) or 0 for f in state["files"].values()),
                            "http": dict(client.stats)}}
        from .snapshot import merge_snapshot

        root = export.files_uri(state)
        snapshot = merge_snapshot(
            ctx.store, bulk_state_dir(ctx),
            [join(root, f["name"]) for f in state["files"].values() if f["kind"] == "output"], deletions,
            export_id=state["export_id"], transaction_time=manifest.get("transactionTime"),
            incremental=bool(export.request.since))
        extra["export"]["snapshot"] = {k: snapshot.get(k) for k in (
            "export_id", "base", "incremental", "resources", "counts", "changed", "replaced", "deleted_applied",
            "carried_over", "unmatched_lines", "duplicate_lines", "duplicate_identical", "duplicate_conflicting")}
        # ingest the whole current extract (the previous snapshot with this export merged in), not just the delta
        report = ingest_extract(snapshot["uri"], out_uri, max_line_bytes=ctx.spec.source.max_line_bytes,
                                extra_report=extra, pre_quarantine=snapshot.get("quarantine") or (), **options)
        if deletions:
            key = fast_key(options["keyer"])
            table = pa.table({"resource_type": [t for t, _ in deletions], "key": [key(t, i) for t, i in deletions]})
            ctx.store.write_table(join(out_uri, "deleted.parquet"), table)
        export.finish(state)
        return report


class SearchSource(FhirServerSource):
    """FHIR REST search per type, following ``next`` links, into NDJSON files of a temporary folder."""

    kind = "fhir_search"

    def fetch(self, ctx: RunContext, client: Any, out_uri: str, options: dict) -> dict:
        from .fhir_ndjson import ingest_extract
        from .rest import search_to_ndjson

        source = ctx.spec.source
        tmp = tempfile.mkdtemp(prefix="synthfactory-search-")
        try:
            types = list(dict.fromkeys([*source.resources, *(v["resource"] for v in options["views"])]))
            stats = search_to_ndjson(client, types, tmp, params=source.search.params, page_size=source.search.page_size,
                                     max_pages=source.search.max_pages)
            stats["http"] = dict(client.stats)
            return ingest_extract(tmp, out_uri, max_line_bytes=source.max_line_bytes,
                                  extra_report={"source_kind": self.kind, "search": stats}, **options)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


#: ``source.kind`` -> its :class:`Source`
SOURCES: dict[str, type[Source]] = {cls.kind: cls for cls in (
    NdjsonSource, BundleSource, BulkSource, SearchSource, EhrCsvSource, EhrParquetSource, TableSource)}
HTTP_KINDS = frozenset(k for k, cls in SOURCES.items() if issubclass(cls, FhirServerSource))
FILE_KINDS = frozenset(SOURCES) - HTTP_KINDS


def ingest_for_run(ctx: RunContext, keyer: Keyer) -> dict:
    """Run the ingest of ``ctx.spec.source`` into ``ctx.uri('ingest')``: the :class:`Source` of its kind."""
    kind = ctx.spec.source.kind
    source_cls = SOURCES.get(kind)
    if source_cls is None:
        raise ExtractError(f"source.kind: unsupported kind {kind!r}")
    return source_cls().ingest(ctx, keyer)
