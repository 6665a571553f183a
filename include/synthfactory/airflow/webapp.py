"""The "Synthetic datasets" page: a FastAPI app the synthfactory plugin mounts in Airflow's API server.

Routes (below ``/synthfactory``):

- ``GET /datasets``: an HTML page listing each spec's released versions, newest first, with rows,
  synthesizer, gate profile and figures, and a link to each version's data card and manifest;
- ``GET /api/releases``: the same as JSON;
- ``GET /datasets/{dataset}/{version}/datacard``: the release's ``reports/datacard.html``;
- ``GET /datasets/{dataset}/{version}/manifest.json``: the release's manifest;
- ``GET /datasets/{dataset}/runs/{run_id}/datacard``: the data card of a run **awaiting approval**, read from
  staging (``<staging>/<dataset>/runs/<run id>/reports/datacard.html``, the card the gate rendered and
  leak-scanned), for the approver: the link in the approval request. Only to a signed-in user Airflow lets
  respond to that run's approval (``is_authorized_dag(PUT, HITL_DETAIL)`` on the dataset's DAG, and one of
  its assigned users when it names any, as Airflow's own HITL endpoint checks), only for a run that has an
  approval request, and only that one file (a run id that is not a plain Airflow run id is refused). Staging
  is read with ``$SYNTHFACTORY_STAGING_READER_CONN`` when set (a read-only connection to the staging
  bucket), else the spec's ``staging.connection_id`` (S3), else the local staging folder.

The specs are found as the DAG file finds them (:mod:`synthfactory.airflow.specs_folder`:
``$SYNTHFACTORY_SPECS_DIR``, else ``<[core] dags_folder>/../include/datasets``, ...). A spec that does not load
(invalid, not UTF-8) is listed as invalid by its file name only, never the server's path.

It reads the sandbox bucket (only released, gate-approved synthetic data: never the staging/PHI side) through an
``S3Hook`` on a **reader** connection: ``$SYNTHFACTORY_SANDBOX_READER_CONN``, else the connection
``sandbox_s3_reader`` when it is defined, else (with a logged warning) each spec's ``release.connection_id``, the
sandbox writer. Inside Airflow, every route requires a signed-in Airflow user (the UI's JWT cookie, or a bearer
token). The module imports only FastAPI and synthfactory's light modules; S3Hook and Airflow's security module
load on the first request.
"""

from __future__ import annotations

import html
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from synthfactory.airflow import specs_folder as specs_location
from synthfactory.release import catalog
from synthfactory.release.layout import MANIFEST, SandboxLayout, is_version
from synthfactory.spec import NAME_RE, DatasetSpec, SpecError, discover_specs, load_spec

log = logging.getLogger(__name__)

URL_PREFIX = "/synthfactory"
DAG_PREFIX = "synthfactory_"
APPROVAL_TASK_ID = "approve"  # synthfactory.airflow.operators.APPROVAL_TASK_ID (that module imports the SDK)
STAGING_READER_ENV = "SYNTHFACTORY_STAGING_READER_CONN"
#: an Airflow run id as a single path segment: word characters and . : + - ~ @, never '..', '/' or '\'
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+~@-]{0,249}$")
READER_ENV = "SYNTHFACTORY_SANDBOX_READER_CONN"
READER_CONN_ID = "sandbox_s3_reader"
# A data card is a standalone, self-contained HTML report: let it show its own inline styles and images,
# nothing else (no scripts, no fetches, no forms).
DATACARD_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:"

ClientFactory = Callable[[str], Any]


def specs_dir() -> Path:
    """The specs folder, by the DAG file's rule; raises NoSpecsFound (naming the folders searched) when empty."""
    return specs_location.find()


def s3hook_client(conn_id: str) -> Any:
    """boto3 S3 client of an Airflow AWS connection (credentials and endpoint_url from the connection)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=conn_id).get_conn()


def airflow_connection_exists(conn_id: str) -> bool:
    """Whether Airflow knows the connection (environment, secrets backend or metadata database)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    try:
        S3Hook.get_connection(conn_id)
    except Exception as err:  # noqa: BLE001 - AirflowNotFoundException (its module moved between versions)
        if type(err).__name__ != "AirflowNotFoundException":
            log.warning("synthfactory page: cannot look up connection %r: %s", conn_id, err)
        return False
    return True


