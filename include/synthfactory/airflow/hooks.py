"""Hooks: credentials come only from Airflow connections.

- ``HmacSaltHook``: the salt for pseudonymous keys, kept as a connection's password (type ``synthfactory_salt``).
- ``ReleaseSigningKeyHook``: the key the gate signs its decision (and the reviewer's approval) with, a connection's
  password (type ``synthfactory_signing_key``, named by ``release.signing_connection_id``).
- ``FhirHook``: a FHIR server's credentials and base URL (type ``fhir``), turned into the library's
  :class:`~synthfactory.ingest.smart.AuthConfig`; everything else lives in :mod:`synthfactory.ingest`.
- ``SandboxWriter``: the release target, writing through Airflow's ``S3Hook`` (boto3 underneath) on the
  sandbox writer's own connection, never the PHI/staging one.
- ``phi_store``: a :class:`synthfactory.storage.Store` for the extract and staging side.
- ``SqlTableHook`` / ``sql_reader``: the query of a flat table (``source.kind: table``) on an Airflow SQL
  connection: the connection's own ``DbApiHook`` (postgres, mysql, ... providers), else a generic ``DbApiHook``
  over SQLAlchemy (``extra.sqlalchemy_url``, or the connection's URI).
- ``report_lineage``: hook-level lineage for an installed OpenLineage provider.

FHIR connection (conn_type ``fhir``):

* host: the base URL (``https://fhir.example.org/r4``), or ``extra.base_url``;
* login: the SMART client id (or the basic-auth user);
* password: a bearer token, the basic-auth password, or the SMART private key (PEM);
* extra: ``{"auth": "smart"|"bearer"|"basic"|"none", "private_key": "<PEM>", "jwks": {...}, "kid": ...,
  "alg": "RS384"|"ES384", "scope": "system/*.read", "token_url": ..., "jku": ...}``. Without ``auth``, a
  key (PEM/JWKS) means SMART, login + password basic, a password alone bearer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synthfactory.airflow.compat import BaseHook, get_hook_lineage_collector
from synthfactory.release.publish import Boto3Writer
from synthfactory.spec import DatasetSpec
from synthfactory.storage import Store, is_s3

__all__ = ["FhirHook", "HmacSaltHook", "ReleaseSigningKeyHook", "SandboxWriter", "SqlTableHook", "asset_uri",
           "fhir_credentials", "phi_store", "sql_reader",
           "report_lineage"]


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


class ReleaseSigningKeyHook(BaseHook):
    """Reads the release signing key (the gate signs its decision and the reviewer's approval with it, the
    publisher verifies them) from a connection's password: ``release.signing_connection_id``."""

    conn_name_attr = "signing_conn_id"
    default_conn_name = "synthfactory_signing_key"
    conn_type = "synthfactory_signing_key"
    hook_name = "Synthfactory release signing key"

    def __init__(self, signing_conn_id: str = default_conn_name, **kwargs: Any):
        super().__init__(**kwargs)
        self.signing_conn_id = signing_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {"hidden_fields": ["host", "schema", "login", "port", "extra"],
                "relabeling": {"password": "Release signing key (at least 16 characters)"}}

    def get_key(self) -> str:
        conn = self.get_connection(self.signing_conn_id)
        if not conn.password:
            raise ValueError(f"connection {self.signing_conn_id!r} has no password (the release signing key)")
        return conn.password

    def get_conn(self) -> str:
        return self.get_key()


class FhirHook(BaseHook):
    """Credentials and base URL of a FHIR server from an Airflow connection."""

    conn_name_attr = "fhir_conn_id"
    default_conn_name = "fhir_default"
    conn_type = "fhir"
    hook_name = "FHIR server (SMART backend services, bearer, basic)"

    def __init__(self, fhir_conn_id: str = default_conn_name, **kwargs: Any):
        super().__init__(**kwargs)
        self.fhir_conn_id = fhir_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {"hidden_fields": ["schema", "port"],
                "relabeling": {"host": "Base URL", "login": "Client id / user",
                               "password": "Token, password or private key (PEM)"},
                "placeholders": {"extra": '{"auth": "smart", "kid": "key-1", "scope": "system/*.read"}'}}

    # -- pure: connection -> config ----------------------------------------------------------------
    @staticmethod
    def base_url_of(conn: Any) -> str | None:
        extra = conn.extra_dejson or {}
        if extra.get("base_url"):
            return str(extra["base_url"]).rstrip("/")
        host = conn.host or ""
        if host.startswith(("http://", "https://")):
            return host.rstrip("/")
        if not host:
            return None
        port = f":{conn.port}" if conn.port else ""
        path = f"/{conn.schema.strip('/')}" if conn.schema else ""
        return f"https://{host}{port}{path}"

    @staticmethod
    def auth_config_of(conn: Any) -> Any:
        from synthfactory.ingest.smart import AuthConfig

        extra = dict(conn.extra_dejson or {})
        key = extra.get("private_key")
        jwks = extra.get("jwks")
        password = conn.password or None
        kind = extra.get("auth")
        if kind is None:
            if key or jwks or (password and "PRIVATE KEY" in password):
                kind = "smart"
            elif conn.login and password:
                kind = "basic"
            elif password:
                kind = "bearer"
            else:
                kind = "none"
        if kind == "smart":
            return AuthConfig(kind="smart", client_id=extra.get("client_id") or conn.login,
                              private_key=key or (password if password and "PRIVATE KEY" in password else None),
                              jwks=jwks, kid=extra.get("kid"), alg=extra.get("alg"),
                              scope=extra.get("scope", "system/*.read"), token_url=extra.get("token_url"),
                              jku=extra.get("jku"))
        if kind == "bearer":
            return AuthConfig(kind="bearer", token=extra.get("token") or password)
        if kind == "basic":
            return AuthConfig(kind="basic", username=conn.login, password=password)
        if kind == "none":
            return AuthConfig()
        raise ValueError(f"connection auth {kind!r}: use smart, bearer, basic or none")

    # -- connection lookups ----------------------------------------------------------------------
    def get_auth_config(self) -> Any:
        return self.auth_config_of(self.get_connection(self.fhir_conn_id))

    def get_base_url(self) -> str | None:
        return self.base_url_of(self.get_connection(self.fhir_conn_id))

    def get_conn(self) -> Any:
        return self.get_auth_config()

    @classmethod
    async def aget_config(cls, conn_id: str) -> tuple[Any, str | None]:
        """(AuthConfig, base URL) from the connection, for triggers (async connection lookup)."""
        conn = await cls.aget_connection(conn_id)
        return cls.auth_config_of(conn), cls.base_url_of(conn)


