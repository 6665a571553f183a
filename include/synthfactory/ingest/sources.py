"""The ingest stage's dispatch on ``source.kind``: every source ends in the same flattened tables.

=============  ===================================================================================
kind           what is read
=============  ===================================================================================
fhir_ndjson    ``<Type>*.ndjson[.gz]`` files in a folder or s3:// prefix (the default)
fhir_bundle    Bundle JSON files (transaction/batch/collection/searchset), ``urn:uuid:`` resolved
fhir_bulk      a FHIR Bulk Data ``$export`` (kick-off, polling, resumable downloads into staging)
fhir_search    FHIR REST search per type, following ``next`` links
ehr_csv        CSV tables with a column mapping (``source.ehr``; preset ``clinosim``)
ehr_parquet    Parquet tables with a column mapping
=============  ===================================================================================
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from synthfactory.storage import join

from .normalize import ExtractError

log = logging.getLogger(__name__)

__all__ = ["FILE_KINDS", "HTTP_KINDS", "ingest_for_run", "load_views", "auth_from_env", "bulk_export_for",
           "fhir_client_for"]

FILE_KINDS = frozenset({"fhir_ndjson", "fhir_bundle", "ehr_csv", "ehr_parquet"})
HTTP_KINDS = frozenset({"fhir_bulk", "fhir_search"})
AUTH_ENV = "SYNTHFACTORY_FHIR_AUTH"


def load_views(views: list, base_dir: str | None = None) -> list[dict]:
    """The spec's ``source.views``: inline ViewDefinitions, or .json/.yaml files (relative to ``base_dir``)."""
    from .views import load_view_file

    out = []
    for v in views or []:
        if isinstance(v, dict):
            out.append(v)
            continue
        path = Path(v)
        if not path.is_absolute():
            path = Path(base_dir or os.environ.get("SYNTHFACTORY_HOME") or os.getcwd()) / path
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


def bulk_export_for(ctx: Any, client: Any, *, since: str | None = None) -> Any:
    """The :class:`~.bulk.BulkExport` of a run (``ctx``: a pipeline RunContext). The request -- ``_type`` =
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
    views = load_views(list(source.views), getattr(ctx, "base_dir", None))
    types = tuple(dict.fromkeys([*source.resources, *(v["resource"] for v in views if isinstance(v.get("resource"), str))]))
    request = ExportRequest(level=b.level, group_id=b.group_id, types=types, since=since,
                            type_filter=tuple(b.type_filter), elements=tuple(b.elements))
    policy = PollPolicy(min_wait=b.min_poll_seconds, max_retry_after=b.max_retry_after_seconds,
                        max_total=b.max_wait_minutes * 60)
    return BulkExport(client=client, store=ctx.store, state_dir=state_dir, request=request, policy=policy,
                      download_retries=b.download_retries)


def ingest_for_run(ctx: Any, keyer: Any) -> dict:
    """Run the ingest of ``ctx.spec.source`` into ``ctx.uri('ingest')`` (``ctx`` is a pipeline RunContext)."""
    source = ctx.spec.source
    kind = source.kind
    out_uri = ctx.uri("ingest")
    views = load_views(list(source.views), getattr(ctx, "base_dir", None))
    common = dict(keyer=keyer, store=ctx.store, resources=list(source.resources), views=views,
                  validate_sample_rate=source.validate_sample_rate,
                  validate_max_per_type=source.validate_max_per_type, engine=source.engine,
                  on_dangling=source.on_dangling)
    if kind == "fhir_ndjson":
        from .fhir_ndjson import ingest_extract

        return ingest_extract(ctx.source_uri, out_uri, max_line_bytes=source.max_line_bytes,
                              extra_report={"source_kind": kind}, **common)
    if kind == "fhir_bundle":
        from .bundle import ingest_bundles

        return ingest_bundles(ctx.source_uri, out_uri, **common)
    if kind in ("ehr_csv", "ehr_parquet"):
        from .ehr import ingest_ehr

        return ingest_ehr(ctx.source_uri, out_uri, mapping=source.ehr, keyer=keyer, store=ctx.store,
                          file_format=kind.split("_")[1], on_dangling=source.on_dangling)
    if kind in HTTP_KINDS:
        auth = getattr(ctx, "fhir_auth", None) or auth_from_env()
        base_url = getattr(ctx, "fhir_base_url", None) or source.base_url
        client = fhir_client_for(source, auth, base_url)
        try:
            if kind == "fhir_bulk":
                return _bulk(ctx, source, client, out_uri, common)
            return _search(ctx, source, client, out_uri, common)
        finally:
            client.close()
    raise ExtractError(f"source.kind: unsupported kind {kind!r}")


def bulk_state_dir(ctx: Any) -> str:
    return join(ctx.staging_root, ctx.spec.name, "bulk")


def _bulk(ctx: Any, source: Any, client: Any, out_uri: str, common: dict) -> dict:
    import pyarrow as pa

    from .bulk import BulkExportError
    from .fhir_ndjson import ingest_extract
    from .normalize import fast_key

    export = bulk_export_for(ctx, client)
    state = export.start()
    state = export.wait(state)          # returns at once when the deferrable task already has the manifest
    if state.get("phase") == "downloading":
        state = export.download(state)
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
    extra = {"source_kind": "fhir_bulk",
             "export": {"status_url_host": client.base_url.split("/")[2] if "://" in client.base_url else "",
                        "transactionTime": manifest.get("transactionTime"),
                        "since": export.request.since, "files": len(state["files"]),
                        "outputs": sum(1 for f in state["files"].values() if f["kind"] == "output"),
                        "outcomes": outcomes, "deleted": len(deletions),
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
        "carried_over", "unmatched_lines")}
    # ingest the whole current extract (the previous snapshot with this export merged in), not just the delta
    report = ingest_extract(snapshot["uri"], out_uri, max_line_bytes=source.max_line_bytes,
                            extra_report=extra, **common)
    if deletions:
        key = fast_key(common["keyer"])
        table = pa.table({"resource_type": [t for t, _ in deletions], "key": [key(t, i) for t, i in deletions]})
        ctx.store.write_table(join(out_uri, "deleted.parquet"), table)
    export.finish(state)
    return report


def _search(ctx: Any, source: Any, client: Any, out_uri: str, common: dict) -> dict:
    from .fhir_ndjson import ingest_extract
    from .rest import search_to_ndjson

    tmp = tempfile.mkdtemp(prefix="synthfactory-search-")
    try:
        types = list(dict.fromkeys([*source.resources, *(v["resource"] for v in common["views"])]))
        stats = search_to_ndjson(client, types, tmp, params=source.search.params, page_size=source.search.page_size,
                                 max_pages=source.search.max_pages)
        stats["http"] = dict(client.stats)
        return ingest_extract(tmp, out_uri, max_line_bytes=source.max_line_bytes,
                              extra_report={"source_kind": "fhir_search", "search": stats}, **common)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