class ReaderConnection:
    """The connection the page reads the sandbox with: ``$SYNTHFACTORY_SANDBOX_READER_CONN``, else
    ``sandbox_s3_reader`` when defined, else the spec's writer connection (a warning in the log, once per
    connection). Looked up once per app: restart the API server after adding the reader connection."""

    def __init__(self, exists: Callable[[str], bool]):
        self._exists = exists
        self._resolved: str | None | bool = False  # False: not looked up yet; None: no reader defined
        self._warned: set[str] = set()

    def reader(self) -> str | None:
        if self._resolved is False:
            explicit = os.environ.get(READER_ENV)
            self._resolved = explicit or (READER_CONN_ID if self._exists(READER_CONN_ID) else None)
        return self._resolved  # type: ignore[return-value]

    def for_spec(self, spec: DatasetSpec) -> str:
        reader = self.reader()
        if reader:
            return reader
        writer = spec.release.connection_id
        if writer not in self._warned:
            self._warned.add(writer)
            log.warning("synthfactory page: no sandbox reader connection (set $%s or define the connection %r, "
                        "read-only on the sandbox bucket); reading releases with the writer connection %r",
                        READER_ENV, READER_CONN_ID, writer)
        return writer


async def airflow_user(request: Request) -> Any:
    """Require a signed-in Airflow user (same check as Airflow's own ``requires_authenticated``)."""
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    return await get_user(request, None, await bearer_scheme(request))


def pending_datacard_path(dataset: str, run_id: str) -> str:
    """The route of a run's pending data card (the Airflow run id percent-encoded as one path segment)."""
    from urllib.parse import quote

    return f"{URL_PREFIX}/datasets/{dataset}/runs/{quote(run_id, safe='')}/datacard"


def is_run_id(run_id: str) -> bool:
    return bool(RUN_ID_RE.match(run_id)) and ".." not in run_id


