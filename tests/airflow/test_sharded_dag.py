"""A spec with ``operations.ingest_shards`` > 1: the DAG plans the shards, maps one ingest task over them
(Airflow dynamic task mapping) and merges them in the task ``ingest`` that every later stage reads."""

from __future__ import annotations

import pytest

from synthfactory.spec import SpecError, load_spec
from tests.conftest import write_spec


def _dag(tmp_path, name="sharded", **overrides):
    from synthfactory.airflow.dag_factory import build_dag

    path = write_spec(tmp_path / "specs", name, tmp_path / "extract", tmp_path / "staging", **overrides)
    return build_dag(path)


def test_sharded_ingest_is_plan_then_mapped_shards_then_merge(tmp_path):
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    dag = _dag(tmp_path, operations__ingest_shards=4, trigger={"wait_for_key": "s3://phi/x/_SUCCESS"})
    shard = dag.get_task("ingest_shard")
    assert isinstance(shard, MappedOperator)
    assert shard.upstream_task_ids == {"ingest_plan"}
    assert dag.get_task("ingest").upstream_task_ids == {"ingest_shard"}
    assert dag.get_task("ingest_plan").upstream_task_ids == {"wait_for_extract"}
    for later in ("prepare", "privacy", "gate", "release"):
        assert "ingest" in dag.get_task(later).upstream_task_ids
    assert "ingest_shard` mapped" in dag.doc_md
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert restored.get_task("ingest_shard").upstream_task_ids == {"ingest_plan"}

    plain = _dag(tmp_path, "one_task")  # the default: one ingest task, as before
    assert {"ingest_plan", "ingest_shard"}.isdisjoint(plain.task_ids) and "ingest" in plain.task_ids


def test_shards_need_an_ndjson_extract(tmp_path):
    path = write_spec(tmp_path / "specs", "bundles", tmp_path / "x", tmp_path / "st", source__kind="fhir_bundle",
                      operations__ingest_shards=2)
    with pytest.raises(SpecError, match="ingest_shards"):
        load_spec(path)
