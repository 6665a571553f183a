"""FHIR servers in Airflow: the ``fhir`` connection type (:class:`FhirHook`) and the deferrable Bulk Data
export task (:class:`FhirBulkExportOperator`).

Connection (conn_type ``fhir``):

* host: the base URL (``https://fhir.example.org/r4``), or ``extra.base_url``;
* login: the SMART client id (or the basic-auth user);
* password: a bearer token, the basic-auth password, or the SMART private key (PEM);
* extra: ``{"auth": "smart"|"bearer"|"basic"|"none", "private_key": "<PEM>", "jwks": {...}, "kid": ...,
  "alg": "RS384"|"ES384", "scope": "system/*.read", "token_url": ..., "jku": ...}``. Without ``auth``, a
  key (PEM/JWKS) means SMART, login + password basic, a password alone bearer.

The hook only turns the connection into the library's :class:`~synthfactory.ingest.smart.AuthConfig`;
everything else lives in :mod:`synthfactory.ingest`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseHook, BaseOperator

__all__ = ["FhirHook", "FhirBulkExportOperator", "fhir_credentials"]


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


class FhirBulkExportOperator(BaseOperator):
    """Kick off (or resume) the spec's Bulk Data export, then wait for it on the triggerer
    (:class:`~synthfactory.airflow.triggers.BulkExportTrigger`), holding no worker slot. When the export is
    complete its manifest is stored in the staging state file; the ``ingest`` task downloads and flattens."""

    ui_color = "#e8f4fd"

    def __init__(self, *, spec_path: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec_path = spec_path

    def _export(self) -> tuple[Any, Any, Any]:
        from synthfactory.airflow.dag_factory import run_context
        from synthfactory.ingest.sources import auth_from_env, bulk_export_for, fhir_client_for

        ctx = run_context(self.spec_path)
        source = ctx.spec.source
        client = fhir_client_for(source, ctx.fhir_auth or auth_from_env(), ctx.fhir_base_url or source.base_url)
        return ctx, client, bulk_export_for(ctx, client)

    def execute(self, context: Any) -> dict:
        from synthfactory.airflow.triggers import BulkExportTrigger

        ctx, client, export = self._export()
        try:
            state = export.start()
        finally:
            client.close()
        if state.get("manifest") is not None:
            return _summary(state)
        source = ctx.spec.source
        self.defer(
            trigger=BulkExportTrigger(status_url=state["status_url"], conn_id=source.fhir_connection_id,
                                      base_url=client.base_url, policy=export.policy.to_dict()),
            method_name="execute_complete",
            timeout=timedelta(minutes=source.bulk.max_wait_minutes + 5))
        return {}  # not reached: defer raises

    def execute_complete(self, context: Any, event: dict | None = None) -> dict:
        from synthfactory.ingest.bulk import BulkExportError

        event = event or {}
        ctx, client, export = self._export()
        client.close()
        state = export.active_state()
        if state is None or state.get("status_url") != event.get("status_url"):
            raise BulkExportError("the export state changed while waiting; run the task again")
        status = event.get("status")
        if status == "complete":
            state = export.accept_manifest(state, event.get("manifest") or {})
            return _summary(state)
        if status == "gone":  # the server forgot the export: the retry kicks off a new one
            export.save({**state, "phase": "ingested", "abandoned": True})
            raise RuntimeError(f"bulk export gone: {event.get('message')}; retrying starts a new export")
        raise BulkExportError(f"bulk export failed: {event.get('message')}")


def _summary(state: dict) -> dict:
    manifest = state.get("manifest") or {}
    return {"status_url": state.get("status_url"), "transactionTime": manifest.get("transactionTime"),
            "files": len(state.get("files") or {}), "phase": state.get("phase")}
