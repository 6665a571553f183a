"""The Airflow side of a release: the optional human approval step, and what a release announces downstream.

- :class:`ReleaseApprovalOperator`: an Airflow 3 human-in-the-loop ``ApprovalOperator`` between the gate and
  the release (only when the spec sets ``release.require_approval``). The reviewer sees the gate's figures
  (every check with its threshold and margin) and the data card link when there is one. *Approve* records
  the approval (bound to the audited file hashes) and the release runs; *Reject*, or no answer before
  ``release.approval_timeout_hours`` (the default option is Reject), quarantines the run in staging with the
  reasons and skips the release. The publisher itself refuses a spec that requires approval without one.
- :func:`announce_release`: the release's Asset event carries the version and manifest (consumer DAGs
  scheduled on the dataset's Asset read them from ``triggering_asset_events``), and hook-level lineage
  (input: the extract, output: the sandbox dataset) for an installed OpenLineage provider.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator

from synthfactory.spec import DatasetSpec

APPROVAL_TASK_ID = "approve"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def approval_text(spec: DatasetSpec, version: str, decision: dict, gated: dict,
                  datacard_url: str | None = None) -> tuple[str, str]:
    """Subject and Markdown body of the approval request: figures only, never data."""
    target = "s3://" + "/".join(p.strip("/") for p in (spec.release.bucket, spec.release.prefix, spec.name, version)
                                if p.strip("/")) + "/"
    rows = "\n".join(
        f"| {c.get('gate')} | {c.get('name')} | {_fmt(c.get('value'))} | {c.get('op')} {_fmt(c.get('threshold'))} "
        f"| {'pass' if c.get('passed') else 'FAIL'} |" for c in decision.get("checks", []))
    files = "\n".join(f"- `{rel}` sha256 `{sha[:16]}…`" for rel, sha in (decision.get("audited_files") or {}).items())
    card = ""
    if datacard_url or gated.get("datacard_uri"):
        card = "\n**Data card:** " + (f"[open]({datacard_url})" if datacard_url else "") + \
               (f" (`{gated['datacard_uri']}`)" if gated.get("datacard_uri") else "") + "\n"
    timeout = spec.release.approval_timeout_hours
    body = f"""**Dataset** `{spec.name}` · version `{version}` · gate profile `{decision.get('profile', 'default')}`

The automatic gates passed: {decision.get('message', '')}. **Approve** publishes to `{target}` on connection
`{spec.release.connection_id}`. **Reject** quarantines the run in staging with your reason; nothing is released.
{f'Without an answer within {timeout:g} h the run is rejected.' if timeout else ''}

| gate | check | value | threshold | result |
|---|---|---|---|---|
{rows}

Files to release:
{files}
{card}"""
    return f"Release {spec.name} {version} to the sandbox?", body


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
        from synthfactory.airflow.dag_factory import run_context

        ctx = run_context(self.spec_path)
        gated = self._pull(context)["gate"]
        decision = ctx.store.read_json(gated["decision_uri"])
        self.subject, self.body = approval_text(ctx.spec, ctx.version, decision, gated, _datacard_url(ctx))
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from airflow.sdk.exceptions import DownstreamTasksSkipped

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
        from synthfactory.airflow.dag_factory import run_context

        user = event.get("responded_by_user") or {}
        reviewer = (user.get("name") or user.get("id")) if isinstance(user, dict) else str(user)
        reason = str((event.get("params_input") or {}).get("reason") or "")
        x = self._pull(context)
        pipeline.review(run_context(self.spec_path), x["gate"], x["sample"], x["quality"], x["privacy"],
                        approved=approved, reviewer=reviewer or None, reason=reason,
                        timed_out=bool(event.get("timedout")))


def _datacard_url(ctx: Any) -> str | None:
    try:
        from synthfactory.airflow.links import _base_url, datacard_path

        base = _base_url()
        return f"{base}{datacard_path(ctx.spec.name, ctx.version)}" if base else None
    except Exception:  # the data card web app is optional
        return None


def approval_task(spec: DatasetSpec, spec_path: str) -> ReleaseApprovalOperator:
    """The approval step for ``spec`` (call inside the DAG context)."""
    from airflow.sdk import Param

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


def announce_release(spec: DatasetSpec, ctx: Any, writer: Any, released: dict, asset: Any,
                     context: Any | None = None) -> None:
    """Asset event extra (version, manifest) for consumer DAGs, and hook-level lineage for OpenLineage."""
    from synthfactory.airflow.hooks import dataset_asset_uri, report_lineage

    if context is None:
        from airflow.sdk import get_current_context

        context = get_current_context()
    extra = {"version": released.get("version"), "manifest_uri": released.get("manifest_uri"),
             "latest": released.get("latest"), "noop": bool(released.get("noop"))}
    try:
        context["outlet_events"][asset].extra = extra
    except (KeyError, TypeError):  # pragma: no cover - no outlet events accessor (not under a task runner)
        pass
    report_lineage(writer.hook, inputs=[ctx.source_uri], outputs=[dataset_asset_uri(spec)],
                   extra={"version": released.get("version")})
