"""End to end through `airflow dags test`: a run-time neural synthesizer on a CPU-routed DAG fails in its first
task with the routing message, without retries and before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from synthfactory.testing import dev
from tests.conftest import write_spec

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_neural_param_on_cpu_routed_dag_fails_fast(tmp_path, small_extract):
    specs = tmp_path / "specs"
    write_spec(specs, "e2e_routing", small_extract, tmp_path / "staging")
    env = dev.airflow_env(ROOT, tmp_path / "airflow")
    env["SYNTHFACTORY_SPECS_DIR"] = str(specs)
    dev.ensure_airflow_db(env)
    log = tmp_path / "routing.log"
    proc = dev.dags_test("synthfactory_e2e_routing", env, conf={"synthesizer": "ctgan", "epochs": 5}, log_path=log)
    text = log.read_text()
    assert proc.returncode != 0
    assert "RoutingError: synthesizer='ctgan' is a neural synthesizer, but this DAG's fit task runs on the CPU " \
           "queue 'default'" in text
    assert "stage=ingest" not in text                          # failed before ingesting anything
    assert not (tmp_path / "staging" / "e2e_routing" / "runs").exists()
    assert "up_for_retry" not in text.lower()                  # AirflowFailException: no retries