async def airflow_approval_access(request: Request, dataset: str, run_id: str) -> None:
    """Allow only a user who may respond to the approval request of ``run_id`` (Airflow's HITL rule): 401 without
    a login, 403 when the auth manager does not let the user update the DAG's HITL details or the request is
    assigned to other users, 404 when the run has no approval request."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from sqlalchemy import select
    from sqlalchemy.orm import joinedload
    from starlette.concurrency import run_in_threadpool

    from synthfactory.airflow.compat import metadata_db

    DagModel, TaskInstance, create_session = metadata_db()  # noqa: N806 - Airflow's class names

    user = await airflow_user(request)
    dag_id = DAG_PREFIX + dataset
    manager = get_auth_manager()

    def check() -> None:
        details = DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id))
        if not manager.is_authorized_dag(method="PUT", access_entity=DagAccessEntity.HITL_DETAIL, details=details,
                                         user=user):
            raise HTTPException(403, "Forbidden: you may not respond to this DAG's approval requests")
        with create_session() as session:
            ti = session.scalar(select(TaskInstance).where(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id,
                TaskInstance.task_id == APPROVAL_TASK_ID).options(joinedload(TaskInstance.hitl_detail)))
            detail = getattr(ti, "hitl_detail", None)
            if detail is None:
                raise HTTPException(404, "this run has no approval request")
            assigned = {str(u["id"]) for u in detail.assigned_users or []}
        if assigned and not manager.is_authorized_hitl_task(assigned_users=assigned, user=user):
            raise HTTPException(403, "Forbidden: this approval request is assigned to other users")

    await run_in_threadpool(check)


def staging_store(spec: DatasetSpec) -> Any:
    """The store the page reads a pending card from: ``$SYNTHFACTORY_STAGING_READER_CONN`` (S3, read-only), else
    the PHI-side store the tasks use (the spec's staging connection, or the local staging folder)."""
    from synthfactory.storage import Store, is_s3

    reader = os.environ.get(STAGING_READER_ENV)
    if reader and is_s3(spec.staging.uri):
        return Store(s3=s3hook_client(reader))
    from synthfactory.airflow.hooks import phi_store

    return phi_store(spec)


def _without_paths(message: str, path: Path) -> str:
    """A spec error as the page shows it: the file's name instead of the server's path to it."""
    for full in sorted({str(path), str(path.resolve())}, key=len, reverse=True):
        message = message.replace(full, path.name)
    for parent in sorted({str(path.parent), str(path.resolve().parent)}, key=len, reverse=True):
        message = message.replace(parent + os.sep, "")
    return message


def _load_specs(folder: Path) -> tuple[dict[str, DatasetSpec], dict[str, str], dict[str, Path]]:
    """The folder's specs by name, the file name → error of each one that does not load (invalid, not
    UTF-8, unreadable): one bad file never hides the others; and each spec's file."""
    specs, errors, paths = {}, {}, {}
    for path in discover_specs(folder):
        try:
            spec = load_spec(path)
            specs[spec.name] = spec
            paths[spec.name] = path
        except SpecError as err:
            errors[path.name] = _without_paths(str(err), path)
        except (OSError, ValueError) as err:  # e.g. UnicodeDecodeError, PermissionError
            errors[path.name] = f"{path.name}: cannot read it ({type(err).__name__})"
            log.warning("synthfactory page: spec %s: %s", path, err)
    return specs, errors, paths


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Synthetic datasets</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #1b1f24; }}
h1 {{ font-size: 1.4rem; }} h2 {{ font-size: 1.1rem; margin-top: 2rem; }}
table {{ border-collapse: collapse; font-size: .9rem; }}
th, td {{ border-bottom: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; }}
th {{ background: #f6f8fa; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.muted {{ color: #57606a; }} .err {{ color: #b42318; }}
</style></head><body>
<h1>Synthetic datasets</h1>
<p class="muted">Approved synthetic releases in the sandbox, newest first. Every version passed the quality and
privacy gates shown.</p>
{body}
</body></html>"""


def _render(datasets: list[dict], root: str, spec_errors: dict[str, str], notice: str | None = None) -> str:
    parts = []
    heads = ["version", "rows", "synthesizer", "profile", "quality", "expectations", "exact match", "DCR share",
             "DCR ratio", "leak scan clean", "published", ""]
    for d in datasets:
        e = html.escape
        parts.append(f"<h2 id=\"{e(d['dataset'])}\">{e(d['dataset'])}</h2>"
                     f"<p class=\"muted\">{e(d['description'])} · <code>{e(d['location'])}</code></p>")
        if d.get("error"):
            parts.append(f"<p class=\"err\">could not read the sandbox: {e(d['error'])}</p>")
            continue
        if not d["releases"]:
            parts.append("<p class=\"muted\">no release yet</p>")
            continue
        rows = []
        for r in d["releases"]:
            f = r["figures"]
            base = f"{root}/datasets/{e(d['dataset'])}/{e(r['version'])}"
            links = [f"<a href=\"{base}/manifest.json\">manifest</a>"]
            if r["datacard"]:
                links.insert(0, f"<a href=\"{base}/datacard\">data card</a>")
            cells = [e(str(r["version"])), _fmt(r["rows"]), e(_fmt(r["synthesizer"])), e(_fmt(r["profile"])),
                     *(_fmt(f.get(k)) for k in catalog.FIGURES), e(_fmt(r["published_at"])), " · ".join(links)]
            rows.append("<tr>" + "".join(
                f"<td class=\"num\">{c}</td>" if i in (1, 4, 5, 6, 7, 8) else f"<td>{c}</td>"
                for i, c in enumerate(cells)) + "</tr>")
        parts.append("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr></thead><tbody>"
                     + "".join(rows) + "</tbody></table>")
    if spec_errors:
        parts.append("<h2 id=\"invalid-specs\">Invalid specs</h2>")
    for name, err in sorted(spec_errors.items()):
        shown = err[len(name) + 2:] if err.startswith(name + ": ") else err
        parts.append(f"<p class=\"err\"><code>{html.escape(name)}</code>: {html.escape(shown)}</p>")
    if notice:
        parts.append(f"<p class=\"err\">{html.escape(notice)}</p>")
    elif not datasets and not spec_errors:
        parts.append("<p class=\"muted\">no dataset specs found</p>")
    return PAGE.format(body="\n".join(parts))


def create_app(*, specs_folder: str | Path | None = None, client_factory: ClientFactory | None = None,
               connection_exists: Callable[[str], bool] | None = None, require_auth: bool = True,
               limit: int = 25, approval_access: Callable[..., Any] | None = None,
               staging_factory: Callable[[DatasetSpec], Any] | None = None) -> FastAPI:
    """The app. ``client_factory(conn_id)`` returns a boto3 S3 client (default: S3Hook on that connection);
    ``connection_exists(conn_id)`` says whether Airflow defines a connection (for the reader's fallback);
    ``require_auth=False`` is for tests and for running the app outside Airflow. ``approval_access(request,
    dataset, run_id)`` (awaitable) allows or refuses (HTTPException) the pending card (default: Airflow's HITL
    rule, :func:`airflow_approval_access`; with ``require_auth=False`` and none given, no check);
    ``staging_factory(spec)`` returns the store staging is read with (default :func:`staging_store`)."""
    factory = client_factory or s3hook_client
    access = approval_access or (airflow_approval_access if require_auth else None)
    staging_for = staging_factory or staging_store
    readers = ReaderConnection(connection_exists or airflow_connection_exists)
    deps = [Depends(airflow_user)] if require_auth else []
    app = FastAPI(title="synthfactory: synthetic datasets", dependencies=deps, docs_url=None, redoc_url=None,
                  openapi_url=None)

    def folder() -> Path:
        return Path(specs_folder) if specs_folder else specs_dir()

    def load() -> tuple[dict[str, DatasetSpec], dict[str, str], str | None]:
        try:
            specs, errors, _ = _load_specs(folder())
        except specs_location.NoSpecsFound as err:
            log.warning("synthfactory page: %s", err)
            return {}, {}, (f"no dataset specs found: set ${specs_location.ENV} on the API server to the specs "
                            f"folder, or put them in include/datasets next to the dags folder (the API server's "
                            f"log names the {len(err.searched)} folder(s) searched)")
        return specs, errors, None

    def spec_for(dataset: str, version: str) -> DatasetSpec:
        if not NAME_RE.match(dataset) or not is_version(version):
            raise HTTPException(404, "no such release")
        spec = load()[0].get(dataset)
        if spec is None:
            raise HTTPException(404, f"no dataset spec named {dataset!r}")
        return spec

    def collect() -> tuple[list[dict], dict[str, str], str | None]:
        specs, errors, notice = load()
        out = []
        for name, spec in sorted(specs.items()):
            conn_id = readers.for_spec(spec)
            d = {"dataset": name, "description": spec.description,
                 "location": SandboxLayout.for_spec(spec).dataset_uri,
                 "connection_id": conn_id, "releases": []}
            try:
                d["releases"] = catalog.s3_releases(factory(conn_id), spec, limit=limit)
            except Exception as err:  # one unreadable bucket must not hide the others
                code = getattr(err, "response", {}).get("Error", {}).get("Code")
                d["error"] = f"{type(err).__name__}{f' {code}' if code else ''} (connection {conn_id!r})"
                log.warning("synthfactory page: %s: %s", name, err)
            out.append(d)
        return out, errors, notice

    @app.get("/datasets", response_class=HTMLResponse)
    def datasets_page(request: Request) -> HTMLResponse:
        data, errors, notice = collect()
        return HTMLResponse(_render(data, request.scope.get("root_path", ""), errors, notice))

    @app.get("/api/releases")
    def releases_json() -> JSONResponse:
        data, errors, notice = collect()
        body: dict[str, Any] = {"datasets": data, "spec_errors": errors}
        if notice:
            body["notice"] = notice
        return JSONResponse(body)

    @app.get("/datasets/{dataset}/{version}/manifest.json")
    def manifest(dataset: str, version: str) -> Response:
        spec = spec_for(dataset, version)
        data = catalog.s3_file(factory(readers.for_spec(spec)), spec, version, MANIFEST)
        if data is None:
            raise HTTPException(404, f"{dataset} {version}: no such release")
        return Response(data, media_type="application/json")

    @app.get("/datasets/{dataset}/{version}/datacard", response_class=HTMLResponse)
    def datacard(dataset: str, version: str) -> Response:
        spec = spec_for(dataset, version)
        data = catalog.s3_file(factory(readers.for_spec(spec)), spec, version, catalog.DATACARD)
        if data is None:
            return HTMLResponse(f"<!doctype html><p>{html.escape(dataset)} {html.escape(version)} has no data card "
                                f"(<code>{catalog.DATACARD}</code>) in the sandbox (not released, or released "
                                f"before data cards existed).</p>", status_code=404)
        return Response(data, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": DATACARD_CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/datasets/{dataset}/runs/{run_id}/datacard", response_class=HTMLResponse)
    async def pending_datacard(request: Request, dataset: str, run_id: str) -> Response:
        if not NAME_RE.match(dataset) or not is_run_id(run_id):
            raise HTTPException(404, "no such run")
        if access is not None:
            await access(request, dataset, run_id)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_pending_card, dataset, run_id)

    def _pending_card(dataset: str, run_id: str) -> Response:
        from synthfactory.context import project_root, resolve, safe_id
        from synthfactory.storage import join

        try:
            specs, _, paths = _load_specs(folder())
        except specs_location.NoSpecsFound:
            specs, paths = {}, {}
        spec = specs.get(dataset)
        if spec is None:
            raise HTTPException(404, f"no dataset spec named {dataset!r}")
        root = resolve(spec.staging.uri, project_root(paths[dataset]))
        uri = join(root, spec.name, "runs", safe_id(run_id), *catalog.DATACARD.split("/"))
        store = staging_for(spec)
        try:
            data = store.read_bytes(uri) if store.exists(uri) else None
        except Exception as err:  # noqa: BLE001 - unreachable staging: say so, never a traceback or the path
            log.warning("synthfactory page: pending card of %s run %s: %s", dataset, run_id, err)
            raise HTTPException(503, f"cannot read staging ({type(err).__name__})") from None
        if data is None:
            return HTMLResponse(f"<!doctype html><p>{html.escape(dataset)} run {html.escape(run_id)} has no data "
                                f"card in staging (the gate has not run, or refused before rendering it).</p>",
                                status_code=404)
        return Response(data, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": DATACARD_CSP, "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-store"})

    return app


app = create_app()
