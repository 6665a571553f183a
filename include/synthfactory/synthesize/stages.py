"""The fit and sample stages' synthesis work (``pipeline.fit`` / ``pipeline.sample`` call these).

Both modes share the staging layout ``<run>/{model,synthetic,reports}/``:

* ``mode: patient_table`` (default): one model over ``model/train.parquet``; ``synthetic/patients.parquet``.
* ``mode: relational``: the whole patient record (:mod:`synthfactory.synthesize.relational`) from the
  training patients' flattened tables (``model/relational/<table>.parquet``, written by prepare);
  ``synthetic/<table>.parquet`` per table, and ``synthetic/patients.parquet`` is the patient-level table
  *derived from the synthetic record* with the same code as the real one, so the quality and privacy stages
  compare like with like.

``reports/synthesis.json`` records what was done: synthesizer, device, epochs (and a resume), ε/δ of the DP
kinds, constraints and how many rows each fix touched, the rebalance/oversample target and what was
achieved, and in relational mode referential integrity, children-per-parent KS and timing per table. It
holds aggregates only, never rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from synthfactory import kinds

log = logging.getLogger(__name__)

PATIENT_TABLE = "patients.parquet"
REPORT = ("reports", "synthesis.json")


# -- fit ------------------------------------------------------------------------------------------
def _flag_concepts(ctx: Any) -> list:
    """The spec's condition concepts (``features.conditions``) and the condition of ``quality.trajectory``: their
    codes become patient flags, so the patient model decides who has the condition and every table is drawn
    given it (labs, their counts and values). Before, only the most prevalent codes were flags: on clinosim
    (flags E78.5, I10, E66.9) a type 2 diabetes row was drawn by the condition table alone, and 20-42 % of the
    synthetic diabetics had an HbA1c against 97-100 % of the real ones (12-23 % of non-diabetics against
    0.1-0.9 %)."""
    out = list(ctx.spec.features.conditions)
    tr = ctx.spec.quality.trajectory
    if tr is not None:
        concept = tr.resolve(ctx.spec.features)[1]
        if all(c.name != concept.name for c in out):
            out.append(concept)
    return out


def _params(ctx: Any, m: dict) -> dict:
    spec = ctx.spec.synthesizer
    kind = ctx.synthesizer_kind
    params = dict(spec.params) if kind == spec.kind else {}
    if kind in kinds.NEURAL:
        epochs = ctx.epochs or spec.epochs or params.get("epochs")
        if epochs:
            params["epochs"] = int(epochs)
        if spec.batch_size:
            params["batch_size"] = int(spec.batch_size)
    elif ctx.epochs:
        log.info("stage=fit epochs=%d ignored: %s is not trained in epochs", ctx.epochs, kind)
    if kind in kinds.DP:
        params = {**spec.dp.model_dump(exclude_none=True), **params}
    if kind == kinds.ARGN:
        epochs = ctx.epochs or spec.epochs
        if epochs:
            params["epochs"] = int(epochs)
        if spec.batch_size:
            params.setdefault("batch_size", int(spec.batch_size))
        if spec.time_budget_s:
            params.setdefault("max_minutes", spec.time_budget_s / 60.0)
        params.setdefault("seed", spec.seed)
    if "epochs" in params:
        m["epochs"] = int(params["epochs"])
    return params


def _charge_budget(ctx: Any, kind: str, params: dict, rows: int) -> dict:
    """Fix δ (the spec's, else 1/(n·√n)) and charge ε, δ to the dataset's privacy budget ledger (budget.py)."""
    import math

    from synthfactory.synthesize import budget

    if params.get("delta") is None:
        params["delta"] = 1.0 / (rows * math.sqrt(rows))
    return budget.charge(ctx.store, str(ctx.staging_root), ctx.spec.name, ctx.run_id,
                         epsilon=float(params.get("epsilon", 3.0)), delta=float(params["delta"]), kind=kind,
                         budget=ctx.spec.privacy.dp_budget)


def _fingerprint(ctx: Any, uris: list[str], kind: str, params: dict, extra: Any = None) -> str:
    h = hashlib.sha256()
    for uri in uris:
        h.update(ctx.store.read_bytes(uri))
    h.update(json.dumps([kind, params, extra], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _plan(ctx: Any, kind: str, params: dict, fingerprint: str) -> Any:
    from synthfactory.synthesize.training import TrainPlan

    if kind not in kinds.NEURAL:
        return None
    spec = ctx.spec.synthesizer
    return TrainPlan(epochs=int(params.get("epochs", 300)), checkpoint_uri=ctx.uri("model", "checkpoint"),
                     store=ctx.store, checkpoint_every=spec.checkpoint_every, time_budget_s=spec.time_budget_s,
                     fingerprint=fingerprint, seed=spec.seed)


def fit_model(ctx: Any, prepared: dict, m: dict) -> None:
    from synthfactory.synthesize import engine
    from synthfactory.synthesize.constraints import sdv_constraints
    from synthfactory.synthesize.device import detect_device
    from synthfactory.synthesize.modelling import KEY

    spec = ctx.spec.synthesizer
    kind = ctx.synthesizer_kind
    if kind == kinds.ARGN and kind != spec.kind:  # chosen at trigger time: the spec's checks did not see it
        from synthfactory.spec import SpecError, SynthesizerSpec

        try:
            SynthesizerSpec.model_validate({**spec.model_dump(), "kind": kind})
        except ValueError as err:  # pydantic's ValidationError: keep its messages, not its input dump
            errors = err.errors() if hasattr(err, "errors") else []
            why = "; ".join(e["msg"].removeprefix("Value error, ") for e in errors) or str(err)
            raise SpecError(f"synthesizer {kind} chosen for this run: {why}") from None
    params = _params(ctx, m)
    model_uri = ctx.uri("model", "synthesizer.pkl")
    device = detect_device(log_warning=False) if kind in kinds.GPU_CAPABLE else "cpu"
    if spec.mode == "relational":
        from synthfactory.synthesize import relational

        uris = prepared["relational_uris"]
        rel = spec.relational
        plan = _plan(ctx, kind, params, _fingerprint(ctx, list(uris.values()), kind, params, rel.model_dump()))
        tables = {name: ctx.store.read_df(uri) for name, uri in uris.items()}
        if rel.tables:
            tables = {k: v for k, v in tables.items() if k == relational.ROOT or k in rel.tables}
        t0 = time.perf_counter()
        model = relational.fit(tables, engine=rel.engine, root_kind=kind, root_params=params,
                               child_kind=rel.child_kind, child_params=rel.child_params, flags_top=rel.flags_top,
                               age_band_years=rel.age_band_years, reference=prepared.get("reference_date"),
                               plan=plan, par_epochs=rel.par_epochs, constraint_specs=spec.constraints,
                               seed=spec.seed, flag_concepts=_flag_concepts(ctx),
                               count_codes=tuple(code for lab in ctx.spec.features.labs for code in lab.loinc))
        seconds = time.perf_counter() - t0
        size = engine.save(model, model_uri, ctx.store)
        m.update({"mode": "relational", "engine": rel.engine, "tables": sorted(tables),
                  "fit_seconds_by_table": model.fit_seconds, "rows_train": len(tables[relational.ROOT])})
        train_info = model.train_info
    else:
        train = ctx.store.read_df(prepared["train_uri"]).drop(columns=[KEY])
        metadata = ctx.store.read_json(prepared["metadata_uri"])
        constraints = [] if kind in kinds.DP or kind == kinds.ARGN else sdv_constraints(spec.constraints, train,
                                                                                          "patients")
        plan = _plan(ctx, kind, params, _fingerprint(ctx, [prepared["train_uri"]], kind, params, metadata))
        transforms = spec.transforms_for(kind)
        table_plan = ctx.store.read_json(prepared["table_plan_uri"]) if prepared.get("table_plan_uri") else None
        if kind in kinds.DP:  # charged to the dataset's budget before the mechanism sees the data (or refused)
            m["dp_budget"] = _charge_budget(ctx, kind, params, len(train))
        synth, seconds = engine.fit(train, kind, params, metadata, plan=plan, constraints=constraints,
                                    transforms=transforms, seed=spec.seed,
                                    column_types=(table_plan or {}).get("types"))
        size = engine.save(synth, model_uri, ctx.store)
        m.update({"mode": "patient_table", "rows_train": len(train), "transforms": transforms})
        if hasattr(synth, "transformer"):
            m["transformed_columns"] = synth.transformer.summary()
        train_info = dict(plan.info) if plan is not None else {}
        if kind in kinds.DP:
            m["dp"] = synth.privacy
        if kind == kinds.ARGN:
            device = synth.fit_info.get("device", "cpu")
            m["engine"] = "mostlyai-engine TabularARGN (isolated interpreter)"
            if synth.fit_info.get("epochs") is not None:
                m["epochs"] = synth.fit_info["epochs"]
    if plan is not None and plan.checkpointing:
        ctx.store.remove_tree(plan.checkpoint_uri)  # the model is saved: a retry of fit need not resume
    m.update({"model_uri": model_uri, "synthesizer": kind, "fit_seconds": round(seconds, 3), "model_bytes": size,
              "device": train_info.get("device", device), "constraints": len(spec.constraints)})
    if train_info:
        m["training"] = {k: v for k, v in train_info.items() if v is not None}


# -- sample ---------------------------------------------------------------------------------------
def _target(ctx: Any, prepared: dict, rename: dict[str, str] | None = None) -> Any:
    from synthfactory.synthesize.conditional import ConditionalError, plan_target

    spec = ctx.spec.synthesizer
    block = spec.rebalance or spec.oversample
    if block is None:
        return None
    try:
        col = ctx.store.read_df(prepared["train_uri"], columns=[block.column])[block.column]
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for an unknown column
        raise ConditionalError(f"synthesizer.{'rebalance' if spec.rebalance else 'oversample'}.column: "
                               f"{block.column!r} is not a column of the patient table") from err
    target = plan_target(col, rebalance=spec.rebalance.model_dump() if spec.rebalance else None,
                         oversample=spec.oversample.model_dump() if spec.oversample else None)
    if rename and block.column in rename:
        target.column = rename[block.column]
    return target


def _pii_columns(metadata: dict) -> list[str]:
    cols = next(iter(metadata["tables"].values()))["columns"]
    return [c for c, meta in cols.items() if meta.get("pii")]


def _pii_guard(real: dict[str, set], counts: dict[str, int]) -> Any:
    """PII columns get synthetic (Faker) values from SDV; a value that equals a real one is replaced (counted)."""
    def fix(df: pd.DataFrame) -> pd.DataFrame:
        for col, values in real.items():
            if col not in df:
                continue
            copy = df[col].isin(values)
            if copy.any():
                df.loc[copy, col] = [f"pii-{hashlib.sha256(f'{col}{i}'.encode()).hexdigest()[:12]}"
                                     for i in range(int(copy.sum()))]
            counts[f"pii_{col}_copies_replaced"] = counts.get(f"pii_{col}_copies_replaced", 0) + int(copy.sum())
        return df

    return fix


def sample_model(ctx: Any, fitted: dict, prepared: dict, m: dict) -> None:
    if ctx.spec.synthesizer.mode == "relational":
        _sample_relational(ctx, fitted, prepared, m)
    else:
        _sample_patient_table(ctx, fitted, prepared, m)


def _write_report(ctx: Any, report: dict) -> str:
    uri = ctx.uri(*REPORT)
    ctx.store.write_json(uri, {"dataset": ctx.spec.name, "run_id": ctx.run_id, **report})
    return uri


def _fit_summary(fitted: dict) -> dict:
    keys = ("synthesizer", "mode", "engine", "fit_seconds", "fit_seconds_by_table", "device", "epochs", "training",
            "dp", "dp_budget", "rows_train", "model_bytes", "transforms", "transformed_columns")
    return {k: fitted[k] for k in keys if k in fitted}


def _sample_patient_table(ctx: Any, fitted: dict, prepared: dict, m: dict) -> None:
    from synthfactory.synthesize import engine
    from synthfactory.synthesize.conditional import conditional_sampler
    from synthfactory.synthesize.constraints import bounded_sampler, bounds_for

    spec = ctx.spec.synthesizer
    t0 = time.perf_counter()
    synth = engine.load(fitted["model_uri"], ctx.store)
    engine.reseed(synth, spec.seed)  # synthesizer.seed reaches the draw: same seed, same rows
    rows = int(ctx.rows or spec.rows or prepared["rows_train"])
    target = _target(ctx, prepared)
    fixes: dict[str, int] = {}
    sampler = conditional_sampler(target, seed=spec.seed) if target else None
    sampler = bounded_sampler(sampler or (lambda s, n: engine.sample_plain(s, n)),
                              bounds_for(spec.constraints, "patients"), fixes) \
        if bounds_for(spec.constraints, "patients") else sampler
    table_plan = ctx.store.read_json(prepared["table_plan_uri"]) if prepared.get("table_plan_uri") else None
    if table_plan is not None:  # a flat table: its logic rules kept, its own dtypes (synthesize/flat.py)
        from synthfactory.synthesize.flat import rule_sampler

        sampler = rule_sampler(sampler or (lambda s, n: engine.sample_plain(s, n)), table_plan, fixes)
    pii = _pii_columns(ctx.store.read_json(prepared["metadata_uri"]))
    guard = None
    if pii:
        real = ctx.store.read_df(prepared["train_uri"], columns=pii)
        guard = _pii_guard({c: set(real[c].dropna()) for c in pii}, fixes)

    def post(df: pd.DataFrame) -> pd.DataFrame:
        if guard:
            df = guard(df)
        if target:
            target.record(df)
        return df

    uri = ctx.uri("synthetic", PATIENT_TABLE)
    out = engine.sample_to_parquet(synth, rows, uri, ctx.store, batch_size=spec.sample_batch_size,
                                   sampler=sampler, postprocess=post)
    report = {"mode": "patient_table", "fit": _fit_summary(fitted), "rows": out["rows"],
              "sample_seconds": round(time.perf_counter() - t0, 3), "sample_batches": out["batches"],
              "constraints": [c.model_dump(exclude_none=True) for c in spec.constraints], "fixes": fixes,
              "pii_columns": pii}
    if table_plan is not None:
        from synthfactory.synthesize.flat import rules_of

        report["table_rules"] = [{"rule": r.describe(), "source": r.source} for r in rules_of(table_plan)]
        m["table_rules"] = len(report["table_rules"])
    if target:
        report["conditional"] = target.report()
        m["conditional"] = {"column": target.column, "mode": target.mode,
                            "achieved": report["conditional"]["achieved"]}
    m.update({"synthetic_uri": uri, "rows": out["rows"], "synthesis_report_uri": _write_report(ctx, report)})
    if fixes:
        m["fixes"] = fixes


# -- relational -----------------------------------------------------------------------------------
def _align(derived: pd.DataFrame, columns: list[str], dtypes: dict[str, Any]) -> pd.DataFrame:
    """The synthetic patient-level table with exactly the real train table's columns and types."""
    out = pd.DataFrame(index=derived.index)
    for c in columns:
        dt = dtypes[c]
        if c in derived:
            s = derived[c]
        elif pd.api.types.is_bool_dtype(dt):
            s = pd.Series(False, index=derived.index)
        elif pd.api.types.is_integer_dtype(dt):
            s = pd.Series(0, index=derived.index)
        elif pd.api.types.is_float_dtype(dt):
            s = pd.Series(np.nan, index=derived.index)
        else:
            s = pd.Series(None, index=derived.index, dtype=object)
        try:
            s = s.astype(dt)
        except (TypeError, ValueError):
            pass
        out[c] = s
    return out


def _sample_relational(ctx: Any, fitted: dict, prepared: dict, m: dict) -> None:
    from synthfactory.synthesize import engine, relational
    from synthfactory.synthesize.conditional import conditional_sampler
    from synthfactory.synthesize.engine import SYNTHETIC_ID, ParquetSink
    from synthfactory.spec import condition_column
    from synthfactory.synthesize.modelling import KEY, build_modelling_table

    spec = ctx.spec.synthesizer
    t0 = time.perf_counter()
    model = engine.load(fitted["model_uri"], ctx.store)
    patients = int(ctx.rows or spec.rows or prepared["rows_train"])
    rename = {condition_column(c): relational.flag_column(c) for c in model.layout.flags}
    target = _target(ctx, prepared, rename)
    orig_col = (spec.rebalance or spec.oversample).column if target is not None else None
    if target is not None and model.engine == "hma":
        raise relational.RelationalError("synthesizer.rebalance/oversample: not available with engine hma "
                                         "(HMA samples parent and children together); use patient_centred")
    root_sampler = conditional_sampler(target, seed=spec.seed) if target else None
    train_cols = ctx.store.read_df(prepared["train_uri"]).drop(columns=[KEY])
    features = ctx.spec.features
    if prepared.get("features_uri"):  # the real table's resolved features (top/auto choices made explicit)
        from synthfactory.spec import FeatureSpec

        features = FeatureSpec.model_validate(ctx.store.read_json(prepared["features_uri"]))
    features = features.model_copy(update={  # the real table's flags and reference date (no validation)
        "top_conditions": 0, "condition_codes": list(prepared.get("condition_flags") or []),
        "reference_date": prepared.get("reference_date"), "min_patients": 0, "auto": False})
    names = [relational.ROOT, *model.layout.children]
    sinks = {name: ParquetSink(ctx.uri("synthetic", f"{name}.parquet"), ctx.store) for name in names}
    sinks["__patients"] = ParquetSink(ctx.uri("synthetic", PATIENT_TABLE), ctx.store)
    fixes: dict[str, int] = {}
    ri: dict[str, float] = {}
    violations: dict[str, int] = {}
    counts: dict[str, list[np.ndarray]] = {name: [] for name in model.layout.children}
    batch_patients = max(100, spec.sample_batch_size // 5)
    try:
        for tables, stats in relational.sample_batches(model, patients, batch_patients, seed=spec.seed,
                                                       root_sampler=root_sampler):
            for k, v in stats.items():
                fixes[k] = fixes.get(k, 0) + int(v)
            for k, v in relational.referential_integrity(tables).items():
                ri[k] = min(ri.get(k, 1.0), v)
            for k, v in relational.constraint_violations(tables).items():
                violations[k] = violations.get(k, 0) + v
            root = tables[relational.ROOT]
            for name in model.layout.children:
                counts[name].append(tables[name].groupby(relational.KEY).size()
                                    .reindex(root[relational.KEY], fill_value=0).to_numpy())
            for name in names:
                sinks[name].write(tables[name])
            derived, _ = build_modelling_table(tables, features)
            if target is not None:  # achieved shares from the derived table (condition rows honour the flags)
                target.record(derived.rename(columns={orig_col: target.column}))
            summary = _align(derived, list(train_cols.columns), dict(train_cols.dtypes))
            summary.insert(0, SYNTHETIC_ID, derived[KEY].values)
            sinks["__patients"].write(summary)
        for sink in sinks.values():
            sink.close()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    table_uris = {name: sinks[name].uri for name in names}
    rows = {name: sinks[name].rows for name in names}
    ks = _children_ks(ctx, prepared, counts)
    report: dict[str, Any] = {
        "mode": "relational", "engine": model.engine, "fit": _fit_summary(fitted), "patients": patients,
        "rows": rows, "sample_seconds": round(time.perf_counter() - t0, 3),
        "referential_integrity": ri, "children_per_parent_ks": ks, "constraint_violations": violations,
        "fixes": fixes, "constraints": [c.model_dump(exclude_none=True) for c in spec.constraints],
        "layout": {"flags": [str(f) for f in model.layout.flags], "context": model.layout.context,
                   "children": {n: {"time": c.time, "modelled": c.columns, "derived": sorted(c.derived),
                                    "link_rate": round(c.link_rate, 4)} for n, c in model.layout.children.items()}},
    }
    if target:
        report["conditional"] = target.report()
        m["conditional"] = {"column": target.column, "mode": target.mode,
                            "achieved": report["conditional"]["achieved"]}
    if "fhir_ndjson" in ctx.spec.release.formats:
        from synthfactory.synthesize.fhir_out import write_fhir_ndjson

        fhir = write_fhir_ndjson(table_uris, ctx.uri("synthetic", "fhir"), ctx.store, seed=spec.seed)
        report["fhir"] = {k: v for k, v in fhir.items() if k != "files"}
        m["fhir"] = fhir["files"]
    m.update({"synthetic_uri": sinks["__patients"].uri, "rows": patients, "tables": table_uris,
              "rows_by_table": rows, "referential_integrity": min(ri.values()) if ri else 1.0,
              "children_ks": {k: v["ks"] for k, v in ks.items()},
              "synthesis_report_uri": _write_report(ctx, report)})


def _children_ks(ctx: Any, prepared: dict, counts: dict[str, list[np.ndarray]]) -> dict:
    from scipy.stats import ks_2samp

    from synthfactory.synthesize import relational

    uris = prepared["relational_uris"]
    pkeys = ctx.store.read_df(uris[relational.ROOT], columns=[relational.KEY])[relational.KEY]
    out = {}
    for name, parts in counts.items():
        if name not in uris or not parts:
            continue
        real = ctx.store.read_df(uris[name], columns=[relational.KEY]).groupby(relational.KEY).size()
        real = real.reindex(pkeys, fill_value=0).to_numpy()
        syn = np.concatenate(parts)
        out[name] = {"ks": round(float(ks_2samp(real, syn).statistic), 4), "real_mean": round(float(real.mean()), 3),
                     "synthetic_mean": round(float(syn.mean()), 3)}
    return out


def extra_release_files(sampled: dict) -> dict[str, str]:
    """Release path -> staging URI of the synthesis outputs beyond ``data/patients.parquet``: the relational
    tables (``data/<table>.parquet``), ``reports/synthesis.json`` and FHIR (``fhir/<Type>.ndjson``)."""
    files = {f"data/{name}.parquet": uri for name, uri in (sampled.get("tables") or {}).items()}
    if sampled.get("synthesis_report_uri"):
        files["reports/synthesis.json"] = sampled["synthesis_report_uri"]
    for rtype, uri in (sampled.get("fhir") or {}).items():
        files[f"fhir/{rtype}.ndjson"] = uri
    return files
