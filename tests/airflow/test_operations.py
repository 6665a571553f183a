"""Operations wiring of the spec-built DAGs: GPU routing, per-stage timeouts, retries with backoff, failure
notifications, asset/sensor starts, trigger-form Params, and the KubernetesExecutor pod override."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from synthfactory.airflow import routing
from synthfactory.spec import load_spec
from tests.conftest import write_spec

CPU_STAGES = ["ingest", "prepare", "quality", "privacy", "gate", "release"]


def _dag(tmp_path, name="ops", **overrides):
    from synthfactory.airflow.dag_factory import build_dag

    path = write_spec(tmp_path / "specs", name, tmp_path / "extract", tmp_path / "staging", **overrides)
    return build_dag(path), load_spec(path)


def test_cpu_spec_keeps_every_stage_on_the_default_queue(tmp_path):
    dag, _ = _dag(tmp_path)
    for t in dag.tasks:
        assert (t.queue, t.pool) == ("default", "default_pool"), t.task_id
        assert not t.executor_config


@pytest.mark.parametrize("kind", ["ctgan", "tvae", "copulagan"])
def test_neural_spec_routes_fit_and_sample_to_the_gpu_queue_and_pool(tmp_path, kind):
    dag, _ = _dag(tmp_path, synthesizer__kind=kind, synthesizer__params={})
    for tid in ("fit", "sample"):
        assert (dag.get_task(tid).queue, dag.get_task(tid).pool) == ("gpu", "gpu")
    # the membership-inference battery's shadow attack trains the spec's (neural) synthesizer: where fit trains
    assert (dag.get_task("privacy").queue, dag.get_task("privacy").pool) == ("gpu", "gpu")
    for tid in CPU_STAGES:
        if tid != "privacy":
            assert (dag.get_task(tid).queue, dag.get_task(tid).pool) == ("default", "default_pool")
    dag, _ = _dag(tmp_path, f"{kind}_noshadow", synthesizer__kind=kind, synthesizer__params={},
                  privacy__mia={"attacks": ["distance", "domias"]}, profiles={})
    assert (dag.get_task("privacy").queue, dag.get_task("privacy").pool) == ("default", "default_pool")


def test_relational_par_or_neural_children_train_on_gpu(tmp_path):
    dag, _ = _dag(tmp_path, "rel_par", synthesizer__mode="relational", synthesizer__kind="gaussian_copula", synthesizer__params={},
                  synthesizer__relational={"engine": "par"})
    assert dag.get_task("fit").queue == "gpu"
    dag, _ = _dag(tmp_path, "rel_kids", synthesizer__mode="relational", synthesizer__kind="gaussian_copula", synthesizer__params={},
                  synthesizer__relational={"child_kind": "tvae"})
    assert dag.get_task("fit").queue == "gpu"
    dag, _ = _dag(tmp_path, "rel_cpu", synthesizer__mode="relational", synthesizer__kind="gaussian_copula", synthesizer__params={})
    assert dag.get_task("fit").queue == "default"


def test_spec_can_name_its_own_queue_and_pool(tmp_path):
    dag, _ = _dag(tmp_path, synthesizer__kind="ctgan", synthesizer__params={},
                  synthesizer__queue="a100", synthesizer__pool="a100_gpus")
    assert (dag.get_task("fit").queue, dag.get_task("fit").pool) == ("a100", "a100_gpus")
    assert dag.get_task("ingest").queue == "default"


def test_serialized_dag_keeps_routing_and_the_data_card_link(tmp_path):
    from airflow.serialization.serialized_objects import DagSerialization

    dag, _ = _dag(tmp_path, synthesizer__kind="ctgan", synthesizer__params={})
    data = DagSerialization.to_dict(dag)
    tasks = {t["__var"]["task_id"]: t["__var"] for t in data["dag"]["tasks"]}
    assert tasks["fit"]["queue"] == "gpu" and tasks["fit"]["pool"] == "gpu"
    for tid in ("gate", "release"):
        assert tasks[tid]["_operator_extra_links"] == {"Data card": "_link_DataCardLink"}
    restored = DagSerialization.from_dict(data)
    assert "Data card" in restored.get_task("release").extra_links


def test_runtime_neural_param_on_a_cpu_routed_dag_fails_fast(tmp_path):
    _, cpu = _dag(tmp_path, "cpu_spec")
    routing.check_runtime_synthesizer(cpu, "gaussian_copula")  # fine
    with pytest.raises(routing.RoutingError) as err:
        routing.check_runtime_synthesizer(cpu, "ctgan")
    msg = str(err.value)
    assert "synthesizer='ctgan'" in msg and "CPU queue 'default'" in msg and "synthesizer.queue: gpu" in msg
    _, gpu = _dag(tmp_path, "gpu_spec", synthesizer__kind="tvae", synthesizer__params={})
    routing.check_runtime_synthesizer(gpu, "ctgan")          # on the gpu queue: any kind may run
    routing.check_runtime_synthesizer(gpu, "gaussian_copula")
    _, onpurpose = _dag(tmp_path, "cpu_on_purpose", synthesizer__queue="default")
    routing.check_runtime_synthesizer(onpurpose, "ctgan")    # the spec chose the CPU queue on purpose


def test_routing_errors_fail_without_retries(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from synthfactory.airflow.dag_factory import _no_retry_on_user_errors

    @_no_retry_on_user_errors
    def boom() -> dict:
        raise routing.RoutingError("neural on cpu")

    with pytest.raises(AirflowFailException, match="RoutingError: neural on cpu"):
        boom()


@pytest.mark.parametrize("where, name", [
    ("synthfactory.synthesize.relational", "RelationalError"),
    ("synthfactory.synthesize.conditional", "ConditionalError"),
    ("synthfactory.synthesize.constraints", "ConstraintError"),
    ("synthfactory.synthesize.fhir_out", "FhirOutputError"),
    ("synthfactory.fhir.views", "ViewError"),
    ("synthfactory.fhir.fhirpath", "FhirPathError"),
    ("synthfactory.spec", "SpecError"),
])
def test_user_errors_fail_at_once_and_other_errors_retry(where, name):
    import importlib

    from airflow.sdk.exceptions import AirflowFailException

    from synthfactory.airflow.dag_factory import _no_retry_on_user_errors

    err = getattr(importlib.import_module(where), name)

    @_no_retry_on_user_errors
    def bad_input() -> dict:
        raise err("a bad spec or table")

    @_no_retry_on_user_errors
    def flaky() -> dict:
        raise ConnectionError("worker lost the S3 connection")

    with pytest.raises(AirflowFailException, match=f"{name}: a bad spec or table"):
        bad_input()
    with pytest.raises(ConnectionError):  # transient: left to Airflow's retries
        flaky()


def test_per_stage_timeouts_and_retries_with_backoff(tmp_path):
    dag, _ = _dag(tmp_path, operations={"timeouts": {"ingest": "30m", "fit": "2h", "gate": 5},
                                        "retries": 3, "retry_delay_seconds": 20})
    assert dag.get_task("ingest").execution_timeout == timedelta(minutes=30)
    assert dag.get_task("fit").execution_timeout == timedelta(hours=2)
    assert dag.get_task("gate").execution_timeout == timedelta(minutes=5)
    assert dag.get_task("quality").execution_timeout == timedelta(hours=1)  # default
    for t in dag.tasks:
        assert t.retries == 3 and t.retry_delay == timedelta(seconds=20)
        assert t.retry_exponential_backoff == 2.0 and t.max_retry_delay == timedelta(minutes=30)
        assert t.owner == "data-platform"


def test_bad_timeouts_name_the_field(tmp_path):
    from synthfactory.spec import SpecError

    for bad, words in (({"fitt": "1h"}, "unknown stage(s) ['fitt']"), ({"fit": "2 weeks"}, "is not a duration"),
                       ({"fit": 0}, "more than 0")):
        with pytest.raises(SpecError, match=r"operations\.timeouts") as err:
            _dag(tmp_path, operations={"timeouts": bad})
        assert words in str(err.value)


def test_no_notifier_unless_the_spec_names_a_connection(tmp_path):
    dag, _ = _dag(tmp_path)
    assert all(not t.on_failure_callback for t in dag.tasks)


def test_smtp_notifier_is_wired_on_every_task(tmp_path):
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    dag, _ = _dag(tmp_path, operations={"notify": {"kind": "smtp", "connection_id": "ops_smtp",
                                                   "to": ["oncall@example.org"]}})
    for t in dag.tasks:
        (n,) = t.on_failure_callback
        assert isinstance(n, SmtpNotifier) and n.smtp_conn_id == "ops_smtp" and n.to == ["oncall@example.org"]
        assert "{{ dag.dag_id }}" in n.subject


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append((self.path, json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_notifier_posts_the_failure_to_the_webhook_connection(tmp_path, monkeypatch):
    from airflow.providers.http.notifications.http import HttpNotifier

    from synthfactory.release.gate import GateRefused

    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("AIRFLOW_CONN_OPS_WEBHOOK", f"http://127.0.0.1:{server.server_port}")
        dag, _ = _dag(tmp_path, "notify_me", operations={"notify": {"kind": "http", "connection_id": "ops_webhook",
                                                                   "endpoint": "/hooks/synthfactory"}})
        (n,) = dag.get_task("gate").on_failure_callback
        assert isinstance(n, HttpNotifier) and n.http_conn_id == "ops_webhook"
        n({"dag": dag, "ti": SimpleNamespace(task_id="gate", try_number=1), "run_id": "manual__1",
           "exception": GateRefused("notify_me: privacy gate failed: dcr_share 0.91 > max 0.6 (by 0.31)", {})})
    finally:
        server.shutdown()
    ((path, body),) = _Hook.received
    assert path == "/hooks/synthfactory"
    assert body["dag_id"] == "synthfactory_notify_me" and body["task_id"] == "gate" and body["run_id"] == "manual__1"
    assert "privacy gate failed: dcr_share 0.91 > max 0.6" in body["text"]


def test_asset_trigger_schedules_on_the_extract_asset(tmp_path):
    from airflow.sdk import Asset

    dag, _ = _dag(tmp_path, schedule=None, trigger={"asset": "s3://phi-extracts/ops/"})
    assert dag.schedule == [Asset("s3://phi-extracts/ops/")] or list(dag.schedule) == [Asset("s3://phi-extracts/ops/")]
    assert type(dag.timetable).__name__ == "AssetTriggeredTimetable"


def test_asset_trigger_and_cron_are_exclusive(tmp_path):
    from synthfactory.spec import SpecError

    with pytest.raises(SpecError, match="trigger.asset"):
        _dag(tmp_path, schedule="@daily", trigger={"asset": "s3://phi-extracts/ops/"})


def test_wait_for_key_adds_a_deferrable_s3_sensor_before_ingest(tmp_path):
    from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor

    dag, _ = _dag(tmp_path, source__connection_id="phi_s3",
                  trigger={"wait_for_key": "s3://phi-extracts/ops/*/_SUCCESS", "wait_timeout": "2h"})
    sensor = dag.get_task("wait_for_extract")
    assert isinstance(sensor, S3KeySensor) and sensor.deferrable and sensor.wildcard_match
    assert sensor.aws_conn_id == "phi_s3" and sensor.timeout == 7200
    assert dag.get_task("ingest").upstream_task_ids == {"wait_for_extract"}
    plain, _ = _dag(tmp_path, "no_sensor")
    assert "wait_for_extract" not in plain.task_ids


def test_trigger_form_offers_epochs_and_force_ingest(tmp_path):
    dag, _ = _dag(tmp_path)
    epochs, force = dag.params.get_param("epochs"), dag.params.get_param("force_ingest")
    assert epochs.value == 0 and epochs.schema["type"] == "integer" and epochs.schema["minimum"] == 0
    assert epochs.schema["title"] == "Training epochs" and "Neural synthesizers only" in epochs.description
    assert force.value is False and force.schema["type"] == "boolean" and force.schema["title"] == "Force re-ingest"
    desc = dag.params.get_param("synthesizer").description
    assert "CPU queue 'default'" in desc  # the form says where training runs in this DAG


# -- KubernetesExecutor ---------------------------------------------------------------------------
def test_gpu_pod_override_structure():
    spec = routing.gpu_pod_override_spec(2)["spec"]
    (c,) = spec["containers"]
    assert c["name"] == "base"  # the task's container in Airflow's pod template
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "2"} == c["resources"]["requests"]
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_executor_config_only_under_the_kubernetes_executor(monkeypatch, tmp_path):
    assert routing.kubernetes_executor_config(1) == {}  # CeleryExecutor/LocalExecutor: nothing to add
    import sys
    import types

    class _M:  # the few kubernetes.client.models classes used, as plain records
        def __init__(self, **kw):
            self.__dict__.update(kw)

    fake = types.ModuleType("kubernetes.client.models")
    for name in ("V1Pod", "V1PodSpec", "V1Container", "V1ResourceRequirements", "V1Toleration"):
        setattr(fake, name, type(name, (_M,), {}))
    client = types.ModuleType("kubernetes.client")
    client.models = fake
    root = types.ModuleType("kubernetes")
    root.client = client
    monkeypatch.setitem(sys.modules, "kubernetes", root)
    monkeypatch.setitem(sys.modules, "kubernetes.client", client)
    monkeypatch.setitem(sys.modules, "kubernetes.client.models", fake)
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "KubernetesExecutor")
    from airflow.configuration import conf

    monkeypatch.setattr(conf, "get", lambda section, key, fallback=None, **kw:
                        "KubernetesExecutor" if (section, key) == ("core", "executor") else fallback)
    pod = routing.kubernetes_executor_config(1)["pod_override"]
    (container,) = pod.spec.containers
    assert container.name == "base" and container.resources.limits == {"nvidia.com/gpu": "1"}
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu"
    _, spec = _dag(tmp_path, "k8s_gpu", synthesizer__kind="ctgan", synthesizer__params={})
    route = routing.training_route(spec, cpu_queue="default")
    assert route.task_kwargs()["executor_config"]["pod_override"].spec.containers[0].name == "base"
