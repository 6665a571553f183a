"""Tiny URI layer: a local folder or ``s3://bucket/prefix``, the same calls for both.

Stages hand data to each other as files under a run-scoped staging URI. The library never builds S3
credentials itself: callers pass a boto3 client (the Airflow layer gets it from an S3Hook on a named
connection; the CLI from boto3's default chain).
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key


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
        p = Path(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, p)  # atomic on POSIX: a reader never sees half a file

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
        dest.parent.mkdir(parents=True, exist_ok=True)
        if is_s3(uri):
            dest.write_bytes(self.read_bytes(uri))
        else:
            shutil.copyfile(uri, dest)
        return dest
