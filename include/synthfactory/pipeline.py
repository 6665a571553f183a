"""The factory's stages as plain functions over a run context.

The Airflow tasks and the CLI call exactly these functions. Each stage reads its inputs from and writes
its outputs to the run-scoped staging folder (``<staging>/<dataset>/runs/<run_id>/``) and returns a
small JSON-able summary (URIs, counts, figures): never data, never identifiers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from synthfactory import __version__, kinds
from synthfactory.context import RunContext, project_root, resolve, safe_id, version_for  # noqa: F401 (re-exported)
from synthfactory.spec import DatasetSpec
from synthfactory.storage import Store, is_s3, join, private_umask
from synthfactory.summaries import (FitSummary, GateSummary, IngestSummary, PrepareSummary, PrivacySummary,
                                    QualitySummary, ReleaseSummary, ReviewSummary, RunSummary, SampleSummary)

log = logging.getLogger("synthfactory.pipeline")

RELEASE_DATA = "data/patients.parquet"
RELEASE_QUALITY = "reports/quality.json"
RELEASE_PRIVACY = "reports/privacy.json"
RELEASE_DATACARD = "reports/datacard.html"


def _log_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars (and one level of dicts of scalars, e.g. rows per table) for the ``k=v`` log line."""
    shown: dict[str, Any] = {}
    for k, v in metrics.items():
        if k.endswith("_uri") or k == "message":
            continue
        if isinstance(v, (int, float, bool, str)):
            shown[k] = v
        elif isinstance(v, dict) and k != "tables":
            shown.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float, bool))})
    return shown


def progress_interval() -> float:
    """Seconds between ``running elapsed=...`` lines of a long stage ($SYNTHFACTORY_PROGRESS_SECONDS, 0 = off)."""
    try:
        return float(os.environ.get("SYNTHFACTORY_PROGRESS_SECONDS", "60"))
    except ValueError:
        return 60.0


@contextmanager
def _stage(name: str, ctx: RunContext) -> Iterator[dict]:
    """Structured stage log: ``stage=<name> ... start``, a ``running elapsed=<s>`` line every
    :func:`progress_interval` seconds, then ``done k=v ...`` (timings, row counts, figures) or
    ``failed seconds=... error=<type>`` (the exception's type only: messages stay in the task's traceback)."""
    metrics: dict[str, Any] = {}
    t0 = time.perf_counter()
    log.info("stage=%s dataset=%s run=%s start", name, ctx.spec.name, ctx.run_id)
    stop = threading.Event()
    interval = progress_interval()

    def heartbeat() -> None:
        while not stop.wait(interval):
            log.info("stage=%s dataset=%s run=%s running elapsed=%.0fs", name, ctx.spec.name, ctx.run_id,
                     time.perf_counter() - t0)

    if interval > 0:
        threading.Thread(target=heartbeat, name=f"synthfactory-progress-{name}", daemon=True).start()
    # local staging holds PHI: whatever writes there while the stage runs (streamed Parquet, checkpoints, a worker
    # subprocess) creates 0600 files and 0700 folders. Not the release: it writes the sandbox, not staging.
    private = not is_s3(str(ctx.staging_root)) and name != "release"
    try:
        with private_umask() if private else nullcontext():
            yield metrics
    except BaseException as err:
        log.error("stage=%s dataset=%s run=%s failed seconds=%.3f error=%s", name, ctx.spec.name, ctx.run_id,
                  time.perf_counter() - t0, type(err).__name__)
        raise
    finally:
        stop.set()
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("stage=%s dataset=%s run=%s done %s", name, ctx.spec.name, ctx.run_id,
             " ".join(f"{k}={v}" for k, v in sorted(_log_fields(metrics).items())))


# -- 1. ingest ------------------------------------------------------------------------------------
INGEST_REUSED_KEYS = ("tables", "rows", "quarantined_total", "quarantine_uri", "identifiers_uri", "extract_sha256",
                      "report_uri")


def extract_digest(source_uri: str, store: Store) -> str:
    """sha256 over every file under the extract (relative name, size, bytes), streamed in sorted order."""
    h = hashlib.sha256()
    base = source_uri.rstrip("/")
    files = store.listdir(source_uri)
    if not files and (Path(source_uri).is_file() if not is_s3(source_uri) else store.exists(source_uri)):
        # one file (a flat table)
        files, base = [source_uri], source_uri.rsplit("/", 1)[0]
    for uri in files:
        h.update(uri[len(base):].lstrip("/").encode() + b"\0")
        with store.open_read(uri) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def ingest_cache_key(extract_sha256: str, spec: DatasetSpec, salt: bytes) -> str:
    """Reuse key of an ingest output: extract content, spec, salt (as an HMAC, never the salt) and code version."""
    salt_id = hmac.new(salt, b"synthfactory-ingest-reuse", hashlib.sha256).hexdigest()
    parts = [extract_sha256, spec.spec_hash(), salt_id, __version__]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _reusable_ingest(ctx: RunContext, index_uri: str) -> dict | None:
    if ctx.force_ingest:
        log.info("stage=ingest force_ingest=True: ignoring any previous ingest output of this extract")
        return None
    if not ctx.store.exists(index_uri):
        return None
    cached = ctx.store.read_json(index_uri)
    uris = [*cached.get("tables", {}).values(), cached.get("identifiers_uri"), cached.get("quarantine_uri")]
    if not all(u and ctx.store.exists(u) for u in uris):
        log.info("stage=ingest previous output of run %s is gone; ingesting again", cached.get("run_id"))
        return None
    return cached


def ingest(ctx: RunContext) -> IngestSummary:
    """Ingest the extract, or reuse the output of a previous run of the same extract content, spec, salt and
    code version (``operations.reuse_ingest``; ``ctx.force_ingest`` ingests again)."""
    from synthfactory.keys import resolve_salt

    if ctx.spec.operations.ingest_shards > 1:  # the DAG runs these three as tasks, the shards mapped
        return merge_ingest(ctx, [ingest_shard(ctx, shard) for shard in plan_ingest_shards(ctx)])
    with _stage("ingest", ctx) as m:
        salt = resolve_salt(ctx.salt, ctx.staging_root)
        index_uri, cached = _reuse_lookup(ctx, salt)
        if cached is not None:
            _reuse(ctx, cached, m)
        else:
            _ingest_fresh(ctx, salt, m)
            if index_uri:
                ctx.store.write_json(index_uri, {**{k: m[k] for k in INGEST_REUSED_KEYS}, "run_id": ctx.run_id})
    return m


def _reuse_lookup(ctx: RunContext, salt: bytes) -> tuple[str | None, dict | None]:
    """(the ingest reuse index entry's URI or None, the reusable previous output or None)."""
    if ctx.spec.operations.reuse_ingest and ctx.spec.source.kind not in ("fhir_bulk", "fhir_search") \
            and not ctx.spec.source.query:
        digest = extract_digest(ctx.source_uri, ctx.store)
        index_uri = join(ctx.staging_root, ctx.spec.name, "ingest_index",
                         ingest_cache_key(digest, ctx.spec, salt) + ".json")
        return index_uri, _reusable_ingest(ctx, index_uri)
    return None, None


def _reuse(ctx: RunContext, cached: dict, m: dict) -> None:
    check_needed_tables(ctx.spec, cached["rows"])
    m.update({k: cached[k] for k in INGEST_REUSED_KEYS})
    m["reused_from_run"] = cached["run_id"]
    log.info("stage=ingest reusing the ingest output of run %s (same extract sha256, spec, salt, code)",
             cached["run_id"])


