"""The factory's stages as plain functions over a run context.

The Airflow tasks and the CLI call exactly these functions. Each stage reads its inputs from and writes
its outputs to the run-scoped staging folder (``<staging>/<dataset>/runs/<run_id>/``) and returns a
small JSON-able summary (URIs, counts, figures): never data, never identifiers.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from synthfactory import __version__
from synthfactory.spec import DatasetSpec
from synthfactory.storage import Store, is_s3, join

log = logging.getLogger("synthfactory.pipeline")

RELEASE_DATA = "data/patients.parquet"
RELEASE_QUALITY = "reports/quality.json"
RELEASE_PRIVACY = "reports/privacy.json"


def project_root() -> Path:
    """Base for relative paths in specs: $SYNTHFACTORY_HOME, else the current directory."""
    return Path(os.environ.get("SYNTHFACTORY_HOME") or os.getcwd())


def resolve(uri: str, base: Path | None = None) -> str:
    if is_s3(uri) or os.path.isabs(uri):
        return uri
    return str((base or project_root()) / uri)


def safe_id(value: str) -> str:
    """Make an Airflow run id or timestamp safe as a path/key segment."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("_")[:120] or "run"


def version_for(when: datetime | None) -> str:
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return "v" + when.strftime("%Y%m%dT%H%M%SZ")


@dataclass
class RunContext:
    spec: DatasetSpec
    run_id: str
    version: str
    store: Store = field(default_factory=Store)          # the PHI side: extract and staging
    source_uri: str | None = None                         # overrides spec.source.uri
    staging_root: str | None = None                       # overrides spec.staging.uri
    salt: str | bytes | None = None
    profile: str = "default"
    rows: int | None = None
    synthesizer: str | None = None
    base_dir: str | None = None                           # relative spec paths resolve here

    def __post_init__(self) -> None:
        base = Path(self.base_dir) if self.base_dir else None
        self.run_id = safe_id(self.run_id)
        self.staging_root = resolve(self.staging_root or self.spec.staging.uri, base)
        self.source_uri = resolve(self.source_uri or self.spec.source.uri, base)
        self.spec.thresholds(self.profile)  # fail fast on an unknown profile

    @property
    def run_uri(self) -> str:
        return join(self.staging_root, self.spec.name, "runs", self.run_id)

    def uri(self, *parts: str) -> str:
        return join(self.run_uri, *parts)

    @property
    def quarantine_uri(self) -> str:
        return join(self.staging_root, self.spec.name, "quarantine", self.run_id)

    @property
    def synthesizer_kind(self) -> str:
        return self.synthesizer or self.spec.synthesizer.kind


@contextmanager
def _stage(name: str, ctx: RunContext) -> Iterator[dict]:
    metrics: dict[str, Any] = {}
    t0 = time.perf_counter()
    log.info("stage=%s dataset=%s run=%s start", name, ctx.spec.name, ctx.run_id)
    yield metrics
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str)) and not k.endswith("_uri")}
    log.info("stage=%s dataset=%s run=%s done %s", name, ctx.spec.name, ctx.run_id,
             " ".join(f"{k}={v}" for k, v in sorted(shown.items())))


# -- 1. ingest ------------------------------------------------------------------------------------
def ingest(ctx: RunContext) -> dict:
    from synthfactory.ingest.fhir_ndjson import ingest_extract
    from synthfactory.keys import Keyer, resolve_salt

    with _stage("ingest", ctx) as m:
        keyer = Keyer(resolve_salt(ctx.salt, ctx.staging_root))
        report = ingest_extract(ctx.source_uri, ctx.uri("ingest"), keyer=keyer, store=ctx.store,
                                resources=list(ctx.spec.source.resources))
        m.update({
            "tables": report["tables"],
            "rows": report["rows"],
            "quarantined_total": report["quarantined_total"],
            "quarantine_uri": report["quarantine_uri"],
            "identifiers_uri": report["identifiers_uri"],
            "extract_sha256": report["extract_sha256"],
            "report_uri": ctx.uri("ingest", "ingest_report.json"),
        })
        if report["quarantined_total"]:
            log.warning("ingest quarantined %d resource(s); see %s", report["quarantined_total"],
                        report["quarantine_uri"])
    return m


# -- 2. prepare: modelling table + train/holdout split ----------------------------------------------
def prepare(ctx: RunContext, ingested: dict) -> dict:
    from synthfactory.synthesize.engine import metadata_dict
    from synthfactory.synthesize.modelling import KEY, build_modelling_table, split_train_holdout

    with _stage("prepare", ctx) as m:
        tables = {name: ctx.store.read_df(uri) for name, uri in ingested["tables"].items()}
        table, info = build_modelling_table(tables, ctx.spec.features)
        train, holdout = split_train_holdout(table, ctx.spec.synthesizer.holdout_fraction, ctx.spec.synthesizer.seed)
        uris = {"train_uri": ctx.uri("model", "train.parquet"), "holdout_uri": ctx.uri("model", "holdout.parquet"),
                "metadata_uri": ctx.uri("model", "metadata.json")}
        ctx.store.write_df(uris["train_uri"], train)
        ctx.store.write_df(uris["holdout_uri"], holdout)
        ctx.store.write_json(uris["metadata_uri"], metadata_dict(train, exclude=(KEY,)))
        m.update(uris)
        m.update({"rows_train": len(train), "rows_holdout": len(holdout), "columns": info["columns"],
                  "reference_date": info["reference_date"]})
    return m


