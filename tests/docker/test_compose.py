"""docker/: the compose stack, the images and the DAGs agree (no Docker engine needed: files are read).

- every queue a DAG task uses is consumed by a worker (the gpu worker consumes the fit/sample queue of neural
  specs) and every pool exists (airflow-init creates `gpu`);
- every connection a spec names is defined as AIRFLOW_CONN_<ID> and parses, S3 ones pointing at MinIO;
- MinIO's init creates every bucket the specs release to (and the staging bucket);
- the Airflow settings the stack sets exist in Airflow's configuration; secrets come from docker/.env;
- the images build from this repository's files with the installed Airflow and the locked torch version;
- (issue #21, item 8) MinIO's sandbox writer may make every S3 call a publish makes (recorded from a real publish),
  the page reads with a read-only user, each image is built by one service only, every worker has a bounded
  Celery concurrency, the GPU image's airflow user is $AIRFLOW_UID, and `--profile fhir` has its connection.
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
    assert svc["gpu-worker"]["environment"]["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "1"  # one task per GPU
    assert svc["gpu-worker"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert "deploy" not in svc["worker"]


def _spec_connections(spec) -> set[str]:
    ids = {spec.release.connection_id, spec.source.connection_id, spec.staging.connection_id,
           spec.source.salt_connection_id, spec.trigger.connection_id, spec.source.fhir_connection_id,
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
    assert 'mc encrypt set sse-s3 "local/$SANDBOX_BUCKET"' in script  # releases are SSE (AES256) uploads
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
    for name in ("airflow-init", "gpu-worker"):  # the services that build (see test_each_image_is_built_once)
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


# -- issue #21, item 8 ----------------------------------------------------------------------------------------

AIRFLOW_SERVICES = ("airflow-init", "api-server", "scheduler", "dag-processor", "triggerer", "worker", "gpu-worker")


def _heredoc(script: str, marker: str, env: dict) -> dict:
    text = script.split(f"<<{marker}", 1)[1].split(f"\n{marker}", 1)[0]
    return json.loads(text.replace("$SANDBOX_BUCKET", env["SANDBOX_BUCKET"]))


def _minio_policies(compose) -> tuple[dict, dict, str]:
    init = compose["services"]["minio-init"]
    script = "\n".join(init["command"])
    return _heredoc(script, "POLICY", init["environment"]), _heredoc(script, "READER", init["environment"]), script


def test_minio_writer_policy_grants_every_s3_action_a_publish_makes(compose, tmp_path):
    """Record the S3 calls of real publishes (upload, multipart, tagged copy, retention) against the S3 emulator,
    as tests/release/test_policies.py does for the example IAM policy, and check MinIO's sandbox-writer policy
    allows each call's IAM actions on its resource (tagging included: every release object is tagged)."""
    from synthfactory.testing import dev
    from tests.release.helpers import BUCKET, V1, V2, do_publish, make_files, reset_bucket, writer
    from tests.release.test_policies import NEEDS, _allows

    policy, _, _ = _minio_policies(compose)
    sandbox = "synthetic-sandbox"
    calls: list[tuple[str, dict]] = []
    with dev.S3Emulator() as s3:
        reset_bucket(s3.client())
        try:
            w = writer(s3.endpoint)
            w.client.meta.events.register("before-parameter-build.s3.*",
                                          lambda params, model, **kw: calls.append((model.name, dict(params))))
            store, files, decision = make_files(tmp_path / "a", big_mib=11)
            do_publish(w, store, files, decision, V1, keep_versions=1)
            store, files, decision = make_files(tmp_path / "b", salt="b")
            do_publish(w, store, files, decision, V2, keep_versions=1)  # retention deletes V1
        finally:
            reset_bucket(s3.client())
    ops = {name for name, _ in calls}
    assert {"PutObject", "CreateMultipartUpload", "UploadPart", "CopyObject", "HeadObject", "DeleteObjects",
            "ListObjectsV2"} <= ops
    assert any(p.get("Tagging") for _, p in calls)
    needed = set()
    for name, params in calls:
        assert params["Bucket"] == BUCKET and name in NEEDS, name
        resource = (f"arn:aws:s3:::{sandbox}" if name == "ListObjectsV2"
                    else f"arn:aws:s3:::{sandbox}/{params.get('Key', 'releases/')}")
        for action in NEEDS[name] + (["s3:PutObjectTagging"] if params.get("Tagging") else []):
            needed.add(action)
            assert _allows(policy, action, resource), f"MinIO's sandbox-writer policy refuses {action} ({name})"
    assert {"s3:PutObjectTagging", "s3:PutObject", "s3:GetObject", "s3:DeleteObject"} <= needed
    assert _allows(policy, "s3:GetObjectTagging", f"arn:aws:s3:::{sandbox}/releases/x")  # a copy reads the tags
    assert not _allows(policy, "s3:PutObject", "arn:aws:s3:::synthfactory-staging/x")