def plan_ingest_shards(ctx: RunContext, n: int | None = None) -> list[dict]:
    """Sharded ingest, step 1 (``operations.ingest_shards`` > 1): cut the extract's files at line ends into at
    most ``n`` shards of about equal bytes (deterministic; :func:`synthfactory.ingest.sharded.plan_shards`).
    Returns the shards (file names and byte ranges, no content), the list the DAG maps ``ingest_shard`` over.
    When a previous run's ingest output is reusable, one placeholder shard that does nothing."""
    from synthfactory.ingest.sources import plan_for_run, shards_uri
    from synthfactory.keys import resolve_salt

    with _stage("ingest_plan", ctx) as m:
        salt = resolve_salt(ctx.salt, ctx.staging_root)  # first: the shard tasks then only read the salt
        index_uri, cached = _reuse_lookup(ctx, salt)
        if cached is not None:
            ctx.store.write_json(join(shards_uri(ctx), "plan.json"), {"reused": cached})
            m.update({"shards": 0, "reused_from_run": cached["run_id"]})
            return [{"index": 0, "reused": True}]
        plan = plan_for_run(ctx, n or ctx.spec.operations.ingest_shards)
        if index_uri:
            ctx.store.write_json(join(shards_uri(ctx), "plan.json"), {**plan, "index_uri": index_uri})
        m.update({"shards": len(plan["shards"]), "files": len(plan["files"]),
                  "bytes": sum(f["size"] for f in plan["files"])})
    return plan["shards"]


def ingest_shard(ctx: RunContext, shard: dict) -> dict:
    """Sharded ingest, step 2: flatten one shard into shard-scoped Parquet parts and its decisions (one task per
    shard in the DAG). Returns a small summary (counts, seconds, the shard's staging URI)."""
    from synthfactory.ingest.sources import shard_for_run
    from synthfactory.keys import Keyer, resolve_salt

    if shard.get("reused"):
        return {"index": shard["index"], "reused": True}
    with _stage("ingest_shard", ctx) as m:
        m.update(shard_for_run(ctx, Keyer(resolve_salt(ctx.salt, ctx.staging_root)), shard))
        m["shard"] = m.pop("index")
    return {**m, "index": m["shard"]}


def merge_ingest(ctx: RunContext, shards: list[dict]) -> IngestSummary:
    """Sharded ingest, step 3: merge the shards into the outputs and report of a one-process ingest (duplicate
    ids across shards, references to patients of other shards and the sampled validation decided as one
    process would), then the identifier index; the summary is :func:`ingest`'s."""
    from synthfactory.ingest.sources import merge_for_run, shards_uri
    from synthfactory.keys import Keyer, resolve_salt

    with _stage("ingest", ctx) as m:
        plan = ctx.store.read_json(join(shards_uri(ctx), "plan.json"))
        if plan.get("reused"):
            _reuse(ctx, plan["reused"], m)
            ctx.store.remove_tree(shards_uri(ctx))
            return m
        report = merge_for_run(ctx, Keyer(resolve_salt(ctx.salt, ctx.staging_root)), list(shards))
        _ingest_outputs(ctx, report, m)
        m["shards"] = report["sharded"]["shards"]
        if plan.get("index_uri"):
            ctx.store.write_json(plan["index_uri"], {**{k: m[k] for k in INGEST_REUSED_KEYS},
                                                     "run_id": ctx.run_id})
        ctx.store.remove_tree(shards_uri(ctx))  # last: a retried merge still finds its shards
    return m


def needed_tables(spec: DatasetSpec) -> dict[str, str]:
    """{flattened table: why} for the tables the spec's features cannot be built without."""
    f = spec.features
    need: dict[str, str] = {}
    uses = [w for w, on in (("top_conditions", f.top_conditions > 0), ("condition_codes", bool(f.condition_codes)),
                            ("conditions", bool(f.conditions))) if on]
    if uses and "Condition" in spec.source.resources:
        need["condition"] = "features." + ", features.".join(uses)
    uses = [w for w, on in (("labs", bool(f.labs)), ("auto", f.auto and f.auto_max_labs > 0)) if on]
    if uses and "Observation" in spec.source.resources:
        need["observation"] = "features." + ", features.".join(uses)
    return need


def check_needed_tables(spec: DatasetSpec, rows: dict[str, int], report: dict | None = None) -> None:
    """InputError (exit 3), before anything is fitted, when a table the features need came out empty (e.g. an
    empty Condition.ndjson while features use conditions): a clear message instead of a failure later."""
    from synthfactory.errors import InputError

    empty = []
    for table, why in needed_tables(spec).items():
        if table in rows and not rows[table]:
            rtype = {"condition": "Condition", "observation": "Observation"}[table]
            read = (report or {}).get("resources_read", {}).get(rtype)
            q = (report or {}).get("quarantined", {}).get(rtype)
            counts = f" ({read} read, {q} quarantined)" if read is not None else ""
            empty.append(f"no usable {rtype} resource in the extract{counts}, but {why} need(s) the {table} table")
    if empty:
        raise InputError("; ".join(empty) + " (check the extract, or drop those features from the spec, e.g. "
                         "features.top_conditions: 0)")


def _ingest_fresh(ctx: RunContext, salt: bytes, m: dict) -> None:
    from synthfactory.ingest.sources import ingest_for_run  # dispatches on source.kind
    from synthfactory.keys import Keyer

    _ingest_outputs(ctx, ingest_for_run(ctx, Keyer(salt)), m)


def _ingest_outputs(ctx: RunContext, report: dict, m: dict) -> None:
    """The ingest summary of a fresh ingest's report, and the leak scan's identifier index."""
    check_needed_tables(ctx.spec, report["rows"], report)
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
    from synthfactory.privacy.leak import write_identifier_index

    # the leak scan's compact index (salted hashes), written once here and reused by privacy and gate
    write_identifier_index(report["identifiers_uri"], ctx.store)


def columns_uri(ctx: RunContext) -> str:
    """The run's column descriptions (written by prepare, read by the data card)."""
    return ctx.uri("model", "columns.json")


# -- 2. prepare: modelling table + train/holdout split ----------------------------------------------
def modelling_frame(table: Any, keep_keys: bool = False) -> Any:
    """An ingested table as pandas for the modelling table: without the row keys of other tables
    (``<table>_key`` columns other than ``patient_key``, which the modelling table never reads: unique 32-hex
    HMACs, most of a large table's memory as Python strings) unless ``keep_keys``."""
    from synthfactory.synthesize.modelling import KEY

    if not keep_keys:
        table = table.drop_columns([c for c in table.column_names if c != KEY and c.endswith("_key")])
    return table.to_pandas()


