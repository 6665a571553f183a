"""Sharded ingest (plan -> one ingest per shard -> merge) gives exactly the outputs of a one-process ingest.

On a carebundle extract and a clinosim cohort, each cut into shards with planted lines whose fate depends on
other shards: a duplicate id whose first copy is in another shard, a duplicate whose first copy is quarantined
(so the copy is kept), references to patients of another shard, a reference to no patient, an invalid line,
a modifierExtension, a gzip file. Compared: every table row for row (sorted), the quarantine record for record
(in order), the identifiers (value, kind) and the report's counts.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from synthfactory.ingest.fhir_ndjson import ingest_extract
from synthfactory.ingest.sharded import ingest_shard, merge, plan_shards
from synthfactory.storage import Store

RESOURCES = ["Patient", "Encounter", "Condition", "Observation"]
COUNTS = ("rows", "resources_read", "quarantined", "quarantined_total", "quarantine_reasons", "identifiers",
          "extract_sha256", "file_sha256", "files", "file_outcomes", "skipped_files", "refused_files", "empty_types",
          "dangling_references", "validated", "validated_by_type", "views")


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def _plant(folder: Path) -> None:
    """Lines whose fate depends on other shards (see the module docstring)."""
    obs = _lines(folder / "Observation.ndjson")
    first = orjson.loads(obs[0])
    bad_first = dict(first, id="planted-dup-of-bad", valueQuantity={"value": 1e30, "unit": "mg/dL"})  # quarantined
    good_copy = dict(first, id="planted-dup-of-bad")
    dangling = dict(first, id="planted-dangling", subject={"reference": "Patient/no-such-patient"})
    modext = dict(first, id="planted-modext", modifierExtension=[{"url": "http://x", "valueBoolean": True}])
    patients = _lines(folder / "Patient.ndjson")
    mrn = orjson.loads(patients[0])["identifier"][0]["value"]
    as_id = dict(first, id=mrn)  # an id equal to a patient's identifier: the identifiers keep the first kind seen
    mid = len(obs) // 2
    obs = [obs[0], orjson.dumps(bad_first), *obs[1:mid], b"{not json", orjson.dumps(dangling), *obs[mid:],
           orjson.dumps(good_copy), orjson.dumps(modext), obs[0], b"", obs[mid], orjson.dumps(as_id)]
    _write(folder / "Observation.ndjson", obs)  # obs[0], obs[mid]: duplicates
    _write(folder / "Patient.ndjson", [*patients, patients[0]])  # a duplicate Patient
    cond = folder / "Condition.ndjson"  # read through gzip
    cond.with_suffix(".ndjson.gz").write_bytes(gzip.compress(cond.read_bytes()))
    cond.unlink()


def _single(src: Path, out: Path, keyer, **kw) -> dict:
    return ingest_extract(str(src), str(out), keyer=keyer, resources=RESOURCES, **kw)


def _sharded(src: Path, out: Path, keyer, n: int, piece_bytes: int, plan: dict | None = None, **kw) -> dict:
    plan = plan or plan_shards(str(src), Store(), n=n,
                               resources=RESOURCES, piece_bytes=piece_bytes)
    results = [ingest_shard(s, str(out / "shards" / str(s["index"])), keyer=keyer, resources=RESOURCES, **kw)
               for s in reversed(plan["shards"])]  # any order
    return merge(plan, results, str(out), keyer=keyer, resources=RESOURCES, **kw)


def _same(a: dict, b: dict) -> None:
    for k in COUNTS:
        assert a[k] == b[k], k
    for t, uri in a["tables"].items():
        ta, tb = pq.read_table(uri), pq.read_table(b["tables"][t])
        assert ta.schema == tb.schema, t
        cols = ta.column_names
        assert ta.sort_by([(c, "ascending") for c in cols]).equals(tb.sort_by([(c, "ascending") for c in cols])), t
    assert Path(a["quarantine_uri"]).read_bytes() == Path(b["quarantine_uri"]).read_bytes()
    ia, ib = pq.read_table(a["identifiers_uri"]), pq.read_table(b["identifiers_uri"])
    pairs = lambda t: sorted(zip(t.column("value").to_pylist(), t.column("kind").to_pylist()))  # noqa: E731
    assert pairs(ia) == pairs(ib) and ia.num_rows == len(set(ia.column("value").to_pylist()))


def test_sharded_equals_single_process_on_carebundle(tmp_path, keyer, carebundle_extract):
    src = tmp_path / "extract"
    shutil.copytree(carebundle_extract, src)
    _plant(src)
    kw = dict(validate_sample_rate=0.2, validate_max_per_type=25)  # the cap falls inside a later shard
    one = _single(src, tmp_path / "one", keyer, **kw)
    plan = plan_shards(str(src), Store(), n=5, resources=RESOURCES,
                       piece_bytes=8 << 10)
    assert len(plan["shards"]) == 5
    obs_shards = {s["index"] for s in plan["shards"] for g in s["segments"] if g["rtype"] == "Observation"}
    assert len(obs_shards) >= 2  # the planted duplicates' first copies are in other shards
    sharded = _sharded(src, tmp_path / "sharded", keyer, 5, 8 << 10, plan=plan, **kw)
    _same(one, sharded)
    reasons = one["quarantine_reasons"]
    assert reasons["Observation"]["duplicate id"] == 2 and reasons["Patient"]["duplicate id"] == 1
    assert reasons["Observation"]["dangling reference to Patient"] == 1
    assert reasons["Observation"]["unknown modifierExtension"] == 1 and reasons["Observation"]["invalid JSON"] == 1
    assert one["dangling_references"] == {"Observation": 1}
    assert one["validated_by_type"]["Observation"] == 25
    # the copy of a quarantined resource is kept, in both
    obs = pq.read_table(sharded["tables"]["observation"]).column("observation_key").to_pylist()
    assert keyer.key("Observation", "planted-dup-of-bad") in obs
    # same plan twice: deterministic
    again = plan_shards(str(src), Store(), n=5, resources=RESOURCES,
                        piece_bytes=8 << 10)
    assert again == plan


def test_sharded_equals_single_process_on_clinosim(tmp_path, keyer, clinosim_fhir):
    """On a clinosim US Core cohort (the session's, generated offline; ``$SYNTHFACTORY_CLINOSIM_FHIR`` for a
    larger one), with planted duplicates and dangling references."""
    cohort = clinosim_fhir
    src = tmp_path / "clinosim"
    src.mkdir()
    for t in ("Patient", "Encounter", "Condition"):
        shutil.copy(cohort / f"{t}.ndjson", src)
    with open(cohort / "Observation.ndjson", "rb") as fh:  # at most 6,000 lines keeps the test short
        obs = [line.rstrip(b"\n") for _, line in zip(range(6000), fh) if line.strip()]
    _write(src / "Observation.ndjson", obs)
    _plant(src)
    one = _single(src, tmp_path / "one", keyer)
    sharded = _sharded(src, tmp_path / "sharded", keyer, 4, 256 << 10)
    _same(one, sharded)
    assert sharded["sharded"]["shards"] == 4 and one["rows"]["patient"] > 10
    assert sharded["sharded"]["native_lines"] > 0.9 * sum(one["native_lines"].values()) > 0  # the compiled flatten


def test_merge_validates_what_no_shard_did(tmp_path, keyer, carebundle_extract):
    """The first 20 candidates of a type are always validated: when a shard's first lines are duplicates of
    another shard's, a line the shard counted past its own first 20 is among the first 20 overall; the merge
    reads and validates it (and quarantines it here: a field R4 does not have)."""
    src = tmp_path / "extract"
    src.mkdir()
    shutil.copy(carebundle_extract / "Patient.ndjson", src)
    cond = _lines(carebundle_extract / "Condition.ndjson")
    head, rest = cond[:3], cond[3:40]
    bad = orjson.loads(rest[5])
    bad["notAnR4Field"] = 1
    rest[5] = orjson.dumps(bad)
    lines = [*head, *(head * 8), *rest]
    _write(src / "Condition.ndjson", lines)
    kw = dict(validate_sample_rate=0.0)
    one = ingest_extract(str(src), str(tmp_path / "one"), keyer=keyer, resources=["Patient", "Condition"], **kw)
    plan = plan_shards(str(src), Store(), n=1, resources=["Patient", "Condition"])
    cut = sum(len(x) + 1 for x in head)
    pat, con = plan["shards"][0]["segments"]
    plan["shards"] = [{"index": 0, "segments": [pat, dict(con, end=cut)]},
                      {"index": 1, "segments": [dict(con, start=cut, first_line=3)]}]
    results = [ingest_shard(s, str(tmp_path / "sh" / str(s["index"])), keyer=keyer,
                            resources=["Patient", "Condition"], **kw) for s in plan["shards"]]
    sharded = merge(plan, results, str(tmp_path / "sharded"), keyer=keyer, resources=["Patient", "Condition"], **kw)
    assert sharded["sharded"]["revalidated_in_merge"] >= 1
    _same(one, sharded)
    assert any(r["reason"].startswith("validation failed") for r in map(json.loads, Path(
        one["quarantine_uri"]).read_text().splitlines()))


def test_pipeline_sharded_ingest_equals_one_task_and_is_reused(tmp_path, small_extract):
    """``operations.ingest_shards``: the pipeline's plan -> shards -> merge (what the DAG maps) gives the summary
    and outputs of the one-task ingest; a second run reuses it like any ingest."""
    from synthfactory import pipeline
    from synthfactory.spec import load_spec
    from tests.conftest import write_spec

    def ctx(shards: int, run_id: str, **kw):
        spec = load_spec(write_spec(tmp_path / f"specs{shards}", "shard", small_extract, tmp_path / f"st{shards}",
                                    operations__ingest_shards=shards))
        return pipeline.RunContext(spec=spec, run_id=run_id, version="v1", salt="s" * 32, **kw)

    one = pipeline.ingest(ctx(1, "r1"))
    c = ctx(3, "r1")
    shards = pipeline.plan_ingest_shards(c)
    assert 2 <= len(shards) <= 3 and json.loads(json.dumps(shards)) == shards  # XCom-able
    results = [pipeline.ingest_shard(ctx(3, "r1"), s) for s in shards]
    merged = pipeline.merge_ingest(ctx(3, "r1"), results)
    assert merged["shards"] == len(shards)
    assert not (tmp_path / "st3" / "shard" / "runs" / "r1" / "ingest" / "shards").exists()
    for k in ("rows", "quarantined_total", "extract_sha256"):
        assert merged[k] == one[k], k
    _same(json.loads(Path(one["report_uri"]).read_text()), json.loads(Path(merged["report_uri"]).read_text()))
    assert Path(merged["identifiers_uri"].replace(".parquet", ".index.parquet")).exists()
    again = pipeline.ingest(ctx(3, "r2"))  # in one process: plan, shards, merge in turn; reused here
    assert again["reused_from_run"] == "r1" and again["rows"] == one["rows"]


def test_sharded_s3_extract_and_staging_equal_local_one_process(tmp_path, keyer, carebundle_extract):
    """An s3:// extract (plain files read with ranged GETs, a gzip file streamed) into s3:// staging."""
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    src = tmp_path / "extract"
    shutil.copytree(carebundle_extract, src)
    _plant(src)
    one = _single(src, tmp_path / "one", keyer)
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="phi")
        for path in sorted(src.iterdir()):
            client.put_object(Bucket="phi", Key=f"x/{path.name}", Body=path.read_bytes())
        store = Store(s3=client)
        plan = plan_shards("s3://phi/x", store, n=3, resources=RESOURCES, piece_bytes=8 << 10)
        results = [ingest_shard(s, f"s3://phi/staging/shards/{s['index']}", keyer=keyer, store=store,
                                resources=RESOURCES) for s in plan["shards"]]
        sharded = merge(plan, results, "s3://phi/staging", keyer=keyer, store=store, resources=RESOURCES)
        for k in COUNTS:
            assert sharded[k] == one[k], k
        for t, uri in one["tables"].items():
            a, b = pq.read_table(uri), store.read_table(sharded["tables"][t])
            cols = [(c, "ascending") for c in a.column_names]
            assert a.sort_by(cols).equals(b.sort_by(cols)), t
        assert store.read_bytes(sharded["quarantine_uri"]) == Path(one["quarantine_uri"]).read_bytes()
        ids = store.read_table(sharded["identifiers_uri"])
        assert sorted(zip(*ids.to_pydict().values())) == sorted(zip(*pq.read_table(one["identifiers_uri"]).to_pydict().values()))


@pytest.mark.parametrize("engine", ["fast", "views"])
def test_sharded_with_a_second_table_per_type_equals_single_process(tmp_path, keyer, carebundle_extract, engine):
    """A user view beside the built-in observation table (two tables of one type: the general path, patient
    references of both tables checked), on either engine."""
    src = tmp_path / "extract"
    shutil.copytree(carebundle_extract, src)
    _plant(src)
    view = {"name": "obs_codes", "resource": "Observation", "select": [{"column": [
        {"name": "obs_codes_key", "path": "getResourceKey()"},
        {"name": "patient_key", "path": "subject.getReferenceKey(Patient)"},
        {"name": "code", "path": "code.coding.code.first()"}]}]}
    kw = dict(views=[view], engine=engine, validate_sample_rate=0.05)
    one = _single(src, tmp_path / "one", keyer, **kw)
    assert one["rows"]["obs_codes"] > 0 and one["dangling_references"] == {"Observation": 1}
    _same(one, _sharded(src, tmp_path / "sharded", keyer, 4, 8 << 10, **kw))
