"""docker/: the compose stack, the images and the DAGs agree (no Docker engine needed: files are read).

- every queue a DAG task uses is consumed by a worker (the gpu worker consumes the fit/sample queue of neural
  specs) and every pool exists (airflow-init creates `gpu`);
- every connection a spec names is defined as AIRFLOW_CONN_<ID> and parses, S3 ones pointing at MinIO;
- MinIO's init creates every bucket the specs release to (and the staging bucket);
- the Airflow settings the stack sets exist in Airflow's configuration; secrets come from docker/.env;
- the images build from this repository's files with the installed Airflow and the locked torch version.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from synthfactory.spec import discover_specs, load_spec

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SPECS = ROOT / "include" / "datasets"
NEURAL_VARIANT = {"kind": "ctgan", "params": {}}


def _dotenv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


ENV_EXAMPLE = _dotenv(DOCKER / ".env.example")
# what an operator fills into the empty secrets of .env.example
TEST_ENV = {**ENV_EXAMPLE, **{k: f"test-{k.lower()}" for k, v in ENV_EXAMPLE.items() if not v}}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """docker compose's variable interpolation: ${V}, ${V:-default} (nested), ${V:?error}, $$ → $."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        val = env.get(name)
        if op in (":-", "-"):
            if val is None or (op == ":-" and val == ""):
                return interpolate(arg, env)
            return val
        if op in (":?", "?"):
            if val is None or (op == ":?" and val == ""):
                raise KeyError(f"{name}: {arg}")
            return val
        return val or ""

    out = value.replace("$$", "\0")
    prev = None
    while prev != out:
        prev, out = out, _VAR.sub(sub, out)
    return out.replace("\0", "$")


def _walk(node, env):
    if isinstance(node, dict):
        return {k: _walk(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return _walk(raw, TEST_ENV)


@pytest.fixture(scope="module")
def specs():
    return [load_spec(p) for p in discover_specs(SPECS)]


@pytest.fixture(scope="module")
def dags(tmp_path_factory, specs):
    """The DAGs of include/datasets, and a neural (ctgan) variant of each, built as the dag-processor would."""
    from synthfactory.airflow.dag_factory import build_dag

    folder = tmp_path_factory.mktemp("neural-specs")
    out = []
    for path in discover_specs(SPECS):
        out.append(build_dag(path))
        data = yaml.safe_load(path.read_text())
        name = data["name"] + "_neural"
        data.update(name=name, synthesizer={**data.get("synthesizer", {}), **NEURAL_VARIANT})
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))
        out.append(build_dag(folder / f"{name}.yaml"))
    return out


def _queues_of_worker(service: dict) -> set[str]:
    cmd = service["command"]
    assert cmd[:2] == ["celery", "worker"], cmd
    return set(cmd[cmd.index("--queues") + 1].split(","))


def test_stack_has_every_service(compose):
    assert {"postgres", "redis", "minio", "minio-init", "airflow-init", "api-server", "scheduler", "dag-processor",
            "triggerer", "worker", "gpu-worker"} <= set(compose["services"])
    assert compose["services"]["fhir"]["profiles"] == ["fhir"]  # optional, off by default