def prepare(ctx: RunContext, ingested: IngestSummary) -> PrepareSummary:
    from synthfactory.synthesize.engine import metadata_dict
    from synthfactory.synthesize.modelling import (KEY, build_modelling_table, check_features, split_train_holdout,
                                                   table_info)

    with _stage("prepare", ctx) as m:
        relational = ctx.spec.synthesizer.mode == "relational"
        flat = ctx.spec.source.kind == "table"
        # the modelling table never reads the tables' own row keys (unique 32-hex HMACs: most of a large table's
        # memory as Python strings); only the relational mode (its per-table record) and a flat table keep them
        if relational or flat:
            tables = {name: modelling_frame(ctx.store.read_table(uri), keep_keys=True)
                      for name, uri in ingested["tables"].items()}
        else:  # streamed: only the columns and observation rows the features read (bounded memory, same table)
            from synthfactory.synthesize.modelling import read_modelling_tables

            tables = read_modelling_tables(ingested["tables"], ctx.store, ctx.spec.features)
        table_plan = None
        if flat:  # one flat table: its own columns (synthesize/flat.py)
            from synthfactory.ingest.table import read_types
            from synthfactory.synthesize.flat import prepare_table

            table, table_plan = prepare_table(tables["table"], read_types(ingested["tables"], ctx.store), ctx.spec,
                                              KEY)
            info = table_info(table, ctx.spec)
        else:
            table, info = build_modelling_table(tables, ctx.spec.features)
        # before fit: every lab, condition concept and column the spec names must be in the table (FeatureError)
        check_features(ctx.spec, table, info, tables)
        train, holdout = split_train_holdout(table, ctx.spec.synthesizer.holdout_fraction, ctx.spec.synthesizer.seed)
        uris = {"train_uri": ctx.train_uri, "holdout_uri": ctx.holdout_uri,
                "metadata_uri": ctx.uri("model", "metadata.json")}
        ctx.store.write_df(uris["train_uri"], train)
        ctx.store.write_df(uris["holdout_uri"], holdout)
        overrides = dict(ctx.spec.synthesizer.metadata)
        if table_plan is not None:
            from synthfactory.synthesize.flat import TABLE_PLAN, metadata_overrides

            overrides = {**metadata_overrides(table_plan), **overrides}
            uris["table_plan_uri"] = ctx.uri("model", TABLE_PLAN)
            ctx.store.write_json(uris["table_plan_uri"], table_plan)
            m["column_types"] = table_plan["types"]
            info["dictionary"]["table_columns"] = table_plan["types"]  # the data card's dictionary
            m["table_rules"] = len(table_plan["rules"])
        metadata = metadata_dict(train, exclude=(KEY,), overrides=overrides)
        ctx.store.write_json(uris["metadata_uri"], metadata)
        m.update(uris)
        m.update(_real_reference(ctx, train, holdout, metadata))
        m.update({"rows_train": len(train), "rows_holdout": len(holdout), "columns": info["columns"],
                  "reference_date": info["reference_date"], "condition_flags": info["condition_flags"],
                  "concepts": info["concepts"], "labs": info["labs"]})
        # the resolved features (top/auto choices made explicit): the relational sampler rebuilds the same columns
        m["features_uri"] = ctx.uri("model", "features.json")
        ctx.store.write_json(m["features_uri"], info["features"])
        # what each column means (codes, displays, LOINC units, reference date): the data card's data dictionary
        ctx.store.write_json(columns_uri(ctx), {**info["dictionary"], "reference_date": info["reference_date"]})
        if ctx.spec.synthesizer.mode == "relational":  # the training patients' flattened tables, for the record
            keep = set(train[KEY])
            m["relational_uris"], m["relational_holdout_uris"] = {}, {}
            for name, df in tables.items():
                if KEY in df.columns:
                    uri = ctx.uri("model", "relational", f"{name}.parquet")
                    ctx.store.write_df(uri, df[df[KEY].isin(keep)].reset_index(drop=True))
                    m["relational_uris"][name] = uri
                    # the held-out patients' records: non-members of the record-level privacy audit
                    uri = ctx.uri("model", "relational_holdout", f"{name}.parquet")
                    ctx.store.write_df(uri, df[~df[KEY].isin(keep)].reset_index(drop=True))
                    m["relational_holdout_uris"][name] = uri
    return m


def _real_reference(ctx: RunContext, train: Any, holdout: Any, metadata: dict) -> dict:
    """What real data itself scores on every quality figure (real held-out rows vs real train rows, over
    re-splits): written to ``model/reference.json``; the quality stage and the gate judge against it."""
    from synthfactory.quality.reference import real_reference
    from synthfactory.synthesize.modelling import KEY

    qt, _ = ctx.spec.thresholds(ctx.profile)
    rs = qt.reference
    ref = real_reference(train.drop(columns=[KEY]), holdout.drop(columns=[KEY]), metadata=metadata,
                         relationships=qt.relationships, resplits=rs.resplits, min_values=rs.min_values,
                         seed=ctx.spec.synthesizer.seed)
    uri = ctx.uri("model", "reference.json")
    ctx.store.write_json(uri, ref)
    return {"reference_uri": uri, "reference_quality_score": _r((ref.get("quality_score") or {}).get("mean"))}


# -- 3. fit ---------------------------------------------------------------------------------------
def fit(ctx: RunContext, prepared: PrepareSummary) -> FitSummary:
    from synthfactory.synthesize import stages

    with _stage("fit", ctx) as m:
        # epochs: the run's Param, else synthesizer.epochs, else params.epochs; device detected; neural kinds
        # checkpoint to <run>/model/checkpoint and a retried fit resumes there (synthesize/stages.py)
        stages.fit_model(ctx, prepared, m)
    return m


# -- 4. sample ------------------------------------------------------------------------------------
def sample(ctx: RunContext, fitted: FitSummary, prepared: PrepareSummary) -> SampleSummary:
    from synthfactory.synthesize import stages

    with _stage("sample", ctx) as m:
        # batches streamed into Parquet row groups (bounded memory); rebalance/oversample, constraints, and in
        # relational mode synthetic/<table>.parquet + FHIR; reports/synthesis.json (synthesize/stages.py)
        stages.sample_model(ctx, fitted, prepared, m)
    return m


# -- 5. quality -----------------------------------------------------------------------------------
FROZEN_SUITES_DIR = "include/expectations"


def frozen_suite_path(ctx: RunContext) -> Path:
    """``include/expectations/<dataset>.json`` under the project: a frozen (user-edited) suite, which wins
    over the one derived from the real table (``synthfactory freeze-suite`` writes it)."""
    base = Path(ctx.base_dir) if ctx.base_dir else project_root()
    return base / FROZEN_SUITES_DIR / f"{ctx.spec.name}.json"


def _r(x: Any, nd: int = 4) -> Any:
    return None if x is None else round(float(x), nd)


