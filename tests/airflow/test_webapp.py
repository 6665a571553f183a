"""The "Synthetic datasets" UI page (plugin FastAPI app), its Airflow registration, and the data card link."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from synthfactory.testing import dev
from tests.conftest import write_spec


@pytest.fixture()
def page(released_sandbox, monkeypatch):
    """The app as the API server runs it (S3Hook on the spec's release connection), without Airflow's login."""
    from synthfactory.airflow.webapp import create_app

    monkeypatch.setenv(f"AIRFLOW_CONN_{dev.SANDBOX_CONN_ID.upper()}", dev.aws_conn_uri_json(released_sandbox["endpoint"]))
    app = create_app(specs_folder=released_sandbox["spec_path"].parent, require_auth=False)
    return TestClient(app, root_path="/synthfactory")


def _release(sandbox) -> tuple[str, dict]:
    client, spec = sandbox["client"], sandbox["spec"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=spec.release.bucket,
                                                       Prefix=f"releases/{spec.name}/")["Contents"]]
    (key,) = [k for k in keys if k.endswith("/manifest.json") and "/_" not in k]
    return key.split("/")[2], json.loads(client.get_object(Bucket=spec.release.bucket, Key=key)["Body"].read())


def test_page_lists_release_with_gate_figures(page, released_sandbox):
    version, manifest = _release(released_sandbox)
    resp = page.get("/datasets")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert "<h2 id=\"ops_listing\">ops_listing</h2>" in html
    assert f"<td>{version}</td>" in html and '<td class="num">120</td>' in html
    f = manifest["figures"]
    for key in ("quality_score", "expectation_success_ratio", "dcr_share"):
        assert f'<td class="num">{f[key]:.4g}</td>' in html, key
    assert f"/synthfactory/datasets/ops_listing/{version}/manifest.json" in html
    has_card = any(e["path"] == "reports/datacard.html" for e in manifest["files"])
    assert (f"/synthfactory/datasets/ops_listing/{version}/datacard" in html) is has_card


def test_json_manifest_and_datacard_routes(page, released_sandbox):
    version, manifest = _release(released_sandbox)
    (d,) = page.get("/api/releases").json()["datasets"]
    (r,) = d["releases"]
    assert r["version"] == version and r["rows"] == 120 and r["figures"] == manifest["figures"]
    assert page.get(f"/datasets/ops_listing/{version}/manifest.json").json() == manifest
    card = page.get(f"/datasets/ops_listing/{version}/datacard")
    if any(e["path"] == "reports/datacard.html" for e in manifest["files"]):
        assert card.status_code == 200 and card.headers["content-type"].startswith("text/html")
        assert "sandbox" in card.headers["content-security-policy"] and "<html" in card.text.lower()
    else:
        assert card.status_code == 404


def test_missing_things_are_404_not_500(page):
    assert page.get("/datasets/ops_listing/v20990101T000000Z/datacard").status_code == 404
    assert page.get("/datasets/ops_listing/v20990101T000000Z/manifest.json").status_code == 404
    assert page.get("/datasets/no_such_dataset/v20990101T000000Z/datacard").status_code == 404
    assert page.get("/datasets/ops_listing/..%2F..%2Fsecret/datacard").status_code == 404
    assert page.get("/datasets/ops_listing/not-a-version/manifest.json").status_code == 404


def test_unreadable_sandbox_is_shown_per_dataset(tmp_path):
    from synthfactory.airflow.webapp import create_app

    write_spec(tmp_path, "broken_conn", tmp_path, tmp_path / "staging")

    def factory(conn_id):
        raise RuntimeError("no such connection")

    client = TestClient(create_app(specs_folder=tmp_path, client_factory=factory, require_auth=False))
    resp = client.get("/datasets")
    assert resp.status_code == 200
    assert "could not read the sandbox: RuntimeError (connection &#x27;sandbox_s3&#x27;)" in resp.text


def test_requires_an_airflow_login_by_default(tmp_path):
    from synthfactory.airflow.webapp import create_app

    client = TestClient(create_app(specs_folder=tmp_path))
    assert client.get("/datasets").status_code == 401
    assert client.get("/datasets/x_y/v1/datacard").status_code == 401


def test_plugin_registers_app_view_and_link():
    from airflow import plugins_manager
    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse
    from fastapi import FastAPI

    from synthfactory.airflow.links import DataCardLink
    from synthfactory.airflow.plugin import SynthFactoryPlugin

    (app_entry,) = SynthFactoryPlugin.fastapi_apps
    assert app_entry["url_prefix"] == "/synthfactory" and app_entry["name"]
    (view,) = SynthFactoryPlugin.external_views
    ExternalViewResponse.model_validate(view)  # the keys Airflow's UI reads
    assert view["href"] == "/synthfactory/datasets" and view["url_route"] and view["destination"] == "nav"
    assert any(isinstance(link, DataCardLink) for link in SynthFactoryPlugin.operator_extra_links)

    # Airflow's own loader finds the plugin in plugins/, and the API server mounts the app where we expect
    apps, _ = plugins_manager.get_fastapi_plugins()
    assert any(a["url_prefix"] == "/synthfactory" for a in apps)
    from airflow.api_fastapi.app import init_plugins

    host = FastAPI()
    init_plugins(host)
    assert TestClient(host).get("/synthfactory/datasets").status_code == 401  # mounted, behind the login


def test_plugin_import_is_light():
    code = ("import sys, airflow.plugins_manager; before = set(sys.modules); import synthfactory.airflow.plugin; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(new & {'pandas', 'pyarrow', 'sdv', 'torch', 'great_expectations', 'sdmetrics', 'boto3'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


class _TI:
    def __init__(self, dag_id, summary, logical_date=None):
        self.dag_id, self.task_id, self._summary = dag_id, "release", summary
        self._ctx = {"dag_run": SimpleNamespace(logical_date=logical_date, run_after=logical_date)}

    def xcom_pull(self, task_ids):
        return self._summary

    def get_template_context(self):
        return self._ctx


def test_datacard_link_points_at_the_app_route():
    from datetime import datetime, timezone

    from synthfactory.airflow.links import DataCardLink

    link = DataCardLink()
    assert link.name == "Data card"
    assert link.get_link(None, ti_key=_TI("synthfactory_cohort_demo", {"version": "v20260101T000000Z"})) \
        .endswith("/synthfactory/datasets/cohort_demo/v20260101T000000Z/datacard")
    # the gate's summary: its datacard_uri's version folder, else the run's version
    gate = {"approved": True, "datacard_uri": "s3://b/releases/cohort_demo/v20260202T000000Z/reports/datacard.html"}
    assert link.get_link(None, ti_key=_TI("synthfactory_cohort_demo", gate)).endswith(
        "/cohort_demo/v20260202T000000Z/datacard")
    when = datetime(2026, 3, 3, 12, 0, tzinfo=timezone.utc)
    assert link.get_link(None, ti_key=_TI("synthfactory_cohort_demo", {"approved": True}, when)).endswith(
        "/cohort_demo/v20260303T120000Z/datacard")
    assert link.get_link(None, ti_key=_TI("synthfactory_cohort_demo", {"approved": False})) == ""
    assert link.get_link(None, ti_key=_TI("synthfactory_cohort_demo", None)) == ""
    assert link.get_link(None, ti_key=_TI("other_dag", {"version": "v1"})) == ""
