"""The approver sees the pending run's data card (issue #21, item 1): the plugin route serves the card the gate
wrote to staging, read-only, only to a user allowed to answer that run's approval, and nothing else from
staging. Airflow's own authorization of the route is exercised end to end in tests/e2e/test_approval_e2e.py."""

from __future__ import annotations

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from synthfactory.airflow.webapp import create_app, pending_datacard_path
from tests.conftest import write_spec

RUN = "manual__2026-01-01T00:00:00+00:00"
CARD = b"<!DOCTYPE html><html><body><h1>Data card: pend_ds</h1></body></html>"


@pytest.fixture()
def staged(tmp_path):
    specs, staging = tmp_path / "specs", tmp_path / "staging"
    write_spec(specs, "pend_ds", tmp_path, staging)
    run_dir = staging / "pend_ds" / "runs" / "manual__2026-01-01T00_00_00_00_00"  # safe_id of RUN
    (run_dir / "reports").mkdir(parents=True)
    (run_dir / "reports" / "datacard.html").write_bytes(CARD)
    (run_dir / "model").mkdir()
    (run_dir / "model" / "train.parquet").write_bytes(b"PHI")
    (staging / "pend_ds" / "reports").mkdir(parents=True)  # what a run id of '..' would reach
    (staging / "pend_ds" / "reports" / "datacard.html").write_bytes(b"not a run's card")
    return specs


class _Access:
    """Records the checks and refuses users other than ``allowed``."""

    def __init__(self, allowed: str = "reviewer"):
        self.allowed, self.seen = allowed, []

    async def __call__(self, request, dataset, run_id):
        self.seen.append((dataset, run_id))
        if request.headers.get("x-user") != self.allowed:
            raise HTTPException(403, "Forbidden")


def _client(specs, access):
    return TestClient(create_app(specs_folder=specs, require_auth=False, approval_access=access),
                      root_path="/synthfactory")


def test_the_approver_gets_the_pending_card_from_staging(staged):
    access = _Access()
    client = _client(staged, access)
    path = pending_datacard_path("pend_ds", RUN)
    assert path == "/synthfactory/datasets/pend_ds/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00/datacard"
    resp = client.get(path[len("/synthfactory"):], headers={"x-user": "reviewer"})
    assert resp.status_code == 200 and resp.content == CARD
    assert "sandbox" in resp.headers["content-security-policy"] and resp.headers["cache-control"] == "no-store"
    assert access.seen == [("pend_ds", RUN)]  # the check saw the real Airflow run id


def test_others_are_refused(staged):
    client = _client(staged, _Access())
    path = pending_datacard_path("pend_ds", RUN)[len("/synthfactory"):]
    assert client.get(path).status_code == 403
    assert client.get(path, headers={"x-user": "someone-else"}).status_code == 403


def test_without_a_login_it_is_401(staged):
    client = TestClient(create_app(specs_folder=staged))  # inside Airflow: the login is required first
    assert client.get(pending_datacard_path("pend_ds", RUN)[len("/synthfactory"):]).status_code == 401


@pytest.mark.parametrize("run_id", ["..", "%2E%2E", "..%2F..%2Fpend_ds", "run%2F..%2F..", "a..b", ".hidden",
                                    "x%5C..%5Cy", "%00"])
def test_path_escapes_are_refused_before_any_check(staged, run_id):
    access = _Access()
    client = _client(staged, access)
    resp = client.get(f"/datasets/pend_ds/runs/{run_id}/datacard", headers={"x-user": "reviewer"})
    assert resp.status_code == 404 and b"not a run's card" not in resp.content
    assert access.seen == []


def test_only_the_card_is_served_and_missing_things_are_404(staged):
    client = _client(staged, _Access())
    ok = {"x-user": "reviewer"}
    assert client.get("/datasets/pend_ds/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00/train.parquet",
                      headers=ok).status_code == 404
    assert client.get("/datasets/pend_ds/runs/other_run/datacard", headers=ok).status_code == 404
    assert client.get("/datasets/no_such/runs/other_run/datacard", headers=ok).status_code == 404
    assert client.get("/datasets/Bad-Name/runs/other_run/datacard", headers=ok).status_code == 404