# -- 3. fit ---------------------------------------------------------------------------------------
def fit(ctx: RunContext, prepared: dict) -> dict:
    from synthfactory.synthesize import engine
    from synthfactory.synthesize.modelling import KEY

    with _stage("fit", ctx) as m:
        train = ctx.store.read_df(prepared["train_uri"]).drop(columns=[KEY])
        metadata = ctx.store.read_json(prepared["metadata_uri"])
        params = ctx.spec.synthesizer.params if ctx.synthesizer_kind == ctx.spec.synthesizer.kind else {}
        synth, seconds = engine.fit(train, ctx.synthesizer_kind, params, metadata)
        model_uri = ctx.uri("model", "synthesizer.pkl")
        size = engine.save(synth, model_uri, ctx.store)
        m.update({"model_uri": model_uri, "synthesizer": ctx.synthesizer_kind, "fit_seconds": round(seconds, 3),
                  "model_bytes": size, "rows_train": len(train)})
    return m


# -- 4. sample ------------------------------------------------------------------------------------
def sample(ctx: RunContext, fitted: dict, prepared: dict) -> dict:
    from synthfactory.synthesize import engine

    with _stage("sample", ctx) as m:
        synth = engine.load(fitted["model_uri"], ctx.store)
        rows = ctx.rows or ctx.spec.synthesizer.rows or prepared["rows_train"]
        df = engine.sample(synth, int(rows))
        uri = ctx.uri("synthetic", "patients.parquet")
        ctx.store.write_df(uri, df)
        m.update({"synthetic_uri": uri, "rows": len(df)})
    return m


# -- 5. quality -----------------------------------------------------------------------------------
def quality(ctx: RunContext, prepared: dict, sampled: dict) -> dict:
    from synthfactory.quality.expectations import derive_suite
    from synthfactory.quality.report import evaluate_quality
    from synthfactory.synthesize.engine import SYNTHETIC_ID
    from synthfactory.synthesize.modelling import KEY

    with _stage("quality", ctx) as m:
        real = ctx.store.read_df(prepared["train_uri"]).drop(columns=[KEY])
        synthetic = ctx.store.read_df(sampled["synthetic_uri"]).drop(columns=[SYNTHETIC_ID])
        suite = derive_suite(real, name=f"{ctx.spec.name}_derived")
        suite_uri = ctx.uri("quality", "suite.json")
        ctx.store.write_json(suite_uri, suite)
        metadata = ctx.store.read_json(prepared["metadata_uri"])
        result = evaluate_quality(real, synthetic, suite=suite, metadata=metadata)
        report_uri = ctx.uri("reports", "quality.json")
        ctx.store.write_json(report_uri, {"dataset": ctx.spec.name, "run_id": ctx.run_id, **result})
        m.update({"report_uri": report_uri, "suite_uri": suite_uri,
                  "quality_score": round(float(result["quality_score"]), 4),
                  "expectation_success_ratio": round(float(result["expectation_success_ratio"]), 4)})
    return m


# -- 6. privacy -----------------------------------------------------------------------------------
def privacy(ctx: RunContext, prepared: dict, sampled: dict, ingested: dict, quality_summary: dict) -> dict:
    from synthfactory.privacy.leak import leak_scan, load_identifiers
    from synthfactory.privacy.metrics import privacy_metrics
    from synthfactory.synthesize.engine import SYNTHETIC_ID
    from synthfactory.synthesize.modelling import KEY

    with _stage("privacy", ctx) as m:
        train = ctx.store.read_df(prepared["train_uri"])
        holdout = ctx.store.read_df(prepared["holdout_uri"])
        synthetic = ctx.store.read_df(sampled["synthetic_uri"])
        metrics = privacy_metrics(train, holdout, synthetic, exclude=[KEY, SYNTHETIC_ID], seed=ctx.spec.synthesizer.seed)
        report_uri = ctx.uri("reports", "privacy.json")
        report = {"dataset": ctx.spec.name, "run_id": ctx.run_id, **metrics}
        ctx.store.write_json(report_uri, report)
        # Leak scan over every file that would be released, the privacy report itself included.
        identifiers = load_identifiers(ingested["identifiers_uri"], ctx.store)
        real_keys = list(train[KEY]) + list(holdout[KEY])
        scan = leak_scan([sampled["synthetic_uri"], quality_summary["report_uri"], report_uri],
                         [*identifiers, *real_keys], ctx.store)
        report["leak_scan"] = scan
        ctx.store.write_json(report_uri, report)
        m.update({
            "report_uri": report_uri,
            "exact_match_rate": round(float(metrics["exact_match"]["exact_match_rate"]), 6),
            # size-adjusted share (0.5 ideal, 1.0 memorised at any holdout fraction); the plain
            # subsample share stays in the report: at a 20 % holdout a pure copier scores only ~0.63 on it.
            "dcr_share": round(float(metrics["dcr"]["dcr_share_adjusted"]), 4),
            "dcr_share_subsample": round(float(metrics["dcr"]["dcr_share"]), 4),
            "dcr_ratio": round(float(metrics["dcr"]["dcr_ratio"]), 4),
            "leak_clean": bool(scan["clean"]),
            "leak_hits": sum(h["count"] for h in scan["hits"]),
        })
    return m


