"""Shared fixtures. Airflow's environment is pinned here, before anything imports airflow, so tests never
touch a user's ~/airflow."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_AF_HOME = Path(tempfile.mkdtemp(prefix="sf-airflow-home-"))
os.environ.setdefault("AIRFLOW_HOME", str(_AF_HOME))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(ROOT / "plugins"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{_AF_HOME / 'airflow.db'}")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def small_extract(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An offline FHIR R4 NDJSON extract of 160 patients (carebundle, deterministic)."""
    from synthfactory.dev import generate_sample_extract

    return generate_sample_extract(tmp_path_factory.mktemp("extract") / "ndjson", patients=160, seed=7)


def write_spec(folder: Path, name: str, extract: Path, staging: Path, **overrides: object) -> Path:
    """A dataset spec for tests: the demo spec with absolute source/staging and optional overrides."""
    import yaml

    data = yaml.safe_load((ROOT / "include/datasets/cohort_demo.yaml").read_text())
    data["name"] = name
    data["source"]["uri"] = str(extract)
    data["staging"]["uri"] = str(staging)
    data["features"]["min_patients"] = 20
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
