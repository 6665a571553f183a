"""Local staging is private (issue #18, item 5): under a shared worker's umask 022, every file the factory
writes to a local staging folder is 0600 and every folder it creates 0700 (real identifiers, the real train
split, the salt and the signing key are never world- or group-readable)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest

from synthfactory import pipeline
from synthfactory.spec import load_spec
from synthfactory.storage import Store
from tests.conftest import write_spec


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    files, dirs = {}, {str(root): stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        (dirs if p.is_dir() else files)[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return files, dirs


def test_store_writes_private_files_and_folders(tmp_path, umask_022):
    store = Store()
    root = tmp_path / "staging"
    store.write_bytes(str(root / "a" / "b" / "x.bin"), b"x")
    store.write_json(str(root / "a" / "r.json"), {"k": 1})
    store.write_df(str(root / "c" / "t.parquet"), pd.DataFrame({"v": [1, 2]}))
    loose = root / "a" / "old.json"  # a file left world-readable by an older version: rewritten private
    loose.write_text("{}")
    os.chmod(loose, 0o644)
    (root / "a" / "old.json.partial").write_text("half")  # and a half-written temporary of an earlier attempt
    os.chmod(root / "a" / "old.json.partial", 0o644)
    store.write_json(str(loose), {"k": 2})
    store.local_copy(str(root / "c" / "t.parquet"), tmp_path / "copy" / "t.parquet")
    files, dirs = _modes(root)
    assert set(files) == {"a/b/x.bin", "a/r.json", "c/t.parquet", "a/old.json"}
    assert set(files.values()) == {0o600}, files
    assert set(dirs.values()) == {0o700}, dirs
    assert stat.S_IMODE((tmp_path / "copy" / "t.parquet").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o700
    assert os.umask(0o022) == 0o022  # the store leaves the process umask alone


def test_ingest_and_prepare_leave_nothing_readable_by_others(tmp_path, small_extract, umask_022, monkeypatch):
    monkeypatch.delenv("SYNTHFACTORY_HMAC_SALT", raising=False)
    extract = tmp_path / "extract"
    shutil.copytree(small_extract, extract)
    staging = tmp_path / "work" / "staging"  # the factory creates both folders
    spec = load_spec(write_spec(tmp_path / "specs", "perm_ds", extract, staging))
    ctx = pipeline.RunContext(spec=spec, run_id="r1", version="v1")  # no salt: the salt file in staging
    ingested = pipeline.ingest(ctx)
    prepared = pipeline.prepare(ctx, ingested)
    assert os.umask(0o022) == 0o022  # restored after each stage
    files, dirs = _modes(staging)
    identifiers = str(Path(ingested["identifiers_uri"]).relative_to(staging))
    train = str(Path(prepared["train_uri"]).relative_to(staging))
    assert {identifiers, train, ".hmac_salt"} <= set(files), sorted(files)
    assert any(f.endswith("holdout.parquet") for f in files) and any("/tables/" in f or f.endswith(".parquet")
                                                                     for f in files)
    loose = {f: oct(m) for f, m in files.items() if m != 0o600}
    assert not loose, loose
    open_dirs = {d: oct(m) for d, m in dirs.items() if m != 0o700}
    assert not open_dirs, open_dirs
    assert stat.S_IMODE((tmp_path / "work").stat().st_mode) == 0o700