def test_workers_consume_every_queue_the_dags_use(compose, dags):
    svc = compose["services"]
    consumed = {name: _queues_of_worker(s) for name, s in svc.items()
                if isinstance(s.get("command"), list) and s["command"][:2] == ["celery", "worker"]}
    assert consumed == {"worker": {"default"}, "gpu-worker": {"gpu"}}
    used = {(t.queue, t.pool) for d in dags for t in d.tasks}
    assert ("gpu", "gpu") in used  # the neural variants' fit/sample
    for queue, _ in used:
        assert any(queue in q for q in consumed.values()), f"no worker consumes queue {queue!r}"
    neural_fit = {d.get_task("fit").queue for d in dags if d.dag_id.endswith("_neural")}
    assert neural_fit == _queues_of_worker(svc["gpu-worker"])
    assert svc["worker"]["environment"]["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == "default"


def test_gpu_pool_exists_and_gpu_worker_reserves_a_gpu(compose, dags):
    svc = compose["services"]
    init = "\n".join(svc["airflow-init"]["command"])
    pools = {p for d in dags for p in (t.pool for t in d.tasks)} - {"default_pool"}
    for pool in pools:
        assert re.search(rf"airflow pools set {pool} ", init), f"pool {pool!r} is not created by airflow-init"
    (dev,) = svc["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"] and dev["count"] >= 1
    assert "--concurrency" in svc["gpu-worker"]["command"]
    assert svc["gpu-worker"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert "deploy" not in svc["worker"]


def _spec_connections(spec) -> set[str]:
    ids = {spec.release.connection_id, spec.source.connection_id, spec.staging.connection_id,
           spec.source.salt_connection_id, spec.trigger.connection_id,
           spec.operations.notify.connection_id if spec.operations.notify else None}
    return {i for i in ids if i}


def test_every_spec_connection_is_defined_and_points_at_minio(compose, specs):
    env = compose["services"]["worker"]["environment"]
    needed = set().union(*(_spec_connections(s) for s in specs)) | {"synthfactory_salt"}
    for conn_id in needed:
        var = f"AIRFLOW_CONN_{conn_id.upper()}"
        assert var in env, f"{var} missing from the compose stack"
        conn = json.loads(env[var])
        assert conn["conn_type"]
        if conn["conn_type"] == "aws":
            assert conn["extra"]["endpoint_url"] == "http://minio:9000" and conn["login"] and conn["password"]
    sandbox = json.loads(env["AIRFLOW_CONN_SANDBOX_S3"])
    assert sandbox["login"] == TEST_ENV["SANDBOX_ACCESS_KEY"] != TEST_ENV["MINIO_ROOT_USER"]  # its own user
    # the same environment on every Airflow container, the GPU worker included
    for name in ("api-server", "scheduler", "dag-processor", "triggerer", "gpu-worker", "airflow-init"):
        assert compose["services"][name]["environment"]["AIRFLOW_CONN_SANDBOX_S3"] == env["AIRFLOW_CONN_SANDBOX_S3"]


def test_minio_init_creates_the_spec_buckets(compose, specs):
    init = compose["services"]["minio-init"]
    script = "\n".join(init["command"])
    (mb,) = [line for line in script.splitlines() if line.strip().startswith("mc mb")]
    created = {interpolate(a.strip('"'), {}).replace("$", "").split("/", 1)[1] for a in mb.split()[3:]}
    created = {init["environment"].get(b, b) for b in created}
    needed = {s.release.bucket for s in specs}
    for s in specs:
        for uri in (s.staging.uri, s.source.uri):
            if uri.startswith("s3://"):
                needed.add(uri[5:].split("/")[0])
    assert needed <= created and "synthfactory-staging" in created
    assert f'mc encrypt set sse-s3 "local/$SANDBOX_BUCKET"' in script  # releases are SSE (AES256) uploads
    # the sandbox writer's policy: the sandbox bucket and nothing else
    policy = json.loads(script.split("<<POLICY", 1)[1].split("POLICY", 1)[0].replace("$SANDBOX_BUCKET",
                                                                                     init["environment"]["SANDBOX_BUCKET"]))
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources == {"arn:aws:s3:::synthetic-sandbox", "arn:aws:s3:::synthetic-sandbox/*"}
    assert {s.release.bucket for s in specs} == {"synthetic-sandbox"} or all(
        f"arn:aws:s3:::{s.release.bucket}/*" in resources for s in specs)
    assert 'mc admin policy attach local sandbox-writer --user "$SANDBOX_ACCESS_KEY"' in script
    assert compose["services"]["minio"]["environment"]["MINIO_KMS_SECRET_KEY"]


def test_airflow_settings_exist_and_secrets_come_from_dotenv(raw, compose):
    from airflow.configuration import conf

    desc = conf.configuration_description
    env = compose["services"]["scheduler"]["environment"]
    for var in env:
        if var.startswith("AIRFLOW__"):
            _, section, key = var.split("__", 2)
            assert key.lower() in desc.get(section.lower(), {}).get("options", {}), f"{var}: no such Airflow option"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://api-server:8080/execution/"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    # every variable the compose file needs without a default is in .env.example
    text = (DOCKER / "docker-compose.yaml").read_text()
    required = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)(?::\?[^}]*)?\}", text))
    assert required <= set(ENV_EXAMPLE), sorted(required - set(ENV_EXAMPLE))
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        _walk(raw, {k: v for k, v in TEST_ENV.items() if k != "POSTGRES_PASSWORD"})


def test_images_build_from_this_repo_with_the_locked_versions(compose):
    from importlib.metadata import version

    airflow = version("apache-airflow")
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", (ROOT / "requirements.txt").read_text(), re.M))
    cpu = (DOCKER / "Dockerfile").read_text()
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(rf"^FROM apache/airflow:{re.escape(airflow)}-python3\.11$", cpu, re.M)
    assert re.search(r"^FROM nvidia/cuda:\S+$", gpu, re.M)
    for text in (cpu, gpu):
        assert f"ARG TORCH_VERSION={locked['torch']}" in text
        assert "-r requirements.txt" in text and "pip install --no-deps ." in text
        for folder in ("dags/", "plugins/", "include/datasets/", "include/synthfactory"):
            assert folder in text and (ROOT / folder).exists()
        # the ingest's C flatten: setup.py is copied, a compiler installed, and the build checked
        assert re.search(r"^COPY .*pyproject\.toml setup\.py \./$", text, re.M) and (ROOT / "setup.py").is_file()
        assert "gcc libc6-dev" in text and "native.available()" in text
    assert "https://download.pytorch.org/whl/cpu" in cpu
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in gpu and f"ARG AIRFLOW_VERSION={airflow}" in gpu
    for name in ("api-server", "worker", "gpu-worker"):
        build = compose["services"][name]["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).is_file()


def test_worker_images_carry_the_isolated_argn_interpreter():
    """kind: tabular_argn looks for /opt/argn/bin/python: both worker images build it from the same lock as
    `make argn-venv`, without dependencies (the lock leaves out the CUDA-only torchvision/torchaudio)."""
    from synthfactory.synthesize import argn

    assert "/opt/argn/bin/python" in map(str, argn._DEFAULTS)
    lock = (ROOT / "requirements-argn.txt").read_text()
    assert re.search(r"^mostlyai-engine==\S+$", lock, re.M) and re.search(r"^torch==2\.13\.0$", lock, re.M)
    assert not re.search(r"^(torchvision|torchaudio|triton|nvidia-\S+)==", lock, re.M)
    assert not re.search(r"^psutil==(6|7)", lock, re.M)  # the clash that makes it a separate interpreter
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        assert "COPY" in text and "requirements-argn.txt" in text
        assert "/opt/argn/bin/pip install --no-deps -r" in text and "import mostlyai.engine" in text