def test_the_page_reads_with_a_read_only_minio_user(compose):
    env = compose["services"]["api-server"]["environment"]
    _, reader, script = _minio_policies(compose)
    assert env["SYNTHFACTORY_SANDBOX_READER_CONN"] == "sandbox_s3_reader"
    conn = json.loads(env["AIRFLOW_CONN_SANDBOX_S3_READER"])
    writer = json.loads(env["AIRFLOW_CONN_SANDBOX_S3"])
    assert conn["conn_type"] == "aws" and conn["extra"]["endpoint_url"] == "http://minio:9000"
    assert conn["login"] == TEST_ENV["SANDBOX_READER_ACCESS_KEY"] != writer["login"]
    actions = {a for st in reader["Statement"] for a in st["Action"]}
    assert actions == {"s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject"}
    assert 'mc admin policy attach local sandbox-reader --user "$SANDBOX_READER_ACCESS_KEY"' in script


def test_each_image_is_built_once(raw, compose):
    """One service builds each image tag; every other service naming that tag only runs it (pull_policy: never,
    so compose neither builds it again nor looks for it in a registry)."""
    assert "build" not in raw["x-airflow-common"]
    svc = compose["services"]
    builders: dict[str, list[str]] = {}
    for name, s in svc.items():
        if "build" in s:
            builders.setdefault(s["image"], []).append(name)
    assert builders == {"synthfactory-airflow:3.3.2": ["airflow-init"], "synthfactory-gpu-worker:3.3.2": ["gpu-worker"]}
    for name in AIRFLOW_SERVICES:
        s = svc[name]
        if name in ("airflow-init", "gpu-worker"):
            assert s["pull_policy"] == "build", name
        else:
            assert s["image"] == "synthfactory-airflow:3.3.2" and s["pull_policy"] == "never" and "build" not in s
            # airflow-init, which builds the image, runs before every service that uses it
            assert svc[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_every_worker_has_a_bounded_concurrency(compose):
    from airflow.configuration import conf

    assert "worker_concurrency" in conf.configuration_description["celery"]["options"]
    svc = compose["services"]
    workers = {n: s for n, s in svc.items()
               if isinstance(s.get("command"), list) and s["command"][:2] == ["celery", "worker"]}
    assert set(workers) == {"worker", "gpu-worker"}
    for name, s in workers.items():
        assert "--concurrency" not in s["command"], f"{name}: set AIRFLOW__CELERY__WORKER_CONCURRENCY instead"
        value = s["environment"].get("AIRFLOW__CELERY__WORKER_CONCURRENCY")
        assert value and 1 <= int(value) <= 8, (name, value)  # never Celery's default of 16
    assert workers["worker"]["environment"]["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "4"
    assert workers["gpu-worker"]["environment"]["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "1"
    tuned = _walk(yaml.safe_load((DOCKER / "docker-compose.yaml").read_text()),
                  {**TEST_ENV, "CPU_WORKER_CONCURRENCY": "2"})
    assert tuned["services"]["worker"]["environment"]["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "2"
    # the rest of the Airflow environment is the shared one
    for name in workers:
        assert svc[name]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_gpu_image_airflow_user_is_airflow_uid(raw):
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG AIRFLOW_UID=50000$", gpu, re.M)
    assert re.search(r'useradd --uid "\$\{AIRFLOW_UID\}"', gpu)
    for uid in ("50000", "1000"):
        c = _walk(raw, {**TEST_ENV, "AIRFLOW_UID": uid})["services"]
        assert c["gpu-worker"]["build"]["args"]["AIRFLOW_UID"] == uid
        assert c["gpu-worker"]["user"] == f"{uid}:0" == c["worker"]["user"]


def test_fhir_profile_has_its_connection(compose):
    from types import SimpleNamespace

    from synthfactory.airflow.hooks import FhirHook

    svc = compose["services"]
    fhir = svc["fhir"]
    (port,) = fhir["ports"]
    container_port = port.split(":")[-1]
    for name in AIRFLOW_SERVICES:
        conn = json.loads(svc[name]["environment"]["AIRFLOW_CONN_FHIR_DEFAULT"])
        assert conn["conn_type"] == FhirHook.conn_type
    c = SimpleNamespace(host=conn.get("host"), port=conn.get("port"), schema=conn.get("schema"),
                        login=conn.get("login"), password=conn.get("password"), extra_dejson=conn.get("extra", {}))
    assert FhirHook.base_url_of(c) == f"http://fhir:{container_port}/fhir"  # the service name, its own port
    assert FhirHook.auth_config_of(c).kind == "none"
    assert FhirHook.default_conn_name == "fhir_default"
