"""The Airflow side of the release: the sandbox writer on its own connection, the optional human approval step
(DAG structure and the operator's answer handling), the Asset event and hook-level lineage."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from synthfactory.testing import dev
from tests.conftest import write_spec
from tests.release.helpers import (
    BUCKET,
    PREFIX,
    V1,
    assert_readers_consistent,
    do_publish,
    keys,
    make_files,
    reset_bucket,
    writer,
)

CONN = "sandbox_test"


@pytest.fixture(scope="module")
def s3():
    with dev.S3Emulator() as emulator:
        reset_bucket(emulator.client())
        yield emulator
        reset_bucket(emulator.client())


@pytest.fixture
def sandbox_conn(s3, monkeypatch):
    conn = json.loads(dev.aws_conn_uri_json(s3.endpoint))
    conn["extra"]["config_kwargs"] = {"connect_timeout": 3}
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", json.dumps(conn))
    return CONN


def _spec(tmp_path, name="rel_ds", **overrides):
    from synthfactory.spec import load_spec

    path = write_spec(tmp_path / "specs", name, tmp_path / "extract", tmp_path / "staging",
                      release__connection_id=CONN, release__bucket=BUCKET, **overrides)
    return path, load_spec(path)


# -- the writer ----------------------------------------------------------------------------------------
def test_sandbox_writer_uses_its_connection_with_bounded_retries(s3, sandbox_conn, tmp_path):
    from synthfactory.airflow.hooks import SandboxWriter

    _, spec = _spec(tmp_path, release__max_attempts=4, release__encryption="aws:kms",
                    release__kms_key_id="alias/sandbox")
    w = SandboxWriter.for_spec(spec)
    assert w.hook.aws_conn_id == CONN and w.bucket == BUCKET
    cfg = w.client.meta.config
    assert cfg.retries == {"mode": "standard", "total_max_attempts": 4}
    assert cfg.connect_timeout == 3  # the connection's config_kwargs win where they set an option
    store, files, decision = make_files(tmp_path / "stage")
    do_publish(w, store, files, decision, V1, dataset="airflow_writer")
    head = s3.client().head_object(Bucket=BUCKET, Key=f"{PREFIX}/airflow_writer/{V1}/data/patients.parquet")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert assert_readers_consistent(writer(s3.endpoint), "airflow_writer") == [V1]


# -- lineage and the Asset event ----------------------------------------------------------------------
@pytest.fixture
def lineage_collector(monkeypatch):
    """A real hook-lineage collector, as when a lineage reader (the OpenLineage provider) is installed."""
    from airflow.sdk import lineage, plugins_manager

    lineage.get_hook_lineage_collector.cache_clear()
    monkeypatch.setattr(plugins_manager, "get_hook_lineage_readers_plugins", lambda: [object])
    yield lineage.get_hook_lineage_collector()
    lineage.get_hook_lineage_collector.cache_clear()


def test_release_announces_version_and_lineage(s3, sandbox_conn, tmp_path, lineage_collector):
    from airflow.sdk import Asset

    from synthfactory.airflow.hooks import SandboxWriter
    from synthfactory.airflow.release import announce_release

    _, spec = _spec(tmp_path)
    w = SandboxWriter.for_spec(spec)
    asset = Asset(name="synthfactory_rel_ds", uri=f"s3://{BUCKET}/{PREFIX}/rel_ds")
    event = SimpleNamespace(extra={})
    ctx = SimpleNamespace(source_uri=str(tmp_path / "extract"))
    released = {"version": V1, "manifest_uri": f"s3://{BUCKET}/{PREFIX}/rel_ds/{V1}/manifest.json", "latest": V1,
                "noop": False}
    announce_release(spec, ctx, w, released, asset, context={"outlet_events": {asset: event}})
    assert event.extra == {"version": V1, "manifest_uri": released["manifest_uri"], "latest": V1, "noop": False}
    got = lineage_collector.collected_assets
    assert [i.asset.uri for i in got.inputs] == [(tmp_path / "extract").resolve().as_uri()]
    assert [(o.asset.uri, o.asset.extra) for o in got.outputs] == [(f"s3://{BUCKET}/{PREFIX}/rel_ds",
                                                                   {"version": V1})]
    assert all(i.context is w.hook for i in [*got.inputs, *got.outputs])  # attributed to the sandbox S3Hook


def test_empty_prefix_asset_and_lineage_name_the_same_uri(s3, sandbox_conn, tmp_path, lineage_collector):
    """The release task's Asset and its lineage output come from one layout, also without a prefix."""
    from synthfactory.airflow.dag_factory import build_dag
    from synthfactory.airflow.hooks import SandboxWriter
    from synthfactory.airflow.release import announce_release

    path, spec = _spec(tmp_path, "flat_ds", release__prefix="")
    dag = build_dag(path)
    (asset,) = dag.get_task("release").outlets
    assert asset.uri == f"s3://{BUCKET}/flat_ds"
    assert f"`s3://{BUCKET}/flat_ds/<version>/`" in dag.doc_md
    announce_release(spec, SimpleNamespace(source_uri=str(tmp_path / "extract")), SandboxWriter.for_spec(spec),
                     {"version": V1}, asset, context={"outlet_events": {asset: SimpleNamespace(extra={})}})
    assert [o.asset.uri for o in lineage_collector.collected_assets.outputs] == [asset.uri]
    path, _ = _spec(tmp_path, "prefixed_ds")
    assert build_dag(path).get_task("release").outlets[0].uri == f"s3://{BUCKET}/{PREFIX}/prefixed_ds"


