"""The distributed engine, proven on this machine: PostgreSQL + Redis on loopback, Airflow 3 with the
CeleryExecutor (scheduler, dag-processor, api-server for the execution API, two `default`-queue workers and a
`gpu`-queue worker), a DAG whose spec asks for CTGAN, and the S3 emulator as the sandbox.

It asserts that the run succeeds, that fit and sample ran on the gpu worker (task instance queue, pool and
hostname in the metadata DB, and the gpu worker's own log) while every other stage ran on a default-queue
worker, and that the release landed in the sandbox. A second dataset ingests in 4 shards (dynamic task mapping):
its shard tasks run on both default-queue workers and the merged ingest equals a one-process ingest. Everything
started here is stopped in teardown.

Needs the `postgresql` and `redis-server` Debian packages (skipped with that reason when absent).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from synthfactory.testing import dev
from tests.conftest import open_gates, write_spec

# ~6 minutes on 2 idle cores (stack start ~1.5, DAG run ~3.5); the bounded waits below fail with diagnostics
# first, the timeout is a last resort for a loaded machine
pytestmark = [pytest.mark.celery, pytest.mark.timeout(780)]

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "synthetic-sandbox"
DATASET = "celery_ctgan"
DAG_ID = f"synthfactory_{DATASET}"
CPU_WORKER, GPU_WORKER = "sf-default-worker", "sf-gpu-worker"
CPU_WORKER_2 = "sf-default-worker-2"  # a second default-queue worker: the sharded ingest spreads over both
CPU_WORKERS = (CPU_WORKER, CPU_WORKER_2)
SHARDED = "celery_sharded"  # a second dataset: ingest in 4 mapped shard tasks + merge, the leak scan mapped too
SHARDED_DAG = f"synthfactory_{SHARDED}"


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


INITDB, PG_CTL, REDIS = _binary("initdb"), _binary("pg_ctl"), shutil.which("redis-server")
if not (INITDB and PG_CTL and REDIS):
    pytest.skip("the Celery integration test needs PostgreSQL (initdb, pg_ctl) and redis-server binaries: "
                "apt-get install postgresql redis-server", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: "_Proc", seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{proc.name} did not listen on 127.0.0.1:{port} within {seconds}s:\n{proc.tail()}")


class _Proc:
    """A long-running child in its own session (so stopping it stops its children: celery's pool, the
    scheduler's subprocesses), with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], logdir: Path, **kw):
        self.name, self.log = name, logdir / f"{name}.log"
        self._fh = open(self.log, "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(cmd, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=str(ROOT), **kw)

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self, grace: float = 20.0) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
            except ProcessLookupError:
                pass
        self._fh.close()


class _Postgres:
    """A throwaway cluster: initdb into a temp dir, listening on 127.0.0.1 only (unix socket in the data dir).
    As root it runs as the `postgres` user (or `nobody`): PostgreSQL refuses to run as root."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sf-pg-"))
        self.data = self.dir / "data"
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = "postgres"
            try:
                pwd.getpwnam(user)
            except KeyError:
                user = "nobody"
            pw = pwd.getpwnam(user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.prefix = ["runuser", "-u", user, "--"]

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.prefix, *cmd], check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       cwd=str(self.dir))

    def start(self) -> str:
        self._run(INITDB, "-D", str(self.data), "-U", "airflow", "-A", "trust", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.data} -c fsync=off -c full_page_writes=off " \
               "-c synchronous_commit=off -c max_connections=200"
        self._run(PG_CTL, "-D", str(self.data), "-o", opts, "-l", str(self.dir / "postgres.log"), "-w", "-t", "60",
                  "start")
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="airflow", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE airflow")
        conn.close()
        return f"127.0.0.1:{self.port}"

    def query(self, sql: str, *args: object) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.port, user="airflow", dbname="airflow") as conn:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self.prefix, PG_CTL, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(self.dir))
        shutil.rmtree(self.dir, ignore_errors=True)


def _airflow(*args: str, env: dict[str, str], timeout: float = 240) -> str:
    proc = subprocess.run([dev.venv_bin("airflow"), *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, f"airflow {' '.join(args)} failed:\n{proc.stdout[-4000:]}"
    return proc.stdout


def _celery_executor_importable() -> None:
    """Fail in a second, not after a ten-minute wait, when the lock's celery and Celery provider disagree."""
    try:
        import airflow.providers.celery.executors.celery_executor_utils  # noqa: F401
    except ImportError as err:
        import celery

        pytest.fail(f"the CeleryExecutor cannot be imported with celery {celery.__version__}: {err}. "
                    "apache-airflow-providers-celery 3.26 imports celery.backends.database.retry, which celery "
                    "5.7 removed: pin celery==5.6.3 and kombu==5.6.2 in requirements.txt", pytrace=False)


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory, small_extract):
    _celery_executor_importable()
    base = tmp_path_factory.mktemp("celery")
    logs = base / "component-logs"
    logs.mkdir()
    specs, staging = base / "specs", base / "staging"
    write_spec(specs, DATASET, small_extract, staging, schedule=None,
               synthesizer__kind="ctgan", synthesizer__params={"epochs": 2, "batch_size": 50},
               # two epochs of CTGAN make poor data: this test is about where tasks run, so the gates are open
               **open_gates())
    write_spec(specs, SHARDED, small_extract, staging, schedule=None, operations__ingest_shards=4,
               operations__leak_scan_shards=2, **open_gates())
    procs: list[_Proc] = []
    pg = _Postgres()
    redis = None
    pools = None
    s3 = dev.S3Emulator()
    try:
        pg_addr = pg.start()
        redis_port = _free_port()
        redis = _Proc("redis", [REDIS, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                                "--appendonly", "no", "--protected-mode", "yes"], dict(os.environ), logs)
        _wait_port(redis_port, redis, 30)
        s3.start()
        s3.client().create_bucket(Bucket=BUCKET)
        api_port = _free_port()
        env = dev.airflow_env(ROOT, base / "airflow", s3.endpoint)
        env.update({
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://airflow@{pg_addr}/airflow",
            # Airflow derives an asyncpg URL for its async engine; asyncpg is not in requirements.txt (the
            # official image and docker/ have it). Nothing on this path needs the async engine: leave it off.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": "",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://airflow@{pg_addr}/airflow",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            # a real login (not all-admins, which signs every request in): user ops, password below
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "ops:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(base / "passwords.json"),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "synthfactory.testing.dev.worker_hostname",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "300",
            "SYNTHFACTORY_SPECS_DIR": str(specs),
            "SYNTHFACTORY_PROGRESS_SECONDS": "10",
        })
        env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
        password = secrets.token_urlsafe(16)
        (base / "passwords.json").write_text(json.dumps({"ops": password}))
        t0 = time.monotonic()
        _airflow("db", "migrate", env=env, timeout=300)
        airflow = dev.venv_bin("airflow")
        pools = subprocess.Popen([airflow, "pools", "set", "gpu", "1", "GPUs on the gpu-queue workers"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
        api = _Proc("api-server", [airflow, "api-server", "--host", "127.0.0.1", "--port", str(api_port)], env, logs)
        procs.append(api)
        procs.append(_Proc("scheduler", [airflow, "scheduler"], env, logs))
        procs.append(_Proc("dag-processor", [airflow, "dag-processor"], env, logs))
        for name, queue in ((CPU_WORKER, "default"), (CPU_WORKER_2, "default"), (GPU_WORKER, "gpu")):
            wenv = {**env, "SYNTHFACTORY_WORKER_NAME": name}
            procs.append(_Proc(name, [airflow, "celery", "worker", "--queues", queue, "--concurrency", "1",
                                      "--celery-hostname", f"{name}@%h", "--skip-serve-logs",
                                      "--without-gossip", "--without-mingle"], wenv, logs))
        _wait_port(api_port, api, 180)
        out, _ = pools.communicate(timeout=120)
        assert pools.returncode == 0, f"airflow pools set failed:\n{out[-3000:]}"
        yield {"env": env, "pg": pg, "s3": s3, "procs": {p.name: p for p in procs}, "base": base, "specs": specs,
               "staging": staging,
               "started_in": time.monotonic() - t0, "login": {"username": "ops", "password": password}}
    finally:
        if pools is not None and pools.poll() is None:
            pools.kill()
            pools.wait(10)
        for p in reversed(procs):
            p.stop()
        if redis is not None:
            redis.stop()
        s3.stop()
        pg.stop()


def _check_alive(stack) -> None:
    for name, p in stack["procs"].items():
        assert p.popen.poll() is None, f"{name} exited with {p.popen.returncode}\n" + _diagnostics(stack)


def _diagnostics(stack) -> str:
    out = []
    for name, p in stack["procs"].items():
        out.append(f"----- {name} -----\n{p.tail(3000)}")
    for f in sorted(Path(stack["env"]["AIRFLOW_HOME"], "logs").glob("dag_id=*/run_id=*/task_id=*/*.log")):
        errors = [line[:1500] for line in f.read_text(errors="replace").splitlines() if '"level":"error"' in line]
        if errors:
            out.append(f"----- errors in {f.parent.name}/{f.name} -----\n" + "\n".join(errors[:6]))
    return "\n".join(out)


def test_ctgan_trains_on_the_gpu_queue_worker_and_releases(celery_stack):
    stack, pg = celery_stack, celery_stack["pg"]
    deadline = time.monotonic() + 180
    while not pg.query("SELECT 1 FROM dag WHERE dag_id = %s AND NOT is_stale", DAG_ID):
        assert time.monotonic() < deadline, "the dag-processor never parsed the DAG\n" + _diagnostics(stack)
        _check_alive(stack)
        time.sleep(2)

    t0 = time.monotonic()
    _airflow("dags", "trigger", DAG_ID, "--conf", json.dumps({"rows": 150}), env=stack["env"])
    deadline = time.monotonic() + 420
    state = None
    while time.monotonic() < deadline:
        rows = pg.query("SELECT state FROM dag_run WHERE dag_id = %s", DAG_ID)
        state = rows[0][0] if rows else None
        if state in ("success", "failed"):
            break
        _check_alive(stack)
        time.sleep(3)
    wall = time.monotonic() - t0
    print(f"\nstack started in {stack['started_in']:.0f}s; DAG run {state} in {wall:.0f}s")
    assert state == "success", f"DAG run state {state!r}\n" + _diagnostics(stack)

    tis = {tid: (queue, pool, host, st) for tid, queue, pool, host, st in pg.query(
        "SELECT task_id, queue, pool, hostname, state FROM task_instance WHERE dag_id = %s", DAG_ID)}
    assert set(tis) == {"ingest", "prepare", "fit", "sample", "quality", "privacy", "gate", "release"}, tis
    for tid, (queue, pool, host, st) in tis.items():
        assert st == "success", (tid, st)
        if tid in ("fit", "sample", "privacy"):  # privacy: the MIA battery's shadow models are CTGAN fits
            assert (queue, pool, host) == ("gpu", "gpu", GPU_WORKER), (tid, tis[tid])
        else:
            assert (queue, pool) == ("default", "default_pool") and host in CPU_WORKERS, (tid, tis[tid])

    # the workers' own logs agree: only the gpu worker received fit and sample
    gpu_log = stack["procs"][GPU_WORKER].tail(10**7)
    cpu_log = stack["procs"][CPU_WORKER].tail(10**7) + stack["procs"][CPU_WORKER_2].tail(10**7)
    for tid in ("fit", "sample"):
        assert f"task_id='{tid}'" in gpu_log and f"task_id='{tid}'" not in cpu_log
    assert "task_id='ingest'" in cpu_log and "task_id='ingest'" not in gpu_log

    # the release landed in the sandbox, trained by CTGAN with the spec's 2 epochs
    client = stack["s3"].client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"releases/{DATASET}/")["Contents"]]
    (manifest_key,) = [k for k in keys if k.endswith("/manifest.json")]
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
    assert manifest["synthesizer"] == "ctgan" and manifest["rows"] == 150 and manifest["gate"]["approved"]
    fit_log = next(Path(stack["env"]["AIRFLOW_HOME"], "logs").rglob("task_id=fit/*.log")).read_text()
    assert "stage=fit" in fit_log and "epochs=2" in fit_log

    # the UI side, served by this api-server: the plugin page (behind the login) lists the release, and the
    # release task's "Data card" extra link points at the page's data card route for this version
    version = manifest_key.split("/")[2]
    base = stack["env"]["AIRFLOW__API__BASE_URL"]
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{base}/synthfactory/datasets", timeout=30)
    assert denied.value.code == 401
    login = urllib.request.Request(f"{base}/auth/token", data=json.dumps(stack["login"]).encode(),
                                   headers={"Content-Type": "application/json"}, method="POST")
    token = json.load(urllib.request.urlopen(login, timeout=30))["access_token"]

    def get(path: str) -> str:
        req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
        return urllib.request.urlopen(req, timeout=60).read().decode()

    page = get("/synthfactory/datasets")
    assert f"<td>{version}</td>" in page and '<td class="num">150</td>' in page and "ctgan" in page
    (run_id,) = [r for (r,) in pg.query("SELECT run_id FROM dag_run WHERE dag_id = %s", DAG_ID)]
    links = json.loads(get(f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                           f"/taskInstances/release/links"))
    card_url = links["extra_links"]["Data card"]
    assert card_url == f"{base}/synthfactory/datasets/{DATASET}/{version}/datacard"
    if any(f["path"] == "reports/datacard.html" for f in manifest["files"]):
        assert "<html" in get(card_url[len(base):]).lower()