def fhir_credentials(spec: Any) -> tuple[Any, str | None]:
    """(AuthConfig or None, base URL or None) of a spec's FHIR server connection, if it names one."""
    conn_id = getattr(spec.source, "fhir_connection_id", None)
    if not conn_id or spec.source.kind not in ("fhir_bulk", "fhir_search"):
        return None, None
    hook = FhirHook(conn_id)
    conn = hook.get_connection(conn_id)
    return FhirHook.auth_config_of(conn), FhirHook.base_url_of(conn)


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


def report_lineage(context: Any, *, inputs: list[str] = (), outputs: list[str] = (),
                   extra: dict[str, Any] | None = None) -> None:
    """Hook-level lineage (Airflow 3): an installed OpenLineage provider turns what the collector holds into the
    task's input/output datasets. Without a lineage reader the collector is a no-op. ``context`` is the hook
    that did the I/O (a BaseHook)."""
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


def _db_api_hook_class() -> Any:
    from airflow.providers.common.sql.hooks.sql import DbApiHook

    return DbApiHook


class SqlTableHook(_db_api_hook_class()):  # type: ignore[misc]
    """A generic ``DbApiHook`` on a SQLAlchemy URL: the connection's ``extra.sqlalchemy_url``, else its URI
    (``sqlite:///...``, ``duckdb:///...`` with a dialect installed, ``postgresql://...``)."""

    conn_name_attr = "sql_conn_id"
    default_conn_name = "synthfactory_sql"
    conn_type = "synthfactory_sql"
    hook_name = "Synthfactory SQL table (SQLAlchemy URL)"

    def __init__(self, sql_conn_id: str = default_conn_name, **kwargs: Any):
        super().__init__(**kwargs)
        self.sql_conn_id = sql_conn_id

    @property
    def sqlalchemy_url(self) -> Any:
        from sqlalchemy.engine import make_url

        conn = self.get_connection(self.sql_conn_id)
        return make_url(conn.extra_dejson.get("sqlalchemy_url") or conn.get_uri())

    def get_conn(self) -> Any:
        return self.get_sqlalchemy_engine().raw_connection()

    def get_pandas(self, sql: str) -> Any:
        import pandas as pd
        import sqlalchemy

        engine = self.get_sqlalchemy_engine()
        try:
            with engine.connect() as conn:
                return pd.read_sql_query(sqlalchemy.text(sql), conn)
        finally:
            engine.dispose()


def sql_hook(conn_id: str) -> Any:
    """The ``DbApiHook`` of an Airflow SQL connection: its provider's hook, else :class:`SqlTableHook`."""
    DbApiHook = _db_api_hook_class()
    conn = BaseHook.get_connection(conn_id)
    hook = None
    if conn.conn_type != SqlTableHook.conn_type:
        try:
            hook = conn.get_hook()
        except Exception:  # noqa: BLE001 - no provider installed for this connection type
            hook = None
    if not isinstance(hook, DbApiHook):
        hook = SqlTableHook(conn_id)
    return hook


def sql_reader(spec: DatasetSpec) -> Any:
    """``query -> DataFrame`` on ``source.sql_connection_id`` (None for other sources)."""
    conn_id = spec.source.sql_connection_id
    if spec.source.kind != "table" or not conn_id:
        return None
    hook = sql_hook(conn_id)
    if isinstance(hook, SqlTableHook):
        return hook.get_pandas
    if hasattr(hook, "get_df"):
        return lambda sql: hook.get_df(sql, df_type="pandas")
    return hook.get_pandas_df