# -- 7. gate --------------------------------------------------------------------------------------
def release_files(sampled: dict, quality_summary: dict, privacy_summary: dict) -> dict[str, str]:
    return {RELEASE_DATA: sampled["synthetic_uri"], RELEASE_QUALITY: quality_summary["report_uri"],
            RELEASE_PRIVACY: privacy_summary["report_uri"]}


def gate(ctx: RunContext, sampled: dict, quality_summary: dict, privacy_summary: dict) -> dict:
    """Decide. On refusal, quarantine the run's outputs in staging with the reasons and raise GateRefused."""
    from synthfactory.release.gate import GateRefused, decide
    from synthfactory.release.publish import sha256_bytes

    with _stage("gate", ctx) as m:
        qt, pt = ctx.spec.thresholds(ctx.profile)
        files = release_files(sampled, quality_summary, privacy_summary)
        audited = {rel: sha256_bytes(ctx.store.read_bytes(uri)) for rel, uri in files.items()}
        decision = decide(quality_summary, privacy_summary, qt, pt, audited, profile=ctx.profile)
        decision.update({"dataset": ctx.spec.name, "run_id": ctx.run_id, "version": ctx.version,
                         "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        decision_uri = ctx.uri("gate", "decision.json")
        ctx.store.write_json(decision_uri, decision)
        m.update({"approved": decision["approved"], "decision_uri": decision_uri, "message": decision["message"]})
        if not decision["approved"]:
            for rel, uri in files.items():
                ctx.store.write_bytes(join(ctx.quarantine_uri, rel), ctx.store.read_bytes(uri))
            ctx.store.write_json(join(ctx.quarantine_uri, "reasons.json"), decision)
            log.error("dataset %s run %s quarantined at %s: %s", ctx.spec.name, ctx.run_id, ctx.quarantine_uri,
                      decision["message"])
            raise GateRefused(f"{ctx.spec.name}: {decision['message']}", decision)
    return m


# -- 8. release -----------------------------------------------------------------------------------
def release_key_prefix(ctx: RunContext) -> str:
    prefix = ctx.spec.release.prefix.strip("/")
    return "/".join(p for p in (prefix, ctx.spec.name, ctx.version) if p)


def release(ctx: RunContext, gated: dict, sampled: dict, quality_summary: dict, privacy_summary: dict,
            ingested: dict, writer: Any) -> dict:
    from synthfactory.release.publish import publish

    with _stage("release", ctx) as m:
        decision = ctx.store.read_json(gated["decision_uri"])
        files = release_files(sampled, quality_summary, privacy_summary)
        extra = {
            "dataset": ctx.spec.name,
            "version": ctx.version,
            "run_id": ctx.run_id,
            "synthetic": True,
            "rows": sampled["rows"],
            "synthesizer": ctx.synthesizer_kind,
            "spec_sha256": ctx.spec.spec_hash(),
            "source_extract_sha256": ingested["extract_sha256"],
            "figures": {
                "quality_score": quality_summary["quality_score"],
                "expectation_success_ratio": quality_summary["expectation_success_ratio"],
                "exact_match_rate": privacy_summary["exact_match_rate"],
                "dcr_share": privacy_summary["dcr_share"],
                "dcr_ratio": privacy_summary["dcr_ratio"],
                "leak_clean": privacy_summary["leak_clean"],
            },
            "synthfactory_version": __version__,
        }
        out = publish(files, decision=decision, store=ctx.store, writer=writer,
                      key_prefix=release_key_prefix(ctx), manifest_extra=extra)
        m.update({**out, "version": ctx.version})
    return m


def run_all(ctx: RunContext, writer: Any) -> dict:
    """Run every stage in order (the CLI path). Raises GateRefused when a gate refuses."""
    ingested = ingest(ctx)
    prepared = prepare(ctx, ingested)
    fitted = fit(ctx, prepared)
    sampled = sample(ctx, fitted, prepared)
    q = quality(ctx, prepared, sampled)
    p = privacy(ctx, prepared, sampled, ingested, q)
    g = gate(ctx, sampled, q, p)
    r = release(ctx, g, sampled, q, p, ingested, writer)
    return {"ingest": ingested, "prepare": prepared, "fit": fitted, "sample": sampled, "quality": q,
            "privacy": p, "gate": g, "release": r}