def test_sharded_ingest_runs_on_two_workers_and_equals_one_process(celery_stack):
    """``operations.ingest_shards: 4``: the plan task, four mapped ``ingest_shard`` tasks spread over the two
    default-queue workers, the merge (task ``ingest``); its outputs equal a one-process ingest of the extract."""
    from synthfactory import pipeline
    from synthfactory.spec import load_spec
    from tests.ingest.test_sharded import _same

    stack, pg = celery_stack, celery_stack["pg"]
    deadline = time.monotonic() + 180
    while not pg.query("SELECT 1 FROM dag WHERE dag_id = %s AND NOT is_stale", SHARDED_DAG):
        assert time.monotonic() < deadline, "the dag-processor never parsed the sharded DAG\n" + _diagnostics(stack)
        _check_alive(stack)
        time.sleep(2)
    t0 = time.monotonic()
    _airflow("dags", "trigger", SHARDED_DAG, env=stack["env"])
    deadline = time.monotonic() + 240
    state = None
    while time.monotonic() < deadline:
        rows = pg.query("SELECT state FROM task_instance WHERE dag_id = %s AND task_id = 'ingest'", SHARDED_DAG)
        state = rows[0][0] if rows else None
        if state in ("success", "failed", "upstream_failed"):
            break
        _check_alive(stack)
        time.sleep(2)
    print(f"\nsharded ingest (plan, 4 shards, merge) {state} in {time.monotonic() - t0:.0f}s")
    assert state == "success", f"merge task state {state!r}\n" + _diagnostics(stack)
    # the mapped leak scan: leak_scan_plan -> leak_scan_part.expand -> merge (task `privacy`)
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        rows = pg.query("SELECT state FROM task_instance WHERE dag_id = %s AND task_id = 'privacy'", SHARDED_DAG)
        state = rows[0][0] if rows else None
        if state in ("success", "failed", "upstream_failed"):
            break
        _check_alive(stack)
        time.sleep(2)
    print(f"mapped leak scan (plan, parts, merge) {state} at {time.monotonic() - t0:.0f}s")
    _airflow("dags", "pause", SHARDED_DAG, env=stack["env"])  # gate and release are not this test's subject
    assert state == "success", f"leak-scan merge task state {state!r}\n" + _diagnostics(stack)
    parts = pg.query("SELECT map_index, hostname, state FROM task_instance WHERE dag_id = %s AND "
                     "task_id = 'leak_scan_part' ORDER BY map_index", SHARDED_DAG)
    assert len(parts) >= 2 and [m for m, *_ in parts] == list(range(len(parts))), parts
    assert all(st == "success" and host in CPU_WORKERS for _, host, st in parts), parts
    (privacy_report,) = (stack["staging"] / SHARDED / "runs").glob("*/reports/privacy.json")
    scan = json.loads(privacy_report.read_text())["leak_scan"]  # the merged scan, written as one process does
    assert scan["clean"] is True and scan["hits"] == [], scan
    assert not (privacy_report.parents[1] / "privacy" / "leak_scan").exists()  # mapped parts' staging removed
    shards = pg.query("SELECT map_index, hostname, state, queue FROM task_instance WHERE dag_id = %s AND "
                      "task_id = 'ingest_shard' ORDER BY map_index", SHARDED_DAG)
    assert [m for m, *_ in shards] == [0, 1, 2, 3] and all(st == "success" for _, _, st, _ in shards), shards
    assert {host for _, host, _, _ in shards} == set(CPU_WORKERS), shards  # both workers ingested shards
    (plan_host,) = [h for (h,) in pg.query("SELECT hostname FROM task_instance WHERE dag_id = %s AND "
                                            "task_id = 'ingest_plan'", SHARDED_DAG)]
    assert plan_host in CPU_WORKERS

    (report,) = (stack["staging"] / SHARDED / "runs").glob("*/ingest/ingest_report.json")
    sharded = json.loads(report.read_text())
    assert sharded["sharded"]["shards"] == 4
    assert not (report.parent / "shards").exists()  # the shard parts are removed after the merge
    # one process, same extract, same staging (so the same salt file)
    one_spec = load_spec(write_spec(stack["base"] / "one-process-specs", "celery_one", Path(_extract_of(stack)),
                                    stack["staging"]))
    one = pipeline.ingest(pipeline.RunContext(spec=one_spec, run_id="one", version="v1"))
    _same(json.loads(Path(one["report_uri"]).read_text()), sharded)


def _extract_of(stack) -> str:
    import yaml

    return yaml.safe_load((stack["specs"] / f"{SHARDED}.yaml").read_text())["source"]["uri"]
