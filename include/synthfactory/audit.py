"""Audit a synthetic table made elsewhere (a vendor's, another tool's) against a run's real split.

``synthfactory audit SPEC --run-dir RUN --synthetic FILE.parquet`` runs the very stages the DAG runs
(:func:`synthfactory.pipeline.quality`, :func:`~synthfactory.pipeline.privacy`, :func:`~synthfactory.pipeline.gate`)
on the given table, scored against the real train and holdout split that run's ``prepare`` stage wrote
(``<staging>/<dataset>/runs/<run_id>/model/{train,holdout}.parquet``) and the same real-data reference. Nothing is
fitted or released: the audit's outputs (the checked copy of the table, the reports, the signed decision and the
data card) go to ``<run>/audits/<audit_id>/`` in staging (PHI side, 0600 files), a refusal's copies to
``<run>/audits/<audit_id>/quarantine/``.

Bad input (:class:`AuditInputError`, exit 2) is said before any work: a run folder without its split, an
unreadable file, columns missing or extra, a column whose type does not match the real one. Messages name columns
and types, never values.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from synthfactory.context import RunContext, safe_id
from synthfactory.errors import ConfigError
from synthfactory.spec import DatasetSpec
from synthfactory.storage import Store, is_s3, join, private_umask

log = logging.getLogger("synthfactory.audit")

EXTERNAL_KIND = "external"  # the card's synthesizer kind: a table this factory did not make


class AuditInputError(ConfigError):
    """The audit's input does not fit the run: missing run folder, unreadable file, columns or types that do not
    match the real table (exit 2)."""

    label = "bad input"


@dataclass
class AuditContext(RunContext):
    """A :class:`RunContext` whose real split is the audited run's and whose outputs go to its ``audits/`` folder."""

    source_run_uri: str = ""
    audit_id: str = ""

    @property
    def run_uri(self) -> str:
        return join(self.source_run_uri, "audits", self.audit_id)

    @property
    def train_uri(self) -> str:
        return join(self.source_run_uri, "model", "train.parquet")

    @property
    def holdout_uri(self) -> str:
        return join(self.source_run_uri, "model", "holdout.parquet")

    @property
    def quarantine_uri(self) -> str:
        return join(self.run_uri, "quarantine")


def _split_run_dir(run_dir: str, spec: DatasetSpec) -> tuple[str, str]:
    """``(staging_root, run_id)`` of ``<staging>/<dataset>/runs/<run_id>``."""
    parts = run_dir.rstrip("/").rsplit("/", 3)
    if len(parts) != 4 or parts[2] != "runs" or not parts[3]:
        raise AuditInputError(f"--run-dir {run_dir}: not a run folder; expected <staging>/{spec.name}/runs/<run_id>")
    root, dataset, _, run_id = parts
    if dataset != spec.name:
        raise AuditInputError(f"--run-dir {run_dir}: a run of dataset {dataset!r}, not of {spec.name!r} (the spec)")
    return root or "/", run_id


