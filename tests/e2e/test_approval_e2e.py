"""End to end with the human approval step (``release.require_approval``): ``airflow dags test`` runs the DAG
until the approval task parks in Airflow 3.3's ``awaiting_input`` state. ``dags test`` never answers it itself;
the test answers from outside, against the same metadata DB, exactly as Airflow would:

- *approve*: what the HITL REST API / Required Actions UI does (write the response, resume the task);
- *no answer*: the scheduler's ``awaiting_input`` timeout sweep, which applies the default option (Reject).
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthfactory.testing import dev
from tests.conftest import open_gates, write_spec

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "synthetic-sandbox"

RESPOND = """
import logging, sys, types
from sqlalchemy import select
from sqlalchemy.orm import joinedload
from airflow.models.taskinstance import TaskInstance as TI
from airflow.utils.session import create_session
dag_id, mode, reason = sys.argv[1:4]
if mode == "sweep":  # the scheduler's AWAITING_INPUT timeout sweep (applies the request's defaults)
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    SchedulerJobRunner.check_awaiting_input_timeouts(types.SimpleNamespace(log=logging.getLogger("sweep")))
else:  # what the HITL REST API does for a reviewer's answer
    from airflow._shared.timezones import timezone
    from airflow.models.trigger import handle_event_submit
    from airflow.triggers.base import TriggerEvent
    with create_session() as session:
        ti = session.scalars(select(TI).where(TI.dag_id == dag_id, TI.task_id == "approve")
                             .options(joinedload(TI.hitl_detail))).one()
        detail = ti.hitl_detail
        detail.responded_by = {"id": "u-7", "name": "Data Protection Officer"}
        detail.responded_at = timezone.utcnow()
        detail.chosen_options = [mode]
        detail.params_input = {"reason": reason}
        session.add(detail)
        handle_event_submit(TriggerEvent(detail.as_resume_event_payload()), task_instance=ti, session=session)
"""


# While the approval waits: the link in the request, through Airflow's real API server app (the plugin mounted,
# SimpleAuthManager tokens): no login 401, a viewer (may not answer) 403, a user (may answer) the card. Then the
# same link in headless Chromium against that app served over HTTP (all-admins login), as a reviewer clicks it.
PEEK = """
import json, os, re, socket, subprocess, sys, threading, time
from fastapi.testclient import TestClient
from airflow.api_fastapi.app import create_app, get_auth_manager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
link, chromium, profile = sys.argv[1:4]
out = {}
client = TestClient(create_app())
manager = get_auth_manager()
out["anonymous"] = client.get(link).status_code
for role in ("viewer", "user"):
    token = manager.generate_jwt(SimpleAuthManagerUser(username=role, role=role))
    r = client.get(link, headers={"Authorization": f"Bearer {token}"})
    out[role] = r.status_code
    if r.status_code == 200:
        out["card"] = r.text
escape = re.sub(r"/runs/[^/]+/", "/runs/%2E%2E/", link)
out["escape"] = client.get(escape, headers={"Authorization": f"Bearer {token}"}).status_code
os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "True"
import uvicorn
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
threading.Thread(target=server.run, daemon=True).start()
while not server.started:
    time.sleep(0.1)
dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync",
                      f"--user-data-dir={profile}", "--dump-dom", f"http://127.0.0.1:{port}{link}"],
                     capture_output=True, text=True, timeout=120).stdout
server.should_exit = True
out["chromium_dom"] = dom
print("PEEK" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory, small_extract):
    base = tmp_path_factory.mktemp("e2e_hitl")
    specs, staging = base / "specs", base / "staging"
    # open gates: these runs are about the approval step, whatever thresholds the gates have grown
    write_spec(specs, "e2e_approved", small_extract, staging, release__require_approval=True, **open_gates())
    write_spec(specs, "e2e_unanswered", small_extract, staging, release__require_approval=True,
               release__approval_timeout_hours=0.0005, **open_gates())  # 1.8 s
    with dev.S3Emulator() as s3:
        client = s3.client()
        client.create_bucket(Bucket=BUCKET)
        env = dev.airflow_env(ROOT, base / "airflow", s3.endpoint)
        env["SYNTHFACTORY_SPECS_DIR"] = str(specs)
        dev.ensure_airflow_db(env)
        yield {"env": env, "client": client, "staging": staging, "base": base}


def _db(stack):
    return sqlite3.connect(Path(stack["env"]["AIRFLOW_HOME"]) / "airflow.db", timeout=30)


def _state(stack, dag_id: str, task_id: str) -> str | None:
    with _db(stack) as db:
        row = db.execute("select state from task_instance where dag_id = ? and task_id = ?",
                         (dag_id, task_id)).fetchone()
    return row[0] if row else None