def quality(ctx: RunContext, prepared: PrepareSummary, sampled: SampleSummary) -> QualitySummary:
    """GX suite (frozen, else derived from the real train split) on the synthetic table with Data Docs,
    SDMetrics fidelity, the spec's clinical relationships and TSTR/TRTR utility on the real holdout."""
    import json
    import tempfile

    from synthfactory.quality.expectations import derive_suite, run_suite
    from synthfactory.quality.reference import matched_expectations, matched_figures, worst_column
    from synthfactory.quality.report import evaluate_quality
    from synthfactory.synthesize.engine import SYNTHETIC_ID
    from synthfactory.synthesize.modelling import KEY

    with _stage("quality", ctx) as m:
        qt, _ = ctx.spec.thresholds(ctx.profile)
        real = ctx.store.read_df(prepared["train_uri"]).drop(columns=[KEY])
        holdout = ctx.store.read_df(prepared["holdout_uri"]).drop(columns=[KEY], errors="ignore")
        synthetic = ctx.store.read_df(sampled["synthetic_uri"])
        suite = derive_suite(real, name=f"{ctx.spec.name}_derived", key_columns=[SYNTHETIC_ID],
                             range_tolerance=qt.range_tolerance, quantile_tolerance=qt.quantile_tolerance,
                             null_tolerance=qt.null_tolerance)
        if prepared.get("table_plan_uri"):  # a flat table: its value sets and one expectation per logic rule
            from synthfactory.quality.expectations import (add_expectations, table_rule_expectations,
                                                           table_value_set_expectations)

            plan = ctx.store.read_json(prepared["table_plan_uri"])
            suite = add_expectations(suite, [*table_value_set_expectations(plan), *table_rule_expectations(plan)])
        suite_uri = ctx.uri("quality", "suite.json")
        ctx.store.write_json(suite_uri, suite)
        frozen = frozen_suite_path(ctx)
        suite_source = "derived"
        if frozen.is_file():
            suite = json.loads(frozen.read_text(encoding="utf-8"))
            suite_source = f"frozen:{FROZEN_SUITES_DIR}/{frozen.name}"
            log.info("stage=quality using the frozen suite %s", frozen)
        metadata = ctx.store.read_json(prepared["metadata_uri"])
        docs_uri = ctx.uri("reports", "data_docs")
        with tempfile.TemporaryDirectory(prefix="sf-data-docs-") as docs:
            utility = qt.utility
            if utility is not None and utility.keep_leaking_features is None:  # left out for flat tables
                utility = utility.model_copy(update={"keep_leaking_features": ctx.spec.source.kind != "table"})
            result = evaluate_quality(real, synthetic, suite=suite, metadata=metadata, keys=[SYNTHETIC_ID],
                                      holdout=holdout, relationships=qt.relationships, utility=utility,
                                      seed=ctx.spec.synthesizer.seed, data_docs_dir=docs)
            index = result["expectations"].pop("data_docs_index", None)
            if index:
                for path in sorted(Path(docs).rglob("*")):
                    if path.is_file():
                        ctx.store.write_bytes(join(docs_uri, path.relative_to(docs).as_posix()), path.read_bytes())
        if prepared.get("reference_uri"):
            reference = ctx.store.read_json(prepared["reference_uri"])
        else:  # a prepare summary from before the reference existed: compute it now
            reference = ctx.store.read_json(_real_reference(ctx, ctx.store.read_df(prepared["train_uri"]),
                                                            ctx.store.read_df(prepared["holdout_uri"]),
                                                            metadata)["reference_uri"])
        worst = worst_column(result["sdmetrics"].get("columns", []), reference["eligible_columns"])
        fid = result["fidelity"]
        fid["min_column_score"], fid["worst_column"] = (_r(worst[0]), worst[1])
        # the suite on real held-out rows: how many of its expectations real data itself passes
        real_run = run_suite(suite, holdout.assign(**{SYNTHETIC_ID: [f"real-{i}" for i in range(len(holdout))]}))
        p_real, n_exp = float(real_run["success_ratio"]), max(1, int(real_run["evaluated"]))
        reference = {**reference, "expectation_success_ratio": {
            # the noise of a difference of two success shares over n_exp expectations (real and synthetic)
            "mean": p_real, "sd": (2 * max(p_real * (1 - p_real), 1.0 / n_exp) / n_exp) ** 0.5, "n": 1}}
        result["reference"] = reference
        # the gate compares figures at the reference's row count (SDMetrics scores rise with the row count)
        result["matched"] = matched_figures(real, synthetic.drop(columns=[SYNTHETIC_ID], errors="ignore"),
                                            metadata=metadata, rows=reference["rows_holdout"],
                                            eligible=reference["eligible_columns"],
                                            repeats=qt.reference.matched_repeats, seed=ctx.spec.synthesizer.seed)
        # the suite on synthetic subsets of the held-out size: a range or quantile expectation fails more often
        # on more rows (a value beyond the train max: 1 - n/(n+m) for m new rows), so the synthetic share is
        # compared with the real one at the same row count, as the SDMetrics figures are
        result["matched"]["expectation_success_ratio"] = matched_expectations(
            suite, synthetic, rows=len(holdout), repeats=qt.reference.matched_repeats, seed=ctx.spec.synthesizer.seed)
        if sampled.get("tables"):  # relational mode: every table beside its real-data reference, gated per table
            result["tables"] = _relational_quality(ctx, prepared, sampled)
        report_uri = ctx.uri("reports", "quality.json")
        result["suite_source"] = suite_source
        ctx.store.write_json(report_uri, {"dataset": ctx.spec.name, "run_id": ctx.run_id, **result})
        fid, util = result["fidelity"], result.get("utility") or {}
        m.update({"report_uri": report_uri, "suite_uri": suite_uri, "suite_source": suite_source,
                  "data_docs_uri": join(docs_uri, "index.html") if index else None,
                  "rows_real": len(real), "rows_holdout": len(holdout), "rows_synthetic": len(synthetic),
                  "quality_score": round(float(result["quality_score"]), 4),
                  "expectation_success_ratio": round(float(result["expectation_success_ratio"]), 4),
                  "expectations_failed": len(result["expectations"]["failed"]),
                  "column_shapes": _r(fid["column_shapes"]), "column_pair_trends": _r(fid["column_pair_trends"]),
                  "min_column_score": _r(fid["min_column_score"]), "worst_column": fid["worst_column"],
                  "relationships": {r["name"]: {"max_excess": _r(r["max_excess"]), "max_error": _r(r["max_error"]),
                                                "tolerance": r["tolerance"], "status": r["status"],
                                                "effect": _effect_summary(r.get("effect"))}
                                    for r in result["relationships"]},
                  "reference": _reference_summary(reference),
                  "matched": {k: _r((result["matched"].get(k) or {}).get("mean"))
                              for k in ("quality_score", "column_shapes", "column_pair_trends", "min_column_score",
                                        "expectation_success_ratio")},
                  "matched_rows": result["matched"]["rows"],
                  "utility_status": util.get("status"), "utility_metric": util.get("metric"),
                  "utility_tstr": _r(util.get("tstr")), "utility_trtr": _r(util.get("trtr")),
                  "utility_ratio": _r(util.get("ratio"))})
        if result.get("tables"):
            m["tables"] = result["tables"]["gate"]
    return m


def _relational_quality(ctx: RunContext, prepared: PrepareSummary, sampled: SampleSummary) -> dict:
    """Per-table and cross-table fidelity of the relational tables (:mod:`synthfactory.quality.tables`): each
    table's figures against the real train patients' tables, beside real held-out vs real train patients."""
    from synthfactory.quality import tables as qtab

    uris = prepared.get("relational_uris") or {}
    syn = {n: ctx.store.read_df(u) for n, u in (sampled.get("tables") or {}).items() if n in uris}
    real = {n: ctx.store.read_df(uris[n]) for n in syn}
    seed = ctx.spec.synthesizer.seed
    qt, _ = ctx.spec.thresholds(ctx.profile)
    rel = qt.relational
    # the time and cross-table figures: a spec-named lab's trajectory, the top codes' co-occurrence
    timing = {"trajectory": qtab.Trajectory.from_spec(qt.trajectory, ctx.spec.features),
              "cooccurrence_top": rel.cooccurrence_top}
    ref = qtab.relational_reference(real, holdout_fraction=ctx.spec.synthesizer.holdout_fraction, seed=seed,
                                    resplits=qt.reference.resplits, **timing)
    fig = qtab.synthetic_figures(real, syn, patients=ref["holdout_patients"], seed=seed, **timing)
    checks = qtab.run_table_checks(real, syn)
    gate = qtab.gate_tables(fig, ref, checks, noise_z=qt.reference.noise_z,  # the patient table's noise rule
                            interval_margin=rel.interval_ks_margin, order_margin=rel.in_encounter_margin,
                            cooccurrence_margin=rel.cooccurrence_margin,
                            trajectory_margin=qt.trajectory.margin if qt.trajectory else 0.25)
    out = {"reference": ref, "figures": fig, "checks": checks, "gate": gate}
    if qt.trajectory is not None:
        out["trajectory"] = {k: v for k, v in qt.trajectory.model_dump(mode="json").items()}
    return out


def _effect_summary(effect: dict | None) -> dict | None:
    if not effect:
        return None
    return {k: (_r(v) if isinstance(v, float) else v) for k, v in effect.items()}


def _reference_summary(reference: dict) -> dict:
    """The reference figures the gate needs (XCom-sized): mean/sd per gated figure and per relationship."""
    def small(summary: dict | None) -> dict | None:
        return None if not summary else {k: _r(summary[k]) for k in ("mean", "sd", "p05") if k in summary}

    out = {k: small(reference.get(k)) for k in ("quality_score", "column_shapes", "column_pair_trends",
                                                "min_column_score", "expectation_success_ratio")}
    out["relationships"] = {name: {"effect_kept": small(v.get("effect_kept"))}
                            for name, v in (reference.get("relationships") or {}).items()}
    out["resplits"] = reference.get("resplits")
    return out


