"""A spec with ``operations.leak_scan_shards`` > 1: the DAG computes the privacy figures, plans the leak scan, maps
one scan task over the parts (Airflow dynamic task mapping) and merges them in the task ``privacy`` that the gate
and the release read; the default keeps the scan inside the one privacy task."""

from __future__ import annotations

from tests.conftest import write_spec


def _dag(tmp_path, name="leakmap", **overrides):
    from synthfactory.airflow.dag_factory import build_dag

    path = write_spec(tmp_path / "specs", name, tmp_path / "extract", tmp_path / "staging", **overrides)
    return build_dag(path)


MAPPED = {"privacy_metrics", "leak_scan_plan", "leak_scan_part"}


def test_mapped_leak_scan_is_metrics_then_plan_then_mapped_parts_then_merge(tmp_path):
    from airflow.sdk.definitions.mappedoperator import MappedOperator
    from airflow.serialization.serialized_objects import DagSerialization

    dag = _dag(tmp_path, operations__leak_scan_shards=4, operations__ingest_shards=2)
    part = dag.get_task("leak_scan_part")
    assert isinstance(part, MappedOperator)
    assert part.upstream_task_ids == {"leak_scan_plan"}
    assert dag.get_task("leak_scan_plan").upstream_task_ids == {"prepare", "sample", "ingest", "quality",
                                                                "privacy_metrics"}
    assert dag.get_task("privacy_metrics").upstream_task_ids == {"prepare", "sample", "ingest", "quality"}
    assert dag.get_task("privacy").upstream_task_ids == {"privacy_metrics", "leak_scan_part"}
    for later in ("gate", "release"):  # they read the merged summary: the gate scans only the card
        assert "privacy" in dag.get_task(later).upstream_task_ids
        assert MAPPED.isdisjoint(dag.get_task(later).upstream_task_ids)
    assert "`leak_scan_part` mapped" in dag.doc_md
    for tid in ("leak_scan_plan", "leak_scan_part", "privacy"):  # the privacy stage's timeout
        assert dag.get_task(tid).execution_timeout == dag.get_task("privacy_metrics").execution_timeout
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert restored.get_task("leak_scan_part").upstream_task_ids == {"leak_scan_plan"}
    assert restored.get_task("privacy").upstream_task_ids == {"privacy_metrics", "leak_scan_part"}
    assert isinstance(restored.get_task("leak_scan_part"), MappedOperator) or \
        type(restored.get_task("leak_scan_part")).__name__.endswith("MappedOperator")

    plain = _dag(tmp_path, "one_task")  # the default: the scan inside the privacy task, no extra tasks
    assert MAPPED.isdisjoint(plain.task_ids) and "privacy" in plain.task_ids
    assert plain.get_task("gate").upstream_task_ids >= {"privacy"}
    assert len(plain.task_ids) == len(dag.task_ids) - 3 - 2  # the 3 leak-scan tasks, the 2 ingest ones