# -- the approval step --------------------------------------------------------------------------------
def test_approval_step_only_when_the_spec_asks(tmp_path):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    from synthfactory.airflow.dag_factory import build_dag

    path, _ = _spec(tmp_path, "plain_ds")
    assert "approve" not in build_dag(path).task_ids
    path, _ = _spec(tmp_path, "approved_ds", release__require_approval=True, release__approval_timeout_hours=48)
    dag = build_dag(path)
    approve = dag.get_task("approve")
    assert isinstance(approve, ApprovalOperator)
    assert approve.upstream_task_ids == {"gate"} and approve.downstream_task_ids == {"release"}
    assert "approve" in dag.get_task("release").upstream_task_ids
    assert approve.options == ["Approve", "Reject"] and approve.defaults == ["Reject"]  # no answer = Reject
    assert approve.response_timeout == timedelta(hours=48) and approve.execution_timeout == timedelta(minutes=15)
    assert set(approve.params.keys()) == {"reason"} and approve.retries >= 1
    path, _ = _spec(tmp_path, "forever_ds", release__require_approval=True, release__approval_timeout_hours=None)
    approve = build_dag(path).get_task("approve")
    assert approve.response_timeout is None and approve.defaults is None and approve.execution_timeout is None


def test_approval_request_shows_the_gate_figures_and_the_data_card(tmp_path):
    from synthfactory.airflow.release import approval_text
    from synthfactory.release.gate import decide
    from synthfactory.spec import PrivacyThresholds, QualityThresholds

    _, spec = _spec(tmp_path)
    decision = decide({"quality_score": 0.8912, "expectation_success_ratio": 1.0,
                       "reference": {"quality_score": {"mean": 0.9, "sd": 0.01}}},
                      {"exact_match_rate": 0.0, "dcr_share": 0.5021, "dcr_ratio": 0.97, "leak_clean": True,
                       "anonymeter_risks": {"singling_out": {"risk": 0.02, "ci_low": 0.0, "ci_high": 0.257,
                                                             "error": 0.129, "n": 120}}},
                      QualityThresholds(), PrivacyThresholds(quasi_identifiers=["age"]),
                      {"data/patients.parquet": "ab" * 32})
    from synthfactory.airflow.operators import _datacard_url

    url = _datacard_url("rel_ds", "manual__2026-01-01T00:00:00+00:00")
    assert url.endswith("/synthfactory/datasets/rel_ds/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00/datacard")
    subject, body = approval_text(spec, V1, decision, {"datacard_uri": "s3://stage/datacard.html"}, url)
    assert subject == f"Release rel_ds {V1} to the sandbox?"
    assert "| quality | quality_score | 0.8912 | 0.9 ± 0.01 | >= 0.835 | pass |" in body  # 0.95 x 0.9 - 2 x 0.01
    assert "| privacy | dcr_share | 0.5021 | – | <= 0.7 | pass |" in body  # no reference: the cap
    assert f"s3://{BUCKET}/{PREFIX}/rel_ds/{V1}/" in body and "72 h" in body
    assert f"[open the data card of this run]({url})" in body and "datacard.html" in body
    # an anonymeter risk passed on the lower end of a wide interval is not certified, never "pass"
    assert "| privacy | anonymeter.singling_out.ci_low | 0 | – | <= 0.1 | not certified |" in body
    assert decision["not_certified"] == ["anonymeter.singling_out.ci_low"]