def _kind(s: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(s):
        return "boolean"
    if pd.api.types.is_numeric_dtype(s):
        return "numeric"
    if pd.api.types.is_datetime64_any_dtype(s):
        return "datetime"
    return "text"


def conform(synthetic: pd.DataFrame, real: pd.DataFrame, *, key: str, synthetic_id: str) -> pd.DataFrame:
    """``synthetic`` with exactly the real table's columns, in order, each cast to the real column's type; an id
    column added when absent. Raises :class:`AuditInputError` naming every column that does not fit."""
    cols = [c for c in real.columns if c != key]
    problems: list[str] = []
    if key in synthetic.columns:
        problems.append(f"column {key!r} is the real table's pseudonymous patient key: a synthetic table must not "
                        f"carry it")
    have = [c for c in synthetic.columns if c not in (key, synthetic_id)]
    missing = [c for c in cols if c not in synthetic.columns]
    extra = [c for c in have if c not in cols]
    if missing:
        problems.append(f"missing column(s) {missing}")
    if extra:
        problems.append(f"column(s) not in the real table {extra}")
    out = pd.DataFrame(index=pd.RangeIndex(len(synthetic)))
    for c in cols:
        if c not in synthetic.columns:
            continue
        want, got = _kind(real[c]), _kind(synthetic[c])
        s = synthetic[c].reset_index(drop=True)
        if want == "boolean" and got == "numeric" and s.dropna().isin([0, 1]).all():
            s, got = s.astype("boolean") if s.isna().any() else s.astype(bool), "boolean"
        if want != got:
            problems.append(f"column {c!r} is {got} ({synthetic[c].dtype}), the real column is {want} "
                            f"({real[c].dtype})")
            continue
        if want == "numeric" and pd.api.types.is_integer_dtype(real[c]) and not pd.api.types.is_integer_dtype(s):
            if s.notna().all() and (s == s.round()).all():  # whole numbers stored as float: the real type
                s = s.astype(real[c].dtype)
        elif want == "text":
            s = s.astype(object).where(s.notna(), None)
        out[c] = s
    if problems:
        raise AuditInputError("the synthetic table does not match the real table: " + "; ".join(problems))
    if not len(out):
        raise AuditInputError("the synthetic table has no rows")
    ids = (synthetic[synthetic_id].astype(str).reset_index(drop=True) if synthetic_id in synthetic.columns
           else pd.Series([f"audit-{i}" for i in range(len(out))]))
    out.insert(0, synthetic_id, ids)
    return out


def _ingest_summary(store: Store, staging_root: str, dataset: str, run_uri: str) -> dict | None:
    """The run's ingest summary (identifiers for the leak scans, tables for the public vocabulary): its own
    ``ingest/ingest_report.json``, else (ingest reused from an earlier run) the newest reuse-index entry."""
    report = join(run_uri, "ingest", "ingest_report.json")
    if store.exists(report):
        return store.read_json(report)
    entries = []
    for uri in store.listdir(join(staging_root, dataset, "ingest_index")):
        if uri.endswith(".json"):
            entry = store.read_json(uri)
            if entry.get("identifiers_uri") and store.exists(entry["identifiers_uri"]):
                entries.append(entry)
    return entries[-1] if entries else None


def audit(spec: DatasetSpec, run_dir: str, synthetic_uri: str, *, store: Store | None = None,
          profile: str = "default", audit_id: str | None = None, base_dir: str | None = None,
          signing_key: str | bytes | None = None) -> dict:
    """Quality, privacy and the gate on ``synthetic_uri`` against ``run_dir``'s real split. Returns the result
    (figures, the gate's decision: ``approved``, ``failed``, where the reports are), refused or not; raises
    :class:`AuditInputError` on bad input."""
    from synthfactory import pipeline
    from synthfactory.release.gate import GateRefused
    from synthfactory.synthesize.engine import SYNTHETIC_ID
    from synthfactory.synthesize.modelling import KEY

    store = store or Store()
    staging_root, run_id = _split_run_dir(run_dir, spec)
    run_uri = run_dir.rstrip("/")
    model = {name: join(run_uri, "model", name) for name in ("train.parquet", "holdout.parquet", "metadata.json")}
    absent = [name for name, uri in model.items() if not store.exists(uri)]
    if absent:
        raise AuditInputError(f"--run-dir {run_dir}: no {', '.join('model/' + a for a in absent)} (a run whose "
                              f"prepare stage finished holds the real train and holdout split)")
    try:
        raw = store.read_df(synthetic_uri)
    except Exception as err:  # noqa: BLE001 - missing file, not Parquet, unreadable: pyarrow raises several types
        raise AuditInputError(f"--synthetic {synthetic_uri}: cannot read it as Parquet "
                              f"({type(err).__name__})") from None
    real = store.read_df(model["train.parquet"])
    table = conform(raw, real, key=KEY, synthetic_id=SYNTHETIC_ID)
    stamp = datetime.now(timezone.utc)
    ctx = AuditContext(spec=spec, run_id=run_id, version=pipeline.version_for(stamp), store=store,
                       staging_root=staging_root, profile=profile, synthesizer=EXTERNAL_KIND, base_dir=base_dir,
                       signing_key=signing_key, source_run_uri=run_uri,
                       audit_id=safe_id(audit_id or "audit_" + stamp.strftime("%Y%m%dT%H%M%S%fZ")))
    ingested = _ingest_summary(store, staging_root, spec.name, run_uri)
    if ingested is None:
        raise AuditInputError(f"--run-dir {run_dir}: no ingest report (ingest/ingest_report.json) to take the "
                              f"identifier list of the leak scans from")
    uri = ctx.uri("synthetic", "patients.parquet")
    with private_umask() if not is_s3(staging_root) else nullcontext():
        store.write_df(uri, table)
    prepared: dict[str, Any] = {"train_uri": ctx.train_uri, "holdout_uri": ctx.holdout_uri,
                                "metadata_uri": model["metadata.json"], "rows_train": len(real)}
    reference = join(run_uri, "model", "reference.json")
    if store.exists(reference):
        prepared["reference_uri"] = reference
    sampled = {"synthetic_uri": uri, "rows": len(table)}
    log.info("audit of %s rows against run %s of %s: %s", len(table), run_id, spec.name, ctx.run_uri)
    q = pipeline.quality(ctx, prepared, sampled)
    p = pipeline.privacy(ctx, prepared, sampled, ingested, q)
    result = {"dataset": spec.name, "run_id": run_id, "audit_id": ctx.audit_id, "audit_uri": ctx.run_uri,
              "profile": profile, "rows": len(table), "quality": _figures(q), "privacy": _figures(p)}
    try:
        g = pipeline.gate(ctx, sampled, q, p, ingested)
    except GateRefused as refused:  # the gate quarantined the copies under the audit folder
        return {**result, **outcome(refused.decision), "decision_uri": ctx.uri("gate", "decision.json"),
                "datacard_uri": ctx.uri("reports", "datacard.html"), "quarantine_uri": ctx.quarantine_uri}
    decision = store.read_json(g["decision_uri"])
    return {**result, **outcome(decision), "decision_uri": g["decision_uri"], "datacard_uri": g["datacard_uri"]}


def _figures(summary: dict) -> dict:
    """The stage summary's figures (no URIs, no nested detail beyond one level)."""
    return {k: v for k, v in summary.items() if not k.endswith("_uri") and k not in ("seconds", "extra_checks")}


def outcome(decision: dict) -> dict:
    """approved, message, the failed checks and every check with its value and threshold."""
    return {"approved": bool(decision.get("approved")), "message": decision.get("message"),
            "failed": list(decision.get("failed") or []),
            "checks": [{k: c.get(k) for k in ("gate", "name", "value", "op", "threshold", "passed")}
                       for c in decision.get("checks") or []]}