# -- 6. privacy -----------------------------------------------------------------------------------
def privacy(ctx: RunContext, prepared: PrepareSummary, sampled: SampleSummary, ingested: IngestSummary,
            quality_summary: QualitySummary, *, scan_leaks: bool = True) -> PrivacySummary:
    """The privacy figures and report, then the leak scan of every file the release would publish (the privacy
    report itself included). With ``operations.leak_scan_shards`` > 1 the scan runs in parts (:func:`plan_leak_scan`,
    :func:`leak_scan_part`, :func:`merge_leak_scan`: mapped tasks in the DAG, in turn here); ``scan_leaks=False``
    leaves it to those tasks (the summary then has no ``leak_clean``, which the gate refuses until
    :func:`with_leak_scan` adds it)."""
    from synthfactory.privacy.leak import leak_scan
    from synthfactory.privacy.metrics import privacy_metrics
    from synthfactory.synthesize.engine import SYNTHETIC_ID
    from synthfactory.synthesize.modelling import KEY

    with _stage("privacy", ctx) as m:
        train = ctx.store.read_df(prepared["train_uri"])
        holdout = ctx.store.read_df(prepared["holdout_uri"])
        synthetic = ctx.store.read_df(sampled["synthetic_uri"])
        _, pt = ctx.spec.thresholds(ctx.profile)
        metadata = ctx.store.read_json(prepared["metadata_uri"])
        metrics = privacy_metrics(
            train, holdout, synthetic, exclude=[KEY, SYNTHETIC_ID], seed=ctx.spec.synthesizer.seed,
            quasi_identifiers=pt.quasi_identifiers, sensitive_attributes=pt.sensitive_attributes,
            k_anonymity=pt.min_k_anonymity, anonymeter_attacks=pt.anonymeter_attacks,
            metadata=metadata, reference_resplits=pt.reference_resplits,
            mia_attacks=pt.mia.attacks, mia_options=mia_options(pt), dcr_max_query_rows=pt.dcr_max_query_rows,
            fit_sample=_shadow_fit_sample(ctx, train.drop(columns=[KEY]), metadata) if pt.mia.shadow else None)
        if ctx.spec.synthesizer.mode == "relational":  # a patient's whole record as the unit (gated: record.*)
            metrics["record"] = _record_privacy(ctx, prepared, sampled, pt)
        report_uri = ctx.uri("reports", "privacy.json")
        audit = _privacy_audit_figures(metrics, pt)
        if metrics.get("record"):
            from synthfactory.privacy.records import summarise_record_audit

            audit["record"] = summarise_record_audit(metrics["record"])
        report = {"dataset": ctx.spec.name, "run_id": ctx.run_id, "profile": ctx.profile,
                  "thresholds": pt.model_dump(mode="json"), "gate_rules": audit.pop("gate_rules"), **metrics}
        ctx.store.write_json(report_uri, report)
        # Leak scan over every file that would be released, the privacy report itself included: one matcher
        # (ingest's compact identifier index plus the real keys) for every file.
        scan = None
        if scan_leaks and ctx.spec.operations.leak_scan_shards == 1:
            matcher = _leak_matcher(ctx, train, holdout[KEY], ingested, pt)
            scan = leak_scan(leak_scan_files(sampled, quality_summary, report_uri), matcher, ctx.store)
            del matcher
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
            **audit,
        })
        if scan is not None:
            m.update(_leak_figures(scan))
    if scan_leaks and ctx.spec.operations.leak_scan_shards > 1:  # the DAG runs these as tasks, the parts mapped
        units = plan_leak_scan(ctx, prepared, sampled, ingested, quality_summary, m)
        return with_leak_scan(ctx, m, merge_leak_scan(ctx, [leak_scan_part(ctx, u) for u in units]))
    return m


def _leak_figures(scan: dict) -> dict:
    return {"leak_clean": bool(scan["clean"]), "leak_hits": sum(h["count"] for h in scan["hits"])}


def leak_scan_files(sampled: SampleSummary, quality_summary: QualitySummary, privacy_report_uri: str) -> list[str]:
    """The files the privacy stage leak-scans: every file the release publishes but the data card (the gate
    renders, scans and audits the card itself)."""
    from synthfactory.synthesize.stages import extra_release_files

    return [sampled["synthetic_uri"], *extra_release_files(sampled).values(), quality_summary["report_uri"],
            privacy_report_uri]


def _leak_matcher(ctx: RunContext, train: Any, holdout_keys: Any, ingested: dict, pt: Any) -> Any:
    """The privacy stage's leak matcher: ingest's compact identifier index plus the real keys, one-word names
    of the real data's public vocabulary excused (:func:`synthfactory.privacy.leak.public_vocabulary`)."""
    from synthfactory.privacy.leak import LeakMatcher, public_vocabulary
    from synthfactory.synthesize.modelling import KEY

    return LeakMatcher.for_ingest(
        ingested["identifiers_uri"], ctx.store, extra=[*train[KEY], *holdout_keys],
        vocabulary=public_vocabulary(train, min_count=pt.min_k_anonymity,
                                     tables=(ingested.get("tables") or {}).values(), store=ctx.store))


def leak_scan_uri(ctx: RunContext) -> str:
    """Staging folder of the mapped leak scan's plan and matched-identifier files (removed by the merge)."""
    return ctx.uri("privacy", "leak_scan")


def plan_leak_scan(ctx: RunContext, prepared: PrepareSummary, sampled: SampleSummary, ingested: IngestSummary,
                   quality_summary: QualitySummary, privacy_summary: PrivacySummary, n: int | None = None) -> list[dict]:
    """Mapped leak scan, step 1 (``operations.leak_scan_shards`` > 1), once the privacy report is written: the
    work units (file URIs and, for big Parquet files, row-group ranges; no content) the DAG maps
    :func:`leak_scan_part` over (:func:`synthfactory.privacy.leak.plan_scan`), and the plan (files and the
    matcher's inputs) in staging."""
    from synthfactory.privacy.leak import plan_scan

    with _stage("leak_scan_plan", ctx) as m:
        files = leak_scan_files(sampled, quality_summary, privacy_summary["report_uri"])
        ctx.store.write_json(join(leak_scan_uri(ctx), "plan.json"), {
            "files": files, "identifiers_uri": ingested["identifiers_uri"],
            "tables": list((ingested.get("tables") or {}).values()),
            "train_uri": prepared["train_uri"], "holdout_uri": prepared["holdout_uri"]})
        units = plan_scan(files, ctx.store, n or ctx.spec.operations.leak_scan_shards)
        m.update({"files": len(files), "units": len(units)})
    return units


def leak_scan_part(ctx: RunContext, unit: dict) -> dict:
    """Mapped leak scan, step 2: scan one unit with a matcher built as the privacy stage builds it. Returns
    counts and identifier kinds only (:func:`synthfactory.privacy.leak.scan_part`)."""
    from synthfactory.privacy.leak import scan_part
    from synthfactory.synthesize.modelling import KEY

    with _stage("leak_scan_part", ctx) as m:
        plan = ctx.store.read_json(join(leak_scan_uri(ctx), "plan.json"))
        _, pt = ctx.spec.thresholds(ctx.profile)
        train = ctx.store.read_df(plan["train_uri"])
        holdout_keys = ctx.store.read_table(plan["holdout_uri"], columns=[KEY]).column(KEY).to_pylist()
        matcher = _leak_matcher(ctx, train, holdout_keys, {"identifiers_uri": plan["identifiers_uri"],
                                                           "tables": dict(enumerate(plan["tables"]))}, pt)
        del train
        part = scan_part(matcher, unit, ctx.store, join(leak_scan_uri(ctx), f"matched-{unit['index']}.json"))
        m.update({"unit": unit["index"], "hits": part["hit"]["count"] if part["hit"] else 0})
    return part


def merge_leak_scan(ctx: RunContext, parts: list[dict]) -> dict:
    """Mapped leak scan, step 3: the one-process scan's result from the parts
    (:func:`synthfactory.privacy.leak.merge_scan`)."""
    from synthfactory.privacy.leak import merge_scan

    with _stage("leak_scan_merge", ctx) as m:
        plan = ctx.store.read_json(join(leak_scan_uri(ctx), "plan.json"))
        scan = merge_scan(plan["files"], list(parts), ctx.store)
        m.update({"parts": len(parts), **_leak_figures(scan)})
    return scan


def with_leak_scan(ctx: RunContext, privacy_summary: PrivacySummary, scan: dict) -> PrivacySummary:
    """The privacy summary with the (merged) leak scan's figures, the scan written into the privacy report as
    the one-process stage writes it; then the mapped scan's staging folder is removed (last: a retried merge task
    still finds its plan and matched-hash files)."""
    report = ctx.store.read_json(privacy_summary["report_uri"])
    report["leak_scan"] = scan
    ctx.store.write_json(privacy_summary["report_uri"], report)
    ctx.store.remove_tree(leak_scan_uri(ctx))
    return {**privacy_summary, **_leak_figures(scan)}