@pytest.fixture
def gated_run(tmp_path, monkeypatch):
    """A gate-approved run in staging (files + decision), and the approval operator wired to it."""
    from synthfactory import pipeline
    from synthfactory.airflow import operators
    from synthfactory.airflow.operators import ReleaseApprovalOperator

    path, spec = _spec(tmp_path, release__require_approval=True)
    ctx = pipeline.RunContext(spec=spec, run_id="manual__1", version=V1, staging_root=str(tmp_path / "staging"))
    store = ctx.store
    for rel, name in (("synthetic", "patients.parquet"), ("reports", "quality.json"), ("reports", "privacy.json")):
        store.write_bytes(ctx.uri(rel, name), f"{name} bytes".encode())
    sampled = {"synthetic_uri": ctx.uri("synthetic", "patients.parquet"), "rows": 3}
    q = {"report_uri": ctx.uri("reports", "quality.json"), "quality_score": 0.9, "expectation_success_ratio": 1.0}
    p = {"report_uri": ctx.uri("reports", "privacy.json"), "exact_match_rate": 0.0, "dcr_share": 0.5,
         "dcr_ratio": 1.0, "leak_clean": True}
    audited = {rel: hashlib.sha256(store.read_bytes(uri)).hexdigest()
               for rel, uri in pipeline.release_files(sampled, q, p).items()}
    from synthfactory.release.signing import sign

    decision = {"approved": True, "audited_files": audited, "checks": [], "message": "all gates passed",
                "dataset": spec.name, "version": V1, "run_id": ctx.run_id}
    store.write_json(ctx.uri("gate", "decision.json"), sign(decision, "decision", pipeline.signing_key(ctx)))
    xcoms = {"gate": {"approved": True, "decision_uri": ctx.uri("gate", "decision.json")}, "sample": sampled,
             "quality": q, "privacy": p}
    monkeypatch.setattr(operators, "run_context", lambda _sp: ctx)
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG

    with DAG("approval_unit", schedule=None):
        op = ReleaseApprovalOperator(task_id="approve", spec_path=str(path), subject="s", defaults="Reject",
                                     params={"reason": ""})
        op >> EmptyOperator(task_id="release")
    pushed = {}
    ti = SimpleNamespace(xcom_pull=lambda task_ids: xcoms[task_ids], map_index=-1,
                         xcom_push=lambda key, value: pushed.update({key: value}))
    return SimpleNamespace(ctx=ctx, op=op, context={"ti": ti, "task": op}, pushed=pushed)


def _complete(run, event):
    """The operator's resume; a Reject skips the downstream release the Airflow 3 way (by raising)."""
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    if event["chosen_options"] == ["Reject"]:
        with pytest.raises(DownstreamTasksSkipped) as skipped:
            run.op.execute_complete(run.context, event)
        assert skipped.value.tasks == ["release"]
    else:
        run.op.execute_complete(run.context, event)


def _event(option, by=None, reason="", timedout=False):
    return {"chosen_options": [option], "params_input": {"reason": reason},
            "responded_at": datetime.now(timezone.utc), "responded_by_user": by, "timedout": timedout}


def test_approve_records_the_approval_for_the_publisher(gated_run):
    from synthfactory.pipeline import approval_uri

    _complete(gated_run, _event("Approve", {"id": "7", "name": "dpo"}, "looks fine"))
    record = gated_run.ctx.store.read_json(approval_uri(gated_run.ctx))
    assert record["approved"] is True and record["reviewer"] == "dpo" and record["reason"] == "looks fine"
    assert record["audited_files"] == gated_run.ctx.store.read_json(gated_run.ctx.uri("gate", "decision.json"))[
        "audited_files"]
    assert not gated_run.ctx.store.exists(gated_run.ctx.quarantine_uri)


@pytest.mark.parametrize("timedout", [False, True])
def test_reject_or_timeout_quarantines_the_run_with_reasons(gated_run, timedout):
    from pathlib import Path

    by = None if timedout else {"id": "7", "name": "dpo"}
    _complete(gated_run, _event("Reject", by, "" if timedout else "too few rows", timedout))
    q = Path(gated_run.ctx.quarantine_uri)
    reasons = json.loads((q / "reasons.json").read_text())
    assert reasons["approved"] is False and reasons["review"]["timed_out"] is timedout
    expected = "no reviewer answered before the approval timeout" if timedout else "rejected by dpo: too few rows"
    assert expected in reasons["message"]
    assert (q / "data/patients.parquet").read_bytes() == b"patients.parquet bytes"
    assert {p.relative_to(q).as_posix() for p in q.rglob("*") if p.is_file()} == {
        "reasons.json", "data/patients.parquet", "reports/quality.json", "reports/privacy.json"}


def test_publisher_refuses_a_rejected_run_even_if_release_is_forced(gated_run, tmp_path, s3):
    """Clearing the skipped release task after a Reject does not release: the library checks the approval."""
    from synthfactory import pipeline
    from synthfactory.release.publish import PublishRefused

    _complete(gated_run, _event("Reject", {"id": "7", "name": "dpo"}, "no"))
    x = gated_run.context["ti"].xcom_pull
    with pytest.raises(PublishRefused, match="rejected by a reviewer"):
        pipeline.release(gated_run.ctx, x("gate"), x("sample"), x("quality"), x("privacy"),
                         {"extract_sha256": "0" * 64}, writer(s3.endpoint))
    assert keys(s3.client(), f"{PREFIX}/rel_ds/") == []
