"""FHIR Bulk Data export, SMART Backend Services, REST search and the deferrable trigger, against the local
spec-faithful test server (tests/ingest/fhir_server.py). Waits are tiny: the server sends Retry-After 0 or
a past HTTP-date and the client caps Retry-After at 50 ms."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from synthfactory.ingest.bulk import (
    BulkExportError,
    ExportRequest,
    PollPolicy,
    interpret_kickoff,
    interpret_status,
    kickoff,
)
from synthfactory.ingest.fhir_ndjson import ingest_extract
from synthfactory.ingest.fhirclient import FhirClient, FhirHttpError, RetryPolicy, parse_retry_after
from synthfactory.ingest.smart import AuthConfig, AuthError, AuthRefused, SmartAuth
from synthfactory.ingest.sources import ingest_for_run
from synthfactory.pipeline import RunContext
from synthfactory.spec import parse_spec

from .conftest import pem_of
from .fhir_server import FhirTestServer, Script, files_of

TYPES = ["Patient", "Encounter", "Condition", "Observation"]
FAST = {"min_poll_seconds": 0, "max_retry_after_seconds": 0.05, "download_retries": 3, "deferrable": False}


@pytest.fixture
def server():
    started: list[FhirTestServer] = []

    def start(files: dict, script: Script) -> FhirTestServer:
        s = FhirTestServer(files, script, lifetime=60).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def make_ctx(tmp_path: Path, base_url: str, auth: AuthConfig, kind: str = "fhir_bulk", **source) -> RunContext:
    spec = parse_spec({
        "name": "bulk_test", "release": {"bucket": "sandbox-bucket"},
        "source": {"kind": kind, "base_url": base_url, "resources": TYPES, "validate_sample_rate": 0.0,
                   **source},
    })
    return RunContext(spec=spec, run_id="run-1", version="v1", staging_root=str(tmp_path / "staging"),
                      fhir_auth=auth)


def smart_auth(key, kid: str = "k1") -> AuthConfig:
    return AuthConfig(kind="smart", client_id="synthfactory-test", private_key=pem_of(key), kid=kid,
                      scope="system/*.read")


def tables_equal(a: dict, b: dict) -> None:
    assert set(a["tables"]) == set(b["tables"])
    for t in a["tables"]:
        assert pq.read_table(a["tables"][t]).equals(pq.read_table(b["tables"][t])), t


# ------------------------------------------------------------------------------------------------
# pure logic
# ------------------------------------------------------------------------------------------------
def test_retry_after_seconds_http_date_and_garbage():
    now = time.time()
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("-3") == 0.0
    assert abs(parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) - 30) < 1.5
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None and parse_retry_after("") is None


def test_interpret_status_and_kickoff():
    p = PollPolicy(min_wait=1.0, max_retry_after=60, max_backoff=30)
    out = interpret_status(202, {"Retry-After": "5", "X-Progress": "50%"}, b"", p, 0)
    assert (out.state, out.wait, out.progress) == ("pending", 5.0, "50%")
    assert interpret_status(202, {"Retry-After": "18000"}, b"", p, 0).wait == 60  # capped (a vendor asked 5 h)
    assert interpret_status(202, {}, b"", p, 3).wait == pytest.approx(1.0 * 1.5 ** 3)  # backoff
    done = interpret_status(200, {}, orjson.dumps({"output": [{"type": "Patient", "url": "u"}]}), p, 0)
    assert done.state == "complete" and done.manifest["output"][0]["url"] == "u"
    oo = orjson.dumps({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]})
    assert interpret_status(500, {}, oo, p, 0).state == "retry"
    assert interpret_status(400, {}, oo, p, 0).state == "retry"  # transient code wins over the status
    assert interpret_status(429, {"Retry-After": "2"}, b"", p, 0).wait == 2
    assert interpret_status(404, {}, b"", p, 0).state == "gone"
    bad = interpret_status(400, {}, orjson.dumps({"resourceType": "OperationOutcome",
                                                  "issue": [{"severity": "fatal", "code": "invalid",
                                                             "diagnostics": "Patient/secret-id"}]}), p, 0)
    assert bad.state == "failed" and "invalid" in bad.message and "secret" not in bad.message
    assert interpret_status(200, {}, b"not json", p, 0).state == "failed"
    assert interpret_kickoff(202, {"Content-Location": "/status/1"}, b"", p, 0, "http://x/fhir").status_url \
        == "http://x/fhir/status/1"
    assert interpret_kickoff(429, {"Retry-After": "3"}, b"", p, 0).state == "retry"
    assert interpret_kickoff(403, {}, b"", p, 0).state == "failed"
    assert interpret_kickoff(202, {}, b"", p, 0).state == "failed"  # no Content-Location


def test_export_request_paths_and_params():
    r = ExportRequest(level="group", group_id="g1", types=("Patient", "Observation"), since="2024-01-01T00:00:00Z",
                      type_filter=("Observation?category=laboratory", "Observation?code=4548-4"), elements=("id",))
    assert r.path() == "Group/g1/$export"
    assert ExportRequest(level="system").path() == "$export"
    assert ExportRequest().path() == "Patient/$export"
    assert r.params() == [("_outputFormat", "application/fhir+ndjson"), ("_type", "Patient,Observation"),
                          ("_since", "2024-01-01T00:00:00Z"), ("_typeFilter", "Observation?category=laboratory"),
                          ("_typeFilter", "Observation?code=4548-4"), ("_elements", "id")]
    assert ExportRequest.from_dict(r.to_dict()) == r


# ------------------------------------------------------------------------------------------------
# the full bulk path
# ------------------------------------------------------------------------------------------------
def test_bulk_export_smart_end_to_end(tmp_path, server, carebundle_extract, rsa_key, keyer):
    past = email.utils.formatdate(time.time() - 5, usegmt=True)
    script = Script(
        kickoff_429=1, public_key=rsa_key.public_key(),
        status_script=[("202", {"Retry-After": "0", "X-Progress": "10% done"}),
                       ("error", 503, "transient", {"Retry-After": "0"}),
                       ("202", {"Retry-After": past})],
        errors=[{"resourceType": "OperationOutcome",
                 "issue": [{"severity": "warning", "code": "incomplete", "diagnostics": "Patient/x partial"}]}],
        deleted=[("Observation", "gone-1")], drop_once={"Observation.ndjson"})
    srv = server(files_of(carebundle_extract), script)
    srv.expire_tokens()  # the first authenticated request answers 401: one re-authentication
    ctx = make_ctx(tmp_path, srv.base, smart_auth(rsa_key), bulk=FAST)
    report = ingest_for_run(ctx, keyer)

    direct = ingest_extract(str(carebundle_extract), str(tmp_path / "direct"), keyer=keyer, validate_sample_rate=0.0)
    tables_equal(report, direct)
    assert report["rows"] == direct["rows"] and report["quarantined_total"] == 0

    kick = [r for r in srv.log if r["path"].endswith("/$export")]
    assert len(kick) == 3 and srv.kickoffs == 2  # a 401, a 429, then accepted
    assert all(r["prefer"] == "respond-async" and r["accept"] == "application/fhir+json" for r in kick)
    assert kick[-1]["path"] == "/fhir/Patient/$export"
    assert kick[-1]["query"]["_type"] == ["Patient,Encounter,Condition,Observation"]
    assert kick[-1]["query"]["_outputFormat"] == ["application/fhir+ndjson"] and "_since" not in kick[-1]["query"]
    assert srv.token_requests == 2  # first token revoked by the 401, one re-authentication, then cached
    status_polls = [r for r in srv.log if r["path"].startswith("/fhir/status/") and r["method"] == "GET"]
    assert len(status_polls) == 4
    assert srv.deletes == 1
    obs = [r for r in srv.log if r["path"] == "/fhir/files/Observation.ndjson"]
    assert len(obs) == 2 and obs[0]["range"] is None and obs[1]["range"].startswith("bytes=")  # resumed
    exp = report["export"]
    assert exp["outcomes"]["by_severity"] == {"warning": 1} and exp["deleted"] == 1 and exp["resumed_downloads"] == 1
    assert exp["transactionTime"] == script.transaction_time
    deleted = pq.read_table(Path(report["tables"]["patient"]).parent / "deleted.parquet").to_pylist()
    assert deleted == [{"resource_type": "Observation", "key": keyer.key("Observation", "gone-1")}]
    state_dir = tmp_path / "staging" / "bulk_test" / "bulk"
    assert json.loads((state_dir / "since.json").read_text())["transactionTime"] == script.transaction_time
    assert json.loads((state_dir / "export_state.json").read_text())["phase"] == "ingested"

    # the next run is incremental: _since = the previous transactionTime, a new export
    ctx2 = make_ctx(tmp_path, srv.base, smart_auth(rsa_key), bulk=FAST)
    ctx2.run_id = "run-2"
    ingest_for_run(ctx2, keyer)
    assert srv.kickoffs == 3
    last = [r for r in srv.log if r["path"].endswith("/$export")][-1]
    assert last["query"]["_since"] == [script.transaction_time]


def test_bulk_error_outcomes_fail_after_downloads(tmp_path, server, carebundle_extract, keyer):
    script = Script(auth="none", requires_token=False,
                    errors=[{"resourceType": "OperationOutcome",
                             "issue": [{"severity": "error", "code": "processing", "diagnostics": "Patient/p1"}]}])
    srv = server(files_of(carebundle_extract), script)
    ctx = make_ctx(tmp_path, srv.base, AuthConfig(), bulk=FAST)
    with pytest.raises(BulkExportError, match=r"1 error-severity .*processing") as exc:
        ingest_for_run(ctx, keyer)
    assert "p1" not in str(exc.value)
    state = json.loads((tmp_path / "staging/bulk_test/bulk/export_state.json").read_text())
    assert all(f["done"] for f in state["files"].values()) and state["phase"] == "downloaded"
    assert srv.deletes == 1
    # requiresAccessToken false: no Authorization header was sent to the file URLs
    assert not any(r["auth"] for r in srv.log if r["path"].startswith("/fhir/files/"))


def test_bulk_retried_task_resumes_the_same_export(tmp_path, server, carebundle_extract, keyer):
    script = Script(auth="bearer", fail_file={"Observation.ndjson": 500})
    srv = server(files_of(carebundle_extract), script)
    auth = AuthConfig(kind="bearer", token=script.bearer)
    ctx = make_ctx(tmp_path, srv.base, auth, bulk={**FAST, "download_retries": 1})
    with pytest.raises(FhirHttpError, match="Observation.ndjson"):
        ingest_for_run(ctx, keyer)
    state = json.loads((tmp_path / "staging/bulk_test/bulk/export_state.json").read_text())
    done = {f["name"] for f in state["files"].values() if f["done"]}
    assert {"Condition.001.ndjson", "Encounter.001.ndjson", "Patient.001.ndjson"} <= done
    assert "Observation.001.ndjson" not in done
    script.fail_file.clear()
    report = ingest_for_run(ctx, keyer)  # the retry: same export, only the missing file
    assert srv.kickoffs == 1
    assert len([r for r in srv.log if r["path"] == "/fhir/files/Patient.ndjson"]) == 1
    assert report["rows"]["observation"] > 0


def test_bulk_export_gone_starts_a_new_one(tmp_path, server, carebundle_extract, keyer):
    srv = server(files_of(carebundle_extract, ("Patient",)), Script(auth="none", status_script=[("gone",)],
                                                                                 script_jobs={"job1"}))
    ctx = make_ctx(tmp_path, srv.base, AuthConfig(), bulk=FAST)
    report = ingest_for_run(ctx, keyer)
    assert srv.kickoffs == 2 and report["rows"]["patient"] == 40


def test_group_kickoff_with_filters_and_elements(tmp_path, server):
    srv = server({}, Script(auth="none"))
    client = FhirClient(srv.base, AuthConfig())
    req = ExportRequest(level="group", group_id="g1", types=("Observation",),
                        type_filter=("Observation?category=laboratory", "Observation?code=4548-4"),
                        elements=("id", "code"), since="2024-01-01T00:00:00Z")
    url = kickoff(client, req, PollPolicy(min_wait=0))
    assert url.startswith(f"{srv.base}/status/")
    q = srv.log[-1]["query"]
    assert srv.log[-1]["path"] == "/fhir/Group/g1/$export"
    assert q["_typeFilter"] == ["Observation?category=laboratory", "Observation?code=4548-4"]
    assert q["_elements"] == ["id,code"] and q["_since"] == ["2024-01-01T00:00:00Z"] and q["_type"] == ["Observation"]


# ------------------------------------------------------------------------------------------------
# auth
# ------------------------------------------------------------------------------------------------
def test_smart_es384_from_jwks_token_cached(server, ec_key):
    import jwt

    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key))
    jwk.update(kid="ec-1", alg="ES384")
    srv = server({"Patient.ndjson": b'{"resourceType":"Patient","id":"a"}\n'},
                 Script(public_key=ec_key.public_key()))
    auth = AuthConfig(kind="smart", client_id="synthfactory-test", jwks=json.dumps({"keys": [jwk]}),
                      scope="system/Patient.rs")
    with FhirClient(srv.base, auth) as client:
        for _ in range(3):
            assert client.get_json("Patient")["resourceType"] == "Bundle"
    assert srv.token_requests == 1  # cached until expiry
    tok = [r for r in srv.log if r["path"] == "/fhir/token"]
    assert len(tok) == 1


def test_smart_token_refreshed_when_expired(server, rsa_key):
    srv = server({}, Script(public_key=rsa_key.public_key(), token_lifetime=1))
    auth = SmartAuth(smart_auth(rsa_key), srv.base, clock=time.time)
    with FhirClient(srv.base, smart_auth(rsa_key)) as client:
        client.auth = auth
        client.get_json("Patient")
        auth._expires = 0  # the cached token's lifetime is over
        client.get_json("Patient")
    assert srv.token_requests == 2


def test_smart_refused_and_bad_keys(server, rsa_key, ec_key):
    srv = server({}, Script(public_key=ec_key.public_key()))  # the server knows another key
    # refusals are the deployment's credentials: a ConfigError (exit 2, no Airflow retries), not transient
    with FhirClient(srv.base, smart_auth(rsa_key)) as client, pytest.raises(AuthRefused, match="refused") as err:
        client.get_json("Patient")
    assert err.value.exit_code == 2 and not isinstance(err.value, AuthError)
    with pytest.raises(AuthRefused, match="PEM"):
        SmartAuth(AuthConfig(kind="smart", client_id="c", private_key="not a key"), srv.base).assertion("x")
    with pytest.raises(AuthRefused):
        AuthConfig(kind="smart", client_id="c")


def test_basic_and_bearer_auth(server):
    srv = server({}, Script(auth="basic"))
    with FhirClient(srv.base, AuthConfig(kind="basic", username="user", password="pass")) as c:
        assert c.get_json("Patient")["type"] == "searchset"
    with FhirClient(srv.base, AuthConfig(kind="basic", username="user", password="nope"),
                    retry=RetryPolicy(attempts=2, base=0)) as c, pytest.raises(FhirHttpError, match="401"):
        c.get_json("Patient")
    assert len([r for r in srv.log if r["path"] == "/fhir/Patient"]) == 2  # no re-auth loop for basic


# ------------------------------------------------------------------------------------------------
# REST search
# ------------------------------------------------------------------------------------------------
def test_search_follows_next_links(tmp_path, server, carebundle_extract, keyer):
    srv = server(files_of(carebundle_extract), Script(auth="bearer", page_size_cap=50))
    ctx = make_ctx(tmp_path, srv.base, AuthConfig(kind="bearer", token="static-token"), kind="fhir_search",
                   search={"page_size": 60, "params": {"Observation": {"category": "laboratory"}}})
    report = ingest_for_run(ctx, keyer)
    direct = ingest_extract(str(carebundle_extract), str(tmp_path / "direct"), keyer=keyer, validate_sample_rate=0.0)
    assert report["rows"] == direct["rows"]
    for t in report["tables"]:
        a = pq.read_table(report["tables"][t]).to_pylist()
        b = pq.read_table(direct["tables"][t]).to_pylist()
        assert sorted(map(str, a)) == sorted(map(str, b)), t
    assert report["search"]["pages"] > 10  # the server caps pages at 50 entries
    first_obs = next(r for r in srv.log if r["path"] == "/fhir/Observation")
    assert first_obs["query"]["category"] == ["laboratory"] and first_obs["query"]["_count"] == ["60"]


# ------------------------------------------------------------------------------------------------
# the Airflow trigger, hook and operator
# ------------------------------------------------------------------------------------------------
def test_trigger_polls_with_the_same_rules_and_fires_complete(server, rsa_key):
    from synthfactory.airflow.triggers import BulkExportTrigger

    past = email.utils.formatdate(time.time() - 5, usegmt=True)
    srv = server({"Patient.ndjson": b'{"resourceType":"Patient","id":"a"}\n'},
                 Script(public_key=rsa_key.public_key(),
                        status_script=[("202", {"Retry-After": past, "X-Progress": "1/3"}),
                                       ("error", 503, "transient", {"Retry-After": "0"}),
                                       ("202", {"Retry-After": "0"})]))
    with FhirClient(srv.base, smart_auth(rsa_key)) as client:
        status_url = kickoff(client, ExportRequest(), PollPolicy(min_wait=0))
    srv.expire_tokens()
    trig = BulkExportTrigger(status_url=status_url, auth=smart_auth(rsa_key).to_dict(), base_url=srv.base,
                             policy={"min_wait": 0, "max_retry_after": 0.05})
    path, kwargs = trig.serialize()
    assert path == "synthfactory.airflow.triggers.BulkExportTrigger"
    trig = BulkExportTrigger(**kwargs)

    async def first_event():
        agen = trig.run()
        try:
            return await agen.__anext__()
        finally:
            await agen.aclose()

    event = asyncio.run(first_event())
    assert event.payload["status"] == "complete"
    assert event.payload["manifest"]["output"][0]["type"] == "Patient"
    assert event.payload["expires"] > time.time()  # the manifest's Expires, for the expiry check at download
    polls = [r for r in srv.log if r["path"].startswith("/fhir/status/")]
    assert len(polls) == 5  # 202, 503, 401 (expired token), 202, 200


def test_trigger_reports_a_failed_export(server):
    from synthfactory.airflow.triggers import BulkExportTrigger

    srv = server({}, Script(auth="none", status_script=[("error", 400, "invalid")]))
    with FhirClient(srv.base, AuthConfig()) as client:
        status_url = kickoff(client, ExportRequest(), PollPolicy(min_wait=0))
    trig = BulkExportTrigger(status_url=status_url, base_url=srv.base, policy={"min_wait": 0})

    async def first_event():
        async for e in trig.run():
            return e

    payload = asyncio.run(first_event()).payload
    assert payload["status"] == "failed" and "HTTP 400" in payload["message"]


def test_fhir_hook_turns_connections_into_auth_configs(monkeypatch, rsa_key):
    from airflow.sdk.definitions.connection import Connection

    from synthfactory.airflow import get_provider_info
    from synthfactory.airflow.hooks import FhirHook

    info = get_provider_info()
    assert {"hook-class-name": "synthfactory.airflow.hooks.FhirHook", "connection-type": "fhir"} \
        in info["connection-types"]
    smart = Connection(conn_id="fhir_smart", conn_type="fhir", host="https://ehr.example.org/fhir/r4",
                       login="client-1", extra=json.dumps({"private_key": pem_of(rsa_key), "kid": "k9",
                                                          "scope": "system/*.rs"}))
    cfg = FhirHook.auth_config_of(smart)
    assert (cfg.kind, cfg.client_id, cfg.kid, cfg.scope) == ("smart", "client-1", "k9", "system/*.rs")
    assert FhirHook.base_url_of(smart) == "https://ehr.example.org/fhir/r4"
    pem_in_password = Connection(conn_id="x", conn_type="fhir", host="ehr.example.org", port=8443, schema="fhir",
                                 login="client-2", password=pem_of(rsa_key))
    assert FhirHook.auth_config_of(pem_in_password).kind == "smart"
    assert FhirHook.base_url_of(pem_in_password) == "https://ehr.example.org:8443/fhir"
    assert FhirHook.auth_config_of(Connection(conn_id="b", conn_type="fhir", password="t0k")).token == "t0k"
    basic = FhirHook.auth_config_of(Connection(conn_id="c", conn_type="fhir", login="u", password="p"))
    assert (basic.kind, basic.username) == ("basic", "u")
    monkeypatch.setenv("AIRFLOW_CONN_FHIR_ENV", json.dumps({"conn_type": "fhir", "host": "https://h/fhir",
                                                            "password": "env-token"}))
    hook = FhirHook("fhir_env")
    assert hook.get_auth_config().token == "env-token" and hook.get_base_url() == "https://h/fhir"


def test_operator_defers_then_stores_the_manifest(tmp_path, server, carebundle_extract, keyer, monkeypatch):
    from airflow.sdk.exceptions import TaskDeferred

    from synthfactory.airflow import operators
    from synthfactory.airflow.triggers import BulkExportTrigger

    srv = server(files_of(carebundle_extract, ("Patient",)), Script(auth="none"))
    ctx = make_ctx(tmp_path, srv.base, AuthConfig(), bulk={**FAST, "deferrable": True})
    monkeypatch.setattr(operators, "run_context", lambda spec_path: ctx)
    op = operators.FhirBulkExportOperator(task_id="bulk_export", spec_path="unused.yaml")
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context={})
    trig = deferred.value.trigger
    assert isinstance(trig, BulkExportTrigger) and deferred.value.method_name == "execute_complete"

    async def first_event():
        async for e in trig.run():
            return e

    event = asyncio.run(first_event())
    summary = op.execute_complete(context={}, event=event.payload)
    assert summary["phase"] == "downloading" and summary["files"] == 1
    # a retried export task does not kick off again; the ingest task downloads and flattens
    assert op.execute(context={})["phase"] == "downloading"
    report = ingest_for_run(ctx, keyer)
    assert srv.kickoffs == 1 and report["rows"]["patient"] == 40


def test_dag_for_a_bulk_source_waits_on_the_triggerer(tmp_path):
    import yaml

    from synthfactory.airflow.dag_factory import build_dag
    from synthfactory.airflow.operators import FhirBulkExportOperator
    from synthfactory.spec import SpecError

    root = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((root / "include/datasets/cohort_demo.yaml").read_text())
    data["name"] = "bulk_dag"
    data["source"] = {"kind": "fhir_bulk", "fhir_connection_id": "ehr_fhir", "resources": TYPES,
                      "bulk": {"level": "group", "group_id": "cohort-1"}}
    data["staging"]["uri"] = str(tmp_path / "staging")
    path = tmp_path / "bulk_dag.yaml"
    path.write_text(yaml.safe_dump(data))
    dag = build_dag(path)
    export = dag.get_task("bulk_export")
    assert isinstance(export, FhirBulkExportOperator)
    assert "ingest" in export.downstream_task_ids
    data["source"]["bulk"] = {"level": "group"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="group_id"):
        build_dag(path)
    data["source"] = {"kind": "fhir_bulk"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="base_url: fhir_bulk needs base_url or fhir_connection_id"):
        build_dag(path)


def test_incremental_export_merges_the_delta_into_the_snapshot(tmp_path, server, carebundle_extract, keyer):
    """Run 2 exports only what changed since run 1 (``_since``); the run must still see the whole cohort:
    changed resources replace their earlier versions, deleted[] ones disappear, the rest carries over."""
    files = files_of(carebundle_extract)
    patients = [orjson.loads(line) for line in files["Patient.ndjson"].splitlines() if line.strip()]
    script = Script(auth="none", requires_token=False)
    srv = server(files, script)
    ctx = make_ctx(tmp_path, srv.base, AuthConfig(), bulk=FAST)
    first = ingest_for_run(ctx, keyer)
    assert first["export"]["snapshot"]["incremental"] is False
    assert first["rows"]["patient"] == len(patients) == 40

    changed = dict(patients[0], gender="unknown" if patients[0].get("gender") != "unknown" else "other")
    gone = patients[1]["id"]
    new = dict(patients[2], id="brand-new-patient", gender="female")
    new_enc = {"resourceType": "Encounter", "id": "brand-new-enc", "status": "finished",
               "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
               "subject": {"reference": "Patient/brand-new-patient"},
               "period": {"start": "2025-06-01T10:00:00Z", "end": "2025-06-01T11:00:00Z"}}
    srv.files = {"Patient.ndjson": orjson.dumps(changed) + b"\n" + orjson.dumps(new) + b"\nnot json\n",
                 "Encounter.ndjson": orjson.dumps(new_enc) + b"\n"}
    script.deleted = [("Patient", gone)]
    script.transaction_time = "2026-02-03T04:05:06Z"
    ctx2 = make_ctx(tmp_path, srv.base, AuthConfig(), bulk=FAST)
    ctx2.run_id = "run-2"
    second = ingest_for_run(ctx2, keyer)

    last = [r for r in srv.log if r["path"].endswith("/$export")][-1]
    assert last["query"]["_since"] == ["2026-01-02T03:04:05Z"]  # run 1's transactionTime
    snap = second["export"]["snapshot"]
    assert snap["incremental"] is True and snap["base"] is not None
    assert (snap["changed"], snap["replaced"], snap["deleted_applied"], snap["unmatched_lines"]) == (3, 1, 1, 1)
    rows = {r["patient_key"]: r for r in pq.read_table(second["tables"]["patient"]).to_pylist()}
    assert len(rows) == 40  # 40 - 1 deleted + 1 new; the changed one is not duplicated
    assert rows[keyer.key("Patient", patients[0]["id"])]["gender"] == changed["gender"]
    assert keyer.key("Patient", gone) not in rows
    assert rows[keyer.key("Patient", "brand-new-patient")]["gender"] == "female"
    assert second["quarantined_total"] >= 1  # the broken line: quarantined with its reason, not lost silently
    assert "json" in json.dumps(second["quarantine_reasons"]).lower()
    enc = pq.read_table(second["tables"]["encounter"]).to_pylist()
    assert len(enc) == first["rows"]["encounter"] + 1 - sum(
        1 for r in pq.read_table(first["tables"]["encounter"]).to_pylist()
        if r["patient_key"] == keyer.key("Patient", gone))  # the deleted patient's encounters dangle: quarantined
    # no patient values in the snapshot record
    state_dir = tmp_path / "staging" / "bulk_test" / "bulk"
    current = json.loads((state_dir / "snapshot" / "current.json").read_text())
    assert current["transactionTime"] == "2026-02-03T04:05:06Z" and gone not in json.dumps(current)
    assert len([p for p in (state_dir / "snapshot").iterdir() if p.is_dir()]) == 1  # the previous one is gone

    # a retried ingest of the same export merges nothing twice
    again = ingest_for_run(ctx2, keyer)
    assert again["rows"] == second["rows"]


# ------------------------------------------------------------------------------------------------
# every export accounted for (issue 19): expiry, retries, auth refusals, counts, duplicates, deletions
# ------------------------------------------------------------------------------------------------
def _oo(code: str) -> bytes:
    return orjson.dumps({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code}]})


def test_only_transient_outcomes_are_retried():
    p = PollPolicy(min_wait=0.0)
    assert interpret_kickoff(500, {}, _oo("processing"), p, 0).state == "failed"
    assert interpret_kickoff(503, {}, _oo("exception"), p, 0).state == "failed"
    assert interpret_kickoff(500, {}, _oo("transient"), p, 0).state == "retry"
    assert interpret_kickoff(503, {}, _oo("throttled"), p, 0).state == "retry"
    assert interpret_kickoff(502, {}, b"<html>bad gateway</html>", p, 0).state == "retry"  # no outcome: a proxy
    assert interpret_status(500, {}, _oo("processing"), p, 0).state == "failed"
    assert interpret_status(504, {}, b"", p, 0).state == "retry"


def test_kickoff_processing_error_fails_at_once():
    import httpx

    calls: list = []
    seen: list = []

    def handler(request):
        seen.append(request.url.path)
        return httpx.Response(500, content=_oo("processing"), headers={"Content-Type": "application/fhir+json"})

    client = FhirClient("http://fhir.test/fhir", AuthConfig(), http=httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(BulkExportError, match="processing"):
        kickoff(client, ExportRequest(), PollPolicy(min_wait=0.0), sleep=calls.append)
    assert calls == [] and len(seen) == 1  # one try: not retried 20 times (~20 minutes)


def test_a_410_on_a_file_starts_a_new_export(tmp_path, server, carebundle_extract, keyer, caplog):
    import logging

    caplog.set_level(logging.WARNING, "synthfactory.ingest.bulk")
    script = Script(auth="none", fail_file_once={"Observation.ndjson": 410})
    srv = server(files_of(carebundle_extract), script)
    ctx = make_ctx(tmp_path, srv.base, AuthConfig(), bulk=FAST)
    report = ingest_for_run(ctx, keyer)
    assert srv.kickoffs == 2 and report["rows"]["observation"] > 0
    assert "kicking off a new export" in caplog.text and "HTTP 410" in caplog.text
    assert report["export"]["restarted_from"]
    state = json.loads((tmp_path / "staging/bulk_test/bulk/export_state.json").read_text())
    assert state["phase"] == "ingested" and state["restart_reason"].startswith("a file answered HTTP 410")


def test_an_expired_manifest_starts_a_new_export(tmp_path, server, carebundle_extract, keyer, caplog):
    import logging

    script = Script(auth="none", fail_file={"Observation.ndjson": 500})
    srv = server(files_of(carebundle_extract), script)
    ctx = make_ctx(tmp_path, srv.base, AuthConfig(), bulk={**FAST, "download_retries": 0})
    with pytest.raises(FhirHttpError):
        ingest_for_run(ctx, keyer)
    state_uri = tmp_path / "staging/bulk_test/bulk/export_state.json"
    state = json.loads(state_uri.read_text())
    assert state["expires_at"] > time.time()  # from the manifest's Expires header
    state["expires_at"] = time.time() - 1
    state_uri.write_text(json.dumps(state))
    script.fail_file.clear()
    caplog.set_level(logging.WARNING, "synthfactory.ingest.bulk")
    report = ingest_for_run(ctx, keyer)
    assert srv.kickoffs == 2 and "the manifest expired" in caplog.text and report["rows"]["observation"] > 0


def test_token_refusal_is_a_clear_error_with_exit_2(tmp_path, server, carebundle_extract, rsa_key, monkeypatch,
                                                    capsys):
    from synthfactory.cli import main
    from synthfactory.errors import EXIT_SPEC
    from tests.conftest import write_spec

    srv = server(files_of(carebundle_extract), Script(public_key=rsa_key.public_key()))
    auth = AuthConfig(kind="smart", client_id="synthfactory-test", private_key=pem_of(rsa_key), kid="k1",
                      scope="user/*.read")  # the server refuses this scope
    monkeypatch.setenv("SYNTHFACTORY_FHIR_AUTH", json.dumps(auth.to_dict()))
    spec = write_spec(tmp_path / "specs", "bulk_refused", carebundle_extract, tmp_path / "staging",
                      source__kind="fhir_bulk", source__base_url=srv.base, source__uri=srv.base, source__bulk=FAST)
    code = main(["run", str(spec), "--out", str(tmp_path / "out"), "--run-id", "r1", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_SPEC
    assert err[-1] == ("authentication refused: the token endpoint refused the client (HTTP 400, invalid_scope): "
                       "check the fhir connection's client id, key and scope")
    assert not any("Traceback" in line for line in err)


def test_manifest_count_mismatch_fails_then_can_be_reported(tmp_path, server, carebundle_extract, keyer):
    from synthfactory.errors import TransientError
    from synthfactory.ingest.bulk import BulkCountMismatch

    script = Script(auth="none", count_offset={"Observation.ndjson": 1000})  # the file is 1,000 lines short
    srv = server(files_of(carebundle_extract), script)
    ctx = make_ctx(tmp_path, srv.base, AuthConfig(), bulk=FAST)
    with pytest.raises(BulkCountMismatch, match=r"Observation.001.ndjson: \d+ line\(s\), manifest count \d+") as e:
        ingest_for_run(ctx, keyer)
    assert isinstance(e.value, TransientError) and e.value.exit_code == 1
    state = json.loads((tmp_path / "staging/bulk_test/bulk/export_state.json").read_text())
    obs = next(f for f in state["files"].values() if f["name"].startswith("Observation"))
    assert not obs["done"] and obs["count"] - obs["lines"] == 1000
    assert state["count_mismatches"] == [{"file": "Observation.001.ndjson", "type": "Observation",
                                          "count": obs["count"], "lines": obs["lines"]}]
    assert not (tmp_path / "staging/bulk_test/runs").exists() or not list((tmp_path / "staging").rglob("*.parquet"))
    # the retry downloads that file again (still short: fails again); the spec can accept it, reported
    with pytest.raises(BulkCountMismatch):
        ingest_for_run(ctx, keyer)
    assert len([r for r in srv.log if r["path"] == "/fhir/files/Observation.ndjson"]) == 2
    assert len([r for r in srv.log if r["path"] == "/fhir/files/Patient.ndjson"]) == 1
    ctx2 = make_ctx(tmp_path, srv.base, AuthConfig(), bulk={**FAST, "on_count_mismatch": "report"})
    report = ingest_for_run(ctx2, keyer)
    assert report["export"]["count_mismatches"][0]["file"] == "Observation.001.ndjson"
    assert srv.kickoffs == 1 and report["rows"]["observation"] > 0


def test_duplicate_ids_in_an_export_counted_and_quarantined_and_deletions_deduplicated(
        tmp_path, server, carebundle_extract, keyer):
    files = files_of(carebundle_extract)
    files["Patient.ndjson"] = files["Patient.ndjson"] * 3  # every patient three times, identical
    obs_lines = files["Observation.ndjson"].splitlines()
    changed = orjson.loads(obs_lines[0])
    changed["status"] = "amended"  # the same id, another version
    files["Observation.ndjson"] += orjson.dumps(changed) + b"\n"
    script = Script(auth="none", deleted=[("Observation", "gone-1"), ("Observation", "gone-1"),
                                          ("Condition", "c-9")])
    srv = server(files, script)
    ctx = make_ctx(tmp_path, srv.base, AuthConfig(), bulk=FAST)
    report = ingest_for_run(ctx, keyer)
    snap = report["export"]["snapshot"]
    assert snap["duplicate_lines"] == 80 + 1 and snap["duplicate_identical"] == 80
    assert snap["duplicate_conflicting"] == 1
    assert report["rows"]["patient"] == 40
    q = [orjson.loads(line) for line in Path(report["quarantine_uri"]).read_bytes().splitlines()]
    dup = [r for r in q if r["reason"] == "duplicate id with different content in one export"]
    assert sorted(r["line"] for r in dup) == [1, len(obs_lines) + 1]
    assert {r["file"] for r in dup} == {"Observation.001.ndjson"}
    assert report["quarantined"]["Observation"] >= 2 and report["quarantined_total"] == len(q)
    direct = ingest_extract(str(carebundle_extract), str(tmp_path / "direct"), keyer=keyer, validate_sample_rate=0.0)
    assert report["rows"]["observation"] < direct["rows"]["observation"]  # the ambiguous one is not in the table
    assert keyer.key("Observation", changed["id"]) not in set(
        pq.read_table(report["tables"]["observation"])["observation_key"].to_pylist())
    deleted = pq.read_table(Path(report["tables"]["patient"]).parent / "deleted.parquet").to_pylist()
    assert len(deleted) == 2 and report["export"]["deleted"] == 2 and report["export"]["deleted_repeats"] == 1