def _record_privacy(ctx: RunContext, prepared: PrepareSummary, sampled: SampleSummary, pt: Any) -> dict:
    """Record-level privacy of the relational tables (:func:`synthfactory.privacy.records.record_audit`): the
    synthetic records against the real train patients' records, the held-out patients' as non-members. A
    prepare summary without the held-out records (from before they were kept) gives no record figures: the
    gate then refuses (``record.measured``)."""
    from synthfactory.privacy.records import record_audit

    uris, hold_uris = prepared.get("relational_uris") or {}, prepared.get("relational_holdout_uris") or {}
    syn_uris = sampled.get("tables") or {}
    names = [n for n in syn_uris if n in uris and n in hold_uris]
    if "patient" not in names:
        return {}
    read = lambda u: {n: ctx.store.read_df(u[n]) for n in names}  # noqa: E731
    return record_audit(read(uris), read(hold_uris), read(syn_uris), resplits=max(1, min(pt.reference_resplits, 10)),
                        bootstrap=pt.mia.bootstrap, seed=ctx.spec.synthesizer.seed)


def mia_options(pt: Any) -> dict:
    """The battery's cost knobs from ``privacy.mia`` (keyword arguments of privacy.mia.mia_battery)."""
    m = pt.mia
    return {"max_targets": m.max_targets, "bandwidth": m.bandwidth, "shadow_models": m.shadow_models,
            "shadow_targets": m.shadow_targets, "shadow_rows": m.shadow_rows, "bootstrap": m.bootstrap}


def _shadow_fit_sample(ctx: RunContext, train: Any, metadata: dict) -> Any:
    """The spec's synthesizer as the shadow attack trains it: the run's kind, the fit stage's parameters,
    transforms and constraints (None in relational mode, or for a table made elsewhere (``audit``) whose
    synthesizer is unknown: the attack is then skipped, and says so)."""
    from synthfactory.privacy.mia import spec_fit_sample
    from synthfactory.synthesize import stages
    from synthfactory.synthesize.constraints import sdv_constraints

    spec = ctx.spec.synthesizer
    kind = ctx.synthesizer_kind
    if spec.mode == "relational" or kind not in kinds.KINDS:
        return None
    params = stages._params(ctx, {})
    constraints = ([] if kind in kinds.DP or kind == kinds.ARGN
                   else sdv_constraints(spec.constraints, train, "patients"))
    return spec_fit_sample(kind, params, metadata, transforms=spec.transforms_for(kind), constraints=constraints)


def _privacy_audit_figures(metrics: dict, pt: Any) -> dict:
    """Headline re-identification figures for the gate (XCom-sized; the report keeps the detail), and
    the rule the gate applies to each anonymeter risk with a plain-language note (``gate_rules``)."""
    from synthfactory.release.gate import anonymeter_rule, expected_anonymeter_risks

    r4 = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
    mia = metrics["mia"]
    out: dict[str, Any] = {
        "mia_auc": r4(mia["auc"]),
        "mia_auc_ci": [r4(v) for v in mia["auc_ci"]],
        "nndr_synth_median": r4(metrics["dcr"]["nndr_synth_median"]),
        "nndr_holdout_median": r4(metrics["dcr"]["nndr_holdout_median"]),
    }
    qi = metrics.get("quasi_identifiers") or {}
    if "rare_combination_share" in qi:  # descriptive only (not gated)
        out["rare_combination_share"] = r4(qi["rare_combination_share"])
        out["holdout_rare_combination_share"] = r4(qi["holdout_rare_combination_share"])
        out["k_anonymity"] = qi["synthetic_k_anonymity"]
    rr = metrics.get("rare_record_mia") or {}
    if pt.quasi_identifiers:
        out["rare_record_mia_status"] = rr.get("status", "skipped")
        out["rare_record_mia_auc"] = r4(rr.get("auc"))
        out["rare_record_mia_se"] = r4(rr.get("auc_se"))
        out["rare_record_members"] = rr.get("members")
        out["rare_record_nonmembers"] = rr.get("nonmembers")
        if rr.get("reason"):
            out["rare_record_mia_reason"] = rr["reason"]
    ref = metrics.get("reference") or {}
    if "skipped" not in ref:  # what fresh real rows score (mean, sd, tails), for the gate and the card
        out["reference"] = {k: {s: r4(v[s]) for s in ("mean", "sd", "p05", "p95") if s in v}
                            for k, v in ref.items() if isinstance(v, dict) and "mean" in v}
        out["reference"]["resplits"] = ref.get("resplits")
    battery = metrics.get("mia_battery") or {}
    if "attacks" in battery:
        from synthfactory.privacy.mia import summarise_battery
        from synthfactory.release.gate import mia_rule

        mb = summarise_battery(battery, metrics.get("reference"))
        out["mia_battery"] = mb
        out["mia_max_auc"] = mb.get("max_auc")
        out["mia_max_tpr_at_fpr_01"] = mb.get("max_tpr_at_fpr_01")
        out["mia_max_tpr_at_fpr_10"] = mb.get("max_tpr_at_fpr_10")
        out["mia_certified"] = mia_rule(mb, pt)["certified"]
    sdm = metrics.get("sdmetrics_dcr_baseline_protection")
    if sdm:
        out["sdmetrics_dcr_baseline_protection"] = r4(sdm["score"])
    risks = (metrics.get("anonymeter") or {}).get("risks") or {}
    summary: dict[str, dict] = {}
    rules: dict[str, dict] = {}
    for name in expected_anonymeter_risks(pt):
        r = risks.get(name)
        if r is None or r.get("risk") is None:
            summary[name] = {"risk": None, "ci_low": None, "ci_high": None, "error": None,
                             "n": (r or {}).get("n_attacks", 0)}
        else:
            summary[name] = {"risk": r4(r["risk"]), "ci_low": r4(r["ci"][0]), "ci_high": r4(r["ci"][1]),
                             "error": r4(r["error"]), "n": int(r["n_attacks"])}
        rule = anonymeter_rule(summary[name], pt)
        s = summary[name]
        if s["risk"] is None:
            note = "not measured"
        elif rule["powered"]:
            note = (f"{s['n']} attacks, 95 % CI [{s['ci_low']:.3f}, {s['ci_high']:.3f}]: upper end checked "
                    f"against {pt.max_anonymeter_risk}; " + ("certified" if rule["certified"] else "not certified"))
        else:
            why = (f"fewer than {pt.anonymeter_min_attacks} attacks" if s["n"] < pt.anonymeter_min_attacks
                   else f"half-width {s['error']:.3f} > {pt.max_anonymeter_risk / 2:.3f}")
            note = (f"{s['n']} attacks, 95 % CI [{s['ci_low']:.3f}, {s['ci_high']:.3f}] ({why}): too few records "
                    f"for the gate to rely on the upper end; only the lower end is checked against "
                    f"{pt.max_anonymeter_risk} (refuses on significant evidence of risk); "
                    + ("certified all the same (upper end within the threshold)" if rule["certified"]
                       else "not certified"))
        rules[name] = {**rule, "threshold": pt.max_anonymeter_risk, "note": note}
    if summary:
        out["anonymeter_risks"] = summary
        out["anonymeter_certified"] = all(r["certified"] for r in rules.values())
    out["gate_rules"] = {"anonymeter": rules}
    return out


# -- 7. gate --------------------------------------------------------------------------------------
def release_files(sampled: SampleSummary, quality_summary: QualitySummary, privacy_summary: PrivacySummary,
                  gated: GateSummary | None = None) -> dict[str, str]:
    """Release-relative path -> staging URI of every file a release publishes (the data card once the gate
    has written it: pass the gate summary)."""
    from synthfactory.synthesize.stages import extra_release_files

    files = {RELEASE_DATA: sampled["synthetic_uri"], RELEASE_QUALITY: quality_summary["report_uri"],
             RELEASE_PRIVACY: privacy_summary["report_uri"]}
    files.update(extra_release_files(sampled))  # data/<table>.parquet, reports/synthesis.json, fhir/<Type>.ndjson
    if gated and gated.get("datacard_uri"):
        files[RELEASE_DATACARD] = gated["datacard_uri"]
    return files


