"""Tiny URI layer: a local folder or ``s3://bucket/prefix``, the same calls for both.

Stages hand data to each other as files under a run-scoped staging URI. The library never builds S3
credentials itself: callers pass a boto3 client (the Airflow layer gets it from an S3Hook on a named
connection; the CLI from boto3's default chain).

Local staging holds PHI (real identifiers, the real train/holdout splits): every file the store writes
locally is 0600 and every folder it creates 0700, whatever the process umask (:func:`private_umask` covers
the writers that open files themselves, e.g. streamed Parquet, while a stage runs).
"""

from __future__ import annotations

import io
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key


PRIVATE_FILE, PRIVATE_DIR, PRIVATE_UMASK = 0o600, 0o700, 0o077


def private_dirs(path: str | Path) -> Path:
    """``path`` and its missing parents, each folder created 0700 whatever the umask (existing ones untouched)."""
    path = Path(path)
    missing = []
    for p in (path, *path.parents):
        if p.is_dir():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            p.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            if not p.is_dir():
                raise
            continue
        os.chmod(p, PRIVATE_DIR)
    return path


def write_private(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a local ``path`` as a 0600 file (folders 0700), atomically: a temporary file, then a
    rename, so a reader never sees half a file."""
    p = Path(path)
    private_dirs(p.parent)
    tmp = p.with_name(p.name + ".partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), PRIVATE_FILE)  # a .partial left by an earlier attempt keeps its mode otherwise
        fh.write(data)
    os.replace(tmp, p)  # atomic on POSIX


@contextmanager
def private_umask() -> Iterator[None]:
    """Umask 077 while the block runs (files 0600, folders 0700 from any writer), the previous one after.
    The umask is per process: for a stage's work on local staging, not for long-lived shared processes."""
    old = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(old)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts if p]])
    return str(Path(base, *parts))


@dataclass
class Store:
    """Read/write files under local paths or s3:// URIs. ``s3`` is a boto3 S3 client (or None)."""

    s3: Any = None

    def _client(self) -> Any:
        if self.s3 is None:
            import boto3  # default credential chain; honours AWS_ENDPOINT_URL

            self.s3 = boto3.client("s3")
        return self.s3

    # -- bytes -------------------------------------------------------------------------------
    def write_bytes(self, uri: str, data: bytes) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self._client().put_object(Bucket=bucket, Key=key, Body=data)
            return
        write_private(uri, data)  # 0600 (folders 0700), atomic: a reader never sees half a file

    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return self._client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return Path(uri).read_bytes()

    def open_read(self, uri: str) -> IO[bytes]:
        """A binary stream (S3 bodies are streamed, not loaded whole)."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return self._client().get_object(Bucket=bucket, Key=key)["Body"]._raw_stream
        return open(uri, "rb")

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            resp = self._client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
            return resp.get("KeyCount", 0) > 0
        return Path(uri).exists()

    def listdir(self, uri: str) -> list[str]:
        """URIs of the files directly or recursively under ``uri`` (sorted)."""
        if is_s3(uri):
            bucket, prefix = split_s3(uri)
            prefix = prefix.rstrip("/") + "/" if prefix else ""
            out: list[str] = []
            paginator = self._client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                out.extend(f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []))
            return sorted(out)
        p = Path(uri)
        if not p.is_dir():
            return []
        return sorted(str(f) for f in p.rglob("*") if f.is_file())

    def remove_tree(self, uri: str) -> None:
        if is_s3(uri):
            bucket, _ = split_s3(uri)
            keys = [split_s3(u)[1] for u in self.listdir(uri)]
            for i in range(0, len(keys), 1000):
                self._client().delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]}
                )
            return
        shutil.rmtree(uri, ignore_errors=True)

    # -- JSON / Parquet ------------------------------------------------------------------------
    def write_json(self, uri: str, obj: Any) -> None:
        import orjson

        self.write_bytes(uri, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
                                           | orjson.OPT_SERIALIZE_NUMPY))

    def read_json(self, uri: str) -> Any:
        import orjson

        return orjson.loads(self.read_bytes(uri))

    def write_table(self, uri: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(uri, buf.getvalue())

    def read_table(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        if is_s3(uri):
            return pq.read_table(io.BytesIO(self.read_bytes(uri)), columns=columns)
        return pq.read_table(uri, columns=columns)

    def write_df(self, uri: str, df: Any) -> None:
        self.write_table(uri, pa.Table.from_pandas(df, preserve_index=False))

    def read_df(self, uri: str, columns: list[str] | None = None) -> Any:
        return self.read_table(uri, columns=columns).to_pandas()

    def local_copy(self, uri: str, dest: str | Path) -> Path:
        """Materialise a file locally (for libraries that need a path)."""
        dest = Path(dest)
        private_dirs(dest.parent)
        if is_s3(uri):
            write_private(dest, self.read_bytes(uri))
        else:
            shutil.copyfile(uri, dest)
            os.chmod(dest, PRIVATE_FILE)
        return dest
