"""End to end: `airflow dags test` runs the real DAG (SQLite Airflow) against moto's S3 server on loopback."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import orjson
import pytest

from synthfactory.testing import dev
from tests.conftest import write_spec

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "synthetic-sandbox"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, small_extract):
    base = tmp_path_factory.mktemp("e2e")
    specs = base / "specs"
    staging = base / "staging"
    write_spec(specs, "e2e_cohort", small_extract, staging)
    write_spec(specs, "e2e_refused", small_extract, staging,
               profiles={"impossible": {"privacy": {"min_dcr_ratio": 50.0}}})
    with dev.S3Emulator() as s3:
        client = s3.client()
        client.create_bucket(Bucket=BUCKET)
        env = dev.airflow_env(ROOT, base / "airflow", s3.endpoint)
        env["SYNTHFACTORY_SPECS_DIR"] = str(specs)
        dev.ensure_airflow_db(env)
        yield {"env": env, "client": client, "staging": staging, "base": base}


def _keys(client, prefix):
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def _real_identifiers(extract: Path) -> set[str]:
    ids = set()
    for line in (extract / "Patient.ndjson").read_bytes().splitlines():
        r = orjson.loads(line)
        ids.add(r["id"])
        for n in r.get("name", []):
            ids.add(n["family"])
    return ids


def test_dag_releases_to_s3_with_matching_manifest(stack, small_extract):
    log = stack["base"] / "ok.log"
    proc = dev.dags_test("synthfactory_e2e_cohort", stack["env"], conf={"rows": 200}, log_path=log)
    assert proc.returncode == 0, log.read_text()[-4000:]
    client = stack["client"]
    # layout: one version folder and the latest pointer; the run-scoped staging prefix is gone
    latest = json.loads(client.get_object(Bucket=BUCKET, Key="releases/e2e_cohort/latest.json")["Body"].read())
    version = latest["version"]
    assert version.startswith("v") and latest["manifest"] == f"{version}/manifest.json"
    prefix = f"releases/e2e_cohort/{version}"
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")["Body"].read())
    released = {f["path"] for f in manifest["files"]}
    assert released >= {"data/patients.parquet", "reports/quality.json", "reports/privacy.json"}
    keys = _keys(client, f"{prefix}/")
    assert keys == sorted(f"{prefix}/{p}" for p in [*released, "manifest.json"])
    assert _keys(client, "releases/e2e_cohort/") == sorted([*keys, "releases/e2e_cohort/latest.json"])
    for entry in manifest["files"]:
        key = f"{prefix}/{entry['path']}"
        obj = client.get_object(Bucket=BUCKET, Key=key)
        assert hashlib.sha256(obj["Body"].read()).hexdigest() == entry["sha256"]
        assert obj.get("ServerSideEncryption") == "AES256"
        tags = {t["Key"]: t["Value"] for t in client.get_object_tagging(Bucket=BUCKET, Key=key)["TagSet"]}
        assert tags == {"dataset": "e2e_cohort", "version": version, "synthetic": "true"}
        grants = client.get_object_acl(Bucket=BUCKET, Key=key)["Grants"]  # private: the owner only, no groups
        assert [g["Permission"] for g in grants] == ["FULL_CONTROL"] and not any("URI" in g["Grantee"] for g in grants)
    assert manifest["rows"] == 200 and manifest["synthetic"] is True
    assert manifest["gate"]["approved"] is True and manifest["dataset"] == "e2e_cohort"
    assert manifest["code_version"]["synthfactory"] and len(manifest["source_extract_sha256"]) == 64
    # the manifest is not older than any data file (S3 times have 1 s resolution; the exact write order is
    # asserted in tests/release)
    heads = {k: client.head_object(Bucket=BUCKET, Key=k)["LastModified"] for k in keys}
    assert heads[f"{prefix}/manifest.json"] == max(heads.values())

    # XCom carries URIs and figures only; no identifier of a real patient in XCom or in the task log
    real = _real_identifiers(small_extract)
    db = sqlite3.connect(Path(stack["env"]["AIRFLOW_HOME"]) / "airflow.db")
    # consumers scheduled on the dataset's Asset get the version and manifest with the event
    (event_extra,) = [json.loads(e) for (e,) in db.execute(
        "select e.extra from asset_event e join asset a on a.id = e.asset_id where a.uri = ?",
        (f"s3://{BUCKET}/releases/e2e_cohort",))]
    assert event_extra["version"] == version and event_extra["manifest_uri"].endswith(f"{prefix}/manifest.json")
    values = [str(v) for (v,) in db.execute("select value from xcom")]
    assert values and max(len(v) for v in values) < 4000
    blob = "\n".join(values) + log.read_text()
    leaked = [i for i in real if i in blob]
    assert not leaked, f"{len(leaked)} real identifiers in XCom/logs"


def test_failing_privacy_gate_keeps_sandbox_empty(stack):
    log = stack["base"] / "refused.log"
    proc = dev.dags_test("synthfactory_e2e_refused", stack["env"], conf={"profile": "impossible"}, log_path=log)
    text = log.read_text()
    assert proc.returncode != 0
    assert "privacy gate failed: dcr_ratio" in text and "< min 50 (by " in text
    assert _keys(stack["client"], "releases/e2e_refused/") == []
    (reasons,) = (stack["staging"] / "e2e_refused" / "quarantine").glob("*/reasons.json")
    decision = json.loads(reasons.read_text())
    assert decision["approved"] is False and decision["profile"] == "impossible"
