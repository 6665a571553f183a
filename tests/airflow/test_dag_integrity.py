"""DAG integrity: the dags/ folder imports cleanly, one DAG per spec, with the wiring ops expect."""

from __future__ import annotations

from pathlib import Path

import pytest

from synthfactory.spec import discover_specs, load_spec

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["ingest", "prepare", "fit", "sample", "quality", "privacy", "gate", "release"]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_one_dag_per_spec(dagbag):
    expected = {f"synthfactory_{load_spec(p).name}" for p in discover_specs(ROOT / "include/datasets")}
    assert expected and expected <= set(dagbag.dag_ids)


def test_dag_wiring(dagbag):
    for dag_id in dagbag.dag_ids:
        dag = dagbag.dags[dag_id]
        assert "synthfactory" in dag.tags and dag.tags, dag_id
        assert dag.doc_md and dag.max_active_runs == 1
        assert {"rows", "synthesizer", "profile"} <= set(dag.params.keys())
        assert set(dag.task_ids) == set(STAGES)
        for t in dag.tasks:
            assert t.retries >= 1, t.task_id
            assert t.execution_timeout is not None
        # strictly sequential gates: release only after gate, gate only after quality and privacy
        assert dag.get_task("release").upstream_task_ids >= {"gate"}
        assert dag.get_task("gate").upstream_task_ids >= {"quality", "privacy"}
        assert dag.get_task("privacy").upstream_task_ids >= {"sample", "prepare", "ingest"}
        assert [o.uri for o in dag.get_task("release").outlets][0].startswith("s3://")


def test_profile_param_lists_spec_profiles(dagbag):
    dag = dagbag.dags["synthfactory_cohort_demo"]
    schema = dag.params.get_param("profile").schema
    assert schema["enum"] == ["default", "lenient", "strict"]
    assert dag.params.get_param("synthesizer").schema["enum"][0] == "gaussian_copula"


def test_bad_spec_surfaces_as_import_error(tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    (tmp_path / "broken.yaml").write_text((ROOT / "include/datasets/cohort_demo.yaml").read_text()
                                          .replace("name: cohort_demo", "name: broken")
                                          .replace("max_dcr_share: 0.55", "max_dcr_share: 3"))
    monkeypatch.setenv("SYNTHFACTORY_SPECS_DIR", str(tmp_path))
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    (err,) = bag.import_errors.values()
    assert "privacy.max_dcr_share" in err and "less than or equal to 1" in err


def test_provider_info_and_plugin():
    from synthfactory.airflow import get_provider_info
    from synthfactory.airflow.plugin import SynthFactoryPlugin, release_uri

    info = get_provider_info()
    assert info["package-name"] == "synthfactory"
    assert info["connection-types"][0]["connection-type"] == "synthfactory_salt"
    assert SynthFactoryPlugin.name == "synthfactory"
    assert release_uri("b", "/p/", "ds", "v1") == "s3://b/p/ds/v1/"


def test_plugins_folder_is_import_light():
    import ast

    heavy = {"sdv", "torch", "great_expectations", "sdmetrics", "anonymeter", "pandas"}
    for path in (ROOT / "plugins").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in heavy for n in names), (path, names)