def _run_until_answered(stack, dag_id: str, mode: str, reason: str = "", while_waiting=None) -> tuple[int, str]:
    """Start ``dags test``, wait for the approval request, call ``while_waiting()``, answer it (``mode``: Approve,
    Reject or sweep), and wait for the run to finish. Everything bounded."""
    log = stack["base"] / f"{dag_id}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([dev.venv_bin("airflow"), "dags", "test", dag_id, "--conf", json.dumps({"rows": 200})],
                                env=stack["env"], stdout=out, stderr=subprocess.STDOUT)  # rows as test_dag_e2e
        try:
            deadline = time.monotonic() + 400
            while _state(stack, dag_id, "approve") != "awaiting_input":
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, "approval task never asked"
                time.sleep(1)
            if while_waiting is not None:
                while_waiting()
            if mode == "sweep":
                time.sleep(3)  # past the 1.8 s response timeout
            answer = subprocess.run([sys.executable, "-c", RESPOND, dag_id, mode, reason], env=stack["env"],
                                    timeout=120, capture_output=True, text=True)
            assert answer.returncode == 0, answer.stderr[-4000:]
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    return code, log.read_text()


def _request(stack, dag_id: str) -> tuple[str, str]:
    with _db(stack) as db:
        return db.execute("select h.subject, h.body from hitl_detail h join task_instance t on t.id = h.ti_id "
                          "where t.dag_id = ? and t.task_id = 'approve'", (dag_id,)).fetchone()


def test_approved_run_is_released_with_the_approval_in_its_manifest(stack, tmp_path):
    from tests.quality.test_datacard import CHROMIUM

    seen: dict = {}

    def peek() -> None:  # the reviewer opens the data card link of the request before answering
        _, body = _request(stack, "synthfactory_e2e_approved")
        link = re.search(r"\[open the data card of this run\]\(([^)]+)\)", body).group(1)
        assert link.startswith("/synthfactory/datasets/e2e_approved/runs/"), link  # no base_url: relative
        res = subprocess.run([sys.executable, "-c", PEEK, link, CHROMIUM or "chromium", str(tmp_path / "profile")],
                             env=stack["env"], timeout=300, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-4000:]
        seen.update(json.loads(res.stdout.split("PEEK", 1)[1]))

    code, log = _run_until_answered(stack, "synthfactory_e2e_approved", "Approve", "figures look right",
                                    while_waiting=peek)
    assert code == 0, log[-4000:]
    # the pending card through Airflow's own auth: login required, only who may answer, no path escape
    assert (seen["anonymous"], seen["viewer"], seen["user"], seen["escape"]) == (401, 403, 200, 404)
    assert "Data card: e2e_approved" in seen["card"] and 'id="privacy-figures"' in seen["card"]
    assert "Data card: e2e_approved" in seen["chromium_dom"] and "Data dictionary" in seen["chromium_dom"]
    subject, body = _request(stack, "synthfactory_e2e_approved")
    assert subject.startswith("Release e2e_approved v") and "| quality | quality_score |" in body
    assert _state(stack, "synthfactory_e2e_approved", "release") == "success"
    client = stack["client"]
    latest = json.loads(client.get_object(Bucket=BUCKET, Key="releases/e2e_approved/latest.json")["Body"].read())
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"releases/e2e_approved/{latest['manifest']}")
                          ["Body"].read())
    assert manifest["approval"]["approved"] is True
    assert manifest["approval"]["reviewer"] == "Data Protection Officer"
    assert manifest["approval"]["reason"] == "figures look right"


def test_unanswered_request_times_out_to_reject_and_quarantines(stack):
    code, log = _run_until_answered(stack, "synthfactory_e2e_unanswered", "sweep")
    assert code == 0, log[-4000:]  # a decision, not an error: the approval task succeeded, the release skipped
    assert _state(stack, "synthfactory_e2e_unanswered", "approve") == "success"
    assert _state(stack, "synthfactory_e2e_unanswered", "release") == "skipped"
    client = stack["client"]
    assert client.list_objects_v2(Bucket=BUCKET, Prefix="releases/e2e_unanswered/").get("KeyCount") == 0
    (reasons,) = (stack["staging"] / "e2e_unanswered" / "quarantine").glob("*/reasons.json")
    record = json.loads(reasons.read_text())
    assert record["approved"] is False and record["review"]["timed_out"] is True
    assert "no reviewer answered before the approval timeout" in record["message"]
    assert (reasons.parent / "data" / "patients.parquet").is_file()
