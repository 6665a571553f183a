"""Fault tests of the sandbox publish against the S3 emulator on loopback, through a fault-injecting proxy
(tests/release/s3proxy.py): 5xx answers, a stopped server, a killed publisher, concurrent publishers.

The invariant checked at every interruption: a reader never sees a partial version (a listed version has every
file of its manifest with the manifest's sha256, and ``latest`` names a listed version); then a plain retry
of the same run completes, with the same result as an uninterrupted publish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from synthfactory.release.publish import Boto3Writer
from synthfactory.release.sandbox import SandboxLayout, list_releases, read_pointer
from tests.release.helpers import (
    BUCKET,
    PREFIX,
    V1,
    V2,
    assert_readers_consistent,
    do_publish,
    keys,
    make_files,
    manifest_files,
    s3_client,
    writer,
)
from tests.release.s3proxy import FaultProxy, Rule, copy_of, is_copy, is_upload_part, put_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def proxy(s3):
    with FaultProxy(s3.endpoint) as p:
        yield p


def version_keys(client, dataset: str, version: str) -> list[str]:
    return [k.split(f"/{version}/", 1)[1] for k in keys(client, f"{PREFIX}/{dataset}/{version}/")]


def assert_completed(client, direct, dataset: str, version: str, audited: dict) -> None:
    """After the retry: the version is whole and is latest, and nothing else was left behind."""
    assert manifest_files(direct, version, dataset) == audited
    assert sorted(version_keys(client, dataset, version)) == sorted([*audited, "manifest.json"])
    assert read_pointer(direct, PREFIX, dataset)["version"] == version
    assert keys(client, f"{PREFIX}/{dataset}/_staging/") == []
    assert_readers_consistent(direct, dataset)


# -- the server answering 5xx -------------------------------------------------------------------------
def test_transient_5xx_are_retried_and_the_publish_completes(s3, bucket, proxy, tmp_path):
    store, files, decision = make_files(tmp_path / "stage", big_mib=11)
    copies = proxy.add(Rule(is_copy, "503", times=2))
    parts = proxy.add(Rule(is_upload_part, "503", times=2, skip=1))
    out = do_publish(writer(proxy.endpoint, max_attempts=3), store, files, decision, V1)
    assert copies.fired == 2 and parts.fired == 2  # the faults happened, botocore retried them
    assert out["noop"] is False
    assert_completed(bucket, writer(s3.endpoint), "ds", V1, decision["audited_files"])


FAIL_POINTS = {
    "staging_put": Rule(put_of(r"/_staging/.*/quality\.json"), times=3),
    "upload_part": Rule(lambda m, p, h: is_upload_part(m, p, h) and "partNumber=2" in p, times=3),
    "commit_copy": Rule(copy_of(r"/v\d{8}T\d{6}Z/data/patients\.parquet"), times=3),
    "manifest_put": Rule(put_of(r"/manifest\.json"), times=3),
    "latest_put": Rule(put_of(r"/latest\.json"), times=3),
}


@pytest.mark.parametrize("point", list(FAIL_POINTS))
def test_persistent_5xx_mid_publish_shows_no_partial_version_and_a_retry_completes(s3, bucket, proxy, tmp_path,
                                                                                     point):
    direct = writer(s3.endpoint)
    store, files, decision = make_files(tmp_path / "v1")
    do_publish(direct, store, files, decision, V1)  # readers already have V1
    store, files, decision = make_files(tmp_path / "v2", big_mib=11, salt="v2")
    r = FAIL_POINTS[point]
    rule = proxy.add(Rule(r.match, "503", times=3, skip=r.skip))  # as many failures as attempts: it gives up
    w = writer(proxy.endpoint, max_attempts=3)
    with pytest.raises(Exception):  # noqa: B017 - botocore's/boto3's error for the exhausted retries
        do_publish(w, store, files, decision, V2, run_id="run_v2")
    assert rule.fired == 3
    visible = assert_readers_consistent(direct)
    assert read_pointer(direct, PREFIX, "ds")["version"] == V1  # readers still get V1
    # only a publish that got as far as its manifest shows V2, and then whole
    assert visible == ([V1, V2] if point == "latest_put" else [V1])
    proxy.clear()
    out = do_publish(w, store, files, decision, V2, run_id="run_v2")  # the task's retry
    assert out["latest"] == V2 and out["noop"] is (point == "latest_put")
    assert_completed(bucket, direct, "ds", V2, decision["audited_files"])


# -- the server stopped -------------------------------------------------------------------------------
def test_server_stopped_mid_publish_then_back(s3, bucket, proxy, tmp_path):
    direct = writer(s3.endpoint)
    store, files, decision = make_files(tmp_path / "stage")
    proxy.add(Rule(is_copy, "stop", skip=1))  # the second commit copy finds the server gone
    w = Boto3Writer(s3_client(proxy.endpoint, max_attempts=2, connect_timeout=1, read_timeout=5), BUCKET)
    with pytest.raises(Exception, match="(?i)connect|closed|endpoint"):
        do_publish(w, store, files, decision, V1, run_id="r")
    assert list_releases(direct, PREFIX, "ds") == [] and read_pointer(direct, PREFIX, "ds") is None
    assert keys(bucket, f"{PREFIX}/ds/_staging/r/")  # the staged files are there, invisible to readers
    proxy.clear()
    proxy.start()  # back on the same port
    do_publish(w, store, files, decision, V1, run_id="r")
    assert_completed(bucket, direct, "ds", V1, decision["audited_files"])


# -- a killed publisher -------------------------------------------------------------------------------
CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from synthfactory.storage import Store
from tests.release.helpers import do_publish, writer
job = json.load(open(sys.argv[1]))
do_publish(writer(job["endpoint"]), Store(), job["files"], job["decision"], job["version"], run_id=job["run_id"])
print("unreachable: the parent kills this process first")
"""

