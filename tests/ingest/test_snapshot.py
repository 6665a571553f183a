"""The incremental Bulk Data snapshot (ingest/snapshot.py) on a local staging folder and on s3:// staging
(the S3 emulator over loopback HTTP): upsert by id, deleted[] wins, gzip deltas, retry-safe, no ids logged."""

from __future__ import annotations

import gzip
import json
import logging

import orjson
import pytest

from synthfactory.ingest.snapshot import current_snapshot, merge_snapshot
from synthfactory.storage import Store, join


def _ndjson(*resources: dict) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in resources)


def _ids(store: Store, uri: str) -> dict[str, str]:
    return {o["id"]: o.get("gender") or o.get("status") for o in map(orjson.loads, store.read_bytes(uri).splitlines())}


@pytest.fixture(params=["local", "s3"])
def staging(request, tmp_path):
    if request.param == "local":
        yield Store(), str(tmp_path / "staging" / "ds" / "bulk")
        return
    from synthfactory.testing import dev

    with dev.S3Emulator() as s3:
        client = s3.client()
        client.create_bucket(Bucket="staging")
        yield Store(s3=client), "s3://staging/ds/bulk"


def test_merge_upserts_deletes_and_is_safe_to_retry(staging, caplog):
    store, state = staging
    caplog.set_level(logging.INFO)
    full = join(state, "files", "exp-1")
    store.write_bytes(join(full, "Patient.001.ndjson"), _ndjson(
        {"resourceType": "Patient", "id": "pat-ann", "gender": "female"},
        {"resourceType": "Patient", "id": "pat-bob", "gender": "male"},
        {"resourceType": "Patient", "id": "pat-cyd", "gender": "other"}))
    store.write_bytes(join(full, "Encounter.001.ndjson"), _ndjson(
        {"resourceType": "Encounter", "id": "enc-zed", "status": "finished"}))
    first = merge_snapshot(store, state, [join(full, "Patient.001.ndjson"), join(full, "Encounter.001.ndjson")],
                           [], export_id="exp-1", transaction_time="T1", incremental=False)
    assert first["counts"] == {"Encounter": 1, "Patient": 3} and first["base"] is None

    delta = join(state, "files", "exp-2")
    store.write_bytes(join(delta, "Patient.001.ndjson.gz"), gzip.compress(_ndjson(
        {"resourceType": "Patient", "id": "pat-ann", "gender": "unknown"},      # changed
        {"resourceType": "Patient", "id": "pat-dee", "gender": "female"},       # new
        {"resourceType": "Patient", "id": "pat-cyd", "gender": "female"})))     # changed and deleted: deletion wins
    second = merge_snapshot(store, state, [join(delta, "Patient.001.ndjson.gz")],
                            [("Patient", "pat-bob"), ("Patient", "pat-cyd"), ("Encounter", "nope")],
                            export_id="exp-2", transaction_time="T2", incremental=True)
    assert second["base"] == "exp-1" and second["transactionTime"] == "T2"
    assert (second["changed"], second["replaced"], second["deleted_applied"], second["carried_over"]) == (3, 2, 2, 1)
    assert _ids(store, join(second["uri"], "Patient.ndjson")) == {"pat-ann": "unknown", "pat-dee": "female"}
    assert _ids(store, join(second["uri"], "Encounter.ndjson")) == {"enc-zed": "finished"}  # carried over
    assert current_snapshot(store, state)["export_id"] == "exp-2"
    assert not store.exists(join(first["uri"], "Patient.ndjson"))  # the previous snapshot is gone
    # the same export again (a retried task): nothing changes
    again = merge_snapshot(store, state, [join(delta, "Patient.001.ndjson.gz")], [("Patient", "pat-bob")],
                           export_id="exp-2", transaction_time="T2", incremental=True)
    assert again == second
    # counts in the log and the record, never resource ids
    for rid in ("pat-ann", "pat-bob", "pat-cyd", "pat-dee", "enc-zed"):
        assert rid not in caplog.text and rid not in json.dumps(current_snapshot(store, state))
