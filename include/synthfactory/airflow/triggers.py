"""Airflow triggers (run by the triggerer, async): waiting on a FHIR Bulk Data export.

:class:`BulkExportTrigger` polls the export's status URL with exactly the library's polling rules
(:func:`synthfactory.ingest.bulk.apoll_export` around :func:`~synthfactory.ingest.bulk.interpret_status`:
``Retry-After`` in seconds or as an HTTP-date, capped; backoff; ``X-Progress`` logged; transient errors
polled again; 401 answered by one re-authentication) and fires one :class:`TriggerEvent`:
``{"status": "complete", "manifest": {...}}``, ``{"status": "gone"}`` (expired: start over) or
``{"status": "failed", "message": ...}``.

Credentials come from the ``fhir`` connection named by ``conn_id`` (looked up in the triggerer), never
from the trigger's serialized arguments; ``auth`` (an AuthConfig dict) exists for tests and for servers
without credentials.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from synthfactory.airflow.compat import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)

__all__ = ["BulkExportTrigger"]


class BulkExportTrigger(BaseTrigger):
    def __init__(self, status_url: str, conn_id: str | None = None, base_url: str | None = None,
                 policy: dict | None = None, auth: dict | None = None, timeout: float = 60.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.status_url = status_url
        self.conn_id = conn_id
        self.base_url = base_url
        self.policy = policy or {}
        self.auth = auth
        self.timeout = timeout

    def serialize(self) -> tuple[str, dict[str, Any]]:
        cls = type(self)
        return (f"{cls.__module__}.{cls.__qualname__}",
                {"status_url": self.status_url, "conn_id": self.conn_id, "base_url": self.base_url,
                 "policy": self.policy, "auth": self.auth, "timeout": self.timeout})

    async def _auth(self) -> tuple[Any, str]:
        from synthfactory.ingest.smart import AuthConfig

        base = self.base_url
        if self.conn_id:
            from synthfactory.airflow.hooks import FhirHook  # hooks loads the release writer (pyarrow): on use

            config, conn_base = await FhirHook.aget_config(self.conn_id)
            base = base or conn_base
        else:
            config = AuthConfig.from_dict(self.auth)
        return config, base or self.status_url.split("/$", 1)[0]

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import httpx

        from synthfactory.ingest.bulk import PollPolicy, apoll_export
        from synthfactory.ingest.smart import SmartAuth

        try:
            config, base = await self._auth()
        except Exception as exc:  # noqa: BLE001 - a bad connection is a failed event, not a triggerer crash
            yield TriggerEvent({"status": "failed", "status_url": self.status_url,
                                "message": f"credentials: {type(exc).__name__}"})
            return
        policy = PollPolicy(**self.policy)
        auth = SmartAuth(config, base)

        def progress(out: Any) -> None:
            log.info("bulk export %s%s; next poll in %.1fs", "in progress" if out.state == "pending" else out.message,
                     f" ({out.progress})" if out.progress else "", out.wait)

        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 15.0)),
                                     follow_redirects=True) as http:
            out = await apoll_export(http, auth, self.status_url, policy, on_progress=progress)
        yield TriggerEvent({"status": out.state, "status_url": self.status_url, "manifest": out.manifest,
                            "message": out.message, "expires": out.expires})
