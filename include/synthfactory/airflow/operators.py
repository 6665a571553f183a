"""Operators: the deferrable FHIR Bulk Data export and the human approval of a release.

- :class:`FhirBulkExportOperator`: kick off (or resume) the spec's Bulk Data export, then wait for it on the
  triggerer (:class:`~synthfactory.airflow.triggers.BulkExportTrigger`), holding no worker slot.
- :class:`ReleaseApprovalOperator`: an Airflow 3 human-in-the-loop ``ApprovalOperator`` between the gate and
  the release (only when the spec sets ``release.require_approval``). The reviewer sees the gate's figures
  (every check with its threshold and margin) and a link to the run's data card, served from staging by the
  plugin app to whoever may answer the request (:func:`synthfactory.airflow.webapp.airflow_approval_access`). *Approve* records
  the approval (bound to the audited file hashes) and the release runs; *Reject*, or no answer before
  ``release.approval_timeout_hours`` (the default option is Reject), quarantines the run in staging with the
  reasons and skips the release. The publisher itself refuses a spec that requires approval without one.
  :func:`approval_task` builds it for a spec.

Both build the run's :class:`~synthfactory.context.RunContext` with
:func:`synthfactory.airflow.context.run_context`, like the DAG factory's tasks.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from synthfactory.airflow.compat import ApprovalOperator, BaseOperator, DownstreamTasksSkipped, Param
from synthfactory.airflow.context import run_context
from synthfactory.airflow.release import approval_text
from synthfactory.airflow.triggers import BulkExportTrigger
from synthfactory.spec import DatasetSpec

__all__ = ["APPROVAL_TASK_ID", "FhirBulkExportOperator", "ReleaseApprovalOperator", "approval_task"]

APPROVAL_TASK_ID = "approve"


class FhirBulkExportOperator(BaseOperator):
    """Kick off (or resume) the spec's Bulk Data export, then wait for it on the triggerer
    (:class:`~synthfactory.airflow.triggers.BulkExportTrigger`), holding no worker slot. When the export is
    complete its manifest is stored in the staging state file; the ``ingest`` task downloads and flattens."""

    ui_color = "#e8f4fd"

    def __init__(self, *, spec_path: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec_path = spec_path

    def _export(self) -> tuple[Any, Any, Any]:
        from synthfactory.ingest.sources import auth_from_env, bulk_export_for, fhir_client_for

        ctx = run_context(self.spec_path)
        source = ctx.spec.source
        client = fhir_client_for(source, ctx.fhir_auth or auth_from_env(), ctx.fhir_base_url or source.base_url)
        return ctx, client, bulk_export_for(ctx, client)

    def execute(self, context: Any) -> dict:
        ctx, client, export = self._export()
        try:
            state = export.start()
        finally:
            client.close()
        if state.get("manifest") is not None:
            return _export_summary(state)
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
            state = export.accept_manifest(state, event.get("manifest") or {}, event.get("expires"))
            return _export_summary(state)
        if status == "gone":  # the server forgot the export: the retry kicks off a new one
            export.save({**state, "phase": "ingested", "abandoned": True})
            raise RuntimeError(f"bulk export gone: {event.get('message')}; retrying starts a new export")
        raise BulkExportError(f"bulk export failed: {event.get('message')}")


def _export_summary(state: dict) -> dict:
    manifest = state.get("manifest") or {}
    return {"status_url": state.get("status_url"), "transactionTime": manifest.get("transactionTime"),
            "files": len(state.get("files") or {}), "phase": state.get("phase")}


class ReleaseApprovalOperator(ApprovalOperator):
    """Human approval of a gate-approved run (see the module docstring)."""

    template_fields = ()  # subject and body are built at run time from the gate's record

    def __init__(self, *, spec_path: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec_path = spec_path

    def _pull(self, context: Any) -> dict[str, dict]:
        ti = context["ti"]
        return {t: ti.xcom_pull(task_ids=t) or {} for t in ("gate", "sample", "quality", "privacy")}

    def execute(self, context: Any) -> Any:
        ctx = run_context(self.spec_path)
        gated = self._pull(context)["gate"]
        decision = ctx.store.read_json(gated["decision_uri"])
        self.subject, self.body = approval_text(ctx.spec, ctx.version, decision, gated,
                                                _datacard_url(ctx.spec.name, str(context["run_id"])))
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        try:
            ret = super().execute_complete(context=context, event=event)
        except DownstreamTasksSkipped:  # Reject: ApprovalOperator skips the release by raising this
            self._record(context, event, approved=False)
            raise
        self._record(context, event, approved=ret["chosen_options"] == [self.APPROVE])
        return ret

    def _record(self, context: Any, event: dict[str, Any], approved: bool) -> None:
        """The reviewer's answer into staging (approval.json; on Reject, the quarantine with reasons.json)."""
        from synthfactory import pipeline

        user = event.get("responded_by_user") or {}
        reviewer = (user.get("name") or user.get("id")) if isinstance(user, dict) else str(user)
        reason = str((event.get("params_input") or {}).get("reason") or "")
        x = self._pull(context)
        pipeline.review(run_context(self.spec_path), x["gate"], x["sample"], x["quality"], x["privacy"],
                        approved=approved, reviewer=reviewer or None, reason=reason,
                        timed_out=bool(event.get("timedout")))


def _datacard_url(dataset: str, run_id: str) -> str:
    """The pending run's data card in the plugin app (served from staging to whoever may answer the request):
    absolute with ``[api] base_url``, else relative to the Airflow UI the reviewer is in."""
    from synthfactory.airflow.links import _base_url
    from synthfactory.airflow.webapp import pending_datacard_path

    return _base_url() + pending_datacard_path(dataset, run_id)


def approval_task(spec: DatasetSpec, spec_path: str) -> ReleaseApprovalOperator:
    """The approval step for ``spec`` (call inside the DAG context)."""
    hours = spec.release.approval_timeout_hours
    return ReleaseApprovalOperator(
        task_id=APPROVAL_TASK_ID,
        spec_path=spec_path,
        subject=f"Release {spec.name} to the sandbox?",  # replaced at run time with the version
        defaults=ApprovalOperator.REJECT if hours else None,
        response_timeout=timedelta(hours=hours) if hours else None,
        # the execution phase only (pull figures, write the request; on resume, record and quarantine);
        # HITLOperator would otherwise take the DAG's execution_timeout as the response timeout
        execution_timeout=timedelta(minutes=15) if hours else None,
        params={"reason": Param("", type="string", title="Reason",
                                description="Why you approve or reject (kept with the decision; on Reject, "
                                            "in the quarantine's reasons.json)")},
        doc_md="Human approval of the gate-approved synthetic dataset before it goes to the sandbox.",
    )
