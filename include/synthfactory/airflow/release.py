"""The Airflow side of a release: what the approval request shows, and what a release announces downstream.

- :func:`approval_text`: the subject and body of the human approval request
  (:class:`~synthfactory.airflow.operators.ReleaseApprovalOperator`): the gate's figures, never data.
- :func:`announce_release`: the release's Asset event carries the version and manifest (consumer DAGs
  scheduled on the dataset's Asset read them from ``triggering_asset_events``), and hook-level lineage
  (input: the extract, output: the sandbox dataset, the same URI as the Asset) for an installed OpenLineage
  provider.
"""

from __future__ import annotations

from typing import Any

from synthfactory.release.layout import SandboxLayout
from synthfactory.spec import DatasetSpec

__all__ = ["announce_release", "approval_text"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def _reference(ref: dict | None) -> str:
    """What real data itself scores on a figure (mean ± sd over re-splits), or a dash."""
    if not ref or ref.get("mean") is None:
        return "–"
    return f"{_fmt(ref['mean'])} ± {_fmt(ref.get('sd') or 0.0)}"


def _result(check: dict) -> str:
    """pass, FAIL, or not certified (passed on a bound that cannot certify: see ``gate.Check.result``)."""
    if not check.get("passed"):
        return "FAIL"
    return check.get("result") or ("not certified" if check.get("certified") is False else "pass")


def approval_text(spec: DatasetSpec, version: str, decision: dict, gated: dict,
                  datacard_url: str | None = None) -> tuple[str, str]:
    """Subject and Markdown body of the approval request: figures only, never data."""
    target = SandboxLayout.for_spec(spec).version_uri(version)
    rows = "\n".join(
        f"| {c.get('gate')} | {c.get('name')} | {_fmt(c.get('value'))} | {_reference(c.get('reference'))} "
        f"| {c.get('op')} {_fmt(c.get('threshold'))} | {_result(c)} |"
        for c in decision.get("checks", []))
    files = "\n".join(f"- `{rel}` sha256 `{sha[:16]}…`" for rel, sha in (decision.get("audited_files") or {}).items())
    card = ""
    if datacard_url or gated.get("datacard_uri"):
        card = ("\n**Data card:** " + (f"[open the data card of this run]({datacard_url}) (what the figures mean, "
                                       f"their intervals, the data dictionary)" if datacard_url else "")
                + (f" · in staging: `{gated['datacard_uri']}`" if gated.get("datacard_uri") else "") + "\n")
    timeout = spec.release.approval_timeout_hours
    body = f"""**Dataset** `{spec.name}` · version `{version}` · gate profile `{decision.get('profile', 'default')}`

The automatic gates passed: {decision.get('message', '')}. **Approve** publishes to `{target}` on connection
`{spec.release.connection_id}`. **Reject** quarantines the run in staging with your reason; nothing is released.
{f'Without an answer within {timeout:g} h the run is rejected.' if timeout else ''}

| gate | check | value | real data itself | threshold | result |
|---|---|---|---|---|---|
{rows}

Files to release:
{files}
{card}"""
    return f"Release {spec.name} {version} to the sandbox?", body


def announce_release(spec: DatasetSpec, ctx: Any, writer: Any, released: dict, asset: Any,
                     context: Any | None = None) -> None:
    """Asset event extra (version, manifest) for consumer DAGs, and hook-level lineage for OpenLineage."""
    from synthfactory.airflow.hooks import report_lineage  # boto3 (the S3Hook): at run time

    if context is None:
        from synthfactory.airflow.compat import get_current_context

        context = get_current_context()
    extra = {"version": released.get("version"), "manifest_uri": released.get("manifest_uri"),
             "latest": released.get("latest"), "noop": bool(released.get("noop"))}
    try:
        context["outlet_events"][asset].extra = extra
    except (KeyError, TypeError):  # pragma: no cover - no outlet events accessor (not under a task runner)
        pass
    report_lineage(writer.hook, inputs=[ctx.source_uri], outputs=[SandboxLayout.for_spec(spec).asset_uri],
                   extra={"version": released.get("version")})
