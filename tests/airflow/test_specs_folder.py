"""One documented rule finds the dataset specs for the DAG file and the "Synthetic datasets" page (issue #21,
item 3): $SYNTHFACTORY_SPECS_DIR, else <dags folder>/../include/datasets, else $SYNTHFACTORY_HOME/include/datasets;
a DAG folder that finds no spec says so as an import error naming the folders searched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from synthfactory.airflow import specs_folder
from tests.conftest import write_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def clean_env(monkeypatch):
    monkeypatch.delenv("SYNTHFACTORY_SPECS_DIR", raising=False)
    monkeypatch.delenv("SYNTHFACTORY_HOME", raising=False)
    return monkeypatch


def _project(tmp_path: Path) -> Path:
    """A project made by the README's first recipe: cp -r dags/ plugins/ include/datasets/ <project>."""
    project = tmp_path / "project"
    for folder in ("dags", "plugins"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "include/datasets", project / "datasets")
    return project


def _bag(dags: Path):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(dags))


def test_specs_outside_include_datasets_are_an_import_error_naming_the_folder(tmp_path, clean_env):
    project = _project(tmp_path)
    bag = _bag(project / "dags")
    assert not bag.dag_ids
    (err,) = bag.import_errors.values()
    assert "no dataset spec (*.yaml) found" in err
    assert str(project / "include" / "datasets") in err and "SYNTHFACTORY_SPECS_DIR" in err


def test_specs_in_include_datasets_next_to_dags_are_found(tmp_path, clean_env):
    project = _project(tmp_path)
    (project / "include").mkdir()
    (project / "datasets").rename(project / "include" / "datasets")
    bag = _bag(project / "dags")
    assert bag.import_errors == {}
    assert "synthfactory_cohort_demo" in bag.dag_ids


def test_the_setting_wins_and_an_empty_one_says_so(tmp_path, clean_env):
    project = _project(tmp_path)
    clean_env.setenv("SYNTHFACTORY_SPECS_DIR", str(project / "datasets"))
    bag = _bag(project / "dags")
    assert bag.import_errors == {} and "synthfactory_cohort_demo" in bag.dag_ids
    empty = tmp_path / "empty"
    empty.mkdir()
    clean_env.setenv("SYNTHFACTORY_SPECS_DIR", str(empty))
    (err,) = _bag(project / "dags").import_errors.values()
    assert f"searched: {empty} ($SYNTHFACTORY_SPECS_DIR names it)" in err


def test_search_order(tmp_path, clean_env):
    dags = tmp_path / "p" / "dags"
    home = tmp_path / "home"
    clean_env.setenv("SYNTHFACTORY_HOME", str(home))
    assert specs_folder.candidates(dags) == [tmp_path / "p" / "include" / "datasets", home / "include" / "datasets"]
    write_spec(home / "include" / "datasets", "from_home", tmp_path, tmp_path)
    assert specs_folder.find(dags) == home / "include" / "datasets"
    write_spec(tmp_path / "p" / "include" / "datasets", "next_to_dags", tmp_path, tmp_path)
    assert specs_folder.find(dags) == tmp_path / "p" / "include" / "datasets"
    clean_env.setenv("SYNTHFACTORY_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(specs_folder.NoSpecsFound) as exc:
        specs_folder.find(tmp_path / "elsewhere" / "dags")
    assert exc.value.searched == [tmp_path / "elsewhere" / "include" / "datasets",
                                  tmp_path / "empty-home" / "include" / "datasets"]


def test_the_page_uses_the_same_rule(tmp_path, clean_env):
    """Without specs_folder the page searches as the DAG file does, from Airflow's [core] dags_folder."""
    from synthfactory.airflow.webapp import create_app

    project = tmp_path / "project"
    write_spec(project / "include" / "datasets", "page_rule", tmp_path, tmp_path / "staging")
    clean_env.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(project / "dags"))
    seen = []

    def factory(conn_id):
        seen.append(conn_id)
        raise RuntimeError("offline")

    client = TestClient(create_app(client_factory=factory, connection_exists=lambda c: False, require_auth=False))
    (d,) = client.get("/api/releases").json()["datasets"]
    assert d["dataset"] == "page_rule" and seen == ["sandbox_s3"]
    clean_env.setenv("SYNTHFACTORY_SPECS_DIR", str(tmp_path / "nothing-here"))
    resp = client.get("/datasets")
    assert resp.status_code == 200 and "no dataset specs found: set $SYNTHFACTORY_SPECS_DIR" in resp.text
    assert str(tmp_path) not in resp.text  # the folders searched go to the log, not the page
    assert client.get("/api/releases").json()["notice"].startswith("no dataset specs found")