KILL_POINTS = {  # where the process dies, and what becomes of the request it had in flight
    "staging_upload": (Rule(put_of(r"/_staging/.*/quality\.json"), "hold", after_hold="drop"), [V1]),
    "commit_copy": (Rule(copy_of(r"/reports/quality\.json"), "hold", after_hold="drop"), [V1]),
    "manifest_landed": (Rule(put_of(r"/manifest\.json"), "hold", after_hold="forward"), [V1, V2]),
    "latest_lost": (Rule(put_of(r"/latest\.json"), "hold", after_hold="drop"), [V1, V2]),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_publisher_rerun_gives_the_same_result(s3, bucket, proxy, tmp_path, point):
    direct = writer(s3.endpoint)
    store, files, decision = make_files(tmp_path / "v1")
    do_publish(direct, store, files, decision, V1)
    store, files, decision = make_files(tmp_path / "v2", salt="v2")
    template, visible_after_kill = KILL_POINTS[point]
    rule = proxy.add(Rule(template.match, "hold", skip=template.skip, after_hold=template.after_hold))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"endpoint": proxy.endpoint, "files": files, "decision": decision,
                               "version": V2, "run_id": "scheduled__2024-01-02"}))
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    child = subprocess.Popen([sys.executable, str(script), str(job)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert rule.arrived.wait(60), child.communicate(timeout=5)
        os.kill(child.pid, signal.SIGKILL)  # killed mid-request: no cleanup, no except, no finally
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    proxy.release()
    assert rule.finished.wait(30)
    assert assert_readers_consistent(direct) == visible_after_kill
    assert read_pointer(direct, PREFIX, "ds")["version"] == V1
    proxy.clear()
    # the task's retry: same run id, same files
    do_publish(writer(proxy.endpoint), store, files, decision, V2, run_id="scheduled__2024-01-02")
    assert_completed(bucket, direct, "ds", V2, decision["audited_files"])
    # the same result as a publish that was never interrupted
    do_publish(direct, store, files, decision, V2, dataset="reference")
    assert version_keys(bucket, "ds", V2) == version_keys(bucket, "reference", V2)
    assert manifest_files(direct, V2, "ds") == manifest_files(direct, V2, "reference")


class Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs (except/finally for Exception are skipped)."""


class KillAt:
    """Delegates to a writer; the ``at``-th write (put, copy or delete) raises Killed before it happens."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.writes = inner, at, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in ("put", "copy", "delete"):
            return attr

        def write(*a, **kw):
            self.writes += 1
            if self.writes == self.at:
                raise Killed(f"{name} {a[0] if a else ''}")
            return attr(*a, **kw)
        return write


def test_kill_before_every_write_then_rerun(s3, bucket, tmp_path):
    direct = writer(s3.endpoint)
    store, files, decision = make_files(tmp_path / "stage")
    probe = KillAt(direct, at=0)
    do_publish(probe, store, files, decision, V1, dataset="probe")
    total = probe.writes
    assert total >= 7  # 2 staged, 2 copied, manifest, latest, staging delete
    for at in range(1, total + 1):
        ds = f"kill{at}"
        do_publish(direct, store, files, decision, V1, dataset=ds)
        with pytest.raises(Killed):
            do_publish(KillAt(direct, at), store, files, decision, V2, dataset=ds, run_id="r")
        visible = assert_readers_consistent(direct, ds)
        assert visible in ([V1], [V1, V2]), (at, visible)
        out = do_publish(direct, store, files, decision, V2, dataset=ds, run_id="r")
        assert out["latest"] == V2
        assert_completed(bucket, direct, ds, V2, decision["audited_files"])


# -- concurrent publishers ----------------------------------------------------------------------------
class Gate:
    """Delegates to a writer; its first ``method`` call on a key ending in ``suffix`` first waits for ``event``
    and/or at ``barrier`` (to force an interleaving of two publishers)."""

    def __init__(self, inner, event: threading.Event | None = None, barrier: threading.Barrier | None = None,
                 method: str = "get", suffix: str = "latest.json"):
        self.inner, self.event, self.barrier, self.done = inner, event, barrier, False
        self.method, self.suffix = method, suffix

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        def call(key, *a, **kw):
            if key.endswith(self.suffix) and not self.done:
                self.done = True
                if self.event is not None:
                    assert self.event.wait(30)
                if self.barrier is not None:
                    self.barrier.wait(30)
            return attr(key, *a, **kw)
        return call


def _run_threads(*jobs):
    errors: list[BaseException] = []

    def run(fn):
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and not errors, errors


@pytest.mark.parametrize("schedule", ["free", "older_moves_latest_last", "race_on_pointer"])
def test_concurrent_publishes_keep_both_versions_and_latest_is_the_newer(s3, bucket, tmp_path, schedule):
    direct = writer(s3.endpoint)
    s1, f1, d1 = make_files(tmp_path / "v1", salt="one")
    s2, f2, d2 = make_files(tmp_path / "v2", salt="two", big_mib=6 if schedule == "free" else 0)
    w1, w2 = writer(s3.endpoint), writer(s3.endpoint)
    newer_done = threading.Event()
    if schedule == "older_moves_latest_last":
        w1 = Gate(w1, event=newer_done)
    elif schedule == "race_on_pointer":
        barrier = threading.Barrier(2)
        w1, w2 = Gate(w1, barrier=barrier), Gate(w2, barrier=barrier)

    def older():
        do_publish(w1, s1, f1, d1, V1, run_id="run_1")

    def newer():
        do_publish(w2, s2, f2, d2, V2, run_id="run_2")
        newer_done.set()

    _run_threads(older, newer)
    assert assert_readers_consistent(direct) == [V1, V2]
    assert manifest_files(direct, V1) == d1["audited_files"] and manifest_files(direct, V2) == d2["audited_files"]
    assert read_pointer(direct, PREFIX, "ds")["version"] == V2
    assert keys(bucket, f"{PREFIX}/ds/_staging/") == []


def test_two_runs_of_the_same_version_at_once_commit_it_once(s3, bucket, tmp_path):
    direct = writer(s3.endpoint)
    store, files, decision = make_files(tmp_path / "stage")
    barrier = threading.Barrier(2)
    results = []
    # both stage and copy, then meet right before the create-only manifest write: one wins, one finds it there
    _run_threads(*(lambda r=r: results.append(do_publish(
        Gate(writer(s3.endpoint), barrier=barrier, method="put", suffix="manifest.json"), store, files, decision,
        V1, run_id=r)) for r in ("a", "b")))
    assert sorted(r["latest"] for r in results) == [V1, V1]
    assert sorted(r["noop"] for r in results) == [False, True]
    assert_completed(bucket, direct, "ds", V1, decision["audited_files"])
    layout = SandboxLayout.of(PREFIX, "ds")
    assert keys(bucket) == sorted([layout.latest_key, layout.manifest_key(V1),
                                   *(layout.version_key(V1, p) for p in files)])
