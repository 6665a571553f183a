"""Hooks: credentials come only from Airflow connections.

- ``HmacSaltHook``: the salt for pseudonymous keys, kept as a connection's password (type ``synthfactory_salt``).
- ``SandboxWriter``: the release target, writing through Airflow's ``S3Hook`` (boto3 underneath) on the
  sandbox writer's own connection, never the PHI/staging one.
- ``phi_store``: a :class:`synthfactory.storage.Store` for the extract and staging side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook

from synthfactory.release.publish import Boto3Writer
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


class SandboxWriter(Boto3Writer):
    """The release target: :class:`~synthfactory.release.publish.Boto3Writer` (atomic versioned publish, SSE,
    tags, checksums, multipart) on a boto3 client from Airflow's ``S3Hook`` on the sandbox writer's own
    connection, never the PHI/staging one. Retries: botocore standard mode with the spec's ``max_attempts``
    (a ``config_kwargs`` in the connection's extras wins where it sets the same option)."""

    def __init__(self, aws_conn_id: str, bucket: str, *, max_attempts: int = 8, **options: Any):
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from synthfactory.release.publish import client_config

        config = client_config(max_attempts)
        from_conn = S3Hook(aws_conn_id=aws_conn_id).conn_config.botocore_config
        self.hook = S3Hook(aws_conn_id=aws_conn_id, config=config.merge(from_conn) if from_conn else config)
        self.aws_conn_id = aws_conn_id
        super().__init__(self.hook.get_conn(), bucket, **options)

    @classmethod
    def for_spec(cls, spec: DatasetSpec) -> "SandboxWriter":
        from synthfactory.release.publish import writer_options

        r = spec.release
        return cls(r.connection_id, r.bucket, max_attempts=r.max_attempts, **writer_options(r))


def asset_uri(uri: str) -> str:
    """An Asset URI for a storage location: s3:// as is, a local path as file://."""
    return uri.rstrip("/") if is_s3(uri) else Path(uri).resolve().as_uri()


def dataset_asset_uri(spec: DatasetSpec) -> str:
    """The dataset's sandbox Asset (what the release task's outlet and its lineage name)."""
    return "s3://" + "/".join(p.strip("/") for p in (spec.release.bucket, spec.release.prefix, spec.name)
                              if p.strip("/"))


def report_lineage(context: Any, *, inputs: list[str] = (), outputs: list[str] = (),
                   extra: dict[str, Any] | None = None) -> None:
    """Hook-level lineage (Airflow 3): an installed OpenLineage provider turns what the collector holds into the
    task's input/output datasets. Without a lineage reader the collector is a no-op. ``context`` is the hook
    that did the I/O (a BaseHook)."""
    from airflow.sdk.lineage import get_hook_lineage_collector

    collector = get_hook_lineage_collector()
    for uri in inputs:
        collector.add_input_asset(context=context, uri=asset_uri(uri))
    for uri in outputs:
        collector.add_output_asset(context=context, uri=asset_uri(uri), asset_extra=extra or None)


def phi_store(spec: DatasetSpec) -> Store:
    """Store for the PHI side. s3:// extracts/staging use the spec's connection through S3Hook."""
    conn_ids = {c for c in (spec.source.connection_id, spec.staging.connection_id) if c}
    if len(conn_ids) > 1:
        raise ValueError("source.connection_id and staging.connection_id must name the same (PHI-side) connection")
    if conn_ids and (is_s3(spec.source.uri) or is_s3(spec.staging.uri)):
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return Store(s3=S3Hook(aws_conn_id=conn_ids.pop()).get_conn())
    return Store()
