"""Embedded defaults for the demo, the tests and the benchmarks: a loopback S3 emulator (moto's server
over real HTTP), an Airflow home inside the project on SQLite, and an offline sample extract.

Nothing here is used by production code paths; it never imports Airflow (Airflow runs as a subprocess).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

SANDBOX_CONN_ID = "sandbox_s3"
REGION = "us-east-1"


def venv_bin(name: str) -> str:
    """A console script installed next to the running interpreter (the project's virtualenv)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


class S3Emulator:
    """moto's S3 server on 127.0.0.1 in a daemon thread; stops with the process or on ``stop()``."""

    def __init__(self, port: int = 0):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.endpoint = ""

    def __enter__(self) -> "S3Emulator":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> str:
        # moto's werkzeug server logs every request ("127.0.0.1 - - [...] GET ... 200", ANSI-coloured on a
        # terminal) through the werkzeug logger, adding its own stderr handler when it has none: keep it quiet
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self.endpoint

    def stop(self) -> None:
        self._server.stop()

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")


def worker_hostname() -> str:
    """``[core] hostname_callable`` for several Airflow workers on one machine (the Celery integration test):
    ``$SYNTHFACTORY_WORKER_NAME`` when set, else the FQDN. Task instances record it as their hostname."""
    import socket

    return os.environ.get("SYNTHFACTORY_WORKER_NAME") or socket.getfqdn()


def aws_conn_uri_json(endpoint: str) -> str:
    """An Airflow AWS connection (JSON form for AIRFLOW_CONN_*) pointing boto3 at ``endpoint``."""
    return json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                       "extra": {"endpoint_url": endpoint, "region_name": REGION}})


def airflow_env(project: Path, airflow_home: Path, s3_endpoint: str | None = None) -> dict[str, str]:
    """Environment for an Airflow 3 home inside the project: SQLite, our dags/ and plugins/, no examples."""
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(project / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "SYNTHFACTORY_HOME": str(project),
        "GX_ANALYTICS_ENABLED": "False",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })
    if s3_endpoint:
        env[f"AIRFLOW_CONN_{SANDBOX_CONN_ID.upper()}"] = aws_conn_uri_json(s3_endpoint)
    return env


def ensure_airflow_db(env: dict[str, str]) -> None:
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "airflow.db").exists() or not (home / ".migrated").exists():
        subprocess.run([venv_bin("airflow"), "db", "migrate"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        (home / ".migrated").touch()


def dags_test(dag_id: str, env: dict[str, str], conf: dict | None = None,
              logical_date: str | None = None, log_path: Path | None = None,
              on_line: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
    """``airflow dags test`` (the whole DAG in-process, real task runner). Output goes to ``log_path``;
    ``on_line(line)`` sees each line as it is written (progress), when given with ``log_path``."""
    cmd = [venv_bin("airflow"), "dags", "test", dag_id]
    if logical_date:
        cmd.append(logical_date)
    if conf:
        cmd += ["--conf", json.dumps(conf)]
    if on_line is not None and log_path:
        with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                          stderr=subprocess.STDOUT, text=True,
                                                          errors="replace") as proc:
            for line in proc.stdout:  # type: ignore[union-attr]
                log.write(line)
                log.flush()
                on_line(line)
            code = proc.wait()
        return subprocess.CompletedProcess(cmd, code)
    out = open(log_path, "w") if log_path else subprocess.PIPE  # noqa: SIM115
    try:
        return subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


_TASK_RUNNING = re.compile(r"\[DAG TEST\] running task <TaskInstance: [\w.-]+?\.(?P<task>\w+) ")
_TASK_STATE = re.compile(r"Task instance state updated .*new_state=(?P<state>\w+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class TaskProgress:
    """Turns ``airflow dags test`` log lines into one short line per finished task (``ingest  success  0.6 s``),
    for the demo; the full log stays in its file."""

    def __init__(self, emit: Callable[[str], None], indent: str = "      "):
        self.emit, self.indent = emit, indent
        self.task: str | None = None
        self.started = time.monotonic()
        self.finished: list[tuple[str, str]] = []

    def __call__(self, line: str) -> None:
        line = _ANSI.sub("", line)
        mo = _TASK_RUNNING.search(line)
        if mo:
            self.task, self.started = mo.group("task"), time.monotonic()
            return
        mo = _TASK_STATE.search(line)
        if mo and self.task:
            state = mo.group("state")
            self.finished.append((self.task, state))
            self.emit(f"{self.indent}{self.task:<10} {state:<15} {time.monotonic() - self.started:5.1f} s")
            self.task = None


def generate_sample_extract(dest: Path, patients: int = 500, seed: int = 42) -> Path:
    """An offline FHIR R4 NDJSON extract from ``carebundle`` (deterministic per seed)."""
    if dest.is_dir() and any(dest.glob("Patient*.ndjson*")):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([venv_bin("carebundle"), "generate", "--profile", "mixed", "--count", str(patients),
                    "--seed", str(seed), "--sex", "mixed", "--format", "ndjson", "--out", str(dest)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # its stderr only on failure
    return dest


def list_versions(client: Any, bucket: str, dataset_prefix: str) -> list[str]:
    """Released versions, oldest first: the version folders under the dataset prefix that hold a manifest
    (written last; the run-scoped ``_staging/`` prefix and half-published versions do not count)."""
    from synthfactory.release.publish import Boto3Writer
    from synthfactory.release.sandbox import SandboxLayout, released_versions

    return released_versions(Boto3Writer(client, bucket), SandboxLayout(dataset_prefix.strip("/")))


def latest_version(client: Any, bucket: str, dataset_prefix: str) -> str | None:
    """The version ``<dataset_prefix>/latest.json`` names, else the newest released one (None: nothing)."""
    from synthfactory.release.publish import Boto3Writer
    from synthfactory.release.sandbox import SandboxLayout, pointer_version

    store = Boto3Writer(client, bucket)
    versions = list_versions(client, bucket, dataset_prefix)
    pointed = pointer_version(store, SandboxLayout(dataset_prefix.strip("/")))
    return pointed if pointed in versions else (versions[-1] if versions else None)


def mirror(client: Any, bucket: str, key_prefix: str, dest: Path) -> list[Path]:
    """Copy every object under ``key_prefix`` to ``dest`` (so a release can be opened offline)."""
    paths = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(key_prefix.rstrip("/")) + 1:]
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            paths.append(target)
    return paths
