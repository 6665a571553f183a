"""Hooks: credentials come only from Airflow connections.

- ``HmacSaltHook``: the salt for pseudonymous keys, kept as a connection's password (type ``synthfactory_salt``).
- ``SandboxWriter``: the release target, writing through Airflow's ``S3Hook`` (boto3 underneath) on the
  sandbox writer's own connection, never the PHI/staging one.
- ``phi_store``: a :class:`synthfactory.storage.Store` for the extract and staging side.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from synthfactory.spec import DatasetSpec
from synthfactory.storage import Store, is_s3


class HmacSaltHook(BaseHook):
    """Reads the HMAC salt from a connection's password field."""

    conn_name_attr = "salt_conn_id"
    default_conn_name = "synthfactory_salt"
    conn_type = "synthfactory_salt"
    hook_name = "Synthfactory HMAC salt"

    def __init__(self, salt_conn_id: str = default_conn_name, **kwargs: Any):
        super().__init__(**kwargs)
        self.salt_conn_id = salt_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {"hidden_fields": ["host", "schema", "login", "port", "extra"],
                "relabeling": {"password": "HMAC salt (at least 16 characters)"}}

    def get_salt(self) -> str:
        conn = self.get_connection(self.salt_conn_id)
        if not conn.password:
            raise ValueError(f"connection {self.salt_conn_id!r} has no password (the HMAC salt)")
        return conn.password

    def get_conn(self) -> str:
        return self.get_salt()


class SandboxWriter:
    """ObjectWriter over S3Hook for the sandbox bucket (server-side encrypted, replace=True: idempotent)."""

    def __init__(self, aws_conn_id: str, bucket: str):
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        self.hook = S3Hook(aws_conn_id=aws_conn_id)
        self.bucket = bucket

    def put(self, key: str, data: bytes) -> None:
        self.hook.load_bytes(data, key=key, bucket_name=self.bucket, replace=True, encrypt=True)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def phi_store(spec: DatasetSpec) -> Store:
    """Store for the PHI side. s3:// extracts/staging use the spec's connection through S3Hook."""
    conn_ids = {c for c in (spec.source.connection_id, spec.staging.connection_id) if c}
    if len(conn_ids) > 1:
        raise ValueError("source.connection_id and staging.connection_id must name the same (PHI-side) connection")
    if conn_ids and (is_s3(spec.source.uri) or is_s3(spec.staging.uri)):
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return Store(s3=S3Hook(aws_conn_id=conn_ids.pop()).get_conn())
    return Store()