def _datacard(ctx: RunContext, decision: dict, sampled: dict, quality_summary: dict, privacy_summary: dict,
              ingested: dict | None, frames: dict) -> str:
    """Render the data card HTML for ``decision`` (pure renderer over the stage reports and tables)."""
    from synthfactory.quality.datacard import render_datacard
    from synthfactory.release.publish import code_version
    from synthfactory.synthesize.engine import SYNTHETIC_ID
    from synthfactory.synthesize.modelling import KEY

    if "real" not in frames:
        frames["real"] = ctx.store.read_df(ctx.train_uri).drop(columns=[KEY], errors="ignore")
        frames["synthetic"] = ctx.store.read_df(sampled["synthetic_uri"]).drop(columns=[SYNTHETIC_ID],
                                                                                 errors="ignore")
        frames["quality_report"] = ctx.store.read_json(quality_summary["report_uri"])
        frames["plot_cache"] = {}
        frames["dictionary"] = ctx.store.read_json(columns_uri(ctx)) if ctx.store.exists(columns_uri(ctx)) else None
        report = ctx.store.read_json(privacy_summary["report_uri"]) if privacy_summary.get("report_uri") else {}
        frames["privacy_notes"] = (report.get("gate_rules") or {}).get("anonymeter")
    kind = ctx.synthesizer_kind
    params = ctx.spec.synthesizer.params if kind == ctx.spec.synthesizer.kind else {}
    synthesizer = {"kind": kind, "params": params, "seed": ctx.spec.synthesizer.seed,
                   "holdout_fraction": ctx.spec.synthesizer.holdout_fraction}
    if sampled.get("synthesis_report_uri"):  # a DP fit: its ε/δ and the dataset's budget after it (budget.py)
        fit = ctx.store.read_json(sampled["synthesis_report_uri"]).get("fit") or {}
        if fit.get("dp_budget"):
            synthesizer["dp_budget"] = {**fit["dp_budget"], "epsilon": (fit.get("dp") or {}).get("epsilon"),
                                        "delta": (fit.get("dp") or {}).get("delta")}
    lineage = {"extract_sha256": (ingested or {}).get("extract_sha256"), "spec_sha256": ctx.spec.spec_hash(),
               "code_versions": code_version(), "run_id": ctx.run_id}
    if (ingested or {}).get("reused_from_run"):
        lineage["ingest reused from run"] = ingested["reused_from_run"]
    return render_datacard(
        dataset=ctx.spec.name, version=ctx.version, run_id=ctx.run_id, decision=decision,
        quality_report=frames["quality_report"], quality_summary=quality_summary, privacy_summary=privacy_summary,
        real=frames["real"], synthetic=frames["synthetic"], synthesizer=synthesizer, lineage=lineage,
        rows={"synthetic": sampled.get("rows"), "real": quality_summary.get("rows_real"),
              "holdout": quality_summary.get("rows_holdout")},
        description=ctx.spec.description, generated_at=decision.get("decided_at"), plot_cache=frames["plot_cache"],
        about={"intended_use": ctx.spec.intended_use, "owner": ctx.spec.owner, "contact": ctx.spec.contact,
               "licence": ctx.spec.licence},
        dictionary={**(frames["dictionary"] or {}), "id_columns": [SYNTHETIC_ID]},
        privacy_thresholds=ctx.spec.thresholds(ctx.profile)[1].model_dump(mode="json"),
        privacy_notes=frames["privacy_notes"])


def _card_matcher(ctx: RunContext, ingested: dict | None, vocabulary: set) -> Any:
    """The leak matcher of the identifiers the privacy stage scans for (ingest's compact identifier index and
    the real HMAC keys), built once for the gate task, or None when the ingest summary is not available."""
    from synthfactory.privacy.leak import LeakMatcher
    from synthfactory.synthesize.modelling import KEY

    if not (ingested or {}).get("identifiers_uri"):
        return None
    keys: list = []
    for uri in (ctx.train_uri, ctx.holdout_uri):
        keys += ctx.store.read_table(uri, columns=[KEY]).column(KEY).to_pylist()
    return LeakMatcher.for_ingest(ingested["identifiers_uri"], ctx.store, extra=keys, vocabulary=vocabulary)


def gate(ctx: RunContext, sampled: SampleSummary, quality_summary: QualitySummary,
         privacy_summary: PrivacySummary, ingested: IngestSummary | None = None) -> GateSummary:
    """Decide, then render the data card showing the decision, leak-scan it (a dirty or unscannable card
    refuses the run) and add it to the audited files. On refusal, quarantine the run's outputs (the card
    included) in staging with the reasons and raise GateRefused. ``ingested`` (the ingest summary) gives the
    card its extract sha256 and the leak scan its identifier list.

    The release's other files were leak-scanned before, by the privacy stage or, with
    ``operations.leak_scan_shards`` > 1, by the mapped scan merged into the privacy summary the gate reads here
    (``leak_clean``); the card exists only once the decision is made, so its scan stays here, in this task."""
    from synthfactory.privacy.leak import leak_scan, public_vocabulary
    from synthfactory.release.gate import GateRefused, decide
    from synthfactory.release.publish import sha256_bytes
    from synthfactory.release.signing import sign

    with _stage("gate", ctx) as m:
        key = signing_key(ctx)  # first: a deployment without a key fails before the work
        qt, pt = ctx.spec.thresholds(ctx.profile)
        files = release_files(sampled, quality_summary, privacy_summary)
        audited = {rel: sha256_bytes(ctx.store.read_bytes(uri)) for rel, uri in files.items()}
        stamp = {"dataset": ctx.spec.name, "run_id": ctx.run_id, "version": ctx.version,
                 "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        decision = {**decide(quality_summary, privacy_summary, qt, pt, audited, profile=ctx.profile), **stamp}
        # The card shows the decision, and the decision carries the card's leak scan: render, scan, decide again
        # with the scan as a privacy check, render the final card and scan that too.
        card_uri = ctx.uri("reports", "datacard.html")
        frames: dict = {}
        scan: dict = {"clean": None, "hits": []}
        matcher = None
        for i in range(2):
            html = _datacard(ctx, decision, sampled, quality_summary, privacy_summary, ingested, frames)
            ctx.store.write_bytes(card_uri, html.encode("utf-8"))
            if i == 0:  # one matcher for both scans; the real table the card was rendered from gives the vocabulary
                matcher = _card_matcher(ctx, ingested, public_vocabulary(
                    frames["real"], min_count=pt.min_k_anonymity,
                    tables=((ingested or {}).get("tables") or {}).values(), store=ctx.store))
            if matcher is not None:
                scan = leak_scan([card_uri], matcher, ctx.store)
            card_check = {"gate": "privacy", "name": "datacard_leak_scan_clean", "value": scan["clean"], "op": "==",
                          "threshold": True, "passed": scan["clean"] is True}
            extra = [*privacy_summary.get("extra_checks", []), card_check]
            decision = {**decide(quality_summary, {**privacy_summary, "extra_checks": extra}, qt, pt, audited,
                                 profile=ctx.profile), **stamp}
        if matcher is None:
            log.error("gate: no ingest summary, so the data card could not be leak-scanned; refusing")
        decision["audited_files"] = dict(sorted({**audited, RELEASE_DATACARD: sha256_bytes(
            ctx.store.read_bytes(card_uri))}.items()))
        decision["datacard_leak_scan"] = {"clean": scan["clean"], "hits": scan.get("hits", [])}
        files[RELEASE_DATACARD] = card_uri
        decision = sign(decision, "decision", key)  # the publisher refuses it edited, unsigned or copied
        decision_uri = ctx.uri("gate", "decision.json")
        ctx.store.write_json(decision_uri, decision)
        m.update({"approved": decision["approved"], "decision_uri": decision_uri, "message": decision["message"],
                  "datacard_uri": card_uri})
        if not decision["approved"]:
            for rel, uri in files.items():
                ctx.store.write_bytes(join(ctx.quarantine_uri, rel), ctx.store.read_bytes(uri))
            ctx.store.write_json(join(ctx.quarantine_uri, "reasons.json"), decision)
            m["quarantine_datacard_uri"] = join(ctx.quarantine_uri, RELEASE_DATACARD)
            log.error("dataset %s run %s quarantined at %s: %s", ctx.spec.name, ctx.run_id, ctx.quarantine_uri,
                      decision["message"])
            raise GateRefused(f"{ctx.spec.name}: {decision['message']}", decision)
    return m


def signing_key(ctx: RunContext) -> bytes:
    """The release signing key of the run (see :func:`synthfactory.release.signing.resolve_signing_key`)."""
    from synthfactory.release.signing import resolve_signing_key

    return resolve_signing_key(ctx.signing_key, str(ctx.staging_root))


# -- 7b. human approval (optional: release.require_approval) ----------------------------------------
def approval_uri(ctx: RunContext) -> str:
    return ctx.uri("gate", "approval.json")


def quarantine(ctx: RunContext, files: dict[str, str], record: dict) -> str:
    """Copy a run's would-be release files and ``reasons.json`` (``record``) to the staging quarantine area."""
    for rel, uri in files.items():
        ctx.store.write_bytes(join(ctx.quarantine_uri, rel), ctx.store.read_bytes(uri))
    ctx.store.write_json(join(ctx.quarantine_uri, "reasons.json"), record)
    return ctx.quarantine_uri


def review(ctx: RunContext, gated: GateSummary, sampled: SampleSummary, quality_summary: QualitySummary,
           privacy_summary: PrivacySummary, *, approved: bool, reviewer: str | None = None, reason: str = "",
           timed_out: bool = False) -> ReviewSummary:
    """Record a human reviewer's answer on a gate-approved run in ``gate/approval.json``. The approval is bound
    to the audited file hashes (the publisher checks them). A rejection, or no answer before the timeout,
    quarantines the run with the reasons, as a gate refusal does."""
    from synthfactory.release.signing import sign

    with _stage("review", ctx) as m:
        key = signing_key(ctx)
        decision = ctx.store.read_json(gated["decision_uri"])
        # the reviewer answers on the gate's own decision: an edited or copied one is refused (PublishRefused)
        _verified(decision, "decision", key, ctx)
        record = {"approved": bool(approved), "reviewer": reviewer, "reason": reason or "", "timed_out": timed_out,
                  "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "dataset": ctx.spec.name, "run_id": ctx.run_id, "version": ctx.version,
                  "audited_files": decision.get("audited_files"),
                  "decision_signature": decision["signature"]["value"]}
        record = sign(record, "approval", key)  # bound to this run, this decision and its hashes
        uri = approval_uri(ctx)
        ctx.store.write_json(uri, record)
        files = release_files(sampled, quality_summary, privacy_summary, gated)
        m.update({"approved": bool(approved), "approval_uri": uri, "timed_out": timed_out})
        if not approved:
            why = ("no reviewer answered before the approval timeout (defaulted to Reject)" if timed_out
                   else f"rejected by {reviewer or 'a reviewer'}: {reason or 'no reason given'}")
            message = f"release review: {why}"
            quarantine(ctx, files, {**decision, "approved": False, "message": message, "failed": [message],
                                    "review": record})
            m.update({"quarantine_uri": ctx.quarantine_uri, "message": message})
            log.error("dataset %s run %s quarantined at %s: %s", ctx.spec.name, ctx.run_id, ctx.quarantine_uri,
                      message)
    return m


def _verified(record: dict, kind: str, key: bytes, ctx: RunContext) -> dict:
    """``record`` when its signature verifies for this run, else PublishRefused (exit 5, never retried)."""
    from synthfactory.release.publish import PublishRefused
    from synthfactory.release.signing import SignatureRefused, verify

    try:
        return verify(record, kind, key, dataset=ctx.spec.name, version=ctx.version, run_id=ctx.run_id)
    except SignatureRefused as err:
        raise PublishRefused(str(err).replace("refusing to publish", "refusing to record an approval")) from None


# -- 8. release -----------------------------------------------------------------------------------
def release_key_prefix(ctx: RunContext) -> str:
    """``<prefix>/<dataset>/<version>``: this run's version folder in the sandbox (see release.layout)."""
    from synthfactory.release.layout import SandboxLayout

    return SandboxLayout.for_spec(ctx.spec).release_prefix(ctx.version)


def release(ctx: RunContext, gated: GateSummary, sampled: SampleSummary, quality_summary: QualitySummary,
            privacy_summary: PrivacySummary, ingested: IngestSummary, writer: Any) -> ReleaseSummary:
    from synthfactory.release.publish import publish

    with _stage("release", ctx) as m:
        decision = ctx.store.read_json(gated["decision_uri"])
        files = release_files(sampled, quality_summary, privacy_summary, gated)
        extra = {
            "dataset": ctx.spec.name,
            "version": ctx.version,
            "run_id": ctx.run_id,
            "synthetic": True,
            "rows": sampled["rows"],
            "synthesizer": ctx.synthesizer_kind,
            "description": ctx.spec.description,
            "intended_use": ctx.spec.intended_use or None,
            "owner": ctx.spec.owner,
            "contact": ctx.spec.contact,
            "licence": ctx.spec.licence,
            "spec_sha256": ctx.spec.spec_hash(),
            "source_extract_sha256": ingested["extract_sha256"],
            "figures": {
                "quality_score": quality_summary["quality_score"],
                "expectation_success_ratio": quality_summary["expectation_success_ratio"],
                "min_column_score": quality_summary.get("min_column_score"),
                "column_pair_trends": quality_summary.get("column_pair_trends"),
                "relationships": {k: v.get("max_excess") for k, v in (quality_summary.get("relationships") or {}).items()},
                "utility_ratio": quality_summary.get("utility_ratio"),
                "exact_match_rate": privacy_summary["exact_match_rate"],
                "dcr_share": privacy_summary["dcr_share"],
                "dcr_ratio": privacy_summary["dcr_ratio"],
                "leak_clean": privacy_summary["leak_clean"],
                "mia_auc": privacy_summary.get("mia_auc"),
                "rare_record_mia_auc": privacy_summary.get("rare_record_mia_auc"),
                "anonymeter_risks": privacy_summary.get("anonymeter_risks"),
                "anonymeter_certified": privacy_summary.get("anonymeter_certified"),
            },
            "synthfactory_version": __version__,
        }
        rs = ctx.spec.release
        approval = None
        if rs.require_approval and ctx.store.exists(approval_uri(ctx)):
            approval = ctx.store.read_json(approval_uri(ctx))
        out = publish(files, decision=decision, store=ctx.store, writer=writer,
                      key_prefix=release_key_prefix(ctx), manifest_extra=extra, run_id=ctx.run_id,
                      keep_versions=rs.keep_versions, approval=approval, require_approval=rs.require_approval,
                      signing_key=signing_key(ctx))
        m.update({**out, "version": ctx.version})
    return m


def run_all(ctx: RunContext, writer: Any) -> RunSummary:
    """Run every stage in order (the CLI path). Raises GateRefused when a gate refuses."""
    ingested = ingest(ctx)
    prepared = prepare(ctx, ingested)
    fitted = fit(ctx, prepared)
    sampled = sample(ctx, fitted, prepared)
    q = quality(ctx, prepared, sampled)
    p = privacy(ctx, prepared, sampled, ingested, q)
    g = gate(ctx, sampled, q, p, ingested)
    r = release(ctx, g, sampled, q, p, ingested, writer)
    return {"ingest": ingested, "prepare": prepared, "fit": fitted, "sample": sampled, "quality": q,
            "privacy": p, "gate": g, "release": r}
